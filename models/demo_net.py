"""The demo image classifier: a small CNN trained at build time on a synthetic, learnable task.

The task: each of ``NUM_CLASSES`` classes owns a fixed low-frequency colour pattern (its
prototype). A sample is its class prototype at a random contrast, shifted by a few pixels,
plus strong pixel noise and a random brightness offset. A CNN learns it in a few seconds, yet
the noise leaves some samples near the decision boundary, so agreement figures mean something.

Everything is seeded: the same ``seed`` gives the same data and, on the same machine and
thread count, the same weights.

The teacher's weights are committed (``models/demo_teacher.npz``) so that a build loads them in a
second instead of training for a minute or two; ``python -m models.demo_net train`` is the command that
made them, and a test checks that it still reproduces them.

The pixel noise is NumPy's ``default_rng(seed + NOISE_SEED_OFFSET).standard_normal`` added last, in
float32, so a device can regenerate the evaluation set from its noise-free base and the seed
(``data.noise`` in the spec; the load stage checks it bit for bit).
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812 - the conventional alias

NUM_CLASSES = 10
IMAGE_SIZE = 224
_PROTOTYPE_SEED = 1234
_GRID = 7  # prototypes are random 7x7 colour grids, upsampled to 224x224
NOISE_SEED_OFFSET = 7919
WEIGHTS = Path(__file__).with_name("demo_teacher.npz")
TRAINING = {"steps": 150, "batch_size": 32, "lr": 6e-3, "seed": 0}
"""The settings that made ``demo_teacher.npz`` (``python -m models.demo_net train``)."""


def _prototypes() -> np.ndarray:
    """The class prototypes, shape (classes, 3, 224, 224), fixed by ``_PROTOTYPE_SEED``."""
    rng = np.random.default_rng(_PROTOTYPE_SEED)
    coarse = rng.standard_normal((NUM_CLASSES, 3, _GRID, _GRID)).astype(np.float32)
    scale = IMAGE_SIZE // _GRID
    return np.repeat(np.repeat(coarse, scale, axis=2), scale, axis=3)


_PROTOS = _prototypes()


def sample_inputs(
    count: int, seed: int, noise: float = 1.0, contrast_range: tuple[float, float] = (0.06, 0.3)
) -> dict[str, np.ndarray]:
    """Draw ``count`` labelled samples of the synthetic task.

    Args:
        count: number of samples.
        seed: seed of the random generator; the same seed gives the same samples.
        noise: standard deviation of the pixel noise (the prototypes have unit variance).

    Returns:
        ``{"image": float32 (count, 3, 224, 224), "labels": int64 (count,)}``.
    """
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, NUM_CLASSES, size=count)
    contrast = rng.uniform(contrast_range[0], contrast_range[1], size=(count, 1, 1, 1)).astype(np.float32)
    brightness = rng.normal(0.0, 0.3, size=(count, 1, 1, 1)).astype(np.float32)
    images = np.empty((count, 3, IMAGE_SIZE, IMAGE_SIZE), dtype=np.float32)
    shifts = rng.integers(-8, 9, size=(count, 2))
    for i, label in enumerate(labels):
        images[i] = np.roll(_PROTOS[label], shift=tuple(shifts[i]), axis=(1, 2))
    images = images * contrast + brightness
    if noise:
        pixels = np.random.default_rng(seed + NOISE_SEED_OFFSET).standard_normal(
            images.shape, dtype=np.float32
        )
        images = images + pixels * np.float32(noise)
    return {"image": images, "labels": labels.astype(np.int64)}


class SmallCNN(nn.Module):
    """Patchify stem then stride-2 conv blocks, global average pool and a linear head."""

    def __init__(self, widths: tuple[int, ...] = (32, 64, 128, 256), num_classes: int = NUM_CLASSES) -> None:
        """Build the network.

        Args:
            widths: output channels of the stem and of each following stride-2 block.
            num_classes: size of the logits.
        """
        super().__init__()
        layers: list[nn.Module] = [
            nn.Conv2d(3, widths[0], kernel_size=4, stride=4, bias=False),
            nn.BatchNorm2d(widths[0]),
            nn.ReLU(inplace=True),
        ]
        for c_in, c_out in itertools.pairwise(widths):
            layers += [
                nn.Conv2d(c_in, c_out, kernel_size=3, stride=2, padding=1, bias=False),
                nn.BatchNorm2d(c_out),
                nn.ReLU(inplace=True),
            ]
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(widths[-1], num_classes)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """Return logits of shape (batch, classes) for images of shape (batch, 3, 224, 224)."""
        x = self.features(image)
        return self.head(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def train(
    model: nn.Module,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
) -> float:
    """Train ``model`` on fresh synthetic batches with AdamW and a cosine schedule.

    Returns:
        The wall time in seconds.
    """
    torch.manual_seed(seed)
    optimiser = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=lr, total_steps=steps)
    start = time.perf_counter()
    model.train()
    for step in range(steps):
        batch = sample_inputs(batch_size, seed=seed * 100_003 + step)
        loss = F.cross_entropy(model(torch.from_numpy(batch["image"])), torch.from_numpy(batch["labels"]))
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        schedule.step()
    model.eval()
    return time.perf_counter() - start


def accuracy(model: nn.Module, count: int = 256, seed: int = 999) -> float:
    """Top-1 accuracy of ``model`` on ``count`` held-out samples."""
    data = sample_inputs(count, seed=seed)
    with torch.inference_mode():
        logits = model(torch.from_numpy(data["image"]))
    return float((logits.argmax(-1).numpy() == data["labels"]).mean())


def build_teacher(
    *,
    widths: list[int] | None = None,
    steps: int = 150,
    batch_size: int = 32,
    lr: float = 6e-3,
    seed: int = 0,
    example_batch: int = 4,
) -> tuple[nn.Module, dict[str, torch.Tensor], dict[str, Any]]:
    """Train the demo classifier and return it with example inputs and training figures.

    Args:
        widths: channel widths (default 32, 64, 128, 256).
        steps: optimiser steps.
        batch_size: samples per step.
        lr: peak learning rate.
        seed: seed of the weights and the training data.
        example_batch: batch size of the example (golden) inputs; at least 2.

    Returns:
        ``(model, {"image": tensor}, {"train_seconds", "task_accuracy", "parameters"})``.
    """
    torch.manual_seed(seed)
    model = SmallCNN(tuple(widths or (32, 64, 128, 256)))
    seconds = train(model, steps=steps, batch_size=batch_size, lr=lr, seed=seed)
    example = sample_inputs(example_batch, seed=seed + 7)
    figures = {
        "train_seconds": round(seconds, 2),
        "task_accuracy": accuracy(model),
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    return model, {"image": torch.from_numpy(example["image"])}, figures


def save_weights(model: nn.Module, path: Path) -> None:
    """Write a module's state dict as an uncompressed ``.npz`` (no pickle; deterministic bytes)."""
    arrays = {name: value.detach().cpu().numpy() for name, value in model.state_dict().items()}
    with path.open("wb") as handle:
        np.savez(handle, **arrays)


