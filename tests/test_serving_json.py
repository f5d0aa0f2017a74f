"""The JSON path of the v2 protocol: simdjson and orjson in, orjson out, the standard library's leniency and
wording kept.

In-process tests call :mod:`serving.protocol` on real bodies; the last ones send the hostile bodies to a
real server process and check that it answers each with a named 400 and stays ready.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from serving_support import Bundle, ServerProcess, make_bundle, running_server

from contract.codec import decode_infer_response
from serving.protocol import (
    InferRequest,
    ModelSpec,
    ProtocolError,
    TensorSpec,
    encode_response,
    parse_infer_request,
    precheck_header,
)

F32 = np.dtype("<f4")
I64 = np.dtype("<i8")
I32 = np.dtype("<i4")


def _model(*, allow_nonfinite: bool = False, dtype: np.dtype[Any] = F32, datatype: str = "FP32") -> ModelSpec:
    return ModelSpec(
        name="m",
        version="1",
        inputs=(TensorSpec("x", datatype, dtype, ("batch", 4), allow_nonfinite),),
        outputs=(TensorSpec("y", "FP32", F32, ("batch", 3)),),
        max_batch_size=8,
    )


def _body(data: Any, *, datatype: str = "FP32", shape: list[int] | None = None, **extra: Any) -> bytes:
    tensor = {"name": "x", "shape": shape or [1, 4], "datatype": datatype, "data": data}
    return json.dumps({"inputs": [tensor], **extra}).encode()


def _refused(body: bytes, model: ModelSpec | None = None, header_length: str | None = None) -> str:
    with pytest.raises(ProtocolError) as caught:
        parse_infer_request(body, header_length, model or _model(), 8)
    assert caught.value.status == 400
    return caught.value.message


# --------------------------------------------------------------------------- what is accepted


@settings(max_examples=60, deadline=None, database=None)
@given(
    x=hnp.arrays(
        F32, st.tuples(st.integers(1, 8), st.just(4)), elements=st.floats(width=32, allow_nan=False)
    ),
    nested=st.booleans(),
)
def test_float_data_parses_to_the_same_array_as_the_standard_library(x: np.ndarray, nested: bool) -> None:
    data = x.tolist() if nested else x.reshape(-1).tolist()
    body = _body(data, shape=list(x.shape))
    parsed = parse_infer_request(body, None, _model(allow_nonfinite=True), 8)
    expected = np.asarray(json.loads(body)["inputs"][0]["data"]).astype(F32).reshape(x.shape)
    assert parsed.inputs["x"].dtype == F32
    np.testing.assert_array_equal(parsed.inputs["x"], expected)
    np.testing.assert_array_equal(parsed.inputs["x"], x)


def test_int64_data_keeps_every_bit() -> None:
    values = [-(2**63), 2**63 - 1, 0, 2**53 + 1]
    parsed = parse_infer_request(
        _body(values, datatype="INT64"), None, _model(dtype=I64, datatype="INT64"), 8
    )
    assert parsed.inputs["x"].tolist() == [values]


def test_nan_and_infinity_tokens_reach_a_model_that_allows_them() -> None:
    body = b'{"inputs":[{"name":"x","shape":[1,4],"datatype":"FP32","data":[NaN,Infinity,-Infinity,1]}]}'
    got = parse_infer_request(body, None, _model(allow_nonfinite=True), 8).inputs["x"]
    assert np.isnan(got[0, 0]) and got[0, 1] == np.inf and got[0, 2] == -np.inf and got[0, 3] == 1


def test_nan_and_overflowing_numbers_are_refused_by_a_model_that_does_not() -> None:
    assert "contains NaN or Inf" in _refused(
        b'{"inputs":[{"name":"x","shape":[1,4],"datatype":"FP32","data":[NaN,1,2,3]}]}'
    )
    # 1e400 is infinite as a double; orjson refuses it, the standard library reads inf.
    assert "contains NaN or Inf" in _refused(
        b'{"inputs":[{"name":"x","shape":[1,4],"datatype":"FP32","data":[1e400,1,2,3]}]}'
    )


def test_an_id_with_a_lone_surrogate_escape_is_echoed_back() -> None:
    # Valid JSON text (RFC 8259 allows any \\u escape) that orjson refuses; the standard library keeps it.
    body = b'{"id":"a\\ud800b","inputs":[{"name":"x","shape":[1,4],"datatype":"FP32","data":[1,2,3,4]}]}'
    request = parse_infer_request(body, None, _model(), 8)
    assert request.id == "a\ud800b"
    payload, _ = encode_response(_model(), request, {"y": np.zeros((1, 3), F32)})
    assert json.loads(payload)["id"] == "a\ud800b"


def test_duplicate_keys_take_the_last_value_as_before() -> None:
    body = b'{"inputs":[{"name":"x","shape":[9,9],"shape":[1,4],"datatype":"FP32","data":[1,2,3,4]}]}'
    assert parse_infer_request(body, None, _model(), 8).inputs["x"].shape == (1, 4)
    body = b'{"inputs":[{"name":"x","shape":[1,4],"datatype":"FP32","data":[1,2,3,4],"data":[5,6,7,8]}]}'
    assert parse_infer_request(body, None, _model(), 8).inputs["x"].tolist() == [[5, 6, 7, 8]]
    body = b'{"inputs":[],"inputs":[{"name":"x","shape":[1,4],"datatype":"FP32","data":[1,2,3,4]}]}'
    assert parse_infer_request(body, None, _model(), 8).inputs["x"].shape == (1, 4)


def test_nesting_is_read_in_row_major_order_when_the_count_matches() -> None:
    # As Triton reads JSON data: nested or flat, the values in order, and their count is what is checked.
    body = _body([[1, 2], [3, [4]]])
    assert parse_infer_request(body, None, _model(), 8).inputs["x"].tolist() == [[1, 2, 3, 4]]
    # A count that does not match goes the general way, which words a ragged nesting as such.
    assert "is not a regular array of numbers" in _refused(_body([[1, 2], [3, 4, 5]]))
    assert "has 5 elements, shape [1, 4] needs 4" in _refused(_body([1, 2, 3, 4, 5]))


@pytest.mark.parametrize(
    ("datatype", "dtype", "values"),
    [
        ("INT32", I32, [-(2**31), 2**31 - 1, 0, 7]),
        ("UINT8", np.dtype("u1"), [0, 255, 1, 2]),
        ("UINT64", np.dtype("<u8"), [2**64 - 1, 2**63, 0, 1]),
        ("FP16", np.dtype("<f2"), [0.5, -2, 65504, 1e-3]),
    ],
)
def test_each_integer_and_float_kind_reads_exactly(
    datatype: str, dtype: np.dtype[Any], values: list[Any]
) -> None:
    got = parse_infer_request(
        _body(values, datatype=datatype), None, _model(dtype=dtype, datatype=datatype), 8
    )
    assert got.inputs["x"].dtype == dtype
    np.testing.assert_array_equal(got.inputs["x"], np.array([values], dtype=dtype))


def test_a_value_beyond_a_narrow_integer_type_read_from_the_tape_is_refused() -> None:
    assert "outside the range of UINT8" in _refused(
        _body([256, 0, 0, 0], datatype="UINT8"), _model(dtype=np.dtype("u1"), datatype="UINT8")
    )


def test_tensor_data_goes_into_numpy_without_a_python_number() -> None:
    # A million floats as Python floats in a list would take 32 MB of Python objects (24 B a float and 8 B
    # a list slot); read from simdjson's tape they take the float64 buffer (8 MB) and the float32 tensor.
    count = 1_000_000
    model = ModelSpec(
        name="m",
        version="1",
        inputs=(TensorSpec("x", "FP32", F32, ("batch", count)),),
        outputs=(TensorSpec("y", "FP32", F32, ("batch", 3)),),
        max_batch_size=8,
    )
    values = np.random.default_rng(0).standard_normal(count).astype(F32)
    body = _body(values.tolist(), shape=[1, count])
    tracemalloc.start()
    try:
        got = parse_infer_request(body, None, model, 8).inputs["x"]
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    np.testing.assert_array_equal(got[0], values)
    assert peak < 16 * count, f"parsing took {peak / 1e6:.1f} MB of Python memory"


_ONE_INPUT = b'{"name":"x","shape":[1,4],"datatype":"FP32","data":[1,2,3,4]}'


@pytest.mark.parametrize(
    ("entries", "message"),
    [
        # 16 MiB of "{}," made 5.6 million dicts (~490 MB) when the whole body became Python objects.
        (b'"inputs":[' + b",".join([b"{}"] * 5_500_000) + b"]", "inputs[0].name must be a string"),
        (
            b'"inputs":[' + _ONE_INPUT + b'],"outputs":[' + b",".join([b'{"name":"y"}'] * 1_200_000) + b"]",
            "outputs[1].name 'y' is asked for twice",
        ),
    ],
    ids=["empty inputs", "repeated outputs"],
)
def test_a_body_of_millions_of_entries_is_refused_without_building_them(
    tmp_path: Path, entries: bytes, message: str
) -> None:
    body = tmp_path / "hostile.json"
    body.write_bytes(b"{" + entries + b"}")
    script = textwrap.dedent(
        f"""
        import sys
        sys.path.insert(0, {str(Path(__file__).parents[1])!r})
        import numpy as np
        from serving.protocol import ModelSpec, ProtocolError, TensorSpec, parse_infer_request
        f32 = np.dtype("<f4")
        model = ModelSpec(
            name="m",
            version="1",
            inputs=(TensorSpec("x", "FP32", f32, ("batch", 4)),),
            outputs=(TensorSpec("y", "FP32", f32, ("batch", 3)),),
            max_batch_size=8,
        )
        def peak_kb():  # this process image's own peak (ru_maxrss would carry pytest's across exec)
            with open("/proc/self/status") as status:
                return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
        body = open({str(body)!r}, "rb").read()
        before = peak_kb()
        print(before // 1024)
        try:
            parse_infer_request(body, None, model, 8)
        except ProtocolError as exc:
            print(exc.message)
        print((peak_kb() - before) // 1024)
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=120
    )
    base_mb, got, grown_mb = out.stdout.strip().splitlines()
    assert got == message
    # The peak before parsing must be low, or the growth would hide below it.
    assert int(base_mb) < 150, f"the child started at {base_mb} MB"
    assert int(grown_mb) < 200, f"peak memory grew by {grown_mb} MB"


# --------------------------------------------------------------------------- hostile JSON


def test_malformed_json_keeps_the_standard_librarys_message() -> None:
    body = b'{"inputs": ['
    try:
        json.loads(body)
    except json.JSONDecodeError as exc:
        expected = str(exc)
    assert _refused(body) == f"request body is not valid JSON ({expected})"


@pytest.mark.parametrize("depth", [1_100, 100_000])
def test_deep_nesting_is_refused_without_harm(depth: int) -> None:
    head = b'{"inputs":[{"name":"x","shape":[1,4],"datatype":"FP32","data":'
    body = head + b"[" * depth + b"]" * depth + b"}]}"
    assert "request body is not valid JSON" in _refused(body)


def test_deep_nesting_inside_data_is_named() -> None:
    # 500 levels parse (within both parsers' limits); NumPy stops at 64 dimensions.
    data: Any = [1.0]
    for _ in range(500):
        data = [data]
    message = _refused(_body(data))
    assert message.startswith("input 'x'.data is not a regular array of numbers") and "dimension" in message


@pytest.mark.parametrize(
    ("values", "dtype", "datatype", "message"),
    [
        ([2**70, 1, 2, 3], I64, "INT64", "outside the range of INT64"),
        ([2**64 - 1, 1, 2, 3], I64, "INT64", "outside the range of INT64"),
        ([-(2**63) - 1, 1, 2, 3], I64, "INT64", "outside the range of INT64"),
        # The cast used to wrap these around silently.
        ([2**40, 1, 2, 3], I32, "INT32", "outside the range of INT32 [-2147483648, 2147483647]"),
        ([-1, 2**31, 2, 3], I32, "INT32", "outside the range of INT32"),
    ],
)
def test_integers_a_tensor_cannot_hold_are_refused_by_name(
    values: list[int], dtype: np.dtype[Any], datatype: str, message: str
) -> None:
    got = _refused(_body(values, datatype=datatype), _model(dtype=dtype, datatype=datatype))
    assert got.startswith("input 'x'.data holds integers") and message in got


def test_a_huge_integer_in_a_float_tensor_is_a_float() -> None:
    got = parse_infer_request(_body([2**70, 1, 2, 3]), None, _model(), 8).inputs["x"]
    assert got[0, 0] == np.float32(2**70)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ("1,2,3,4", "input 'x'.data must be a JSON array"),
        ({"values": [1, 2, 3, 4]}, "input 'x'.data must be a JSON array"),
        (["1", "2", "3", "4"], "holds strings, not numbers of datatype FP32"),
        ([{"a": 1}, 2, 3, 4], "holds ragged or mixed values"),
        ([None, 2, 3, 4], "holds ragged or mixed values"),
        ([[1, 2], [3]], "is not a regular array of numbers"),
    ],
)
def test_data_of_the_wrong_type_is_named(data: Any, message: str) -> None:
    assert message in _refused(_body(data))


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b'{"inputs":[{"name":"x","shape":[1.0,4],"datatype":"FP32","data":[1,2,3,4]}]}', "shape must be"),
        (b'{"inputs":[{"name":"x","shape":[true,4],"datatype":"FP32","data":[1,2,3,4]}]}', "shape must be"),
        (
            b'{"inputs":[{"name":7,"shape":[1,4],"datatype":"FP32","data":[1,2,3,4]}]}',
            "name must be a string",
        ),
        (b'{"id":5,"inputs":[]}', "id must be a string"),
        (b'{"inputs":{"x":[1,2,3,4]}}', "inputs must be a non-empty list"),
        (b'"inputs"', "request body must be a JSON object"),
        (b"null", "request body must be a JSON object"),
    ],
)
def test_wrong_types_elsewhere_are_named(body: bytes, message: str) -> None:
    assert message in _refused(body)


