"""The manifest as a typed schema: the one contract that the prebuild writes and every reader uses.

``Manifest.parse(data)`` validates the bytes of ``manifest.json`` (exactly the bytes whose signature
was checked) and returns frozen objects; a malformed manifest is a :class:`ManifestError` that names the
field (``variants[1].tolerance.min_agreement: Input should be a valid number``), never a traceback.
``Manifest.json_schema()`` exports the schema for readers in other languages (``python -m
contract.manifest`` prints it).

Schema versions: 2 adds ``quality``, and ``quantization``, ``cpu`` and ``quality`` on variants. Version-1
manifests still parse; their INT8 variants carry no ``cpu`` record, so no CPU class counts as validated
for them. 3 adds ``axes`` (the largest size of every named input axis but ``batch``, required from 3 on)
and ``serving.max_sample_bytes``; older manifests still parse, and the server asks its operator for the
bounds they lack (``--axis-max``) rather than serve an unbounded axis. 4 adds ``cascade`` (a distilled
classifier's calibrated escalation to its teacher; optional, and only on classification bundles); older
manifests still parse and have none, so their servers never escalate. 5 adds ``serving.buckets`` (length
bucketing of a dynamic axis, with the padding the build proved invisible); older manifests batch equal
shapes only.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

SCHEMA_VERSION = 5
READABLE_SCHEMA_VERSIONS = (1, 2, 3, 4, 5)


class ManifestError(ValueError):
    """The manifest does not fit the schema; the message names each field that does not."""


class _Model(BaseModel):
    # Unknown keys are kept (a newer writer may add some), never trusted: readers use declared fields only.
    model_config = ConfigDict(frozen=True, extra="allow", strict=False)


class TensorEntry(_Model):
    """One input or output: its wire name, element type and shape (fixed sizes or axis names)."""

    name: str
    dtype: str
    shape: tuple[int | str, ...]
    allow_nonfinite: bool = False


class FileEntry(_Model):
    """A listed file's sha256 and size in bytes."""

    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    size: int = Field(ge=0)


class Tolerance(_Model):
    """How a variant's outputs are compared with a reference (``contract.bundle.compare_outputs``)."""

    kind: Literal["allclose", "top1", "cosine"]
    atol: float | None = None
    rtol: float | None = None
    min_agreement: float | None = Field(default=None, ge=0.0, le=1.0)
    min_cosine: float | None = Field(default=None, ge=-1.0, le=1.0)

    def as_dict(self) -> dict[str, Any]:
        """The plain mapping ``compare_outputs`` takes (unset bounds left out)."""
        return self.model_dump(exclude_none=True)


class CpuResult(_Model):
    """One CPU class's verdict of the INT8 gate at build."""

    status: Literal["passed", "failed", "unverified"]
    via: str = "none"
    arch: str | None = None
    requires: tuple[str, ...] = ()
    reason: str | None = None


class CpuValidation(_Model):
    """The CPU classes an INT8 variant passed its gate on, and every claimed class's verdict."""

    validated: tuple[str, ...] = ()
    results: dict[str, CpuResult] = Field(default_factory=dict)


class VariantQuality(_Model):
    """The variant's outputs on the quality set at build, and the tolerance derived from the build."""

    outputs: str
    atol: float = Field(ge=0.0)
    near_ties: float = Field(default=0.0, ge=0.0, le=1.0)


class Variant(_Model):
    """One runnable artefact of the bundle."""

    name: str
    file: str
    format: Literal["onnx", "tensorrt"]
    precision: Literal["fp32", "fp16", "int8"]
    device_classes: tuple[str, ...]
    tolerance: Tolerance
    metrics: dict[str, float] = Field(default_factory=dict)
    quantization: dict[str, Any] | None = None
    cpu: CpuValidation | None = None
    quality: VariantQuality | None = None
    engine: str | None = None
    gpu_arch: str | None = None
    tensorrt_version: str | None = None
    cuda_version: str | None = None

    @property
    def latency_ms_p50(self) -> float | None:
        """The prebuild's measured batch-1 p50, when it measured one."""
        return self.metrics.get("latency_ms_p50")


class Golden(_Model):
    """The golden inputs and PyTorch outputs (a few rows, for the quick warm-up check)."""

    inputs: str
    outputs: str


class QualityNoise(_Model):
    """The quality set's regenerated noise: ``std * default_rng(seed).standard_normal`` on ``input``."""

    input: str
    std: float = Field(gt=0.0)
    seed: int


class QualityInputs(_Model):
    """Where the quality set's inputs come from: shipped arrays, or a base plus regenerated noise."""

    file: str | None = None
    base: str | None = None
    noise: QualityNoise | None = None


class Quality(_Model):
    """The on-device quality gate's set (schema 2)."""

    count: int = Field(ge=1)
    batch: int = Field(default=32, ge=1)
    inputs: QualityInputs
    first_batch_sha256: str
    reference: str


