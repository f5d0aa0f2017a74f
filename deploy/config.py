"""The stack configuration: parsed once into the components' own Args, checked before anything is created.

``__main__.py`` collects every ``dualdeploy:*`` key of the stack into a plain dict and
calls :func:`parse_stack_config`. Parsing is a pure function of that dict (plus the
region and the folder that relative paths start from), so tests feed it dicts, and a
bad stack file fails at program start with a :class:`ConfigError` that names the key
path (``dualdeploy:cluster.gpuPools[1].instanceTypes``) and the allowed values,
before a single resource is registered. What it returns is no record of its own: each
section becomes the Args of the component that owns it (``NetworkArgs``, ``GpuClusterArgs``,
``ModelImageArgs``, ``ModelServiceArgs``, ``EdgeFleetArgs``), and the components' own checks
run again when they are created.

The keys, by section (the stack files in ``stacks/`` show each one in use)::

    dualdeploy:environment     dev | staging | prod
    dualdeploy:tags            {key: value} added to every taggable AWS resource
    dualdeploy:bundle          the bundle served in the cloud, e.g. dist/demo/latest
    dualdeploy:requireEngines  true: every GPU pool's architecture must have a TensorRT
                               engine in the bundle; false: a pool without one serves the
                               ONNX variant through CUDA, with a warning (default true)
    dualdeploy:network         {cidr, availabilityZones: [...], natGateways: single | per-az}
    dualdeploy:cluster         {name, kubernetesVersion, endpoint, logTypes, systemPool,
                                gpuPools: [...], fallbackPool, devicePlugin, autoscaler,
                                metricsServer}
    dualdeploy:serving         {minReplicas, maxReplicas, targetCpuUtilization, namespace, port,
                                cpu, memory, drainSeconds, queueDepthTarget, prometheusAdapter,
                                prometheusUrl, prometheusOperator, loadBalancer, prePull,
                                dcgmExporter, keepImages, publicKey, loadBalancerSourceRanges,
                                grpcPort (default 8001, 0: none)}
    dualdeploy:edge            {inventory, bundle, playbook, publicKey, limit,
                                escalation: never | low_confidence}
    dualdeploy:edgeVaultPassword  (secret; read by __main__.py with get_secret, never here)
"""

from __future__ import annotations

import dataclasses
import difflib
import ipaddress
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from components.aws.gpu_cluster import (
    AUTOSCALER_RELEASES,
    CLUSTER_AUTOSCALER_IMAGE_TAGS,
    DEFAULT_DEPLOY_ROLE,
    DEFAULT_DEVICE_PLUGIN_CHART,
    DEFAULT_METRICS_SERVER_CHART,
    DEFAULT_PREVIEW_ROLE,
    LOG_TYPES,
    MIN_SPOT_TYPES,
    NODE_GROUP_NAME_MAX,
    REQUIRED_LOG_TYPES,
    SUPPORTED_KUBERNETES_VERSIONS,
    GpuClusterArgs,
    NodePool,
    gpu_facts,
    node_group_name,
)
from components.aws.gpu_instances import GPU_INSTANCE_TYPES, GpuInstanceType
from components.aws.model_image import DEFAULT_PUBLIC_KEY, ModelImageArgs, public_key_path
from components.aws.network import MAX_ZONES, NAT_MODES, NetworkArgs
from components.aws.node_capacity import (
    EKS_NODE_DAEMONSETS,
    NodeFit,
    Requests,
    cpu_millicores,
    memory_mib,
    node_fit,
)
from components.edge_fleet import EdgeFleetArgs
from components.k8s_specs import EXIT_SECONDS, LOAD_BALANCERS, PRESTOP_SECONDS, SPOT_NOTICE_BUDGET_S
from components.model_service import (
    DEFAULT_CPU,
    DEFAULT_MEMORY,
    INSTALLED_PROMETHEUS_URL,
    ModelServiceArgs,
    gpu_node_daemonsets,
)
from contract.bundle import BundleError, load_public_key, read_manifest, verify_bundle

NAMESPACE = "dualdeploy"

ENVIRONMENTS = ("dev", "staging", "prod")

TOP_LEVEL_KEYS: Mapping[str, Literal["string", "bool", "object"]] = {
    "environment": "string",
    "tags": "object",
    "bundle": "string",
    "requireEngines": "bool",
    "network": "object",
    "cluster": "object",
    "serving": "object",
    "edge": "object",
    "edgeVaultPassword": "string",
}
"""Every ``dualdeploy:`` key and how Pulumi stores it (objects and booleans arrive as JSON)."""

_POOL_NAME = re.compile(r"^[a-z][a-z0-9-]{0,19}$")
_ROLE_NAME = re.compile(r"[\w+=,.@-]{1,64}")
_CLUSTER_NAME = re.compile(r"^[a-z][a-z0-9-]{0,37}$")
_REQUIRED: Any = object()


class ConfigError(ValueError):
    """The stack config is invalid.

    Attributes:
        key: the full key path, e.g. ``dualdeploy:cluster.gpuPools[0].maxSize``.
    """

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}")
        self.key = key


class MissingEngines(ConfigError):
    """A GPU pool's architecture has no TensorRT engine in the bundle, and the stack requires engines.

    Its own type so that ``make render`` can render the objects anyway (with every pool architecture)
    and say that ``pulumi up`` would stop, without reading the message.
    """


# --------------------------------------------------------------------------- typed config


@dataclass(frozen=True)
class BundleRef:
    """A bundle the stack deploys, as far as config parsing needs to know it.

    Attributes:
        path: the bundle folder as written in the stack (e.g. ``dist/demo/latest``).
        resolved: the folder it points at now (symlinks followed).
        model: ``manifest["model"]``.
        version: ``manifest["version"]``.
        engine_arches: GPU architectures with a TensorRT variant in the manifest.
        tensorrt_version: the TensorRT version the engines were built with (None without
            engines); the GPU image installs exactly this runtime, since an engine loads only
            under the TensorRT version that built it.
    """

    path: str
    resolved: Path
    model: str
    version: str
    engine_arches: frozenset[str]
    tensorrt_version: str | None = None
    cascade_teacher: tuple[str, str] | None = None
    """The calibrated cascade's teacher, ``(model, version)``, for a distilled classifier."""


