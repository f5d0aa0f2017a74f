"""Tiny real models for the prebuild tests (seconds to build, real ONNX, real ONNX Runtime)."""
