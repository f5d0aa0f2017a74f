"""The contract both deploy modes share, shipped alone to every server and device.

What it owns:

- ``bundle``: the manifest (schema, reading, canonical writing), sha256 of every file, ed25519 signing and
  verification, golden and quality-set tensors, output tolerances and the on-device quality gate;
- ``detect`` and ``device_classes.yaml``: the hardware table (device classes and CPU classes) and the one
  detection of a machine's device class, CPU class and GPU architecture (standard library only: the Ansible
  collection ships ``detect.py`` byte for byte as its ``module_utils``);
- ``codec``: the v2 wire dtypes and the binary tensor extension's client side.

What it may import: the standard library, NumPy, PyYAML and ``cryptography``; never torch, onnx, the
prebuild (``model_build``), the server (``serving``) or the cloud code (``components``). The prebuild writes
what this package defines; the server, the edge roles and the cloud components read it.
"""
