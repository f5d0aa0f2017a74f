"""ModelService: the model server on the Spot GPU pools, scaled by an HPA.

Every Kubernetes object comes from a plain spec function in ``components/k8s_specs.py`` (the
same functions ``make render`` writes offline); this component passes each dict to
pulumi-kubernetes. It never builds a provider: the caller hands in the cluster's
``k8s.Provider`` through ``opts`` (``GpuCluster.provider``).

Objects: a Namespace (restricted Pod Security), a ServiceAccount without an API token, the
Deployment (image by digest, one GPU, arch affinity, Spot tolerations, spread, v2 probes,
``preStop`` and a grace period within the Spot notice, hardened containers, no ``replicas``),
a Service (ClusterIP or an NLB, optionally on Elastic IPs given beforehand), an autoscaling/v2 HPA,
a PDB, a NetworkPolicy, with ``authenticated`` a credentials Secret (HTTPS and bearer tokens, for the
hybrid cascade's edge devices), and optionally
kube-prometheus-stack (the Prometheus operator and a Prometheus, pinned) with a ServiceMonitor
that its Prometheus selects (else scrape annotations, and no ServiceMonitor at all), the image
pre-pull DaemonSet, prometheus-adapter (serving the queue-depth metric to the HPA) and NVIDIA's
DCGM exporter. Those add-ons are cluster-wide (fixed release names in ``monitoring``): one
ModelService with them per cluster.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import pulumi
import pulumi_kubernetes as k8s

from components import k8s_specs

PROMETHEUS_COMMUNITY_REPO = "https://prometheus-community.github.io/helm-charts"
DCGM_EXPORTER_REPO = "https://nvidia.github.io/dcgm-exporter/helm-charts"
MONITORING_NAMESPACE = "monitoring"
INSTALLED_PROMETHEUS_URL = (
    f"http://{k8s_specs.PROMETHEUS_STACK_RELEASE}-prometheus.{MONITORING_NAMESPACE}.svc:9090"
)
"""The Prometheus Service of the kube-prometheus-stack release installed here (``fullnameOverride``
is the release name, and the chart names the Service ``<fullname>-prometheus``)."""
DEFAULT_CPU = "700m"
"""CPU request of a model pod: five fit a 4-vCPU node beside its DaemonSets (``make render`` prints
the arithmetic; ``deploy/config.py`` refuses a stack where the time-sliced pods do not fit)."""
DEFAULT_MEMORY = "2560Mi"
"""Memory request and limit of a model pod: five fit a 16 GiB node beside its DaemonSets."""
DCGM_EXPORTER_REQUESTS = {"cpu": "100m", "memory": "256Mi"}
"""The DCGM exporter's requests on each GPU node (the chart requests nothing unless told)."""
NODE_EXPORTER_REQUESTS = {"cpu": "50m", "memory": "64Mi"}
"""kube-prometheus-stack's node-exporter requests on each node, GPU nodes included."""

_KINDS: dict[str, Any] = {
    "Namespace": k8s.core.v1.Namespace,
    "ServiceAccount": k8s.core.v1.ServiceAccount,
    "Deployment": k8s.apps.v1.Deployment,
    "Service": k8s.core.v1.Service,
    "HorizontalPodAutoscaler": k8s.autoscaling.v2.HorizontalPodAutoscaler,
    "PodDisruptionBudget": k8s.policy.v1.PodDisruptionBudget,
    "NetworkPolicy": k8s.networking.v1.NetworkPolicy,
    "DaemonSet": k8s.apps.v1.DaemonSet,
    "Secret": k8s.core.v1.Secret,
}
"""Kinds with a typed pulumi-kubernetes class; others (the ServiceMonitor CRD) go through CustomResource."""


@dataclass
class ServingCredentials:
    """What an authenticated server needs (``ServingIdentity.credentials`` makes them)."""

    cert_pem: pulumi.Input[str]
    """The server's certificate (PEM)."""

    key_pem: pulumi.Input[str]
    """Its private key (PEM; a secret)."""

    ca_pem: pulumi.Input[str]
    """The CA that signed it: Prometheus and the edge devices verify against it."""

    token: pulumi.Input[str]
    """The inference bearer token (a secret)."""

    metrics_token: pulumi.Input[str]
    """The bearer token that reads ``/metrics`` and nothing else (a secret)."""


