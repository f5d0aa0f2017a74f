"""The Open Inference Protocol (KServe v2) REST body: parsing, validation and encoding.

Pure functions over bytes and NumPy arrays, with no HTTP framework in sight, so
the rules are testable on their own. Both tensor encodings are handled:

* JSON: every tensor carries ``data`` (flat or nested, row-major).
* The binary tensor data extension: the request header
  ``Inference-Header-Content-Length: N`` says the first N bytes of the body are
  the JSON header; an input with ``parameters.binary_data_size`` has its raw
  little-endian bytes in the rest of the body, in the order the inputs are
  listed. Outputs are sent raw when the request asks for it, per output with
  ``parameters.binary_data: true`` or for all with the request parameter
  ``binary_data_output: true``.

Every problem with a request raises :class:`ProtocolError` carrying a 4xx status
and a message that names the offending field.

JSON bodies are parsed by simdjson into its lazy document (:func:`parse_document`): the request's fields
become Python values, but an input's ``data`` stays in simdjson's tape until its head (name, datatype,
shape, budget) has passed the checks, and is then read into NumPy in one C call, with no Python number or
list made (:func:`_json_data`). The values are read in row-major order whatever their nesting, as Triton
reads them; their count must match the shape. Whatever that fast read can't take exactly (booleans,
strings, nulls, a count that does not match, integers a 64-bit buffer can't hold) goes the general way:
the ``data`` becomes Python lists and one NumPy call, which words the problem. A body simdjson refuses
(the ``NaN`` and ``Infinity`` tokens, integers beyond 64 bits, lone surrogate escapes, a byte-order mark,
a syntax error) is parsed by :func:`loads`: orjson, then :func:`json.loads`, which keeps those tokens (a
model that allows non-finite inputs takes them) and the standard library's own wording of a syntax error.
JSON outputs are written by orjson straight from the arrays (``OPT_SERIALIZE_NUMPY``), never through
``tolist()``; outputs holding NaN or Inf, and anything else orjson won't write, go out through
:func:`json.dumps`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import orjson
import simdjson

from contract.codec import WIRE_DTYPES
from contract.manifest import Buckets, TensorEntry, bucket_top

# Manifest dtype -> (v2 datatype, NumPy dtype). The models in bundles take these two.
DATATYPES = sorted({dt for dt, _ in WIRE_DTYPES.values()} | {"BYTES", "UINT16", "UINT32", "UINT64", "INT16"})
BATCH_AXIS = "batch"
HEADER_LENGTH = "inference-header-content-length"
NO_INPUTS = "inputs must be a non-empty list of tensors"


class ProtocolError(Exception):
    """A request the server refuses; ``status`` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


@dataclass(frozen=True)
class TensorSpec:
    """One model input or output as the manifest describes it."""

    name: str
    datatype: str
    dtype: np.dtype[Any]
    shape: tuple[int | str, ...]
    allow_nonfinite: bool = True

    def metadata(self) -> dict[str, Any]:
        """The v2 model-metadata entry: unknown dimensions are -1."""
        return {
            "name": self.name,
            "datatype": self.datatype,
            "shape": [d if isinstance(d, int) else -1 for d in self.shape],
        }


def tensor_spec(entry: TensorEntry, where: str) -> TensorSpec:
    """Build a :class:`TensorSpec` from a manifest ``inputs``/``outputs`` entry.

    Raises:
        ValueError: naming the manifest entry with the unsupported dtype.
    """
    if entry.dtype not in WIRE_DTYPES:
        raise ValueError(
            f"manifest {where} {entry.name!r}: dtype {entry.dtype!r} is not one of {sorted(WIRE_DTYPES)}"
        )
    datatype, np_dtype = WIRE_DTYPES[entry.dtype]
    return TensorSpec(entry.name, datatype, np_dtype, tuple(entry.shape), entry.allow_nonfinite)


