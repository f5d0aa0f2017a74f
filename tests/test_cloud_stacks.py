"""The Pulumi program for each stack, run under mocks: its graph snapshot, and one policy a test.

Each stack runs in its own interpreter through ``tests/cloud_harness.py`` (see its docstring
for why), from a project folder in ``tmp_path`` that holds fixture bundles. ``cloud-prod``
requires TensorRT engines, so its fixture bundle declares sm_86 and sm_89 engines;
``cloud-dev`` gets a bundle without engines and must warn instead.

Snapshots live in ``tests/snapshots/<stack>.json``. After an intended change to the graph::

    make snapshots        # = UPDATE_SNAPSHOTS=1 pytest tests/test_cloud_stacks.py -k snapshot

and review the diff like code.
"""

from __future__ import annotations

import inspect
import json
import os
import re
import subprocess
import sys
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml
from cloud_harness import (
    REPO_ROOT,
    is_secret,
    make_project,
    mask_secrets,
    mock_outputs,
    secret_values,
    snapshot,
    write_fixture_bundle,
)

from components import k8s_specs
from components.aws.gpu_instances import GPU_INSTANCE_TYPES
from components.edge_fleet import escalation_extravars
from deploy.render import render

CLOUD_STACKS = ("cloud-dev", "cloud-prod")
EDGE_STACKS = ("local", "edge-site", "hybrid")
SNAPSHOTS = Path(__file__).parent / "snapshots"
# Engines the fixture bundle declares, per stack: prod requires them, dev and the rest do not.
ENGINES = {"cloud-prod": ("sm_86", "sm_89")}
TEST_VAULT_PASSWORD = "fixture-vault-password-not-real"


def run_stack(stack: str, project: Path, out: Path, *config: str) -> subprocess.CompletedProcess[str]:
    """Run the program for ``stack`` in a fresh interpreter; the graph lands in ``out``.

    ``config`` items (``KEY=VALUE``) add or replace stack config keys, as ``pulumi config set``.
    """
    command = [
        sys.executable, str(REPO_ROOT / "tests" / "cloud_harness.py"), stack,
        "--project-dir", str(project), "--out", str(out),
        "--secret", f"dualdeploy:edgeVaultPassword={TEST_VAULT_PASSWORD}",
        *[arg for item in config for arg in ("--config", item)],
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    return subprocess.run(
        command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120, check=False
    )


class StackRun:
    """One program run: its graph and its stderr (where Pulumi's warnings go under mocks)."""

    def __init__(self, stack: str, graph: dict[str, Any], stderr: str) -> None:
        self.stack = stack
        self.graph = graph
        self.stderr = stderr
        self.resources: list[dict[str, Any]] = graph["resources"]

    def of_type(self, typ: str) -> list[dict[str, Any]]:
        return [r for r in self.resources if r["type"] == typ]

    def one(self, typ: str, name: str) -> dict[str, Any]:
        matches = [r for r in self.of_type(typ) if r["name"] == name]
        assert len(matches) == 1, f"expected one {typ} named {name}, got {len(matches)}"
        return matches[0]

    def node_groups(self) -> list[dict[str, Any]]:
        return self.of_type("aws:eks/nodeGroup:NodeGroup")

    def gpu_groups(self) -> list[dict[str, Any]]:
        return [g for g in self.node_groups() if "dualdeploy.io/gpu-arch" in g["inputs"].get("labels", {})]

    def release(self, chart: str) -> dict[str, Any]:
        matches = [r for r in self.of_type("kubernetes:helm.sh/v3:Release") if r["inputs"]["chart"] == chart]
        assert len(matches) == 1, f"expected one {chart} release"
        return matches[0]


@pytest.fixture(scope="session")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, StackRun]:
    """Run every stack once per test session (one fresh interpreter each)."""
    stacks = CLOUD_STACKS + EDGE_STACKS
    results: dict[str, StackRun] = {}
    for stack in stacks:
        project = make_project(tmp_path_factory.mktemp(f"project-{stack}"), ENGINES.get(stack, ()))
        out = project / "graph.json"
        done = run_stack(stack, project, out)
        assert done.returncode == 0, f"{stack} program failed:\n{done.stderr[-4000:]}"
        results[stack] = StackRun(stack, json.loads(out.read_text()), done.stderr)
    return results


@pytest.fixture(params=CLOUD_STACKS)
def cloud(request: pytest.FixtureRequest, runs: dict[str, StackRun]) -> StackRun:
    return runs[request.param]


def stack_file(stack: str) -> dict[str, Any]:
    data = yaml.safe_load((REPO_ROOT / "stacks" / f"Pulumi.{stack}.yaml").read_text())
    return data["config"]


# --------------------------------------------------------------------------- snapshots


@pytest.mark.parametrize("stack", CLOUD_STACKS + EDGE_STACKS)
def test_graph_matches_snapshot(stack: str, runs: dict[str, StackRun]) -> None:
    current = snapshot(runs[stack].graph)
    path = SNAPSHOTS / f"{stack}.json"
    text = json.dumps(current, indent=1, sort_keys=True) + "\n"
    if os.environ.get("UPDATE_SNAPSHOTS") == "1":
        path.write_text(text)
    assert path.is_file(), f"no snapshot for {stack}: run `make snapshots`"
    expected = json.loads(path.read_text())
    assert current == expected, (
        f"the {stack} resource graph changed; if intended, run `make snapshots` and review the diff"
    )


# --------------------------------------------------------------------------- policies


def test_every_gpu_pool_is_spot_except_the_fallback(cloud: StackRun) -> None:
    groups = cloud.gpu_groups()
    assert groups
    for group in groups:
        inputs = group["inputs"]
        fallback = inputs["nodeGroupName"].split("-gpu-")[1].startswith("fallback-")
        assert inputs["capacityType"] == ("ON_DEMAND" if fallback else "SPOT"), group["name"]
        assert inputs["labels"]["dualdeploy.io/capacity-type"] == ("on-demand" if fallback else "spot")
    assert sum(g["inputs"]["capacityType"] == "SPOT" for g in groups) >= 1


def test_each_pool_has_one_size_and_architecture_and_the_spot_pools_three_types(cloud: StackRun) -> None:
    spot_types: set[str] = set()
    for group in cloud.gpu_groups():
        types = group["inputs"]["instanceTypes"]
        arches = {GPU_INSTANCE_TYPES[t].gpu_arch for t in types}
        sizes = {GPU_INSTANCE_TYPES[t].node_size for t in types}
        assert len(arches) == 1, f"{group['name']} mixes {arches}"
        assert len(sizes) == 1, f"{group['name']} mixes node sizes {sizes}"  # the autoscaler plans with one
        assert group["inputs"]["labels"]["dualdeploy.io/gpu-arch"] == arches.pop()
        assert group["inputs"]["labels"]["k8s.amazonaws.com/accelerator"].startswith("nvidia-")
        if group["inputs"]["capacityType"] == "SPOT":
            spot_types |= set(types)
    assert len(spot_types) >= 3, f"the Spot pools list only {sorted(spot_types)}"


