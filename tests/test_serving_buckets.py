"""Length bucketing (issue 14, item 4): requests of different lengths batch together, padded, and answer
exactly what they answer alone.

The padding rule itself on small arrays, then the real MiniLM bundle (``make bundles``) behind a real
server: real sentences and joins of them, each sent alone (a batch of one, no padding), then all at once
so the batcher pads them into shared batches; the embeddings must agree within the build's parity
tolerance, and the server's batch-size histogram shows that batches of several (distinct) lengths ran.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import tritonclient.http as triton
from serving_support import REPO, metric_value, running_server

from contract.bundle import read_manifest
from contract.manifest import Buckets
from models.minilm import sentences, tokenize
from serving.protocol import InferRequest, Padding, stack, tensor_spec

MINILM = REPO / "dist" / "minilm" / "latest"
PUBLIC_KEY = REPO / ".keys" / "dev-ed25519.pub"
BUCKETS = Buckets(
    axis="sequence",
    lengths=(16, 32, 64),
    pad_values={"input_ids": 0, "attention_mask": 0},
    samples=1,
    max_abs_diff=0.0,
)


def _padding() -> Padding:
    manifest = read_manifest(MINILM)
    inputs = [tensor_spec(t, f"inputs[{i}]") for i, t in enumerate(manifest.inputs)]
    return Padding.from_manifest(BUCKETS, inputs)


def _request(length: int, padding: Padding | None) -> InferRequest:
    ids = np.arange(1, length + 1, dtype=np.int64)[None, :]
    inputs = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    return InferRequest(None, inputs, 1, [], elements=2 * length, padding=padding)


def test_lengths_in_one_bucket_share_a_signature_and_pad_to_the_longest() -> None:
    assert MINILM.is_dir(), "make bundles builds dist/minilm (make test runs it)"
    padding = _padding()
    short, longer, other = _request(10, padding), _request(14, padding), _request(17, padding)
    assert short.signature() == longer.signature() != other.signature()
    stacked = stack([short, longer])
    assert stacked["input_ids"].shape == (2, 14)  # the batch's longest, not the bucket's top (16)
    assert stacked["input_ids"][0, 10:].tolist() == [0] * 4
    assert stacked["attention_mask"][0].tolist() == [1] * 10 + [0] * 4
    assert stacked["input_ids"][1].tolist() == list(range(1, 15))
    # The memory budget counts a request at its bucket's top: a batch may pad it that far.
    assert short.batched_elements() == 2 * 16 and other.batched_elements() == 2 * 32


def test_without_buckets_only_equal_lengths_batch() -> None:
    assert _request(10, None).signature() != _request(14, None).signature()
    assert _request(14, None).signature() == _request(14, None).signature()


def _texts() -> list[str]:
    """Real sentences and joins of up to eight of them: distinct lengths, most of them sharing a bucket."""
    base = sentences()
    texts, seen = [], set()
    for count in range(1, 9):
        for start in range(0, 40, 3):
            text = " ".join(base[start : start + count])
            length = int(tokenize([text])["attention_mask"].sum())
            if length not in seen:
                seen.add(length)
                texts.append(text)
    return texts


def _embed(url: str, text: str) -> np.ndarray:
    tokens = tokenize([text])
    client = triton.InferenceServerClient(url)
    try:
        tensors = []
        for name in ("input_ids", "attention_mask"):
            tensor = triton.InferInput(name, list(tokens[name].shape), "INT64")
            tensor.set_data_from_numpy(tokens[name], binary_data=True)
            tensors.append(tensor)
        result = client.infer("minilm", tensors)
    finally:
        client.close()
    embedding: np.ndarray = result.as_numpy("embedding")[0]
    return embedding


@pytest.mark.slow
def test_mixed_lengths_batched_with_padding_answer_what_they_answer_alone(tmp_path: Path) -> None:
    assert MINILM.is_dir(), "make bundles builds dist/minilm (make test runs it)"
    manifest = read_manifest(MINILM)
    assert manifest.serving.buckets is not None, "dist/minilm predates serving.buckets: run make bundles"
    texts = _texts()
    lengths = [int(tokenize([t])["attention_mask"].sum()) for t in texts]
    assert len(set(lengths)) == len(texts) >= 20 and max(lengths) > 64
    # FP32: the padding proof is exact there (INT8's dynamic quantisation rescales per run, batched or not).
    extra = ["--variant", "fp32", "--max-queue-delay-ms", "50", "--max-batch-size", "16"]
    with running_server(MINILM, PUBLIC_KEY, tmp_path, extra) as server:
        url = server.base_url.removeprefix("http://")
        alone = [_embed(url, t) for t in texts]  # one at a time: batches of one, no padding
        with server.client() as http:
            before = http.get("/metrics").text
        with ThreadPoolExecutor(max_workers=16) as pool:
            together = list(pool.map(lambda t: _embed(url, t), texts * 2))
        with server.client() as http:
            after = http.get("/metrics").text
    batches = metric_value(after, "dualdeploy_batch_size_count") - metric_value(
        before, "dualdeploy_batch_size_count"
    )
    singles = metric_value(after, "dualdeploy_batch_size_bucket", 'le="1.0"') - metric_value(
        before, "dualdeploy_batch_size_bucket", 'le="1.0"'
    )
    print(
        f"\n{len(texts) * 2} requests of {len(texts)} distinct lengths "
        f"({min(lengths)}..{max(lengths)} tokens) ran in {batches:.0f} batches, "
        f"{batches - singles:.0f} of them of several lengths"
    )
    # Every length is distinct, so any batch of more than one request mixed lengths (padded).
    assert batches - singles >= 1, "no two requests of different lengths were batched"
    assert batches < len(texts) * 2
    worst = max(float(np.max(np.abs(a - b))) for a, b in zip(alone * 2, together, strict=True))
    assert worst <= 1e-4, f"padded embeddings differ from the lone ones by {worst:.2e}"
