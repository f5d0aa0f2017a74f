"""GpuCluster: an EKS cluster whose GPU capacity is mostly Spot, built with pulumi_aws directly.

What it creates, and why each piece is there:

- a KMS key for envelope encryption of Kubernetes secrets (and the cluster role's right to use
  it), and the control-plane log group, encrypted with that key
  (created here so its retention is ours, not "never expire");
- EKS access entries (API authentication, no implicit creator admin): cluster admin for the deploy
  role and any admin roles, read-only (AmazonEKSAdminViewPolicy) for the PR preview role;
- the EKS cluster at a pinned version, its API endpoint private by default;
- an IAM OIDC provider, so pods get AWS roles through IRSA instead of the node's role;
- one on-demand CPU node group for system pods;
- Spot GPU node groups, each of one node size (the cluster autoscaler plans a group with one
  instance type's vCPUs and memory) and one GPU architecture; together they span three or more
  instance types (diversified, so one type's Spot shortage does not stop scaling), and the
  priority expander tries the smallest size first. Each has the accelerated AMI, the
  ``dualdeploy.io/gpu-arch`` label that the model Deployment's node affinity matches, the
  ``k8s.amazonaws.com/accelerator`` label (node and ASG node-template tag) with which the
  autoscaler waits for a new node's GPUs instead of starting another, and the
  ``nvidia.com/gpu=present:NoSchedule`` taint that keeps other pods off GPUs;
- an optional on-demand GPU fallback group (minimum 0), ranked below every Spot group;
- the NVIDIA device plugin (optionally time-slicing each GPU between several model pods);
- the cluster autoscaler with its own IRSA role and the priority expander, able to scale
  the GPU groups from zero;
- metrics-server, the HPA's source of CPU utilisation (EKS does not install it).

Spot interruptions: the component uses EKS *managed* node groups and deliberately does not
install aws-node-termination-handler. Managed node groups with capacity type SPOT turn on
Capacity Rebalancing and drain a node themselves when EC2 sends a rebalance recommendation
or the two-minute interruption notice (AWS EKS user guide, "Managed node groups",
"Spot Instances"). The termination handler is meant for self-managed groups; run beside
managed groups, two agents would cordon and drain the same node. The pod side (SIGTERM
drain, ``preStop``, grace period, PDB, spread) belongs to the serving component.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pulumi
import pulumi_aws as aws
import pulumi_kubernetes as k8s
import yaml

from components.aws.gpu_instances import GPU_INSTANCE_TYPES, GpuInstanceType, accelerator
from components.aws.log_encryption import logs_key, partition_of
from components.k8s_specs import CAPACITY_LABEL, GPU_ARCH_LABEL, GPU_RESOURCE

SUPPORTED_KUBERNETES_VERSIONS: tuple[str, ...] = ("1.31", "1.32", "1.33", "1.34")
"""EKS versions this code was written against. The cluster autoscaler's minor must match."""

AUTOSCALER_RELEASES: Mapping[str, tuple[str, str]] = {
    "1.31": ("9.43.1", "v1.31.0"),
    "1.32": ("9.46.6", "v1.32.0"),
    "1.33": ("9.50.1", "v1.33.0"),
    "1.34": ("9.52.1", "v1.34.1"),
}
"""Kubernetes minor → (cluster-autoscaler chart, the image that chart ships as its appVersion).

The autoscaler's minor must match the cluster's, and the chart's templates are written for its
own appVersion, so both come from one row. Sources: the chart's Chart.yaml in kubernetes/autoscaler
(9.43.1 → 1.31.0), ``helm search repo autoscaler/cluster-autoscaler --versions`` quoted in
kubernetes/autoscaler#8891 (9.50.1 → 1.33.0, 9.52.1 → 1.34.1), and issue 17's review of the chart
history (9.46.6 → 1.32.0). Never pulled here: check them before a real apply.
"""

CLUSTER_AUTOSCALER_IMAGE_TAGS: Mapping[str, str] = {
    minor: tag for minor, (_, tag) in AUTOSCALER_RELEASES.items()
}
"""Default cluster-autoscaler image per Kubernetes minor (its releases track the minor)."""

DEFAULT_DEVICE_PLUGIN_CHART = "0.18.0"
DEFAULT_AUTOSCALER_CHART = AUTOSCALER_RELEASES["1.33"][0]
DEFAULT_METRICS_SERVER_CHART = "3.12.2"
LOG_TYPES = ("api", "audit", "authenticator", "controllerManager", "scheduler")
REQUIRED_LOG_TYPES = ("api", "audit", "authenticator")
NODE_GROUP_NAME_MAX = 63
"""EKS's limit on a node group name."""