@dataclass
class ModelServiceArgs:
    """Inputs of :class:`ModelService`.

    Everything but ``image``, ``credentials`` and ``eip_allocation_ids`` is concrete: it decides which
    objects exist and what they say. Those three are filled in by ``__main__.py`` from the components
    that make them.
    """

    name: str
    """App name and the model's name (``manifest["model"]``)."""

    bundle_version: str
    """``manifest["version"]``, as a label."""

    pool_arches: Sequence[str]
    """GPU architectures of the pools the service runs on (``dualdeploy.io/gpu-arch`` values)."""

    engine_arches: Sequence[str]
    """Architectures with a TensorRT engine in the bundle."""

    allow_cuda_fallback: bool = False
    """A pool without an engine serves the ONNX variant through CUDA (warns) instead of failing."""

    namespace: str = "dualdeploy"
    """Namespace of every object."""

    port: int = 8000
    """The server's port."""

    grpc_port: int = 8001
    """The server's v2 gRPC port (``--grpc-port``; Triton's usual 8001), exposed by the Service; 0: none."""

    gpu_resource: str = k8s_specs.GPU_RESOURCE
    """``nvidia.com/gpu``, or ``nvidia.com/gpu.shared`` if the device plugin renames time-sliced GPUs."""

    cpu: str = DEFAULT_CPU
    """CPU request (the limit is twice it)."""

    memory: str = DEFAULT_MEMORY
    """Memory request and limit."""

    min_replicas: int = 2
    """HPA minimum."""

    max_replicas: int = 10
    """HPA maximum."""

    target_cpu_utilization: int = 70
    """HPA CPU target, percent of the request."""

    queue_depth_target: int | None = None
    """Average in-flight requests per pod for the HPA's Pods metric; None scales on CPU only."""

    prometheus_adapter: bool = False
    """Install prometheus-adapter with the rule that serves the queue-depth metric."""

    prometheus_url: str | None = None
    """Where prometheus-adapter queries Prometheus; None: the Prometheus installed with
    ``prometheus_operator`` (:data:`INSTALLED_PROMETHEUS_URL`)."""

    prometheus_operator: bool = False
    """Install kube-prometheus-stack (the Prometheus operator, its CRDs and one Prometheus) and
    monitor the server through a ServiceMonitor it selects; False: scrape annotations, no
    ServiceMonitor anywhere."""

    drain_seconds: int = 30
    """The server's drain after SIGTERM; preStop + drain must fit the two-minute Spot notice."""

    load_balancer: str = "none"
    """One of ``k8s_specs.LOAD_BALANCERS``: ``none`` (ClusterIP), ``internal`` or ``internet-facing`` NLB."""

    pre_pull: bool = False
    """A DaemonSet that keeps the image on every GPU node the service may use."""

    dcgm_exporter: bool = False
    """Install NVIDIA's DCGM exporter (GPU utilisation and memory metrics) on the GPU nodes."""

    prometheus_adapter_chart_version: str = "4.14.1"
    """Pinned prometheus-adapter chart."""

    dcgm_exporter_chart_version: str = "4.1.1"
    """Pinned dcgm-exporter chart."""

    prometheus_stack_chart_version: str = "75.15.0"
    """Pinned kube-prometheus-stack chart (installed with ``prometheus_operator``)."""

    authenticated: bool = False
    """Serve HTTPS with bearer tokens from a credentials Secret (``credentials`` fills it); the Service
    listens on 443. The hybrid stack sets it: its edge devices reach this server as their teacher."""

    static_ingress: bool = False
    """Put the internet-facing NLB on the Elastic IPs in ``eip_allocation_ids`` (one per public subnet)."""

    load_balancer_source_ranges: Sequence[str] = ()
    """CIDRs that may reach the NLB (``loadBalancerSourceRanges``); empty: any address."""

    credentials: ServingCredentials | None = None
    """The Secret's values; required with ``authenticated``."""

    eip_allocation_ids: pulumi.Input[Sequence[str]] | None = None
    """The NLB's Elastic IP allocations; required with ``static_ingress``."""

    image: pulumi.Input[str] | None = None
    """The image by digest, ``<repository>@sha256:<digest>`` (``ModelImage.image_ref``). Required; it
    defaults to None only because the stack config is read before the image exists, and
    ``__main__.py`` fills it in."""