@pytest.mark.parametrize(
    "body",
    [
        b'{"inputs":[{"name":"x\xff","shape":[1,4],"datatype":"FP32","data":[1,2,3,4]}]}',  # not UTF-8
        b'{"inputs":[{"name":"x\xed\xa0\x80","shape":[1,4],"datatype":"FP32","data":[1,2,3,4]}]}',  # CESU
        _body([1, 2, 3, 4]).decode().encode("utf-16"),
        _body([1, 2, 3, 4]).decode().encode("utf-32"),
        b"\xef\xbb\xbf" + _body([1, 2, 3, 4]),  # a byte-order mark
    ],
    ids=["latin1-byte", "encoded-surrogate", "utf-16", "utf-32", "bom"],
)
def test_a_body_that_is_not_plain_utf8_json_is_refused(body: bytes) -> None:
    assert "request body is not valid JSON" in _refused(body)


def test_a_binary_requests_header_is_parsed_the_same_way() -> None:
    raw = np.arange(4, dtype=F32).tobytes()
    head = b'{"inputs":[{"name":"x","shape":[1,4],"datatype":"FP32","parameters":{"binary_data_size":16}}]}'
    got = parse_infer_request(head + raw, str(len(head)), _model(), 8).inputs["x"]
    np.testing.assert_array_equal(got, np.arange(4, dtype=F32).reshape(1, 4))
    bad = b"{\xff}"
    message = _refused(bad + raw, header_length=str(len(bad)))
    assert message.startswith("the JSON header (the first 3 bytes, per Inference-Header-Content-Length)")
    precheck_header(bad, _model(), 8)  # leaves it to the parse, which names it
    big = b'{"inputs":[{"name":"x","shape":[9,4],"datatype":"FP32","parameters":{"binary_data_size":144}}]}'
    with pytest.raises(ProtocolError, match="batch size 9 is above the maximum of 8"):
        precheck_header(big, _model(), 8)


