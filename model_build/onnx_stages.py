"""Stages 3–5: export to ONNX, the FP32 parity gate, INT8 quantization and its accuracy gate."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from contract.bundle import BundleError, compare_outputs, load_tensors, save_tensors
from contract.manifest import bucket_top

from .errors import BuildError
from .load import load_model
from .memory import measure_sample_bytes
from .spec import Spec
from .tensors import LABELS, take

Progress = Callable[[str], None]
FP32_FILE = "model.fp32.onnx"
INT8_FILE = "model.int8.onnx"
QUALITY_FP32 = "quality.fp32.npz"
QUALITY_INT8 = "quality.int8.npz"
EVAL_BATCH = 32  # rows a run on evaluation data (also the quality set's batch)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence the exporters' chatter (progress lines, deprecation notes) on success."""
    sink = io.StringIO()
    loggers = [
        logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._dynamo", "onnxscript", "root")
    ]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(sink):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def _set_dims(value_info: Any, shape: list[int | str]) -> None:
    """Write explicit dims (fixed sizes and axis names) into a graph input/output."""
    dims = value_info.type.tensor_type.shape.dim
    for dim, want in zip(dims, shape, strict=True):
        if isinstance(want, int):
            dim.dim_value = want
        else:
            dim.dim_param = want


def _rename_value(graph: Any, old: str, new: str) -> None:
    """Rename one value everywhere it appears in ``graph``."""
    for node in graph.node:
        node.input[:] = [new if name == old else name for name in node.input]
        node.output[:] = [new if name == old else name for name in node.output]
    for collection in (graph.input, graph.output, graph.value_info, graph.initializer):
        for item in collection:
            if item.name == old:
                item.name = new


def _rename_io(graph: Any, in_names: list[str], out_names: list[str]) -> None:
    """Give graph inputs and outputs the spec's names, moving aside any inner value that has one."""
    io_values = [v.name for v in [*graph.input, *graph.output]]
    wanted = [*in_names, *out_names]
    taken = {n for node in graph.node for n in [*node.input, *node.output]}
    taken |= {i.name for i in graph.initializer}
    for name in wanted:
        if name in taken and name not in io_values:
            _rename_value(graph, name, f"{name}__inner")
    # Rename through temporary names so that swapping two names cannot collide.
    for i, current in enumerate(io_values):
        _rename_value(graph, current, f"__io_{i}__")
    for i, name in enumerate(wanted):
        _rename_value(graph, f"__io_{i}__", name)