GPU_TAINT_KEY = GPU_RESOURCE
"""GPU nodes are tainted with the device plugin's resource name; model pods tolerate exactly that."""
POOL_LABEL = "dualdeploy.io/pool"
ACCELERATOR_LABEL = "k8s.amazonaws.com/accelerator"
"""The AWS cluster autoscaler's GPU label (``GPULabel`` in its aws_cloud_provider.go): a node that
carries it counts as not ready until the device plugin advertises ``nvidia.com/gpu``, so the
autoscaler does not start a second node for pods the first one is about to take."""
MIN_SPOT_TYPES = 3
"""Instance types the Spot pools must span together, so one type's Spot shortage does not stop scaling."""
DEFAULT_DEPLOY_ROLE = "dualdeploy-github-deploy"
DEFAULT_PREVIEW_ROLE = "dualdeploy-github-preview"
ACCESS_POLICY_ARN = "arn:aws:eks::aws:cluster-access-policy/"
DEPLOY_ACCESS_POLICY = "AmazonEKSClusterAdminPolicy"
"""``pulumi up`` creates namespaces, ClusterRoles and webhooks through the charts: cluster admin."""
PREVIEW_ACCESS_POLICY = "AmazonEKSAdminViewPolicy"
"""Read-only, cluster-wide, Secrets included (Helm keeps its release records in Secrets)."""
ACCESS_TAG = "dualdeploy:access"
"""Tag on each access entry: ``deploy``, ``preview`` or ``admin`` (the policy pack reads it)."""
_ROLE_NAME = re.compile(r"[\w+=,.@-]{1,64}")
GPU_AMI_TYPE = "AL2023_x86_64_NVIDIA"
CPU_AMI_TYPE = "AL2023_x86_64_STANDARD"
DEVICE_PLUGIN_REPO = "https://nvidia.github.io/k8s-device-plugin"
AUTOSCALER_REPO = "https://kubernetes.github.io/autoscaler"
METRICS_SERVER_REPO = "https://kubernetes-sigs.github.io/metrics-server/"
AUTOSCALER_SERVICE_ACCOUNT = "cluster-autoscaler"
AUTOSCALER_NAMESPACE = "kube-system"
SPOT_PRIORITY = 50
FALLBACK_PRIORITY = 10
OTHER_PRIORITY = 1
_MANAGED_POLICY = "arn:aws:iam::aws:policy/"
_TEMPLATE = "k8s.io/cluster-autoscaler/node-template"


@dataclass
class NodePool:
    """The shape of one managed node group.

    Pools are concrete values, not Inputs: their number and instance types decide which
    resources exist and which labels the nodes carry, so they must be known up front.
    """

    name: str
    """Short name; the node group is ``<cluster>-system`` or ``<cluster>-gpu-<role>-<name>``."""

    instance_types: Sequence[str]
    """EC2 instance types. GPU pools: types from components/aws/gpu_instances.py, one architecture."""

    min_size: int
    """Fewest nodes. GPU pools usually 0 (scale from zero); the fallback must be 0."""

    max_size: int
    """Most nodes the autoscaler may start."""

    desired_size: int | None = None
    """Nodes at creation (default ``min_size``); the autoscaler owns it afterwards."""

    disk_size_gib: int = 100
    """Root volume size; serving images with CUDA and TensorRT are several GiB."""


@dataclass
class GpuClusterArgs:
    """Inputs of :class:`GpuCluster`."""

    cluster_name: str
    """EKS cluster name. Concrete: node group names and the autoscaler's regexes derive from it."""

    kubernetes_version: str
    """Pinned EKS version, one of ``SUPPORTED_KUBERNETES_VERSIONS``."""

    region: str
    """AWS region (the autoscaler and the kubeconfig's ``aws eks get-token`` need it)."""

    system_pool: NodePool
    """The on-demand CPU node group for system pods."""

    gpu_pools: Sequence[NodePool]
    """Spot GPU node groups, each of one size (vCPUs, memory, GPUs) and one GPU architecture;
    together they span ≥ 3 instance types (one pool per size, e.g. g5.xlarge, g5.2xlarge, g5.4xlarge)."""

    fallback_pool: NodePool | None = None
    """Optional on-demand GPU node group with ``min_size`` 0, used only when Spot cannot be had."""

    endpoint_public_access: pulumi.Input[bool] = False
    """Expose the API endpoint publicly too (it is always reachable from inside the VPC)."""

    public_access_cidrs: Sequence[str] = ()
    """Allow-list for the public endpoint; required when it is public."""

    log_types: Sequence[str] = LOG_TYPES
    """Control-plane log types sent to CloudWatch; must include api, audit, authenticator."""

    log_retention_days: pulumi.Input[int] = 90
    """Retention of the control-plane log group."""

    device_plugin_chart_version: pulumi.Input[str] = DEFAULT_DEVICE_PLUGIN_CHART
    """Pinned nvidia-device-plugin chart version."""

    time_slicing_replicas: int = 1
    """Pods sharing one GPU through time-slicing; 1 turns it off. Concrete: the autoscaler's
    scale-from-zero GPU count is multiplied by it."""

    autoscaler_chart_version: pulumi.Input[str] = DEFAULT_AUTOSCALER_CHART
    """Pinned cluster-autoscaler chart version."""

    autoscaler_image_tag: pulumi.Input[str] = CLUSTER_AUTOSCALER_IMAGE_TAGS["1.33"]
    """cluster-autoscaler image; its minor must match ``kubernetes_version``."""

    metrics_server_chart_version: pulumi.Input[str] = DEFAULT_METRICS_SERVER_CHART
    """Pinned metrics-server chart. EKS does not install metrics-server, and without it an HPA
    has no CPU metric and never scales."""

    deploy_role_name: str = DEFAULT_DEPLOY_ROLE
    """IAM role (same account, no path) that runs ``pulumi up``: cluster admin through an access
    entry. The creator gets no implicit admin: whoever applies must be this role or an admin role."""

    preview_role_name: str = DEFAULT_PREVIEW_ROLE
    """IAM role that runs ``pulumi preview`` on pull requests: read-only access (AmazonEKSAdminViewPolicy)."""

    admin_role_names: Sequence[str] = ()
    """More IAM roles with cluster admin (people, break-glass)."""

    tags: Mapping[str, str] = field(default_factory=dict)
    """Tags for every taggable AWS resource."""

    subnet_ids: pulumi.Input[Sequence[pulumi.Input[str]]] | None = None
    """Private subnets, in at least two zones, for the control plane ENIs and every node
    (:attr:`components.aws.network.Network.private_subnet_ids`; EKS finds the VPC from them).
    Required; it defaults to None only because the stack config is read before the Network
    exists, and ``__main__.py`` fills it in."""

    @property
    def all_gpu_pools(self) -> list[NodePool]:
        """The Spot pools followed by the fallback pool, if any."""
        return [pool for pool, _ in pool_roles(self)]