def bucket_top(lengths: Sequence[int], length: int) -> int:
    """The top of the length bucket ``length`` falls into: the first of the rising ``lengths`` at or above it
    (``length`` itself beyond the last, which the axis bound refuses before any batching)."""
    return next((top for top in lengths if length <= top), length)


class Buckets(_Model):
    """Length bucketing (schema 5): requests whose ``axis`` lengths share a bucket batch together, padded."""

    axis: str = Field(min_length=1)
    lengths: tuple[int, ...] = Field(min_length=1)
    """Bucket tops, rising; the last is ``axes[axis]``."""
    pad_values: dict[str, float] = Field(min_length=1)
    """The padding of each input that carries the axis."""
    samples: int = Field(ge=1)
    max_abs_diff: float = Field(ge=0.0)
    """The largest difference the build measured between a sample alone and padded in a batch."""

    @model_validator(mode="after")
    def _rising(self) -> Buckets:
        if any(n < 1 for n in self.lengths) or list(self.lengths) != sorted(set(self.lengths)):
            raise ValueError(f"lengths: must rise strictly from 1, got {list(self.lengths)}")
        return self

    def bucket(self, length: int) -> int:
        """The top of the bucket a length falls into (:func:`bucket_top`)."""
        return bucket_top(self.lengths, length)


class ServingHints(_Model):
    """The prebuild's hints for the server's dynamic batcher."""

    max_batch_size: int = Field(default=1, ge=1)
    max_queue_delay_ms: float = Field(default=1.0, ge=0.0)
    max_sample_bytes: int | None = Field(default=None, ge=0)
    """Run-time memory of one sample at the axis maxima, measured at build (``model_build.memory``)."""
    buckets: Buckets | None = None
    """Schema 5: batch different lengths of one axis together; None batches equal shapes only."""


class CascadeTeacher(_Model):
    """The model the cloud serves for escalated inputs: the bundle the student was calibrated against."""

    model: str = Field(min_length=1)
    version: str = Field(min_length=1)


class CascadePoint(_Model):
    """One threshold of the build's sweep, measured on the held-out set."""

    threshold: float
    escalation_rate: float = Field(ge=0.0, le=1.0)
    agreement: float = Field(ge=0.0, le=1.0)
    agreement_lower_bound: float | None = Field(default=None, ge=0.0, le=1.0)


class Cascade(_Model):
    """Edge-cloud cascade (schema 4): escalate an input when its confidence is below ``threshold``."""

    measure: Literal["margin", "max_softmax"]
    """``margin``: top-1 minus top-2 softmax probability; ``max_softmax``: the top-1 probability."""
    output: str = Field(min_length=1)
    """The output tensor (logits, one row a sample) the confidence is computed on."""
    threshold: float = Field(ge=0.0)
    """Inputs with confidence strictly below it escalate (above 1 when every input must)."""
    target_agreement: float = Field(gt=0.0, le=1.0)
    expected_escalation_rate: float = Field(ge=0.0, le=1.0)
    expected_agreement: float = Field(ge=0.0, le=1.0)
    """The cascade's top-1 agreement with the teacher on the held-out set at ``threshold``."""
    confidence_level: float = Field(default=0.0, ge=0.0, lt=1.0)
    """The one-sided confidence the threshold was chosen with (0: on the measured agreement alone)."""
    agreement_lower_bound: float | None = Field(default=None, ge=0.0, le=1.0)
    """The Wilson lower bound of ``expected_agreement`` at ``confidence``; it reaches the target."""
    student_agreement: float = Field(ge=0.0, le=1.0)
    """The student's own top-1 agreement with the teacher on the same set (no escalation)."""
    samples: int = Field(ge=1)
    seed: int
    teacher: CascadeTeacher
    sweep: tuple[CascadePoint, ...] = ()

    def confidence(self, logits: np.ndarray) -> np.ndarray:
        """The confidence of each row of ``logits`` by this cascade's measure (float64, one per row)."""
        return confidence(logits, self.measure)

    def escalate(self, logits: np.ndarray) -> np.ndarray:
        """Which rows of ``logits`` escalate: confidence strictly below the threshold."""
        return np.asarray(self.confidence(logits) < self.threshold)


def confidence(logits: np.ndarray, measure: str) -> np.ndarray:
    """Softmax confidence of each row: top-1 minus top-2 probability (``margin``) or top-1 (``max_softmax``).

    The prebuild calibrates with it and the server escalates with it: one definition for both.

    Raises:
        ValueError: an unknown measure, or logits that are not (rows, classes >= 2).
    """
    x = np.asarray(logits, dtype=np.float64)
    if x.ndim != 2 or x.shape[1] < 2:
        raise ValueError(f"confidence needs logits of shape (rows, classes >= 2), got {x.shape}")
    x = x - x.max(axis=1, keepdims=True)
    probs = np.exp(x)
    probs /= probs.sum(axis=1, keepdims=True)
    top2 = np.sort(probs, axis=1)[:, -2:]
    if measure == "margin":
        return np.asarray(top2[:, 1] - top2[:, 0])
    if measure == "max_softmax":
        return np.asarray(top2[:, 1])
    raise ValueError(f"unknown confidence measure {measure!r} (margin, max_softmax)")