def test_gpu_pools_have_the_gpu_taint_labels_and_accelerated_ami(cloud: StackRun) -> None:
    for group in cloud.gpu_groups():
        inputs = group["inputs"]
        assert inputs["taints"] == [{"key": "nvidia.com/gpu", "value": "present", "effect": "NO_SCHEDULE"}]
        assert {"dualdeploy.io/gpu-arch", "dualdeploy.io/capacity-type", "dualdeploy.io/pool"} <= set(
            inputs["labels"]
        )
        assert inputs["amiType"] == "AL2023_x86_64_NVIDIA"
    system = [g for g in cloud.node_groups() if g not in cloud.gpu_groups()]
    assert len(system) == 1
    assert system[0]["inputs"]["capacityType"] == "ON_DEMAND" and "taints" not in system[0]["inputs"]


def test_pool_sizes_follow_the_stack(cloud: StackRun) -> None:
    cluster = json.loads(json.dumps(stack_file(cloud.stack)["dualdeploy:cluster"]))
    wanted = {f"spot-{p['name']}": p for p in cluster["gpuPools"]}
    if "fallbackPool" in cluster:
        wanted[f"fallback-{cluster['fallbackPool']['name']}"] = cluster["fallbackPool"]
    got = {
        g["inputs"]["nodeGroupName"].split("-gpu-")[1]: g["inputs"]["scalingConfig"]
        for g in cloud.gpu_groups()
    }
    assert set(got) == set(wanted)
    for key, pool in wanted.items():
        assert got[key]["minSize"] == pool.get("minSize", 0)
        assert got[key]["maxSize"] == pool["maxSize"]


def test_secrets_are_encrypted_with_kms_and_control_plane_logging_is_on(cloud: StackRun) -> None:
    (cluster,) = cloud.of_type("aws:eks/cluster:Cluster")
    inputs = cluster["inputs"]
    assert inputs["encryptionConfig"]["resources"] == ["secrets"]
    key = cloud.one("aws:kms/key:Key", "cluster-secrets-key")
    assert key["inputs"]["enableKeyRotation"] is True
    assert inputs["encryptionConfig"]["provider"]["keyArn"].startswith("arn:aws:kms:")
    assert {"api", "audit", "authenticator"} <= set(inputs["enabledClusterLogTypes"])
    grant = json.loads(cloud.one("aws:iam/rolePolicy:RolePolicy", "cluster-cluster-kms")["inputs"]["policy"])
    assert grant["Statement"][0]["Resource"] == inputs["encryptionConfig"]["provider"]["keyArn"]
    assert {"kms:Encrypt", "kms:Decrypt", "kms:DescribeKey"} <= set(grant["Statement"][0]["Action"])
    logs = cloud.one("aws:cloudwatch/logGroup:LogGroup", "cluster-control-plane-logs")
    assert logs["inputs"]["name"] == f"/aws/eks/{inputs['name']}/cluster"
    assert logs["inputs"]["retentionInDays"] > 0
    assert logs["inputs"]["kmsKeyId"] == inputs["encryptionConfig"]["provider"]["keyArn"]


def test_vpc_flow_logs_are_on_into_an_encrypted_group(cloud: StackRun) -> None:
    (flow,) = cloud.of_type("aws:ec2/flowLog:FlowLog")
    (vpc,) = cloud.of_type("aws:ec2/vpc:Vpc")
    group = cloud.one("aws:cloudwatch/logGroup:LogGroup", "net-flow-logs")
    assert flow["inputs"]["trafficType"] == "ALL"
    assert flow["inputs"]["logDestination"].endswith(f":log-group:{group['inputs']['name']}")
    assert flow["inputs"]["vpcId"].startswith("vpc-") and vpc["name"] == "net-vpc"
    assert group["inputs"]["kmsKeyId"].startswith("arn:aws:kms:")


def test_kubernetes_version_is_pinned_from_the_stack(cloud: StackRun) -> None:
    (cluster,) = cloud.of_type("aws:eks/cluster:Cluster")
    assert cluster["inputs"]["version"] == stack_file(cloud.stack)["dualdeploy:cluster"]["kubernetesVersion"]


def test_endpoint_is_private_unless_the_stack_opens_it_with_an_allow_list(cloud: StackRun) -> None:
    (cluster,) = cloud.of_type("aws:eks/cluster:Cluster")
    vpc = cluster["inputs"]["vpcConfig"]
    assert vpc["endpointPrivateAccess"] is True
    if vpc["endpointPublicAccess"]:
        assert vpc["publicAccessCidrs"] and "0.0.0.0/0" not in vpc["publicAccessCidrs"]


def test_irsa_oidc_provider_trusts_the_cluster_issuer(cloud: StackRun) -> None:
    (cluster,) = cloud.of_type("aws:eks/cluster:Cluster")
    (oidc,) = cloud.of_type("aws:iam/openIdConnectProvider:OpenIdConnectProvider")
    assert oidc["inputs"]["clientIdLists"] == ["sts.amazonaws.com"]
    role = cloud.one("aws:iam/role:Role", "cluster-autoscaler-role")
    trust = json.loads(role["inputs"]["assumeRolePolicy"])
    statement = trust["Statement"][0]
    assert statement["Action"] == "sts:AssumeRoleWithWebIdentity"
    issuer = oidc["inputs"]["url"].removeprefix("https://")
    assert statement["Condition"]["StringEquals"][f"{issuer}:sub"] == (
        "system:serviceaccount:kube-system:cluster-autoscaler"
    )
    assert cluster["name"] == "cluster-eks"


def test_autoscaler_prefers_spot_pools_to_the_fallback(cloud: StackRun) -> None:
    values = cloud.release("cluster-autoscaler")["inputs"]["values"]
    assert values["extraArgs"]["expander"] == "priority"
    tiers = {int(k): v for k, v in values["expanderPriorities"].items()}
    # Match the tiers against the ASG names the (mocked) node groups report, as the autoscaler does.
    asg_names = {
        g["inputs"]["nodeGroupName"]: f"eks-{g['inputs']['nodeGroupName']}-0123abcd"
        for g in cloud.gpu_groups()
    }

    def tier_of(asg: str) -> int:
        return max(p for p, patterns in tiers.items() if any(re.match(pat, asg) for pat in patterns))

    spot = [tier_of(a) for n, a in asg_names.items() if "-gpu-spot-" in n]
    fallback = [tier_of(a) for n, a in asg_names.items() if "-gpu-fallback-" in n]
    assert spot
    assert min(spot) > max(fallback, default=0)
    assert min(spot) > min(tiers)


