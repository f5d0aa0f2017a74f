"""Small helpers shared by the stages: importing factories, checking tensors against the spec."""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from .errors import BuildError
from .spec import Spec, TensorSpec

LABELS = "labels"


def import_callable(target: str, stage: str, key: str) -> Callable[..., Any]:
    """Import ``package.module:function``.

    Raises:
        BuildError: naming ``key`` when the module or the function cannot be imported.
    """
    module_name, _, func_name = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # any import-time failure of user code is reported the same way
        raise BuildError(
            stage, f"{key}: cannot import module {module_name!r} ({type(exc).__name__}: {exc})"
        ) from exc
    func = getattr(module, func_name, None)
    if not callable(func):
        raise BuildError(stage, f"{key}: module {module_name!r} has no callable {func_name!r}")
    return func


def source_file(target: str, stage: str, key: str) -> Path:
    """The source file of the module in ``package.module:function``, found without importing it.

    Raises:
        BuildError: naming ``key`` when the module cannot be found.
    """
    module_name = target.partition(":")[0]
    try:
        found = importlib.util.find_spec(module_name)
    except (ImportError, ValueError) as exc:
        raise BuildError(stage, f"{key}: cannot import module {module_name!r} ({exc})") from exc
    if found is None or found.origin is None or not Path(found.origin).is_file():
        raise BuildError(stage, f"{key}: cannot import module {module_name!r} (not found on the path)")
    return Path(found.origin)


def check_signature(
    arrays: Mapping[str, np.ndarray],
    tensors: list[TensorSpec],
    section: str,
    origin: str,
    stage: str,
) -> None:
    """Check names, dtypes, ranks and fixed dimensions of ``arrays`` against the spec.

    Args:
        arrays: tensors by name (NumPy).
        tensors: the spec's ``inputs`` or ``outputs``.
        section: ``inputs`` or ``outputs`` (for the message).
        origin: where the arrays came from (for the message).
        stage: the stage to blame.

    Raises:
        BuildError: naming the spec key and both values on any mismatch.
    """
    expected = [t.name for t in tensors]
    extra = sorted(set(arrays) - set(expected) - {LABELS})
    missing = [n for n in expected if n not in arrays]
    if missing or extra:
        raise BuildError(
            stage, f"{section}: spec names {expected}, {origin} gives {sorted(set(arrays) - {LABELS})}"
        )
    sizes: dict[str, int] = {}
    for i, tensor in enumerate(tensors):
        array = arrays[tensor.name]
        if array.dtype != np.dtype(tensor.dtype):
            raise BuildError(
                stage, f"{section}[{i}].dtype: spec says {tensor.dtype}, {origin} gives {array.dtype}"
            )
        if array.ndim != len(tensor.shape):
            raise BuildError(
                stage,
                f"{section}[{i}].shape: spec has {len(tensor.shape)} axes {tensor.shape}, "
                f"{origin} gives shape {list(array.shape)}",
            )
        for axis, (dim, size) in enumerate(zip(tensor.shape, array.shape, strict=True)):
            if isinstance(dim, int) and dim != size:
                raise BuildError(
                    stage,
                    f"{section}[{i}].shape[{axis}]: spec says {dim}, {origin} gives {size} "
                    f"(shape {list(array.shape)})",
                )
            if isinstance(dim, str) and sizes.setdefault(dim, size) != size:
                raise BuildError(
                    stage,
                    f"{section}[{i}].shape[{axis}]: axis {dim!r} is {size} here but {sizes[dim]} elsewhere",
                )


def to_numpy(value: Any) -> np.ndarray:
    """A tensor or array as a contiguous NumPy array (torch imported lazily by the caller)."""
    if hasattr(value, "detach"):
        value = value.detach().cpu().numpy()
    return np.ascontiguousarray(np.asarray(value))


def input_dict(spec: Spec, value: Any, origin: str, stage: str) -> dict[str, np.ndarray]:
    """Normalise example inputs (a mapping, a sequence, or one tensor) to ``{name: array}``.

    Raises:
        BuildError: when a sequence has the wrong length.
    """
    names = [t.name for t in spec.inputs]
    if isinstance(value, Mapping):
        return {str(k): to_numpy(v) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        if len(value) != len(names):
            raise BuildError(
                stage, f"inputs: spec lists {len(names)} inputs {names}, {origin} gives {len(value)}"
            )
        return {name: to_numpy(v) for name, v in zip(names, value, strict=True)}
    if len(names) != 1:
        raise BuildError(stage, f"inputs: spec lists {len(names)} inputs {names}, {origin} gives one tensor")
    return {names[0]: to_numpy(value)}


def output_dict(spec: Spec, value: Any, stage: str) -> dict[str, np.ndarray]:
    """Map a model's forward result (tensor, tuple or mapping) to the spec's output names.

    Raises:
        BuildError: when the count or names do not match the spec's ``outputs``.
    """
    names = [t.name for t in spec.outputs]
    if isinstance(value, Mapping):
        return {str(k): to_numpy(v) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        if len(value) != len(names):
            raise BuildError(stage, f"outputs: spec lists {names}, the model returns {len(value)} tensors")
        return {name: to_numpy(v) for name, v in zip(names, value, strict=True)}
    if len(names) != 1:
        raise BuildError(stage, f"outputs: spec lists {names}, the model returns one tensor")
    return {names[0]: to_numpy(value)}


def take(arrays: Mapping[str, np.ndarray], start: int, stop: int) -> dict[str, np.ndarray]:
    """Slice every array along the first axis."""
    return {k: v[start:stop] for k, v in arrays.items()}


def batch_of(arrays: Mapping[str, np.ndarray], size: int) -> dict[str, np.ndarray]:
    """The first ``size`` samples, tiling the set when it holds fewer."""
    count = len(next(iter(arrays.values())))
    reps = -(-size // count)
    return {k: np.ascontiguousarray(np.concatenate([v] * reps)[:size]) for k, v in arrays.items()}