class Manifest(_Model):
    """``manifest.json``: what a bundle holds and how each artefact was made and checked."""

    schema_version: int
    model: str = Field(min_length=1)
    version: str = Field(min_length=1)
    task: Literal["classification", "embedding"]
    inputs: tuple[TensorEntry, ...] = Field(min_length=1)
    outputs: tuple[TensorEntry, ...] = Field(min_length=1)
    files: dict[str, FileEntry] = Field(min_length=1)
    variants: tuple[Variant, ...] = ()
    golden: Golden
    quality: Quality | None = None
    axes: dict[str, int] = Field(default_factory=dict)
    """The largest size of each named input axis other than ``batch`` (schema 3)."""
    serving: ServingHints = Field(default_factory=ServingHints)
    dropped: tuple[dict[str, Any], ...] = ()
    skipped: tuple[dict[str, Any], ...] = ()
    tools: dict[str, str] = Field(default_factory=dict)
    source: dict[str, Any] = Field(default_factory=dict)
    build: dict[str, Any] = Field(default_factory=dict)
    distillation: dict[str, Any] | None = None
    cascade: Cascade | None = None
    """Schema 4: how a distilled classifier escalates to its teacher; absent means never."""

    @classmethod
    def parse(cls, data: bytes | str | Mapping[str, Any]) -> Manifest:
        """Validate a manifest (its JSON bytes, or an already parsed mapping).

        Raises:
            ManifestError: naming every field that does not fit, or an unreadable schema version.
        """
        try:
            raw = json.loads(data) if isinstance(data, bytes | str) else dict(data)
        except (ValueError, RecursionError) as exc:
            raise ManifestError(f"not valid JSON ({type(exc).__name__}: {str(exc)[:200]})") from None
        if not isinstance(raw, dict):
            raise ManifestError(f"must be a JSON object, not {type(raw).__name__}")
        if raw.get("schema_version") not in READABLE_SCHEMA_VERSIONS:
            raise ManifestError(
                f"schema_version {raw.get('schema_version')!r} is not supported "
                f"(this build reads {', '.join(map(str, READABLE_SCHEMA_VERSIONS))})"
            )
        try:
            return cls.model_validate(raw)
        except ValidationError as exc:
            problems = [f"{_path(err['loc'])}: {err['msg']}" for err in exc.errors(include_url=False)[:8]]
            more = exc.error_count() - len(problems)
            raise ManifestError("; ".join(problems) + (f" (and {more} more)" if more > 0 else "")) from None

    @model_validator(mode="after")
    def _bounded_axes(self) -> Manifest:
        for axis, size in self.axes.items():
            if size < 1:
                raise ValueError(f"axes.{axis}: must be at least 1, got {size}")
        missing = self.unbounded_axes() if self.schema_version >= 3 else []
        if missing:
            raise ValueError(f"axes: gives no maximum for the input axis {', '.join(missing)}")
        buckets = self.serving.buckets
        if buckets is not None:
            carriers = sorted(t.name for t in self.inputs if buckets.axis in t.shape[1:])
            if not carriers or sorted(buckets.pad_values) != carriers:
                raise ValueError(
                    f"serving.buckets.pad_values: must pad exactly the inputs on axis {buckets.axis!r} "
                    f"({carriers}), got {sorted(buckets.pad_values)}"
                )
            if any(buckets.axis in t.shape for t in self.outputs):
                raise ValueError(f"serving.buckets.axis: an output carries {buckets.axis!r}")
        if self.cascade is not None:
            if self.task != "classification":
                raise ValueError(f"cascade: a {self.task} bundle has no class output to escalate on")
            if self.cascade.output not in {t.name for t in self.outputs}:
                raise ValueError(f"cascade.output: {self.cascade.output!r} is not an output of the model")
        return self

    def unbounded_axes(self) -> list[str]:
        """Named input axes (other than ``batch``) that the manifest gives no maximum for (schema < 3)."""
        named = {d for t in self.inputs for d in t.shape[1:] if isinstance(d, str) and d != "batch"}
        return sorted(named - set(self.axes))

    def variant(self, name: str) -> Variant:
        """The variant called ``name``.

        Raises:
            KeyError: the manifest has no such variant.
        """
        for variant in self.variants:
            if variant.name == name:
                return variant
        raise KeyError(name)

    @classmethod
    def json_schema(cls) -> dict[str, Any]:
        """The JSON Schema of the manifest, for readers in other languages."""
        return cls.model_json_schema()


def _path(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "<top>"


if __name__ == "__main__":
    json.dump(Manifest.json_schema(), sys.stdout, indent=2)
    sys.stdout.write("\n")
