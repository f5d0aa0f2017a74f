"""The dualdeploy policy rules: plain validation functions, and the policies built from them.

Each ``validate_*`` function has the CrossGuard signature ``(args, report_violation)``; it
reads ``args.resource_type`` and ``args.props`` (the resource's inputs, camelCase as the
engine sends them) and calls ``report_violation(message)`` once per problem.

Rules:
- ``gpu-node-groups-spot``: an EKS node group with GPU instances is Spot, unless it is tagged
  ``dualdeploy:pool-role = fallback`` (the on-demand fallback pool).
- ``eks-secrets-encryption``: every EKS cluster encrypts Kubernetes secrets with a KMS key.
- ``eks-public-endpoint-prod``: in a prod stack, a public EKS API endpoint needs an allow-list
  that is not 0.0.0.0/0.
- ``aws-resources-tagged``: every AWS resource type that takes tags carries the required tags.

Rules for the model service's objects (cloud part 2):
- ``k8s-images-by-digest``: every container image is pinned by ``@sha256:`` digest.
- ``k8s-non-root-with-limits``: every container runs as non-root and has CPU and memory limits.
- ``k8s-deployment-has-hpa-and-pdb`` (stack policy): every Deployment has an HPA that targets
  it and a PodDisruptionBudget that selects its pods.
- ``ecr-scan-on-push``: every ECR repository scans images on push.

Rules for monitoring and capacity (issue 17), all stack policies:
- ``k8s-service-monitor-has-operator``: a ServiceMonitor (an object, or one a Helm chart is told
  to create) needs the kube-prometheus-stack release in the same stack, and carries the
  ``release`` label its Prometheus selects.
- ``gpu-pod-fit-covers-time-slicing``: on every GPU node group, the model pods' requests let as
  many pods fit a node as the device plugin offers time-sliced GPU slots.
- ``gpu-hpa-max-within-pool-capacity``: the HPA maximum of a GPU Deployment is no more than the
  GPU node groups hold at their maximum size.

The capacity rules read the node arithmetic and the GPU instance table from the repository the
pack sits in (``components/aws/node_capacity.py``, pure Python), so a rule and the stack config
check can never disagree on a figure.

Rules for what only AWS and the autoscaler would have caught (issue 17):
- ``gpu-pool-one-size``: the instance types of a GPU node group share one size (vCPUs, memory,
  GPUs), read from ``components/aws/gpu_instances.py``.
- ``gpu-node-groups-accelerator-label``: GPU node groups carry ``k8s.amazonaws.com/accelerator``.
- ``eks-ci-access-entries`` (stack policy): an EKS cluster on API authentication has access entries
  tagged ``dualdeploy:access`` ``deploy`` and ``preview``, each with an access policy, the preview
  one read-only.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import re
import sys
from collections.abc import Callable, Mapping
from functools import cache
from pathlib import Path
from types import ModuleType
from typing import Any

import yaml
from pulumi_policy import (
    PolicyConfigSchema,
    ReportViolation,
    ResourceValidationArgs,
    ResourceValidationPolicy,
    StackValidationArgs,
    StackValidationPolicy,
)

NODE_GROUP = "aws:eks/nodeGroup:NodeGroup"
CLUSTER = "aws:eks/cluster:Cluster"
FALLBACK_TAG = "dualdeploy:pool-role"
ENVIRONMENT_TAG = "dualdeploy:environment"
DEFAULT_REQUIRED_TAGS = ("dualdeploy:stack", "managed-by")
DEFAULT_PROD_STACKS = r"(^|-)prod($|-)"
GPU_FAMILY = re.compile(r"^(g\d+[a-z]*|p\d+[a-z]*)\.")
OPEN_CIDRS = ("0.0.0.0/0", "::/0")
ECR_REPOSITORY = "aws:ecr/repository:Repository"
DEPLOYMENT = "kubernetes:apps/v1:Deployment"
HPA = "kubernetes:autoscaling/v2:HorizontalPodAutoscaler"
PDB = "kubernetes:policy/v1:PodDisruptionBudget"
WORKLOADS = {
    DEPLOYMENT: ("spec", "template", "spec"),
    "kubernetes:apps/v1:DaemonSet": ("spec", "template", "spec"),
    "kubernetes:apps/v1:StatefulSet": ("spec", "template", "spec"),
    "kubernetes:batch/v1:Job": ("spec", "template", "spec"),
    "kubernetes:batch/v1:CronJob": ("spec", "jobTemplate", "spec", "template", "spec"),
    "kubernetes:core/v1:Pod": ("spec",),
}
"""Workload types and the path from their props to the pod spec."""


def _stack_of(urn: str) -> str:
    """The stack name inside a URN (``urn:pulumi:<stack>::<project>::...``)."""
    return urn.split("::", 1)[0].removeprefix("urn:pulumi:")


def has_key(mapping: Mapping[str, Any], key: str) -> bool:
    """Whether ``mapping`` has ``key``, without reading its value.

    During preview the engine's props raise on reading a value that is not known yet (a KMS
    key ARN before the key exists), and ``key in mapping`` reads it; iterating keys does not.
    """
    return any(k == key for k in mapping)


def is_gpu_node_group(props: Mapping[str, Any]) -> bool:
    """A node group is a GPU group when its AMI is an accelerated one or any type is g*/p*."""
    ami = str(props.get("amiType") or "")
    types = props.get("instanceTypes") or []
    return "GPU" in ami or "NVIDIA" in ami or any(GPU_FAMILY.match(str(t)) for t in types)


def validate_gpu_node_groups_spot(args: ResourceValidationArgs, report_violation: ReportViolation) -> None:
    """GPU node groups must be Spot unless tagged as the fallback pool."""
    if args.resource_type != NODE_GROUP or not is_gpu_node_group(args.props):
        return
    tags = args.props.get("tags") or {}
    capacity = args.props.get("capacityType") or "ON_DEMAND"  # the EKS default
    if capacity != "SPOT" and tags.get(FALLBACK_TAG) != "fallback":
        report_violation(
            f"GPU node group {args.name!r} has capacityType {capacity}: GPU pools must be SPOT, "
            f"or be tagged {FALLBACK_TAG}=fallback if they are the on-demand fallback",
            None,
        )


def validate_eks_secrets_encryption(args: ResourceValidationArgs, report_violation: ReportViolation) -> None:
    """EKS clusters must envelope-encrypt Kubernetes secrets with a KMS key."""
    if args.resource_type != CLUSTER:
        return
    config = args.props.get("encryptionConfig") or {}
    resources = config.get("resources") or []
    provider = config.get("provider") or {}
    if "secrets" not in resources or not has_key(provider, "keyArn"):
        report_violation(
            f"EKS cluster {args.name!r} does not encrypt secrets: set encryptionConfig "
            '{resources: ["secrets"], provider: {keyArn: <KMS key>}}',
            None,
        )


def is_prod(args: ResourceValidationArgs) -> bool:
    """Prod: the ``dualdeploy:environment`` tag says so, or the stack name matches the pattern."""
    tags = args.props.get("tags") or {}
    pattern = args.get_config().get("prodStackPattern", DEFAULT_PROD_STACKS)
    return tags.get(ENVIRONMENT_TAG) == "prod" or re.search(pattern, _stack_of(args.urn)) is not None


def validate_eks_public_endpoint_prod(
    args: ResourceValidationArgs, report_violation: ReportViolation
) -> None:
    """A prod EKS cluster may have a public endpoint only with a real allow-list."""
    if args.resource_type != CLUSTER or not is_prod(args):
        return
    vpc = args.props.get("vpcConfig") or {}
    public = vpc.get("endpointPublicAccess", True)  # EKS makes the endpoint public unless told otherwise
    if not public:
        return
    cidrs = list(vpc.get("publicAccessCidrs") or [])
    open_cidrs = [c for c in cidrs if c in OPEN_CIDRS]
    if not cidrs or open_cidrs:
        shown = "none (EKS defaults to 0.0.0.0/0)" if not cidrs else ", ".join(open_cidrs)
        report_violation(
            f"prod EKS cluster {args.name!r} has a public API endpoint open to the internet "
            f"(publicAccessCidrs: {shown}); make it private or list your CIDRs",
            None,
        )


@cache
def is_taggable(resource_type: str) -> bool:
    """Whether a pulumi_aws resource type takes ``tags``, read from the SDK class itself.

    Unknown or non-AWS types count as not taggable (the rule then says nothing about them).
    """
    parts = resource_type.split(":")
    if len(parts) != 3 or parts[0] != "aws":
        return False
    module_name = parts[1].split("/")[0]
    try:
        module = importlib.import_module(
            "pulumi_aws" if module_name == "index" else f"pulumi_aws.{module_name}"
        )
    except ImportError:
        return False
    cls = getattr(module, parts[2], None)
    init = getattr(cls, "_internal_init", None)
    return init is not None and "tags" in inspect.signature(init).parameters


def validate_aws_resources_tagged(args: ResourceValidationArgs, report_violation: ReportViolation) -> None:
    """Every taggable AWS resource carries the required tag keys (config: ``requiredTags``)."""
    if not is_taggable(args.resource_type):
        return
    required = list(args.get_config().get("requiredTags", DEFAULT_REQUIRED_TAGS))
    tags = args.props.get("tags") or {}
    missing = [key for key in required if not tags.get(key)]
    if missing:
        report_violation(
            f"{args.resource_type} {args.name!r} is missing tags {missing} (required: {required})",
            None,
        )


def pod_spec_of(resource_type: str, props: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """The pod spec inside a workload's props, or None for anything else."""
    path = WORKLOADS.get(resource_type)
    if path is None:
        return None
    node: Any = props
    for key in path:
        node = (node or {}).get(key) if isinstance(node, Mapping) else None
    return node if isinstance(node, Mapping) else None


