"""What one EKS GPU node can hold: its allocatable CPU and memory, and how many model pods fit.

The scheduler places a pod where the node's *allocatable* resources, less what the pods already
there request, cover the pod's requests. On an EKS node:

- allocatable = capacity - kube-reserved - the eviction threshold. The EKS AMIs (AL2023's
  nodeadm, as AL2's bootstrap before it) reserve CPU by core (6 % of the first, 1 % of the
  second, 0.5 % each of the third and fourth, 0.25 % of every further core) and memory as
  11 MiB for each pod the node may run plus 255 MiB; the hard eviction threshold keeps 100 MiB.
- capacity is below the instance's nominal memory: the kernel and firmware keep a share, about
  5 % on the instance sizes here; :data:`KERNEL_MEMORY_SHARE` takes 6 %, and the reservation
  counts :data:`MAX_PODS` pods whatever the ENI limit (58 on an xlarge), so the estimate errs low.
- every DaemonSet on the node requests its share first: EKS's own (:data:`EKS_NODE_DAEMONSETS`),
  and those the service adds (``model_service.gpu_node_daemonsets``).

``deploy/config.py`` checks the stacks with :func:`node_fit`, and the policy pack's capacity rules
read the same functions, so the arithmetic in an error message is the one the check used.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from components.aws.gpu_instances import GPU_INSTANCE_TYPES

MAX_PODS = 110
"""Pods per node counted in the memory reservation: Kubernetes' default limit, above the ENI limit
of the GPU sizes here, so the reservation is never underestimated."""
KERNEL_MEMORY_SHARE = 0.06
"""Share of the nominal memory the node never reports as capacity (kernel, firmware)."""
EVICTION_HARD_MIB = 100
"""The kubelet's ``memory.available`` hard eviction threshold on EKS AMIs."""


@dataclass(frozen=True)
class Requests:
    """CPU in millicores and memory in MiB: a pod's or DaemonSet's requests, or what a node offers."""

    cpu_m: int
    memory_mib: int

    def __add__(self, other: Requests) -> Requests:
        return Requests(self.cpu_m + other.cpu_m, self.memory_mib + other.memory_mib)

    def __sub__(self, other: Requests) -> Requests:
        return Requests(self.cpu_m - other.cpu_m, self.memory_mib - other.memory_mib)


EKS_NODE_DAEMONSETS: Mapping[str, Requests] = {
    "kube-proxy": Requests(100, 0),
    "aws-node (VPC CNI and its network policy agent)": Requests(50, 0),
}
"""The EKS add-ons' DaemonSets on every node, as their default manifests request them. (The NVIDIA
device plugin's chart requests nothing by default, so it takes no share here.)"""


def cpu_millicores(quantity: str) -> int:
    """A Kubernetes CPU quantity (``2``, ``1.5``, ``700m``) in millicores.

    Raises:
        ValueError: not a CPU quantity.
    """
    if re.fullmatch(r"\d+m", quantity):
        return int(quantity[:-1])
    if re.fullmatch(r"\d+(\.\d+)?", quantity):
        return round(float(quantity) * 1000)
    raise ValueError(f"{quantity!r} is not a CPU quantity (e.g. 2, 1.5, 700m)")


def memory_mib(quantity: str) -> int:
    """A Kubernetes memory quantity in ``Mi`` or ``Gi`` (``2560Mi``, ``8Gi``) in MiB.

    Raises:
        ValueError: not a memory quantity in Mi or Gi.
    """
    match = re.fullmatch(r"(\d+)(Mi|Gi)", quantity)
    if match is None:
        raise ValueError(f"{quantity!r} is not a memory quantity in Mi or Gi (e.g. 2560Mi, 8Gi)")
    return int(match[1]) * (1024 if match[2] == "Gi" else 1)


def kube_reserved(vcpus: int) -> Requests:
    """What the EKS AMI reserves for the kubelet and runtime on a node of ``vcpus`` cores."""
    first_cores_m = [60, 10, 5, 5]  # 6 %, 1 %, 0.5 %, 0.5 % of a core, in millicores
    cpu = sum(first_cores_m[:vcpus]) + max(vcpus - 4, 0) * 2.5
    return Requests(int(cpu + 0.5), 11 * MAX_PODS + 255)


def allocatable(instance_type: str) -> Requests:
    """The node's allocatable CPU and memory, estimated from the GPU instance table.

    Raises:
        KeyError: the type is not in ``components/aws/gpu_instances.py``.
    """
    facts = GPU_INSTANCE_TYPES[instance_type]
    capacity = Requests(facts.vcpus * 1000, int(facts.memory_gib * 1024 * (1 - KERNEL_MEMORY_SHARE)))
    return capacity - kube_reserved(facts.vcpus) - Requests(0, EVICTION_HARD_MIB)


@dataclass(frozen=True)
class NodeFit:
    """How many model pods one node of a type holds, and why (each bound shown)."""

    instance_type: str
    allocatable: Requests
    daemonsets: Requests
    pod: Requests
    gpu_slots: int
    """GPUs per node x time-sliced replicas per GPU: the device plugin's limit."""

    @property
    def free(self) -> Requests:
        """Allocatable less the DaemonSets' requests: what model pods share."""
        return self.allocatable - self.daemonsets

    @property
    def by_cpu(self) -> int:
        return max(self.free.cpu_m // self.pod.cpu_m, 0)

    @property
    def by_memory(self) -> int:
        return max(self.free.memory_mib // self.pod.memory_mib, 0)

    @property
    def pods(self) -> int:
        """Model pods per node: the smallest of the CPU, memory and GPU bounds."""
        return min(self.by_cpu, self.by_memory, self.gpu_slots)

    def explain(self) -> str:
        """The arithmetic, e.g. ``g5.xlarge: CPU (3920m - 310m) / 700m = 5, memory ... -> 5 pods``."""
        a, d, p = self.allocatable, self.daemonsets, self.pod
        return (
            f"{self.instance_type}: CPU ({a.cpu_m}m allocatable - {d.cpu_m}m DaemonSets) / {p.cpu_m}m = "
            f"{self.by_cpu}, memory ({a.memory_mib}Mi - {d.memory_mib}Mi) / {p.memory_mib}Mi = "
            f"{self.by_memory}, GPU slots {self.gpu_slots} -> {self.pods} pods per node"
        )


def node_fit(instance_type: str, pod: Requests, daemonsets: Requests, slices_per_gpu: int) -> NodeFit:
    """How many pods of ``pod`` fit one node of ``instance_type`` beside ``daemonsets``.

    Raises:
        KeyError: the type is not in ``components/aws/gpu_instances.py``.
    """
    gpus = GPU_INSTANCE_TYPES[instance_type].gpus
    return NodeFit(instance_type, allocatable(instance_type), daemonsets, pod, gpus * slices_per_gpu)
