"""Load a verified bundle into an ONNX Runtime session and prove it on the golden data.

Order matters and is the point of this module: verify the bundle (signature and
every checksum), choose the variant for this device, open the session, run the
golden inputs and compare with the golden outputs under the variant's tolerance.
Only a model that passed all of that is handed to the HTTP layer.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import re
import shutil
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from contract.bundle import (
    BundleError,
    VerifiedBundle,
    compare_outputs,
    iter_quality_inputs,
    load_public_key,
    quality_gate,
    verify_bundle,
)
from contract.manifest import Manifest, Variant
from serving import device
from serving.protocol import BATCH_AXIS, InferRequest, ModelSpec, Padding, tensor_spec

log = logging.getLogger("serving.model")


class ModelLoadError(Exception):
    """The bundle cannot be served: untrusted, malformed, unrunnable or failing its golden check."""


class ModelRunError(Exception):
    """ONNX Runtime refused the inputs of one run (e.g. an index out of range)."""


@dataclass
class LoadedModel:
    """A verified bundle with an open session that has passed its golden check."""

    bundle: VerifiedBundle
    spec: ModelSpec
    variant: Variant
    device_class: str
    providers: tuple[str, ...]
    session: ort.InferenceSession
    load_seconds: float
    warmup_figures: dict[str, float] = field(default_factory=dict)
    batchable: bool = True
    cpu_class: str | None = None
    cpu_note: str = ""
    """Why an INT8 variant was set aside (or forced) on this CPU class; empty when nothing was."""
    quality_figures: dict[str, float] = field(default_factory=dict)
    """The on-device quality gate's figures (empty when the variant has no quality entry)."""

    def memory_cost(self, request: InferRequest) -> int:
        """A request's run-time memory in bytes, scaled from the build's measure of the largest sample.

        Linear in the request's elements: for a model whose memory grows faster than its input (attention),
        that over-estimates a shorter request, the safe side. 0 when the bundle records no measure.
        """
        per_sample = self.bundle.manifest.serving.max_sample_bytes or 0
        # At the top of its bucket: a batch may pad it that far.
        return -(-request.batched_elements() * per_sample // max(1, self.spec.sample_elements()))

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the model once (blocking; call it off the event loop).

        Raises:
            ModelRunError: ONNX Runtime rejected the input values.
        """
        names = [t.name for t in self.spec.outputs]
        try:
            values = self.session.run(names, dict(inputs))
        except (
            ort.capi.onnxruntime_pybind11_state.InvalidArgument,
            ort.capi.onnxruntime_pybind11_state.InvalidGraph,
            # A kernel refusing the values it was given (an index out of range, shapes that do not
            # broadcast); a real fault (out of memory) is a RuntimeException and stays a 500.
            ort.capi.onnxruntime_pybind11_state.Fail,
        ) as exc:
            raise ModelRunError(runtime_message(str(exc))) from exc
        return {n: np.asarray(v) for n, v in zip(names, values, strict=True)}


_ORT_PREFIX = re.compile(r"^\[ONNXRuntimeError\] : \d+ : \w+ : ")
_ORT_SOURCE = re.compile(r"\S*onnxruntime_src/\S+:\d+ .*?\)\s+")


def runtime_message(text: str) -> str:
    """ONNX Runtime's error for a client: its first line, without the code prefix, source path or C++ name."""
    first = text.strip().splitlines()[0] if text.strip() else "no message"
    return _ORT_SOURCE.sub("", _ORT_PREFIX.sub("", first))[:400]


def model_spec(
    manifest: Manifest,
    max_batch_size: int,
    axis_max: Mapping[str, int] | None = None,
    max_request_elements: int | None = None,
) -> ModelSpec:
    """The protocol view of a manifest, with the bounds every request is checked against.

    Args:
        manifest: the verified manifest.
        max_batch_size: the most rows one request (and one run) may hold.
        axis_max: the operator's bounds (``--axis-max``): each may lower the manifest's, never raise it,
            and they supply the bounds that a bundle built before schema 3 does not record.
        max_request_elements: the per-request element budget; default the largest legal request.

    Raises:
        ModelLoadError: the manifest's inputs or outputs are malformed, an axis has no bound, or an
            operator bound is above the manifest's.
    """
    try:
        inputs = tuple(tensor_spec(e, "inputs") for e in manifest.inputs)
        outputs = tuple(tensor_spec(e, "outputs") for e in manifest.outputs)
    except ValueError as exc:
        raise ModelLoadError(str(exc)) from exc
    if not inputs or not outputs:
        raise ModelLoadError("manifest: 'inputs' and 'outputs' must list the model's tensors")
    bounds = dict(manifest.axes)
    for axis, size in (axis_max or {}).items():
        if size < 1:
            raise ModelLoadError(f"--axis-max {axis}={size}: must be at least 1")
        if axis in bounds and size > bounds[axis]:
            raise ModelLoadError(
                f"--axis-max {axis}={size} is above the bundle's axes.{axis}={bounds[axis]}, the largest "
                "size the build proved the model runs at"
            )
        bounds[axis] = size
    unbounded = [a for a in manifest.unbounded_axes() if a not in bounds]
    if unbounded:
        raise ModelLoadError(
            f"the bundle (schema {manifest.schema_version}) records no maximum for the input axis "
            f"{', '.join(unbounded)}, so one request could make ONNX Runtime allocate without limit: rebuild "
            f"it with the current prebuild, or pass --axis-max {unbounded[0]}=N"
        )
    buckets = manifest.serving.buckets
    spec = ModelSpec(
        name=manifest.model,
        version=manifest.version,
        inputs=inputs,
        outputs=outputs,
        max_batch_size=max_batch_size,
        axis_max=bounds,
        padding=Padding.from_manifest(buckets, inputs) if buckets is not None else None,
    )
    largest = max_batch_size * spec.sample_elements()
    if max_request_elements is not None and max_request_elements < 1:
        raise ModelLoadError(f"--max-request-elements must be at least 1, got {max_request_elements}")
    return dataclasses.replace(spec, max_request_elements=min(max_request_elements or largest, largest))


def session_options(intra_op_threads: int) -> ort.SessionOptions:
    """Session options for serving: full graph optimisation, thread count, no spinning.

    Spinning intra-op threads would burn the cores that the HTTP event loop needs
    between runs, so they sleep when idle.
    """
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if intra_op_threads > 0:
        options.intra_op_num_threads = intra_op_threads
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    # Run errors are raised to the caller and logged there, with the request id; ORT's own
    # copy on stderr would be a second, unstructured line.
    options.log_severity_level = 4
    return options


def verify(bundle_dir: Path, public_key_path: Path) -> VerifiedBundle:
    """Verify a bundle with the shared contract code.

    Raises:
        ModelLoadError: naming the key or the bundle file that failed.
    """
    try:
        return verify_bundle(bundle_dir, load_public_key(public_key_path))
    except BundleError as exc:
        raise ModelLoadError(f"bundle {bundle_dir} refused: {exc}") from exc


def load(
    bundle_dir: Path,
    public_key_path: Path,
    *,
    variant: str = "auto",
    device_class: str = "auto",
    device_table: Path = device.DEFAULT_TABLE,
    max_batch_size: int | None = None,
    intra_op_threads: int = 0,
    trt_cache_dir: Path | None = None,
    axis_max: Mapping[str, int] | None = None,
    max_request_elements: int | None = None,
) -> LoadedModel:
    """Verify, choose, open and warm up a bundle.

    Args:
        bundle_dir: the bundle folder (``dist/<model>/<version>`` or the ``latest`` link).
        public_key_path: the trusted signer's PEM public key.
        variant: ``"auto"`` or a variant name from the manifest.
        device_class: ``"auto"`` to detect, or a class name from the table.
        device_table: the device-class table.
        max_batch_size: overrides the manifest's ``serving.max_batch_size``.
        intra_op_threads: ONNX Runtime intra-op threads (0: its default).
        trt_cache_dir: a writable folder where the TensorRT EP caches the engines it builds from
            an ONNX variant (Jetson, or a GPU without a matching prebuilt engine); None: no cache.
        axis_max: lower bounds for named axes than the manifest's ``axes`` (or, for a bundle built
            before schema 3, the bounds it lacks).
        max_request_elements: the per-request element budget (default: the largest legal request).

    Returns:
        The loaded model, ready to serve.

    Raises:
        ModelLoadError: anything that makes the bundle unservable, with the reason.
    """
    started = time.perf_counter()
    verified = verify(bundle_dir, public_key_path)
    manifest = verified.manifest
    log.info(
        "bundle %s verified as %s (model %s version %s, key %s)",
        bundle_dir,
        verified.path,
        manifest.model,
        manifest.version,
        verified.key_id,
    )

    try:
        table, cpu_classes = device.load_tables(device_table)
        facts = device.gather_facts(table, cpu_classes)
        if device_class == "auto":
            dclass = device.detect_class(table, facts)
        elif device_class in table:
            dclass = table[device_class]
        else:
            raise device.DeviceError(f"--device-class {device_class!r} is not one of {', '.join(table)}")
    except device.DeviceError as exc:
        raise ModelLoadError(str(exc)) from exc
    if dclass.name in ("nvidia_gpu", "jetson"):
        log.info(
            "GPU facts: compute capability %s, TensorRT %s",
            facts.gpu_arch or "unknown",
            facts.tensorrt_version or "unknown",
        )

    batch = int(max_batch_size or manifest.serving.max_batch_size)
    if batch < 1:
        raise ModelLoadError(f"max_batch_size must be at least 1, got {batch}")
    spec = model_spec(manifest, batch, axis_max, max_request_elements)
    batchable = all(t.shape[:1] == (BATCH_AXIS,) for t in (*spec.inputs, *spec.outputs))

    # A TensorRT variant chosen automatically that fails to open or to reproduce the golden
    # outputs is set aside (with the reason) and the choice is made again, so a GPU node still
    # serves its onnx variant. An explicitly requested variant that fails is a failure.
    failed: dict[str, str] = {}
    while True:
        try:
            choice = device.choose_variant(
                manifest.variants,
                dclass,
                ort.get_available_providers(),
                facts,
                variant,
                exclude=failed,
            )
        except device.DeviceError as exc:
            raise ModelLoadError(str(exc)) from exc
        chosen = choice.variant
        for refusal in choice.refused:
            log.warning("TensorRT variant not used: %s", refusal)
        cpu_note = _log_cpu_choice(choice, facts, requested=variant != "auto")
        log.info(
            "device class %s; variant %s (%s); providers %s",
            dclass.name,
            chosen.name,
            choice.reason,
            ", ".join(choice.providers),
        )
        try:
            session = open_session(verified, chosen, choice.providers, intra_op_threads, trt_cache_dir)
            loaded = LoadedModel(
                bundle=verified,
                spec=spec,
                variant=chosen,
                device_class=dclass.name,
                providers=tuple(session.get_providers()),
                session=session,
                load_seconds=0.0,
                batchable=batchable,
                cpu_class=facts.cpu_class,
                cpu_note=cpu_note,
            )
            loaded.warmup_figures = warm_up(loaded)
            loaded.quality_figures = quality_check(loaded)
            loaded.spec = dataclasses.replace(
                loaded.spec, parameters=choice_parameters(loaded, choice.reason)
            )
        except ModelLoadError as exc:
            if variant != "auto" or chosen.format != "tensorrt":
                raise
            log.warning("falling back from %s: %s", chosen.name, exc)
            failed[chosen.name] = f"failed here at start-up ({exc})"
            continue
        loaded.load_seconds = time.perf_counter() - started
        return loaded


def _log_cpu_choice(choice: device.VariantChoice, facts: device.DeviceFacts, *, requested: bool) -> str:
    """Log, in one line, an INT8 variant set aside (or forced) on this CPU class; return that reason."""
    note = "; ".join(choice.cpu_refused)
    if note and not requested:
        log.warning(
            "CPU class %s: serving %s instead of INT8, because %s",
            facts.cpu_class or "unknown",
            choice.variant.name,
            note,
        )
    elif note:
        log.warning("serving the requested INT8 variant on an unvalidated CPU: %s", note)
    return note


def choice_parameters(model: LoadedModel, reason: str) -> dict[str, str]:
    """What the server chose for this machine, for model metadata ``parameters`` (strings only)."""
    params = {
        "variant": model.variant.name,
        "precision": model.variant.precision,
        "device_class": model.device_class,
        "cpu_class": model.cpu_class or "unknown",
        "variant_reason": reason,
    }
    if model.cpu_note:
        params["int8_not_validated_here"] = model.cpu_note
    if model.quality_figures:
        params["quality_gate"] = ", ".join(f"{k}={v:.4g}" for k, v in sorted(model.quality_figures.items()))
    return params


def execution_providers(
    variant: Variant,
    providers: Sequence[str],
    model_path: Path,
    trt_cache_dir: Path | None = None,
) -> list[str | tuple[str, dict[str, Any]]]:
    """The ``providers`` argument of ``InferenceSession`` for one variant.

    For a TensorRT variant (its file is the EP context wrapper) the TensorRT EP is told to use
    the prebuilt engine: ``trt_engine_cache_enable`` with ``trt_ep_context_file_path`` set to the
    wrapper's folder in the bundle, which is where the engine named by the wrapper lies. The
    bundle is read-only, so nothing that writes is switched on: no context-model dump, no timing
    cache, and no ``trt_engine_cache_path`` (the EP would create that folder). CUDA and CPU follow
    as the class's table lists them.

    An ONNX variant on the TensorRT EP has its engine built at start-up (the warm-up pays for it,
    not a request). With ``trt_cache_dir`` (the edge role puts it beside the release, so a restart
    or a rollback reuses it) the EP caches that engine there; without it, the names go as they are.

    Args:
        variant: the manifest entry.
        providers: the class's providers available here, in order.
        model_path: the variant's file in the verified bundle.
        trt_cache_dir: the writable engine cache folder for ONNX variants, or None.
    """
    trt_options: dict[str, Any] | None
    if variant.format == "tensorrt":
        trt_options = {
            "trt_engine_cache_enable": True,
            "trt_ep_context_file_path": str(model_path.parent),
            "trt_dump_ep_context_model": False,
            "trt_timing_cache_enable": False,
        }
    elif trt_cache_dir is not None:
        trt_options = {
            "trt_engine_cache_enable": True,
            "trt_engine_cache_path": str(trt_cache_dir),
            "trt_timing_cache_enable": True,
            "trt_timing_cache_path": str(trt_cache_dir),
        }
    else:
        return list(providers)
    return [(p, trt_options) if p == "TensorrtExecutionProvider" else p for p in providers]


def open_session(
    verified: VerifiedBundle,
    variant: Variant,
    providers: Sequence[str],
    intra_op_threads: int,
    trt_cache_dir: Path | None = None,
) -> ort.InferenceSession:
    """Open an ONNX Runtime session on a variant's checked bytes from the verified bundle.

    Raises:
        ModelLoadError: the file (or, for TensorRT, the engine the wrapper names) is not in the
            bundle, or ONNX Runtime cannot open it.
    """
    try:
        if variant.format == "tensorrt":
            # The EP reads the wrapper and the engine it names by path: it gets a private copy of the
            # checked bytes (verification covered every listed file; the engine must be one of them).
            private = verified.copy_to(
                (variant.file, str(variant.engine)), Path(tempfile.mkdtemp(prefix="dualdeploy-trt-"))
            )
            model_path = private / variant.file
            try:
                return ort.InferenceSession(
                    str(model_path),
                    session_options(intra_op_threads),
                    providers=execution_providers(variant, providers, model_path, trt_cache_dir),
                )
            finally:  # the EP has deserialised the engine by now
                shutil.rmtree(private, ignore_errors=True)
        # ONNX Runtime gets the bytes that were hashed, never a path it would reopen later.
        return ort.InferenceSession(
            verified.read(variant.file),
            session_options(intra_op_threads),
            providers=execution_providers(variant, providers, verified.file(variant.file), trt_cache_dir),
        )
    except (
        BundleError,
        ort.capi.onnxruntime_pybind11_state.Fail,
        ort.capi.onnxruntime_pybind11_state.InvalidGraph,
        ort.capi.onnxruntime_pybind11_state.InvalidProtobuf,
        ort.capi.onnxruntime_pybind11_state.NoSuchFile,
        ort.capi.onnxruntime_pybind11_state.NotImplemented,
        ort.capi.onnxruntime_pybind11_state.EPFail,
        ort.capi.onnxruntime_pybind11_state.RuntimeException,
    ) as exc:
        raise ModelLoadError(f"variant {variant.name}: cannot open {variant.file}: {exc}") from exc


def warm_up(model: LoadedModel) -> dict[str, float]:
    """Run the golden inputs and compare with the golden outputs under the variant's tolerance.

    Also runs the first golden row alone, so the batch-1 path is warm too.

    Returns:
        The measured figures (max_abs_diff, and agreement or min_cosine).

    Raises:
        ModelLoadError: the golden files are missing or the outputs are out of tolerance.
    """
    golden = model.bundle.manifest.golden
    tolerance = model.variant.tolerance.as_dict()
    try:
        inputs = model.bundle.load_tensors(golden.inputs)
        expected = model.bundle.load_tensors(golden.outputs)
    except (KeyError, BundleError, OSError, ValueError) as exc:
        raise ModelLoadError(f"golden data unusable: {exc}") from exc
    expected = {t.name: expected[t.name] for t in model.spec.outputs if t.name in expected}
    try:
        actual = model.run(inputs)
        figures = compare_outputs(expected, actual, tolerance)
    except (BundleError, ModelRunError) as exc:
        raise ModelLoadError(
            f"warm-up: variant {model.variant.name} does not reproduce the golden outputs: {exc}"
        ) from exc
    if model.batchable:
        model.run({k: v[:1] for k, v in inputs.items()})
    log.info(
        "warm-up matched the golden outputs (%s)",
        ", ".join(f"{k}={v:.3g}" for k, v in sorted(figures.items())),
    )
    return figures


def quality_check(model: LoadedModel) -> dict[str, float]:
    """The on-device quality gate: the manifest's quality set on this machine's real kernels.

    Runs every sample of the quality set through the chosen variant and checks, with
    :func:`contract.bundle.quality_gate`, that the outputs are within the build-derived tolerance of
    what the build computed for this variant, and within the variant's tolerance of the FP32 reference.
    Variants without a quality entry (TensorRT engines, bundles of schema 1) keep the golden check only.

    Returns:
        The gate's figures, or an empty dict when the variant has no quality entry.

    Raises:
        ModelLoadError: the quality set is unusable or the gate fails, with the measured figures.
    """
    quality = model.bundle.manifest.quality
    entry = model.variant.quality
    if quality is None or entry is None:
        log.info(
            "variant %s has no on-device quality set; the golden check was the gate",
            model.variant.name,
        )
        return {}
    started = time.perf_counter()
    names = [t.name for t in model.spec.outputs]
    try:
        build = model.bundle.load_tensors(entry.outputs)
        reference = model.bundle.load_tensors(quality.reference)
        # Batch by batch, as the build ran them: dynamic INT8 quantizes each run's activations with one
        # scale, so the same rows must go together here to compare like with like.
        parts = [
            model.run(batch)
            for batch in iter_quality_inputs(quality, lambda rel: io.BytesIO(model.bundle.read(rel)))
        ]
        actual = {n: np.concatenate([part[n] for part in parts]) for n in names}
        count = len(actual[names[0]])
        figures = quality_gate(
            model.variant, actual, {n: build[n] for n in names}, {n: reference[n] for n in names}
        )
    except (KeyError, BundleError, ModelRunError, OSError, ValueError) as exc:
        raise ModelLoadError(
            f"on-device quality gate: variant {model.variant.name} on CPU class "
            f"{model.cpu_class or 'unknown'}: {exc}"
        ) from exc
    log.info(
        "on-device quality gate passed on %d samples in %.2f s (%s)",
        count,
        time.perf_counter() - started,
        ", ".join(f"{k}={v:.4g}" for k, v in sorted(figures.items())),
    )
    return figures
