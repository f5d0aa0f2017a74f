"""The Pulumi program: read the stack config once, create the components from their Args, export.

``deploy/config.py`` turns the stack into the components' own Args (a bad stack file stops here,
before any resource exists); each component in ``components/`` owns its resources. What one
component produces for another (the subnets, the image by digest) and the vault secret are the
only values filled in here.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pulumi

from components.aws.gpu_cluster import GpuCluster
from components.aws.model_image import ModelImage
from components.aws.network import Network
from components.edge_fleet import EdgeFleet
from components.model_service import ModelService
from deploy.config import NAMESPACE, TOP_LEVEL_KEYS, ConfigError, StackConfig, parse_stack_config
from deploy.pulumi_config import configured_names, read_stack_dict

EDGE_VAULT_PASSWORD = "edgeVaultPassword"


def load() -> StackConfig:
    """Parse the stack's config, or stop the program with the key path that is wrong."""
    try:
        stack = parse_stack_config(
            read_stack_dict(
                pulumi.Config(NAMESPACE),
                TOP_LEVEL_KEYS,
                configured_names(NAMESPACE),
                secrets={EDGE_VAULT_PASSWORD},
            ),
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
        assert cfg.network is not None and cfg.image is not None and cfg.service is not None
        assert cfg.bundle is not None
        network = Network("net", cfg.network)
        gpu = GpuCluster("cluster", dataclasses.replace(cfg.cluster, subnet_ids=network.private_subnet_ids))
        image = ModelImage("image", cfg.image)
        service = ModelService(
            "service",
            dataclasses.replace(cfg.service, image=image.image_ref),
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
        vault_password = pulumi.Config(NAMESPACE).get_secret(EDGE_VAULT_PASSWORD)
        fleet = EdgeFleet("edge", dataclasses.replace(cfg.edge, vault_password=vault_password))
        pulumi.export("edge_hosts", fleet.hosts)


main()