def export_stage(spec: Spec, model_dir: Path, out: Path, progress: Progress) -> None:
    """Export the model to a single ONNX file with named dynamic axes and a pinned opset.

    Runs the ONNX checker (full check) and strict shape inference, names every dynamic axis
    after the spec, and folds any external-data file back into the one ``.onnx`` file.

    Raises:
        BuildError: the exporter, the checker or shape inference fails, or the graph's
            inputs/outputs do not match the spec.
    """
    import onnx
    import torch

    model = load_model(model_dir)
    golden = load_tensors(model_dir / "golden" / "inputs.npz")
    args = tuple(torch.from_numpy(golden[t.name]) for t in spec.inputs)
    in_names = [t.name for t in spec.inputs]
    out_names = [t.name for t in spec.outputs]
    work = Path(tempfile.mkdtemp(prefix="export.", dir=out))
    target = work / FP32_FILE
    progress(f"torch.onnx.export ({spec.export.exporter}, opset {spec.export.opset})")
    try:
        with _quiet():
            if spec.export.exporter == "dynamo":
                dims = {name: torch.export.Dim(name) for name in ("batch", "sequence")}
                dynamic_shapes = tuple(
                    {axis: dims[d] for axis, d in enumerate(t.shape) if isinstance(d, str)}
                    for t in spec.inputs
                )
                # Names are applied afterwards (see _rename_io): the dynamo exporter can name an
                # inner value like the requested output ("embedding" from aten.embedding) and then
                # emit two producers of one name, which strict shape inference rejects.
                torch.onnx.export(
                    model,
                    args,
                    str(target),
                    opset_version=spec.export.opset,
                    dynamo=True,
                    dynamic_shapes=dynamic_shapes,
                    external_data=False,
                    optimize=True,
                    verbose=False,
                )
            else:
                dynamic_axes = {
                    t.name: {axis: d for axis, d in enumerate(t.shape) if isinstance(d, str)}
                    for t in [*spec.inputs, *spec.outputs]
                }
                torch.onnx.export(
                    model,
                    args,
                    str(target),
                    input_names=in_names,
                    output_names=out_names,
                    opset_version=spec.export.opset,
                    dynamo=False,
                    dynamic_axes=dynamic_axes,
                    do_constant_folding=True,
                )
    except Exception as exc:
        raise BuildError(
            "export", f"export.exporter={spec.export.exporter}: {type(exc).__name__}: {exc}"
        ) from exc

    proto = onnx.load(str(target))  # pulls in any external data the exporter wrote
    if len(proto.graph.input) != len(in_names) or len(proto.graph.output) != len(out_names):
        raise BuildError(
            "export",
            f"inputs/outputs: graph has {len(proto.graph.input)} inputs and "
            f"{len(proto.graph.output)} outputs, "
            f"spec lists {in_names} and {out_names}",
        )
    _rename_io(proto.graph, in_names, out_names)
    graph_in = [i.name for i in proto.graph.input]
    graph_out = [o.name for o in proto.graph.output]
    if graph_in != in_names:
        raise BuildError("export", f"inputs: graph inputs {graph_in} != spec {in_names}")
    if graph_out != out_names:
        raise BuildError("export", f"outputs: graph outputs {graph_out} != spec {out_names}")
    for value_info, tensor in zip(
        [*proto.graph.input, *proto.graph.output], [*spec.inputs, *spec.outputs], strict=True
    ):
        if len(value_info.type.tensor_type.shape.dim) != len(tensor.shape):
            raise BuildError(
                "export", f"{tensor.name}: graph rank differs from the spec shape {tensor.shape}"
            )
        _set_dims(value_info, tensor.shape)
    opsets = {o.domain: o.version for o in proto.opset_import}
    if opsets.get("", opsets.get("ai.onnx")) != spec.export.opset:
        raise BuildError(
            "export", f"export.opset: graph has opset {opsets} but the spec pins {spec.export.opset}"
        )
    try:
        proto = onnx.shape_inference.infer_shapes(proto, check_type=True, strict_mode=True, data_prop=True)
        onnx.save_model(proto, str(out / FP32_FILE), save_as_external_data=False)
        onnx.checker.check_model(str(out / FP32_FILE), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise BuildError("export", f"onnx checker / shape inference: {exc}") from exc
    shutil.rmtree(work)
    stray = sorted(p.name for p in out.iterdir() if p.name != FP32_FILE)
    if stray:
        raise BuildError("export", f"stray files next to the model: {stray}")
    progress(f"{FP32_FILE}: {(out / FP32_FILE).stat().st_size:,} bytes, opset {spec.export.opset}")


def session(path: Path, threads: int = 0) -> Any:
    """An ONNX Runtime CPU session with warnings silenced."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def run_onnx(sess: Any, spec: Spec, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Run a session on ``inputs`` in chunks; return outputs by name."""
    names = [t.name for t in spec.inputs]
    count = len(inputs[names[0]])
    chunks = []
    for start in range(0, count, EVAL_BATCH):
        part = take({n: inputs[n] for n in names}, start, start + EVAL_BATCH)
        outs = sess.run(None, part)
        chunks.append({o.name: v for o, v in zip(sess.get_outputs(), outs, strict=True)})
    return {name: np.concatenate([c[name] for c in chunks]) for name in chunks[0]}


def quality_tolerance(spec: Spec) -> dict[str, Any]:
    """The INT8 gate as a bundle tolerance: top-1 for classifiers, cosine for embeddings."""
    if spec.task == "classification":
        return {"kind": "top1", "min_agreement": spec.quantize.min_agreement}
    return {"kind": "cosine", "min_cosine": spec.quantize.min_cosine}


def _quality_figures(
    spec: Spec, ref: Mapping[str, np.ndarray], got: Mapping[str, np.ndarray]
) -> dict[str, float]:
    """Agreement or cosine without gating (for FP32's own metrics)."""
    return compare_outputs(ref, got, {**quality_tolerance(spec), "min_agreement": 0.0, "min_cosine": -1.0})


def parity_stage(spec: Spec, model_dir: Path, export_dir: Path, out: Path, progress: Progress) -> None:
    """Gate: ONNX Runtime FP32 against the PyTorch golden and evaluation outputs.

    Raises:
        BuildError: wrapping :class:`ShapeMismatch` or :class:`ToleranceExceeded`, with the max difference.
    """
    sess = session(export_dir / FP32_FILE)
    tolerance = {"kind": "allclose", "atol": spec.parity.atol, "rtol": spec.parity.rtol}
    figures: dict[str, Any] = {}
    for split in ("golden", "eval"):
        inputs = load_tensors(model_dir / split / "inputs.npz")
        reference = load_tensors(model_dir / split / "outputs.npz")
        got = run_onnx(sess, spec, inputs)
        try:
            measured = compare_outputs(reference, got, tolerance)
        except BundleError as exc:
            raise BuildError(
                "parity", f"parity.atol={spec.parity.atol} rtol={spec.parity.rtol} on {split} set: {exc}"
            ) from exc
        figures[split] = measured
        if split == "eval":
            figures["quality"] = _quality_figures(spec, reference, got)
            # The on-device quality gate's reference: FP32 ONNX Runtime outputs on the evaluation set,
            # computed here, natively (FP32 is the same on every CPU class; INT8 is not).
            save_tensors(out / QUALITY_FP32, got)
    progress(
        f"FP32 ONNX vs PyTorch: max abs diff {figures['golden']['max_abs_diff']:.2e} (golden), "
        f"{figures['eval']['max_abs_diff']:.2e} (eval)"
    )
    if spec.serving.buckets is not None:
        figures["buckets"] = bucket_parity(
            sess, spec, load_tensors(model_dir / "eval" / "inputs.npz"), tolerance
        )
        progress(
            f"padding to length buckets {spec.serving.buckets.lengths}: max abs diff "
            f"{figures['buckets']['max_abs_diff']:.2e} against each sample alone "
            f"({figures['buckets']['samples']} samples, lengths {figures['buckets']['lengths_seen']})"
        )
    figures["memory"] = measure_sample_bytes(export_dir / FP32_FILE, spec)
    progress(
        f"FP32 runs at the axis maxima {figures['memory']['axes'] or '(fixed shape)'}: "
        f"{figures['memory']['max_sample_bytes'] / 2**20:.1f} MiB per sample at most"
    )
    (out / "parity.json").write_text(
        json.dumps({"tolerance": tolerance, **figures}, indent=2, sort_keys=True)
    )


def bucket_parity(
    sess: Any, spec: Spec, inputs: Mapping[str, np.ndarray], tolerance: Mapping[str, Any]
) -> dict[str, Any]:
    """Gate: padding to a length bucket is invisible in the outputs.

    Each evaluation sample runs alone at its own length (its padding cut off), then again in batches
    of the samples that share its bucket, every one padded to the bucket's top (the most padding the
    server ever adds). The batched outputs must match the lone ones within ``tolerance``.

    Raises:
        BuildError: naming ``serving.buckets`` and the largest difference.
    """
    buckets = spec.serving.buckets
    assert buckets is not None
    names = [t.name for t in spec.inputs]
    axes = {t.name: list(t.shape).index(buckets.axis) for t in spec.inputs if buckets.axis in t.shape[1:]}
    count = min(buckets.samples, len(inputs[names[0]]))

    def length(i: int) -> int:
        """The sample's length: up to its last position where an input differs from its padding."""
        last = 0
        for name, axis in axes.items():
            row = np.moveaxis(inputs[name][i], axis - 1, 0).reshape(inputs[name].shape[axis], -1)
            real = np.flatnonzero(np.any(row != buckets.pad_values[name], axis=1))
            last = max(last, int(real[-1]) + 1 if real.size else 1)
        return last

    def sample(i: int, size: int) -> dict[str, np.ndarray]:
        """Sample ``i`` cut or padded to ``size`` along the bucketed axis."""
        out = {}
        for name in names:
            value = inputs[name][i : i + 1]
            axis = axes.get(name)
            if axis is not None:
                value = np.take(value, range(min(size, value.shape[axis])), axis=axis)
                widths = [(0, 0)] * value.ndim
                widths[axis] = (0, size - value.shape[axis])
                value = np.pad(value, widths, constant_values=buckets.pad_values[name])
            out[name] = value
        return out

    lengths = [length(i) for i in range(count)]
    alone = [dict(zip([o.name for o in sess.get_outputs()], sess.run(None, sample(i, n)), strict=True))
             for i, n in enumerate(lengths)]  # fmt: skip
    groups: dict[int, list[int]] = {}
    for i, n in enumerate(lengths):
        groups.setdefault(bucket_top(buckets.lengths, n), []).append(i)
    order: list[int] = []
    batched: list[dict[str, np.ndarray]] = []
    for top, members in sorted(groups.items()):
        for start in range(0, len(members), spec.serving.max_batch_size):
            group = members[start : start + spec.serving.max_batch_size]
            parts = [sample(i, top) for i in group]
            feed = {name: np.concatenate([p[name] for p in parts]) for name in names}
            batched.append(dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feed), strict=True)))
            order.extend(group)
    reference = {name: np.concatenate([alone[i][name] for i in order]) for name in alone[0]}
    got = {name: np.concatenate([b[name] for b in batched]) for name in batched[0]}
    try:
        measured = compare_outputs(reference, got, tolerance)
    except BundleError as exc:
        raise BuildError(
            "parity",
            f"serving.buckets: padding to the buckets {buckets.lengths} changes the outputs beyond "
            f"parity.atol={spec.parity.atol} rtol={spec.parity.rtol}: {exc}; the padding values "
            f"{buckets.pad_values} are not masked out by the model",
        ) from exc
    return {
        "samples": count,
        "max_abs_diff": float(measured["max_abs_diff"]),
        "lengths_seen": [min(lengths), max(lengths)],
        "buckets_seen": sorted(groups),
    }