def gpu_facts(pool: NodePool) -> GpuInstanceType:
    """The GPU of a pool's nodes, from the GPU table (validation makes every type of a pool agree).

    Raises:
        KeyError: the pool's first instance type is not in the GPU table (a CPU pool).
    """
    return GPU_INSTANCE_TYPES[pool.instance_types[0]]


def pool_roles(args: GpuClusterArgs) -> list[tuple[NodePool, str]]:
    """Each GPU pool with its role: ``spot`` for ``gpu_pools``, ``fallback`` for the fallback pool."""
    roles = [(pool, "spot") for pool in args.gpu_pools]
    return roles + ([(args.fallback_pool, "fallback")] if args.fallback_pool is not None else [])


def capacity_type(role: str) -> str:
    """EKS capacity type of a GPU pool: ``SPOT`` for the Spot pools, ``ON_DEMAND`` for the fallback."""
    return "SPOT" if role == "spot" else "ON_DEMAND"


def capacity_types(args: GpuClusterArgs) -> dict[str, str]:
    """Pool name → the EKS capacity type its node group gets."""
    return {pool.name: capacity_type(role) for pool, role in pool_roles(args)}


def node_group_name(cluster_name: str, role: str, pool: NodePool) -> str:
    """The managed node group's name, ``<cluster>-gpu-<role>-<pool>`` (at most 63 characters)."""
    return f"{cluster_name}-gpu-{role}-{pool.name}"


def _subnets(args: GpuClusterArgs) -> pulumi.Input[Sequence[pulumi.Input[str]]]:
    """The private subnets, which the stack config leaves to ``__main__.py``.

    Raises:
        ValueError: they were never filled in.
    """
    if args.subnet_ids is None:
        raise ValueError("subnet_ids: required; pass the Network's private_subnet_ids")
    return args.subnet_ids


def _validate(args: GpuClusterArgs) -> None:
    """Raise ValueError naming the input and the allowed values."""
    _subnets(args)
    if args.kubernetes_version not in SUPPORTED_KUBERNETES_VERSIONS:
        raise ValueError(
            f"kubernetes_version: {args.kubernetes_version!r} is not one of "
            f"{', '.join(SUPPORTED_KUBERNETES_VERSIONS)}"
        )
    if not set(REQUIRED_LOG_TYPES) <= set(args.log_types) or not set(args.log_types) <= set(LOG_TYPES):
        raise ValueError(f"log_types: must include api, audit, authenticator and only {', '.join(LOG_TYPES)}")
    if args.endpoint_public_access is True and not args.public_access_cidrs:
        raise ValueError(
            "public_access_cidrs: a public endpoint without an allow-list is open to 0.0.0.0/0; "
            "pass the CIDRs that may reach it, or keep endpoint_public_access False"
        )
    if not args.gpu_pools:
        raise ValueError("gpu_pools: at least one Spot GPU pool is required")
    if args.time_slicing_replicas < 1:
        raise ValueError(f"time_slicing_replicas: must be ≥ 1, got {args.time_slicing_replicas}")
    pools = [(p, "gpu_pools") for p in args.gpu_pools]
    if args.fallback_pool is not None:
        pools.append((args.fallback_pool, "fallback_pool"))
        if args.fallback_pool.min_size != 0:
            raise ValueError(f"fallback_pool.min_size: must be 0, got {args.fallback_pool.min_size}")
    names = [p.name for p, _ in pools]
    if len(set(names)) != len(names):
        raise ValueError(f"gpu_pools: pool names must be unique, got {names}")
    for pool, where in pools:
        _validate_gpu_pool(pool, where)
        role = "spot" if where == "gpu_pools" else "fallback"
        group = node_group_name(args.cluster_name, role, pool)
        if len(group) > NODE_GROUP_NAME_MAX:
            raise ValueError(
                f"{where}[{pool.name}].name: node group name {group!r} exceeds EKS's "
                f"{NODE_GROUP_NAME_MAX} characters"
            )
    _validate_cluster_wide(args)


