"""The prebuild on tiny real models: export, gates, quantization, caching, bad input, verification.

Every build here runs the real stages (torch.onnx export, ONNX checker, ONNX Runtime parity,
ONNX Runtime quantization, CPU benchmark) on models small enough to take a second or two.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import yaml

from contract import bundle
from model_build import cpu_gate
from model_build.__main__ import main
from model_build.errors import BuildError, SpecError
from model_build.memory import measure_sample_bytes
from model_build.pipeline import BuildResult, Reporter, build, device_class_names
from model_build.spec import load_spec

REPO = Path(__file__).resolve().parents[1]

# The spec factories name the fixture module "model_build_tiny" (tests/model_build_tiny.py); make it
# importable whatever rootdir/import mode pytest uses.
if str(Path(__file__).resolve().parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parent))

FIXTURES = "model_build_tiny"  # tests/model_build_tiny.py (pytest puts tests/ on sys.path)


def tiny_spec(**overrides: Any) -> dict[str, Any]:
    """A spec for the tiny classifier; ``overrides`` replace or extend top-level sections."""
    spec: dict[str, Any] = {
        "name": "tiny",
        "task": "classification",
        "model": {"factory": f"{FIXTURES}:classifier"},
        "inputs": [{"name": "image", "dtype": "float32", "shape": ["batch", 3, 16, 16]}],
        "outputs": [{"name": "logits", "dtype": "float32", "shape": ["batch", 4]}],
        "data": {"factory": f"{FIXTURES}:samples"},
        "evaluation": {"samples": 64, "seed": 2},
        "calibration": {"samples": 32, "seed": 1, "batch_size": 8},
        "quantize": {"mode": "static", "per_channel": True, "min_agreement": 0.9},
        "benchmark": {"warmup": 2, "iterations": 25, "max_slowdown": 10.0},
        "serving": {"max_batch_size": 4, "max_queue_delay_ms": 2.0},
    }
    spec.update(overrides)
    return spec


def embedder_spec(quantize: dict[str, Any]) -> dict[str, Any]:
    """A spec for the tiny embedder (cosine gate) with the given quantize section."""
    return {
        "name": "emb",
        "task": "embedding",
        "model": {"factory": f"{FIXTURES}:embedder"},
        "inputs": [{"name": "features", "dtype": "float32", "shape": ["batch", 32]}],
        "outputs": [{"name": "embedding", "dtype": "float32", "shape": ["batch", 16]}],
        "data": {"factory": f"{FIXTURES}:features"},
        "quantize": quantize,
        "benchmark": {"warmup": 1, "iterations": 25},
    }


def write_spec(folder: Path, data: dict[str, Any], name: str = "tiny.yaml") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def signer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A signing key for the tests (never the development key in the checkout)."""
    path = tmp_path_factory.mktemp("keys") / "signer.pem"
    bundle.generate_key(path)
    return path


def run_build(spec_path: Path, out: Path, key: Path, cache: Path) -> BuildResult:
    with open(os.devnull, "w") as sink:
        return build(load_spec(spec_path), out, key_path=key, cache_root=cache, report=Reporter(sink))


@pytest.fixture(scope="module")
def tiny_build(tmp_path_factory: pytest.TempPathFactory, signer: Path) -> tuple[BuildResult, Path, Path]:
    """One complete build of the tiny classifier, shared by the read-only tests."""
    root = tmp_path_factory.mktemp("tiny")
    spec_path = write_spec(root, tiny_spec())
    result = run_build(spec_path, root / "dist", signer, root / "cache")
    return result, root, spec_path


@pytest.fixture
def shared_cache(tiny_build: tuple[BuildResult, Path, Path]) -> Any:
    """Copy the shared tiny build's stage cache into a test's own folder (saves re-training)."""
    import shutil

    def copy(tmp_path: Path) -> Path:
        target = tmp_path / "cache"
        shutil.copytree(tiny_build[1] / "cache", target)
        return target

    return copy


# --------------------------------------------------------------------------- the happy path