# --------------------------------------------------------------------------- the response


def _request(request_id: str | None = "r") -> InferRequest:
    return InferRequest(request_id, {}, 1, [("y", False)])


@settings(max_examples=60, deadline=None, database=None)
@given(
    y=hnp.arrays(F32, st.tuples(st.integers(1, 8), st.just(3)), elements=st.floats(width=32, allow_nan=False))
)
def test_json_outputs_read_back_as_the_same_float32_values(y: np.ndarray) -> None:
    payload, header_length = encode_response(_model(), _request(), {"y": y})
    assert header_length is None
    doc, arrays = decode_infer_response(payload, None)
    assert doc["outputs"][0]["shape"] == list(y.shape)
    if np.isfinite(y).all():
        np.testing.assert_array_equal(arrays["y"], y)
    else:  # the standard library's tokens, read back by the standard library
        np.testing.assert_array_equal(np.asarray(doc["outputs"][0]["data"], F32).reshape(y.shape), y)


def test_nan_outputs_go_out_as_nan_tokens_not_null() -> None:
    y = np.array([[np.nan, np.inf, 1.5]], F32)
    payload, _ = encode_response(_model(), _request(), {"y": y})
    assert b"[NaN,Infinity,1.5]" in payload
    assert b"null" not in payload


def test_json_outputs_are_compact_and_strided_arrays_are_written_in_order() -> None:
    y = np.arange(12, dtype=F32).reshape(3, 4)[:, 1:]  # not contiguous
    payload, _ = encode_response(_model(), _request(None), {"y": y})
    assert payload == (
        b'{"model_name":"m","model_version":"1","outputs":[{"name":"y","datatype":"FP32","shape":[3,3],'
        b'"data":[1.0,2.0,3.0,5.0,6.0,7.0,9.0,10.0,11.0]}]}'
    )


