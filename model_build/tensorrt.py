"""Stage 6: TensorRT engines, one per GPU architecture and precision listed in the spec.

Written against TensorRT's documented Python API (``tensorrt.Builder``, ``OnnxParser``,
``IBuilderConfig`` with ``BuilderFlag.FP16``/``INT8``, a timing cache, and
``build_serialized_network``). TensorRT builds for the GPU it runs on, so an engine for
``sm_86`` is built only on an ``sm_86`` GPU; every other listed architecture is recorded as
skipped with the reason, and so is everything when ``tensorrt`` or a CUDA GPU is absent.
No placeholder engine is ever written. Each engine is run on the golden inputs (through
PyTorch's CUDA tensors) and gated like the ONNX variants before it is kept.

ONNX Runtime cannot load a raw engine file, so every kept engine also gets an *EP context
wrapper* (:func:`write_engine_wrapper`): a small ONNX model whose single ``com.microsoft``
``EPContext`` node points at the engine file (``embed_mode=0``), with the graph inputs and
outputs of the ONNX model the engine was built from. ONNX Runtime's TensorRT execution
provider deserialises the engine named by that node instead of building one at start-up
(onnxruntime docs "EP Context Design"; the reference builder is onnxruntime's
``python/tools/tensorrt/gen_trt_engine_wrapper_onnx_model.py``).
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
import onnx
from onnx import helper

from contract.bundle import BundleError, compare_outputs, load_tensors

from .errors import BuildError
from .onnx_stages import quality_tolerance
from .spec import Spec

Progress = Callable[[str], None]

WRAPPER_FORMAT = 1
"""Layout of this stage's output (engine + EP context wrapper); part of the stage's cache key."""

EPCONTEXT_DOMAIN = "com.microsoft"
EPCONTEXT_OP = "EPContext"
TRT_EP = "TensorrtExecutionProvider"


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


def hardware_architecture(gpu_arch: str) -> str:
    """The ``hardware_architecture`` value ORT's TensorRT EP compares with the GPU: ``sm_86`` -> ``86``.

    The EP writes the compute capability as major and minor digits run together, and only warns on
    a mismatch; the server refuses a mismatch itself (``serving/device.py``).

    Raises:
        ValueError: ``gpu_arch`` is not of the form ``sm_<digits>``.
    """
    digits = gpu_arch.removeprefix("sm_")
    if not gpu_arch.startswith("sm_") or not digits.isdigit():
        raise ValueError(f"gpu_arch {gpu_arch!r} is not of the form sm_<major><minor>, e.g. sm_86")
    return digits


def write_engine_wrapper(
    source_onnx: Path,
    engine_path: Path,
    wrapper_path: Path,
    *,
    gpu_arch: str,
    tensorrt_version: str,
) -> None:
    """Write the EP context model that lets ONNX Runtime's TensorRT EP load ``engine_path``.

    One ``com.microsoft`` ``EPContext`` node with ``embed_mode=0`` and ``ep_cache_context`` set to
    the engine's path relative to the wrapper's folder (the EP refuses absolute paths and ``..``),
    ``source="TensorrtExecutionProvider"``, ``hardware_architecture`` as the EP formats compute
    capability and ``ep_sdk_version`` = the TensorRT version that built the engine. The graph's
    inputs and outputs are copied from ``source_onnx`` (names, element types, fixed and named
    dynamic dimensions), so clients and the server see the same signature as the ONNX variants.
    The engine itself is neither read nor copied.

    Args:
        source_onnx: the ONNX model the engine was built from.
        engine_path: the serialised engine; must lie in the wrapper's folder or below it.
        wrapper_path: where to write the wrapper (``.onnx``).
        gpu_arch: the engine's GPU architecture, ``sm_86``.
        tensorrt_version: the TensorRT version that built it, ``10.3.0``.

    Raises:
        ValueError: the engine is not inside the wrapper's folder, or ``gpu_arch`` is malformed.
        FileNotFoundError: the engine or the source model is missing.
    """
    if not engine_path.is_file():
        raise FileNotFoundError(f"engine {engine_path} does not exist")
    try:
        relative = engine_path.resolve().relative_to(wrapper_path.parent.resolve()).as_posix()
    except ValueError as exc:
        raise ValueError(
            f"engine {engine_path} must lie in the wrapper's folder {wrapper_path.parent} or below it: "
            "ONNX Runtime refuses ep_cache_context paths that are absolute or contain '..'"
        ) from exc
    source = onnx.load(str(source_onnx), load_external_data=False)
    initializers = {t.name for t in source.graph.initializer}
    inputs = [vi for vi in source.graph.input if vi.name not in initializers]
    node = helper.make_node(
        EPCONTEXT_OP,
        [vi.name for vi in inputs],
        [vi.name for vi in source.graph.output],
        name=f"{EPCONTEXT_OP}_{wrapper_path.stem}",
        domain=EPCONTEXT_DOMAIN,
        main_context=1,
        embed_mode=0,
        ep_cache_context=relative,
        source=TRT_EP,
        hardware_architecture=hardware_architecture(gpu_arch),
        ep_sdk_version=tensorrt_version,
        onnx_model_filename=source_onnx.name,
    )
    graph = helper.make_graph([node], f"{source.graph.name or 'model'}_trt_{gpu_arch}", inputs, [])
    graph.output.extend(source.graph.output)
    default_opset = next((o.version for o in source.opset_import if o.domain in ("", "ai.onnx")), 17)
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", default_opset), helper.make_opsetid(EPCONTEXT_DOMAIN, 1)],
        producer_name="dualdeploy.model_build",
    )
    # The wrapper is read by the same ONNX Runtime as the source model, so keep its IR version.
    model.ir_version = source.ir_version
    onnx.checker.check_model(model)
    wrapper_path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(wrapper_path))


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
                wrapper = out / f"{name}.onnx"
                write_engine_wrapper(
                    fp32_onnx,
                    engine,
                    wrapper,
                    gpu_arch=arch,
                    tensorrt_version=str(env.tensorrt_version),
                )
                report["engines"].append(
                    {
                        "name": name,
                        "file": engine.name,
                        "wrapper": wrapper.name,
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
