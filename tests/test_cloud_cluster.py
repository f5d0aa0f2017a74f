"""GpuCluster and Network as components, in this process, under ``pulumi.runtime.set_mocks``.

The whole-program tests (test_cloud_stacks.py) check the graph each stack produces; these
check the components' own contract: their outputs, and the ValueError each bad Args gets
before any resource is registered.
"""

from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Awaitable, Iterator
from typing import Any

import pulumi
import pulumi_kubernetes as k8s
import pytest
from cloud_harness import caller_identity, mock_outputs

from components.aws.gpu_cluster import (
    ACCELERATOR_LABEL,
    AUTOSCALER_RELEASES,
    SUPPORTED_KUBERNETES_VERSIONS,
    GpuCluster,
    GpuClusterArgs,
    NodePool,
    expander_priorities,
    kubeconfig_for,
)
from components.aws.network import Network, NetworkArgs, subnet_cidrs

REGION = "eu-west-1"


def _wait() -> None:
    """Let the mock monitor receive every pending registration (the ASG tags wait on the node groups)."""
    from pulumi.runtime.stack import wait_for_rpcs
    from pulumi.runtime.sync_await import _sync_await

    _sync_await(wait_for_rpcs())


# How Pulumi marks a secret value on the wire (pulumi.runtime.rpc: _special_sig_key / _special_secret_sig).
SECRET_SIG = "4dabf18193072939515e22adb298388d"
SECRET_SIG_VALUE = "1b47061264138c4ac30d75fd1eb44270"


class ComponentMocks(pulumi.runtime.Mocks):
    """Per-type realistic outputs (shared with the program harness), and a log of registrations."""

    def __init__(self) -> None:
        self.registered: list[tuple[str, str]] = []
        self.inputs: dict[tuple[str, str], dict[str, Any]] = {}

    def new_resource(self, args: pulumi.runtime.MockResourceArgs) -> tuple[str, dict[str, Any]]:
        self.registered.append((args.typ, args.name))
        self.inputs[(args.typ, args.name)] = dict(args.inputs)
        return mock_outputs(args.typ, args.name, dict(args.inputs), REGION)

    def call(self, args: pulumi.runtime.MockCallArgs) -> tuple[dict[str, Any], list[tuple[str, str]]]:
        if args.token == "aws:index/getCallerIdentity:getCallerIdentity":
            return caller_identity(), []
        raise AssertionError(f"unexpected provider call {args.token}")


@pytest.fixture(autouse=True)
def mocks() -> Iterator[ComponentMocks]:
    """Fresh mocks for each test, installed when the test starts (not at import, so test
    modules of other components cannot overwrite them during collection)."""
    instance = ComponentMocks()
    pulumi.runtime.set_mocks(instance, project="dualdeploy", stack="unit", preview=False)
    yield instance


def pools() -> dict[str, Any]:
    return {
        "system_pool": NodePool("system", ["m6i.large", "m6a.large", "m5.large"], 1, 3),
        # One size per pool; three instance types across the Spot pools.
        "gpu_pools": [
            NodePool("ampere", ["g5.xlarge"], 0, 4),
            NodePool("ada", ["g6.xlarge"], 0, 4),
            NodePool("ada-l40s", ["g6e.xlarge"], 0, 2),
        ],
    }


def network_args(**overrides: Any) -> NetworkArgs:
    fields: dict[str, Any] = {
        "cidr": "10.0.0.0/16",
        "availability_zones": ["eu-west-1a", "eu-west-1b"],
        "cluster_name": "u",
        "region": REGION,
    }
    return NetworkArgs(**{**fields, **overrides})


def make_args(**overrides: Any) -> GpuClusterArgs:
    fields: dict[str, Any] = {
        "cluster_name": "unit",
        "kubernetes_version": "1.33",
        "region": REGION,
        "subnet_ids": ["subnet-a", "subnet-b"],
        "time_slicing_replicas": 5,
        "tags": {"owner": "test"},
        **pools(),
    }
    fields.update(overrides)
    return GpuClusterArgs(**fields)


# --------------------------------------------------------------------------- outputs


@pulumi.runtime.test
def test_kubeconfig_output_is_a_secret() -> Awaitable[None]:
    cluster = GpuCluster("unit", make_args())

    async def check() -> None:
        assert await cluster.kubeconfig.is_secret(), "the kubeconfig must be a secret output"

    return check()


