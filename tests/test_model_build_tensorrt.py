"""The TensorRT stage: profile shapes and environment detection here; real engines where a GPU is."""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
from pathlib import Path

import pytest
import yaml

from model_build import bundle
from model_build.pipeline import Reporter, build
from model_build.spec import load_spec
from model_build.tensorrt import _profile_shapes, detect_environment

# The spec factories name the fixture module "model_build_tiny" (tests/model_build_tiny.py); make it
# importable whatever rootdir/import mode pytest uses.
if str(Path(__file__).resolve().parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parent))

SPEC = {
    "name": "emb",
    "task": "embedding",
    "model": {"factory": "model_build_tiny:embedder"},
    "inputs": [
        {"name": "input_ids", "dtype": "int64", "shape": ["batch", "sequence"]},
        {"name": "features", "dtype": "float32", "shape": ["batch", 32]},
    ],
    "outputs": [{"name": "embedding", "dtype": "float32", "shape": ["batch", 16]}],
    "quantize": {"enabled": False},
    "tensorrt": {"archs": ["sm_86"], "max_sequence": 64},
    "serving": {"max_batch_size": 16},
}


def test_profile_spans_one_to_the_serving_batch_and_the_spec_sequence(tmp_path: Path) -> None:
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(SPEC))
    shapes = _profile_shapes(load_spec(path), 16)
    assert shapes["input_ids"] == ((1, 1), (8, 32), (16, 64))
    assert shapes["features"] == ((1, 32), (8, 32), (16, 32))


def test_environment_without_tensorrt_or_gpu_gives_a_reason() -> None:
    env = detect_environment()
    if importlib.util.find_spec("tensorrt") is None:
        assert env.tensorrt_version is None and env.reason is not None and "tensorrt" in env.reason
    elif shutil.which("nvidia-smi") is None:
        assert env.reason is not None and "GPU" in env.reason
    else:
        assert env.reason is None and env.gpu_arch is not None and env.gpu_arch.startswith("sm_")


def test_engine_for_the_local_gpu_is_built_checked_and_pinned(tmp_path: Path) -> None:
    env = detect_environment()
    if env.reason is not None:
        pytest.skip(f"needs TensorRT and a CUDA GPU: {env.reason}")
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs torch with CUDA to run the engine on the golden inputs")
    spec = {
        "name": "tiny",
        "task": "classification",
        "model": {"factory": "model_build_tiny:classifier"},
        "inputs": [{"name": "image", "dtype": "float32", "shape": ["batch", 3, 16, 16]}],
        "outputs": [{"name": "logits", "dtype": "float32", "shape": ["batch", 4]}],
        "data": {"factory": "model_build_tiny:samples"},
        "evaluation": {"samples": 64},
        "calibration": {"samples": 32},
        "quantize": {"min_agreement": 0.9},
        "tensorrt": {"archs": [env.gpu_arch, "sm_1"], "precisions": ["fp16", "int8"]},
        "benchmark": {"iterations": 25, "max_slowdown": 10.0},
    }
    path = tmp_path / "t.yaml"
    path.write_text(yaml.safe_dump(spec))
    key = tmp_path / "k.pem"
    bundle.generate_key(key)
    with open(os.devnull, "w") as sink:
        result = build(
            load_spec(path), tmp_path / "dist", key_path=key, cache_root=tmp_path / "c", report=Reporter(sink)
        )
    engines = [v for v in result.manifest["variants"] if v["format"] == "tensorrt"]
    assert {v["precision"] for v in engines} <= {"fp16", "int8"} and engines
    for engine in engines:
        assert engine["gpu_arch"] == env.gpu_arch and engine["tensorrt_version"] == env.tensorrt_version
        assert (result.bundle_dir / engine["file"]).stat().st_size > 0
    assert any(s["stage"] == "tensorrt:sm_1" for s in result.manifest["skipped"])