class _Reader:
    """ONNX Runtime calibration reader over in-memory batches."""

    def __init__(self, inputs: Mapping[str, np.ndarray], batch_size: int) -> None:
        count = len(next(iter(inputs.values())))
        self._batches = iter([take(inputs, s, s + batch_size) for s in range(0, count, batch_size)])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._batches, None)

    def __len__(self) -> int:  # quantize_static asks for it only with strided calibration
        return 0


def calibration_inputs(
    spec: Spec, draw: Callable[[int, int], dict[str, np.ndarray]]
) -> dict[str, np.ndarray]:
    """Calibration samples from ``calibration.file`` or the data factory.

    Raises:
        BuildError: the file is missing or lacks an input.
    """
    names = [t.name for t in spec.inputs]
    cfg = spec.calibration
    if cfg.file is not None:
        path = spec.resolve(cfg.file)
        if not path.is_file():
            raise BuildError("quantize", f"calibration.file: {path} does not exist")
        arrays = load_tensors(path)
        missing = [n for n in names if n not in arrays]
        if missing:
            raise BuildError("quantize", f"calibration.file: {path} lacks inputs {missing}")
        return {n: arrays[n][: cfg.samples] for n in names}
    drawn = draw(cfg.samples, cfg.seed)
    return {n: drawn[n] for n in names}