def _validate_ingress(args: ModelServiceArgs) -> None:
    """The Service's reach: its kind, its credentials and its addresses."""
    if args.load_balancer not in k8s_specs.LOAD_BALANCERS:
        raise ValueError(
            f"load_balancer: {args.load_balancer!r} is not one of {', '.join(k8s_specs.LOAD_BALANCERS)}"
        )
    if args.authenticated and args.credentials is None:
        raise ValueError("credentials: an authenticated service needs them (ServingIdentity.credentials)")
    if args.static_ingress and (args.load_balancer != "internet-facing" or args.eip_allocation_ids is None):
        raise ValueError(
            "static_ingress: needs load_balancer 'internet-facing' and eip_allocation_ids "
            "(Network.ingress_allocation_ids, with NetworkArgs.ingress_addresses)"
        )
    if args.load_balancer_source_ranges and args.load_balancer == "none":
        raise ValueError("load_balancer_source_ranges: only a load balancer has source ranges")


def validate(args: ModelServiceArgs) -> list[str]:
    """Check the inputs; return the warnings.

    Raises:
        ValueError: naming the input and the allowed values.
    """
    if args.image is None:
        raise ValueError("image: required; pass the image by digest (ModelImage.image_ref)")
    if args.min_replicas < 1 or args.min_replicas > args.max_replicas:
        raise ValueError(
            f"min_replicas: {args.min_replicas} must be between 1 and max_replicas ({args.max_replicas})"
        )
    if not args.pool_arches:
        raise ValueError("pool_arches: the service needs at least one GPU pool architecture to run on")
    if args.queue_depth_target is not None and not args.prometheus_adapter:
        raise ValueError(
            "queue_depth_target: the HPA can only read the queue-depth metric through prometheus-adapter; "
            "set prometheus_adapter True or drop queue_depth_target"
        )
    if k8s_specs.grace_seconds(args) > k8s_specs.SPOT_NOTICE_BUDGET_S:
        raise ValueError(
            f"drain_seconds: preStop {k8s_specs.PRESTOP_SECONDS} s + drain {args.drain_seconds} s "
            f"exceeds the {k8s_specs.SPOT_NOTICE_BUDGET_S} s that fit the two-minute Spot notice"
        )
    if args.prometheus_adapter and args.prometheus_url is None and not args.prometheus_operator:
        raise ValueError(
            "prometheus_url: prometheus-adapter needs a Prometheus to query; install one with "
            "prometheus_operator True or pass the URL of yours"
        )
    if args.gpu_resource not in k8s_specs.GPU_RESOURCES:
        raise ValueError(
            f"gpu_resource: {args.gpu_resource!r} is not one of {', '.join(k8s_specs.GPU_RESOURCES)}"
        )
    _validate_ingress(args)
    warnings: list[str] = []
    missing = sorted(set(args.pool_arches) - set(args.engine_arches))
    if missing:
        have = ", ".join(sorted(args.engine_arches)) or "none"
        if not args.allow_cuda_fallback:
            raise ValueError(
                f"engine_arches: the service targets pools of {', '.join(missing)} but the bundle has "
                f"TensorRT engines only for {have}; build those engines, drop the pools, or allow the "
                "CUDA fallback (dualdeploy:requireEngines false)"
            )
        warnings.append(
            f"model service {args.name}: no TensorRT engine for {', '.join(missing)} (engines: {have}); "
            "pods there serve the ONNX variant through CUDA, slower than an engine"
        )
    return warnings


def prometheus_url(args: ModelServiceArgs) -> str:
    """The Prometheus prometheus-adapter queries: the one given, else the one installed here."""
    return args.prometheus_url or INSTALLED_PROMETHEUS_URL


def prometheus_stack_values(args: ModelServiceArgs) -> dict[str, Any]:
    """kube-prometheus-stack chart values: the operator and one Prometheus, sized for the GPU nodes."""
    return {
        # The Prometheus Service is then <release>-prometheus, whatever Helm's naming rules do.
        "fullnameOverride": k8s_specs.PROMETHEUS_STACK_RELEASE,
        # EKS runs the control plane: its scheduler, controller manager and etcd cannot be scraped.
        "kubeControllerManager": {"enabled": False},
        "kubeScheduler": {"enabled": False},
        "kubeEtcd": {"enabled": False},
        # Metrics for the HPA and for people: no dashboards or alert routes are configured here.
        "grafana": {"enabled": False},
        "alertmanager": {"enabled": False},
        # Host metrics on every node, GPU nodes too, with requests the capacity check counts.
        "prometheus-node-exporter": {
            "tolerations": [{"operator": "Exists", "effect": "NoSchedule"}],
            "resources": {"requests": dict(NODE_EXPORTER_REQUESTS)},
        },
    }