@dataclass(frozen=True)
class StackConfig:
    """The whole stack, validated, as the components' own Args.

    ``__main__.py`` passes each Args to its component as it is; only what another component
    produces (the subnets, the image by digest, the vault secret) is filled in there.

    Attributes:
        stack: the Pulumi stack name.
        environment: ``dev``, ``staging`` or ``prod``.
        region: the AWS region (None for edge-only stacks).
        tags: tags for every taggable AWS resource (stack defaults included).
        bundle: the cloud bundle, when the stack has a cluster.
        require_engines: whether every GPU pool needs a TensorRT engine in the bundle.
        network / cluster / image / service: the cloud part, all four or none
            (``cluster.subnet_ids`` and ``service.image`` are left None for ``__main__.py``).
        edge: the edge part, or None (``vault_password`` is left None: it is a secret).
        escalation: ``edge.escalation``; with ``low_confidence`` the service is ``authenticated``
            on ``static_ingress`` and the network allocates its addresses, and ``__main__.py`` passes
            the teacher's endpoint, CA and token to the fleet.
        warnings: things a user should hear about that are not errors.
    """

    stack: str
    environment: str
    region: str | None
    tags: Mapping[str, str]
    bundle: BundleRef | None
    require_engines: bool
    network: NetworkArgs | None
    cluster: GpuClusterArgs | None
    image: ModelImageArgs | None
    service: ModelServiceArgs | None
    edge: EdgeFleetArgs | None
    escalation: str = "never"
    warnings: tuple[str, ...] = field(default=())


# --------------------------------------------------------------------------- readers


def _key(path: str) -> str:
    return f"{NAMESPACE}:{path}"


def _suggest(name: str, allowed: Sequence[str]) -> str:
    close = difflib.get_close_matches(name, allowed, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _object(value: Any, path: str) -> dict[str, Any]:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            raise ConfigError(_key(path), "must be an object (a YAML mapping)") from None
    if not isinstance(value, Mapping):
        raise ConfigError(_key(path), f"must be an object (a YAML mapping), got {type(value).__name__}")
    return dict(value)


def _known_keys(data: Mapping[str, Any], allowed: Sequence[str], path: str) -> None:
    for name in data:
        if name not in allowed:
            raise ConfigError(
                _key(f"{path}.{name}" if path else name),
                f"unknown key{_suggest(name, allowed)}; allowed: {', '.join(allowed)}",
            )


def _get(data: Mapping[str, Any], name: str, path: str, default: Any) -> Any:
    value = data.get(name)
    if value is None:
        if default is _REQUIRED:
            raise ConfigError(_key(f"{path}.{name}" if path else name), "is required")
        return default
    return value


def _str(
    data: Mapping[str, Any],
    name: str,
    path: str,
    default: Any = _REQUIRED,
    choices: Sequence[str] | None = None,
) -> Any:
    value = _get(data, name, path, default)
    where = _key(f"{path}.{name}" if path else name)
    if value is default and default is not _REQUIRED:
        return value
    if not isinstance(value, str) or not value:
        raise ConfigError(where, f"must be a non-empty string, got {value!r}")
    if choices is not None and value not in choices:
        raise ConfigError(where, f"{value!r} is not one of {', '.join(choices)}{_suggest(value, choices)}")
    return value


def _int(data: Mapping[str, Any], name: str, path: str, default: Any = _REQUIRED, minimum: int = 0) -> int:
    value = _get(data, name, path, default)
    where = _key(f"{path}.{name}" if path else name)
    if isinstance(value, str) and re.fullmatch(r"-?\d+", value):
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(where, f"must be an integer, got {value!r}")
    if value < minimum:
        raise ConfigError(where, f"must be ≥ {minimum}, got {value}")
    return value


def _bool(data: Mapping[str, Any], name: str, path: str, default: Any = _REQUIRED) -> bool:
    value = _get(data, name, path, default)
    if isinstance(value, str) and value.lower() in ("true", "false"):
        value = value.lower() == "true"
    if not isinstance(value, bool):
        raise ConfigError(_key(f"{path}.{name}" if path else name), f"must be true or false, got {value!r}")
    return value


def _str_list(data: Mapping[str, Any], name: str, path: str, default: Any = _REQUIRED) -> tuple[str, ...]:
    value = _get(data, name, path, default)
    where = _key(f"{path}.{name}" if path else name)
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            raise ConfigError(where, "must be a list of strings") from None
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) and v for v in value):
        raise ConfigError(where, f"must be a list of non-empty strings, got {value!r}")
    if len(set(value)) != len(value):
        raise ConfigError(where, f"lists a value twice: {list(value)}")
    return tuple(value)


# --------------------------------------------------------------------------- sections


def _parse_tags(raw: Any, stack: str, environment: str) -> dict[str, str]:
    tags = {"dualdeploy:stack": stack, "dualdeploy:environment": environment, "managed-by": "pulumi"}
    if raw is None:
        return tags
    data = _object(raw, "tags")
    for name, value in data.items():
        where = _key(f"tags.{name}")
        if not isinstance(value, str) or not value:
            raise ConfigError(where, f"tag values must be non-empty strings, got {value!r}")
        if name.lower().startswith("aws:"):
            raise ConfigError(where, "the aws: prefix is reserved by AWS")
        if name in tags:
            raise ConfigError(
                where, f"{name} is set from the stack itself ({tags[name]!r}); choose another key"
            )
        if len(name) > 128 or len(value) > 256:
            raise ConfigError(where, "AWS allows keys up to 128 and values up to 256 characters")
        tags[name] = value
    return tags


def read_bundle(path: str, key: str, base_dir: Path) -> BundleRef:
    """Resolve a bundle path from the stack and read its manifest (no signature check).

    The signature and checksums are verified where the bytes are used (the image build
    and the edge devices); here the manifest is read for what config checks need.

    Args:
        path: the path as written in the stack, relative to ``base_dir`` unless absolute.
        key: the config key path, for the error message.
        base_dir: the project folder.

    Raises:
        ConfigError: the folder does not exist or holds no readable manifest.
    """
    folder = Path(path) if Path(path).is_absolute() else base_dir / path
    if not folder.is_dir():
        raise ConfigError(
            key,
            f"bundle folder {path!r} does not exist (resolved to {folder}); "
            "build it first with `make build` (python -m model_build build SPEC --out dist)",
        )
    try:
        manifest = read_manifest(folder)
    except BundleError as exc:
        raise ConfigError(key, f"{path!r} is not a bundle: {exc}") from None
    engines = [v for v in manifest.variants if v.format == "tensorrt" and v.gpu_arch]
    trt_versions = sorted({v.tensorrt_version for v in engines if v.tensorrt_version})
    if len(trt_versions) > 1:
        raise ConfigError(
            key,
            f"{path!r} has engines from several TensorRT versions {trt_versions}; one image carries "
            "one TensorRT runtime, so rebuild every engine with the same version",
        )
    return BundleRef(
        path=path,
        resolved=folder.resolve(),
        model=manifest.model,
        version=manifest.version,
        engine_arches=frozenset(str(v.gpu_arch) for v in engines),
        tensorrt_version=trt_versions[0] if trt_versions else None,
        cascade_teacher=(
            (manifest.cascade.teacher.model, manifest.cascade.teacher.version) if manifest.cascade else None
        ),
    )