# --------------------------------------------------------------------------- a real server


@pytest.fixture(scope="module")
def tiny_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Bundle, ServerProcess]]:
    built = make_bundle(tmp_path_factory.mktemp("bundle"))
    with running_server(built.path, built.public_key, tmp_path_factory.mktemp("logs")) as proc:
        yield built, proc


HOSTILE = [
    ("deep nesting", b'{"inputs":' + b"[" * 50_000 + b"]" * 50_000 + b"}", "not valid JSON"),
    (
        "huge integer",
        b'{"inputs":[{"name":"x","shape":[18446744073709551616,4],"datatype":"FP32","data":[1,2,3,4]}]}',
        "shape must be a list of integers",
    ),
    ("NaN", b'{"inputs":[{"name":"x","shape":[1,4],"datatype":"FP32","data":[NaN,1,2,3]}]}', "NaN or Inf"),
    ("strings", _body(["a", "b", "c", "d"]), "holds strings"),
    ("not UTF-8", b'{"inputs":[{"name":"\xff","shape":[1,4]}]}', "not valid JSON"),
]


@pytest.mark.parametrize(("case", "body", "message"), HOSTILE, ids=[h[0] for h in HOSTILE])
def test_the_server_answers_hostile_json_with_a_named_400_and_lives(
    tiny_server: tuple[Bundle, ServerProcess], case: str, body: bytes, message: str
) -> None:
    _, proc = tiny_server
    with proc.client() as c:
        response = c.post("/v2/models/tiny/infer", content=body, headers={"Content-Type": "application/json"})
        assert response.status_code == 400, f"{case}: {response.text}"
        assert message in response.json()["error"]
        assert c.get("/v2/health/ready").status_code == 200


def test_the_server_answers_json_with_the_models_own_numbers(
    tiny_server: tuple[Bundle, ServerProcess],
) -> None:
    built, proc = tiny_server
    x = np.random.default_rng(3).normal(size=(5, 4)).astype(F32)
    with proc.client() as c:
        response = c.post("/v2/models/tiny/infer", content=_body(x.reshape(-1).tolist(), shape=[5, 4]))
    assert response.status_code == 200, response.text
    _, arrays = decode_infer_response(response.content, None)
    file = next(v["file"] for v in built.manifest["variants"] if v["name"] == "int8")
    session = ort.InferenceSession(str(Path(built.path) / file), providers=["CPUExecutionProvider"])
    np.testing.assert_array_equal(arrays["logits"], session.run(None, {"x": x})[0])
    assert math.prod(arrays["logits"].shape) == 15
