"""The model spec: a YAML file in ``models/`` parsed into frozen dataclasses.

Every key is checked: an unknown key, a value of the wrong type or an impossible value
raises :class:`~model_build.errors.SpecError` naming the file and the dotted key.
Relative paths in a spec are relative to the spec file's folder.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from .errors import SpecError

AXIS_NAMES = ("batch", "sequence")


@dataclass(frozen=True)
class TensorSpec:
    """One input or output of the model."""

    name: str
    """Tensor name in the ONNX graph and on the wire."""
    dtype: Literal["float32", "int64"]
    """Element type."""
    shape: list[int | str]
    """Dimensions: a fixed size, or an axis name (``batch`` first; ``sequence`` for text)."""
    allow_nonfinite: bool = False
    """Whether NaN/Inf are legal values of this input (the server rejects them otherwise)."""


@dataclass(frozen=True)
class FactorySpec:
    """A Python callable named ``package.module:function`` and the keyword arguments it gets."""

    factory: str
    """``package.module:function``; imported from the repository root."""
    kwargs: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments passed to the callable."""


@dataclass(frozen=True)
class NoiseSpec:
    """The data factory's additive Gaussian noise, which devices regenerate instead of receiving.

    The factory promises: ``factory(count, seed, **{kwarg: 0.0})`` returns the noise-free samples
    (the *base*), and ``factory(count, seed)`` returns the base plus
    ``std * numpy.random.default_rng(seed + seed_offset).standard_normal(shape, dtype=float32)`` on
    input ``input``. The load stage checks the promise bit for bit, then the bundle ships the
    (compressible) base and the seed rather than the full quality set.
    """

    input: str
    """The input tensor the noise is added to."""
    std: float = 1.0
    seed_offset: int = 0
    kwarg: str = "noise"
    """The factory keyword that sets the noise's standard deviation (0 gives the base)."""


@dataclass(frozen=True)
class DataSpec:
    """Where sample inputs come from: ``factory(count=, seed=, **kwargs) -> {name: array}``.

    The mapping may also hold ``labels`` (int64, one per sample) for classifiers.
    """

    factory: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    noise: NoiseSpec | None = None
    """How to regenerate the evaluation samples on a device (the on-device quality gate); without it the
    bundle ships the evaluation inputs themselves, which must then fit ``quality.max_bytes``."""


@dataclass(frozen=True)
class QualitySpec:
    """The on-device quality gate's sample set: the evaluation set, shipped or regenerated."""

    max_bytes: int = 16 << 20
    """Largest quality set (inputs, uncompressed) that a bundle ships as arrays; a larger one needs
    ``data.noise`` so that devices regenerate it."""


@dataclass(frozen=True)
class EvaluationSpec:
    """The held-out set that the accuracy gates are measured on."""

    samples: int = 256
    seed: int = 2


@dataclass(frozen=True)
class CalibrationSpec:
    """Calibration data for static INT8 quantization."""

    file: str | None = None
    """An ``.npz`` of calibration inputs (first axis = samples); default: draw from ``data``."""
    samples: int = 64
    seed: int = 1
    batch_size: int = 8
    method: Literal["minmax", "entropy", "percentile"] = "minmax"


@dataclass(frozen=True)
class ExportSpec:
    """ONNX export settings."""

    opset: int = 18
    exporter: Literal["dynamo", "torchscript"] = "dynamo"
    """``dynamo`` (torch.export + onnxscript, torch's default) or the legacy TorchScript exporter."""


@dataclass(frozen=True)
class ParitySpec:
    """FP32 ONNX Runtime vs PyTorch tolerance (fatal when exceeded)."""

    atol: float = 1e-4
    rtol: float = 1e-3