def _parse_network(raw: Any, region: str | None) -> tuple[str, list[str], str]:
    """The VPC block, its zones and the NAT mode (NetworkArgs needs the cluster name too)."""
    data = _object(raw, "network")
    _known_keys(data, ("cidr", "availabilityZones", "natGateways"), "network")
    cidr = _str(data, "cidr", "network", default="10.0.0.0/16")
    try:
        net = ipaddress.ip_network(cidr)
    except ValueError as exc:
        raise ConfigError(_key("network.cidr"), f"not a CIDR block ({exc})") from None
    if not isinstance(net, ipaddress.IPv4Network) or not 16 <= net.prefixlen <= 20:
        raise ConfigError(_key("network.cidr"), f"{cidr} must be an IPv4 block from /16 to /20")
    zones = _str_list(data, "availabilityZones", "network")
    if not 2 <= len(zones) <= MAX_ZONES:
        raise ConfigError(
            _key("network.availabilityZones"),
            f"EKS needs subnets in at least 2 availability zones (at most {MAX_ZONES}), got {len(zones)}",
        )
    if region:
        for zone in zones:
            if not re.fullmatch(re.escape(region) + r"[a-z]", zone):
                raise ConfigError(
                    _key("network.availabilityZones"),
                    f"{zone!r} is not a zone of region {region} (expected {region}a, {region}b, …)",
                )
    nat = _str(data, "natGateways", "network", default="single", choices=NAT_MODES)
    return cidr, list(zones), nat


def _size_fields(data: Mapping[str, Any], path: str, min_default: int) -> tuple[int, int, int]:
    min_size = _int(data, "minSize", path, default=min_default)
    max_size = _int(data, "maxSize", path, minimum=1)
    if min_size > max_size:
        raise ConfigError(
            _key(f"{path}.minSize"), f"minSize {min_size} is above maxSize {max_size}; need minSize ≤ maxSize"
        )
    desired = _int(data, "desiredSize", path, default=min_size)
    if not min_size <= desired <= max_size:
        raise ConfigError(
            _key(f"{path}.desiredSize"), f"desiredSize {desired} must lie within [{min_size}, {max_size}]"
        )
    return min_size, max_size, desired


def _parse_system_pool(raw: Any, path: str) -> NodePool:
    data = _object(raw, path)
    _known_keys(data, ("instanceTypes", "minSize", "maxSize", "desiredSize", "diskSizeGib"), path)
    types = _str_list(data, "instanceTypes", path, default=("m6i.large", "m6a.large", "m5.large"))
    for name in types:
        if name in GPU_INSTANCE_TYPES:
            raise ConfigError(
                _key(f"{path}.instanceTypes"), f"{name} is a GPU type; the system pool is CPU only"
            )
    min_size, max_size, desired = _size_fields(data, path, min_default=2)
    if min_size < 1:
        raise ConfigError(
            _key(f"{path}.minSize"), "the system pool needs at least 1 node (CoreDNS, autoscaler)"
        )
    disk = _int(data, "diskSizeGib", path, default=50, minimum=20)
    return NodePool("system", list(types), min_size, max_size, desired, disk)


def _parse_gpu_pool(raw: Any, path: str, role: Literal["spot", "fallback"]) -> NodePool:
    data = _object(raw, path)
    _known_keys(data, ("name", "instanceTypes", "minSize", "maxSize", "desiredSize", "diskSizeGib"), path)
    name = _str(data, "name", path, default="ondemand" if role == "fallback" else _REQUIRED)
    if not _POOL_NAME.fullmatch(name):
        raise ConfigError(_key(f"{path}.name"), f"{name!r} must match {_POOL_NAME.pattern}")
    types = _str_list(data, "instanceTypes", path)
    where = _key(f"{path}.instanceTypes")
    known: list[GpuInstanceType] = []
    for type_name in types:
        if type_name not in GPU_INSTANCE_TYPES:
            families = sorted({t.family for t in GPU_INSTANCE_TYPES.values()})
            raise ConfigError(
                where,
                f"{type_name!r} is not in the GPU instance table"
                f"{_suggest(type_name, list(GPU_INSTANCE_TYPES))}; "
                f"known families: {', '.join(families)} (components/aws/gpu_instances.py)",
            )
        known.append(GPU_INSTANCE_TYPES[type_name])
    arches = sorted({t.gpu_arch for t in known})
    if len(arches) > 1:
        detail = ", ".join(f"{t.name} ({t.gpu_model}, {t.gpu_arch})" for t in known)
        raise ConfigError(
            where,
            f"mixes GPU architectures {arches}: {detail}. A TensorRT engine runs on one architecture, "
            "so a pool must use one; split it into one pool per architecture",
        )
    counts = sorted({t.gpus for t in known})
    if len(counts) > 1:
        raise ConfigError(
            where,
            f"mixes GPUs per node {counts}; the cluster autoscaler models a pool as identical nodes, "
            "so every type in a pool must have the same GPU count",
        )
    if len({t.node_size for t in known}) > 1:
        raise ConfigError(
            where,
            f"mixes node sizes: {', '.join(t.describe() for t in known)}. The cluster autoscaler plans "
            "a scale-up with one instance type of a group, and its AWS README asks for the same vCPUs "
            "and memory in a group; put each size in its own pool (the expander tries the smallest first)",
        )
    min_size, max_size, desired = _size_fields(data, path, min_default=0)
    if role == "fallback" and min_size != 0:
        raise ConfigError(
            _key(f"{path}.minSize"),
            f"the on-demand fallback must scale from zero (minSize 0), got {min_size}; "
            "it only runs when Spot capacity cannot be had",
        )
    disk = _int(data, "diskSizeGib", path, default=100, minimum=50)
    return NodePool(
        name=name,
        instance_types=list(types),
        min_size=min_size,
        max_size=max_size,
        desired_size=desired,
        disk_size_gib=disk,
    )


def _cidr_list(data: Mapping[str, Any], name: str, path: str) -> tuple[str, ...]:
    """An optional list of CIDRs (IPv4 or IPv6), each checked."""
    cidrs = _str_list(data, name, path, default=())
    for cidr in cidrs:
        try:
            ipaddress.ip_network(cidr)
        except ValueError:
            raise ConfigError(_key(f"{path}.{name}"), f"{cidr!r} is not a CIDR") from None
    return cidrs