def _preprocess(source: Path, target: Path, progress: Progress) -> None:
    """ONNX Runtime's quantization pre-processing: shape inference and graph optimisation."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    progress("pre-processing (shape inference, graph optimisation)")
    source, target = source.resolve(), target.resolve()
    # On failure, ONNX Runtime's symbolic shape inference dumps its model (≈ the model's size) into
    # the working directory; run it in a scratch folder that is removed afterwards.
    scratch = Path(tempfile.mkdtemp(prefix="preprocess.", dir=target.parent))
    try:
        with contextlib.chdir(scratch):
            try:
                with _quiet():
                    quant_pre_process(str(source), str(target), skip_symbolic_shape=False)
            except Exception as exc:
                # It does not know every op the dynamo exporter emits; the exported graph already
                # carries ONNX shape inference, so go on without it.
                progress(f"symbolic shape inference failed ({type(exc).__name__}: {exc}); using ONNX's")
                try:
                    with _quiet():
                        quant_pre_process(str(source), str(target), skip_symbolic_shape=True)
                except Exception as exc2:
                    message = f"quant_pre_process: {type(exc2).__name__}: {exc2}"
                    raise BuildError("quantize", message) from exc2
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _quantize_static(
    spec: Spec,
    pre: Path,
    target: Path,
    *,
    calibration_cache: Path,
    draw: Callable[[int, int], dict[str, np.ndarray]],
    progress: Progress,
) -> bool:
    """Static QDQ quantization; calibration ranges come from (and go to) ``calibration_cache``.

    Returns:
        Whether the calibration ranges were reused from the cache.
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    cfg = spec.quantize
    qtypes = {"quint8": QuantType.QUInt8, "qint8": QuantType.QInt8}
    methods = {
        "minmax": CalibrationMethod.MinMax,
        "entropy": CalibrationMethod.Entropy,
        "percentile": CalibrationMethod.Percentile,
    }
    cached = calibration_cache.is_file()
    progress("static QDQ, per-channel" if cfg.per_channel else "static QDQ, per-tensor")
    progress(
        "calibration: reusing cached ranges"
        if cached
        else f"calibrating on {spec.calibration.samples} samples ({spec.calibration.method})"
    )
    reader = None if cached else _Reader(calibration_inputs(spec, draw), spec.calibration.batch_size)
    # quantize_static reads the ranges from this file when it exists and writes them otherwise;
    # it works on a private copy so the shared cache file only ever appears complete.
    work_cache = target.parent / "calibration.json"
    if cached:
        shutil.copyfile(calibration_cache, work_cache)
    with _quiet():
        quantize_static(
            str(pre),
            str(target),
            reader,
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=list(cfg.op_types) or None,
            per_channel=cfg.per_channel,
            reduce_range=cfg.reduce_range,
            activation_type=qtypes[cfg.activation_type],
            weight_type=qtypes[cfg.weight_type],
            calibrate_method=methods[spec.calibration.method],
            calibration_cache_path=str(work_cache),
        )
    if not cached:
        calibration_cache.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(work_cache, calibration_cache.with_suffix(".tmp"))
        calibration_cache.with_suffix(".tmp").replace(calibration_cache)
    work_cache.unlink()
    return cached


