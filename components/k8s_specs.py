"""Kubernetes object specs for the model service, as plain functions that return dicts.

The same functions feed two callers (STYLE rule 9):

- the ModelService component, which passes each dict to pulumi-kubernetes with the cluster's
  provider (values may then be Pulumi Outputs, e.g. the image digest);
- ``deploy/render.py`` (``make render STACK=...``), which writes them as YAML for
  ``kubernetes-validate`` and ``checkov``, with marked placeholders for what only a real apply
  knows.

How the objects make cold starts and Spot interruptions harmless:

- the image carries the bundle (no download at start); a startup probe gives the server time to
  load and warm the model, and readiness only turns true after warm-up, so no request waits on
  a cold pod; an optional DaemonSet pre-pulls the image onto every GPU node;
- on a Spot interruption the managed node group drains the node; each pod gets SIGTERM after a
  short ``preStop`` pause (endpoints stop sending first), the server drains in-flight requests,
  and ``terminationGracePeriodSeconds`` covers both within the two-minute notice; the PDB and the
  spread over zones and capacity types keep enough replicas elsewhere meanwhile.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

GPU_RESOURCE = "nvidia.com/gpu"
GPU_RESOURCES = (GPU_RESOURCE, "nvidia.com/gpu.shared")
"""The device plugin's resource names: whole GPUs, or time-sliced shares when the plugin renames them."""
GPU_ARCH_LABEL = "dualdeploy.io/gpu-arch"
CAPACITY_LABEL = "dualdeploy.io/capacity-type"
PLACEHOLDER_ANNOTATION = "dualdeploy.io/placeholders"
LOAD_BALANCERS = ("none", "internal", "internet-facing")
"""The Service types: ClusterIP, or an internal or internet-facing NLB."""
RUN_AS_USER = 10001
"""The uid ``serving/Dockerfile`` creates and runs as (its ``UID`` build argument)."""
BUNDLE_PATH = "/srv/bundle"
"""Where ``serving/Dockerfile`` bakes the bundle (its ``DUALDEPLOY_BUNDLE``)."""
LIVE_PATH = "/v2/health/live"
READY_PATH = "/v2/health/ready"
SPOT_NOTICE_BUDGET_S = 110
"""Seconds a pod may take to stop: the Spot notice is 120 s; 10 s stay for the node's own drain."""
PRESTOP_SECONDS = 5
"""preStop pause that lets endpoints and load balancers stop sending before the server drains."""
EXIT_SECONDS = 5
"""What the grace period keeps beyond preStop and the drain for the process to exit."""