def _parse_endpoint(raw: Any, path: str) -> tuple[bool, list[str]]:
    """Whether the API endpoint is public, and its allow-list."""
    endpoint_raw = _object(raw, path)
    _known_keys(endpoint_raw, ("publicAccess", "publicAccessCidrs"), path)
    public = _bool(endpoint_raw, "publicAccess", path, default=False)
    cidrs = _cidr_list(endpoint_raw, "publicAccessCidrs", path)
    if cidrs and not public:
        raise ConfigError(
            _key(f"{path}.publicAccessCidrs"),
            "is set but publicAccess is false; set both or neither",
        )
    return public, list(cidrs)


def _parse_log_types(data: Mapping[str, Any], path: str) -> list[str]:
    log_types = _str_list(data, "logTypes", path, default=LOG_TYPES)
    for log_type in log_types:
        if log_type not in LOG_TYPES:
            raise ConfigError(
                _key(f"{path}.logTypes"),
                f"{log_type!r} is not one of {', '.join(LOG_TYPES)}{_suggest(log_type, LOG_TYPES)}",
            )
    if not set(REQUIRED_LOG_TYPES) <= set(log_types):
        raise ConfigError(_key(f"{path}.logTypes"), "must include at least api, audit and authenticator")
    return list(log_types)


def _parse_cluster(raw: Any, stack: str, region: str, tags: Mapping[str, str]) -> GpuClusterArgs:
    path = "cluster"
    data = _object(raw, path)
    _known_keys(
        data,
        (
            "name",
            "kubernetesVersion",
            "endpoint",
            "logTypes",
            "systemPool",
            "gpuPools",
            "fallbackPool",
            "devicePlugin",
            "autoscaler",
            "metricsServer",
            "access",
        ),
        path,
    )
    name = _str(data, "name", path, default=f"dualdeploy-{stack}")
    if not _CLUSTER_NAME.fullmatch(name):
        raise ConfigError(_key(f"{path}.name"), f"{name!r} must match {_CLUSTER_NAME.pattern}")
    version_raw = _get(data, "kubernetesVersion", path, _REQUIRED)
    version = str(version_raw)
    if version not in SUPPORTED_KUBERNETES_VERSIONS:
        hint = (
            " (quote it in YAML: a bare 1.30 reads as the number 1.3)"
            if isinstance(version_raw, float)
            else ""
        )
        raise ConfigError(
            _key(f"{path}.kubernetesVersion"),
            f"{version!r} is not supported; allowed: {', '.join(SUPPORTED_KUBERNETES_VERSIONS)}{hint}",
        )

    public_access, public_access_cidrs = _parse_endpoint(_get(data, "endpoint", path, {}), f"{path}.endpoint")
    log_types = _parse_log_types(data, path)

    system_pool = _parse_system_pool(_get(data, "systemPool", path, {"maxSize": 3}), f"{path}.systemPool")

    pools_raw = _get(data, "gpuPools", path, _REQUIRED)
    if isinstance(pools_raw, str):
        pools_raw = json.loads(pools_raw)
    if not isinstance(pools_raw, list) or not pools_raw:
        raise ConfigError(_key(f"{path}.gpuPools"), "must be a non-empty list of Spot GPU pools")
    pools = tuple(_parse_gpu_pool(p, f"{path}.gpuPools[{i}]", "spot") for i, p in enumerate(pools_raw))
    names = [p.name for p in pools]
    for i, pool_name in enumerate(names):
        if names.index(pool_name) != i:
            raise ConfigError(_key(f"{path}.gpuPools[{i}].name"), f"pool name {pool_name!r} is used twice")

    fallback_raw = data.get("fallbackPool")
    fallback = (
        _parse_gpu_pool(fallback_raw, f"{path}.fallbackPool", "fallback")
        if fallback_raw is not None
        else None
    )

    _check_node_group_names(name, pools, fallback)
    spot_types = sorted({t for p in pools for t in p.instance_types})
    if len(spot_types) < MIN_SPOT_TYPES:
        raise ConfigError(
            _key(f"{path}.gpuPools"),
            f"the Spot pools together list {len(spot_types)} instance types {spot_types}; at least "
            f"{MIN_SPOT_TYPES} are needed so one type's Spot shortage does not stop scaling. One size per "
            "pool: add pools of other sizes or families of the architecture (e.g. g5.xlarge, g5.2xlarge, "
            "g5.4xlarge as three pools)",
        )
    deploy_role, preview_role, admin_roles = _parse_access(_get(data, "access", path, {}), f"{path}.access")

    plugin_raw = _object(_get(data, "devicePlugin", path, {}), f"{path}.devicePlugin")
    _known_keys(plugin_raw, ("chartVersion", "timeSlicingReplicas"), f"{path}.devicePlugin")
    device_plugin_chart = _str(
        plugin_raw, "chartVersion", f"{path}.devicePlugin", default=DEFAULT_DEVICE_PLUGIN_CHART
    )
    time_slicing = _int(plugin_raw, "timeSlicingReplicas", f"{path}.devicePlugin", default=1, minimum=1)
    scaler_raw = _object(_get(data, "autoscaler", path, {}), f"{path}.autoscaler")
    _known_keys(scaler_raw, ("chartVersion", "imageTag"), f"{path}.autoscaler")
    image_tag = _str(
        scaler_raw, "imageTag", f"{path}.autoscaler", default=CLUSTER_AUTOSCALER_IMAGE_TAGS[version]
    )
    if not image_tag.startswith(f"v{version}."):
        raise ConfigError(
            _key(f"{path}.autoscaler.imageTag"),
            f"{image_tag!r} does not match Kubernetes {version}; the autoscaler's minor must match "
            f"(e.g. {CLUSTER_AUTOSCALER_IMAGE_TAGS[version]})",
        )
    release_chart, release_tag = AUTOSCALER_RELEASES[version]
    autoscaler_chart = _str(scaler_raw, "chartVersion", f"{path}.autoscaler", default=release_chart)
    if autoscaler_chart != release_chart:
        raise ConfigError(
            _key(f"{path}.autoscaler.chartVersion"),
            f"{autoscaler_chart!r} is not the chart of cluster-autoscaler {release_tag} (Kubernetes "
            f"{version}): use {release_chart}, or omit it (see AUTOSCALER_RELEASES in gpu_cluster.py)",
        )
    metrics_raw = _object(_get(data, "metricsServer", path, {}), f"{path}.metricsServer")
    _known_keys(metrics_raw, ("chartVersion",), f"{path}.metricsServer")
    return GpuClusterArgs(
        cluster_name=name,
        kubernetes_version=version,
        region=region,
        system_pool=system_pool,
        gpu_pools=list(pools),
        fallback_pool=fallback,
        endpoint_public_access=public_access,
        public_access_cidrs=public_access_cidrs,
        log_types=log_types,
        device_plugin_chart_version=device_plugin_chart,
        time_slicing_replicas=time_slicing,
        autoscaler_chart_version=autoscaler_chart,
        autoscaler_image_tag=image_tag,
        metrics_server_chart_version=_str(
            metrics_raw, "chartVersion", f"{path}.metricsServer", default=DEFAULT_METRICS_SERVER_CHART
        ),
        deploy_role_name=deploy_role,
        preview_role_name=preview_role,
        admin_role_names=admin_roles,
        tags=dict(tags),
    )