def test_tiny_model_builds_a_bundle_that_verifies(
    tiny_build: tuple[BuildResult, Path, Path], signer: Path
) -> None:
    result, root, _ = tiny_build
    latest = root / "dist" / "tiny" / "latest"
    assert latest.is_symlink() and os.readlink(latest) == result.version
    verified = bundle.verify_bundle(latest, bundle.load_public_key(bundle.public_path(signer)))
    manifest = json.loads(verified.manifest_bytes)  # the file format itself
    assert manifest["model"] == "tiny" and manifest["version"] == result.version
    assert manifest["inputs"] == [
        {"name": "image", "dtype": "float32", "shape": ["batch", 3, 16, 16], "allow_nonfinite": False}
    ]
    serving = dict(manifest["serving"])
    assert serving.pop("max_sample_bytes") > 0  # measured by model_build.memory at the parity stage
    assert serving == {"max_batch_size": 4, "max_queue_delay_ms": 2.0}
    assert manifest["axes"] == {}
    assert set(manifest["tools"]) >= {"torch", "onnx", "onnxruntime", "python"}
    golden_in = bundle.load_tensors(latest / manifest["golden"]["inputs"])
    assert golden_in["image"].shape[0] >= 2


def test_exported_onnx_is_one_file_with_named_axes_and_pinned_opset(
    tiny_build: tuple[BuildResult, Path, Path],
) -> None:
    result, _, _ = tiny_build
    fp32 = next(v for v in result.manifest["variants"] if v["name"] == "fp32")
    path = result.bundle_dir / fp32["file"]
    onnx.checker.check_model(str(path), full_check=True)
    model = onnx.load(str(path), load_external_data=False)
    assert not any(init.data_location == onnx.TensorProto.EXTERNAL for init in model.graph.initializer)
    assert {o.domain: o.version for o in model.opset_import}[""] == 18
    dims = model.graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param or d.dim_value for d in dims] == ["batch", 3, 16, 16]
    assert fp32["device_classes"] == device_class_names()  # every class in contract/device_classes.yaml
    assert {"x86_cpu", "arm64_cpu", "nvidia_gpu", "jetson", "ascend"} <= set(fp32["device_classes"])
    assert fp32["tolerance"]["kind"] == "allclose"
    assert fp32["metrics"]["max_abs_diff"] < 1e-4


def test_onnx_runtime_reproduces_the_golden_outputs(tiny_build: tuple[BuildResult, Path, Path]) -> None:
    import onnxruntime as ort

    result, _, _ = tiny_build
    manifest = result.manifest
    golden_in = bundle.load_tensors(result.bundle_dir / manifest["golden"]["inputs"])
    golden_out = bundle.load_tensors(result.bundle_dir / manifest["golden"]["outputs"])
    for variant in manifest["variants"]:
        sess = ort.InferenceSession(
            str(result.bundle_dir / variant["file"]), providers=["CPUExecutionProvider"]
        )
        (logits,) = sess.run(None, golden_in)
        bundle.compare_outputs(golden_out, {"logits": logits}, variant["tolerance"])