@dataclass(frozen=True)
class ServiceSpec:
    """Everything the objects of one model service depend on (plain values or Pulumi Inputs).

    Attributes:
        name: the app name, e.g. the model name ``demo``.
        namespace: its namespace.
        image: the image by digest, ``repo@sha256:...``.
        model: ``manifest["model"]``; the server serves it under this name.
        bundle_version: ``manifest["version"]``, as a label.
        gpu_arches: node architectures the pods may run on (those with an engine, or any pool
            architecture when the stack allows the CUDA fallback).
        port: the server's port.
        gpu_resource: ``nvidia.com/gpu``, or ``nvidia.com/gpu.shared`` when time-slicing renames it.
        cpu / memory: requests (memory is also the limit; CPU limit is twice the request).
        min_replicas / max_replicas / target_cpu: HPA bounds.
        queue_metric / queue_target: the Pods metric (average per pod), or None for CPU only.
        drain_seconds / prestop_seconds: the server's drain (its ``DUALDEPLOY_GRACE_PERIOD_S``) and
            the pause before SIGTERM.
        load_balancer: ``none``, ``internal`` or ``internet-facing``.
        prometheus_operator: a ServiceMonitor (True) or scrape annotations (False).
        bundle_path: where the image keeps the bundle.
        placeholders: names of values that are placeholders (rendered offline), for the annotation.
    """

    name: str
    namespace: str
    image: Any
    model: str
    bundle_version: str
    gpu_arches: Sequence[str]
    port: int = 8000
    gpu_resource: str = GPU_RESOURCE
    cpu: str = "2"
    memory: str = "8Gi"
    min_replicas: int = 2
    max_replicas: int = 10
    target_cpu: int = 70
    queue_metric: str | None = None
    queue_target: int | None = None
    drain_seconds: int = 30
    prestop_seconds: int = PRESTOP_SECONDS
    load_balancer: str = "none"
    prometheus_operator: bool = False
    bundle_path: str = BUNDLE_PATH
    placeholders: Sequence[str] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        """Reject combinations no object could honour.

        Raises:
            ValueError: naming the field and the allowed values.
        """
        if self.min_replicas < 1 or self.min_replicas > self.max_replicas:
            raise ValueError(
                "min_replicas: need 1 ≤ min_replicas ≤ max_replicas, "
                f"got {self.min_replicas}..{self.max_replicas}"
            )
        if not self.gpu_arches:
            raise ValueError("gpu_arches: at least one GPU architecture the pods may run on")
        if self.grace_seconds > SPOT_NOTICE_BUDGET_S:
            raise ValueError(
                f"drain_seconds: preStop {self.prestop_seconds} s + drain {self.drain_seconds} s "
                f"exceeds the {SPOT_NOTICE_BUDGET_S} s that fit the two-minute Spot notice"
            )
        if (self.queue_metric is None) != (self.queue_target is None):
            raise ValueError("queue_metric and queue_target: set both or neither")
        if self.gpu_resource not in GPU_RESOURCES:
            raise ValueError(f"gpu_resource: {self.gpu_resource!r} is not one of {', '.join(GPU_RESOURCES)}")
        if self.load_balancer not in LOAD_BALANCERS:
            raise ValueError(
                f"load_balancer: {self.load_balancer!r} is not one of {', '.join(LOAD_BALANCERS)}"
            )

    @property
    def grace_seconds(self) -> int:
        """terminationGracePeriodSeconds: preStop, then the drain, then 5 s to exit."""
        return self.prestop_seconds + self.drain_seconds + EXIT_SECONDS

    @property
    def labels(self) -> dict[str, str]:
        """The selector labels (stable across versions)."""
        return {"app.kubernetes.io/name": self.name, "app.kubernetes.io/component": "model-server"}

    @property
    def all_labels(self) -> dict[str, str]:
        """Selector labels plus descriptive ones."""
        return {
            **self.labels,
            "app.kubernetes.io/part-of": "dualdeploy",
            "app.kubernetes.io/managed-by": "pulumi",
            "dualdeploy.io/bundle-version": self.bundle_version,
        }


def _metadata(spec: ServiceSpec, name: str, *, namespaced: bool = True, **extra: Any) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "labels": spec.all_labels}
    if namespaced:
        meta["namespace"] = spec.namespace
    annotations = dict(extra.pop("annotations", {}) or {})
    if spec.placeholders:
        annotations[PLACEHOLDER_ANNOTATION] = ", ".join(spec.placeholders)
    if annotations:
        meta["annotations"] = annotations
    meta.update(extra)
    return meta


def namespace(spec: ServiceSpec) -> dict[str, Any]:
    """The namespace, with the restricted Pod Security Standard enforced."""
    meta = _metadata(spec, spec.namespace, namespaced=False)
    meta["labels"] = {
        **meta["labels"],
        "pod-security.kubernetes.io/enforce": "restricted",
        "pod-security.kubernetes.io/enforce-version": "latest",
    }
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": meta}


def service_account(spec: ServiceSpec) -> dict[str, Any]:
    """The pods' identity; it carries no API token (the server never calls the Kubernetes API)."""
    return {
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": _metadata(spec, spec.name),
        "automountServiceAccountToken": False,
    }


