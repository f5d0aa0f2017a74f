"""Stage 6: TensorRT engines, one per GPU architecture and precision listed in the spec.

Written against TensorRT's documented Python API (``tensorrt.Builder``, ``OnnxParser``,
``IBuilderConfig`` with ``BuilderFlag.FP16``/``INT8``, a timing cache, and
``build_serialized_network``). TensorRT builds for the GPU it runs on, so an engine for
``sm_86`` is built only on an ``sm_86`` GPU; every other listed architecture is recorded as
skipped with the reason, and so is everything when ``tensorrt`` or a CUDA GPU is absent.
No placeholder engine is ever written. Each engine is run on the golden inputs (through
PyTorch's CUDA tensors) and gated like the ONNX variants before it is kept.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import shutil
import subprocess
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .bundle import BundleError, compare_outputs, load_tensors
from .errors import BuildError
from .onnx_stages import quality_tolerance
from .spec import Spec

Progress = Callable[[str], None]


@dataclass(frozen=True)
class Environment:
    """What this machine offers for TensorRT: the package version and the local GPU's arch."""

    tensorrt_version: str | None
    gpu_arch: str | None
    cuda_version: str | None
    reason: str | None
    """Why no engine can be built here at all (``None`` when one can)."""


def detect_environment() -> Environment:
    """Find ``tensorrt`` and the local GPU's compute capability without initialising CUDA."""
    trt_version = None
    if importlib.util.find_spec("tensorrt") is not None:
        try:
            trt_version = importlib.metadata.version("tensorrt")
        except importlib.metadata.PackageNotFoundError:
            trt_version = "unknown"
    gpu_arch = cuda_version = None
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            line = (
                subprocess.run(
                    [smi, "--query-gpu=compute_cap", "--format=csv,noheader"],
                    capture_output=True,
                    text=True,
                    timeout=20,
                    check=True,
                )
                .stdout.splitlines()[0]
                .strip()
            )
            gpu_arch = "sm_" + line.replace(".", "")
            header = subprocess.run([smi], capture_output=True, text=True, timeout=20, check=False).stdout
            marker = "CUDA Version:"
            if marker in header:
                cuda_version = header.split(marker, 1)[1].split()[0]
        except (OSError, subprocess.SubprocessError, IndexError):
            gpu_arch = None
    if trt_version is None:
        reason = "the tensorrt Python package is not installed"
    elif gpu_arch is None:
        reason = "no CUDA GPU (nvidia-smi absent or reports no GPU)"
    else:
        reason = None
    return Environment(trt_version, gpu_arch, cuda_version, reason)


