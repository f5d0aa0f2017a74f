"""The inference server that both deploy modes run (Open Inference Protocol v2)."""

__version__ = "0.1.0"
