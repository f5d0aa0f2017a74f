"""The v2 binary tensor data extension: the dtype map, and the client side (encode a request, decode a
response).

The server's parsing lives in :mod:`serving.protocol`, which takes :data:`WIRE_DTYPES` from here; every
Python caller (the edge smoke test and health gate, the benchmark's load generator, the tests) encodes
with this module, so the wire format is written down once. Standard clients (``tritonclient.http``)
speak the same format. Depends on NumPy only.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

WIRE_DTYPES: dict[str, tuple[str, np.dtype[Any]]] = {
    "float32": ("FP32", np.dtype("<f4")),
    "float16": ("FP16", np.dtype("<f2")),
    "float64": ("FP64", np.dtype("<f8")),
    "int64": ("INT64", np.dtype("<i8")),
    "int32": ("INT32", np.dtype("<i4")),
    "int8": ("INT8", np.dtype("i1")),
    "uint8": ("UINT8", np.dtype("u1")),
    "bool": ("BOOL", np.dtype("?")),
}
"""Manifest dtype -> (v2 datatype, NumPy little-endian dtype): every tensor type the contract carries."""

_TO_WIRE: dict[np.dtype[Any], str] = {np_dtype: wire for wire, np_dtype in WIRE_DTYPES.values()}
_FROM_WIRE: dict[str, np.dtype[Any]] = {wire: np_dtype for wire, np_dtype in WIRE_DTYPES.values()}
HEADER_LENGTH = "Inference-Header-Content-Length"


def encode_infer_request(
    inputs: Mapping[str, np.ndarray],
    *,
    binary_outputs: bool = True,
    outputs: Sequence[Mapping[str, Any]] | None = None,
) -> tuple[bytes, dict[str, str]]:
    """Encode inputs as a v2 infer request body with every tensor sent raw.

    Args:
        inputs: input name → array, in the order they go on the wire.
        binary_outputs: ask for every output raw (``binary_data_output``).
        outputs: the request's ``outputs`` list, when the caller names them.

    Returns:
        The body and the headers to send with it.

    Raises:
        KeyError: an array's dtype has no v2 datatype.
    """
    header: dict[str, Any] = {
        "inputs": [
            {
                "name": name,
                "shape": list(array.shape),
                "datatype": _TO_WIRE[array.dtype],
                "parameters": {"binary_data_size": array.nbytes},
            }
            for name, array in inputs.items()
        ],
    }
    if outputs is not None:
        header["outputs"] = [dict(o) for o in outputs]
    if binary_outputs:
        header["parameters"] = {"binary_data_output": True}
    head = json.dumps(header).encode()
    body = head + b"".join(np.ascontiguousarray(a).tobytes() for a in inputs.values())
    return body, {HEADER_LENGTH: str(len(head)), "Content-Type": "application/octet-stream"}


def decode_infer_response(
    body: bytes, header_length: int | str | None
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Split a v2 infer response into its JSON document and NumPy outputs.

    Args:
        body: the response body.
        header_length: the response's ``Inference-Header-Content-Length`` (None: all JSON).

    Returns:
        The JSON document, and output name → array (raw or JSON ``data``, whichever came).
    """
    length = len(body) if header_length is None else int(header_length)
    doc = json.loads(body[:length])
    offset = length
    arrays: dict[str, np.ndarray] = {}
    for out in doc["outputs"]:
        dtype = _FROM_WIRE[out["datatype"]]
        # Some servers (KServe, MLServer) write "parameters": null.
        size = (out.get("parameters") or {}).get("binary_data_size")
        if size is None:
            arrays[out["name"]] = np.asarray(out["data"], dtype).reshape(out["shape"])
            continue
        arrays[out["name"]] = np.frombuffer(body, dtype, count=size // dtype.itemsize, offset=offset).reshape(
            out["shape"]
        )
        offset += size
    return doc, arrays