def _profile_shapes(spec: Spec, max_batch: int) -> dict[str, tuple[tuple[int, ...], ...]]:
    """min/opt/max shapes of each input for the optimisation profile."""
    shapes: dict[str, tuple[tuple[int, ...], ...]] = {}
    for tensor in spec.inputs:
        lo, opt, hi = [], [], []
        for dim in tensor.shape:
            if dim == "batch":
                lo.append(1)
                opt.append(max(1, max_batch // 2))
                hi.append(max_batch)
            elif dim == "sequence":
                lo.append(1)
                opt.append(max(1, spec.tensorrt.max_sequence // 2))
                hi.append(spec.tensorrt.max_sequence)
            else:
                assert isinstance(dim, int)
                lo.append(dim)
                opt.append(dim)
                hi.append(dim)
        shapes[tensor.name] = (tuple(lo), tuple(opt), tuple(hi))
    return shapes


def build_engine(
    onnx_path: Path,
    precision: str,
    spec: Spec,
    timing_cache: Path,
    engine_path: Path,
) -> None:
    """Build and serialise one engine for the local GPU.

    Raises:
        BuildError: the ONNX parser or the builder fails.
    """
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    major = int(trt.__version__.split(".")[0])
    # TensorRT 10 has only explicit-batch networks (flag 0); 8.x must ask for them.
    flags = 0 if major >= 10 else 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise BuildError("tensorrt", f"ONNX parser rejected {onnx_path.name}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, spec.tensorrt.workspace_mb << 20)
    cache = config.create_timing_cache(timing_cache.read_bytes() if timing_cache.is_file() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    if precision == "fp16":
        config.set_flag(trt.BuilderFlag.FP16)
    elif precision == "int8":
        # The INT8 ONNX variant carries explicit Q/DQ scales, so no calibrator is needed.
        config.set_flag(trt.BuilderFlag.INT8)
        config.set_flag(trt.BuilderFlag.FP16)
    profile = builder.create_optimization_profile()
    for name, (lo, opt, hi) in _profile_shapes(spec, spec.serving.max_batch_size).items():
        profile.set_shape(name, lo, opt, hi)
    config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise BuildError("tensorrt", f"builder returned no engine for {onnx_path.name} ({precision})")
    engine_path.write_bytes(bytes(serialized))
    timing_cache.parent.mkdir(parents=True, exist_ok=True)
    timing_cache.write_bytes(bytes(config.get_timing_cache().serialize()))


def run_engine(engine_path: Path, spec: Spec, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Run a serialised engine once on ``inputs`` using PyTorch CUDA tensors as device memory.

    Raises:
        BuildError: the engine does not deserialise or PyTorch has no CUDA.
    """
    import tensorrt as trt
    import torch

    if not torch.cuda.is_available():
        raise BuildError("tensorrt", "checking an engine needs torch with CUDA; this torch has none")
    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    engine = runtime.deserialize_cuda_engine(engine_path.read_bytes())
    if engine is None:
        raise BuildError("tensorrt", f"{engine_path.name} does not deserialise")
    context = engine.create_execution_context()
    buffers: dict[str, torch.Tensor] = {}
    for tensor in spec.inputs:
        buffers[tensor.name] = torch.from_numpy(np.ascontiguousarray(inputs[tensor.name])).cuda()
        context.set_input_shape(tensor.name, tuple(buffers[tensor.name].shape))
    dtypes = {
        trt.DataType.FLOAT: torch.float32,
        trt.DataType.HALF: torch.float16,
        trt.DataType.INT64: torch.int64,
    }
    for tensor in spec.outputs:
        shape = tuple(context.get_tensor_shape(tensor.name))
        buffers[tensor.name] = torch.empty(
            shape, dtype=dtypes[engine.get_tensor_dtype(tensor.name)], device="cuda"
        )
    for name, buffer in buffers.items():
        context.set_tensor_address(name, buffer.data_ptr())
    stream = torch.cuda.Stream()
    if not context.execute_async_v3(stream.cuda_stream):
        raise BuildError("tensorrt", f"{engine_path.name}: execute_async_v3 failed")
    stream.synchronize()
    return {t.name: buffers[t.name].float().cpu().numpy() for t in spec.outputs}


def tensorrt_stage(
    spec: Spec,
    env: Environment,
    model_dir: Path,
    *,
    out: Path,
    fp32_onnx: Path,
    int8_onnx: Path | None,
    timing_cache_dir: Path,
    progress: Progress,
) -> None:
    """Build, check and record engines; write ``tensorrt.json`` with engines, skips and drops.

    Raises:
        BuildError: TensorRT fails on an architecture it should build for.
    """
    report: dict[str, Any] = {"engines": [], "skipped": [], "dropped": []}
    archs = spec.tensorrt.archs
    if not archs:
        report["skipped"].append({"stage": "tensorrt", "reason": "the spec lists no tensorrt.archs"})
    elif env.reason is not None:
        report["skipped"].append(
            {"stage": "tensorrt", "reason": f"{env.reason}; engines for {', '.join(archs)} not built"}
        )
    else:
        golden_in = load_tensors(model_dir / "golden" / "inputs.npz")
        golden_out = load_tensors(model_dir / "golden" / "outputs.npz")
        for arch in archs:
            if arch != env.gpu_arch:
                report["skipped"].append(
                    {
                        "stage": f"tensorrt:{arch}",
                        "reason": f"TensorRT builds for the local GPU ({env.gpu_arch}); no {arch} GPU here",
                    }
                )
                continue
            for precision in spec.tensorrt.precisions:
                source = int8_onnx if precision == "int8" else fp32_onnx
                name = f"trt-{arch}-{precision}"
                if source is None:
                    report["skipped"].append(
                        {"stage": f"tensorrt:{name}", "reason": "no INT8 ONNX variant to build from"}
                    )
                    continue
                progress(f"building {name} from {source.name}")
                engine = out / f"{name}.engine"
                build_engine(
                    source, precision, spec, timing_cache_dir / f"{arch}-{env.tensorrt_version}.cache", engine
                )
                got = run_engine(engine, spec, golden_in)
                # Same gate as the INT8 ONNX variant: top-1 agreement or cosine against PyTorch.
                tolerance = quality_tolerance(spec)
                try:
                    figures = compare_outputs(golden_out, got, tolerance)
                except BundleError as exc:
                    engine.unlink()
                    report["dropped"].append({"variant": name, "reason": f"failed its gate: {exc}"})
                    continue
                report["engines"].append(
                    {
                        "name": name,
                        "file": engine.name,
                        "precision": precision,
                        "gpu_arch": arch,
                        "tensorrt_version": env.tensorrt_version,
                        "cuda_version": env.cuda_version,
                        "tolerance": tolerance,
                        "metrics": figures,
                    }
                )
    for skip in report["skipped"]:
        progress(f"skipped: {skip['reason']}")
    (out / "tensorrt.json").write_text(json.dumps(report, indent=2, sort_keys=True))