@dataclass(frozen=True)
class QuantizeSpec:
    """INT8 quantization with ONNX Runtime and its accuracy gate."""

    enabled: bool = True
    mode: Literal["static", "dynamic"] = "static"
    """``static`` QDQ with calibration (convolutional models) or ``dynamic`` (transformer MatMuls)."""
    per_channel: bool = True
    reduce_range: bool = True
    """7-bit weights. On x86-64 without VNNI, ONNX Runtime's u8s8 kernels add pairs of products in 16
    bits, which saturates with 8-bit weights; 7 bits keep the sums exact on every x86 CPU class."""
    activation_type: Literal["quint8", "qint8"] = "quint8"
    weight_type: Literal["qint8", "quint8"] = "qint8"
    op_types: list[str] = field(default_factory=list)
    """Operator types to quantize; empty means ONNX Runtime's default for the mode."""
    min_agreement: float = 0.99
    """Classification gate: top-1 agreement with the PyTorch reference."""
    min_cosine: float = 0.98
    """Embedding gate: minimum per-row cosine similarity to the PyTorch reference."""
    on_gate_failure: Literal["fail", "drop"] = "drop"
    """What a CPU class that fails the INT8 gate does. ``drop``: that class serves FP32, the failure is
    recorded in the manifest and printed, and the build goes on (FP32 serves every class). ``fail``:
    stop the build."""
    device_classes: list[str] = field(default_factory=lambda: ["x86_cpu", "arm64_cpu", "jetson", "ascend"])
    """Device classes (contract/device_classes.yaml) that may run the INT8 ONNX variant."""
    cpu_classes: list[str] = field(default_factory=list)
    """CPU classes (``cpu_classes`` of contract/device_classes.yaml) the INT8 variant must be right on;
    empty means every CPU class of the architectures that ``device_classes`` detect. Each is gated
    natively, under its emulator, or recorded as unverified."""
    emulated_samples: int = 0
    """Evaluation samples run under an emulator (it is slow); 0 means all of them."""


@dataclass(frozen=True)
class DistilSpec:
    """Knowledge distillation from the loaded teacher to a smaller student."""

    student: FactorySpec
    """Factory returning the untrained student and example inputs."""
    temperature: float = 4.0
    alpha: float = 0.7
    """Weight of the softened-KL term; ``1 - alpha`` weights the task (cross-entropy) loss."""
    steps: int = 300
    batch_size: int = 32
    lr: float = 5e-3
    seed: int = 0
    max_param_ratio: float = 0.125
    """Gate: student parameters / teacher parameters."""
    min_agreement: float = 0.95
    """Gate: top-1 agreement of the student with the teacher on the evaluation set."""


@dataclass(frozen=True)
class CascadeSpec:
    """Edge-cloud cascade: the student answers, and escalates its least confident inputs to the teacher.

    The prebuild sweeps the confidence threshold on a held-out set (drawn from ``data`` with ``seed``,
    never used for training or the other gates) and records in the manifest the threshold with the smallest
    escalation rate whose cascade agrees with the teacher at least ``target_agreement``.
    """

    teacher: str
    """The teacher's spec file (relative to this spec), e.g. ``demo.yaml``: its bundle is what the cloud
    serves, so its name and version are recorded; its model must be this spec's ``model`` section."""
    target_agreement: float = 0.998
    """Top-1 agreement of the cascade (student above the threshold, teacher below) with the teacher."""
    confidence_level: float = 0.95
    """One-sided confidence that the cascade reaches ``target_agreement`` on new inputs: the Wilson lower
    bound of the measured agreement must reach it. 0 uses the measured agreement itself (overfits the
    threshold to the calibration set)."""
    measure: Literal["margin", "max_softmax"] = "margin"
    """``margin``: top-1 minus top-2 softmax probability (the distance to a flipped answer, default);
    ``max_softmax``: the top-1 probability."""
    samples: int = 2048
    seed: int = 3


@dataclass(frozen=True)
class TensorRTSpec:
    """TensorRT engines, one per GPU architecture and precision."""

    archs: list[str] = field(default_factory=list)
    """Compute capabilities, e.g. ``sm_86`` (A10G), ``sm_89`` (L4), ``sm_75`` (T4)."""
    precisions: list[Literal["fp16", "int8"]] = field(default_factory=lambda: ["fp16"])
    workspace_mb: int = 1024
    max_sequence: int = 128
    """Upper bound of the ``sequence`` axis in the optimisation profile (text models)."""