def _quantize_dynamic(spec: Spec, pre: Path, target: Path, progress: Progress) -> None:
    """Dynamic quantization (weights INT8 offline, activations at run time)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    cfg = spec.quantize
    progress("dynamic, per-channel" if cfg.per_channel else "dynamic, per-tensor")
    with _quiet():
        quantize_dynamic(
            str(pre),
            str(target),
            op_types_to_quantize=list(cfg.op_types) or None,
            per_channel=cfg.per_channel,
            reduce_range=cfg.reduce_range,
            weight_type={"quint8": QuantType.QUInt8, "qint8": QuantType.QInt8}[cfg.weight_type],
        )


def _judge(
    spec: Spec, reference: Mapping[str, np.ndarray], got: Mapping[str, np.ndarray], labels: np.ndarray | None
) -> dict[str, Any]:
    """One CPU class's verdict on one split: passed or failed, with the figures either way."""
    tolerance = quality_tolerance(spec)
    result: dict[str, Any] = {"status": "passed"}
    try:
        result.update(compare_outputs(reference, got, tolerance))
    except BundleError as exc:
        result.update(_quality_figures(spec, reference, got), status="failed", reason=str(exc))
    if labels is not None and spec.task == "classification":
        name = spec.outputs[0].name
        result["task_accuracy"] = float(np.mean(np.argmax(got[name], -1) == labels))
    return result