def _gpu_scheduling(spec: ServiceSpec) -> dict[str, Any]:
    return {
        "affinity": {
            "nodeAffinity": {
                # Only nodes whose GPU architecture the bundle serves (TensorRT engines are per arch).
                "requiredDuringSchedulingIgnoredDuringExecution": {
                    "nodeSelectorTerms": [
                        {
                            "matchExpressions": [
                                {"key": GPU_ARCH_LABEL, "operator": "In", "values": list(spec.gpu_arches)}
                            ]
                        }
                    ]
                },
                # Prefer Spot nodes when both kinds have room; the fallback pool is for shortages.
                "preferredDuringSchedulingIgnoredDuringExecution": [
                    {
                        "weight": 50,
                        "preference": {
                            "matchExpressions": [
                                {"key": CAPACITY_LABEL, "operator": "In", "values": ["spot"]}
                            ]
                        },
                    }
                ],
            }
        },
        # GPU pools are tainted so that only GPU workloads land there. Spot pools carry no taint of
        # their own: the Spot-ness is handled by the spread below and the PDB, not by repelling pods.
        "tolerations": [{"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"}],
        "topologySpreadConstraints": [
            {
                "maxSkew": 1,
                "topologyKey": key,
                "whenUnsatisfiable": "ScheduleAnyway",
                "labelSelector": {"matchLabels": spec.labels},
            }
            for key in (
                "topology.kubernetes.io/zone",
                "eks.amazonaws.com/capacityType",
                "kubernetes.io/hostname",
            )
        ],
    }


def _security_context() -> dict[str, Any]:
    return {
        "runAsNonRoot": True,
        "runAsUser": RUN_AS_USER,
        "runAsGroup": RUN_AS_USER,
        "readOnlyRootFilesystem": True,
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def _probe(path: str, *, period: int, failures: int) -> dict[str, Any]:
    return {
        "httpGet": {"path": path, "port": "http"},
        "periodSeconds": period,
        "failureThreshold": failures,
        "timeoutSeconds": 2,
    }


def deployment(spec: ServiceSpec) -> dict[str, Any]:
    """The model server Deployment. No ``replicas``: the HPA owns the count."""
    cpu_limit = _double_cpu(spec.cpu)
    container = {
        "name": "server",
        "image": spec.image,
        # By digest, "Always" costs one manifest check and never yields a different image.
        "imagePullPolicy": "Always",
        # The image's own CMD, spelled out; every setting goes through the server's DUALDEPLOY_* variables.
        "command": ["python3", "-m", "serving"],
        "ports": [{"name": "http", "containerPort": spec.port, "protocol": "TCP"}],
        "env": [
            {"name": "DUALDEPLOY_BUNDLE", "value": spec.bundle_path},
            {"name": "DUALDEPLOY_HOST", "value": "0.0.0.0"},
            {"name": "DUALDEPLOY_PORT", "value": str(spec.port)},
            {"name": "DUALDEPLOY_VARIANT", "value": "auto"},
            # The nodes are GPU nodes by affinity: no detection guesswork inside the container.
            {"name": "DUALDEPLOY_DEVICE_CLASS", "value": "nvidia_gpu"},
            # How long the server lets in-flight requests finish after SIGTERM.
            {"name": "DUALDEPLOY_GRACE_PERIOD_S", "value": str(spec.drain_seconds)},
            {"name": "DUALDEPLOY_LOG_FORMAT", "value": "json"},
        ],
        "resources": {
            "requests": {"cpu": spec.cpu, "memory": spec.memory, spec.gpu_resource: "1"},
            "limits": {"cpu": cpu_limit, "memory": spec.memory, spec.gpu_resource: "1"},
        },
        # Cold start: up to 5 minutes to load and warm the model before liveness counts.
        "startupProbe": _probe(READY_PATH, period=5, failures=60),
        "readinessProbe": _probe(READY_PATH, period=5, failures=2),
        "livenessProbe": _probe(LIVE_PATH, period=10, failures=3),
        # Endpoints and load balancers stop sending before SIGTERM starts the server's drain.
        "lifecycle": {"preStop": {"sleep": {"seconds": spec.prestop_seconds}}},
        "securityContext": _security_context(),
        "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}],
    }
    annotations: dict[str, str] = {}
    if not spec.prometheus_operator:
        annotations = {
            "prometheus.io/scrape": "true",
            "prometheus.io/port": str(spec.port),
            "prometheus.io/path": "/metrics",
        }
    pod_spec = {
        "serviceAccountName": spec.name,
        "automountServiceAccountToken": False,
        "terminationGracePeriodSeconds": spec.grace_seconds,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": RUN_AS_USER,
            "fsGroup": RUN_AS_USER,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [container],
        "volumes": [{"name": "tmp", "emptyDir": {"sizeLimit": "1Gi"}}],
        **_gpu_scheduling(spec),
    }
    template_meta: dict[str, Any] = {"labels": spec.all_labels}
    if annotations:
        template_meta["annotations"] = annotations
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _metadata(spec, spec.name),
        "spec": {
            "selector": {"matchLabels": spec.labels},
            "revisionHistoryLimit": 5,
            # Surge during roll-outs, never drop below the current count.
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": "25%", "maxUnavailable": 0}},
            "template": {"metadata": template_meta, "spec": pod_spec},
        },
    }


