"""The OpenAPI 3.0 description of the server's endpoints, served at ``/openapi.json``.

The schemas follow the Open Inference Protocol's REST definitions. The binary
tensor data extension cannot be expressed in OpenAPI (a JSON header followed by
raw bytes, split by the ``Inference-Header-Content-Length`` header); it is
described in prose on the infer operation.
"""

from __future__ import annotations

from typing import Any

_ERROR = {"type": "object", "required": ["error"], "properties": {"error": {"type": "string"}}}
_DATATYPES = [
    "BOOL",
    "UINT8",
    "UINT16",
    "UINT32",
    "UINT64",
    "INT8",
    "INT16",
    "INT32",
    "INT64",
    "FP16",
    "FP32",
    "FP64",
    "BYTES",
]


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _error(description: str) -> dict[str, Any]:
    return _json({"$ref": "#/components/schemas/Error"}, description)


def openapi_document(model_name: str, model_version: str, token_required: bool = False) -> dict[str, Any]:
    """The OpenAPI document for a server that serves ``model_name`` at ``model_version``.

    With ``token_required``, every operation but the health checks declares the bearer scheme.
    """
    name_param = {
        "name": "name",
        "in": "path",
        "required": True,
        "description": f"The model name; this server serves {model_name!r}.",
        "schema": {"type": "string"},
        "example": model_name,
    }
    version_param = {
        "name": "version",
        "in": "path",
        "required": True,
        "description": f"The model version; this server serves {model_version!r}.",
        "schema": {"type": "string"},
        "example": model_version,
    }
    unauthorized = _error("A bearer token is configured and the request lacks it or has a wrong one.")

    def get(
        summary: str, ok: dict[str, Any], params: list[dict[str, Any]], extra: dict[str, Any]
    ) -> dict[str, Any]:
        responses = {"200": ok, "401": unauthorized, **extra}
        return {"get": {"summary": summary, "parameters": params, "responses": responses}}

    ready_schema = {"type": "object", "properties": {"ready": {"type": "boolean"}}}
    model_ready_schema = {
        "type": "object",
        "properties": {"name": {"type": "string"}, "ready": {"type": "boolean"}},
    }
    not_found = _error("Unknown model or version.")
    not_ready = _json(model_ready_schema, "Not ready (starting or shutting down).")

    infer_op = {
        "post": {
            "summary": "Run inference.",
            "description": (
                "Tensors are JSON (`data`, row-major, flat or nested) or use the binary tensor data "
                "extension: send `Inference-Header-Content-Length: N`, put the JSON header in the first N "
                "bytes and the raw little-endian tensor bytes after it, in input order, each input carrying "
                "`parameters.binary_data_size`. Ask for binary outputs with the request parameter "
                "`binary_data_output: true` or per output with `parameters.binary_data: true`; the response "
                "then carries `Inference-Header-Content-Length` too. Concurrent requests are batched."
            ),
            "parameters": [
                {
                    "name": "Inference-Header-Content-Length",
                    "in": "header",
                    "required": False,
                    "schema": {"type": "integer", "minimum": 0},
                },
            ],
            "requestBody": {
                "required": True,
                "content": {
                    "application/json": {"schema": {"$ref": "#/components/schemas/InferenceRequest"}}
                },
            },
            "responses": {
                "200": {
                    "description": "The outputs.",
                    "content": {
                        "application/json": {"schema": {"$ref": "#/components/schemas/InferenceResponse"}},
                        "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
                    },
                },
                "400": _error(
                    "The request is malformed or does not fit the model; the message names the field."
                ),
                "401": unauthorized,
                "404": not_found,
                "413": _error("The body is above the size limit."),
                "415": _error("Unsupported Content-Encoding."),
                "503": _error("Queue full, request timed out, or shutting down; see Retry-After."),
            },
        }
    }

    def infer_path(params: list[dict[str, Any]]) -> dict[str, Any]:
        op = {**infer_op["post"], "parameters": [*params, *infer_op["post"]["parameters"]]}
        return {"post": op}

    tensor_params = {
        "type": "object",
        "properties": {"binary_data_size": {"type": "integer", "minimum": 0}},
        "additionalProperties": True,
    }
    document: dict[str, Any] = {
        "openapi": "3.0.3",
        "info": {
            "title": "dualdeploy inference server (Open Inference Protocol v2, REST)",
            "version": model_version,
        },
        "paths": {
            "/v2/health/live": get("Liveness.", _json(ready_schema, "Live."), [], {}),
            "/v2/health/ready": get(
                "Readiness: ready once warm-up matched the golden outputs.",
                _json(ready_schema, "Ready."),
                [],
                {"503": _json(ready_schema, "Not ready.")},
            ),
            "/v2": get(
                "Server metadata.",
                _json({"$ref": "#/components/schemas/ServerMetadata"}, "Metadata."),
                [],
                {},
            ),
            "/v2/models/{name}": get(
                "Model metadata.",
                _json({"$ref": "#/components/schemas/ModelMetadata"}, "Metadata."),
                [name_param],
                {"404": not_found},
            ),
            "/v2/models/{name}/versions/{version}": get(
                "Model metadata.",
                _json({"$ref": "#/components/schemas/ModelMetadata"}, "Metadata."),
                [name_param, version_param],
                {"404": not_found},
            ),
            "/v2/models/{name}/ready": get(
                "Model readiness.",
                _json(model_ready_schema, "Ready."),
                [name_param],
                {"404": not_found, "503": not_ready},
            ),
            "/v2/models/{name}/versions/{version}/ready": get(
                "Model readiness.",
                _json(model_ready_schema, "Ready."),
                [name_param, version_param],
                {"404": not_found, "503": not_ready},
            ),
            "/v2/models/{name}/infer": infer_path([name_param]),
            "/v2/models/{name}/versions/{version}/infer": infer_path([name_param, version_param]),
            "/metrics": get(
                "Prometheus metrics (text exposition format).",
                {"description": "Metrics.", "content": {"text/plain": {"schema": {"type": "string"}}}},
                [],
                {},
            ),
            "/openapi.json": get(
                "This document.", _json({"type": "object"}, "OpenAPI 3.0 document."), [], {}
            ),
        },
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {
                "Error": _ERROR,
                "ServerMetadata": {
                    "type": "object",
                    "required": ["name", "version", "extensions"],
                    "properties": {
                        "name": {"type": "string"},
                        "version": {"type": "string"},
                        "extensions": {"type": "array", "items": {"type": "string"}},
                    },
                },
                "TensorMetadata": {
                    "type": "object",
                    "required": ["name", "datatype", "shape"],
                    "properties": {
                        "name": {"type": "string"},
                        "datatype": {"type": "string", "enum": _DATATYPES},
                        "shape": {"type": "array", "items": {"type": "integer"}},
                    },
                },
                "ModelMetadata": {
                    "type": "object",
                    "required": ["name", "platform", "inputs", "outputs"],
                    "properties": {
                        "name": {"type": "string"},
                        "versions": {"type": "array", "items": {"type": "string"}},
                        "platform": {"type": "string"},
                        "inputs": {"type": "array", "items": {"$ref": "#/components/schemas/TensorMetadata"}},
                        "outputs": {
                            "type": "array",
                            "items": {"$ref": "#/components/schemas/TensorMetadata"},
                        },
                    },
                },
                "RequestInput": {
                    "type": "object",
                    "required": ["name", "shape", "datatype"],
                    "properties": {
                        "name": {"type": "string"},
                        "shape": {"type": "array", "items": {"type": "integer", "minimum": 0}},
                        "datatype": {"type": "string", "enum": _DATATYPES},
                        "parameters": tensor_params,
                        "data": {"type": "array", "items": {}},
                    },
                },
                "RequestOutput": {
                    "type": "object",
                    "required": ["name"],
                    "properties": {
                        "name": {"type": "string"},
                        "parameters": {
                            "type": "object",
                            "properties": {"binary_data": {"type": "boolean"}},
                            "additionalProperties": True,
                        },
                    },
                },
                "InferenceRequest": {
                    "type": "object",
                    "required": ["inputs"],
                    "properties": {
                        "id": {"type": "string"},
                        "parameters": {
                            "type": "object",
                            "properties": {"binary_data_output": {"type": "boolean"}},
                            "additionalProperties": True,
                        },
                        "inputs": {"type": "array", "items": {"$ref": "#/components/schemas/RequestInput"}},
                        "outputs": {"type": "array", "items": {"$ref": "#/components/schemas/RequestOutput"}},
                    },
                },
                "InferenceResponse": {
                    "type": "object",
                    "required": ["model_name", "outputs"],
                    "properties": {
                        "model_name": {"type": "string"},
                        "model_version": {"type": "string"},
                        "id": {"type": "string"},
                        "outputs": {
                            "type": "array",
                            "items": {
                                "type": "object",
                                "required": ["name", "shape", "datatype"],
                                "properties": {
                                    "name": {"type": "string"},
                                    "shape": {"type": "array", "items": {"type": "integer"}},
                                    "datatype": {"type": "string", "enum": _DATATYPES},
                                    "parameters": tensor_params,
                                    "data": {"type": "array", "items": {}},
                                },
                            },
                        },
                    },
                },
            },
        },
    }
    if token_required:
        document["security"] = [{"bearer": []}]
        for path in ("/v2/health/live", "/v2/health/ready"):
            document["paths"][path]["get"]["security"] = []
    return document