def _parse_access(raw: Any, path: str) -> tuple[str, str, list[str]]:
    """The IAM roles that get EKS access entries: the deploy role, the PR preview role, admins."""
    data = _object(raw, path)
    _known_keys(data, ("deployRole", "previewRole", "adminRoles"), path)
    deploy = _str(data, "deployRole", path, default=DEFAULT_DEPLOY_ROLE)
    preview = _str(data, "previewRole", path, default=DEFAULT_PREVIEW_ROLE)
    admins = list(_str_list(data, "adminRoles", path, default=()))
    named = [(deploy, "deployRole"), (preview, "previewRole"), *[(a, "adminRoles") for a in admins]]
    for name, where in named:
        if not _ROLE_NAME.fullmatch(name):
            raise ConfigError(
                _key(f"{path}.{where}"),
                f"{name!r} is not an IAM role name (the name only, no ARN or path; letters, digits, +=,.@_-)",
            )
    if preview == deploy or preview in admins or deploy in admins:
        raise ConfigError(
            _key(f"{path}.previewRole"),
            "the preview role must differ from the deploy and admin roles: it only reads",
        )
    return deploy, preview, admins


SERVING_KEYS = (
    "minReplicas", "maxReplicas", "targetCpuUtilization", "namespace", "port", "cpu", "memory",
    "drainSeconds", "queueDepthTarget", "prometheusAdapter", "prometheusOperator", "loadBalancer", "prePull",
    "prometheusUrl", "dcgmExporter", "keepImages", "publicKey", "loadBalancerSourceRanges", "grpcPort",
)  # fmt: skip
ESCALATION_MODES = ("never", "low_confidence")
"""``edge.escalation``: the role's ``edge_escalation`` values."""


def _check_node_group_names(cluster: str, pools: tuple[NodePool, ...], fallback: NodePool | None) -> None:
    """EKS limits node group names to 63 characters; ours are ``<cluster>-gpu-<role>-<pool>``."""
    entries = [(p, "spot", f"cluster.gpuPools[{i}].name") for i, p in enumerate(pools)]
    if fallback is not None:
        entries.append((fallback, "fallback", "cluster.fallbackPool.name"))
    for pool, role, path in entries:
        group = node_group_name(cluster, role, pool)
        if len(group) > NODE_GROUP_NAME_MAX:
            raise ConfigError(
                _key(path),
                f"node group name {group!r} is {len(group)} characters; EKS allows "
                f"{NODE_GROUP_NAME_MAX}: shorten the pool name or dualdeploy:cluster.name",
            )