@dataclass(frozen=True)
class ModelSpec:
    """What the protocol layer needs to know about the served model."""

    name: str
    version: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    max_batch_size: int
    platform: str = "onnxruntime_onnx"
    parameters: Mapping[str, str] = field(default_factory=dict)
    """What was chosen for this machine (variant, device and CPU class, why): metadata ``parameters``."""
    axis_max: Mapping[str, int] = field(default_factory=dict)
    """The largest size of each named axis but ``batch`` (manifest ``axes``, or ``--axis-max``)."""
    max_request_elements: int = 0
    """The most tensor elements one request may carry, its inputs together (0: no budget)."""
    padding: Padding | None = None
    """Length bucketing of the model's inputs (manifest ``serving.buckets``), or None."""

    def sample_elements(self) -> int:
        """Elements of one sample (one row of every input) with each named axis at its maximum."""
        return sum(
            math.prod(d if isinstance(d, int) else self.axis_max.get(d, 1) for d in t.shape[1:])
            for t in self.inputs
        )

    def metadata(self) -> dict[str, Any]:
        """The v2 model-metadata response body (``parameters`` is a KServe v2 extension field)."""
        body: dict[str, Any] = {
            "name": self.name,
            "versions": [self.version],
            "platform": self.platform,
            "inputs": [t.metadata() for t in self.inputs],
            "outputs": [t.metadata() for t in self.outputs],
        }
        if self.parameters:
            body["parameters"] = dict(self.parameters)
        return body


@dataclass(frozen=True)
class Padding:
    """Length bucketing (the manifest's ``serving.buckets``): requests whose lengths along ``axis`` fall
    into the same bucket batch together, each padded to the batch's longest with the build-proven values.

    The outputs carry no bucketed axis (the contract refuses buckets otherwise), so nothing is cut back.
    """

    axis: str
    lengths: tuple[int, ...]
    positions: Mapping[str, int]
    """Input name → the index of ``axis`` in its shape."""
    pad_values: Mapping[str, Any]
    """Input name → its padding, as a scalar of the input's dtype."""

    @classmethod
    def from_manifest(cls, buckets: Buckets, inputs: Sequence[TensorSpec]) -> Padding:
        """The padding of the served model's inputs."""
        positions = {t.name: t.shape.index(buckets.axis) for t in inputs if buckets.axis in t.shape[1:]}
        values = {t.name: t.dtype.type(buckets.pad_values[t.name]) for t in inputs if t.name in positions}
        return cls(buckets.axis, tuple(buckets.lengths), positions, values)

    def length(self, inputs: Mapping[str, np.ndarray]) -> int:
        """The request's length along the axis (its inputs agree on it: one named axis, one size)."""
        name, position = next(iter(self.positions.items()))
        return int(inputs[name].shape[position])

    def bucket(self, length: int) -> int:
        """The top of the bucket ``length`` falls into."""
        return bucket_top(self.lengths, length)

    def signature(self, inputs: Mapping[str, np.ndarray]) -> tuple[Any, ...]:
        """Every input's shape but the batch axis, with the bucketed axis replaced by its bucket."""
        top = self.bucket(self.length(inputs))
        shapes = []
        for name, arr in sorted(inputs.items()):
            shape = list(arr.shape)
            if name in self.positions:
                shape[self.positions[name]] = top
            shapes.append((name, tuple(shape[1:])))
        return ("bucketed", *shapes)

    def pad(self, name: str, arr: np.ndarray, length: int) -> np.ndarray:
        """``arr`` padded at the end of the axis to ``length`` (unchanged when it is that long)."""
        position = self.positions.get(name)
        if position is None or arr.shape[position] == length:
            return arr
        widths = [(0, 0)] * arr.ndim
        widths[position] = (0, length - arr.shape[position])
        return np.pad(arr, widths, constant_values=self.pad_values[name])