def _validate_cluster_wide(args: GpuClusterArgs) -> None:
    """What spans pools and add-ons: Spot diversity, the access roles, the autoscaler's chart."""
    spot_types = sorted({t for p in args.gpu_pools for t in p.instance_types})
    if len(spot_types) < MIN_SPOT_TYPES:
        raise ValueError(
            f"gpu_pools: the Spot pools together need ≥ {MIN_SPOT_TYPES} instance types so one type's "
            f"shortage does not stop scaling, got {spot_types}; add a pool of another size or family"
        )
    roles = [args.deploy_role_name, args.preview_role_name, *args.admin_role_names]
    for role_name in roles:
        if not _ROLE_NAME.fullmatch(role_name):
            raise ValueError(f"access: {role_name!r} is not an IAM role name (no path, ≤ 64 characters)")
    if len(set(roles)) != len(roles):
        raise ValueError(f"access: each role gets one access entry, got {roles}")
    chart = args.autoscaler_chart_version
    expected_chart, expected_tag = AUTOSCALER_RELEASES[args.kubernetes_version]
    if isinstance(chart, str) and chart != expected_chart:
        raise ValueError(
            f"autoscaler_chart_version: {chart!r} does not ship cluster-autoscaler {expected_tag} for "
            f"Kubernetes {args.kubernetes_version}; use {expected_chart} (AUTOSCALER_RELEASES)"
        )


def _validate_gpu_pool(pool: NodePool, where: str) -> None:
    if not 0 <= pool.min_size <= pool.max_size:
        raise ValueError(
            f"{where}[{pool.name}]: need 0 ≤ min_size ≤ max_size, got {pool.min_size}..{pool.max_size}"
        )
    unknown = [t for t in pool.instance_types if t not in GPU_INSTANCE_TYPES]
    if unknown:
        raise ValueError(
            f"{where}[{pool.name}].instance_types: {unknown} not in components/aws/gpu_instances.py"
        )
    types = [GPU_INSTANCE_TYPES[t] for t in pool.instance_types]
    arches = {t.gpu_arch for t in types}
    counts = {t.gpus for t in types}
    if len(arches) != 1 or len(counts) != 1:
        raise ValueError(
            f"{where}[{pool.name}].instance_types: one GPU architecture and GPU count per pool, "
            f"got arches {sorted(arches)} and counts {sorted(counts)}"
        )
    if len({t.node_size for t in types}) != 1:
        raise ValueError(
            f"{where}[{pool.name}].instance_types: one size per pool (the cluster autoscaler plans "
            f"with one type's vCPUs and memory), got {', '.join(t.describe() for t in types)}"
        )


def _assume_role_policy(service: str) -> str:
    return json.dumps(
        {
            "Version": "2012-10-17",
            "Statement": [
                {
                    "Effect": "Allow",
                    "Principal": {"Service": service},
                    "Action": ["sts:AssumeRole", "sts:TagSession"]
                    if service.startswith("eks.")
                    else "sts:AssumeRole",
                }
            ],
        }
    )


def irsa_trust_policy(oidc_arn: str, issuer_url: str, namespace: str, service_account: str) -> str:
    """The trust policy that lets one Kubernetes service account assume a role (IRSA)."""
    issuer = issuer_url.removeprefix("https://")
    return json.dumps(
        {
            "Version": "2012-10-17",
            "Statement": [
                {
                    "Effect": "Allow",
                    "Principal": {"Federated": oidc_arn},
                    "Action": "sts:AssumeRoleWithWebIdentity",
                    "Condition": {
                        "StringEquals": {
                            f"{issuer}:sub": f"system:serviceaccount:{namespace}:{service_account}",
                            f"{issuer}:aud": "sts.amazonaws.com",
                        }
                    },
                }
            ],
        }
    )


def autoscaler_policy(cluster_name: str) -> dict[str, Any]:
    """IAM policy of the cluster autoscaler, as the autoscaler's AWS guide lists it.

    Read actions are unrestricted (they cannot be scoped); the two actions that change
    capacity only apply to groups tagged as this cluster's. ``eks:DescribeNodegroup`` is what
    lets the autoscaler read a managed group's labels and taints while it has zero nodes.
    """
    return {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Sid": "Describe",
                "Effect": "Allow",
                "Action": [
                    "autoscaling:DescribeAutoScalingGroups",
                    "autoscaling:DescribeAutoScalingInstances",
                    "autoscaling:DescribeLaunchConfigurations",
                    "autoscaling:DescribeScalingActivities",
                    "autoscaling:DescribeTags",
                    "ec2:DescribeImages",
                    "ec2:DescribeInstanceTypes",
                    "ec2:DescribeLaunchTemplateVersions",
                    "ec2:GetInstanceTypesFromInstanceRequirements",
                    "eks:DescribeNodegroup",
                ],
                "Resource": "*",
            },
            {
                "Sid": "ScaleOwnGroups",
                "Effect": "Allow",
                "Action": [
                    "autoscaling:SetDesiredCapacity",
                    "autoscaling:TerminateInstanceInAutoScalingGroup",
                ],
                "Resource": "*",
                "Condition": {
                    "StringEquals": {f"aws:ResourceTag/k8s.io/cluster-autoscaler/{cluster_name}": "owned"}
                },
            },
        ],
    }