def test_autoscaler_can_scale_gpu_pools_from_zero(cloud: StackRun) -> None:
    policy = json.loads(
        cloud.one("aws:iam/rolePolicy:RolePolicy", "cluster-autoscaler-policy")["inputs"]["policy"]
    )
    actions = {a for s in policy["Statement"] for a in s["Action"]}
    assert "eks:DescribeNodegroup" in actions
    assert {"autoscaling:SetDesiredCapacity", "autoscaling:TerminateInstanceInAutoScalingGroup"} <= actions
    replicas = stack_file(cloud.stack)["dualdeploy:cluster"]["devicePlugin"]["timeSlicingReplicas"]
    tags = cloud.of_type("aws:autoscaling/tag:Tag")
    for group in cloud.gpu_groups():
        mine = {
            t["inputs"]["tag"]["key"]: t["inputs"]["tag"]["value"]
            for t in tags
            if t["name"].startswith(f"{group['name']}-ca-")
        }
        template = "k8s.io/cluster-autoscaler/node-template"
        gpus = GPU_INSTANCE_TYPES[group["inputs"]["instanceTypes"][0]].gpus
        assert mine[f"{template}/resources/nvidia.com/gpu"] == str(gpus * replicas)
        assert mine[f"{template}/taint/nvidia.com/gpu"] == "present:NoSchedule"
        assert (
            mine[f"{template}/label/dualdeploy.io/gpu-arch"]
            == group["inputs"]["labels"]["dualdeploy.io/gpu-arch"]
        )
        assert all(t["inputs"]["tag"]["propagateAtLaunch"] is False for t in tags)
    fallback = [g for g in cloud.gpu_groups() if g["inputs"]["capacityType"] == "ON_DEMAND"]
    assert all(g["inputs"]["scalingConfig"]["minSize"] == 0 for g in fallback)


def test_no_termination_handler_beside_managed_node_groups(cloud: StackRun) -> None:
    charts = {r["inputs"]["chart"] for r in cloud.of_type("kubernetes:helm.sh/v3:Release")}
    assert charts <= {
        "nvidia-device-plugin", "cluster-autoscaler", "metrics-server", "prometheus-adapter", "dcgm-exporter",
        "kube-prometheus-stack",
    }  # fmt: skip
    assert not [r for r in cloud.resources if "termination-handler" in json.dumps(r)]
    # Every node is in an EKS managed node group: no self-managed ASGs or launch templates.
    assert not cloud.of_type("aws:autoscaling/group:Group")
    assert not cloud.of_type("aws:ec2/launchTemplate:LaunchTemplate")


def test_device_plugin_time_slicing_follows_the_stack(cloud: StackRun) -> None:
    release = cloud.release("nvidia-device-plugin")["inputs"]
    replicas = stack_file(cloud.stack)["dualdeploy:cluster"]["devicePlugin"]["timeSlicingReplicas"]
    config = yaml.safe_load(release["values"]["config"]["map"]["default"])
    assert config["sharing"]["timeSlicing"]["resources"] == [{"name": "nvidia.com/gpu", "replicas": replicas}]
    assert release["values"]["tolerations"][0]["key"] == "nvidia.com/gpu"


def test_helm_charts_are_pinned(cloud: StackRun) -> None:
    for release in cloud.of_type("kubernetes:helm.sh/v3:Release"):
        assert re.fullmatch(r"\d+\.\d+\.\d+", release["inputs"]["version"]), release["name"]
        assert release["inputs"]["repositoryOpts"]["repo"].startswith("https://")


def test_kubernetes_resources_use_the_clusters_provider(cloud: StackRun) -> None:
    (provider,) = cloud.of_type("pulumi:providers:kubernetes")
    k8s_resources = [r for r in cloud.resources if r["type"].startswith("kubernetes:")]
    assert len(k8s_resources) >= 9
    for resource in k8s_resources:
        assert resource["provider"] == provider["name"], resource["name"]


def test_no_plaintext_secret_reaches_the_state(cloud: StackRun) -> None:
    (provider,) = cloud.of_type("pulumi:providers:kubernetes")
    assert is_secret(provider["inputs"]["kubeconfig"])
    assert "kubeconfig" in cloud.graph["secret_outputs"]
    secrets = [s for r in cloud.resources for s in secret_values(r["inputs"])]
    assert secrets
    plain = json.dumps([mask_secrets(r["inputs"]) for r in cloud.resources])
    for secret in secrets:
        text = secret if isinstance(secret, str) else json.dumps(secret)
        assert text not in plain
    # The kubeconfig authenticates through `aws eks get-token`: no token is stored at all.
    kubeconfig = json.loads(provider["inputs"]["kubeconfig"]["value"])
    assert kubeconfig["users"][0]["user"]["exec"]["command"] == "aws"
    assert "token" not in kubeconfig["users"][0]["user"]


@cache
def _taggable(typ: str) -> bool:
    """Whether the pulumi_aws resource class behind a type token takes ``tags``."""
    import importlib

    _package, module_path, cls_name = typ.split(":")
    module = importlib.import_module(f"pulumi_aws.{module_path.split('/')[0]}")
    cls = getattr(module, cls_name)
    return "tags" in inspect.signature(cls._internal_init).parameters


def test_every_taggable_resource_carries_the_stack_tags(cloud: StackRun) -> None:
    wanted = {
        "dualdeploy:stack": cloud.stack,
        "managed-by": "pulumi",
        **stack_file(cloud.stack)["dualdeploy:tags"],
    }
    taggable = [r for r in cloud.resources if r["type"].startswith("aws:") and _taggable(r["type"])]
    assert len(taggable) > 10
    for resource in taggable:
        tags = resource["inputs"].get("tags", {})
        missing = {k: v for k, v in wanted.items() if tags.get(k) != v}
        assert not missing, f"{resource['type']} {resource['name']} lacks tags {missing}"


def test_every_resource_is_a_child_of_a_component(cloud: StackRun) -> None:
    components = {
        "dualdeploy:network:Network",
        "dualdeploy:gpu_cluster:GpuCluster",
        "dualdeploy:model_image:ModelImage",
        "dualdeploy:model_service:ModelService",
    }
    for resource in cloud.resources:
        if resource["custom"]:
            assert resource["parent_type"] in components, (
                f"{resource['name']} has parent {resource['parent']}"
            )
    assert {r["type"] for r in cloud.resources if not r["custom"]} >= components