@dataclass(frozen=True)
class BenchmarkSpec:
    """CPU benchmark of every ONNX variant with ONNX Runtime."""

    warmup: int = 10
    iterations: int = 100
    throughput_batch: int = 8
    threads: int = 0
    """ONNX Runtime intra-op threads; 0 lets ONNX Runtime choose."""
    max_slowdown: float = 0.0
    """Drop a variant whose batch-1 p50 exceeds FP32's by more than this fraction.

    Negative values demand a speed-up (-0.1: at least 10 % faster than FP32)."""


@dataclass(frozen=True)
class BucketSpec:
    """Length bucketing: the server batches requests of different lengths along ``axis`` together,
    padded with ``pad_values``, when their lengths fall into the same bucket.

    The prebuild proves that padding is invisible (each sample alone at its own length against the
    same sample padded to its bucket's top in a batch of others) within ``parity``'s tolerance, and
    records the buckets and the measured difference in the manifest.
    """

    axis: str
    """A named input axis (``axes``), e.g. ``sequence``; no output may carry it."""
    lengths: list[int]
    """Bucket tops, ascending; the last is ``axes[axis]`` so every admitted length has a bucket."""
    pad_values: dict[str, float]
    """The padding of every input that carries the axis (e.g. token id 0 and attention mask 0)."""
    samples: int = 64
    """Evaluation samples the padding proof runs on."""


@dataclass(frozen=True)
class ServingSpec:
    """Serving hints copied into the manifest for the server's dynamic batcher."""

    max_batch_size: int = 8
    max_queue_delay_ms: float = 5.0
    buckets: BucketSpec | None = None
    """Batch different lengths of a dynamic axis together (text models); None batches equal shapes only."""


@dataclass(frozen=True)
class Spec:
    """A model spec (one YAML file)."""

    name: str
    task: Literal["classification", "embedding"]
    model: FactorySpec
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    data: DataSpec | None = None
    evaluation: EvaluationSpec = field(default_factory=EvaluationSpec)
    calibration: CalibrationSpec = field(default_factory=CalibrationSpec)
    export: ExportSpec = field(default_factory=ExportSpec)
    parity: ParitySpec = field(default_factory=ParitySpec)
    quantize: QuantizeSpec = field(default_factory=QuantizeSpec)
    distil: DistilSpec | None = None
    cascade: CascadeSpec | None = None
    tensorrt: TensorRTSpec = field(default_factory=TensorRTSpec)
    benchmark: BenchmarkSpec = field(default_factory=BenchmarkSpec)
    serving: ServingSpec = field(default_factory=ServingSpec)
    quality: QualitySpec = field(default_factory=QualitySpec)
    axes: dict[str, int] = field(default_factory=dict)
    """The largest size of each named input axis other than ``batch`` (``{sequence: 512}``): the server
    refuses larger inputs before building a tensor, and the build checks the model runs at that size."""
    path: Path = Path()
    """The spec file (set by :func:`load_spec`, not a YAML key)."""

    @property
    def folder(self) -> Path:
        """The folder that relative paths in the spec are resolved against."""
        return self.path.parent

    def resolve(self, relpath: str) -> Path:
        """Resolve a path written in the spec."""
        candidate = Path(relpath)
        return candidate if candidate.is_absolute() else self.folder / candidate

    def as_dict(self) -> dict[str, Any]:
        """The spec as plain data (for hashing), without its file path."""
        data = dataclasses.asdict(self)
        data.pop("path")
        return data


_NOT_YAML = {"path"}


def _check_union(value: Any, tp: Any, where: str, path: Path) -> Any:
    """``X | None`` reports X's own error; ``int | str`` tries each option in turn."""
    args = typing.get_args(tp)
    if value is None and type(None) in args:
        return None
    options = [option for option in args if option is not type(None)]
    if len(options) == 1:
        return _convert(value, options[0], where, path)
    for option in options:
        try:
            return _convert(value, option, where, path)
        except SpecError:
            continue
    raise SpecError(path, where, f"{value!r} does not fit {_type_name(tp)}")


