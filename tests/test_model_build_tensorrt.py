"""The TensorRT stage: profile shapes, environment detection and the EP context wrapper here; real
engines where a GPU is.

The wrapper tests use a fake engine byte file: what they check is our wrapper and manifest code
(the EPContext node, its attributes, the I/O signature, the files listed), which never reads the
engine. Whether TensorRT's EP runs a real engine through the wrapper needs a GPU (last test).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import yaml
from onnx import TensorProto, helper, numpy_helper

from contract import bundle
from model_build.pipeline import Reporter, _engine_variants, build
from model_build.spec import load_spec
from model_build.tensorrt import (
    _profile_shapes,
    detect_environment,
    hardware_architecture,
    write_engine_wrapper,
)

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
    "axes": {"sequence": 128},
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
        assert engine["file"].endswith(".onnx") and (result.bundle_dir / engine["engine"]).stat().st_size > 0
    assert any(s["stage"] == "tensorrt:sm_1" for s in result.manifest["skipped"])
    if "TensorrtExecutionProvider" not in ort.get_available_providers():
        return  # the engines were built and gated through TensorRT itself; ORT's TRT EP is not here
    # The wrapper, loaded by ONNX Runtime's TensorRT EP, reproduces the golden outputs.
    golden_in = bundle.load_tensors(result.bundle_dir / "golden" / "inputs.npz")
    golden_out = bundle.load_tensors(result.bundle_dir / "golden" / "outputs.npz")
    for engine in engines:
        wrapper = result.bundle_dir / engine["file"]
        session = ort.InferenceSession(
            str(wrapper),
            providers=[("TensorrtExecutionProvider", {"trt_ep_context_file_path": str(wrapper.parent)})],
        )
        got = dict(zip(["logits"], session.run(["logits"], golden_in), strict=True))
        bundle.compare_outputs(golden_out, got, engine["tolerance"])


def _source_model(path: Path) -> onnx.ModelProto:
    """An embedder-like ONNX model: int64 [batch, sequence] and float [batch, 32] in, [batch, 16] out.

    ``w`` is also listed as a graph input (as older exporters did); the wrapper must not expose it.
    """
    w = numpy_helper.from_array(np.ones((32, 16), np.float32), "w")
    nodes = [
        helper.make_node("MatMul", ["features", "w"], ["proj"]),
        helper.make_node("Shape", ["input_ids"], ["ids_shape"]),
        helper.make_node("Identity", ["proj"], ["embedding"]),
    ]
    graph = helper.make_graph(
        nodes,
        "emb",
        [
            helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"]),
            helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", 32]),
            helper.make_tensor_value_info("w", TensorProto.FLOAT, [32, 16]),
        ],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["batch", 16])],
        [w],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    onnx.save(model, path)
    return model


def _wrapped(tmp_path: Path) -> tuple[onnx.ModelProto, Path, Path]:
    source = tmp_path / "model.fp32.onnx"
    _source_model(source)
    engine = tmp_path / "engines" / "trt-sm_86-fp16.engine"
    engine.parent.mkdir()
    engine.write_bytes(b"not a real engine: the wrapper never reads it")
    wrapper = tmp_path / "engines" / "trt-sm_86-fp16.onnx"
    write_engine_wrapper(source, engine, wrapper, gpu_arch="sm_86", tensorrt_version="10.3.0")
    return onnx.load(str(source)), engine, wrapper


def test_wrapper_is_one_epcontext_node_pointing_at_the_engine_beside_it(tmp_path: Path) -> None:
    _, engine, wrapper = _wrapped(tmp_path)
    model = onnx.load(str(wrapper))
    onnx.checker.check_model(model)
    assert len(model.graph.node) == 1 and not model.graph.initializer
    node = model.graph.node[0]
    assert (node.domain, node.op_type) == ("com.microsoft", "EPContext")
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    assert attrs["embed_mode"] == 0 and attrs["main_context"] == 1
    assert attrs["ep_cache_context"] == b"trt-sm_86-fp16.engine"
    assert (wrapper.parent / attrs["ep_cache_context"].decode()).resolve() == engine.resolve()
    assert attrs["source"] == b"TensorrtExecutionProvider"
    assert attrs["hardware_architecture"] == b"86"
    assert attrs["ep_sdk_version"] == b"10.3.0"
    assert attrs["onnx_model_filename"] == b"model.fp32.onnx"
    assert {(o.domain, o.version) for o in model.opset_import} == {("", 17), ("com.microsoft", 1)}
    assert wrapper.stat().st_size < 2048  # the engine is referenced, not embedded


def test_wrapper_has_the_source_models_inputs_and_outputs(tmp_path: Path) -> None:
    source, _, wrapper = _wrapped(tmp_path)
    model = onnx.load(str(wrapper))
    # Same names, element types and dims (fixed sizes and the named dynamic axes); no initializers.
    assert list(model.graph.input) == [vi for vi in source.graph.input if vi.name != "w"]
    assert list(model.graph.output) == list(source.graph.output)
    node = model.graph.node[0]
    assert list(node.input) == ["input_ids", "features"] and list(node.output) == ["embedding"]
    assert model.ir_version == source.ir_version


def test_onnx_runtime_reads_the_wrapper_as_a_tensorrt_ep_context(tmp_path: Path) -> None:
    # ONNX Runtime parses the EPContext node and its `source`; without the TensorRT EP it refuses
    # the model for that reason (and not for a malformed graph or attribute).
    _, _, wrapper = _wrapped(tmp_path)
    with pytest.raises(Exception, match="generated by 'TensorrtExecutionProvider' is not compatible") as info:
        ort.InferenceSession(str(wrapper), providers=["CPUExecutionProvider"])
    assert "EPContext" in str(info.value)


def test_wrapper_refuses_an_engine_outside_its_folder_and_a_bad_arch(tmp_path: Path) -> None:
    source = tmp_path / "model.fp32.onnx"
    _source_model(source)
    engine = tmp_path / "x.engine"
    engine.write_bytes(b"e")
    with pytest.raises(ValueError, match="must lie in the wrapper's folder"):
        write_engine_wrapper(
            source, engine, tmp_path / "sub" / "w.onnx", gpu_arch="sm_86", tensorrt_version="10"
        )
    with pytest.raises(FileNotFoundError, match=r"absent\.engine"):
        write_engine_wrapper(
            source, tmp_path / "absent.engine", tmp_path / "w.onnx", gpu_arch="sm_86", tensorrt_version="10"
        )
    with pytest.raises(ValueError, match="'ampere' is not of the form sm_"):
        hardware_architecture("ampere")
    assert not (tmp_path / "sub" / "w.onnx").exists() and not (tmp_path / "w.onnx").exists()


def test_engine_variant_points_at_the_wrapper_and_both_files_are_listed(tmp_path: Path) -> None:
    # The stage's output folder as tensorrt_stage leaves it on a GPU machine, with a fake engine.
    stage = tmp_path / "stage"
    stage.mkdir()
    _source_model(stage / "model.fp32.onnx")
    (stage / "trt-sm_86-fp16.engine").write_bytes(b"fake engine bytes")
    write_engine_wrapper(
        stage / "model.fp32.onnx",
        stage / "trt-sm_86-fp16.engine",
        stage / "trt-sm_86-fp16.onnx",
        gpu_arch="sm_86",
        tensorrt_version="10.3.0",
    )
    report = {
        "engines": [
            {
                "name": "trt-sm_86-fp16",
                "file": "trt-sm_86-fp16.engine",
                "wrapper": "trt-sm_86-fp16.onnx",
                "precision": "fp16",
                "gpu_arch": "sm_86",
                "tensorrt_version": "10.3.0",
                "cuda_version": "12.4",
                "tolerance": {"kind": "cosine", "min_cosine": 0.99},
                "metrics": {"min_cosine": 0.999},
            }
        ]
    }
    out = tmp_path / "bundle"
    out.mkdir()
    [variant] = _engine_variants(report, stage, out)
    assert variant["file"] == "engines/trt-sm_86-fp16.onnx"
    assert variant["engine"] == "engines/trt-sm_86-fp16.engine"
    assert variant["format"] == "tensorrt" and variant["device_classes"] == ["nvidia_gpu"]
    assert (variant["gpu_arch"], variant["tensorrt_version"], variant["cuda_version"]) == (
        "sm_86",
        "10.3.0",
        "12.4",
    )
    assert variant["metrics"]["size_bytes"] == len(b"fake engine bytes")
    files = bundle.file_entries(out, [p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()])
    assert set(files) == {variant["file"], variant["engine"]}
    assert all(len(entry["sha256"]) == 64 for entry in files.values())
    # The wrapper, as copied into the bundle, still names the engine beside it.
    node = onnx.load(str(out / variant["file"])).graph.node[0]
    context = {a.name: helper.get_attribute_value(a) for a in node.attribute}["ep_cache_context"]
    assert (out / "engines" / context.decode()).read_bytes() == b"fake engine bytes"