def service(spec: ServiceSpec) -> dict[str, Any]:
    """ClusterIP by default; an NLB (internal or internet-facing) through annotations."""
    annotations: dict[str, str] = {}
    kind = "ClusterIP"
    if spec.load_balancer != "none":
        kind = "LoadBalancer"
        annotations = {
            "service.beta.kubernetes.io/aws-load-balancer-type": "nlb",
            "service.beta.kubernetes.io/aws-load-balancer-internal": str(
                spec.load_balancer == "internal"
            ).lower(),
        }
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(spec, spec.name, annotations=annotations),
        "spec": {
            "type": kind,
            "selector": spec.labels,
            "ports": [{"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"}],
        },
    }


def horizontal_pod_autoscaler(spec: ServiceSpec) -> dict[str, Any]:
    """autoscaling/v2 on CPU (and the queue-depth Pods metric when set): up fast, down slowly."""
    metrics: list[dict[str, Any]] = [
        {
            "type": "Resource",
            "resource": {
                "name": "cpu",
                "target": {"type": "Utilization", "averageUtilization": spec.target_cpu},
            },
        }
    ]
    if spec.queue_metric is not None:
        metrics.append(
            {
                "type": "Pods",
                "pods": {
                    "metric": {"name": spec.queue_metric},
                    "target": {"type": "AverageValue", "averageValue": str(spec.queue_target)},
                },
            }
        )
    return {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": _metadata(spec, spec.name),
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": spec.name},
            "minReplicas": spec.min_replicas,
            "maxReplicas": spec.max_replicas,
            "metrics": metrics,
            "behavior": {
                # Double every 15 s at a peak (20 → 200 in about a minute, nodes permitting).
                "scaleUp": {
                    "stabilizationWindowSeconds": 0,
                    "selectPolicy": "Max",
                    "policies": [
                        {"type": "Percent", "value": 100, "periodSeconds": 15},
                        {"type": "Pods", "value": 4, "periodSeconds": 15},
                    ],
                },
                # Give back at most 10 % a minute, after 5 minutes of lower load.
                "scaleDown": {
                    "stabilizationWindowSeconds": 300,
                    "selectPolicy": "Min",
                    "policies": [{"type": "Percent", "value": 10, "periodSeconds": 60}],
                },
            },
        },
    }


def pod_disruption_budget(spec: ServiceSpec) -> dict[str, Any]:
    """Voluntary disruptions (node drains, Spot rebalancing) take one pod, or 10 % of many, at a time."""
    unavailable: int | str = 1 if spec.min_replicas < 10 else "10%"
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": _metadata(spec, spec.name),
        "spec": {
            "maxUnavailable": unavailable,
            "selector": {"matchLabels": spec.labels},
            # A pod that never became ready must not block a drain (a Spot node has two minutes).
            "unhealthyPodEvictionPolicy": "AlwaysAllow",
        },
    }


def network_policy(spec: ServiceSpec) -> dict[str, Any]:
    """Only the server port is reachable; egress stays open (DNS, the metrics scrape replies).

    It selects every pod of the app, the pre-pull holders included (they listen on nothing).
    """
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": _metadata(spec, spec.name),
        "spec": {
            "podSelector": {"matchLabels": {"app.kubernetes.io/name": spec.name}},
            "policyTypes": ["Ingress"],
            "ingress": [{"ports": [{"port": spec.port, "protocol": "TCP"}]}],
        },
    }