@pulumi.runtime.test
def test_kubeconfig_points_at_the_cluster_and_uses_aws_get_token() -> pulumi.Output[Any]:
    cluster = GpuCluster("unit", make_args())

    def check(text: str) -> None:
        config = json.loads(text)
        server = config["clusters"][0]["cluster"]["server"]
        assert re.fullmatch(rf"https://[0-9A-F]+\.gr7\.{REGION}\.eks\.amazonaws\.com", server)
        assert config["clusters"][0]["cluster"]["certificate-authority-data"]
        assert config["users"][0]["user"]["exec"]["args"][:4] == [
            "eks",
            "get-token",
            "--cluster-name",
            "unit",
        ]

    return cluster.kubeconfig.apply(check)


@pulumi.runtime.test
def test_provider_output_is_a_kubernetes_provider_on_the_clusters_kubeconfig(
    mocks: ComponentMocks,
) -> pulumi.Output[Any]:
    cluster = GpuCluster("unit", make_args())
    assert isinstance(cluster.provider, k8s.Provider)

    def check(values: list[Any]) -> None:
        kubeconfig, _urn = values
        providers = [key for key in mocks.inputs if key[0] == "pulumi:providers:kubernetes"]
        assert len(providers) == 1, providers
        given = mocks.inputs[providers[0]]["kubeconfig"]
        # The provider gets the kubeconfig the component exports, still a secret (Pulumi's secret sig).
        assert given.get(SECRET_SIG) == SECRET_SIG_VALUE, "the provider's kubeconfig must stay a secret"
        assert json.loads(given["value"]) == json.loads(kubeconfig)

    return pulumi.Output.all(cluster.kubeconfig, cluster.provider.urn).apply(check)


@pulumi.runtime.test
def test_gpu_node_group_names_follow_the_pools() -> pulumi.Output[Any]:
    args = make_args(fallback_pool=NodePool("ondemand", ["g5.xlarge"], 0, 2))
    cluster = GpuCluster("unit", args)

    def check(names: list[str]) -> None:
        assert names == [
            "unit-gpu-spot-ampere",
            "unit-gpu-spot-ada",
            "unit-gpu-spot-ada-l40s",
            "unit-gpu-fallback-ondemand",
        ]

    return cluster.gpu_node_group_names.apply(check)


# --------------------------------------------------------------------------- Args validation


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"kubernetes_version": "1.25"}, "kubernetes_version: '1.25' is not one of 1.31"),
        (
            {"gpu_pools": [NodePool("a", ["g5.xlarge"], 0, 2), NodePool("b", ["g6.xlarge"], 0, 2)]},
            r"gpu_pools: the Spot pools together need ≥ 3 instance types .*\['g5.xlarge', 'g6.xlarge'\]",
        ),
        (
            {"gpu_pools": [NodePool("a", ["g5.xlarge", "g6.xlarge"], 0, 2)]},
            r"one GPU architecture and GPU count per pool, got arches \['sm_86', 'sm_89'\]",
        ),
        (
            {"gpu_pools": [NodePool("a", ["g5.xlarge", "m5.large"], 0, 2)]},
            r"\['m5.large'\] not in components/aws/gpu_instances.py",
        ),
        (
            {"gpu_pools": [NodePool("a", ["g5.xlarge"], 3, 2)]},
            "min_size ≤ max_size",
        ),
        (
            {"gpu_pools": [NodePool("a", ["g5.xlarge", "g5.2xlarge", "g5.4xlarge"], 0, 2)]},
            r"gpu_pools\[a\].instance_types: one size per pool .* g5.2xlarge \(8 vCPU, 32 GiB, 1 GPU\)",
        ),
        (
            {"gpu_pools": [NodePool("a", ["g6.xlarge", "g6e.xlarge"], 0, 2), *pools()["gpu_pools"]]},
            r"gpu_pools\[a\].instance_types: one size per pool .* g6e.xlarge \(4 vCPU, 32 GiB",
        ),
        (
            {"autoscaler_chart_version": "9.46.6"},
            r"autoscaler_chart_version: '9.46.6' does not ship .* use 9.50.1",
        ),
        (
            {"preview_role_name": "arn:aws:iam::1:role/x"},
            r"access: 'arn:aws:iam::1:role/x' is not an IAM role name",
        ),
        ({"admin_role_names": ["dualdeploy-github-deploy"]}, "access: each role gets one access entry"),
        ({"fallback_pool": NodePool("od", ["g5.xlarge"], 1, 2)}, "fallback_pool.min_size: must be 0"),
        ({"endpoint_public_access": True}, "public_access_cidrs: a public endpoint without an allow-list"),
        ({"log_types": ["api"]}, "log_types: must include api, audit, authenticator"),
        ({"gpu_pools": []}, "gpu_pools: at least one Spot GPU pool"),
        ({"time_slicing_replicas": 0}, "time_slicing_replicas: must be ≥ 1"),
        ({"subnet_ids": None}, "subnet_ids: required; pass the Network's private_subnet_ids"),
    ],
)
def test_bad_args_raise_before_any_resource(
    overrides: dict[str, Any], message: str, mocks: ComponentMocks
) -> None:
    with pytest.raises(ValueError, match=message):
        GpuCluster("bad", make_args(**overrides))
    assert mocks.registered == []