def test_int8_is_static_qdq_gated_per_cpu_class_and_measured(
    tiny_build: tuple[BuildResult, Path, Path],
) -> None:
    result, _, _ = tiny_build
    manifest = result.manifest
    # tiny_spec allows INT8 up to 11x slower than FP32 (benchmark.max_slowdown 10), so it always ships.
    assert not [d for d in manifest["dropped"] if d["variant"] == "int8"], manifest["dropped"]
    (variant,) = [v for v in manifest["variants"] if v["name"] == "int8"]
    host = cpu_gate.host_cpu_class(cpu_gate.load_table())
    assert variant["cpu"]["validated"][0] == host and variant["cpu"]["results"][host]["via"] == "native"
    assert variant["quantization"]["reduce_range"] is True
    model = onnx.load(str(result.bundle_dir / variant["file"]))
    ops = {n.op_type for n in model.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    assert variant["tolerance"] == {"kind": "top1", "min_agreement": 0.9}
    assert variant["metrics"]["agreement"] >= 0.9
    assert variant["device_classes"] == ["x86_cpu", "arm64_cpu", "jetson", "ascend"]
    for key in ("latency_ms_p50", "latency_ms_p99", "throughput_b8", "size_bytes"):
        assert variant["metrics"][key] > 0
    assert variant["metrics"]["size_bytes"] < result.manifest["variants"][0]["metrics"]["size_bytes"]


def test_missing_tensorrt_is_recorded_as_skipped(tmp_path: Path, signer: Path, shared_cache: Any) -> None:
    import importlib.util

    if importlib.util.find_spec("tensorrt") is not None:
        pytest.skip("tensorrt is installed here; the skip path does not apply")
    spec = write_spec(tmp_path, tiny_spec(tensorrt={"archs": ["sm_86"], "precisions": ["fp16"]}))
    result = run_build(spec, tmp_path / "dist", signer, shared_cache(tmp_path))
    (skip,) = result.manifest["skipped"]
    assert skip["stage"] == "tensorrt" and "tensorrt" in skip["reason"] and "sm_86" in skip["reason"]
    assert not any(v["format"] == "tensorrt" for v in result.manifest["variants"])
    assert not list((tmp_path / "dist").rglob("*.engine"))


# --------------------------------------------------------------------------- gates


def test_broken_model_fails_the_parity_gate_with_the_max_difference(tmp_path: Path, signer: Path) -> None:
    spec = write_spec(
        tmp_path,
        tiny_spec(model={"factory": f"{FIXTURES}:broken_classifier"}, export={"exporter": "torchscript"}),
    )
    with pytest.raises(BuildError) as err:
        run_build(spec, tmp_path / "dist", signer, tmp_path / "cache")
    assert err.value.stage == "parity"
    assert "max abs diff" in str(err.value) and "eval set" in str(err.value)
    assert isinstance(err.value.__cause__, bundle.ToleranceExceeded)
    assert not (tmp_path / "dist" / "tiny").exists() or not any((tmp_path / "dist" / "tiny").iterdir())


def test_failed_gate_in_a_late_stage_leaves_no_bundle_and_no_partial_cache(
    tmp_path: Path, signer: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Cosine 1.0 exactly is unreachable for an INT8 model, so the quantize gate fails after
    # load, export and parity have completed.
    spec = write_spec(
        tmp_path, embedder_spec({"mode": "dynamic", "min_cosine": 1.0, "on_gate_failure": "fail"})
    )
    workdir = tmp_path / "cwd"  # ONNX Runtime's pre-processing once left files in the working directory
    workdir.mkdir()
    monkeypatch.chdir(workdir)
    out, cache = tmp_path / "dist", tmp_path / "cache"
    with pytest.raises(BuildError, match="min_cosine") as err:
        run_build(spec, out, signer, cache)
    assert err.value.stage == "quantize"
    assert not (out / "emb").exists() or not any((out / "emb").iterdir())
    stage_dirs = sorted(p.name.split("-")[0] for p in cache.iterdir() if p.is_dir())
    assert stage_dirs == ["export", "load", "parity"]
    assert list(workdir.iterdir()) == []
    assert not [p for p in cache.iterdir() if p.name.startswith(".")]


def test_cli_exits_non_zero_naming_the_stage(
    tmp_path: Path, signer: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = write_spec(tmp_path, tiny_spec(model={"factory": f"{FIXTURES}:embedder"}))
    code = main(
        [
            "build",
            str(spec),
            "--out",
            str(tmp_path / "dist"),
            "--key",
            str(signer),
            "--cache-dir",
            str(tmp_path / "cache"),
        ]
    )
    err = capsys.readouterr().err
    assert code == 1
    assert "stage load" in err and "inputs" in err and "features" in err


# --------------------------------------------------------------------------- bad specs


def test_unknown_spec_key_is_named_with_the_file(tmp_path: Path) -> None:
    spec = write_spec(tmp_path, tiny_spec(quantize={"mode": "static", "per_chanel": True}))
    with pytest.raises(SpecError) as err:
        load_spec(spec)
    assert err.value.key == "quantize.per_chanel"
    assert str(spec) in str(err.value) and "per_channel" in str(err.value)


def test_unknown_top_level_key_and_bad_value_are_named(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="'modle'"):
        load_spec(write_spec(tmp_path, {**tiny_spec(), "modle": {}}, "a.yaml"))
    with pytest.raises(SpecError, match=r"key 'name'"):
        load_spec(write_spec(tmp_path, tiny_spec(name="../escape"), "n.yaml"))
    with pytest.raises(SpecError, match=r"'quantize.mode': 'fast' is not one of 'static', 'dynamic'"):
        load_spec(write_spec(tmp_path, tiny_spec(quantize={"mode": "fast"}), "b.yaml"))
    with pytest.raises(SpecError, match=r"'inputs\[0\].shape'"):
        load_spec(
            write_spec(
                tmp_path,
                tiny_spec(inputs=[{"name": "image", "dtype": "float32", "shape": [3, 16]}]),
                "c.yaml",
            )
        )


def test_factory_that_does_not_import_is_named(tmp_path: Path, signer: Path) -> None:
    spec = write_spec(tmp_path, tiny_spec(model={"factory": "model_build_tiny_nonexistent:build"}))
    with pytest.raises(
        BuildError, match=r"model.factory: cannot import module 'model_build_tiny_nonexistent'"
    ):
        run_build(spec, tmp_path / "dist", signer, tmp_path / "cache")


def test_input_signature_mismatch_is_named(tmp_path: Path, signer: Path) -> None:
    spec = write_spec(
        tmp_path, tiny_spec(inputs=[{"name": "image", "dtype": "float32", "shape": ["batch", 3, 32, 32]}])
    )
    with pytest.raises(BuildError) as err:
        run_build(spec, tmp_path / "dist", signer, tmp_path / "cache")
    assert err.value.stage == "load"
    assert "inputs[0].shape[2]: spec says 32" in str(err.value) and "gives 16" in str(err.value)


def test_missing_calibration_file_is_named(tmp_path: Path) -> None:
    spec = write_spec(tmp_path, tiny_spec(calibration={"file": "calib/missing.npz"}))
    with pytest.raises(SpecError) as err:
        load_spec(spec)
    assert err.value.key == "calibration.file" and "missing.npz" in str(err.value)


def test_calibration_file_is_used_when_given(tmp_path: Path, signer: Path) -> None:
    import model_build_tiny as tiny

    bundle.save_tensors(tmp_path / "calib.npz", {"image": tiny.samples(16, seed=3)["image"]})
    spec = write_spec(tmp_path, tiny_spec(calibration={"file": "calib.npz", "samples": 16}))
    result = run_build(spec, tmp_path / "dist", signer, tmp_path / "cache")
    assert "quantize" in result.ran()
    assert result.manifest["files"]


# --------------------------------------------------------------------------- cache


def test_second_build_is_up_to_date_and_runs_no_stage(tmp_path: Path, signer: Path) -> None:
    spec = write_spec(tmp_path, tiny_spec())
    first = run_build(spec, tmp_path / "dist", signer, tmp_path / "cache")
    assert {"load", "export", "parity", "quantize", "benchmark", "bundle"} <= set(first.ran())
    second = run_build(spec, tmp_path / "dist", signer, tmp_path / "cache")
    assert second.up_to_date and second.version == first.version
    assert second.ran() == []
    assert second.manifest == first.manifest


def test_changed_quantize_setting_reruns_only_from_quantize(
    tmp_path: Path, signer: Path, shared_cache: Any
) -> None:
    spec_data = tiny_spec()
    spec = write_spec(tmp_path, spec_data)
    cache = shared_cache(tmp_path)
    first = run_build(spec, tmp_path / "dist", signer, cache)
    spec_data["quantize"] = {**spec_data["quantize"], "per_channel": False}
    write_spec(tmp_path, spec_data)
    second = run_build(spec, tmp_path / "dist", signer, cache)
    assert second.version != first.version
    status = {s.name: s.status for s in second.stages}
    assert status["load"] == status["export"] == status["parity"] == "cached"
    assert status["quantize"] == status["benchmark"] == status["bundle"] == "ran"
    quant_dirs = [p for p in cache.iterdir() if p.name.startswith("quantize-")]
    reports = [json.loads((p / "quantize.json").read_text()) for p in quant_dirs]
    assert sorted(r["calibration_cached"] for r in reports) == [False, True]  # calibration reused
    assert os.readlink(tmp_path / "dist" / "tiny" / "latest") == second.version
    assert (tmp_path / "dist" / "tiny" / first.version).is_dir()  # older bundles stay for rollback


def test_changed_model_kwargs_rerun_from_load(tmp_path: Path, signer: Path, shared_cache: Any) -> None:
    spec_data = tiny_spec()
    spec = write_spec(tmp_path, spec_data)
    cache = shared_cache(tmp_path)
    first = run_build(spec, tmp_path / "dist", signer, cache)
    spec_data["model"] = {"factory": f"{FIXTURES}:classifier", "kwargs": {"steps": 41}}
    write_spec(tmp_path, spec_data)
    second = run_build(spec, tmp_path / "dist", signer, cache)
    assert second.version != first.version and "load" in second.ran() and "export" in second.ran()


# --------------------------------------------------------------------------- verify CLI


@pytest.fixture
def bundle_copy(tiny_build: tuple[BuildResult, Path, Path], tmp_path: Path) -> Path:
    import shutil

    result, _, _ = tiny_build
    target = tmp_path / "bundle"
    shutil.copytree(result.bundle_dir, target)
    return target


def _verify(folder: Path, public: Path) -> int:
    return main(["verify", str(folder), "--public-key", str(public)])


def test_verify_cli_accepts_the_untouched_bundle(bundle_copy: Path, signer: Path) -> None:
    assert _verify(bundle_copy, bundle.public_path(signer)) == 0


def test_verify_cli_refuses_a_tampered_file_naming_it(
    bundle_copy: Path, signer: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = bundle_copy / "golden" / "outputs.npz"
    data = bytearray(path.read_bytes())
    data[-20] ^= 0xFF
    path.write_bytes(bytes(data))
    assert _verify(bundle_copy, bundle.public_path(signer)) == 1
    assert "golden/outputs.npz" in capsys.readouterr().err


def test_verify_cli_refuses_a_tampered_manifest(
    bundle_copy: Path, signer: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    manifest = json.loads((bundle_copy / "manifest.json").read_text())
    manifest["serving"]["max_batch_size"] = 64
    (bundle_copy / "manifest.json").write_bytes(bundle.canonical_json(manifest))
    assert _verify(bundle_copy, bundle.public_path(signer)) == 1
    err = capsys.readouterr().err
    assert "manifest.json" in err and "signature" in err


def test_verify_cli_refuses_the_wrong_key(
    bundle_copy: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    other = tmp_path / "other.pem"
    bundle.generate_key(other)
    assert _verify(bundle_copy, bundle.public_path(other)) == 1
    assert "manifest.json" in capsys.readouterr().err


def test_verify_cli_refuses_a_stray_file(
    bundle_copy: Path, signer: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (bundle_copy / "extra.onnx").write_bytes(b"x")
    assert _verify(bundle_copy, bundle.public_path(signer)) == 1
    assert "extra.onnx" in capsys.readouterr().err


# --------------------------------------------------------------------------- distillation


def test_distillation_reports_param_ratio_and_teacher_agreement(tmp_path: Path, signer: Path) -> None:
    spec = write_spec(
        tmp_path,
        tiny_spec(
            distil={
                "student": {"factory": f"{FIXTURES}:student", "kwargs": {"width": 4}},
                "steps": 60,
                "batch_size": 32,
                "lr": 0.02,
                "min_agreement": 0.8,
                "max_param_ratio": 0.125,
            },
            quantize={"enabled": False},
        ),
    )
    result = run_build(spec, tmp_path / "dist", signer, tmp_path / "cache")
    distil = result.manifest["distillation"]
    assert distil["param_ratio"] <= 0.125
    assert distil["param_ratio"] == pytest.approx(
        distil["student_parameters"] / distil["teacher_parameters"], abs=1e-4
    )
    assert distil["teacher_agreement"] >= 0.8
    assert result.manifest["source"]["parameters"] == distil["student_parameters"]
    assert {"stage": "quantize", "reason": "quantize.enabled is false in the spec"} in result.manifest[
        "skipped"
    ]


def test_distillation_refuses_a_student_that_is_too_large(tmp_path: Path, signer: Path) -> None:
    spec = write_spec(
        tmp_path,
        tiny_spec(
            distil={"student": {"factory": f"{FIXTURES}:student", "kwargs": {"width": 16}}, "steps": 1}
        ),
    )
    with pytest.raises(BuildError, match=r"distil.max_param_ratio: student has .* 1.000 of the teacher"):
        run_build(spec, tmp_path / "dist", signer, tmp_path / "cache")


def test_golden_inputs_are_exact_pytorch_inputs(tiny_build: tuple[BuildResult, Path, Path]) -> None:
    import model_build_tiny as tiny

    result, _, _ = tiny_build
    golden = bundle.load_tensors(result.bundle_dir / "golden" / "inputs.npz")
    np.testing.assert_array_equal(golden["image"], tiny.samples(4, seed=99)["image"])


def test_sigterm_during_a_build_leaves_no_bundle_and_no_stage_leftovers(tmp_path: Path, signer: Path) -> None:
    import signal
    import subprocess
    import sys
    import time

    marker = tmp_path / "started"
    spec = write_spec(
        tmp_path,
        tiny_spec(model={"factory": f"{FIXTURES}:slow_classifier", "kwargs": {"marker": str(marker)}}),
    )
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), str(root / "tests")])}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "model_build",
            "build",
            str(spec),
            "--out",
            str(tmp_path / "dist"),
            "--key",
            str(signer),
            "--cache-dir",
            str(tmp_path / "cache"),
        ],
        cwd=root,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert marker.exists(), proc.stderr.read() if proc.stderr else ""
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130 and "interrupted" in err
    assert not (tmp_path / "dist" / "tiny").exists()
    assert list((tmp_path / "cache").iterdir()) == []


def test_stale_temporary_folders_of_killed_builds_are_swept(tmp_path: Path) -> None:
    import time

    from model_build.cache import StageCache

    stale, fresh = tmp_path / ".load-abc.x1", tmp_path / ".load-abc.x2"
    stale.mkdir()
    fresh.mkdir()
    old = time.time() - 7200
    os.utime(stale, (old, old))
    StageCache(tmp_path)
    assert not stale.exists() and fresh.exists()


def test_int8_not_fast_enough_is_dropped_with_the_measured_reason(
    tmp_path: Path, signer: Path, shared_cache: Any
) -> None:
    # max_slowdown -0.99 demands INT8 be 100x faster than FP32, which no CPU gives: the measured
    # variant must be dropped, named in `dropped`, and left out of the bundle's files.
    spec = write_spec(tmp_path, tiny_spec(benchmark={"warmup": 2, "iterations": 25, "max_slowdown": -0.99}))
    result = run_build(spec, tmp_path / "dist", signer, shared_cache(tmp_path))
    (drop,) = result.manifest["dropped"]
    assert drop["variant"] == "int8"
    assert "batch-1 p50" in drop["reason"] and "benchmark.max_slowdown" in drop["reason"]
    assert [v["name"] for v in result.manifest["variants"]] == ["fp32"]
    assert "model.int8.onnx" not in result.manifest["files"]


def test_cli_build_prints_a_summary_and_then_up_to_date(
    tmp_path: Path, signer: Path, shared_cache: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = write_spec(tmp_path, tiny_spec())
    argv = ["build", str(spec), "--out", str(tmp_path / "dist"), "--key", str(signer)]
    argv += ["--cache-dir", str(shared_cache(tmp_path))]
    assert main(argv) == 0
    first = capsys.readouterr()
    assert "stage" in first.out and "variant" in first.out and "fp32" in first.out
    assert "[load] cached" in first.err and "[bundle] wrote" in first.err
    assert main(argv) == 0
    assert "up to date" in capsys.readouterr().out
    assert (
        main(
            [
                "verify",
                str(tmp_path / "dist" / "tiny" / "latest"),
                "--public-key",
                str(bundle.public_path(signer)),
            ]
        )
        == 0
    )


# --------------------------------------------------------------------------- the on-device quality set


def test_quality_set_is_regenerated_from_its_base_and_seed_bit_for_bit(
    tmp_path: Path, signer: Path, shared_cache: Any
) -> None:
    noise = {"input": "image", "std": 0.5, "seed_offset": 11}
    data = {"factory": f"{FIXTURES}:noisy_samples", "noise": noise}
    spec = write_spec(tmp_path, tiny_spec(data=data))
    result = run_build(spec, tmp_path / "dist", signer, shared_cache(tmp_path))
    quality = result.manifest["quality"]
    assert quality["inputs"] == {
        "base": "quality/base.npz",
        "noise": {"input": "image", "std": 0.5, "seed": 13},
    }
    typed = bundle.Quality.model_validate(quality)
    rebuilt = list(bundle.iter_quality_inputs(typed, result.bundle_dir.joinpath))
    images = np.concatenate([b["image"] for b in rebuilt])
    expected = __import__(FIXTURES).noisy_samples(64, 2)["image"]  # evaluation: 64 samples, seed 2
    np.testing.assert_array_equal(images, expected)
    assert [len(b["image"]) for b in rebuilt] == [32, 32]  # one batch at a time, never the whole set


def test_a_factory_that_breaks_the_noise_promise_fails_naming_data_noise(
    tmp_path: Path, signer: Path
) -> None:
    data = {
        "factory": f"{FIXTURES}:noisy_samples_breaking_the_promise",
        "noise": {"input": "image", "std": 0.5, "seed_offset": 11},
    }
    spec = write_spec(tmp_path, tiny_spec(data=data))
    with pytest.raises(BuildError, match=r"data\.noise: .* is not its noise=0 samples plus") as err:
        run_build(spec, tmp_path / "dist", signer, tmp_path / "cache")
    assert err.value.stage == "load"


def test_noise_on_an_input_that_is_not_float_is_a_spec_error(tmp_path: Path) -> None:
    data = {"factory": f"{FIXTURES}:noisy_samples", "noise": {"input": "labels", "std": 0.5}}
    with pytest.raises(SpecError, match=r"'data.noise.input': 'labels' is not a float32 input"):
        load_spec(write_spec(tmp_path, tiny_spec(data=data)))


def test_a_shipped_quality_set_over_its_byte_budget_names_the_key(tmp_path: Path, signer: Path) -> None:
    spec = write_spec(tmp_path, tiny_spec(quality={"max_bytes": 1000}))
    with pytest.raises(
        BuildError, match=r"quality.max_bytes: the evaluation inputs take 196,608 bytes > 1,000"
    ):
        run_build(spec, tmp_path / "dist", signer, tmp_path / "cache")


def test_int8_failing_its_gate_on_every_class_is_dropped_and_fp32_still_ships(
    tmp_path: Path, signer: Path
) -> None:
    # Cosine 1.0 is unreachable for INT8; the default on_gate_failure (drop) applies.
    spec = write_spec(tmp_path, embedder_spec({"mode": "dynamic", "min_cosine": 1.0}))
    result = run_build(spec, tmp_path / "dist", signer, tmp_path / "cache")
    assert [v["name"] for v in result.manifest["variants"]] == ["fp32"]
    (drop,) = [d for d in result.manifest["dropped"] if d["variant"] == "int8"]
    assert drop["reason"].startswith("no CPU class passed the gate:")
    assert "failed" in drop["reason"] and "min cosine" in drop["reason"]
    from model_build.pipeline import summary_table

    assert "dropped int8: no CPU class passed the gate" in summary_table(result)


def test_quality_gate_fails_on_outputs_that_drift_from_the_build_or_from_fp32() -> None:
    rng = np.random.default_rng(0)
    build = {"logits": rng.standard_normal((512, 10)).astype(np.float32) * 4}
    quality = bundle.derive_quality_tolerance(build, 0.0)
    variant = bundle.Variant.model_validate(
        {
            "name": "int8",
            "file": "model.int8.onnx",
            "format": "onnx",
            "precision": "int8",
            "device_classes": ["x86_cpu"],
            "tolerance": {"kind": "top1", "min_agreement": 0.99},
            "quality": {"outputs": "quality/int8.npz", **quality},
        }
    )
    assert bundle.quality_gate(variant, build, build, build)["agreement"] == 1.0
    drifted = {"logits": build["logits"] + 5 * quality["atol"]}
    with pytest.raises(bundle.QualityGateFailed, match=r"differ from the build's by up to .* > quality.atol"):
        bundle.quality_gate(variant, drifted, build, build)
    flipped = build["logits"].copy()
    flipped[:8] = -flipped[:8]  # eight of 512 rows change class: agreement 0.984 < 0.99
    with pytest.raises(bundle.QualityGateFailed, match=r"top-1 agreement 0\.98.* < min_agreement 0\.99"):
        bundle.quality_gate(variant, {"logits": flipped}, build, build)


# --------------------------------------------------------------------------- axis bounds


def _text_spec(**axes: object) -> dict[str, Any]:
    spec = tiny_spec(
        inputs=[
            {"name": "input_ids", "dtype": "int64", "shape": ["batch", "sequence"]},
            {"name": "attention_mask", "dtype": "int64", "shape": ["batch", "sequence"]},
        ]
    )
    if axes:
        spec["axes"] = axes
    return spec


@pytest.mark.parametrize(
    ("axes", "key", "message"),
    [
        ({}, "axes.sequence", "the spec must give its largest size"),
        ({"sequence": 0}, "axes.sequence", "must be a positive integer"),
        ({"sequence": 64, "batch": 8}, "axes.batch", "bounded by serving.max_batch_size"),
        ({"sequence": 64, "length": 8}, "axes.length", "no input uses axis 'length'"),
    ],
)
def test_every_named_axis_needs_a_maximum_in_the_spec(
    tmp_path: Path, axes: dict[str, int], key: str, message: str
) -> None:
    with pytest.raises(SpecError, match=message) as err:
        load_spec(write_spec(tmp_path, _text_spec(**axes)))
    assert err.value.key == key


BUCKETS = {"axis": "sequence", "lengths": [8, 16, 24], "pad_values": {"input_ids": 0, "attention_mask": 0}}


@pytest.mark.parametrize(
    ("buckets", "key", "message"),
    [
        ({**BUCKETS, "axis": "length"}, "serving.buckets.axis", "'length' is not a named input axis"),
        ({**BUCKETS, "lengths": [8, 16]}, "serving.buckets.lengths", r"end at axes.sequence \(24\)"),
        ({**BUCKETS, "lengths": [16, 8, 24]}, "serving.buckets.lengths", "must rise strictly"),
        ({**BUCKETS, "pad_values": {"input_ids": 0}}, "serving.buckets.pad_values", "exactly the inputs"),
    ],
)
def test_length_buckets_that_do_not_cover_the_axis_are_spec_errors(
    tmp_path: Path, buckets: dict[str, Any], key: str, message: str
) -> None:
    spec = _text_spec(sequence=24)
    spec["serving"] = {**spec["serving"], "buckets": buckets}
    with pytest.raises(SpecError, match=message) as err:
        load_spec(write_spec(tmp_path, spec))
    assert err.value.key == key


def test_length_buckets_on_a_model_whose_output_carries_the_axis_are_refused(tmp_path: Path) -> None:
    spec = _text_spec(sequence=24)
    spec["outputs"] = [{"name": "states", "dtype": "float32", "shape": ["batch", "sequence", 8]}]
    spec["serving"] = {**spec["serving"], "buckets": BUCKETS}
    with pytest.raises(SpecError, match="output 'states' carries axis 'sequence'") as err:
        load_spec(write_spec(tmp_path, spec))
    assert err.value.key == "serving.buckets.axis"


def _bucketed_text_spec(masked: bool) -> dict[str, Any]:
    spec = _text_spec(sequence=24)
    spec.update(
        name="text",
        model={"factory": f"{FIXTURES}:text_classifier", "kwargs": {"masked": masked}},
        data={"factory": f"{FIXTURES}:token_samples"},
        quantize={"enabled": False},
        serving={**spec["serving"], "buckets": BUCKETS},
    )
    return spec


@pytest.mark.slow
def test_length_buckets_are_proven_invisible_and_recorded(tmp_path: Path, signer: Path) -> None:
    result = run_build(
        write_spec(tmp_path, _bucketed_text_spec(masked=True)), tmp_path / "dist", signer, tmp_path / "cache"
    )
    manifest = bundle.Manifest.parse((result.bundle_dir / "manifest.json").read_bytes())
    buckets = manifest.serving.buckets
    assert buckets is not None and buckets.lengths == (8, 16, 24) and buckets.samples == 64
    assert buckets.max_abs_diff <= 1e-5
    assert buckets.bucket(3) == 8 and buckets.bucket(9) == 16 and buckets.bucket(24) == 24


@pytest.mark.slow
def test_length_buckets_on_a_model_that_sees_its_padding_fail_the_build(tmp_path: Path, signer: Path) -> None:
    """The unmasked model averages the padding in: padding to the bucket's top changes its logits."""
    with pytest.raises(
        BuildError, match=r"serving.buckets: padding to the buckets \[8, 16, 24\] changes"
    ) as err:
        run_build(
            write_spec(tmp_path, _bucketed_text_spec(masked=False)),
            tmp_path / "dist",
            signer,
            tmp_path / "cache",
        )
    assert err.value.stage == "parity"
    assert not (tmp_path / "dist" / "text").exists()


def test_the_build_proves_the_model_runs_at_its_axis_maximum() -> None:
    """MiniLM's 512 position embeddings: 512 runs and is measured, 513 is a build error naming the key."""
    model = REPO / "dist" / "minilm" / "latest" / "model.fp32.onnx"
    assert model.is_file(), "make bundles builds dist/minilm (make test runs it)"
    spec = load_spec(REPO / "models" / "minilm.yaml")
    figures = measure_sample_bytes(model, spec)
    assert figures["axes"] == {"sequence": 512}
    assert figures["max_sample_bytes"] > 16 << 20  # a 512-token pass: attention maps for 12 heads and more
    with pytest.raises(BuildError, match=r"does not run at axes\.sequence=513: .*512 by 513") as err:
        measure_sample_bytes(model, dataclasses.replace(spec, axes={"sequence": 513}))
    assert err.value.stage == "parity"
