"""Kubernetes object specs for the model service, as plain functions that return dicts.

The same functions feed two callers (STYLE rule 9):

- the ModelService component, which passes each dict to pulumi-kubernetes with the cluster's
  provider (values may then be Pulumi Outputs, e.g. the image digest);
- ``deploy/render.py`` (``make render STACK=...``), which writes them as YAML for
  ``kubernetes-validate`` and ``checkov``, with marked placeholders for what only a real apply
  knows.

Each function reads the component's own :class:`~components.model_service.ModelServiceArgs`,
the one record of a service; what the objects need beyond it (the node architectures, the queue
metric, the grace period, the labels) is derived by a function here, not stored twice.

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
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    # Only for the annotations: model_service imports this module, and its Args are the one record
    # every function here reads.
    from components.model_service import ModelServiceArgs

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
PREPULL_REQUESTS = {"cpu": "10m", "memory": "16Mi"}
"""What each image pre-pull holder requests on a GPU node (it sleeps; the node's capacity check counts it)."""
PROMETHEUS_STACK_RELEASE = "kube-prometheus-stack"
"""The kube-prometheus-stack release ModelService installs. Its Prometheus selects the ServiceMonitors
labelled ``release: <release name>`` (the chart's default ``serviceMonitorSelector``)."""
AUTH_MOUNT = "/etc/dualdeploy/auth"
"""Where an authenticated server's credentials Secret is mounted (read-only)."""
AUTH_KEYS = ("tls.crt", "tls.key", "ca.crt", "token", "metrics-token")
"""The credentials Secret's keys: the server's certificate and key, the CA that signed it (Prometheus
and the edge devices verify against it), the inference token and the read-only metrics token."""
SET_BY_PULUMI = "set-by-pulumi-up"
"""The value a rendered object carries where only ``pulumi up`` knows it (credentials, EIP ids)."""
CREDENTIALS_ANNOTATION = "dualdeploy.io/credentials-sha256"
"""Pod-template annotation: a hash of the credentials, so a new certificate or token rolls the pods."""
EIP_ANNOTATION = "service.beta.kubernetes.io/aws-load-balancer-eip-allocations"
"""The NLB's Elastic IPs, one per public subnet: addresses a site's firewall can name in advance."""
HTTPS_PORT = 443
"""The Service port of an authenticated server (TLS passes through the NLB to the pods)."""
QUEUE_METRIC = "dualdeploy_inflight_requests"
"""The server's in-flight gauge (``serving/metrics.py``), served to the HPA by prometheus-adapter."""


# The functions below read the component's own Args (one record, STYLE rule 1); what the objects
# need beyond the Args is derived here, never copied into a second record.


def gpu_arches(args: ModelServiceArgs) -> list[str]:
    """Node architectures the pods may run on: every pool architecture, once each, sorted.

    ``model_service.validate`` has already refused a pool without an engine unless the stack
    allows the CUDA fallback, so the pools' architectures are exactly where the pods may go.
    """
    return sorted(set(args.pool_arches))


def queue_metric(args: ModelServiceArgs) -> str | None:
    """The HPA's Pods metric (:data:`QUEUE_METRIC`) when the service scales on queue depth, else None."""
    return QUEUE_METRIC if args.queue_depth_target is not None else None


def grace_seconds(args: ModelServiceArgs) -> int:
    """terminationGracePeriodSeconds: preStop, then the drain, then 5 s to exit."""
    return PRESTOP_SECONDS + args.drain_seconds + EXIT_SECONDS


def labels(args: ModelServiceArgs) -> dict[str, str]:
    """The selector labels (stable across versions)."""
    return {"app.kubernetes.io/name": args.name, "app.kubernetes.io/component": "model-server"}


def all_labels(args: ModelServiceArgs) -> dict[str, str]:
    """Selector labels plus descriptive ones."""
    return {
        **labels(args),
        "app.kubernetes.io/part-of": "dualdeploy",
        "app.kubernetes.io/managed-by": "pulumi",
        "dualdeploy.io/bundle-version": args.bundle_version,
    }


def _metadata(
    args: ModelServiceArgs,
    name: str,
    *,
    namespaced: bool = True,
    annotations: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "labels": all_labels(args)}
    if namespaced:
        meta["namespace"] = args.namespace
    if annotations:
        meta["annotations"] = dict(annotations)
    return meta


def namespace(args: ModelServiceArgs) -> dict[str, Any]:
    """The namespace, with the restricted Pod Security Standard enforced."""
    meta = _metadata(args, args.namespace, namespaced=False)
    meta["labels"] = {
        **meta["labels"],
        "pod-security.kubernetes.io/enforce": "restricted",
        "pod-security.kubernetes.io/enforce-version": "latest",
    }
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": meta}


def service_account(args: ModelServiceArgs) -> dict[str, Any]:
    """The pods' identity; it carries no API token (the server never calls the Kubernetes API)."""
    return {
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": _metadata(args, args.name),
        "automountServiceAccountToken": False,
    }


def _gpu_scheduling(args: ModelServiceArgs) -> dict[str, Any]:
    return {
        "affinity": {
            "nodeAffinity": {
                # Only nodes whose GPU architecture the bundle serves (TensorRT engines are per arch).
                "requiredDuringSchedulingIgnoredDuringExecution": {
                    "nodeSelectorTerms": [
                        {
                            "matchExpressions": [
                                {"key": GPU_ARCH_LABEL, "operator": "In", "values": gpu_arches(args)}
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
                "labelSelector": {"matchLabels": labels(args)},
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


def auth_secret_name(args: ModelServiceArgs) -> str:
    """The credentials Secret of an authenticated service."""
    return f"{args.name}-auth"


def server_name(args: ModelServiceArgs) -> str:
    """The in-cluster DNS name the server's certificate carries (Prometheus verifies against it)."""
    return f"{args.name}.{args.namespace}.svc"


def _probe(path: str, *, period: int, failures: int, https: bool = False) -> dict[str, Any]:
    return {
        # The kubelet does not verify an HTTPS probe's certificate; health paths need no token.
        "httpGet": {"path": path, "port": "http", **({"scheme": "HTTPS"} if https else {})},
        "periodSeconds": period,
        "failureThreshold": failures,
        "timeoutSeconds": 2,
    }


def deployment(args: ModelServiceArgs) -> dict[str, Any]:
    """The model server Deployment. No ``replicas``: the HPA owns the count."""
    cpu_limit = _double_cpu(args.cpu)
    container: dict[str, Any] = {
        "name": "server",
        "image": args.image,
        # By digest, "Always" costs one manifest check and never yields a different image.
        "imagePullPolicy": "Always",
        # The image's own CMD, spelled out; every setting goes through the server's DUALDEPLOY_* variables.
        "command": ["python3", "-m", "serving"],
        "ports": [
            {"name": "http", "containerPort": args.port, "protocol": "TCP"},
            *(
                [{"name": "grpc", "containerPort": args.grpc_port, "protocol": "TCP"}]
                if args.grpc_port
                else []
            ),
        ],
        "env": [
            {"name": "DUALDEPLOY_BUNDLE", "value": BUNDLE_PATH},
            {"name": "DUALDEPLOY_HOST", "value": "0.0.0.0"},
            {"name": "DUALDEPLOY_PORT", "value": str(args.port)},
            {"name": "DUALDEPLOY_VARIANT", "value": "auto"},
            # The nodes are GPU nodes by affinity: no detection guesswork inside the container.
            {"name": "DUALDEPLOY_DEVICE_CLASS", "value": "nvidia_gpu"},
            # How long the server lets in-flight requests finish after SIGTERM.
            {"name": "DUALDEPLOY_GRACE_PERIOD_S", "value": str(args.drain_seconds)},
            {"name": "DUALDEPLOY_LOG_FORMAT", "value": "json"},
            # The v2 gRPC API beside REST: the same model, queue, TLS and token.
            *([{"name": "DUALDEPLOY_GRPC_PORT", "value": str(args.grpc_port)}] if args.grpc_port else []),
        ],
        "resources": {
            "requests": {"cpu": args.cpu, "memory": args.memory, args.gpu_resource: "1"},
            "limits": {"cpu": cpu_limit, "memory": args.memory, args.gpu_resource: "1"},
        },
        # Cold start: up to 5 minutes to load and warm the model before liveness counts.
        "startupProbe": _probe(READY_PATH, period=5, failures=60, https=args.authenticated),
        "readinessProbe": _probe(READY_PATH, period=5, failures=2, https=args.authenticated),
        "livenessProbe": _probe(LIVE_PATH, period=10, failures=3, https=args.authenticated),
        # Endpoints and load balancers stop sending before SIGTERM starts the server's drain.
        "lifecycle": {"preStop": {"sleep": {"seconds": PRESTOP_SECONDS}}},
        "securityContext": _security_context(),
        "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}],
    }
    volumes: list[dict[str, Any]] = [{"name": "tmp", "emptyDir": {"sizeLimit": "1Gi"}}]
    annotations: dict[str, str] = {}
    if not args.prometheus_operator:
        annotations = {
            "prometheus.io/scrape": "true",
            "prometheus.io/port": str(args.port),
            "prometheus.io/path": "/metrics",
        }
    if args.authenticated:
        # HTTPS and a bearer token (the cascade's teacher is reached from outside the cluster).
        container["env"] += [
            {"name": f"DUALDEPLOY_{name}", "value": f"{AUTH_MOUNT}/{key}"}
            for name, key in (
                ("TLS_CERT", "tls.crt"),
                ("TLS_KEY", "tls.key"),
                ("TOKEN_FILE", "token"),
                ("METRICS_TOKEN_FILE", "metrics-token"),
            )
        ]
        container["volumeMounts"].append({"name": "auth", "mountPath": AUTH_MOUNT, "readOnly": True})
        volumes.append(
            {
                "name": "auth",
                # Group-readable for the pod's fsGroup (the server's uid); nobody else.
                "secret": {"secretName": auth_secret_name(args), "defaultMode": 0o440},
            }
        )
        annotations[CREDENTIALS_ANNOTATION] = SET_BY_PULUMI
        if not args.prometheus_operator:
            annotations["prometheus.io/scheme"] = "https"
    pod_spec = {
        "serviceAccountName": args.name,
        "automountServiceAccountToken": False,
        "terminationGracePeriodSeconds": grace_seconds(args),
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": RUN_AS_USER,
            "fsGroup": RUN_AS_USER,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [container],
        "volumes": volumes,
        **_gpu_scheduling(args),
    }
    template_meta: dict[str, Any] = {"labels": all_labels(args)}
    if annotations:
        template_meta["annotations"] = annotations
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _metadata(args, args.name),
        "spec": {
            "selector": {"matchLabels": labels(args)},
            "revisionHistoryLimit": 5,
            # Surge during roll-outs, never drop below the current count.
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": "25%", "maxUnavailable": 0}},
            "template": {"metadata": template_meta, "spec": pod_spec},
        },
    }


def service(args: ModelServiceArgs) -> dict[str, Any]:
    """ClusterIP by default; an NLB (internal or internet-facing) through annotations.

    An authenticated server listens on 443 (TLS passes through the NLB to the pods); with
    ``static_ingress`` the NLB sits on Elastic IPs allocated beforehand, so the sites' firewalls can
    name the teacher's addresses before it exists.
    """
    annotations: dict[str, str] = {}
    spec: dict[str, Any] = {"type": "ClusterIP", "selector": labels(args)}
    if args.load_balancer != "none":
        spec["type"] = "LoadBalancer"
        annotations = {
            "service.beta.kubernetes.io/aws-load-balancer-type": "nlb",
            "service.beta.kubernetes.io/aws-load-balancer-internal": str(
                args.load_balancer == "internal"
            ).lower(),
        }
        if args.static_ingress:
            annotations[EIP_ANNOTATION] = SET_BY_PULUMI
        if args.load_balancer_source_ranges:
            spec["loadBalancerSourceRanges"] = list(args.load_balancer_source_ranges)
    port = (
        {"name": "https", "port": HTTPS_PORT, "targetPort": "http", "protocol": "TCP"}
        if args.authenticated
        else {"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"}
    )
    spec["ports"] = [port]
    if args.grpc_port:
        spec["ports"].append(
            {"name": "grpc", "port": args.grpc_port, "targetPort": "grpc", "protocol": "TCP"}
        )
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(args, args.name, annotations=annotations),
        "spec": spec,
    }


def auth_secret(args: ModelServiceArgs) -> dict[str, Any]:
    """The credentials of an authenticated server; ``pulumi up`` fills every value (:data:`AUTH_KEYS`)."""
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": _metadata(args, auth_secret_name(args)),
        "type": "Opaque",
        "stringData": dict.fromkeys(AUTH_KEYS, SET_BY_PULUMI),
    }


def horizontal_pod_autoscaler(args: ModelServiceArgs) -> dict[str, Any]:
    """autoscaling/v2 on CPU (and the queue-depth Pods metric when set): up fast, down slowly."""
    metric = queue_metric(args)
    metrics: list[dict[str, Any]] = [
        {
            "type": "Resource",
            "resource": {
                "name": "cpu",
                "target": {"type": "Utilization", "averageUtilization": args.target_cpu_utilization},
            },
        }
    ]
    if metric is not None:
        metrics.append(
            {
                "type": "Pods",
                "pods": {
                    "metric": {"name": metric},
                    "target": {"type": "AverageValue", "averageValue": str(args.queue_depth_target)},
                },
            }
        )
    return {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": _metadata(args, args.name),
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": args.name},
            "minReplicas": args.min_replicas,
            "maxReplicas": args.max_replicas,
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


def pod_disruption_budget(args: ModelServiceArgs) -> dict[str, Any]:
    """Voluntary disruptions (node drains, Spot rebalancing) take one pod, or 10 % of many, at a time."""
    unavailable: int | str = 1 if args.min_replicas < 10 else "10%"
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": _metadata(args, args.name),
        "spec": {
            "maxUnavailable": unavailable,
            "selector": {"matchLabels": labels(args)},
            # A pod that never became ready must not block a drain (a Spot node has two minutes).
            "unhealthyPodEvictionPolicy": "AlwaysAllow",
        },
    }


def network_policy(args: ModelServiceArgs) -> dict[str, Any]:
    """Only the server's ports (REST, gRPC) are reachable; egress stays open (DNS, metrics scrape replies).

    It selects every pod of the app, the pre-pull holders included (they listen on nothing).
    """
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": _metadata(args, args.name),
        "spec": {
            "podSelector": {"matchLabels": {"app.kubernetes.io/name": args.name}},
            "policyTypes": ["Ingress"],
            "ingress": [
                {
                    "ports": [
                        {"port": args.port, "protocol": "TCP"},
                        *([{"port": args.grpc_port, "protocol": "TCP"}] if args.grpc_port else []),
                    ]
                }
            ],
        },
    }


def service_monitor(args: ModelServiceArgs) -> dict[str, Any]:
    """A Prometheus-operator ServiceMonitor for ``/metrics`` (only when the operator is installed).

    It carries the ``release`` label that the installed stack's Prometheus selects.
    """
    metadata = _metadata(args, args.name)
    metadata["labels"]["release"] = PROMETHEUS_STACK_RELEASE
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "ServiceMonitor",
        "metadata": metadata,
        "spec": {
            "selector": {"matchLabels": labels(args)},
            "namespaceSelector": {"matchNames": [args.namespace]},
            "endpoints": [_scrape_endpoint(args)],
        },
    }


def _scrape_endpoint(args: ModelServiceArgs) -> dict[str, Any]:
    """The ServiceMonitor endpoint; an authenticated server is scraped over verified HTTPS with the
    metrics token, which reads ``/metrics`` and nothing else."""
    if not args.authenticated:
        return {"port": "http", "path": "/metrics", "interval": "15s"}
    secret = auth_secret_name(args)
    return {
        "port": "https",
        "path": "/metrics",
        "interval": "15s",
        "scheme": "https",
        "tlsConfig": {"ca": {"secret": {"name": secret, "key": "ca.crt"}}, "serverName": server_name(args)},
        "authorization": {"type": "Bearer", "credentials": {"name": secret, "key": "metrics-token"}},
    }


def prepull_daemonset(args: ModelServiceArgs) -> dict[str, Any]:
    """Keeps the image on every GPU node the service may use, so a new pod does not wait for a pull."""
    container: dict[str, Any] = {
        "name": "hold",
        "image": args.image,
        "imagePullPolicy": "Always",
        "command": ["sleep", "infinity"],
        "resources": {
            "requests": dict(PREPULL_REQUESTS),
            "limits": {"cpu": "50m", "memory": "32Mi"},
        },
        "securityContext": _security_context(),
        # A sleeping holder has nothing to probe but being alive; the kubelet restarts it if it exits.
        "livenessProbe": {"exec": {"command": ["true"]}, "periodSeconds": 300},
        "readinessProbe": {"exec": {"command": ["true"]}, "periodSeconds": 300},
    }
    holder_labels = {**labels(args), "app.kubernetes.io/component": "image-prepull"}
    scheduling = _gpu_scheduling(args)
    return {
        "apiVersion": "apps/v1",
        "kind": "DaemonSet",
        "metadata": _metadata(args, f"{args.name}-prepull"),
        "spec": {
            "selector": {"matchLabels": holder_labels},
            "template": {
                "metadata": {"labels": {**all_labels(args), **holder_labels}},
                "spec": {
                    "serviceAccountName": args.name,
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


def prometheus_adapter_rules(args: ModelServiceArgs) -> dict[str, Any]:
    """prometheus-adapter values that serve the queue-depth gauge to the HPA as a Pods metric.

    Raises:
        ValueError: the service does not scale on queue depth.
    """
    metric = queue_metric(args)
    if metric is None:
        raise ValueError("queue_metric: not set, so there is no metric for prometheus-adapter to serve")
    return {
        "rules": {
            "default": False,
            "custom": [
                {
                    "seriesQuery": f'{metric}{{namespace!="",pod!=""}}',
                    "resources": {
                        "overrides": {"namespace": {"resource": "namespace"}, "pod": {"resource": "pod"}}
                    },
                    "name": {"as": metric},
                    "metricsQuery": "avg(<<.Series>>{<<.LabelMatchers>>}) by (<<.GroupBy>>)",
                }
            ],
        }
    }


def all_objects(args: ModelServiceArgs) -> list[dict[str, Any]]:
    """Every object of the service, in apply order (``model_service.validate`` has checked the Args)."""
    objects = [
        namespace(args),
        service_account(args),
        *([auth_secret(args)] if args.authenticated else []),
        deployment(args),
        service(args),
        horizontal_pod_autoscaler(args),
        pod_disruption_budget(args),
        network_policy(args),
    ]
    if args.prometheus_operator:
        objects.append(service_monitor(args))
    if args.pre_pull:
        objects.append(prepull_daemonset(args))
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
