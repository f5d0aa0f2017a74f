"""The prebuild: PyTorch model -> ONNX -> INT8 (-> TensorRT) -> signed bundle.

Importing this package must stay cheap: the server imports ``model_build.bundle``
and nothing else from here, so no module-level import of torch or onnx.
"""