@dataclass
class InferRequest:
    """A parsed and validated inference request."""

    id: str | None
    inputs: dict[str, np.ndarray]
    batch_size: int
    outputs: list[tuple[str, bool]]  # (output name, send as binary)
    elements: int = 0
    """Tensor elements of all inputs together (what the memory budget of a batch is reckoned in)."""
    padding: Padding | None = None
    """How this request batches with requests of other lengths (the model's buckets), or None."""

    def signature(self) -> tuple[Any, ...]:
        """Requests with equal signatures can be stacked into one batch."""
        if self.padding is not None:
            return self.padding.signature(self.inputs)
        return tuple((name, arr.shape[1:]) for name, arr in sorted(self.inputs.items()))

    def batched_elements(self) -> int:
        """Elements once padded to the top of its bucket (the most a batch may pad it to)."""
        if self.padding is None:
            return self.elements
        length = self.padding.length(self.inputs)
        return -(-self.elements * self.padding.bucket(length) // max(1, length))


def loads(text: bytes) -> Any:
    """Parse one JSON document from UTF-8 bytes: orjson, and the standard library for what orjson refuses.

    Raises:
        ValueError: the text is not JSON (:class:`json.JSONDecodeError`, the standard library's message).
        UnicodeDecodeError: the text is not UTF-8.
        RecursionError: the nesting is deeper than the standard library's parser goes.
    """
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        pass
    # JSON bodies are UTF-8 (RFC 8259); json.loads on bytes would also guess UTF-16 and UTF-32.
    return json.loads(text.decode("utf-8"))


_UTF8_BOM = b"\xef\xbb\xbf"
_LAZY = frozenset({"inputs", "outputs"})
"""Top-level fields left in simdjson's tape, walked one entry at a time, no further than the first refusal."""


def parse_document(text: bytes) -> Any:
    """Parse a request's JSON: a dict whose ``inputs`` and ``outputs`` stay lazy, or what :func:`loads` gives.

    Every other field is a plain Python value (duplicate keys: the last wins, as with :func:`json.loads`).
    ``inputs`` and ``outputs`` stay :class:`simdjson.Array` (when they are arrays), walked one entry at a
    time (:func:`tensor_entries`, :func:`parse_outputs`), so a body of a million empty inputs or repeated
    outputs costs simdjson's tape (~10 bytes a token), not a million dicts.

    Raises:
        ValueError, UnicodeDecodeError, RecursionError: as :func:`loads` (the body is not JSON).
    """
    if text.startswith(_UTF8_BOM):
        return loads(text)  # simdjson skips a byte-order mark; RFC 8259 parsers may refuse it, and we do
    try:
        doc = simdjson.Parser().parse(text)
    except (ValueError, RuntimeError):
        # NaN/Infinity tokens, integers beyond 64 bits, lone surrogates, depth, syntax: the general path.
        return loads(text)
    if not isinstance(doc, simdjson.Object):
        return _plain(doc)
    fields = _fields(doc)
    if fields is None:
        return loads(text)
    return {key: doc[key] if key in _LAZY else _plain(doc[key]) for key in fields}


def _fields(obj: simdjson.Object) -> list[str] | None:
    """The object's keys, or None when one repeats (simdjson's lookup finds the first; JSON's is the last)."""
    keys = list(obj.keys())
    return keys if len(set(keys)) == len(keys) else None


def _plain(value: Any) -> Any:
    """A simdjson value as Python (dicts, lists; a repeated key keeps its last value); scalars already are."""
    if isinstance(value, simdjson.Object):
        return value.as_dict()
    if isinstance(value, simdjson.Array):
        return value.as_list()
    return value


def tensor_entries(raw_inputs: Any) -> Iterable[Any]:
    """The request's ``inputs``, one at a time: dicts whose ``data`` is still simdjson's, or as given."""
    if not isinstance(raw_inputs, simdjson.Array):
        yield from raw_inputs
        return
    for item in raw_inputs:
        if isinstance(item, simdjson.Object) and (fields := _fields(item)) is not None:
            yield {key: item[key] if key == "data" else _plain(item[key]) for key in fields}
        else:
            yield _plain(item)  # not an object, or a key given twice: all of it as Python, as before


def dumps(doc: Mapping[str, Any], arrays: Sequence[np.ndarray] = ()) -> bytes:
    """Write a response document compactly; the NumPy ``arrays`` in it are written without a Python list.

    Float arrays holding NaN or Inf go out as the JSON extension tokens ``NaN`` and ``Infinity``, as the
    standard library writes them (orjson would write ``null``, which a client can't tell from a gap).
    """
    if not any(_nonfinite(arr) for arr in arrays):
        try:
            return orjson.dumps(doc, option=orjson.OPT_SERIALIZE_NUMPY)
        except orjson.JSONEncodeError:
            pass  # a string with a lone surrogate (an echoed id), a dtype orjson does not write
    return json.dumps(doc, separators=(",", ":"), default=_tolist).encode()


def _nonfinite(arr: np.ndarray) -> bool:
    return arr.dtype.kind in "fc" and not bool(np.isfinite(arr).all())


def _tolist(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def _object(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ProtocolError(f"{where} must be a JSON object")
    return value


def _dims(shape: Sequence[int]) -> str:
    """A shape for a message: a hostile one of a million dimensions is cut, not echoed whole."""
    if len(shape) <= 8:
        return str(list(shape))
    return f"[{', '.join(map(str, shape[:8]))}, ... ({len(shape)} dimensions)]"


def _shape(
    tensor: Mapping[str, Any], spec: TensorSpec, where: str, max_batch: int, axis_max: Mapping[str, int]
) -> tuple[int, ...]:
    shape = tensor.get("shape")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape):
        raise ProtocolError(f"{where}.shape must be a list of integers")
    if len(shape) != len(spec.shape):
        raise ProtocolError(
            f"{where}: shape {_dims(shape)} has rank {len(shape)}, input {spec.name!r} expects rank "
            f"{len(spec.shape)} {list(spec.shape)}"
        )
    for got, want in zip(shape, spec.shape, strict=True):
        if got < 1:
            raise ProtocolError(f"{where}: shape {shape} has a dimension below 1")
        if isinstance(want, int) and got != want:
            raise ProtocolError(
                f"{where}: shape {shape} does not match {list(spec.shape)} of input {spec.name!r}"
            )
        if isinstance(want, str) and want in axis_max and got > axis_max[want]:
            raise ProtocolError(f"{where}: axis {want!r} is {got}, above its maximum of {axis_max[want]}")
    if spec.shape and spec.shape[0] == BATCH_AXIS and shape[0] > max_batch:
        raise ProtocolError(f"{where}: batch size {shape[0]} is above the maximum of {max_batch}")
    return tuple(shape)


# NumPy kind of a tensor -> the simdjson buffer type that holds its JSON numbers exactly, and its dtype.
_BUFFERS: dict[str, tuple[Literal["d", "i", "u"], type[np.generic]]] = {
    "f": ("d", np.float64),
    "i": ("i", np.int64),
    "u": ("u", np.uint64),
}


def _json_numbers(data: simdjson.Array, spec: TensorSpec, count: int, where: str) -> np.ndarray | None:
    """``data``'s numbers straight from simdjson's tape, flattened, or None to take the general path."""
    if spec.dtype.kind not in _BUFFERS:
        return None
    code, dtype = _BUFFERS[spec.dtype.kind]
    try:
        flat = np.frombuffer(data.as_buffer(of_type=code), dtype=dtype)
    except (TypeError, ValueError):
        return None  # not all numbers of that type: the general path words it
    if flat.size != count:
        return None
    if spec.dtype.kind in "iu":
        check_int_range(flat, spec, f"{where}.data")
    return flat.astype(spec.dtype)


def _json_data(data: Any, spec: TensorSpec, shape: tuple[int, ...], where: str) -> np.ndarray:
    if isinstance(data, simdjson.Array):
        fast = _json_numbers(data, spec, math.prod(shape), where)
        if fast is not None:
            return fast.reshape(shape)
        data = data.as_list()
    if not isinstance(data, list):
        raise ProtocolError(f"{where}.data must be a JSON array")
    try:
        # One C pass over the parsed list: no Python loop touches the numbers.
        arr = np.asarray(data)
    except (ValueError, OverflowError) as exc:
        raise ProtocolError(f"{where}.data is not a regular array of numbers ({exc})") from exc
    if spec.dtype.kind in "iu" and arr.size:
        check_int_range(arr, spec, f"{where}.data")
    kinds = "biuf" if spec.dtype.kind == "f" else "biu"
    if arr.size and arr.dtype.kind not in kinds:
        what = {"U": "strings", "S": "strings", "O": "ragged or mixed values", "f": "fractional numbers"}
        raise ProtocolError(
            f"{where}.data holds {what.get(arr.dtype.kind, arr.dtype.name)}, "
            f"not numbers of datatype {spec.datatype}"
        )
    count = math.prod(shape)
    if arr.size != count:
        raise ProtocolError(f"{where}.data has {arr.size} elements, shape {list(shape)} needs {count}")
    try:
        return arr.astype(spec.dtype, casting="unsafe").reshape(shape)
    except (ValueError, OverflowError) as exc:
        raise ProtocolError(f"{where}.data cannot be converted to {spec.datatype} ({exc})") from exc


def check_int_range(arr: np.ndarray, spec: TensorSpec, what: str) -> None:
    """Refuse integers an integer tensor can't hold, where the cast would wrap them around silently.

    ``what`` names the values in the message (``input 'ids'.data``, or a gRPC ``contents`` field).
    """
    info = np.iinfo(spec.dtype)
    low: Any
    high: Any
    if arr.dtype.kind == "O":
        # Integers beyond 64 bits from the standard library's parser; anything else is worded later.
        values = list(arr.flat)
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            return
        low, high = min(values), max(values)
    elif arr.dtype.kind == "f":
        # orjson reads an integer beyond 64 bits as a float: an integral float out of range is one of those.
        if not (np.isfinite(arr).all() and (np.floor(arr) == arr).all()):
            return
        low, high = float(arr.min()), float(arr.max())
        if max(-low, high) >= 2.0**63:  # rounded from beyond 64 bits: -2**63 - 1 reads as -2**63
            low = -math.inf
    elif arr.dtype.kind in "iu":
        low, high = int(arr.min()), int(arr.max())
    else:
        return
    if low < info.min or high > info.max:
        raise ProtocolError(
            f"{what} holds integers outside the range of {spec.datatype} [{info.min}, {info.max}]"
        )


def split_body(body: bytes | memoryview, header_length: str | None) -> tuple[bytes, memoryview]:
    """Split a request body into its JSON header and binary tail (a view: tensors are not copied).

    Raises:
        ProtocolError: the header length is not an integer or exceeds the body.
    """
    if header_length is None:
        return bytes(body), memoryview(b"")
    # ASCII digits only: int() would also take ' +12', '1_2' and other scripts' digits.
    if not (header_length.isascii() and header_length.isdigit()) or len(header_length) > 12:
        raise ProtocolError(
            f"Inference-Header-Content-Length {header_length[:40]!r} is not a decimal integer "
            "(ASCII digits only)"
        )
    length = int(header_length)
    if length > len(body):
        raise ProtocolError(
            f"Inference-Header-Content-Length {length} does not fit a body of {len(body)} bytes"
        )
    return bytes(body[:length]), memoryview(body)[length:]


@dataclass
class Cursor:
    """Walks the binary tail of a REST request; remembers the named axes and the elements seen so far."""

    binary: memoryview
    offset: int = 0
    axes: dict[str, tuple[int, str]] = field(default_factory=dict)
    elements: int = 0

    def check_axes(self, name: str, shape: tuple[int, ...], spec: TensorSpec) -> None:
        for dim, axis in zip(shape, spec.shape, strict=True):
            if isinstance(axis, str):
                seen = self.axes.setdefault(axis, (dim, name))
                if seen[0] != dim:
                    raise ProtocolError(
                        f"input {name!r}: axis {axis!r} is {dim} but {seen[0]} in input {seen[1]!r}"
                    )

    def take(self, size: int, spec: TensorSpec, shape: tuple[int, ...], where: str) -> np.ndarray:
        if self.offset + size > len(self.binary):
            raise ProtocolError(
                f"{where}: binary data ends at byte {self.offset + size} but the body has only "
                f"{len(self.binary)} bytes after the JSON header (check Inference-Header-Content-Length)"
            )
        count = math.prod(shape)
        arr = np.frombuffer(self.binary, dtype=spec.dtype, count=count, offset=self.offset).reshape(shape)
        self.offset += size
        return arr


def _check_head(
    index: int,
    raw: Any,
    specs: Mapping[str, TensorSpec],
    *,
    cursor: Cursor,
    model: ModelSpec,
    max_batch: int,
) -> tuple[dict[str, Any], TensorSpec, tuple[int, ...]]:
    """An input's name, datatype, shape, axis bounds and the request's element budget (no data read)."""
    tensor = _object(raw, f"inputs[{index}]")
    name = tensor.get("name")
    if not isinstance(name, str):
        raise ProtocolError(f"inputs[{index}].name must be a string")
    where = f"input {name!r}"
    if name not in specs:
        raise ProtocolError(f"{where} is not an input of model {model.name!r} (inputs: {', '.join(specs)})")
    spec = specs[name]
    if tensor.get("datatype") != spec.datatype:
        raise ProtocolError(
            f"{where}: datatype {tensor.get('datatype')!r} is wrong, expected {spec.datatype!r}"
        )
    shape = _shape(tensor, spec, where, max_batch, model.axis_max)
    cursor.check_axes(name, shape, spec)
    # Checked before any tensor is built: a request within the body limit can't ask for more.
    cursor.elements += math.prod(shape)
    if model.max_request_elements and cursor.elements > model.max_request_elements:
        raise ProtocolError(
            f"{where}: the request's inputs hold {cursor.elements:,} elements so far, above the "
            f"per-request budget of {model.max_request_elements:,} (--max-request-elements)"
        )
    return tensor, spec, shape


TensorReader = Callable[[int, Mapping[str, Any], TensorSpec, tuple[int, ...], str], np.ndarray]
"""Reads one input's values once its head has passed the checks: ``(index, tensor, spec, shape, where)`` → an
array of the spec's dtype and ``shape``, or :class:`ProtocolError` naming ``where``. The REST body and the
gRPC message each have one; the checks around it are the same for both (:func:`parse_inputs`)."""


def _body_tensor(
    tensor: Mapping[str, Any], spec: TensorSpec, shape: tuple[int, ...], where: str, cursor: Cursor
) -> np.ndarray:
    """An input's values from a REST body: JSON ``data``, or its bytes of the binary tail."""
    tparams = _object(tensor.get("parameters", {}), f"{where}.parameters")
    size = tparams.get("binary_data_size")
    if size is not None:
        if "data" in tensor:
            raise ProtocolError(f"{where} has both data and parameters.binary_data_size")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise ProtocolError(f"{where}.parameters.binary_data_size must be a non-negative integer")
        expected = math.prod(shape) * spec.dtype.itemsize
        if size != expected:
            raise ProtocolError(
                f"{where}: binary_data_size {size} != {expected} bytes "
                f"for shape {list(shape)} {spec.datatype}"
            )
        return cursor.take(size, spec, shape, where)
    if "data" in tensor:
        return _json_data(tensor["data"], spec, shape, where)
    raise ProtocolError(f"{where} has neither data nor parameters.binary_data_size")


def parse_inputs(
    raw_inputs: Iterable[Any], read: TensorReader, model: ModelSpec, max_batch: int, cursor: Cursor
) -> dict[str, np.ndarray]:
    """Check every input's head (name, datatype, shape, axis bounds, element budget), then read its values.

    Both transports go through here: the REST body (:func:`parse_infer_request`) and the gRPC message
    (``serving.grpc_api``), each with its own ``read``. The element budget is checked before ``read``
    builds any tensor. ``raw_inputs`` is walked once, in order, and no further than the first input that
    is refused (a message of a million inputs costs one).

    Raises:
        ProtocolError: naming the input and the field that is wrong.
    """
    specs = {t.name: t for t in model.inputs}
    inputs: dict[str, np.ndarray] = {}
    for index, raw in enumerate(raw_inputs):
        tensor, spec, shape = _check_head(index, raw, specs, cursor=cursor, model=model, max_batch=max_batch)
        where = f"input {spec.name!r}"
        arr = read(index, tensor, spec, shape, where)
        if spec.dtype.kind == "f" and not spec.allow_nonfinite and not np.isfinite(arr).all():
            raise ProtocolError(f"{where} contains NaN or Inf, which this model does not accept")
        if spec.name in inputs:
            raise ProtocolError(f"input {spec.name!r} is given twice")
        inputs[spec.name] = arr
    if not inputs:
        raise ProtocolError(NO_INPUTS)
    return inputs


def complete_request(
    request_id: str | None,
    inputs: dict[str, np.ndarray],
    *,
    cursor: Cursor,
    doc: Mapping[str, Any],
    params: Mapping[str, Any],
    model: ModelSpec,
) -> InferRequest:
    """The request, once every input of the model is there, with the outputs it asks for (both transports).

    Args:
        request_id: the request's ``id``.
        inputs: what :func:`parse_inputs` returned.
        cursor: the cursor it used (the named axes and elements it saw).
        doc: the request's ``outputs`` list, under that key, if it names its outputs.
        params: the request's ``parameters`` (``binary_data_output``).
        model: the served model.

    Raises:
        ProtocolError: an input of the model is missing, or an output is unknown.
    """
    missing = [t.name for t in model.inputs if t.name not in inputs]
    if missing:
        raise ProtocolError(f"missing input(s) {', '.join(map(repr, missing))} of model {model.name!r}")
    batch = cursor.axes.get(BATCH_AXIS, (1, ""))[0]
    return InferRequest(
        request_id, inputs, batch, parse_outputs(doc, params, model), cursor.elements, model.padding
    )


def parse_outputs(
    doc: Mapping[str, Any], params: Mapping[str, Any], model: ModelSpec
) -> list[tuple[str, bool]]:
    """The outputs to send, each with whether to send it raw (``doc["outputs"]``, else all of them).

    Raises:
        ProtocolError: naming the output, or the parameter that is not a boolean.
    """
    binary_all = params.get("binary_data_output", False)
    if not isinstance(binary_all, bool):
        raise ProtocolError("parameters.binary_data_output must be a boolean")
    out_names = [t.name for t in model.outputs]
    raw_outputs = doc.get("outputs")
    if raw_outputs is None:
        return [(n, binary_all) for n in out_names]
    if not isinstance(raw_outputs, list | simdjson.Array):
        raise ProtocolError("outputs must be a list")
    outputs: list[tuple[str, bool]] = []
    seen: set[str] = set()
    for index, raw in enumerate(raw_outputs):
        out = _object(_plain(raw), f"outputs[{index}]")
        name = out.get("name")
        if not isinstance(name, str) or name not in out_names:
            raise ProtocolError(
                f"outputs[{index}].name {name!r} is not an output of model {model.name!r} "
                f"(outputs: {', '.join(out_names)})"
            )
        # Each name once: a body of a million {"name": ...} would otherwise ask for a million copies of
        # the tensor in the answer (a 16 MB request, a response of gigabytes).
        if name in seen:
            raise ProtocolError(f"outputs[{index}].name {name!r} is asked for twice")
        seen.add(name)
        oparams = _object(out.get("parameters", {}), f"outputs[{index}].parameters")
        as_binary = oparams.get("binary_data", binary_all)
        if not isinstance(as_binary, bool):
            raise ProtocolError(f"outputs[{index}].parameters.binary_data must be a boolean")
        outputs.append((name, as_binary))
    return outputs


def precheck_header(header: bytes, model: ModelSpec, max_batch: int) -> None:
    """Check a binary request's JSON header before its tensor bytes arrive: shapes, axis bounds, budget.

    The HTTP layer calls it as soon as the first ``Inference-Header-Content-Length`` bytes are in, so a
    request for a million tokens is refused without buffering its 16 MB. Anything this can't judge
    (malformed JSON, unknown names) is left to :func:`parse_infer_request`, which reports it.

    Raises:
        ProtocolError: an input's shape, an axis bound or the element budget is exceeded.
    """
    try:
        doc = parse_document(header)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return
    raw_inputs = doc.get("inputs") if isinstance(doc, dict) else None
    if not isinstance(raw_inputs, list | simdjson.Array):
        return
    specs = {t.name: t for t in model.inputs}
    cursor = Cursor(memoryview(b""))
    for index, raw in enumerate(tensor_entries(raw_inputs)):
        if isinstance(raw, dict) and raw.get("name") in specs:
            _check_head(index, raw, specs, cursor=cursor, model=model, max_batch=max_batch)


def parse_infer_request(
    body: bytes | memoryview, header_length: str | None, model: ModelSpec, max_batch: int
) -> InferRequest:
    """Parse and validate an inference request body.

    Args:
        body: the raw request body.
        header_length: the ``Inference-Header-Content-Length`` header, if sent.
        model: the served model.
        max_batch: the largest batch one request may carry.

    Returns:
        The request with NumPy inputs of the model's dtypes and shapes.

    Raises:
        ProtocolError: with a message naming the field that is wrong.
    """
    header, binary = split_body(body, header_length)
    try:
        doc = parse_document(header)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        where = (
            "request body"
            if header_length is None
            else (f"the JSON header (the first {header_length} bytes, per Inference-Header-Content-Length)")
        )
        raise ProtocolError(f"{where} is not valid JSON ({exc})") from exc
    doc = _object(doc, "request body")
    request_id = doc.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise ProtocolError("id must be a string")
    params = _object(doc.get("parameters", {}), "parameters")
    raw_inputs = doc.get("inputs")
    if not isinstance(raw_inputs, list | simdjson.Array):
        raise ProtocolError(NO_INPUTS)

    cursor = Cursor(binary)
    inputs = parse_inputs(
        tensor_entries(raw_inputs),
        lambda _index, tensor, spec, shape, where: _body_tensor(tensor, spec, shape, where, cursor),
        model,
        max_batch,
        cursor,
    )
    if cursor.offset != len(binary):
        raise ProtocolError(
            f"body has {len(binary) - cursor.offset} bytes of binary data beyond those the inputs declare "
            "(check Inference-Header-Content-Length and binary_data_size)"
        )
    return complete_request(request_id, inputs, cursor=cursor, doc=doc, params=params, model=model)


def encode_response(
    model: ModelSpec, request: InferRequest, results: Mapping[str, np.ndarray]
) -> tuple[bytes, int | None]:
    """Encode an inference response.

    Returns:
        The body, and the JSON header length when binary outputs follow it
        (to send as ``Inference-Header-Content-Length``), else None.
    """
    by_name = {t.name: t for t in model.outputs}
    outputs: list[dict[str, Any]] = []
    buffers: list[bytes] = []
    as_json: list[np.ndarray] = []
    for name, as_binary in request.outputs:
        arr = results[name]
        spec = by_name[name]
        entry: dict[str, Any] = {"name": name, "datatype": spec.datatype, "shape": list(arr.shape)}
        if as_binary:
            raw = np.ascontiguousarray(arr, dtype=spec.dtype).tobytes()
            entry["parameters"] = {"binary_data_size": len(raw)}
            buffers.append(raw)
        else:
            entry["data"] = np.ascontiguousarray(arr).reshape(-1)
            as_json.append(entry["data"])
        outputs.append(entry)
    doc: dict[str, Any] = {"model_name": model.name, "model_version": model.version, "outputs": outputs}
    if request.id is not None:
        doc["id"] = request.id
    # NaN/Inf in outputs (possible only where inputs allow them) go out as the JSON extension tokens.
    header = dumps(doc, as_json)
    if not buffers:
        return header, None
    return header + b"".join(buffers), len(header)


def validate_outputs(model: ModelSpec, results: Mapping[str, np.ndarray]) -> None:
    """Check that a model run produced every declared output (an internal fault otherwise)."""
    missing = [t.name for t in model.outputs if t.name not in results]
    if missing:
        raise RuntimeError(f"model run did not produce output(s) {missing}")


def stack(requests: Sequence[InferRequest]) -> dict[str, np.ndarray]:
    """Concatenate the inputs of compatible requests along the batch axis.

    Requests of one length bucket are padded to the longest of them first (not to the bucket's top:
    the padding the build proved invisible, and no more of it than the batch needs).
    """
    if len(requests) == 1:
        return requests[0].inputs
    padding = requests[0].padding
    if padding is None:
        return {name: np.concatenate([r.inputs[name] for r in requests]) for name in requests[0].inputs}
    longest = max(padding.length(r.inputs) for r in requests)
    return {
        name: np.concatenate([padding.pad(name, r.inputs[name], longest) for r in requests])
        for name in requests[0].inputs
    }