@dataclass
class _GateData:
    """The sets every CPU class is judged on, loaded once."""

    golden_in: dict[str, np.ndarray]
    golden_ref: dict[str, np.ndarray]
    eval_in: dict[str, np.ndarray]
    eval_ref: dict[str, np.ndarray]

    @classmethod
    def load(cls, model_dir: Path) -> _GateData:
        return cls(
            *(
                load_tensors(model_dir / split / f"{kind}.npz")
                for split in ("golden", "eval")
                for kind in ("inputs", "outputs")
            )
        )


def _class_row(row: Mapping[str, Any]) -> dict[str, Any]:
    return {"arch": row["arch"], "requires": list(row.get("requires") or [])}


def _run_class(
    spec: Spec,
    item: Any,
    target: Path,
    *,
    data: _GateData,
    native: dict[str, Any],
    limit: int,
    progress: Progress,
) -> tuple[dict[str, Any], dict[str, dict[str, np.ndarray]]]:
    """Gate one checkable CPU class (native outputs given, or run under its emulator)."""
    from . import cpu_gate

    names = [t.name for t in spec.inputs]
    total = len(data.eval_in[names[0]])
    if item.via == "native":
        got, count = native, total
    else:
        count = min(limit or total, total)
        progress(f"CPU class {item.cpu_class}: {count} samples under {' '.join(item.emulator)}")
        started = time.perf_counter()
        gold, ev = cpu_gate.run_emulated(
            item.emulator, target, [{n: data.golden_in[n] for n in names}, take(data.eval_in, 0, count)]
        )
        got = {"golden": gold, "eval": ev}
        progress(f"CPU class {item.cpu_class}: emulated run took {time.perf_counter() - started:.1f}s")
    labels = data.eval_in.get(LABELS)
    golden = _judge(spec, data.golden_ref, got["golden"], None)
    result = _judge(
        spec, take(data.eval_ref, 0, count), got["eval"], labels[:count] if labels is not None else None
    )
    result["golden"] = {k: v for k, v in golden.items() if k not in ("status", "reason")}
    if golden["status"] == "failed" and result["status"] == "passed":
        result.update(status="failed", reason=f"golden set: {golden['reason']}")
    result.update(via="native" if item.via == "native" else " ".join(item.emulator), samples=count)
    return result, got