def _parse_serving(
    raw: Any, base_dir: Path, bundle: BundleRef, pool_arches: Sequence[str], allow_cuda_fallback: bool
) -> ModelServiceArgs:
    """The model service's Args; ``image`` is left for ``__main__.py`` (the pushed digest)."""
    path = "serving"
    data = _object(raw, path)
    _known_keys(data, SERVING_KEYS, path)
    min_replicas = _int(data, "minReplicas", path, minimum=1)
    max_replicas = _int(data, "maxReplicas", path, minimum=1)
    if min_replicas > max_replicas:
        raise ConfigError(
            _key(f"{path}.minReplicas"),
            f"minReplicas {min_replicas} is above maxReplicas {max_replicas}; need minReplicas ≤ maxReplicas",
        )
    target = _int(data, "targetCpuUtilization", path, default=70, minimum=1)
    if target > 100:
        raise ConfigError(_key(f"{path}.targetCpuUtilization"), f"must be a percentage 1–100, got {target}")
    namespace = _str(data, "namespace", path, default="dualdeploy")
    if not re.fullmatch(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?", namespace) or namespace == "default":
        raise ConfigError(
            _key(f"{path}.namespace"), f"{namespace!r} must be a DNS label other than 'default'"
        )
    port = _int(data, "port", path, default=8000, minimum=1024)
    grpc_port = _int(data, "grpcPort", path, default=8001, minimum=0)
    if grpc_port and (grpc_port < 1024 or grpc_port > 65535 or grpc_port == port):
        raise ConfigError(
            _key(f"{path}.grpcPort"),
            f"{grpc_port} must be 0 (no gRPC) or a port from 1024 to 65535 other than serving.port ({port})",
        )
    cpu = _str(data, "cpu", path, default=DEFAULT_CPU)
    if not re.fullmatch(r"\d+(\.\d+)?|\d+m", cpu):
        raise ConfigError(_key(f"{path}.cpu"), f"{cpu!r} is not a CPU quantity (e.g. 2, 1.5, 500m)")
    memory = _str(data, "memory", path, default=DEFAULT_MEMORY)
    if not re.fullmatch(r"\d+(Mi|Gi)", memory):
        raise ConfigError(
            _key(f"{path}.memory"), f"{memory!r} is not a memory quantity in Mi or Gi (e.g. 8Gi)"
        )
    drain = _int(data, "drainSeconds", path, default=30, minimum=1)
    if PRESTOP_SECONDS + drain + EXIT_SECONDS > SPOT_NOTICE_BUDGET_S:
        raise ConfigError(
            _key(f"{path}.drainSeconds"),
            f"{drain} s of drain plus {PRESTOP_SECONDS} s preStop does not fit the two-minute Spot notice "
            f"(at most {SPOT_NOTICE_BUDGET_S - PRESTOP_SECONDS - EXIT_SECONDS} s)",
        )
    queue_target = (
        _int(data, "queueDepthTarget", path, default=None, minimum=1) if "queueDepthTarget" in data else None
    )
    adapter = _bool(data, "prometheusAdapter", path, default=False)
    if queue_target is not None and not adapter:
        raise ConfigError(
            _key(f"{path}.queueDepthTarget"),
            "scaling on queue depth needs the metric served to the HPA: set prometheusAdapter true",
        )
    return ModelServiceArgs(
        name=bundle.model,
        bundle_version=bundle.version,
        pool_arches=sorted(set(pool_arches)),
        engine_arches=sorted(bundle.engine_arches),
        allow_cuda_fallback=allow_cuda_fallback,
        min_replicas=min_replicas,
        max_replicas=max_replicas,
        target_cpu_utilization=target,
        namespace=namespace,
        port=port,
        grpc_port=grpc_port,
        cpu=cpu,
        memory=memory,
        drain_seconds=drain,
        queue_depth_target=queue_target,
        prometheus_adapter=adapter,
        prometheus_operator=_bool(data, "prometheusOperator", path, default=False),
        load_balancer=_str(data, "loadBalancer", path, default="none", choices=LOAD_BALANCERS),
        pre_pull=_bool(data, "prePull", path, default=False),
        prometheus_url=_prometheus_url(data, path),
        dcgm_exporter=_bool(data, "dcgmExporter", path, default=False),
        load_balancer_source_ranges=_source_ranges(data, path),
    )


def _source_ranges(data: Mapping[str, Any], path: str) -> tuple[str, ...]:
    """``serving.loadBalancerSourceRanges``: CIDRs, and only beside a load balancer."""
    ranges = _cidr_list(data, "loadBalancerSourceRanges", path)
    if ranges and data.get("loadBalancer", "none") == "none":
        raise ConfigError(
            _key(f"{path}.loadBalancerSourceRanges"),
            "only a load balancer has source ranges: set loadBalancer internet-facing or internal",
        )
    return ranges


def _parse_image(
    raw: Any, base_dir: Path, bundle: BundleRef, environment: str, tags: Mapping[str, str]
) -> ModelImageArgs:
    """The serving image's Args, from the ``serving`` keys that concern the image."""
    path = "serving"
    data = _object(raw, path)
    public_key = _public_key(data, path, base_dir)
    return ModelImageArgs(
        repository_name=f"dualdeploy/{bundle.model}",
        context_dir=base_dir,
        # The bundle's real folder (latest resolved): Docker copies a folder, not a link to one.
        bundle_dir=bundle.resolved,
        bundle_version=bundle.version,
        public_key=base_dir / public_key if public_key else None,
        base="gpu",  # every cloud pool is a GPU pool
        tensorrt_version=bundle.tensorrt_version,
        keep_images=_int(data, "keepImages", path, default=10, minimum=1),
        # `pulumi destroy` of a dev stack removes its images too; prod keeps them (and then
        # refuses to delete the repository until someone empties it on purpose).
        force_delete=environment != "prod",
        tags=dict(tags),
    )


def _public_key(data: Mapping[str, Any], path: str, base_dir: Path) -> str | None:
    key: str | None = _str(data, "publicKey", path, default=None)
    if key is None:
        return None
    folder = Path(key) if Path(key).is_absolute() else base_dir / key
    if not folder.is_file():
        raise ConfigError(
            _key(f"{path}.publicKey"), f"public key file {key!r} does not exist under {base_dir}"
        )
    try:
        folder.resolve().relative_to(base_dir.resolve())
    except ValueError:
        raise ConfigError(
            _key(f"{path}.publicKey"),
            f"{key!r} must be inside the project: the image build copies it from there",
        ) from None
    return key


def _prometheus_url(data: Mapping[str, Any], path: str) -> str | None:
    """prometheus-adapter's Prometheus: the URL given, or None for the one ``prometheusOperator`` installs."""
    adapter = _bool(data, "prometheusAdapter", path, default=False)
    if "prometheusUrl" not in data:
        if adapter and not _bool(data, "prometheusOperator", path, default=False):
            raise ConfigError(
                _key(f"{path}.prometheusAdapter"),
                "prometheus-adapter needs a Prometheus to query, and none is installed: set "
                "prometheusOperator true (installs kube-prometheus-stack) or prometheusUrl to yours",
            )
        return None
    url: str = _str(data, "prometheusUrl", path)
    if not re.fullmatch(r"https?://[^\s/]+(:\d+)?(/\S*)?", url):
        raise ConfigError(
            _key(f"{path}.prometheusUrl"), f"{url!r} is not an http(s) URL (e.g. {INSTALLED_PROMETHEUS_URL})"
        )
    if not adapter:
        raise ConfigError(
            _key(f"{path}.prometheusUrl"), "only prometheus-adapter uses it: set prometheusAdapter true"
        )
    return url


def _parse_edge(raw: Any, base_dir: Path) -> tuple[EdgeFleetArgs, BundleRef, str]:
    """The EdgeFleet's Args, its bundle and ``escalation``.

    ``vault_password`` is left for ``__main__.py`` (a secret), and ``escalation`` is only checked here
    against the bundle: :func:`_wire_escalation` checks it against the cloud part.
    """
    path = "edge"
    data = _object(raw, path)
    _known_keys(data, ("inventory", "bundle", "playbook", "publicKey", "limit", "escalation"), path)
    inventory = _str(data, "inventory", path)
    if not (base_dir / inventory).exists():
        raise ConfigError(
            _key(f"{path}.inventory"), f"inventory {inventory!r} does not exist under {base_dir}"
        )
    bundle = _str(data, "bundle", path)
    ref = read_bundle(bundle, _key(f"{path}.bundle"), base_dir)
    escalation = _str(data, "escalation", path, default="never", choices=ESCALATION_MODES)
    public_key = _str(data, "publicKey", path, default=None)
    if public_key is not None and not (base_dir / public_key).is_file():
        raise ConfigError(_key(f"{path}.publicKey"), f"public key file {public_key!r} does not exist")
    args = EdgeFleetArgs(
        inventory=inventory,
        bundle_dir=bundle,
        playbook=_str(data, "playbook", path, default="ansible/edge.yml"),
        public_key=public_key,
        limit=_str(data, "limit", path, default=None),
    )
    return args, ref, escalation


def _wire_escalation(
    edge_bundle: BundleRef,
    cloud_bundle: BundleRef | None,
    service: ModelServiceArgs | None,
    warnings: list[str],
) -> ModelServiceArgs:
    """``edge.escalation: low_confidence``: the cloud service becomes the edge bundle's teacher.

    The stack must serve, in the cloud, exactly the teacher the edge bundle's cascade was calibrated
    against, on an internet-facing NLB; the service then serves HTTPS with tokens
    (``authenticated``) on Elastic IPs (``static_ingress``) that the sites' firewalls name.

    Raises:
        ConfigError: naming the key that keeps the devices from reaching their teacher.
    """
    key = _key("edge.escalation")
    if cloud_bundle is None or service is None:
        raise ConfigError(
            key,
            "low_confidence escalates to this stack's cloud teacher, and the stack has no cloud part "
            "(cluster, serving, bundle); add one, or set never",
        )
    if edge_bundle.cascade_teacher is None:
        raise ConfigError(
            _key("edge.bundle"),
            f"{edge_bundle.path!r} has no calibrated cascade (manifest 'cascade'), so its devices have "
            "nothing to escalate on: build a distilled classifier with one (models/demo-distilled.yaml)",
        )
    teacher = (cloud_bundle.model, cloud_bundle.version)
    if edge_bundle.cascade_teacher != teacher:
        raise ConfigError(
            _key("bundle"),
            f"the cloud serves {teacher[0]} {teacher[1]}, but the edge bundle's cascade was calibrated "
            f"against {edge_bundle.cascade_teacher[0]} {edge_bundle.cascade_teacher[1]}; deploy that "
            "teacher, or rebuild the edge bundle against this one (the devices would fall back on every "
            "escalation)",
        )
    if service.load_balancer != "internet-facing":
        raise ConfigError(
            _key("serving.loadBalancer"),
            f"is {service.load_balancer!r}; edge.escalation low_confidence needs the teacher reachable from "
            "the sites: set internet-facing (TLS and a token guard it; loadBalancerSourceRanges narrows it)",
        )
    if not service.load_balancer_source_ranges:
        warnings.append(
            "serving.loadBalancerSourceRanges is not set: the teacher's NLB accepts connections from any "
            "address (TLS and the bearer token still guard every request); list the sites' egress addresses"
        )
    return dataclasses.replace(service, authenticated=True, static_ingress=True)


# --------------------------------------------------------------------------- the whole stack


def parse_stack_config(
    raw: Mapping[str, Any],
    *,
    stack: str,
    region: str | None,
    base_dir: Path,
) -> StackConfig:
    """Parse and validate a stack's ``dualdeploy:*`` config.

    Args:
        raw: key (without the ``dualdeploy:`` prefix) → value, as YAML or Pulumi gives it
            (objects may be JSON strings, booleans may be ``"true"``).
        stack: the stack name (default tags and cluster name).
        region: ``aws:region``; required when the stack has a cluster.
        base_dir: the project folder that relative paths (bundles, inventories) start from.

    Returns:
        The typed, frozen config.

    Raises:
        ConfigError: naming the key path and the allowed values.
    """
    _known_keys(raw, list(TOP_LEVEL_KEYS), "")
    environment = _str(raw, "environment", "", choices=ENVIRONMENTS)
    tags = _parse_tags(raw.get("tags"), stack, environment)
    require_engines = _bool(raw, "requireEngines", "", default=True)

    cloud_keys = [k for k in ("network", "cluster", "serving", "bundle") if raw.get(k) is not None]
    if not cloud_keys and raw.get("edge") is None:
        raise ConfigError(
            _key("cluster"), "the stack has neither a cloud part (cluster) nor an edge part (edge)"
        )
    if cloud_keys:
        for needed in ("network", "cluster", "serving", "bundle"):
            if raw.get(needed) is None:
                raise ConfigError(
                    _key(needed),
                    f"is required when the stack has a cloud part (it sets {', '.join(cloud_keys)})",
                )
        if not region:
            raise ConfigError("aws:region", "is required for a stack with a cluster")

    warnings: list[str] = []
    network = cluster = image = service = bundle = None
    if cloud_keys:
        assert region is not None
        cidr, zones, nat = _parse_network(raw["network"], region)
        cluster = _parse_cluster(raw["cluster"], stack, region, tags)
        network = NetworkArgs(
            cidr=cidr,
            availability_zones=zones,
            cluster_name=cluster.cluster_name,
            region=region,
            nat_gateways=nat,
            tags=dict(tags),
        )
        bundle = read_bundle(_str(raw, "bundle", ""), _key("bundle"), base_dir)
        service = _parse_serving(
            raw["serving"],
            base_dir,
            bundle,
            [gpu_facts(p).gpu_arch for p in cluster.all_gpu_pools],
            allow_cuda_fallback=not require_engines,
        )
        image = _parse_image(raw["serving"], base_dir, bundle, environment, tags)
        _check_engines(cluster, bundle, require_engines, warnings)
        _check_signer(image, bundle, warnings)
        if not require_engines and environment == "prod":
            warnings.append(
                "dualdeploy:requireEngines is false in a prod stack: pools without a TensorRT engine "
                "serve ONNX through CUDA. A pull-request preview sets this because its prebuild has no "
                "GPU; a deploy of this stack needs a bundle with engines for every pool architecture"
            )
        _check_capacity(cluster, service)
        _check_endpoint(cluster, environment, warnings)
        if image.public_key is None and environment == "prod":
            warnings.append(
                "serving.publicKey is not set: the image trusts the development key .keys/dev-ed25519.pub; "
                "point it at the release signer's public key"
            )

    edge = escalation = None
    if raw.get("edge") is not None:
        edge, edge_bundle, escalation = _parse_edge(raw["edge"], base_dir)
        if escalation == "low_confidence":
            service = _wire_escalation(edge_bundle, bundle, service, warnings)
            assert network is not None
            network = dataclasses.replace(network, ingress_addresses=True)
    return StackConfig(
        stack=stack,
        environment=environment,
        region=region,
        tags=tags,
        bundle=bundle,
        require_engines=require_engines,
        network=network,
        cluster=cluster,
        image=image,
        service=service,
        edge=edge,
        escalation=escalation or "never",
        warnings=tuple(warnings),
    )


def _check_engines(cluster: GpuClusterArgs, bundle: BundleRef, required: bool, warnings: list[str]) -> None:
    for index, pool in enumerate(cluster.gpu_pools):
        _check_pool_engine(pool, f"cluster.gpuPools[{index}]", bundle, required, warnings)
    if cluster.fallback_pool is not None:
        _check_pool_engine(cluster.fallback_pool, "cluster.fallbackPool", bundle, required, warnings)


def _check_pool_engine(
    pool: NodePool, path: str, bundle: BundleRef, required: bool, warnings: list[str]
) -> None:
    gpu_arch = gpu_facts(pool).gpu_arch
    if gpu_arch in bundle.engine_arches:
        return
    have = ", ".join(sorted(bundle.engine_arches)) or "none"
    if required:
        raise MissingEngines(
            _key(f"{path}.instanceTypes"),
            f"pool {pool.name!r} runs {gpu_arch} but bundle {bundle.path} ({bundle.model} "
            f"{bundle.version}) has no TensorRT engine for it (engines: {have}). Build the engine on a "
            f"{gpu_arch} GPU host, change the pool, or set dualdeploy:requireEngines false to serve "
            "the ONNX variant through CUDA",
        )
    warnings.append(
        f"{path}: pool {pool.name!r} ({gpu_arch}) has no TensorRT engine in {bundle.path} "
        f"(engines: {have}); it will serve the ONNX variant through CUDA, slower than an engine"
    )


def _check_signer(image: ModelImageArgs, bundle: BundleRef, warnings: list[str]) -> None:
    """The key the image will trust must verify the bundle, or the image build's `--check` fails late.

    Without ``serving.publicKey`` the image trusts the development key; when that file is absent too
    (a CI prebuild signed with the release key), this is a warning so that ``make render`` still
    works, and ``ModelImage`` stops ``pulumi preview``/``up`` before any resource.
    """
    key_path = public_key_path(image)
    where = _key("serving.publicKey")
    if not key_path.is_file():
        warnings.append(
            f"{where}: not set, and the development key {DEFAULT_PUBLIC_KEY} does not exist; the image "
            "build will stop. Point serving.publicKey at the key that signed the bundle "
            "(CI: .keys/release-ed25519.pub, written by the prebuild)"
        )
        return
    try:
        verify_bundle(bundle.resolved, load_public_key(key_path))
    except BundleError as exc:
        raise ConfigError(
            where,
            f"bundle {bundle.path} does not verify with {key_path.name} ({exc}); the image would trust a "
            "key that did not sign it. Point serving.publicKey at the signer's public key",
        ) from None


def _check_endpoint(cluster: GpuClusterArgs, environment: str, warnings: list[str]) -> None:
    where = _key("cluster.endpoint.publicAccessCidrs")
    if cluster.endpoint_public_access and not cluster.public_access_cidrs:
        raise ConfigError(
            where,
            "a public API endpoint needs an allow-list of CIDRs (EKS would open it to 0.0.0.0/0); "
            "list your ranges or set publicAccess false",
        )
    open_cidrs = [c for c in cluster.public_access_cidrs if c in ("0.0.0.0/0", "::/0")]
    if open_cidrs and environment == "prod":
        raise ConfigError(
            where, f"{open_cidrs} opens the API of a prod stack to the internet; list your ranges"
        )
    if open_cidrs:
        warnings.append(f"cluster.endpoint.publicAccessCidrs contains {open_cidrs}: the API is open to all")


def gpu_node_requests(serving: ModelServiceArgs) -> Requests:
    """What the DaemonSets on every GPU node request together: EKS's own and the service's."""
    total = Requests(0, 0)
    for requests in EKS_NODE_DAEMONSETS.values():
        total += requests
    for quantities in gpu_node_daemonsets(serving).values():
        total += Requests(cpu_millicores(quantities["cpu"]), memory_mib(quantities["memory"]))
    return total


def pool_fits(cluster: GpuClusterArgs, serving: ModelServiceArgs) -> list[tuple[NodePool, NodeFit]]:
    """Each GPU pool with the model pods one of its nodes holds (its smallest type's fit, and why)."""
    pod = Requests(cpu_millicores(serving.cpu), memory_mib(serving.memory))
    daemonsets = gpu_node_requests(serving)
    fits: list[tuple[NodePool, NodeFit]] = []
    for pool in cluster.all_gpu_pools:
        by_type = [node_fit(t, pod, daemonsets, cluster.time_slicing_replicas) for t in pool.instance_types]
        fits.append((pool, min(by_type, key=lambda fit: fit.pods)))
    return fits


def capacity_report(cluster: GpuClusterArgs, serving: ModelServiceArgs) -> list[str]:
    """The capacity arithmetic of a stack, one line a pool and a total (``make render`` prints it)."""
    fits = pool_fits(cluster, serving)
    lines = [f"pool {pool.name}: {pool.max_size} nodes max; {fit.explain()}" for pool, fit in fits]
    slots = sum(pool.max_size * fit.pods for pool, fit in fits)
    lines.append(
        f"model pods at the pools' maxSize: {slots} (HPA maximum {serving.max_replicas}, "
        f"requests {serving.cpu} CPU and {serving.memory} a pod)"
    )
    return lines


def _check_capacity(cluster: GpuClusterArgs, serving: ModelServiceArgs) -> None:
    """Refuse pods that defeat time-slicing, and an HPA maximum the pools cannot hold."""
    fits = pool_fits(cluster, serving)
    for pool, fit in fits:
        if fit.pods < fit.gpu_slots:
            key = "serving.cpu" if fit.by_cpu <= fit.by_memory else "serving.memory"
            raise ConfigError(
                _key(key),
                f"pool {pool.name!r} offers {fit.gpu_slots} time-sliced GPU slots a node "
                f"({cluster.time_slicing_replicas} replicas per GPU) but only {fit.pods} model pods fit: "
                f"{fit.explain()}. Lower serving.cpu or serving.memory, use a larger instance type, "
                "or lower cluster.devicePlugin.timeSlicingReplicas",
            )
    slots = sum(pool.max_size * fit.pods for pool, fit in fits)
    if slots < serving.max_replicas:
        detail = " + ".join(f"{pool.name} {pool.max_size} × {fit.pods}" for pool, fit in fits)
        raise ConfigError(
            _key("serving.maxReplicas"),
            f"{serving.max_replicas} replicas cannot fit: the GPU pools hold at most {slots} "
            f"({detail}: maxSize × model pods per node); raise the pools' maxSize or timeSlicingReplicas",
        )


def raw_from_stack_yaml(config: Mapping[str, Any]) -> tuple[dict[str, Any], str | None]:
    """Split a stack file's ``config:`` map into the ``dualdeploy:`` dict and ``aws:region``.

    Used by tests and the offline tools, which read ``stacks/Pulumi.<stack>.yaml`` directly.
    Secure values (``{secure: ...}``) are left out: they cannot be decrypted without the CLI.
    """
    raw: dict[str, Any] = {}
    for full_key, value in config.items():
        namespace, _, name = full_key.partition(":")
        if namespace == NAMESPACE and not (isinstance(value, Mapping) and "secure" in value):
            raw[name] = value
    region = config.get("aws:region")
    return raw, str(region) if region else None
