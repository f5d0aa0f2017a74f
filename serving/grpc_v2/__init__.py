"""KServe's v2 gRPC API (``inference.GRPCInferenceService``): its .proto and the code protoc generates.

``grpc_predict_v2.proto`` is KServe's, under the Apache License 2.0 (its header names the source and the
licence). ``grpc_predict_v2_pb2.py``, ``.pyi`` and ``_pb2_grpc.py`` are generated from it by
``make grpc-stubs`` and committed, so the server needs no code generator, only ``grpcio`` and
``protobuf`` (pinned in serving/requirements.txt); ruff and mypy leave them alone (pyproject.toml).

Import them in the server process only. Triton's client (``tritonclient.grpc``) registers the same
``inference.*`` message names in protobuf's default descriptor pool, and a process that imports both fails
at the second import with ``duplicate symbol 'inference.ServerLiveRequest'``. The tests therefore talk to
a server process and never import this package, and ``serving.server`` imports it only with
``--grpc-port`` (a test checks that).
"""