def _gate(
    spec: Spec, model_dir: Path, target: Path, progress: Progress
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The INT8 accuracy gate on every CPU class the variant claims: native, emulated or unverified.

    Native runs first: its outputs are the reference the emulated classes are compared with (and, when
    it passes, what devices check themselves against). An emulated class runs on
    ``quantize.emulated_samples`` of the evaluation set, or all of it when native did not pass.

    Returns:
        The report (per-class results, the validated classes, the reference figures) and the INT8
        outputs on the evaluation set of the class they were taken from (native when it passed).

    Raises:
        BuildError: a class fails and ``quantize.on_gate_failure`` is ``fail``.
    """
    from . import cpu_gate

    table = cpu_gate.load_table()
    rows = table.get("cpu_classes") or {}
    data = _GateData.load(model_dir)
    sess = session(target)
    native = {"golden": run_onnx(sess, spec, data.golden_in), "eval": run_onnx(sess, spec, data.eval_in)}
    classes: dict[str, Any] = {}
    outputs: dict[str, dict[str, np.ndarray]] = {}
    native_passed = False
    for item in sorted(cpu_gate.plan(spec, table), key=lambda p: p.via != "native"):
        if item.via == "unverified":
            classes[item.cpu_class] = {
                "status": "unverified",
                "via": "none",
                "reason": item.reason,
                **_class_row(rows[item.cpu_class]),
            }
            continue
        limit = spec.quantize.emulated_samples if native_passed else 0
        result, got = _run_class(spec, item, target, data=data, native=native, limit=limit, progress=progress)
        result.update(_class_row(rows[item.cpu_class]))
        if item.via != "native" and "eval" in outputs:
            count = result["samples"]
            result["max_abs_diff_to_native"] = float(
                max(np.max(np.abs(got["eval"][k] - outputs["eval"][k][:count])) for k in got["eval"])
            )
        classes[item.cpu_class] = result
        if result["status"] == "passed" and "eval" not in outputs:
            outputs, native_passed = got, item.via == "native"
        shown = "".join(
            f", {k} {result[k]:.4f}" for k in ("agreement", "min_cosine", "task_accuracy") if k in result
        )
        progress(f"CPU class {item.cpu_class} ({result['via']}): {result['status']}{shown}")
    return _report(spec, table, classes), outputs.get("eval", {})


def _report(spec: Spec, table: Mapping[str, Any], classes: dict[str, Any]) -> dict[str, Any]:
    """The quantize stage's verdict over all classes; raises when one failed and the spec says ``fail``."""
    from . import cpu_gate

    failed = {c: r for c, r in classes.items() if r["status"] == "failed"}
    if failed and spec.quantize.on_gate_failure == "fail":
        cls, res = next(iter(failed.items()))
        gate_key = "min_agreement" if spec.task == "classification" else "min_cosine"
        raise BuildError(
            "quantize", f"quantize.{gate_key} on eval set, CPU class {cls} ({res['via']}): {res['reason']}"
        )
    validated = [c for c, r in classes.items() if r["status"] == "passed"]
    report: dict[str, Any] = {
        "tolerance": quality_tolerance(spec),
        "host_cpu_class": cpu_gate.host_cpu_class(table),
        "classes": classes,
        "validated": validated,
        "passed": bool(validated),
    }
    if not validated:
        report["reason"] = "no CPU class passed the gate: " + "; ".join(
            f"{c} {r['status']} ({r.get('reason', '')})" for c, r in classes.items()
        )
        return report
    reference = classes[validated[0]]
    report["eval"] = {k: v for k, v in reference.items() if isinstance(v, float) and k != "task_accuracy"}
    report["golden"] = reference.get("golden", report["eval"])
    if "task_accuracy" in reference:
        report["task_accuracy"] = reference["task_accuracy"]
    diffs = [r.get("max_abs_diff_to_native", 0.0) for c, r in classes.items() if c in validated]
    report["cross_class_max_abs_diff"] = max(diffs, default=0.0)
    return report


def quantize_stage(
    spec: Spec,
    model_dir: Path,
    export_dir: Path,
    out: Path,
    *,
    calibration_cache: Path,
    draw: Callable[[int, int], dict[str, np.ndarray]],
    progress: Progress,
) -> None:
    """Quantize to INT8 with ONNX Runtime, then gate on accuracy against the PyTorch reference.

    Pre-processes (shape inference, graph optimisation), then quantizes: static QDQ with a
    calibration reader whose result is cached at ``calibration_cache``, or dynamic.
    Writes ``model.int8.onnx`` and ``quantize.json`` (gate figures, pass/fail).

    Raises:
        BuildError: quantization fails, or the gate fails and ``quantize.on_gate_failure`` is ``fail``.
    """
    pre = out / "pre.onnx"
    target = out / INT8_FILE
    _preprocess(export_dir / FP32_FILE, pre, progress)
    calib_cached = False
    try:
        if spec.quantize.mode == "static":
            calib_cached = _quantize_static(
                spec, pre, target, calibration_cache=calibration_cache, draw=draw, progress=progress
            )
        else:
            _quantize_dynamic(spec, pre, target, progress)
    except BuildError:
        raise
    except Exception as exc:
        raise BuildError(
            "quantize", f"quantize.mode={spec.quantize.mode}: {type(exc).__name__}: {exc}"
        ) from exc
    pre.unlink()
    report, outputs = _gate(spec, model_dir, target, progress)
    report["calibration_cached"] = calib_cached
    if outputs:
        save_tensors(out / QUALITY_INT8, outputs)
    progress(
        f"{INT8_FILE}: {target.stat().st_size:,} bytes; validated on "
        + (", ".join(report["validated"]) or "NO CPU class")
        + "".join(f"; {c} {r['status']}" for c, r in report["classes"].items() if r["status"] != "passed")
    )
    (out / "quantize.json").write_text(json.dumps(report, indent=2, sort_keys=True))
