"""The smoke inference that `make edge` prints, against a real server process."""

from pathlib import Path

import numpy as np
from serving_support import make_bundle, running_server

from contract.bundle import load_tensors
from deploy.edge_rollout import smoke_inference


def test_smoke_inference_reports_the_golden_top1_over_the_binary_extension(tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path / "bundle")
    golden = load_tensors(bundle.path / bundle.manifest["golden"]["outputs"])
    (expected,) = golden.values()
    with running_server(bundle.path, bundle.public_key, tmp_path) as server:
        summary = smoke_inference(server.base_url, bundle.path)
    assert summary["shape"] == [1, expected.shape[1]]
    assert summary["top1"] == int(np.argmax(expected[0]))
    assert summary["latency_ms"] > 0


def test_smoke_inference_of_an_embedding_reports_the_norm(tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path / "bundle", kind="embedder")
    with running_server(bundle.path, bundle.public_key, tmp_path) as server:
        summary = smoke_inference(server.base_url, bundle.path)
    assert "top1" not in summary and summary["norm"] > 0
