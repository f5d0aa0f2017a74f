"""The Pulumi program: read the stack config once, create the components from their Args, export.

``deploy/config.py`` turns the stack into the components' own Args (a bad stack file stops here,
before any resource exists); each component in ``components/`` owns its resources. What one
component produces for another (the subnets, the image by digest, the teacher's addresses and
credentials) and the vault secret are the only values filled in here.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pulumi

from components import k8s_specs
from components.aws.gpu_cluster import GpuCluster
from components.aws.model_image import ModelImage
from components.aws.network import Network
from components.edge_fleet import EdgeEscalationArgs, EdgeFleet
from components.model_service import ModelService, ModelServiceArgs
from components.serving_identity import ServingIdentity, ServingIdentityArgs
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


def teacher_for_the_edge(
    service: ModelServiceArgs, network: Network
) -> tuple[ModelServiceArgs, EdgeEscalationArgs]:
    """The cloud service as the edge cascade's teacher: HTTPS and tokens on the NLB's Elastic IPs.

    The devices connect to the first zone's address (their firewall admits exactly that address and
    port); the certificate carries every zone's address and the in-cluster names.
    """
    names = [k8s_specs.server_name(service), f"{k8s_specs.server_name(service)}.cluster.local"]
    identity = ServingIdentity(
        "teacher-identity",
        ServingIdentityArgs(common_name=names[0], dns_names=names, ip_addresses=network.ingress_public_ips),
    )
    service = dataclasses.replace(
        service, credentials=identity.credentials, eip_allocation_ids=network.ingress_allocation_ids
    )
    endpoint = network.ingress_public_ips.apply(lambda ips: f"https://{ips[0]}:{k8s_specs.HTTPS_PORT}")
    pulumi.export("teacher_endpoint", endpoint)
    pulumi.export("teacher_ca", identity.ca_pem)
    return service, EdgeEscalationArgs(endpoint=endpoint, ca_pem=identity.ca_pem, token=identity.token)


def main() -> None:
    """Create the components the stack asks for and export their outputs."""
    cfg = load()
    pulumi.export("stack", cfg.stack)

    escalation: EdgeEscalationArgs | None = None
    service: ModelService | None = None
    if cfg.cluster is not None:
        assert cfg.network is not None and cfg.image is not None and cfg.service is not None
        assert cfg.bundle is not None
        network = Network("net", cfg.network)
        gpu = GpuCluster("cluster", dataclasses.replace(cfg.cluster, subnet_ids=network.private_subnet_ids))
        image = ModelImage("image", cfg.image)
        service_args = dataclasses.replace(cfg.service, image=image.image_ref)
        if cfg.escalation == "low_confidence":
            service_args, escalation = teacher_for_the_edge(service_args, network)
        service = ModelService(
            "service",
            service_args,
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
        fleet = EdgeFleet(
            "edge",
            dataclasses.replace(cfg.edge, vault_password=vault_password, escalation=escalation),
            # Devices that escalate start once their teacher's objects exist.
            opts=pulumi.ResourceOptions(depends_on=[service]) if service is not None else None,
        )
        pulumi.export("edge_hosts", fleet.hosts)


main()