def test_subnets_carry_load_balancer_tags_in_every_zone(cloud: StackRun) -> None:
    zones = stack_file(cloud.stack)["dualdeploy:network"]["availabilityZones"]
    subnets = cloud.of_type("aws:ec2/subnet:Subnet")
    private = [s for s in subnets if "kubernetes.io/role/internal-elb" in s["inputs"]["tags"]]
    public = [s for s in subnets if "kubernetes.io/role/elb" in s["inputs"]["tags"]]
    assert sorted(s["inputs"]["availabilityZone"] for s in private) == sorted(zones)
    assert sorted(s["inputs"]["availabilityZone"] for s in public) == sorted(zones)
    assert all(s["inputs"]["mapPublicIpOnLaunch"] is False for s in public)
    (cluster,) = cloud.of_type("aws:eks/cluster:Cluster")
    subnet_ids = cluster["inputs"]["vpcConfig"]["subnetIds"]
    assert len(set(subnet_ids)) == len(zones) and all(i.startswith("subnet-") for i in subnet_ids)


# --------------------------------------------------------------------------- engines rule, both sides


def test_dev_program_warns_when_the_bundle_has_no_engine(runs: dict[str, StackRun]) -> None:
    assert "has no TensorRT engine in dist/demo/latest" in runs["cloud-dev"].stderr


def test_prod_program_stops_before_any_resource_when_engines_are_missing(tmp_path: Path) -> None:
    project = make_project(tmp_path / "project")  # a bundle without engines
    out = tmp_path / "graph.json"
    done = run_stack("cloud-prod", project, out)
    assert done.returncode != 0
    assert "invalid stack config: dualdeploy:cluster.gpuPools[0].instanceTypes" in done.stderr
    graph = json.loads(out.read_text())
    assert [r["type"] for r in graph["resources"]] == ["pulumi:pulumi:Stack"]


def test_a_mistyped_top_level_key_stops_the_program_naming_it(tmp_path: Path) -> None:
    project = make_project(tmp_path / "project")
    done = run_stack("cloud-dev", project, tmp_path / "graph.json", "dualdeploy:requireEngine=true")
    assert done.returncode != 0
    assert "dualdeploy:requireEngine: unknown key (did you mean 'requireEngines'?)" in done.stderr


def test_a_value_set_with_pulumi_config_set_reaches_the_graph(tmp_path: Path) -> None:
    project = make_project(tmp_path / "project")
    out = tmp_path / "graph.json"
    cluster = stack_file("cloud-dev")["dualdeploy:cluster"]
    cluster = {**cluster, "kubernetesVersion": "1.32"}
    done = run_stack("cloud-dev", project, out, f"dualdeploy:cluster={json.dumps(cluster)}")
    assert done.returncode == 0, done.stderr[-2000:]
    resources = json.loads(out.read_text())["resources"]
    (eks,) = [r for r in resources if r["type"] == "aws:eks/cluster:Cluster"]
    assert eks["inputs"]["version"] == "1.32"
    (scaler,) = [r for r in resources if r["name"] == "cluster-cluster-autoscaler"]
    assert scaler["inputs"]["values"]["image"]["tag"] == "v1.32.0"


@pytest.mark.parametrize("stack", EDGE_STACKS)
def test_edge_vault_password_never_reaches_the_state_in_plaintext(
    stack: str, runs: dict[str, StackRun]
) -> None:
    run = runs[stack]
    plain = json.dumps([mask_secrets(r["inputs"]) for r in run.resources])
    assert TEST_VAULT_PASSWORD not in plain
    assert TEST_VAULT_PASSWORD not in json.dumps(
        {k: v for k, v in run.graph["outputs"].items() if k not in run.graph["secret_outputs"]}
    )
    assert "edge_hosts" in run.graph["outputs"]


# --------------------------------------------------------------------------- the model image and service

DIGEST_REF = re.compile(r"^\d{12}\.dkr\.ecr\.[a-z0-9-]+\.amazonaws\.com/dualdeploy/demo@sha256:[0-9a-f]{64}$")


def serving_of(stack: str) -> dict[str, Any]:
    serving: dict[str, Any] = stack_file(stack)["dualdeploy:serving"]
    return serving


def k8s_object(run: StackRun, kind: str) -> dict[str, Any]:
    matches = [
        r["inputs"]
        for r in run.resources
        if r["type"].startswith("kubernetes:") and r["type"].endswith(f":{kind}")
    ]
    assert len(matches) == 1, f"expected one {kind}, got {len(matches)}"
    return matches[0]


def server_container(run: StackRun) -> dict[str, Any]:
    (container,) = k8s_object(run, "Deployment")["spec"]["template"]["spec"]["containers"]
    return dict(container)


def pod_spec(run: StackRun) -> dict[str, Any]:
    spec: dict[str, Any] = k8s_object(run, "Deployment")["spec"]["template"]["spec"]
    return spec


def test_deployment_requests_a_gpu_tolerates_the_taint_and_targets_the_pool_arches(cloud: StackRun) -> None:
    resources = server_container(cloud)["resources"]
    assert resources["requests"]["nvidia.com/gpu"] == resources["limits"]["nvidia.com/gpu"] == "1"
    pod = pod_spec(cloud)
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    (term,) = pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][
        "nodeSelectorTerms"
    ]
    (expr,) = term["matchExpressions"]
    pool_arches = {GPU_INSTANCE_TYPES[g["inputs"]["instanceTypes"][0]].gpu_arch for g in cloud.gpu_groups()}
    assert expr["key"] == "dualdeploy.io/gpu-arch" and expr["values"] == sorted(pool_arches)
    assert expr["values"] == {"cloud-dev": ["sm_86"], "cloud-prod": ["sm_86", "sm_89"]}[cloud.stack]
    # Every arch the pods may land on is one a GPU pool carries as its node label.
    labels = {g["inputs"]["labels"]["dualdeploy.io/gpu-arch"] for g in cloud.gpu_groups()}
    assert set(expr["values"]) <= labels