def _check_container(value: Any, tp: Any, where: str, path: Path) -> Any:
    """``list[T]`` (each item checked) or ``dict[str, Any]``."""
    if typing.get_origin(tp) is list:
        if not isinstance(value, list):
            raise SpecError(path, where, f"expected a list, got {type(value).__name__}")
        (item_tp,) = typing.get_args(tp)
        return [_convert(item, item_tp, f"{where}[{i}]", path) for i, item in enumerate(value)]
    if not isinstance(value, dict):
        raise SpecError(path, where, f"expected a mapping, got {type(value).__name__}")
    return dict(value)


def _check_scalar(value: Any, tp: Any, where: str, path: Path) -> Any:
    """Check ``value`` against an annotation; return it (ints widen to float)."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise SpecError(path, where, f"{value!r} is not one of {', '.join(map(repr, allowed))}")
        return value
    if origin in (types.UnionType, typing.Union):
        return _check_union(value, tp, where, path)
    if origin in (list, dict):
        return _check_container(value, tp, where, path)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
        raise SpecError(path, where, f"expected {tp.__name__}, got {type(value).__name__} {value!r}")
    return value


def _type_name(tp: Any) -> str:
    return str(tp).replace("typing.", "")


def _convert(value: Any, tp: Any, where: str, path: Path) -> Any:
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        return _build(tp, value, where, path)
    return _check_scalar(value, tp, where, path)


def _build(cls: type, data: Any, where: str, path: Path) -> Any:
    """Build dataclass ``cls`` from a YAML mapping, naming any unknown or missing key."""
    if not isinstance(data, dict):
        raise SpecError(path, where or "<top>", f"expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls) if f.name not in _NOT_YAML}
    prefix = f"{where}." if where else ""
    for key in data:
        if key not in known:
            raise SpecError(path, f"{prefix}{key}", f"unknown key (allowed here: {', '.join(sorted(known))})")
    kwargs: dict[str, Any] = {}
    for name, fld in known.items():
        if name in data:
            kwargs[name] = _convert(data[name], hints[name], f"{prefix}{name}", path)
        elif fld.default is dataclasses.MISSING and fld.default_factory is dataclasses.MISSING:
            raise SpecError(path, f"{prefix}{name}", "required key is missing")
    return cls(**kwargs)


def _validate_tensors(spec: Spec) -> None:
    """Inputs and outputs: non-empty, unique names, ``batch`` first, known axis names."""
    for section, tensors in (("inputs", spec.inputs), ("outputs", spec.outputs)):
        if not tensors:
            raise SpecError(spec.path, section, "must list at least one tensor")
        names = [t.name for t in tensors]
        if len(set(names)) != len(names):
            raise SpecError(spec.path, section, f"duplicate tensor names {names}")
        for i, tensor in enumerate(tensors):
            where = f"{section}[{i}].shape"
            if not tensor.shape or tensor.shape[0] != "batch":
                raise SpecError(spec.path, where, "the first axis must be 'batch'")
            for dim in tensor.shape:
                if isinstance(dim, str) and dim not in AXIS_NAMES:
                    raise SpecError(spec.path, where, f"axis name {dim!r} not in {AXIS_NAMES}")
                if isinstance(dim, int) and dim <= 0:
                    raise SpecError(spec.path, where, f"dimension {dim} must be positive")
    _validate_axes(spec)


def _validate_axes(spec: Spec) -> None:
    """Every named input axis but ``batch`` has a positive maximum in ``axes``, and nothing else does."""
    named = sorted({d for t in spec.inputs for d in t.shape[1:] if isinstance(d, str) and d != "batch"})
    for axis in named:
        if axis not in spec.axes:
            raise SpecError(
                spec.path,
                f"axes.{axis}",
                f"the inputs use axis {axis!r}, so the spec must give its largest size (e.g. the model's "
                "position embeddings for a sequence); the server refuses larger inputs with it",
            )
    for axis, size in spec.axes.items():
        if axis == "batch":
            raise SpecError(spec.path, "axes.batch", "the batch axis is bounded by serving.max_batch_size")
        if axis not in named:
            raise SpecError(spec.path, f"axes.{axis}", f"no input uses axis {axis!r} (inputs use {named})")
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise SpecError(spec.path, f"axes.{axis}", f"must be a positive integer, got {size!r}")
    sequence = spec.axes.get("sequence")
    if spec.tensorrt.archs and sequence is not None and spec.tensorrt.max_sequence > sequence:
        raise SpecError(
            spec.path,
            "tensorrt.max_sequence",
            f"{spec.tensorrt.max_sequence} is above axes.sequence ({sequence})",
        )


def _validate_numbers(spec: Spec) -> None:
    """Counts are positive, fractions lie in [0, 1]."""
    for key, value in (
        ("evaluation.samples", spec.evaluation.samples),
        ("calibration.samples", spec.calibration.samples),
        ("calibration.batch_size", spec.calibration.batch_size),
        ("benchmark.iterations", spec.benchmark.iterations),
        ("benchmark.throughput_batch", spec.benchmark.throughput_batch),
        ("serving.max_batch_size", spec.serving.max_batch_size),
    ):
        if value < 1:
            raise SpecError(spec.path, key, f"must be at least 1, got {value}")
    for key, fraction in (
        ("quantize.min_agreement", spec.quantize.min_agreement),
        ("quantize.min_cosine", spec.quantize.min_cosine),
    ):
        if not 0.0 <= fraction <= 1.0:
            raise SpecError(spec.path, key, f"must be between 0 and 1, got {fraction}")


def _validate_sources(spec: Spec) -> None:
    """Factory names are ``module:function``; calibration and distillation have their data."""
    path = spec.path
    targets = [("model.factory", spec.model.factory)]
    if spec.data is not None:
        targets.append(("data.factory", spec.data.factory))
    if spec.distil is not None:
        targets.append(("distil.student.factory", spec.distil.student.factory))
    for where, target in targets:
        module, _, func = target.partition(":")
        if not module or not func:
            raise SpecError(path, where, f"{target!r} is not of the form 'package.module:function'")
    if spec.quantize.enabled and spec.quantize.mode == "static":
        if spec.calibration.file is not None:
            calib = spec.resolve(spec.calibration.file)
            if not calib.is_file():
                raise SpecError(path, "calibration.file", f"calibration file {calib} does not exist")
        elif spec.data is None:
            raise SpecError(
                path, "calibration", "static quantization needs calibration.file or a data section"
            )
    if spec.distil is not None and spec.task != "classification":
        raise SpecError(path, "distil", "distillation is implemented for classification models only")
    if spec.distil is not None and spec.data is None:
        raise SpecError(path, "data", "distillation needs a data section to draw training samples from")


def _validate_buckets(spec: Spec) -> None:
    """Buckets cover a named input axis up to its maximum, pad every input on it, and no output has it."""
    buckets, path = spec.serving.buckets, spec.path
    if buckets is None:
        return
    if buckets.axis not in spec.axes:
        raise SpecError(
            path,
            "serving.buckets.axis",
            f"{buckets.axis!r} is not a named input axis with a maximum (axes: {sorted(spec.axes)})",
        )
    top = spec.axes[buckets.axis]
    lengths = buckets.lengths
    if not lengths or any(not isinstance(n, int) or isinstance(n, bool) or n < 1 for n in lengths):
        raise SpecError(path, "serving.buckets.lengths", f"must be positive integers, got {lengths!r}")
    if lengths != sorted(set(lengths)) or lengths[-1] != top:
        raise SpecError(
            path,
            "serving.buckets.lengths",
            f"{lengths} must rise strictly and end at axes.{buckets.axis} ({top}), so every admitted "
            "length has a bucket",
        )
    padded = sorted(t.name for t in spec.inputs if buckets.axis in t.shape[1:])
    if sorted(buckets.pad_values) != padded:
        raise SpecError(
            path,
            "serving.buckets.pad_values",
            f"must give the padding of exactly the inputs on axis {buckets.axis!r}: {padded} "
            f"(got {sorted(buckets.pad_values)})",
        )
    for output in spec.outputs:
        if buckets.axis in output.shape:
            raise SpecError(
                path,
                "serving.buckets.axis",
                f"output {output.name!r} carries axis {buckets.axis!r}: the server would return the "
                "padding in it; bucket only models whose outputs do not (pooled embeddings, logits)",
            )
    if buckets.samples < 1:
        raise SpecError(path, "serving.buckets.samples", f"must be at least 1, got {buckets.samples}")


def _validate_cascade(spec: Spec) -> None:
    """A cascade escalates on class confidence: a distilled classifier only, a sane target."""
    cascade, path = spec.cascade, spec.path
    if cascade is None:
        return
    if spec.task != "classification":
        raise SpecError(
            path,
            "cascade",
            f"task {spec.task!r} has no class output to measure confidence on; only classification "
            "models can escalate (remove the cascade section)",
        )
    if spec.distil is None:
        raise SpecError(
            path, "cascade", "needs a distil section: the teacher is the model the student was distilled from"
        )
    if not 0.0 < cascade.target_agreement <= 1.0:
        raise SpecError(
            path, "cascade.target_agreement", f"must be in (0, 1], got {cascade.target_agreement}"
        )
    if not 0.0 <= cascade.confidence_level < 1.0:
        raise SpecError(
            path, "cascade.confidence_level", f"must be in [0, 1), got {cascade.confidence_level}"
        )
    if cascade.samples < 1:
        raise SpecError(path, "cascade.samples", f"must be at least 1, got {cascade.samples}")
    if not spec.resolve(cascade.teacher).is_file():
        raise SpecError(
            path, "cascade.teacher", f"teacher spec {spec.resolve(cascade.teacher)} does not exist"
        )


def _validate_quality(spec: Spec) -> None:
    """The regenerated quality set's noise and the emulated sample count."""
    path = spec.path
    if spec.data is not None and spec.data.noise is not None:
        noise = spec.data.noise
        float_inputs = [t.name for t in spec.inputs if t.dtype == "float32"]
        if noise.input not in float_inputs:
            raise SpecError(
                path, "data.noise.input", f"{noise.input!r} is not a float32 input ({float_inputs})"
            )
        if noise.std <= 0:
            raise SpecError(path, "data.noise.std", f"must be positive, got {noise.std}")
    if spec.quantize.emulated_samples < 0:
        raise SpecError(path, "quantize.emulated_samples", "must be 0 (all) or positive")


