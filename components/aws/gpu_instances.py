"""The known AWS GPU instance types: the one source of truth for pools and config checks.

Every GPU pool names its instance types from this table. The config parser uses it to
reject unknown types and pools that mix GPU architectures or GPU counts; the cluster
component uses it for the node labels (``dualdeploy.io/gpu-arch``) and for the
cluster autoscaler's scale-from-zero hints (GPUs per node).

Figures are AWS's published specifications (vCPUs, memory in GiB, GPUs per instance,
memory per GPU in GiB). ``gpu_arch`` is the CUDA compute capability written the way
TensorRT engines in the bundle are named (``trt-sm_86-fp16``): an engine built for one
architecture does not load on another, which is why a pool never mixes them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from types import MappingProxyType


@dataclass(frozen=True)
class GpuInstanceType:
    """One EC2 GPU instance type.

    Attributes:
        name: the EC2 instance type, e.g. ``g5.xlarge``.
        gpu_model: the NVIDIA GPU, e.g. ``A10G``.
        gpu_arch: CUDA compute capability as ``sm_XY``.
        gpus: GPUs per instance.
        gpu_memory_gib: memory of one GPU in GiB.
        vcpus: vCPUs per instance.
        memory_gib: host memory in GiB.
    """

    name: str
    gpu_model: str
    gpu_arch: str
    gpus: int
    gpu_memory_gib: int
    vcpus: int
    memory_gib: int

    @property
    def family(self) -> str:
        """The instance family, e.g. ``g5`` for ``g5.xlarge``."""
        return self.name.split(".", 1)[0]

    @property
    def node_size(self) -> tuple[int, int, int]:
        """``(vCPUs, memory GiB, GPUs)``: what the cluster autoscaler plans a node group with.

        The autoscaler models a group by one instance type; its AWS README asks that every type
        in a group have the same vCPUs and memory ("fundamental to CA's scaling calculations").
        """
        return (self.vcpus, self.memory_gib, self.gpus)

    def describe(self) -> str:
        """``g5.xlarge (4 vCPU, 16 GiB, 1 GPU)``, for error messages."""
        return f"{self.name} ({self.vcpus} vCPU, {self.memory_gib} GiB, {self.gpus} GPU)"


# (family, GPU model, arch, GPU memory GiB) and the sizes as (size, vCPUs, memory GiB, GPUs).
_FAMILIES: tuple[tuple[str, str, str, int, tuple[tuple[str, int, int, int], ...]], ...] = (
    (
        "g4dn",
        "T4",
        "sm_75",
        16,
        (
            ("xlarge", 4, 16, 1),
            ("2xlarge", 8, 32, 1),
            ("4xlarge", 16, 64, 1),
            ("8xlarge", 32, 128, 1),
            ("16xlarge", 64, 256, 1),
            ("12xlarge", 48, 192, 4),
            ("metal", 96, 384, 8),
        ),
    ),
    (
        "g5",
        "A10G",
        "sm_86",
        24,
        (
            ("xlarge", 4, 16, 1),
            ("2xlarge", 8, 32, 1),
            ("4xlarge", 16, 64, 1),
            ("8xlarge", 32, 128, 1),
            ("16xlarge", 64, 256, 1),
            ("12xlarge", 48, 192, 4),
            ("24xlarge", 96, 384, 4),
            ("48xlarge", 192, 768, 8),
        ),
    ),
    (
        "g6",
        "L4",
        "sm_89",
        24,
        (
            ("xlarge", 4, 16, 1),
            ("2xlarge", 8, 32, 1),
            ("4xlarge", 16, 64, 1),
            ("8xlarge", 32, 128, 1),
            ("16xlarge", 64, 256, 1),
            ("12xlarge", 48, 192, 4),
            ("24xlarge", 96, 384, 4),
            ("48xlarge", 192, 768, 8),
        ),
    ),
    (
        "g6e",
        "L40S",
        "sm_89",
        48,
        (
            ("xlarge", 4, 32, 1),
            ("2xlarge", 8, 64, 1),
            ("4xlarge", 16, 128, 1),
            ("8xlarge", 32, 256, 1),
            ("16xlarge", 64, 512, 1),
            ("12xlarge", 48, 384, 4),
            ("24xlarge", 96, 768, 4),
            ("48xlarge", 192, 1536, 8),
        ),
    ),
    ("p4d", "A100", "sm_80", 40, (("24xlarge", 96, 1152, 8),)),
    ("p4de", "A100", "sm_80", 80, (("24xlarge", 96, 1152, 8),)),
    ("p5", "H100", "sm_90", 80, (("4xlarge", 16, 256, 1), ("48xlarge", 192, 2048, 8))),
    ("p5e", "H200", "sm_90", 141, (("48xlarge", 192, 2048, 8),)),
    ("p5en", "H200", "sm_90", 141, (("48xlarge", 192, 2048, 8),)),
)


def _build() -> dict[str, GpuInstanceType]:
    table: dict[str, GpuInstanceType] = {}
    for family, model, arch, gpu_mem, sizes in _FAMILIES:
        for size, vcpus, memory, gpus in sizes:
            name = f"{family}.{size}"
            table[name] = GpuInstanceType(name, model, arch, gpus, gpu_mem, vcpus, memory)
    return table


GPU_INSTANCE_TYPES: MappingProxyType[str, GpuInstanceType] = MappingProxyType(_build())
"""Instance type name → its GPU facts (read-only)."""

GPU_ARCHES: frozenset[str] = frozenset(t.gpu_arch for t in GPU_INSTANCE_TYPES.values())
"""Every architecture the table knows, e.g. ``{"sm_75", "sm_80", "sm_86", "sm_89", "sm_90"}``."""


def accelerator(types: Sequence[GpuInstanceType]) -> str:
    """The ``k8s.amazonaws.com/accelerator`` label value of nodes of these types.

    The AWS cluster autoscaler only checks that the label is present (it then treats a node as
    not ready until the device plugin advertises its GPUs); the value names the GPU, e.g.
    ``nvidia-a10g``, or the architecture when one pool holds two GPU models (``nvidia-sm_90``
    for p5 with p5e). Label values allow letters, digits, ``-``, ``_`` and ``.``.
    """
    models = {t.gpu_model.lower() for t in types}
    return f"nvidia-{models.pop()}" if len(models) == 1 else f"nvidia-{types[0].gpu_arch}"


class UnknownInstanceType(KeyError):
    """An instance type is not in :data:`GPU_INSTANCE_TYPES`."""


def lookup(name: str) -> GpuInstanceType:
    """Return the facts of one GPU instance type.

    Raises:
        UnknownInstanceType: ``name`` is not in the table (the message lists the families known).
    """
    try:
        return GPU_INSTANCE_TYPES[name]
    except KeyError:
        families = sorted({t.family for t in GPU_INSTANCE_TYPES.values()})
        raise UnknownInstanceType(
            f"{name!r} is not a known GPU instance type (known families: {', '.join(families)}; "
            "see components/aws/gpu_instances.py)"
        ) from None