def test_pods_spread_over_zones_and_capacity_types_and_prefer_spot(cloud: StackRun) -> None:
    pod = pod_spec(cloud)
    keys = {c["topologyKey"] for c in pod["topologySpreadConstraints"]}
    assert {"topology.kubernetes.io/zone", "eks.amazonaws.com/capacityType"} <= keys
    (preferred,) = pod["affinity"]["nodeAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
    (expr,) = preferred["preference"]["matchExpressions"]
    spot_labels = {
        g["inputs"]["labels"][expr["key"]]
        for g in cloud.gpu_groups()
        if g["inputs"]["capacityType"] == "SPOT"
    }
    assert expr["values"] == ["spot"] and spot_labels == {"spot"}  # the label the Spot pools carry


def test_probes_point_at_the_v2_health_endpoints(cloud: StackRun) -> None:
    container = server_container(cloud)
    assert container["startupProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert container["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    # Cold start: the startup probe allows minutes before liveness may restart the pod.
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 120
    (port,) = [p for p in container["ports"] if p["name"] == "http"]  # REST; gRPC beside it (below)
    assert all(
        container[p]["httpGet"]["port"] == port["name"]
        for p in ("startupProbe", "readinessProbe", "livenessProbe")
    )
    env = {e["name"]: e["value"] for e in container["env"]}
    assert int(env["DUALDEPLOY_PORT"]) == port["containerPort"]  # the wire format carries numbers as floats
    assert env["DUALDEPLOY_BUNDLE"] == "/srv/bundle"  # where serving/Dockerfile bakes it


def test_grace_period_covers_prestop_and_the_servers_drain_within_the_spot_notice(cloud: StackRun) -> None:
    container = server_container(cloud)
    drain = int(container_env(container)["DUALDEPLOY_GRACE_PERIOD_S"])
    assert drain == serving_of(cloud.stack).get("drainSeconds", 30)
    prestop = container["lifecycle"]["preStop"]["sleep"]["seconds"]
    grace = pod_spec(cloud)["terminationGracePeriodSeconds"]
    assert grace > prestop + drain
    assert grace <= 110  # the two-minute Spot notice, less the node's own drain


def container_env(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container["env"]}


def test_hpa_bounds_and_behaviour_follow_the_stack(cloud: StackRun) -> None:
    serving = serving_of(cloud.stack)
    hpa = k8s_object(cloud, "HorizontalPodAutoscaler")["spec"]
    assert (hpa["minReplicas"], hpa["maxReplicas"]) == (serving["minReplicas"], serving["maxReplicas"])
    cpu = next(m for m in hpa["metrics"] if m["type"] == "Resource")
    assert cpu["resource"] == {
        "name": "cpu",
        "target": {"type": "Utilization", "averageUtilization": serving["targetCpuUtilization"]},
    }
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "demo"}
    up, down = hpa["behavior"]["scaleUp"], hpa["behavior"]["scaleDown"]
    assert up["stabilizationWindowSeconds"] == 0 and down["stabilizationWindowSeconds"] >= 300
    assert max(p["value"] for p in up["policies"] if p["type"] == "Percent") >= 100
    assert max(p["value"] for p in down["policies"] if p["type"] == "Percent") <= 10


def test_metrics_server_gives_the_hpa_its_cpu_metric(cloud: StackRun) -> None:
    # EKS installs no metrics-server; without it a CPU-based HPA never scales.
    release = cloud.release("metrics-server")["inputs"]
    assert release["namespace"] == "kube-system"
    assert release["values"]["nodeSelector"] == {"dualdeploy.io/pool": "system"}


def test_the_stacks_carry_the_articles_hpa_profiles() -> None:
    dev, prod = serving_of("cloud-dev"), serving_of("cloud-prod")
    assert (dev["minReplicas"], dev["maxReplicas"], dev["targetCpuUtilization"]) == (2, 10, 70)
    assert (prod["minReplicas"], prod["maxReplicas"], prod["targetCpuUtilization"]) == (20, 200, 70)


def test_queue_depth_scaling_goes_through_prometheus_adapter(cloud: StackRun) -> None:
    serving = serving_of(cloud.stack)
    hpa = k8s_object(cloud, "HorizontalPodAutoscaler")["spec"]
    pods = [m for m in hpa["metrics"] if m["type"] == "Pods"]
    adapters = [
        r
        for r in cloud.of_type("kubernetes:helm.sh/v3:Release")
        if r["inputs"]["chart"] == "prometheus-adapter"
    ]
    if "queueDepthTarget" not in serving:
        assert pods == [] and adapters == []
        return
    (metric,) = pods
    name = metric["pods"]["metric"]["name"]
    assert name == "dualdeploy_inflight_requests"  # the server's gauge, serving/metrics.py
    assert metric["pods"]["target"] == {
        "type": "AverageValue",
        "averageValue": str(serving["queueDepthTarget"]),
    }
    (adapter,) = adapters
    (rule,) = adapter["inputs"]["values"]["rules"]["custom"]
    assert rule["name"]["as"] == name and rule["seriesQuery"].startswith(name)


def test_the_deployment_has_no_replicas_while_the_hpa_owns_it(cloud: StackRun) -> None:
    assert "replicas" not in k8s_object(cloud, "Deployment")["spec"]


def test_a_pdb_selects_the_deployments_pods(cloud: StackRun) -> None:
    pdb = k8s_object(cloud, "PodDisruptionBudget")["spec"]
    labels = k8s_object(cloud, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert pdb["selector"]["matchLabels"].items() <= labels.items()
    assert pdb["unhealthyPodEvictionPolicy"] == "AlwaysAllow"
    assert "maxUnavailable" in pdb


def test_pods_run_the_pushed_image_by_digest(cloud: StackRun) -> None:
    image = server_container(cloud)["image"]
    assert DIGEST_REF.fullmatch(image), image
    (built,) = cloud.of_type("docker:index/image:Image")
    assert built["inputs"]["imageName"].rsplit(":", 1)[0] == image.split("@")[0]
    assert cloud.graph["outputs"]["image"] == image
    for daemonset in [r for r in cloud.resources if r["type"] == "kubernetes:apps/v1:DaemonSet"]:
        assert daemonset["inputs"]["spec"]["template"]["spec"]["containers"][0]["image"] == image


def test_the_image_is_built_for_amd64_on_the_gpu_base_from_the_bundles_real_folder(cloud: StackRun) -> None:
    (built,) = cloud.of_type("docker:index/image:Image")
    build = built["inputs"]["build"]
    assert build["platform"] == "linux/amd64"
    assert build["builderVersion"] == "BuilderBuildKit"  # the Dockerfile's RUN --mount needs BuildKit
    # The context is staged with exactly one bundle and the trusted key (components/aws/model_image.py).
    assert build["context"] == "build/image-context/image"
    assert build["dockerfile"] == "build/image-context/image/serving/Dockerfile"
    assert build["args"]["BASE"] == "gpu"
    assert (build["args"]["BUNDLE"], build["args"]["PUBLIC_KEY"]) == ("bundle", "signer.pub")
    assert re.fullmatch(r".*/dualdeploy/demo:0123456789ab-[0-9a-f]{12}", built["inputs"]["imageName"])


def test_the_gpu_image_carries_the_tensorrt_runtime_that_built_the_engines(cloud: StackRun) -> None:
    (built,) = cloud.of_type("docker:index/image:Image")
    args = built["inputs"]["build"]["args"]
    if ENGINES.get(cloud.stack):
        assert args["TENSORRT_VERSION"] == "10.0"  # the fixture engines' manifest entry
    else:
        # No engines: no TensorRT runtime; the server serves ONNX on the CUDA provider.
        assert "TENSORRT_VERSION" not in args


def test_registry_credentials_reach_the_state_only_as_secrets(cloud: StackRun) -> None:
    (built,) = cloud.of_type("docker:index/image:Image")
    registry = built["inputs"]["registry"]
    assert is_secret(registry)
    assert registry["value"]["password"].startswith("mock-ecr-password-")
    assert "mock-ecr-password-" not in json.dumps([mask_secrets(r["inputs"]) for r in cloud.resources])


def test_ecr_scans_on_push_keeps_tags_immutable_and_expires_old_images(cloud: StackRun) -> None:
    (repo,) = cloud.of_type("aws:ecr/repository:Repository")
    assert repo["inputs"]["imageScanningConfiguration"] == {"scanOnPush": True}
    assert repo["inputs"]["imageTagMutability"] == "IMMUTABLE"
    (policy,) = cloud.of_type("aws:ecr/lifecyclePolicy:LifecyclePolicy")
    (rule,) = json.loads(policy["inputs"]["policy"])["rules"]
    assert rule["selection"]["countType"] == "imageCountMoreThan"
    assert rule["selection"]["countNumber"] == serving_of(cloud.stack).get("keepImages", 10)
    assert rule["action"] == {"type": "expire"}
    # Only a non-prod stack's destroy may take the images with the repository.
    assert repo["inputs"]["forceDelete"] is (stack_file(cloud.stack)["dualdeploy:environment"] != "prod")


def _strings(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for k, v in value.items() for s in (*_strings(k), *_strings(v))]
    if isinstance(value, list):
        return [s for v in value for s in _strings(v)]
    return []


def test_no_latest_tag_anywhere(cloud: StackRun) -> None:
    strings = _strings([mask_secrets(r["inputs"]) for r in cloud.resources]) + _strings(
        cloud.graph["outputs"]
    )
    assert len(strings) > 500
    assert not [s for s in strings if s.endswith(":latest") or ":latest@" in s]
    images = [
        s
        for r in cloud.resources
        if r["type"].startswith("kubernetes:apps/")
        for s in _image_fields(r["inputs"])
    ]
    assert images and all("@sha256:" in s for s in images)


def _image_fields(value: Any) -> list[str]:
    if isinstance(value, dict):
        own = [value["image"]] if isinstance(value.get("image"), str) else []
        return own + [s for v in value.values() for s in _image_fields(v)]
    if isinstance(value, list):
        return [s for v in value for s in _image_fields(v)]
    return []


def test_containers_are_hardened_with_limits(cloud: StackRun) -> None:
    for resource in [r for r in cloud.resources if r["type"].startswith("kubernetes:apps/")]:
        pod = resource["inputs"]["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        for container in pod["containers"]:
            context = container["securityContext"]
            assert context["runAsNonRoot"] and context["readOnlyRootFilesystem"]
            assert context["capabilities"] == {"drop": ["ALL"]}
            assert context["seccompProfile"] == {"type": "RuntimeDefault"}
            assert context["allowPrivilegeEscalation"] is False
            assert {"cpu", "memory"} <= set(container["resources"]["limits"])


def test_monitoring_follows_the_stack(cloud: StackRun) -> None:
    serving = serving_of(cloud.stack)
    monitors = cloud.of_type("kubernetes:monitoring.coreos.com/v1:ServiceMonitor")
    annotations = k8s_object(cloud, "Deployment")["spec"]["template"]["metadata"].get("annotations", {})
    assert bool(serving.get("prometheusOperator")) is (cloud.stack == "cloud-prod")
    if serving.get("prometheusOperator"):
        assert len(monitors) == 1 and "prometheus.io/scrape" not in annotations
        assert monitors[0]["inputs"]["spec"]["endpoints"][0]["path"] == "/metrics"
    else:
        assert monitors == [] and annotations["prometheus.io/scrape"] == "true"
        assert annotations["prometheus.io/path"] == "/metrics"
    dcgm = [
        r for r in cloud.of_type("kubernetes:helm.sh/v3:Release") if r["inputs"]["chart"] == "dcgm-exporter"
    ]
    assert len(dcgm) == int(bool(serving.get("dcgmExporter")))
    # The operator the ServiceMonitors need is installed by the stack itself, and selects them.
    stacks = [
        r
        for r in cloud.of_type("kubernetes:helm.sh/v3:Release")
        if r["inputs"]["chart"] == "kube-prometheus-stack"
    ]
    assert len(stacks) == int(bool(serving.get("prometheusOperator")))
    for monitor in monitors:
        assert monitor["inputs"]["metadata"]["labels"]["release"] == stacks[0]["inputs"]["name"]


def test_prepull_daemonset_follows_the_stack(cloud: StackRun) -> None:
    daemonsets = cloud.of_type("kubernetes:apps/v1:DaemonSet")
    assert len(daemonsets) == int(bool(serving_of(cloud.stack).get("prePull")))
    for daemonset in daemonsets:
        pod = daemonset["inputs"]["spec"]["template"]["spec"]
        assert pod["tolerations"] == pod_spec(cloud)["tolerations"]
        assert "nvidia.com/gpu" not in json.dumps(pod["containers"][0]["resources"])  # holds no GPU


def test_service_is_cluster_ip_or_the_stacks_nlb(cloud: StackRun) -> None:
    service = k8s_object(cloud, "Service")
    lb = serving_of(cloud.stack).get("loadBalancer", "none")
    assert lb == {"cloud-dev": "none", "cloud-prod": "internal"}[cloud.stack]
    if lb == "none":
        assert service["spec"]["type"] == "ClusterIP"
    else:
        assert service["spec"]["type"] == "LoadBalancer"
        annotations = service["metadata"]["annotations"]
        assert annotations["service.beta.kubernetes.io/aws-load-balancer-type"] == "nlb"
        assert (
            annotations["service.beta.kubernetes.io/aws-load-balancer-internal"]
            == str(lb == "internal").lower()
        )
    assert cloud.graph["outputs"]["service_url"] == "http://demo.dualdeploy.svc.cluster.local/v2"


def test_dev_service_warns_that_it_serves_onnx_through_cuda(runs: dict[str, StackRun]) -> None:
    assert "model service demo: no TensorRT engine for sm_86" in runs["cloud-dev"].stderr
    assert "model service demo" not in runs["cloud-prod"].stderr


@pytest.mark.parametrize(
    ("serving", "key"),
    [
        ({"minReplicas": 12, "maxReplicas": 10}, "dualdeploy:serving.minReplicas"),
        ({"minReplicas": 2, "maxReplicas": 10, "queueDepthTarget": 4}, "dualdeploy:serving.queueDepthTarget"),
    ],
)
def test_invalid_service_config_stops_the_program_before_any_resource(
    serving: dict[str, Any], key: str, tmp_path: Path
) -> None:
    project = make_project(tmp_path / "project")
    out = tmp_path / "graph.json"
    done = run_stack("cloud-dev", project, out, f"dualdeploy:serving={json.dumps(serving)}")
    assert done.returncode != 0
    assert f"invalid stack config: {key}" in done.stderr
    assert [r["type"] for r in json.loads(out.read_text())["resources"]] == ["pulumi:pulumi:Stack"]


def test_the_service_exposes_the_grpc_port_beside_rest(cloud: StackRun) -> None:
    """Issue 14, item 5: the server serves v2 gRPC on 8001 (the same model, queue, TLS and token as REST),
    the Service and the NetworkPolicy expose it."""
    container = server_container(cloud)
    assert container_env(container)["DUALDEPLOY_GRPC_PORT"] == "8001"
    assert {"name": "grpc", "containerPort": 8001, "protocol": "TCP"} in container["ports"]
    service = k8s_object(cloud, "Service")
    assert {"name": "grpc", "port": 8001, "protocol": "TCP", "targetPort": "grpc"} in service["spec"]["ports"]
    (rule,) = k8s_object(cloud, "NetworkPolicy")["spec"]["ingress"]
    assert {"port": 8001, "protocol": "TCP"} in rule["ports"]


# --------------------------------------------------------------------------- hybrid: the edge's own teacher


def _hybrid_service(run: StackRun) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """The hybrid stack's Service, Deployment and credentials Secret."""
    return k8s_object(run, "Service"), k8s_object(run, "Deployment"), k8s_object(run, "Secret")


def test_hybrid_edge_devices_escalate_to_their_own_cloud_teacher(runs: dict[str, StackRun]) -> None:
    """Issue 13, item 4: one program run wires the cloud Service's endpoint, CA and token into EdgeFleet."""
    run = runs["hybrid"]
    service, deployment, secret = _hybrid_service(run)
    ingress = sorted(
        (r for r in run.of_type("aws:ec2/eip:Eip") if "ingress" in r["name"]), key=lambda r: r["name"]
    )
    assert len(ingress) == len(stack_file("hybrid")["dualdeploy:network"]["availabilityZones"])
    # What the (mock) provider gave each ingress EIP: its allocation id and public address.
    region = stack_file("hybrid")["aws:region"]
    given = [mock_outputs("aws:ec2/eip:Eip", r["name"], r["inputs"], region)[1] for r in ingress]
    # The NLB sits on exactly the ingress EIPs (not the NAT's), listens on 443, from the sites only.
    annotation = service["metadata"]["annotations"][k8s_specs.EIP_ANNOTATION]
    assert annotation == ",".join(eip["allocationId"] for eip in given)
    assert service["spec"]["type"] == "LoadBalancer"
    assert service["spec"]["ports"] == [
        {"name": "https", "port": 443, "protocol": "TCP", "targetPort": "http"},
        {"name": "grpc", "port": 8001, "protocol": "TCP", "targetPort": "grpc"},  # TLS and token as REST
    ]
    assert service["spec"]["loadBalancerSourceRanges"] == serving_of("hybrid")["loadBalancerSourceRanges"]
    # The certificate carries every ingress address and the in-cluster name; the CA signed it.
    addresses = [eip["publicIp"] for eip in given]
    csr = run.one("tls:index/certRequest:CertRequest", "teacher-identity-csr")["inputs"]
    assert csr["ipAddresses"] == addresses and "demo.dualdeploy.svc" in csr["dnsNames"]
    signed = run.one("tls:index/locallySignedCert:LocallySignedCert", "teacher-identity-cert")["inputs"]
    assert "server_auth" in signed["allowedUses"] and signed["earlyRenewalHours"] > 0
    ca_pem = signed["caCertPem"]
    # The rollout gets the first address, that CA and the Secret's token: the role's variables.
    (rollout,) = run.of_type("pulumi-python:dynamic/edge_fleet:EdgeRollout")
    props = rollout["inputs"]
    assert props["escalation"] == {"endpoint": f"https://{addresses[0]}:443", "ca": ca_pem}
    assert is_secret(props["escalation_token"]) and is_secret(secret["stringData"])
    credentials = secret["stringData"]["value"]
    assert props["escalation_token"]["value"] == credentials["token"]
    assert credentials["ca.crt"] == ca_pem and credentials["metrics-token"] != credentials["token"]
    extravars = escalation_extravars({**props, "escalation_token": props["escalation_token"]["value"]})
    assert extravars == {
        "edge_escalation": "low_confidence",
        "edge_escalation_endpoint": f"https://{addresses[0]}:443",
        "edge_escalation_ca": ca_pem,
        "edge_escalation_token": credentials["token"],
    }
    assert run.graph["outputs"]["teacher_endpoint"] == f"https://{addresses[0]}:443"
    # The pods serve HTTPS with the token from the mounted Secret, and roll when it changes.
    env = container_env(server_container(run))
    assert env["DUALDEPLOY_TLS_CERT"] == f"{k8s_specs.AUTH_MOUNT}/tls.crt"
    assert env["DUALDEPLOY_TOKEN_FILE"] == f"{k8s_specs.AUTH_MOUNT}/token"
    assert env["DUALDEPLOY_METRICS_TOKEN_FILE"] == f"{k8s_specs.AUTH_MOUNT}/metrics-token"
    assert server_container(run)["readinessProbe"]["httpGet"]["scheme"] == "HTTPS"
    checksum = deployment["spec"]["template"]["metadata"]["annotations"][k8s_specs.CREDENTIALS_ANNOTATION]
    assert re.fullmatch(r"[0-9a-f]{64}", checksum), "the checksum is plain (a preview shows the roll)"
    volume = next(v for v in pod_spec(run)["volumes"] if v["name"] == "auth")
    assert volume["secret"] == {"secretName": "demo-auth", "defaultMode": 0o440}


def test_hybrid_keys_and_tokens_reach_the_state_only_as_secrets(runs: dict[str, StackRun]) -> None:
    run = runs["hybrid"]
    plain = json.dumps([mask_secrets(r["inputs"]) for r in run.resources])
    _, _, secret = _hybrid_service(run)
    credentials = secret["stringData"]["value"]
    for key in ("token", "metrics-token", "tls.key"):
        assert credentials[key] not in plain, key
    assert "teacher_ca" in run.graph["outputs"]  # public: the sites' technicians may read it


def test_edge_only_and_cloud_stacks_serve_plain_http_without_credentials(runs: dict[str, StackRun]) -> None:
    for stack in CLOUD_STACKS:
        run = runs[stack]
        assert not [r for r in run.resources if r["type"].startswith(("tls:", "random:"))]
        assert not [r for r in run.resources if r["type"] == "kubernetes:core/v1:Secret"]
        assert "DUALDEPLOY_TOKEN_FILE" not in container_env(server_container(run))
    (rollout,) = runs["edge-site"].of_type("pulumi-python:dynamic/edge_fleet:EdgeRollout")
    assert rollout["inputs"].get("escalation") is None
    assert escalation_extravars(rollout["inputs"]) == {}


@pytest.mark.parametrize(
    ("stack", "override", "key", "says"),
    [
        (
            "hybrid",
            {"dualdeploy:serving": {"minReplicas": 2, "maxReplicas": 20}},
            "dualdeploy:serving.loadBalancer",
            "needs the teacher reachable from the sites",
        ),
        (
            "hybrid",
            {"dualdeploy:bundle": "dist/other-teacher/latest"},
            "dualdeploy:bundle",
            "calibrated against demo 0123456789ab",
        ),
        (
            "edge-site",
            {"dualdeploy:edge": {"inventory": "ansible/inventories/example-site", "bundle":
                                 "dist/demo-distilled/latest", "escalation": "low_confidence"}},
            "dualdeploy:edge.escalation",
            "the stack has no cloud part",
        ),
        (
            "hybrid",
            {"dualdeploy:edge": {"inventory": "ansible/inventories/example-site",
                                 "bundle": "dist/demo/latest", "escalation": "low_confidence"}},
            "dualdeploy:edge.bundle",
            "has no calibrated cascade",
        ),
    ],
    ids=["no-load-balancer", "other-teacher", "no-cloud-part", "no-cascade"],
)  # fmt: skip
def test_escalation_a_stack_cannot_wire_stops_the_program_naming_the_key(
    stack: str, override: dict[str, Any], key: str, says: str, tmp_path: Path
) -> None:
    project = make_project(tmp_path / "project")
    write_fixture_bundle(project / "dist", "other-teacher", version="fedcba987654")
    out = tmp_path / "graph.json"
    settings = [f"{k}={v if isinstance(v, str) else json.dumps(v)}" for k, v in override.items()]
    done = run_stack(stack, project, out, *settings)
    assert done.returncode != 0
    assert f"invalid stack config: {key}" in done.stderr and says in done.stderr, done.stderr[-2000:]
    assert [r["type"] for r in json.loads(out.read_text())["resources"]] == ["pulumi:pulumi:Stack"]


# --------------------------------------------------------------------------- make render = the program


ONLY_PULUMI_UP_KNOWS = (
    k8s_specs.PLACEHOLDER_ANNOTATION,
    k8s_specs.CREDENTIALS_ANNOTATION,
    k8s_specs.EIP_ANNOTATION,
    "stringData",
)
"""Keys whose values only a real apply knows: the placeholder note, the teacher's credentials and its
Elastic IPs (``make render`` writes ``set-by-pulumi-up`` there)."""


def _offline_view(value: Any) -> Any:
    """An object with what only a real apply knows set aside: image references, credentials, addresses."""
    if isinstance(value, dict):
        out = {k: _offline_view(v) for k, v in value.items() if k not in ONLY_PULUMI_UP_KNOWS}
        if "image" in out and isinstance(out["image"], str):
            out["image"] = "<image by digest>"
        if out.get("annotations") == {}:
            del out["annotations"]
        return out
    if isinstance(value, list):
        return [_offline_view(v) for v in value]
    if isinstance(value, float) and value.is_integer():
        return int(value)  # the wire format carries numbers as floats
    return value


@pytest.mark.parametrize("stack", [*CLOUD_STACKS, "hybrid"])
def test_make_render_writes_exactly_the_objects_the_program_creates(
    stack: str, runs: dict[str, StackRun], tmp_path_factory: pytest.TempPathFactory
) -> None:
    """One spec, two writers: so the service's policies above hold for ``make render``'s files too."""
    cloud = runs[stack]
    project = make_project(tmp_path_factory.mktemp(f"render-{cloud.stack}"), ENGINES.get(cloud.stack, ()))
    out = project / "build" / "manifests" / cloud.stack
    files = render(cloud.stack, out, project)
    rendered = [yaml.safe_load(path.read_text()) for path in files]
    created = [
        r["inputs"]
        for r in cloud.resources
        if r["type"].startswith("kubernetes:") and not r["type"].startswith("kubernetes:helm.sh/")
    ]
    by_key = {(o["kind"], o["metadata"]["name"]): _offline_view(o) for o in created}
    assert len(rendered) >= 7  # Namespace, ServiceAccount, Deployment, Service, HPA, PDB, NetworkPolicy
    assert sorted(by_key) == sorted((o["kind"], o["metadata"]["name"]) for o in rendered)
    for obj in rendered:
        assert _offline_view(obj) == by_key[obj["kind"], obj["metadata"]["name"]], obj["kind"]
        if obj["kind"] == "Secret":  # no key or token is ever written to a rendered file
            assert obj["stringData"] == dict.fromkeys(k8s_specs.AUTH_KEYS, k8s_specs.SET_BY_PULUMI)
    # What the offline files hold in place of the pushed image: a placeholder by digest, never a tag.
    text = "\n".join(path.read_text() for path in files)
    images = re.findall(r"image: (\S+)", text)
    assert images and all(re.search(r"@sha256:[0-9a-f]{64}$", image) for image in images)
    assert ":latest" not in text
    # The Helm charts are not rendered; their values are, and they are the ones the releases get.
    for chart in ("kube-prometheus-stack", "prometheus-adapter", "dcgm-exporter"):
        releases = [
            r for r in cloud.of_type("kubernetes:helm.sh/v3:Release") if r["inputs"]["chart"] == chart
        ]
        values_file = out / "values" / f"{chart}.yaml"
        assert values_file.is_file() == bool(releases), chart
        if releases:
            assert _offline_view(yaml.safe_load(values_file.read_text())) == _offline_view(
                releases[0]["inputs"]["values"]
            )