def _validate(spec: Spec) -> None:
    """Cross-field checks that types alone cannot express."""
    if not re.fullmatch(r"[a-z0-9][a-z0-9._-]{0,62}", spec.name):
        raise SpecError(
            spec.path, "name", f"{spec.name!r} must be lower-case letters, digits, '.', '_' or '-'"
        )
    _validate_tensors(spec)
    _validate_numbers(spec)
    _validate_sources(spec)
    _validate_quality(spec)
    _validate_cascade(spec)
    _validate_buckets(spec)
    for arch in spec.tensorrt.archs:
        if not (arch.startswith("sm_") and arch[3:].isdigit()):
            raise SpecError(
                spec.path, "tensorrt.archs", f"{arch!r} is not of the form sm_<major><minor>, e.g. sm_86"
            )


def load_spec(path: Path | str) -> Spec:
    """Read and validate a spec file.

    Args:
        path: the YAML spec.

    Returns:
        The validated spec.

    Raises:
        SpecError: the file is missing or not YAML, or a key is unknown, mistyped or invalid.
    """
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise SpecError(path, "<file>", f"cannot read ({exc.strerror})") from exc
    except yaml.YAMLError as exc:
        raise SpecError(path, "<file>", f"not valid YAML ({exc})") from exc
    spec = _build(Spec, raw, "", path)
    spec = dataclasses.replace(spec, path=path.resolve())
    _validate(spec)
    return spec
