"""Tiny models and data for the prebuild tests.

``classifier``: a two-conv network on 3×16×16 images, trained for a moment on a seeded
synthetic task so its logits are well separated. ``embedder``: a linear map followed by L2
normalisation. ``broken_classifier`` divides by the maximum of its input taken as a Python
float: eager PyTorch recomputes it per batch, the TorchScript tracer freezes the value seen
while exporting, so the ONNX graph is wrong for every other batch — a classic export bug that
the parity gate must catch.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812 - the conventional alias

SIZE = 16
CLASSES = 4


def samples(count: int, seed: int) -> dict[str, np.ndarray]:
    """Labelled images: a class prototype at random contrast plus noise."""
    protos = np.random.default_rng(7).standard_normal((CLASSES, 3, SIZE, SIZE)).astype(np.float32)
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, CLASSES, size=count)
    contrast = rng.uniform(0.5, 1.5, size=(count, 1, 1, 1)).astype(np.float32)
    images = protos[labels] * contrast + rng.standard_normal((count, 3, SIZE, SIZE), dtype=np.float32) * 0.5
    return {"image": images.astype(np.float32), "labels": labels.astype(np.int64)}


class TinyNet(nn.Module):
    """conv → ReLU → conv → ReLU → global pool → linear."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, width * 2, 3, stride=2, padding=1)
        self.head = nn.Linear(width * 2, CLASSES)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv2(F.relu(self.conv1(image))))
        return self.head(x.mean(dim=(2, 3)))


class BrokenNet(TinyNet):
    """Normalises by a Python float: correct in eager mode, frozen to one batch by the tracer."""

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        scale = float(image.abs().max())
        return super().forward(image / scale)


def _train(model: nn.Module, steps: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-2)
    for step in range(steps):
        batch = samples(32, seed=1000 + step)
        loss = F.cross_entropy(model(torch.from_numpy(batch["image"])), torch.from_numpy(batch["labels"]))
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    return model.eval()


def classifier(width: int = 16, steps: int = 40, seed: int = 0, example_batch: int = 4) -> tuple:
    """Factory: a briefly trained TinyNet and example inputs."""
    torch.manual_seed(seed)
    model = _train(TinyNet(width), steps, seed)
    return model, {"image": torch.from_numpy(samples(example_batch, seed=99)["image"])}


def student(width: int = 4, seed: int = 0) -> tuple:
    """Factory: an untrained, narrower TinyNet for distillation."""
    torch.manual_seed(seed)
    return TinyNet(width), {"image": torch.from_numpy(samples(2, seed=99)["image"])}


def broken_classifier(seed: int = 0) -> tuple:
    """Factory: BrokenNet (see the module docstring)."""
    torch.manual_seed(seed)
    model = _train(BrokenNet(), 5, seed)
    return model, {"image": torch.from_numpy(samples(4, seed=99)["image"])}


class Embedder(nn.Module):
    """Linear projection of a feature vector, L2-normalised."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(32, 16)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.proj(features), dim=1)


def embedder(seed: int = 0) -> tuple:
    """Factory: a random Embedder and example inputs."""
    torch.manual_seed(seed)
    return Embedder().eval(), {"features": torch.from_numpy(features(4, seed=5)["features"])}


def features(count: int, seed: int) -> dict[str, np.ndarray]:
    """Data factory for the embedder."""
    return {"features": np.random.default_rng(seed).standard_normal((count, 32)).astype(np.float32)}


def slow_classifier(marker: str, seconds: float = 60.0) -> tuple:
    """Factory that announces itself through ``marker`` and then hangs (to be interrupted)."""
    import pathlib
    import time

    pathlib.Path(marker).write_text("started")
    time.sleep(seconds)
    return classifier()


NOISE_SEED_OFFSET = 11


def noisy_samples(count: int, seed: int, noise: float = 0.5) -> dict[str, np.ndarray]:
    """``samples`` with its pixel noise added last as the spec's ``data.noise`` promises: the noise-free
    base plus ``noise * default_rng(seed + 11).standard_normal`` in float32."""
    protos = np.random.default_rng(7).standard_normal((CLASSES, 3, SIZE, SIZE)).astype(np.float32)
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, CLASSES, size=count)
    contrast = rng.uniform(0.5, 1.5, size=(count, 1, 1, 1)).astype(np.float32)
    images = protos[labels] * contrast
    if noise:
        pixels = np.random.default_rng(seed + NOISE_SEED_OFFSET).standard_normal(
            images.shape, dtype=np.float32
        )
        images = images + pixels * np.float32(noise)
    return {"image": images, "labels": labels.astype(np.int64)}


def noisy_samples_breaking_the_promise(count: int, seed: int, noise: float = 0.5) -> dict[str, np.ndarray]:
    """Like ``noisy_samples`` but draws its noise from another stream: no device could regenerate it."""
    data = noisy_samples(count, seed, noise=0.0)
    if noise:
        pixels = np.random.default_rng(seed + 12).standard_normal(data["image"].shape, dtype=np.float32)
        data["image"] = data["image"] + pixels * np.float32(noise)
    return data


VOCAB = 50
TEXT_LENGTH = 24


class TinyText(nn.Module):
    """Token embedding → mean over the sequence → linear; ``masked`` averages only the real tokens.

    The unmasked one averages the padding too: its outputs depend on how much padding a batch adds, a
    model that length bucketing must refuse.
    """

    def __init__(self, masked: bool = True) -> None:
        super().__init__()
        self.masked = masked
        self.embed = nn.Embedding(VOCAB, 8)
        self.head = nn.Linear(8, CLASSES)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        tokens = self.embed(input_ids)
        if not self.masked:
            return self.head(tokens.mean(dim=1))
        mask = attention_mask.unsqueeze(-1).to(tokens.dtype)
        return self.head((tokens * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0))


def token_samples(count: int, seed: int) -> dict[str, np.ndarray]:
    """Data factory: token rows of 3 to TEXT_LENGTH real tokens, padded with 0 and a zero mask."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(3, TEXT_LENGTH + 1, size=count)
    ids = np.zeros((count, TEXT_LENGTH), np.int64)
    mask = np.zeros((count, TEXT_LENGTH), np.int64)
    for row, length in enumerate(lengths):
        ids[row, :length] = rng.integers(1, VOCAB, size=length)
        mask[row, :length] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": rng.integers(0, CLASSES, size=count)}


def text_classifier(masked: bool = True, seed: int = 0) -> tuple:
    """Factory: a random TinyText and example inputs."""
    torch.manual_seed(seed)
    example = token_samples(4, seed=5)
    return TinyText(masked).eval(), {k: torch.from_numpy(example[k]) for k in ("input_ids", "attention_mask")}