def load_weights(model: nn.Module, path: Path) -> None:
    """Load a state dict written by :func:`save_weights` (every key must match)."""
    with np.load(path, allow_pickle=False) as data:
        state = {name: torch.from_numpy(data[name].copy()) for name in data.files}
    model.load_state_dict(state, strict=True)


def load_teacher(
    *, weights: str = WEIGHTS.name, widths: list[int] | None = None, example_batch: int = 4
) -> tuple[nn.Module, dict[str, torch.Tensor], dict[str, Any]]:
    """The demo classifier with its committed weights, example inputs and figures.

    Args:
        weights: the ``.npz`` made by ``python -m models.demo_net train``, relative to ``models/``.
        widths: channel widths the weights were trained with (default 32, 64, 128, 256).
        example_batch: batch size of the example (golden) inputs; at least 2.

    Returns:
        ``(model, {"image": tensor}, {"task_accuracy", "parameters", "weights"})``.
    """
    path = Path(weights) if Path(weights).is_absolute() else Path(__file__).parent / weights
    model = SmallCNN(tuple(widths or (32, 64, 128, 256)))
    load_weights(model, path)
    model.eval()
    example = sample_inputs(example_batch, seed=int(TRAINING["seed"]) + 7)
    figures = {
        "task_accuracy": accuracy(model),
        "parameters": sum(p.numel() for p in model.parameters()),
        "weights": path.name,
    }
    return model, {"image": torch.from_numpy(example["image"])}, figures


def train_teacher(threads: int = 1) -> nn.Module:
    """Train the demo teacher from scratch with :data:`TRAINING` (what ``train`` runs).

    One intra-op thread and deterministic algorithms: the same result on any machine whose float
    arithmetic agrees, so the committed weights can be checked against a fresh run.
    """
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(int(TRAINING["seed"]))
    model = SmallCNN()
    train(
        model,
        steps=int(TRAINING["steps"]),
        batch_size=int(TRAINING["batch_size"]),
        lr=float(TRAINING["lr"]),
        seed=int(TRAINING["seed"]),
    )
    return model


def build_student(
    widths: list[int] | None = None, seed: int = 0
) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """An untrained, narrower student network for distillation (default widths 10, 20, 40, 80).

    Returns:
        ``(model, {"image": tensor})`` with a two-sample example batch.
    """
    torch.manual_seed(seed)
    model = SmallCNN(tuple(widths or (10, 20, 40, 80)))
    example = sample_inputs(2, seed=seed + 7)
    return model, {"image": torch.from_numpy(example["image"])}


def main(argv: list[str] | None = None) -> int:
    """``python -m models.demo_net train [--out PATH]``: retrain the teacher and write its weights."""
    parser = argparse.ArgumentParser(prog="python -m models.demo_net", description=main.__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    cmd = sub.add_parser("train", help="train the demo teacher with the committed settings")
    cmd.add_argument("--out", type=Path, default=WEIGHTS, help=f"weights file to write (default {WEIGHTS})")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    model = train_teacher()
    save_weights(model, args.out)
    print(
        f"wrote {args.out} in {time.perf_counter() - started:.1f}s; task accuracy {accuracy(model):.4f}",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