def kubeconfig_for(cluster_name: str, endpoint: str, ca_data: str, region: str) -> str:
    """A kubeconfig that authenticates through ``aws eks get-token`` (no token stored)."""
    user = f"{cluster_name}-user"
    return json.dumps(
        {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {"name": cluster_name, "cluster": {"server": endpoint, "certificate-authority-data": ca_data}}
            ],
            "contexts": [{"name": cluster_name, "context": {"cluster": cluster_name, "user": user}}],
            "current-context": cluster_name,
            "users": [
                {
                    "name": user,
                    "user": {
                        "exec": {
                            "apiVersion": "client.authentication.k8s.io/v1beta1",
                            "command": "aws",
                            "args": ["eks", "get-token", "--cluster-name", cluster_name, "--region", region],
                        }
                    },
                }
            ],
        }
    )


def time_slicing_config(replicas: int) -> str:
    """The device plugin's config file that shares each GPU between ``replicas`` pods.

    ``renameByDefault: false`` keeps the resource name ``nvidia.com/gpu`` so pods request it
    as usual; ``failRequestsGreaterThanOne`` rejects pods asking for more than one share,
    since shares of one GPU give no extra compute.
    """
    return yaml.safe_dump(
        {
            "version": "v1",
            "flags": {"migStrategy": "none"},
            "sharing": {
                "timeSlicing": {
                    "renameByDefault": False,
                    "failRequestsGreaterThanOne": True,
                    "resources": [{"name": "nvidia.com/gpu", "replicas": replicas}],
                }
            },
        },
        sort_keys=False,
    )