def test_network_rejects_a_single_zone(mocks: ComponentMocks) -> None:
    with pytest.raises(ValueError, match="availability_zones: EKS needs at least 2 distinct zones"):
        Network(
            "net",
            NetworkArgs(
                cidr="10.0.0.0/16", availability_zones=["eu-west-1a"], cluster_name="unit", region=REGION
            ),
        )
    assert mocks.registered == []


def test_network_rejects_an_unknown_nat_mode() -> None:
    with pytest.raises(ValueError, match="nat_gateways: 'two' is not one of single, per-az"):
        Network(
            "net",
            network_args(nat_gateways="two"),
        )


# --------------------------------------------------------------------------- pure helpers


def test_subnets_do_not_overlap_and_stay_inside_the_vpc() -> None:
    private, public = subnet_cidrs("10.40.0.0/16", 6)
    blocks = [ipaddress.ip_network(c) for c in private + public]
    vpc = ipaddress.ip_network("10.40.0.0/16")
    assert all(b.subnet_of(vpc) for b in blocks)  # type: ignore[arg-type]
    assert not any(a.overlaps(b) for i, a in enumerate(blocks) for b in blocks[i + 1 :])
    assert ipaddress.ip_network(private[0]).num_addresses == 8192  # room for pod IPs with the AWS CNI


def test_expander_ranks_spot_smallest_first_above_fallback_above_the_rest() -> None:
    fallback = NodePool("ondemand", ["g5.xlarge"], 0, 2)
    tiers = expander_priorities(
        "prod", [(p, "spot") for p in make_args().gpu_pools] + [(fallback, "fallback")]
    )
    uuid = "2ac4f1e0-5b9e-0c1a-77aa-0c1d2ac4f1e0"  # EKS: eks-<node group>-<uuid>

    def tier(group: str) -> int:
        asg = f"eks-{group}-{uuid}"
        return max(int(p) for p, patterns in tiers.items() if any(re.match(x, asg) for x in patterns))

    system = tier("prod-system")
    # 4 vCPU/16 GiB (g5.xlarge, g6.xlarge) before 4 vCPU/32 GiB (g6e.xlarge), all before on-demand.
    assert tier("prod-gpu-spot-ampere") == tier("prod-gpu-spot-ada") > tier("prod-gpu-spot-ada-l40s")
    assert tier("prod-gpu-spot-ada-l40s") > tier("prod-gpu-fallback-ondemand") > system
    # Another cluster's Spot groups in the same account do not match this cluster's tiers.
    assert tier("other-gpu-spot-ampere") == system


def test_autoscaler_releases_pair_each_minor_with_its_own_chart() -> None:
    assert set(AUTOSCALER_RELEASES) == set(SUPPORTED_KUBERNETES_VERSIONS)
    for minor, (chart, tag) in AUTOSCALER_RELEASES.items():
        assert tag.startswith(f"v{minor}.") and re.fullmatch(r"9\.\d+\.\d+", chart)
    charts = [AUTOSCALER_RELEASES[m][0] for m in SUPPORTED_KUBERNETES_VERSIONS]
    assert charts == sorted(charts, key=lambda v: tuple(map(int, v.split(".")))), "newer minor, newer chart"


def test_every_gpu_node_carries_the_accelerator_label_and_its_asg_tag(
    mocks: ComponentMocks,
) -> None:
    GpuCluster("unit", make_args(fallback_pool=NodePool("ondemand", ["g5.xlarge"], 0, 2)))
    template = "k8s.io/cluster-autoscaler/node-template/label/"

    _wait()
    groups = {n: i for (t, n), i in mocks.inputs.items() if t == "aws:eks/nodeGroup:NodeGroup"}
    tags = {n: i["tag"] for (t, n), i in mocks.inputs.items() if t == "aws:autoscaling/tag:Tag"}
    wanted = {
        "ampere": "nvidia-a10g",
        "ada": "nvidia-l4",
        "ada-l40s": "nvidia-l40s",
        "ondemand": "nvidia-a10g",
    }
    for pool, value in wanted.items():
        role = "fallback" if pool == "ondemand" else "spot"
        assert groups[f"unit-gpu-{role}-{pool}"]["labels"][ACCELERATOR_LABEL] == value
        tag = tags[f"unit-gpu-{role}-{pool}-ca-label-accelerator"]
        assert tag == {"key": template + ACCELERATOR_LABEL, "value": value, "propagateAtLaunch": False}
    assert ACCELERATOR_LABEL not in groups["unit-system"]["labels"]


