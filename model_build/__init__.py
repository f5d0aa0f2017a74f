"""The prebuild: PyTorch model -> ONNX -> INT8 (-> TensorRT) -> signed bundle.

It writes what the ``contract`` package defines (the manifest, signatures, the quality set) and reads the
hardware table from there. Nothing outside the prebuild imports this package: servers and devices get
``contract`` alone. Stages import torch and onnx inside their functions, so an up-to-date build answers
without them.
"""
