"""The inference server that both deploy modes run (Open Inference Protocol v2)."""