def service_monitor(spec: ServiceSpec) -> dict[str, Any]:
    """A Prometheus-operator ServiceMonitor for ``/metrics`` (only when the operator is installed)."""
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "ServiceMonitor",
        "metadata": _metadata(spec, spec.name),
        "spec": {
            "selector": {"matchLabels": spec.labels},
            "namespaceSelector": {"matchNames": [spec.namespace]},
            "endpoints": [{"port": "http", "path": "/metrics", "interval": "15s"}],
        },
    }


def prepull_daemonset(spec: ServiceSpec) -> dict[str, Any]:
    """Keeps the image on every GPU node the service may use, so a new pod does not wait for a pull."""
    container = {
        "name": "hold",
        "image": spec.image,
        "imagePullPolicy": "Always",
        "command": ["sleep", "infinity"],
        "resources": {
            "requests": {"cpu": "10m", "memory": "16Mi"},
            "limits": {"cpu": "50m", "memory": "32Mi"},
        },
        "securityContext": _security_context(),
        # A sleeping holder has nothing to probe but being alive; the kubelet restarts it if it exits.
        "livenessProbe": {"exec": {"command": ["true"]}, "periodSeconds": 300},
        "readinessProbe": {"exec": {"command": ["true"]}, "periodSeconds": 300},
    }
    labels = {**spec.labels, "app.kubernetes.io/component": "image-prepull"}
    scheduling = _gpu_scheduling(spec)
    return {
        "apiVersion": "apps/v1",
        "kind": "DaemonSet",
        "metadata": _metadata(spec, f"{spec.name}-prepull"),
        "spec": {
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": {**spec.all_labels, **labels}},
                "spec": {
                    "serviceAccountName": spec.name,
                    "automountServiceAccountToken": False,
                    "securityContext": {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}},
                    "containers": [container],
                    "affinity": {
                        "nodeAffinity": {
                            "requiredDuringSchedulingIgnoredDuringExecution": scheduling["affinity"][
                                "nodeAffinity"
                            ]["requiredDuringSchedulingIgnoredDuringExecution"]
                        }
                    },
                    "tolerations": scheduling["tolerations"],
                },
            },
        },
    }


def prometheus_adapter_rules(spec: ServiceSpec) -> dict[str, Any]:
    """prometheus-adapter values that serve the queue-depth gauge to the HPA as a Pods metric."""
    if spec.queue_metric is None:
        raise ValueError("queue_metric: not set, so there is no metric for prometheus-adapter to serve")
    return {
        "rules": {
            "default": False,
            "custom": [
                {
                    "seriesQuery": f'{spec.queue_metric}{{namespace!="",pod!=""}}',
                    "resources": {
                        "overrides": {"namespace": {"resource": "namespace"}, "pod": {"resource": "pod"}}
                    },
                    "name": {"as": spec.queue_metric},
                    "metricsQuery": "avg(<<.Series>>{<<.LabelMatchers>>}) by (<<.GroupBy>>)",
                }
            ],
        }
    }


def all_objects(spec: ServiceSpec, *, pre_pull: bool = False) -> list[dict[str, Any]]:
    """Every object of the service, in apply order."""
    objects = [
        namespace(spec),
        service_account(spec),
        deployment(spec),
        service(spec),
        horizontal_pod_autoscaler(spec),
        pod_disruption_budget(spec),
        network_policy(spec),
    ]
    if spec.prometheus_operator:
        objects.append(service_monitor(spec))
    if pre_pull:
        objects.append(prepull_daemonset(spec))
    return objects


def _double_cpu(cpu: str) -> str:
    if cpu.endswith("m"):
        return f"{int(cpu[:-1]) * 2}m"
    value = float(cpu) * 2
    return str(int(value)) if value.is_integer() else str(value)


def find(objects: Sequence[Mapping[str, Any]], kind: str) -> Mapping[str, Any]:
    """The one object of ``kind`` (tests and the renderer use it)."""
    matches = [o for o in objects if o["kind"] == kind]
    if len(matches) != 1:
        raise KeyError(f"expected one {kind}, found {len(matches)}")
    return matches[0]