def gpu_node_daemonsets(args: ModelServiceArgs) -> dict[str, dict[str, str]]:
    """The DaemonSets this service puts on every GPU node, with their requests (for the capacity check)."""
    daemonsets: dict[str, dict[str, str]] = {}
    if args.pre_pull:
        daemonsets["image pre-pull"] = k8s_specs.PREPULL_REQUESTS
    if args.dcgm_exporter:
        daemonsets["dcgm-exporter"] = DCGM_EXPORTER_REQUESTS
    if args.prometheus_operator:
        daemonsets["node-exporter"] = NODE_EXPORTER_REQUESTS
    return daemonsets


def prometheus_adapter_values(args: ModelServiceArgs) -> dict[str, Any]:
    """prometheus-adapter chart values: where Prometheus is, and the rule for the queue metric.

    The chart joins ``prometheus.url``, ``port`` and ``path`` itself, so the URL is split here.
    """
    parts = urlsplit(prometheus_url(args))
    default_port = 443 if parts.scheme == "https" else 9090
    return {
        "prometheus": {
            "url": f"{parts.scheme}://{parts.hostname}",
            "port": parts.port or default_port,
            "path": parts.path.rstrip("/"),
        },
        **k8s_specs.prometheus_adapter_rules(args),
    }


def dcgm_exporter_values(args: ModelServiceArgs) -> dict[str, Any]:
    """dcgm-exporter chart values: only on GPU nodes, tolerating their taint."""
    return {
        "affinity": {
            "nodeAffinity": {
                "requiredDuringSchedulingIgnoredDuringExecution": {
                    "nodeSelectorTerms": [
                        {"matchExpressions": [{"key": k8s_specs.GPU_ARCH_LABEL, "operator": "Exists"}]}
                    ]
                }
            }
        },
        "tolerations": [{"key": k8s_specs.GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"}],
        "resources": {"requests": dict(DCGM_EXPORTER_REQUESTS)},
        # Its ServiceMonitor only where the operator is installed, labelled for its Prometheus.
        "serviceMonitor": (
            {"enabled": True, "additionalLabels": {"release": k8s_specs.PROMETHEUS_STACK_RELEASE}}
            if args.prometheus_operator
            else {"enabled": False}
        ),
    }


def _monitoring_chart(
    resource_name: str,
    chart: str,
    source: tuple[str, str],
    values: dict[str, Any],
    opts: pulumi.ResourceOptions,
) -> k8s.helm.v3.Release:
    """A pinned chart in ``monitoring``, released under its own name; ``source`` is (repository, version)."""
    repo, version = source
    return k8s.helm.v3.Release(
        resource_name,
        name=chart,
        chart=chart,
        version=version,
        repository_opts=k8s.helm.v3.RepositoryOptsArgs(repo=repo),
        namespace=MONITORING_NAMESPACE,
        create_namespace=True,
        values=values,
        opts=opts,
    )


def _fill_credentials(objects: list[dict[str, Any]], credentials: ServingCredentials) -> pulumi.Output[str]:
    """Put the credentials into the Secret's spec; return their hash for the pod-template annotation.

    The hash is not secret (SHA-256 of a random token and key): a preview shows that the pods roll
    when a certificate or token changes, and shows nothing of them.
    """
    secret = next(o for o in objects if o["kind"] == "Secret")
    values = {
        "tls.crt": credentials.cert_pem,
        "tls.key": credentials.key_pem,
        "ca.crt": credentials.ca_pem,
        "token": credentials.token,
        "metrics-token": credentials.metrics_token,
    }
    assert set(values) == set(k8s_specs.AUTH_KEYS)
    secret["stringData"] = {key: pulumi.Output.secret(value) for key, value in values.items()}
    digest = pulumi.Output.all(*values.values()).apply(
        lambda parts: hashlib.sha256("\0".join(str(p) for p in parts).encode()).hexdigest()
    )
    return pulumi.Output.unsecret(digest)


class ModelService(pulumi.ComponentResource):
    """The model server's Kubernetes objects, created with the provider passed in ``opts``."""

    namespace: str
    deployment_name: str
    url: pulumi.Output[str]

    def __init__(self, name: str, args: ModelServiceArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        """Create the objects.

        Raises:
            ValueError: an input is out of its allowed values (named in the message).
        """
        warnings = validate(args)
        super().__init__("dualdeploy:model_service:ModelService", name, None, opts)
        for warning in warnings:
            pulumi.log.warn(warning, resource=self)
        child = pulumi.ResourceOptions(parent=self)

        objects = k8s_specs.all_objects(args)
        ns_obj, *namespaced = objects
        ns = k8s.core.v1.Namespace(f"{name}-namespace", metadata=ns_obj["metadata"], opts=child)
        in_ns = pulumi.ResourceOptions(parent=self, depends_on=[ns])

        # The monitoring stack first: its CRDs define ServiceMonitor, and its Prometheus is what the
        # ServiceMonitors report to and prometheus-adapter queries.
        monitoring: list[pulumi.Resource] = []
        if args.prometheus_operator:
            monitoring.append(
                _monitoring_chart(
                    f"{name}-prometheus-stack",
                    k8s_specs.PROMETHEUS_STACK_RELEASE,
                    (PROMETHEUS_COMMUNITY_REPO, args.prometheus_stack_chart_version),
                    prometheus_stack_values(args),
                    child,
                )
            )
        after_monitoring = pulumi.ResourceOptions(parent=self, depends_on=monitoring)

        extra_deps: list[pulumi.Resource] = []
        if args.prometheus_adapter and k8s_specs.queue_metric(args) is not None:
            extra_deps.append(
                _monitoring_chart(
                    f"{name}-prometheus-adapter",
                    "prometheus-adapter",
                    (PROMETHEUS_COMMUNITY_REPO, args.prometheus_adapter_chart_version),
                    prometheus_adapter_values(args),
                    after_monitoring,
                )
            )
        if args.dcgm_exporter:
            _monitoring_chart(
                f"{name}-dcgm-exporter",
                "dcgm-exporter",
                (DCGM_EXPORTER_REPO, args.dcgm_exporter_chart_version),
                dcgm_exporter_values(args),
                after_monitoring,
            )

        credentials_hash: pulumi.Output[str] | None = None
        if args.credentials is not None and args.authenticated:
            credentials_hash = _fill_credentials(namespaced, args.credentials)
        for obj in namespaced:
            kind = obj["kind"]
            if kind == "Deployment" and credentials_hash is not None:
                obj["spec"]["template"]["metadata"]["annotations"][k8s_specs.CREDENTIALS_ANNOTATION] = (
                    credentials_hash
                )
            if kind == "Service" and args.static_ingress and args.eip_allocation_ids is not None:
                obj["metadata"]["annotations"][k8s_specs.EIP_ANNOTATION] = pulumi.Output.from_input(
                    args.eip_allocation_ids
                ).apply(",".join)
            suffix = {"HorizontalPodAutoscaler": "hpa", "PodDisruptionBudget": "pdb"}.get(kind, kind.lower())
            if kind == "DaemonSet":
                suffix = "prepull"
            # The HPA reads the queue metric from the adapter: create it once the adapter exists.
            obj_opts = in_ns
            if kind == "HorizontalPodAutoscaler" and extra_deps:
                obj_opts = pulumi.ResourceOptions(parent=self, depends_on=[ns, *extra_deps])
            if kind == "ServiceMonitor":
                obj_opts = pulumi.ResourceOptions(parent=self, depends_on=[ns, *monitoring])
            self._create(f"{name}-{suffix}", obj, obj_opts)

        self.namespace = args.namespace
        self.deployment_name = args.name
        scheme = "https" if args.authenticated else "http"
        self.url = pulumi.Output.from_input(f"{scheme}://{args.name}.{args.namespace}.svc.cluster.local/v2")
        self.register_outputs({"url": self.url})

    @staticmethod
    def _create(resource_name: str, obj: dict[str, Any], opts: pulumi.ResourceOptions) -> pulumi.Resource:
        """Pass one spec dict to its pulumi-kubernetes class (keys stay as Kubernetes spells them)."""
        cls = _KINDS.get(obj["kind"])
        if cls is None:
            return k8s.apiextensions.CustomResource(
                resource_name,
                api_version=obj["apiVersion"],
                kind=obj["kind"],
                metadata=obj["metadata"],
                spec=obj["spec"],
                opts=opts,
            )
        kwargs: dict[str, Any] = {"metadata": obj["metadata"]}
        if "spec" in obj:
            kwargs["spec"] = obj["spec"]
        if obj["kind"] == "Secret":
            kwargs["type"] = obj["type"]
            kwargs["string_data"] = obj["stringData"]
        if "automountServiceAccountToken" in obj:
            kwargs["automount_service_account_token"] = obj["automountServiceAccountToken"]
        resource: pulumi.Resource = cls(resource_name, **kwargs, opts=opts)
        return resource