def test_ci_roles_get_least_privilege_access_entries_before_any_kubernetes_object(
    mocks: ComponentMocks,
) -> None:
    GpuCluster("unit", make_args(admin_role_names=["oncall"]))

    _wait()
    entries = {n: i for (t, n), i in mocks.inputs.items() if t == "aws:eks/accessEntry:AccessEntry"}
    policies = {
        i["principalArn"].rsplit("/", 1)[1]: (i["policyArn"].rsplit("/", 1)[1], i["accessScope"])
        for (t, _n), i in mocks.inputs.items()
        if t == "aws:eks/accessPolicyAssociation:AccessPolicyAssociation"
    }
    assert {i["principalArn"] for i in entries.values()} == {
        f"arn:aws:iam::123456789012:role/{r}"
        for r in ("dualdeploy-github-deploy", "dualdeploy-github-preview", "oncall")
    }
    assert {i["tags"]["dualdeploy:access"] for i in entries.values()} == {"deploy", "preview", "admin"}
    assert policies == {
        "dualdeploy-github-deploy": ("AmazonEKSClusterAdminPolicy", {"type": "cluster"}),
        "dualdeploy-github-preview": ("AmazonEKSAdminViewPolicy", {"type": "cluster"}),
        "oncall": ("AmazonEKSClusterAdminPolicy", {"type": "cluster"}),
    }
    (eks,) = [i for (t, _n), i in mocks.inputs.items() if t == "aws:eks/cluster:Cluster"]
    assert eks["accessConfig"] == {
        "authenticationMode": "API",
        "bootstrapClusterCreatorAdminPermissions": False,
    }


def test_control_plane_logs_are_encrypted_with_a_key_cloudwatch_may_use_for_that_group_only(
    mocks: ComponentMocks,
) -> None:
    GpuCluster("unit", make_args())

    _wait()
    logs = mocks.inputs[("aws:cloudwatch/logGroup:LogGroup", "unit-control-plane-logs")]
    key = mocks.inputs[("aws:kms/key:Key", "unit-secrets-key")]
    assert logs["kmsKeyId"].startswith("arn:aws:kms:")
    service = json.loads(key["policy"])["Statement"][1]
    assert service["Principal"] == {"Service": f"logs.{REGION}.amazonaws.com"}
    assert service["Condition"]["ArnLike"]["kms:EncryptionContext:aws:logs:arn"] == [
        f"arn:aws:logs:{REGION}:123456789012:log-group:/aws/eks/unit/cluster"
    ]


def test_vpc_flow_logs_go_to_an_encrypted_group_through_a_role_only_flow_logs_may_assume(
    mocks: ComponentMocks,
) -> None:
    Network("net", network_args())

    _wait()
    (flow,) = [i for (t, _n), i in mocks.inputs.items() if t == "aws:ec2/flowLog:FlowLog"]
    group = mocks.inputs[("aws:cloudwatch/logGroup:LogGroup", "net-flow-logs")]
    assert flow["trafficType"] == "ALL" and flow["logDestinationType"] == "cloud-watch-logs"
    assert flow["logDestination"].endswith(f":log-group:{group['name']}")
    assert group["kmsKeyId"].startswith("arn:aws:kms:") and group["retentionInDays"] == 90
    trust = json.loads(mocks.inputs[("aws:iam/role:Role", "net-flow-logs-role")]["assumeRolePolicy"])
    assert trust["Statement"][0]["Principal"] == {"Service": "vpc-flow-logs.amazonaws.com"}
    write = json.loads(mocks.inputs[("aws:iam/rolePolicy:RolePolicy", "net-flow-logs-write")]["policy"])
    assert write["Statement"][0]["Resource"] == [flow["logDestination"], flow["logDestination"] + ":*"]


def test_kubeconfig_carries_no_credentials() -> None:
    config = json.loads(kubeconfig_for("c", "https://example", "Q0E=", "eu-west-1"))
    user = config["users"][0]["user"]
    assert set(user) == {"exec"}
