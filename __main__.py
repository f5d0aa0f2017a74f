"""The Pulumi program: read the stack config once, build Args, create components, export.

The components live in ``components/``; ``deploy/config.py`` validates the stack (a bad stack
file stops here, before any resource exists), and each component owns its resources.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

import pulumi

from deploy.config import TOP_LEVEL_KEYS, ConfigError, StackConfig, parse_stack_config


def read_stack_dict(config: pulumi.Config) -> dict[str, Any]:
    """Collect every ``dualdeploy:*`` key into a plain dict (secrets excluded).

    Objects and booleans arrive from Pulumi as JSON text; they are decoded here so the
    parser sees YAML-shaped values. Unknown ``dualdeploy:`` keys are passed through so the
    parser can name them.
    """
    raw: dict[str, Any] = {}
    names = set(TOP_LEVEL_KEYS) | _configured_names()
    for name in sorted(names - {"edgeVaultPassword"}):
        value = config.get(name)
        if value is None:
            continue
        if TOP_LEVEL_KEYS.get(name) in ("object", "bool") or name not in TOP_LEVEL_KEYS:
            # Not JSON: the parser reports the key with what it expected.
            with contextlib.suppress(ValueError):
                value = json.loads(value)
        raw[name] = value
    return raw


def _configured_names() -> set[str]:
    """Names of all ``dualdeploy:`` keys the engine passed in, typos included."""
    from pulumi.runtime import config as runtime_config  # noqa: PLC0415 - only to list key names

    keys = set(runtime_config.CONFIG.get()) | set(runtime_config.get_config_env())
    return {k.split(":", 1)[1] for k in keys if k.startswith("dualdeploy:")}


def load() -> StackConfig:
    """Parse the stack's config, or stop the program with the key path that is wrong."""
    try:
        stack = parse_stack_config(
            read_stack_dict(pulumi.Config("dualdeploy")),
            stack=pulumi.get_stack(),
            region=pulumi.Config("aws").get("region"),
            base_dir=Path.cwd(),
        )
    except ConfigError as exc:
        # A plain exception ends `pulumi up` with its message and no Python traceback noise.
        raise pulumi.RunError(f"invalid stack config: {exc}") from None
    for warning in stack.warnings:
        pulumi.log.warn(warning)
    return stack


def main() -> None:
    """Create the components the stack asks for and export their outputs."""
    cfg = load()
    pulumi.export("stack", cfg.stack)

    if cfg.cluster is not None:
        from components.aws.gpu_cluster import GpuCluster, GpuClusterArgs, NodePool  # noqa: PLC0415
        from components.aws.network import Network, NetworkArgs  # noqa: PLC0415

        assert cfg.network is not None and cfg.region is not None and cfg.bundle is not None
        cluster = cfg.cluster
        network = Network(
            "net",
            NetworkArgs(
                cidr=cfg.network.cidr,
                availability_zones=list(cfg.network.availability_zones),
                cluster_name=cluster.name,
                nat_gateways=cfg.network.nat_gateways,
                tags=dict(cfg.tags),
            ),
        )

        def pool(p: Any, name: str) -> NodePool:
            return NodePool(
                name=name,
                instance_types=list(p.instance_types),
                min_size=p.min_size,
                max_size=p.max_size,
                desired_size=p.desired_size,
                disk_size_gib=p.disk_size_gib,
            )

        gpu = GpuCluster(
            "cluster",
            GpuClusterArgs(
                cluster_name=cluster.name,
                kubernetes_version=cluster.kubernetes_version,
                region=cfg.region,
                vpc_id=network.vpc_id,
                subnet_ids=network.private_subnet_ids,
                system_pool=pool(cluster.system_pool, "system"),
                gpu_pools=[pool(p, p.name) for p in cluster.gpu_pools],
                fallback_pool=(
                    pool(cluster.fallback_pool, cluster.fallback_pool.name) if cluster.fallback_pool else None
                ),
                endpoint_public_access=cluster.endpoint.public_access,
                public_access_cidrs=list(cluster.endpoint.public_access_cidrs),
                log_types=list(cluster.log_types),
                device_plugin_chart_version=cluster.device_plugin.chart_version,
                time_slicing_replicas=cluster.device_plugin.time_slicing_replicas,
                autoscaler_chart_version=cluster.autoscaler.chart_version,
                autoscaler_image_tag=cluster.autoscaler.image_tag,
                metrics_server_chart_version=cluster.metrics_server_chart,
                tags=dict(cfg.tags),
            ),
        )
        from components.aws.model_image import ModelImage, ModelImageArgs  # noqa: PLC0415
        from components.model_service import ModelService, args_from_config  # noqa: PLC0415

        assert cfg.serving is not None
        # The bundle's real folder (latest resolved): Docker copies a folder, not a link to one.
        image = ModelImage(
            "image",
            ModelImageArgs(
                repository_name=f"dualdeploy/{cfg.bundle.model}",
                context_dir=Path.cwd(),
                bundle_dir=cfg.bundle.resolved,
                bundle_version=cfg.bundle.version,
                public_key=Path.cwd() / cfg.serving.public_key if cfg.serving.public_key else None,
                base="gpu",  # every cloud pool is a GPU pool
                tensorrt_version=cfg.bundle.tensorrt_version,
                keep_images=cfg.serving.keep_images,
                # `pulumi destroy` of a dev stack removes its images too; prod keeps them (and then
                # refuses to delete the repository until someone empties it on purpose).
                force_delete=cfg.environment != "prod",
                tags=dict(cfg.tags),
            ),
        )
        service = ModelService(
            "service",
            args_from_config(
                cfg.serving,
                cfg.bundle,
                [p.gpu_arch for p in cluster.all_gpu_pools],
                allow_cuda_fallback=not cfg.require_engines,
                image=image.image_ref,
            ),
            # The cluster's provider; waiting on the cluster component means its device plugin
            # and autoscaler exist before the first GPU pod asks for a node.
            opts=pulumi.ResourceOptions(provider=gpu.provider, depends_on=[gpu]),
        )
        pulumi.export("image", image.image_ref)
        pulumi.export("service_url", service.url)
        pulumi.export("vpc_id", network.vpc_id)
        pulumi.export("cluster_name", gpu.cluster_name)
        pulumi.export("kubeconfig", gpu.kubeconfig)
        pulumi.export("gpu_node_groups", gpu.gpu_node_group_names)
        pulumi.export("bundle", {"model": cfg.bundle.model, "version": cfg.bundle.version})

    if cfg.edge is not None:
        # Imported only for stacks with an edge part: it pulls in ansible-runner.
        from components.edge_fleet import EdgeFleet, EdgeFleetArgs  # noqa: PLC0415

        edge = cfg.edge
        fleet = EdgeFleet(
            "edge",
            EdgeFleetArgs(
                inventory=edge.inventory,
                bundle_dir=edge.bundle,
                playbook=edge.playbook,
                public_key=edge.public_key,
                vault_password=pulumi.Config("dualdeploy").get_secret("edgeVaultPassword"),
                limit=edge.limit,
            ),
        )
        pulumi.export("edge_hosts", fleet.hosts)


main()