def _containers(pod: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    return [*(pod.get("initContainers") or []), *(pod.get("containers") or [])]


def validate_k8s_images_by_digest(args: ResourceValidationArgs, report_violation: ReportViolation) -> None:
    """Every container image is referenced by digest (a tag can move; ``:latest`` always does)."""
    pod = pod_spec_of(args.resource_type, args.props)
    if pod is None:
        return
    for container in _containers(pod):
        image = str(container.get("image", ""))
        if not re.search(r"@sha256:[0-9a-f]{64}$", image):
            report_violation(
                f"{args.name!r} container {container.get('name')!r} uses image {image!r}: "
                "pin it by @sha256 digest",
                None,
            )


def validate_k8s_non_root_with_limits(
    args: ResourceValidationArgs, report_violation: ReportViolation
) -> None:
    """Every container runs as non-root (pod or container level) and has CPU and memory limits."""
    pod = pod_spec_of(args.resource_type, args.props)
    if pod is None:
        return
    pod_non_root = bool((pod.get("securityContext") or {}).get("runAsNonRoot"))
    for container in _containers(pod):
        name = container.get("name")
        context = container.get("securityContext") or {}
        if not context.get("runAsNonRoot", pod_non_root):
            report_violation(f"{args.name!r} container {name!r} may run as root: set runAsNonRoot", None)
        limits = (container.get("resources") or {}).get("limits") or {}
        missing = [k for k in ("cpu", "memory") if k not in limits]
        if missing:
            report_violation(f"{args.name!r} container {name!r} has no {' or '.join(missing)} limit", None)


def validate_ecr_scan_on_push(args: ResourceValidationArgs, report_violation: ReportViolation) -> None:
    """ECR repositories scan every pushed image for known vulnerabilities."""
    if args.resource_type != ECR_REPOSITORY:
        return
    scanning = args.props.get("imageScanningConfiguration") or {}
    if scanning.get("scanOnPush") is not True:
        report_violation(
            f"ECR repository {args.name!r} does not scan on push: set imageScanningConfiguration", None
        )


def _namespace(props: Mapping[str, Any]) -> str:
    return str((props.get("metadata") or {}).get("namespace") or "default")


def validate_deployments_have_hpa_and_pdb(
    args: StackValidationArgs, report_violation: ReportViolation
) -> None:
    """Every Deployment has an HPA targeting it and a PDB selecting its pods (same namespace)."""
    by_type: dict[str, list[Any]] = {}
    for resource in args.resources:
        by_type.setdefault(resource.resource_type, []).append(resource)
    for deployment in by_type.get(DEPLOYMENT, []):
        props = deployment.props
        name = (props.get("metadata") or {}).get("name")
        namespace = _namespace(props)
        labels = ((props.get("spec") or {}).get("template") or {}).get("metadata", {}).get("labels") or {}
        hpas = [
            h
            for h in by_type.get(HPA, [])
            if _namespace(h.props) == namespace
            and (h.props.get("spec") or {}).get("scaleTargetRef", {}).get("name") == name
            and (h.props.get("spec") or {}).get("scaleTargetRef", {}).get("kind") == "Deployment"
        ]
        pdbs = [
            p
            for p in by_type.get(PDB, [])
            if _namespace(p.props) == namespace
            and _selects(((p.props.get("spec") or {}).get("selector") or {}).get("matchLabels") or {}, labels)
        ]
        if not hpas:
            report_violation(f"Deployment {namespace}/{name} has no HorizontalPodAutoscaler", deployment.urn)
        if not pdbs:
            report_violation(
                f"Deployment {namespace}/{name} has no PodDisruptionBudget selecting its pods", deployment.urn
            )


def _selects(selector: Mapping[str, Any], labels: Mapping[str, Any]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


# --------------------------------------------------------------------------- monitoring and capacity

SERVICE_MONITOR = "kubernetes:monitoring.coreos.com/v1:ServiceMonitor"
HELM_RELEASE = "kubernetes:helm.sh/v3:Release"
DAEMONSET = "kubernetes:apps/v1:DaemonSet"
PROMETHEUS_STACK_CHART = "kube-prometheus-stack"
DEVICE_PLUGIN_CHART = "nvidia-device-plugin"
GPU_ARCH_LABEL = "dualdeploy.io/gpu-arch"
GPU_RESOURCES = ("nvidia.com/gpu", "nvidia.com/gpu.shared")
CHART_GPU_NODE_REQUESTS: Mapping[str, tuple[str, ...]] = {
    "dcgm-exporter": ("resources", "requests"),
    PROMETHEUS_STACK_CHART: ("prometheus-node-exporter", "resources", "requests"),
}
"""Charts that run a DaemonSet on GPU nodes, and where their values hold its requests."""


def _by_type(args: StackValidationArgs) -> dict[str, list[Any]]:
    by_type: dict[str, list[Any]] = {}
    for resource in args.resources:
        by_type.setdefault(resource.resource_type, []).append(resource)
    return by_type


def _dig(value: Any, *path: str) -> Any:
    for key in path:
        if not isinstance(value, Mapping):
            return None
        value = value.get(key)
    return value


def validate_service_monitors_have_an_operator(
    args: StackValidationArgs, report_violation: ReportViolation
) -> None:
    """A ServiceMonitor needs the Prometheus operator's release in the stack, and its selector label."""
    by_type = _by_type(args)
    stacks = [r for r in by_type.get(HELM_RELEASE, []) if r.props.get("chart") == PROMETHEUS_STACK_CHART]
    release_names = {str(r.props.get("name")) for r in stacks}
    for monitor in by_type.get(SERVICE_MONITOR, []):
        meta = monitor.props.get("metadata") or {}
        where = f"ServiceMonitor {_namespace(monitor.props)}/{meta.get('name')}"
        if not stacks:
            report_violation(
                f"{where} needs the Prometheus operator, and the stack installs none: without its CRDs "
                f"the apply fails (no matches for kind ServiceMonitor); add the {PROMETHEUS_STACK_CHART} "
                "release or drop the ServiceMonitor",
                monitor.urn,
            )
        elif (meta.get("labels") or {}).get("release") not in release_names:
            report_violation(
                f"{where} lacks the label release={sorted(release_names)[0]} that the installed "
                "Prometheus selects: it would never be scraped",
                monitor.urn,
            )
    for release in by_type.get(HELM_RELEASE, []):
        if _dig(release.props, "values", "serviceMonitor", "enabled") is True and not stacks:
            report_violation(
                f"Helm release {release.props.get('name')} creates a ServiceMonitor, and the stack installs "
                f"no Prometheus operator ({PROMETHEUS_STACK_CHART})",
                release.urn,
            )


@cache
def _node_capacity() -> ModuleType:
    """``components/aws/node_capacity.py`` of the repository this pack sits in (pure Python)."""
    root = str(Path(__file__).resolve().parent.parent)
    if root not in sys.path:
        sys.path.append(root)
    return importlib.import_module("components.aws.node_capacity")


def _requests(capacity: ModuleType, requests: Mapping[str, Any] | None) -> Any:
    requests = requests or {}
    cpu = capacity.cpu_millicores(str(requests["cpu"])) if "cpu" in requests else 0
    memory = capacity.memory_mib(str(requests["memory"])) if "memory" in requests else 0
    return capacity.Requests(cpu, memory)


def _tolerates_gpu_taint(pod: Mapping[str, Any]) -> bool:
    return any(t.get("key") in GPU_RESOURCES or (t.get("operator") == "Exists" and not t.get("key"))
               for t in pod.get("tolerations") or [])  # fmt: skip


def _slices_per_gpu(by_type: Mapping[str, list[Any]]) -> int:
    for release in by_type.get(HELM_RELEASE, []):
        if release.props.get("chart") != DEVICE_PLUGIN_CHART:
            continue
        config = _dig(release.props, "values", "config", "map", "default")
        if isinstance(config, str):
            resources = _dig(yaml.safe_load(config), "sharing", "timeSlicing", "resources") or []
            return max([int(r.get("replicas", 1)) for r in resources] or [1])
    return 1


def _gpu_node_daemonsets(capacity: ModuleType, by_type: Mapping[str, list[Any]]) -> Any:
    """What DaemonSets request on each GPU node: EKS's own, the stack's tolerating the GPU taint, charts'."""
    total = capacity.Requests(0, 0)
    for requests in capacity.EKS_NODE_DAEMONSETS.values():
        total += requests
    for daemonset in by_type.get(DAEMONSET, []):
        pod = pod_spec_of(DAEMONSET, daemonset.props) or {}
        if _tolerates_gpu_taint(pod):
            for container in _containers(pod):
                total += _requests(capacity, _dig(container, "resources", "requests"))
    for release in by_type.get(HELM_RELEASE, []):
        path = CHART_GPU_NODE_REQUESTS.get(str(release.props.get("chart")))
        if path is not None:
            total += _requests(capacity, _dig(release.props.get("values") or {}, *path))
    return total


def _gpu_workloads(by_type: Mapping[str, list[Any]]) -> list[tuple[Any, Mapping[str, Any], set[str]]]:
    """Each Deployment that requests a GPU, its container requests, and the GPU arches it may use."""
    found = []
    for deployment in by_type.get(DEPLOYMENT, []):
        pod = pod_spec_of(DEPLOYMENT, deployment.props) or {}
        for container in _containers(pod):
            requests = _dig(container, "resources", "requests") or {}
            if any(r in requests for r in GPU_RESOURCES):
                affinity = _dig(pod, "affinity", "nodeAffinity") or {}
                required = affinity.get("requiredDuringSchedulingIgnoredDuringExecution") or {}
                terms = required.get("nodeSelectorTerms") or []
                arches = {v for t in terms for e in t.get("matchExpressions") or []
                          if e.get("key") == GPU_ARCH_LABEL for v in e.get("values") or []}  # fmt: skip
                found.append((deployment, requests, arches))
    return found


def _fits(args: StackValidationArgs) -> list[tuple[Any, Any, list[tuple[Any, Any]]]]:
    """For each GPU Deployment: its resource, and each GPU node group it may use with its smallest fit."""
    capacity = _node_capacity()
    by_type = _by_type(args)
    slices = _slices_per_gpu(by_type)
    daemonsets = _gpu_node_daemonsets(capacity, by_type)
    groups = [g for g in by_type.get(NODE_GROUP, []) if is_gpu_node_group(g.props)]
    result = []
    for deployment, requests, arches in _gpu_workloads(by_type):
        pod = _requests(capacity, requests)
        fits = []
        for group in groups:
            arch = (group.props.get("labels") or {}).get(GPU_ARCH_LABEL)
            if arches and arch not in arches:
                continue
            known = [t for t in group.props.get("instanceTypes") or [] if t in capacity.GPU_INSTANCE_TYPES]
            if known:
                by_instance = [capacity.node_fit(t, pod, daemonsets, slices) for t in known]
                fits.append((group, min(by_instance, key=lambda fit: fit.pods)))
        result.append((deployment, pod, fits))
    return result


def validate_gpu_pod_fit_covers_time_slicing(
    args: StackValidationArgs, report_violation: ReportViolation
) -> None:
    """As many model pods fit a GPU node as the device plugin offers time-sliced slots."""
    for deployment, _, fits in _fits(args):
        name = (deployment.props.get("metadata") or {}).get("name")
        for group, fit in fits:
            if fit.pods < fit.gpu_slots:
                report_violation(
                    f"Deployment {_namespace(deployment.props)}/{name} on GPU node group {group.name!r}: "
                    f"{fit.pods} pods fit a node but the device plugin offers {fit.gpu_slots} GPU slots, so "
                    f"{fit.gpu_slots - fit.pods} stay idle ({fit.explain()})",
                    deployment.urn,
                )


def validate_gpu_hpa_max_within_pool_capacity(
    args: StackValidationArgs, report_violation: ReportViolation
) -> None:
    """An HPA's maximum for a GPU Deployment fits the GPU node groups at their maximum size."""
    hpas = _by_type(args).get(HPA, [])
    for deployment, _, fits in _fits(args):
        name = (deployment.props.get("metadata") or {}).get("name")
        namespace = _namespace(deployment.props)
        held = sum(int(_dig(g.props, "scalingConfig", "maxSize") or 0) * fit.pods for g, fit in fits)
        for hpa in hpas:
            spec = hpa.props.get("spec") or {}
            if _namespace(hpa.props) != namespace or _dig(spec, "scaleTargetRef", "name") != name:
                continue
            maximum = int(spec.get("maxReplicas") or 0)
            if maximum > held:
                detail = (
                    " + ".join(
                        f"{g.name} {int(_dig(g.props, 'scalingConfig', 'maxSize') or 0)} x {fit.pods}"
                        for g, fit in fits
                    )
                    or "no GPU node group it may use"
                )
                report_violation(
                    f"HPA {namespace}/{name} may scale to {maximum} pods, but the GPU node groups hold "
                    f"{held} ({detail}: maxSize x pods per node); the rest would stay Pending",
                    hpa.urn,
                )


def _policy(
    name: str,
    description: str,
    validate: Callable[[ResourceValidationArgs, ReportViolation], None],
    schema: PolicyConfigSchema | None = None,
) -> ResourceValidationPolicy:
    return ResourceValidationPolicy(
        name=name, description=description, validate=validate, config_schema=schema
    )


POLICIES: tuple[ResourceValidationPolicy | StackValidationPolicy, ...] = (
    _policy(
        "gpu-node-groups-spot",
        "GPU node groups use Spot capacity unless tagged dualdeploy:pool-role=fallback.",
        validate_gpu_node_groups_spot,
    ),
    _policy(
        "eks-secrets-encryption",
        "EKS clusters encrypt Kubernetes secrets with a KMS key.",
        validate_eks_secrets_encryption,
    ),
    _policy(
        "eks-public-endpoint-prod",
        "A prod EKS cluster has no public API endpoint without an allow-list.",
        validate_eks_public_endpoint_prod,
        PolicyConfigSchema(
            properties={"prodStackPattern": {"type": "string", "default": DEFAULT_PROD_STACKS}},
        ),
    ),
    _policy(
        "aws-resources-tagged",
        "Every taggable AWS resource carries the required tags.",
        validate_aws_resources_tagged,
        PolicyConfigSchema(
            properties={
                "requiredTags": {
                    "type": "array",
                    "items": {"type": "string"},
                    "default": list(DEFAULT_REQUIRED_TAGS),
                }
            },
        ),
    ),
    _policy(
        "k8s-images-by-digest",
        "Container images are pinned by digest.",
        validate_k8s_images_by_digest,
    ),
    _policy(
        "k8s-non-root-with-limits",
        "Containers run as non-root with CPU and memory limits.",
        validate_k8s_non_root_with_limits,
    ),
    _policy(
        "ecr-scan-on-push",
        "ECR repositories scan images on push.",
        validate_ecr_scan_on_push,
    ),
    StackValidationPolicy(
        name="k8s-deployment-has-hpa-and-pdb",
        description="Every Deployment has a HorizontalPodAutoscaler and a PodDisruptionBudget.",
        validate=validate_deployments_have_hpa_and_pdb,
    ),
    StackValidationPolicy(
        name="k8s-service-monitor-has-operator",
        description="A ServiceMonitor comes with the Prometheus operator's release and its selector label.",
        validate=validate_service_monitors_have_an_operator,
    ),
    StackValidationPolicy(
        name="gpu-pod-fit-covers-time-slicing",
        description="As many model pods fit a GPU node as it has time-sliced GPU slots.",
        validate=validate_gpu_pod_fit_covers_time_slicing,
    ),
    StackValidationPolicy(
        name="gpu-hpa-max-within-pool-capacity",
        description="The HPA maximum of a GPU Deployment fits the GPU node groups at their maximum size.",
        validate=validate_gpu_hpa_max_within_pool_capacity,
    ),
)


# --------------------------------------------------------------------------- issue 17: pools and CI access

ACCELERATOR_LABEL = "k8s.amazonaws.com/accelerator"
ACCESS_ENTRY = "aws:eks/accessEntry:AccessEntry"
ACCESS_POLICY_ASSOCIATION = "aws:eks/accessPolicyAssociation:AccessPolicyAssociation"
ACCESS_TAG = "dualdeploy:access"
VIEW_POLICIES = ("AmazonEKSViewPolicy", "AmazonEKSAdminViewPolicy")
"""Access policies that only read: what a pull-request preview may have."""


@cache
def instance_sizes() -> dict[str, tuple[int, int, int]]:
    """Instance type → (vCPUs, memory GiB, GPUs), from the project's GPU table.

    The table is ``components/aws/gpu_instances.py`` (stdlib only), loaded by path: the pack runs from
    the repository (``--policy-pack policy``), and one table serves the config, the components and
    this rule.
    """
    path = Path(__file__).resolve().parent.parent / "components" / "aws" / "gpu_instances.py"
    spec = importlib.util.spec_from_file_location("dualdeploy_gpu_instances", path)
    if spec is None or spec.loader is None:
        raise ImportError(f"the GPU instance table {path} is missing: run the pack from the repository")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return {name: facts.node_size for name, facts in module.GPU_INSTANCE_TYPES.items()}


def validate_gpu_pool_one_size(args: ResourceValidationArgs, report_violation: ReportViolation) -> None:
    """Every instance type of a GPU node group has the same vCPUs, memory and GPUs."""
    if args.resource_type != NODE_GROUP or not is_gpu_node_group(args.props):
        return
    types = [str(t) for t in args.props.get("instanceTypes") or []]
    table = instance_sizes()
    unknown = [t for t in types if t not in table]
    if unknown:
        report_violation(
            f"GPU node group {args.name!r}: {unknown} not in components/aws/gpu_instances.py, so its "
            "node size cannot be checked",
            None,
        )
        return
    sizes = {t: table[t] for t in types}
    if len(set(sizes.values())) > 1:
        shown = ", ".join(f"{t} ({v} vCPU, {m} GiB, {g} GPU)" for t, (v, m, g) in sizes.items())
        report_violation(
            f"GPU node group {args.name!r} mixes node sizes: {shown}. The cluster autoscaler plans "
            "with one instance type of a group; use one pool per size",
            None,
        )


def validate_gpu_accelerator_label(args: ResourceValidationArgs, report_violation: ReportViolation) -> None:
    """GPU node groups label their nodes ``k8s.amazonaws.com/accelerator`` (the autoscaler's GPU label)."""
    if args.resource_type != NODE_GROUP or not is_gpu_node_group(args.props):
        return
    labels = args.props.get("labels") or {}
    if not labels.get(ACCELERATOR_LABEL):
        report_violation(
            f"GPU node group {args.name!r} has no {ACCELERATOR_LABEL} label: the cluster autoscaler "
            "then counts a new GPU node as ready before its GPUs are, and starts another",
            None,
        )


def validate_ci_access_entries(args: StackValidationArgs, report_violation: ReportViolation) -> None:
    """Each EKS cluster on API authentication has access entries for the deploy and preview roles.

    The entries are recognised by their ``dualdeploy:access`` tag (``deploy``, ``preview``); each must
    have an access policy association for its principal, and the preview role's only reads.
    """
    by_type: dict[str, list[Any]] = {}
    for resource in args.resources:
        by_type.setdefault(resource.resource_type, []).append(resource)
    for cluster in by_type.get(CLUSTER, []):
        mode = (cluster.props.get("accessConfig") or {}).get("authenticationMode") or "CONFIG_MAP"
        if mode == "CONFIG_MAP":
            continue  # aws-auth mapping, not this rule's business
        name = cluster.props.get("name")
        entries = [
            e
            for e in by_type.get(ACCESS_ENTRY, [])
            if e.props.get("clusterName") in (name, None) or not isinstance(e.props.get("clusterName"), str)
        ]
        for kind in ("deploy", "preview"):
            tagged = [e for e in entries if (e.props.get("tags") or {}).get(ACCESS_TAG) == kind]
            if not tagged:
                report_violation(
                    f"EKS cluster {name!r} has no access entry for the CI {kind} role "
                    f"(tag {ACCESS_TAG}={kind}): with API authentication, its `pulumi` run gets "
                    "Unauthorized on every Kubernetes object",
                    cluster.urn,
                )
                continue
            principals = {e.props.get("principalArn") for e in tagged}
            policies = [
                str(a.props.get("policyArn", "")).rsplit("/", 1)[-1]
                for a in by_type.get(ACCESS_POLICY_ASSOCIATION, [])
                if a.props.get("principalArn") in principals
            ]
            if not policies:
                report_violation(
                    f"EKS cluster {name!r}: the {kind} role's access entry has no access policy", cluster.urn
                )
            elif kind == "preview" and any(p not in VIEW_POLICIES for p in policies):
                report_violation(
                    f"EKS cluster {name!r}: the preview role has {policies}; a preview only reads "
                    f"(least privilege: one of {', '.join(VIEW_POLICIES)})",
                    cluster.urn,
                )


POLICIES = (
    *POLICIES,
    _policy(
        "gpu-pool-one-size",
        "Every instance type of a GPU node group has the same vCPUs, memory and GPUs.",
        validate_gpu_pool_one_size,
    ),
    _policy(
        "gpu-node-groups-accelerator-label",
        "GPU node groups label their nodes k8s.amazonaws.com/accelerator.",
        validate_gpu_accelerator_label,
    ),
    StackValidationPolicy(
        name="eks-ci-access-entries",
        description="EKS clusters on API authentication give the CI deploy and preview roles access entries.",
        validate=validate_ci_access_entries,
    ),
)