class GpuCluster(pulumi.ComponentResource):
    """EKS with Spot GPU node groups, the NVIDIA device plugin and the cluster autoscaler."""

    cluster_name: pulumi.Output[str]
    kubeconfig: pulumi.Output[str]
    provider: k8s.Provider
    oidc_provider_arn: pulumi.Output[str]
    gpu_node_group_names: pulumi.Output[list[str]]

    def __init__(self, name: str, args: GpuClusterArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        """Create the cluster.

        Raises:
            ValueError: an input is out of its allowed values (named in the message).
        """
        _validate(args)
        super().__init__("dualdeploy:gpu_cluster:GpuCluster", name, None, opts)
        child = pulumi.ResourceOptions(parent=self)
        tags = dict(args.tags)
        cluster_name = args.cluster_name

        # ---------------------------------------------------------------- encryption, logs, role
        identity = aws.get_caller_identity_output()
        log_group_name = f"/aws/eks/{cluster_name}/cluster"
        # One key for the Kubernetes secrets and the control-plane log group; its policy lets
        # CloudWatch Logs use it for that log group only (components/aws/log_encryption.py).
        key = logs_key(
            f"{name}-secrets-key",
            description=f"Kubernetes secrets and control-plane logs of EKS cluster {cluster_name}",
            region=args.region,
            log_groups=[log_group_name],
            tags=tags,
            parent=self,
        )
        aws.kms.Alias(
            f"{name}-secrets-key-alias",
            name=f"alias/{cluster_name}-secrets",
            target_key_id=key.key_id,
            opts=child,
        )
        log_group = aws.cloudwatch.LogGroup(
            f"{name}-control-plane-logs",
            name=log_group_name,
            retention_in_days=args.log_retention_days,
            kms_key_id=key.arn,
            tags=tags,
            opts=child,
        )
        cluster_role = aws.iam.Role(
            f"{name}-cluster-role",
            assume_role_policy=_assume_role_policy("eks.amazonaws.com"),
            tags=tags,
            opts=child,
        )
        cluster_policy = aws.iam.RolePolicyAttachment(
            f"{name}-cluster-policy",
            role=cluster_role.name,
            policy_arn=_MANAGED_POLICY + "AmazonEKSClusterPolicy",
            opts=child,
        )

        # The cluster role uses the key for envelope encryption; AmazonEKSClusterPolicy has no KMS
        # rights, so grant them on this key only.
        cluster_kms = aws.iam.RolePolicy(
            f"{name}-cluster-kms",
            role=cluster_role.id,
            policy=key.arn.apply(
                lambda arn: json.dumps(
                    {
                        "Version": "2012-10-17",
                        "Statement": [
                            {
                                "Effect": "Allow",
                                "Action": ["kms:Encrypt", "kms:Decrypt", "kms:ListGrants", "kms:DescribeKey"],
                                "Resource": arn,
                            }
                        ],
                    }
                )
            ),
            opts=child,
        )

        # ---------------------------------------------------------------- control plane
        cluster = aws.eks.Cluster(
            f"{name}-eks",
            name=cluster_name,
            version=args.kubernetes_version,
            role_arn=cluster_role.arn,
            vpc_config=aws.eks.ClusterVpcConfigArgs(
                subnet_ids=_subnets(args),
                endpoint_private_access=True,
                endpoint_public_access=args.endpoint_public_access,
                public_access_cidrs=list(args.public_access_cidrs) or None,
            ),
            encryption_config=aws.eks.ClusterEncryptionConfigArgs(
                provider=aws.eks.ClusterEncryptionConfigProviderArgs(key_arn=key.arn),
                resources=["secrets"],
            ),
            enabled_cluster_log_types=list(args.log_types),
            access_config=aws.eks.ClusterAccessConfigArgs(
                authentication_mode="API",
                # No implicit admin for whoever happens to create the cluster: the deploy role gets
                # it through an access entry below (an implicit entry for the same role would
                # make that one fail with ResourceInUseException).
                bootstrap_cluster_creator_admin_permissions=False,
            ),
            tags=tags,
            opts=pulumi.ResourceOptions(parent=self, depends_on=[log_group, cluster_policy, cluster_kms]),
        )
        issuer = cluster.identities.apply(lambda ids: ids[0].oidcs[0].issuer)  # type: ignore[index]
        oidc = aws.iam.OpenIdConnectProvider(
            f"{name}-oidc",
            url=issuer,
            client_id_lists=["sts.amazonaws.com"],
            tags=tags,
            opts=child,
        )

        # ---------------------------------------------------------------- nodes
        node_role = aws.iam.Role(
            f"{name}-node-role",
            assume_role_policy=_assume_role_policy("ec2.amazonaws.com"),
            tags=tags,
            opts=child,
        )
        node_policies = [
            aws.iam.RolePolicyAttachment(
                f"{name}-node-{suffix}",
                role=node_role.name,
                policy_arn=_MANAGED_POLICY + policy,
                opts=child,
            )
            for suffix, policy in (
                ("worker", "AmazonEKSWorkerNodePolicy"),
                ("cni", "AmazonEKS_CNI_Policy"),
                ("ecr", "AmazonEC2ContainerRegistryReadOnly"),
                ("ssm", "AmazonSSMManagedInstanceCore"),  # shell access through SSM, no SSH keys
            )
        ]
        after_nodes_role = pulumi.ResourceOptions(
            parent=self,
            depends_on=node_policies,
            # The autoscaler owns the desired size once the group exists.
            ignore_changes=["scalingConfig.desiredSize"],
        )

        system = args.system_pool
        system_group = aws.eks.NodeGroup(
            f"{name}-system",
            cluster_name=cluster.name,
            node_group_name=f"{cluster_name}-system",
            node_role_arn=node_role.arn,
            subnet_ids=_subnets(args),
            capacity_type="ON_DEMAND",
            ami_type=CPU_AMI_TYPE,
            instance_types=list(system.instance_types),
            disk_size=system.disk_size_gib,
            scaling_config=aws.eks.NodeGroupScalingConfigArgs(
                min_size=system.min_size,
                max_size=system.max_size,
                desired_size=system.desired_size if system.desired_size is not None else system.min_size,
            ),
            update_config=aws.eks.NodeGroupUpdateConfigArgs(max_unavailable=1),
            labels={POOL_LABEL: "system"},
            tags=tags,
            opts=after_nodes_role,
        )

        gpu_groups: list[aws.eks.NodeGroup] = []
        for pool, role in pool_roles(args):
            gpu_groups.append(
                self._gpu_node_group(
                    name,
                    args=args,
                    pool=pool,
                    role=role,
                    cluster=cluster,
                    node_role=node_role,
                    opts=after_nodes_role,
                )
            )

        # ---------------------------------------------------------------- access entries (API mode)
        access = self._access_entries(name, args=args, cluster=cluster, identity=identity)

        # ---------------------------------------------------------------- kubeconfig, provider
        self.kubeconfig = pulumi.Output.secret(
            pulumi.Output.all(cluster.name, cluster.endpoint, cluster.certificate_authority.data).apply(
                lambda v: kubeconfig_for(v[0], v[1], v[2], args.region)
            )
        )
        # The one provider a component builds: the cluster's own, handed to callers as an output.
        self.provider = k8s.Provider(
            f"{name}-k8s",
            kubeconfig=self.kubeconfig,
            opts=pulumi.ResourceOptions(parent=self, depends_on=[system_group]),
        )
        # Every Kubernetes object waits for the access entries: before them, nobody may talk to the API.
        on_cluster = pulumi.ResourceOptions(
            parent=self, provider=self.provider, depends_on=[system_group, *access]
        )

        # ---------------------------------------------------------------- NVIDIA device plugin
        plugin_values: dict[str, Any] = {
            # Our own label, set by the node group: no dependence on node-feature-discovery.
            "affinity": {
                "nodeAffinity": {
                    "requiredDuringSchedulingIgnoredDuringExecution": {
                        "nodeSelectorTerms": [
                            {"matchExpressions": [{"key": GPU_ARCH_LABEL, "operator": "Exists"}]}
                        ]
                    }
                }
            },
            "tolerations": [{"key": GPU_TAINT_KEY, "operator": "Exists", "effect": "NoSchedule"}],
            "priorityClassName": "system-node-critical",
            "gfd": {"enabled": False},
        }
        if args.time_slicing_replicas > 1:
            plugin_values["config"] = {
                "map": {"default": time_slicing_config(args.time_slicing_replicas)},
                "default": "default",
            }
        k8s.helm.v3.Release(
            f"{name}-nvidia-device-plugin",
            name="nvidia-device-plugin",
            chart="nvidia-device-plugin",
            version=args.device_plugin_chart_version,
            repository_opts=k8s.helm.v3.RepositoryOptsArgs(repo=DEVICE_PLUGIN_REPO),
            namespace="nvidia-device-plugin",
            create_namespace=True,
            values=plugin_values,
            opts=on_cluster,
        )

        # ---------------------------------------------------------------- cluster autoscaler (IRSA)
        autoscaler_role = aws.iam.Role(
            f"{name}-autoscaler-role",
            assume_role_policy=pulumi.Output.all(oidc.arn, issuer).apply(
                lambda v: irsa_trust_policy(v[0], v[1], AUTOSCALER_NAMESPACE, AUTOSCALER_SERVICE_ACCOUNT)
            ),
            tags=tags,
            opts=child,
        )
        autoscaler_role_policy = aws.iam.RolePolicy(
            f"{name}-autoscaler-policy",
            role=autoscaler_role.id,
            policy=json.dumps(autoscaler_policy(cluster_name)),
            opts=child,
        )
        k8s.helm.v3.Release(
            f"{name}-cluster-autoscaler",
            name="cluster-autoscaler",
            chart="cluster-autoscaler",
            version=args.autoscaler_chart_version,
            repository_opts=k8s.helm.v3.RepositoryOptsArgs(repo=AUTOSCALER_REPO),
            namespace=AUTOSCALER_NAMESPACE,
            values={
                "cloudProvider": "aws",
                "awsRegion": args.region,
                "autoDiscovery": {"clusterName": cluster_name},
                "image": {"tag": args.autoscaler_image_tag},
                "rbac": {
                    "serviceAccount": {
                        "create": True,
                        "name": AUTOSCALER_SERVICE_ACCOUNT,
                        "annotations": {"eks.amazonaws.com/role-arn": autoscaler_role.arn},
                    }
                },
                "extraArgs": {
                    "expander": "priority",
                    "balance-similar-node-groups": True,
                    "skip-nodes-with-system-pods": False,
                    "scale-down-unneeded-time": "10m",
                },
                # The chart renders this into the priority expander's ConfigMap. The keys are
                # ASG name regexes; EKS names a managed group's ASG eks-<nodegroup>-<uuid>.
                "expanderPriorities": expander_priorities(cluster_name, pool_roles(args)),
                "nodeSelector": {POOL_LABEL: "system"},
                "priorityClassName": "system-cluster-critical",
            },
            opts=pulumi.ResourceOptions(
                parent=self,
                provider=self.provider,
                depends_on=[system_group, *access, autoscaler_role_policy],
            ),
        )

        # ---------------------------------------------------------------- metrics-server (HPA CPU metric)
        k8s.helm.v3.Release(
            f"{name}-metrics-server",
            name="metrics-server",
            chart="metrics-server",
            version=args.metrics_server_chart_version,
            repository_opts=k8s.helm.v3.RepositoryOptsArgs(repo=METRICS_SERVER_REPO),
            namespace="kube-system",
            values={"nodeSelector": {POOL_LABEL: "system"}, "priorityClassName": "system-cluster-critical"},
            opts=on_cluster,
        )

        self.cluster_name = cluster.name
        self.oidc_provider_arn = oidc.arn
        self.gpu_node_group_names = pulumi.Output.all(*[g.node_group_name for g in gpu_groups])
        self.register_outputs(
            {
                "cluster_name": self.cluster_name,
                "kubeconfig": self.kubeconfig,
                "oidc_provider_arn": self.oidc_provider_arn,
                "gpu_node_group_names": self.gpu_node_group_names,
            }
        )

    def _access_entries(
        self,
        name: str,
        *,
        args: GpuClusterArgs,
        cluster: aws.eks.Cluster,
        identity: pulumi.Output[aws.GetCallerIdentityResult],
    ) -> list[aws.eks.AccessPolicyAssociation]:
        """An access entry and one cluster-scoped access policy for each CI and admin role.

        ``pulumi preview`` in a pull request reads every object (Helm keeps its release records
        in Secrets, hence AdminView, not View); ``pulumi up`` creates cluster-scoped objects
        through the charts (ClusterRoles, webhooks), hence ClusterAdmin.
        """
        grants = [
            ("deploy", args.deploy_role_name, DEPLOY_ACCESS_POLICY),
            ("preview", args.preview_role_name, PREVIEW_ACCESS_POLICY),
            *[("admin", role, DEPLOY_ACCESS_POLICY) for role in args.admin_role_names],
        ]
        associations = []
        for kind, role, policy in grants:
            suffix = kind if kind != "admin" else f"admin-{role}"
            principal = _role_arn_output(identity, role)
            entry = aws.eks.AccessEntry(
                f"{name}-access-{suffix}",
                cluster_name=cluster.name,
                principal_arn=principal,
                type="STANDARD",
                tags=tags_with(args.tags, {ACCESS_TAG: kind}),
                opts=pulumi.ResourceOptions(parent=self),
            )
            associations.append(
                aws.eks.AccessPolicyAssociation(
                    f"{name}-access-{suffix}-policy",
                    cluster_name=cluster.name,
                    principal_arn=entry.principal_arn,
                    policy_arn=ACCESS_POLICY_ARN + policy,
                    access_scope=aws.eks.AccessPolicyAssociationAccessScopeArgs(type="cluster"),
                    opts=pulumi.ResourceOptions(parent=self),
                )
            )
        return associations

    def _gpu_node_group(
        self,
        name: str,
        *,
        args: GpuClusterArgs,
        pool: NodePool,
        role: str,
        cluster: aws.eks.Cluster,
        node_role: aws.iam.Role,
        opts: pulumi.ResourceOptions,
    ) -> aws.eks.NodeGroup:
        """One GPU managed node group and the autoscaler's scale-from-zero hints on its ASG."""
        facts = gpu_facts(pool)
        capacity = capacity_type(role)
        labels = {
            ACCELERATOR_LABEL: accelerator([GPU_INSTANCE_TYPES[t] for t in pool.instance_types]),
            GPU_ARCH_LABEL: facts.gpu_arch,
            CAPACITY_LABEL: "spot" if role == "spot" else "on-demand",
            POOL_LABEL: pool.name,
            "nvidia.com/gpu.present": "true",
        }
        group = aws.eks.NodeGroup(
            f"{name}-gpu-{role}-{pool.name}",
            cluster_name=cluster.name,
            node_group_name=node_group_name(args.cluster_name, role, pool),
            node_role_arn=node_role.arn,
            subnet_ids=_subnets(args),
            capacity_type=capacity,
            ami_type=GPU_AMI_TYPE,
            instance_types=list(pool.instance_types),
            disk_size=pool.disk_size_gib,
            scaling_config=aws.eks.NodeGroupScalingConfigArgs(
                min_size=pool.min_size,
                max_size=pool.max_size,
                desired_size=pool.desired_size if pool.desired_size is not None else pool.min_size,
            ),
            update_config=aws.eks.NodeGroupUpdateConfigArgs(max_unavailable_percentage=33),
            node_repair_config=aws.eks.NodeGroupNodeRepairConfigArgs(enabled=True),
            labels=labels,
            taints=[aws.eks.NodeGroupTaintArgs(key=GPU_TAINT_KEY, value="present", effect="NO_SCHEDULE")],
            tags=tags_with(args.tags, {"dualdeploy:pool-role": role}),
            opts=opts,
        )
        # Tags on a managed node group do not reach its Auto Scaling group, and the autoscaler
        # reads scale-from-zero hints from the ASG. eks:DescribeNodegroup covers labels and
        # taints on recent autoscalers; the tags cover older ones and the GPU count (which,
        # under time-slicing, is GPUs x replicas).
        asg_name = group.resources.apply(lambda r: r[0].autoscaling_groups[0].name)  # type: ignore[index]
        hints = {
            **{f"label-{k.split('/')[-1]}": (f"{_TEMPLATE}/label/{k}", v) for k, v in labels.items()},
            "label-eks-capacity": (f"{_TEMPLATE}/label/eks.amazonaws.com/capacityType", capacity),
            "taint-gpu": (f"{_TEMPLATE}/taint/{GPU_TAINT_KEY}", "present:NoSchedule"),
            "resources-gpu": (
                f"{_TEMPLATE}/resources/nvidia.com/gpu",
                str(facts.gpus * args.time_slicing_replicas),
            ),
        }
        for suffix, (tag_key, tag_value) in hints.items():
            aws.autoscaling.Tag(
                f"{name}-gpu-{role}-{pool.name}-ca-{suffix}",
                autoscaling_group_name=asg_name,
                tag=aws.autoscaling.TagTagArgs(key=tag_key, value=tag_value, propagate_at_launch=False),
                opts=pulumi.ResourceOptions(parent=self),
            )
        return group


def _role_arn_output(identity: pulumi.Output[aws.GetCallerIdentityResult], role: str) -> pulumi.Output[str]:
    return pulumi.Output.all(identity.arn, identity.account_id).apply(lambda v: role_arn(v[0], v[1], role))


def role_arn(caller_arn: str, account: str, role: str) -> str:
    """The ARN of role ``role`` in the caller's account and partition (access entries need the role's
    ARN, not the assumed-role session's)."""
    return f"arn:{partition_of(caller_arn)}:iam::{account}:role/{role}"


def tags_with(tags: Mapping[str, str], extra: Mapping[str, str]) -> dict[str, str]:
    """The common tags plus resource-specific ones."""
    return {**tags, **extra}


def expander_priorities(cluster_name: str, pools: Sequence[tuple[NodePool, str]]) -> dict[str, list[str]]:
    """Priority expander tiers: Spot GPU groups, smallest node size first, all above the fallback.

    The autoscaler picks the highest tier that can fit the pending pods (at random within a tier);
    a larger Spot size is reached when the smaller ones cannot grow (no Spot capacity, or at their
    max), and the on-demand fallback only when no Spot group can. Each regex names one group's
    ASG, ``eks-<node group>-<uuid>``, so pool ``ada`` does not also match ``ada-2x``.
    """
    spot = [p for p, role in pools if role == "spot"]
    sizes = sorted({gpu_facts(p).node_size for p in spot}, reverse=True)
    tiers: dict[str, list[str]] = {}
    for pool in spot:
        priority = SPOT_PRIORITY + sizes.index(gpu_facts(pool).node_size)
        tiers.setdefault(str(priority), []).append(_asg_pattern(node_group_name(cluster_name, "spot", pool)))
    fallback = [
        _asg_pattern(node_group_name(cluster_name, "fallback", p)) for p, role in pools if role != "spot"
    ]
    if fallback:
        tiers[str(FALLBACK_PRIORITY)] = fallback
    tiers[str(OTHER_PRIORITY)] = [".*"]
    return tiers


def _asg_pattern(group: str) -> str:
    """The regex of a managed node group's ASG name: ``eks-<group>-`` then the UUID's hex start."""
    # Node group names are [a-z0-9-] (checked by the config), nothing a regex would read specially.
    return f"^eks-{group}-[0-9a-f]{{8}}"
