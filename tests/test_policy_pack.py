"""The CrossGuard policy pack: each rule on a compliant and a non-compliant resource.

The validation functions get ``ResourceValidationArgs`` shaped as the engine sends them
(camelCase inputs, a real URN, resource options). The last test feeds every resource of the
``cloud-prod`` program run (under mocks) through every policy: our own stack must pass.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from typing import Any

import pytest
from cloud_harness import REPO_ROOT, make_project
from pulumi_policy import (
    PolicyCustomTimeouts,
    PolicyResource,
    PolicyResourceOptions,
    ResourceValidationArgs,
    ResourceValidationPolicy,
    StackValidationArgs,
)
from pulumi_policy.proxy import UNKNOWN_STRING_VALUE, unknown_checking_proxy

from components import k8s_specs
from components.model_service import ModelServiceArgs

sys.path.insert(0, str(REPO_ROOT / "policy"))
import dualdeploy_rules as rules  # the pack is its own folder, not a package

TAGS = {
    "dualdeploy:stack": "cloud-prod",
    "dualdeploy:environment": "prod",
    "managed-by": "pulumi",
    "owner": "ml",
}


def args_for(
    resource_type: str,
    name: str,
    props: dict[str, Any],
    stack: str = "cloud-prod",
    config: dict | None = None,
) -> ResourceValidationArgs:
    urn = f"urn:pulumi:{stack}::dualdeploy::dualdeploy:gpu_cluster:GpuCluster${resource_type}::{name}"
    opts = PolicyResourceOptions(
        protect=False,
        ignore_changes=[],
        delete_before_replace=None,
        aliases=[],
        custom_timeouts=PolicyCustomTimeouts(0, 0, 0),
        additional_secret_outputs=[],
    )
    return ResourceValidationArgs(resource_type, props, urn, name, opts, None, config)


def violations(validate: Any, args: ResourceValidationArgs | StackValidationArgs) -> list[str]:
    found: list[str] = []
    validate(args, lambda message, urn=None: found.append(message))
    return found


def spot_group(**changes: Any) -> dict[str, Any]:
    props: dict[str, Any] = {
        "clusterName": "dualdeploy-cloud-prod",
        "nodeGroupName": "dualdeploy-cloud-prod-gpu-spot-ampere",
        "capacityType": "SPOT",
        "amiType": "AL2023_x86_64_NVIDIA",
        "instanceTypes": ["g5.xlarge"],
        "scalingConfig": {"minSize": 0, "maxSize": 30, "desiredSize": 0},
        "labels": {"dualdeploy.io/gpu-arch": "sm_86", "k8s.amazonaws.com/accelerator": "nvidia-a10g"},
        "taints": [{"key": "nvidia.com/gpu", "value": "present", "effect": "NO_SCHEDULE"}],
        "tags": {**TAGS, "dualdeploy:pool-role": "spot"},
    }
    props.update(changes)
    return props


def cluster_props(**changes: Any) -> dict[str, Any]:
    props: dict[str, Any] = {
        "name": "dualdeploy-cloud-prod",
        "version": "1.33",
        "roleArn": "arn:aws:iam::123456789012:role/cluster-role-1a2b3c4",
        "vpcConfig": {
            "subnetIds": ["subnet-0a1b2c3d", "subnet-1b2c3d4e"],
            "endpointPrivateAccess": True,
            "endpointPublicAccess": False,
        },
        "encryptionConfig": {
            "resources": ["secrets"],
            "provider": {
                "keyArn": "arn:aws:kms:us-east-1:123456789012:key/3a6aff04-4e40-4ed3-a3a6-aff044e40ed3"
            },
        },
        "enabledClusterLogTypes": ["api", "audit", "authenticator"],
        "tags": dict(TAGS),
    }
    props.update(changes)
    return props


# --------------------------------------------------------------------------- GPU pools are Spot


def test_spot_gpu_group_passes() -> None:
    args = args_for(rules.NODE_GROUP, "cluster-gpu-spot-ampere", spot_group())
    assert violations(rules.validate_gpu_node_groups_spot, args) == []


def test_on_demand_gpu_group_fails() -> None:
    args = args_for(rules.NODE_GROUP, "cluster-gpu-spot-ampere", spot_group(capacityType="ON_DEMAND"))
    (message,) = violations(rules.validate_gpu_node_groups_spot, args)
    assert "capacityType ON_DEMAND" in message


def test_gpu_group_without_capacity_type_fails_because_eks_defaults_to_on_demand() -> None:
    props = spot_group()
    del props["capacityType"]
    assert violations(rules.validate_gpu_node_groups_spot, args_for(rules.NODE_GROUP, "g", props))


def test_on_demand_gpu_group_tagged_fallback_passes() -> None:
    props = spot_group(capacityType="ON_DEMAND", tags={**TAGS, "dualdeploy:pool-role": "fallback"})
    assert violations(rules.validate_gpu_node_groups_spot, args_for(rules.NODE_GROUP, "fb", props)) == []


def test_gpu_group_is_recognised_by_instance_family_with_a_custom_ami() -> None:
    props = spot_group(capacityType="ON_DEMAND", amiType="CUSTOM", instanceTypes=["p5.48xlarge"])
    assert violations(rules.validate_gpu_node_groups_spot, args_for(rules.NODE_GROUP, "p5", props))


def test_on_demand_cpu_group_is_not_a_gpu_pool() -> None:
    props = spot_group(
        capacityType="ON_DEMAND", amiType="AL2023_x86_64_STANDARD", instanceTypes=["m6i.large"]
    )
    assert violations(rules.validate_gpu_node_groups_spot, args_for(rules.NODE_GROUP, "system", props)) == []


# --------------------------------------------------------------------------- secrets encryption


def test_cluster_with_kms_secrets_encryption_passes() -> None:
    args = args_for(rules.CLUSTER, "cluster-eks", cluster_props())
    assert violations(rules.validate_eks_secrets_encryption, args) == []


def test_encryption_rule_runs_during_preview_while_the_key_arn_is_unknown() -> None:
    props = cluster_props(
        encryptionConfig={"resources": ["secrets"], "provider": {"keyArn": UNKNOWN_STRING_VALUE}}
    )
    # As the engine hands props to a policy during preview: reading an unknown value raises.
    args = args_for(rules.CLUSTER, "cluster-eks", unknown_checking_proxy(props))
    assert violations(rules.validate_eks_secrets_encryption, args) == []
    assert violations(rules.validate_eks_public_endpoint_prod, args) == []
    assert violations(rules.validate_aws_resources_tagged, args) == []


def test_cluster_without_encryption_fails() -> None:
    props = cluster_props()
    del props["encryptionConfig"]
    (message,) = violations(
        rules.validate_eks_secrets_encryption, args_for(rules.CLUSTER, "cluster-eks", props)
    )
    assert "does not encrypt secrets" in message


def test_cluster_encrypting_other_resources_only_fails() -> None:
    props = cluster_props(encryptionConfig={"resources": [], "provider": {"keyArn": "arn:aws:kms:..."}})
    assert violations(rules.validate_eks_secrets_encryption, args_for(rules.CLUSTER, "cluster-eks", props))


# --------------------------------------------------------------------------- public endpoint in prod


def test_private_prod_endpoint_passes() -> None:
    args = args_for(rules.CLUSTER, "cluster-eks", cluster_props())
    assert violations(rules.validate_eks_public_endpoint_prod, args) == []


def test_public_prod_endpoint_with_allow_list_passes() -> None:
    vpc = {"subnetIds": ["subnet-1"], "endpointPublicAccess": True, "publicAccessCidrs": ["203.0.113.0/24"]}
    args = args_for(rules.CLUSTER, "cluster-eks", cluster_props(vpcConfig=vpc))
    assert violations(rules.validate_eks_public_endpoint_prod, args) == []


def test_public_prod_endpoint_without_allow_list_fails() -> None:
    vpc = {"subnetIds": ["subnet-1"], "endpointPublicAccess": True}
    (message,) = violations(
        rules.validate_eks_public_endpoint_prod,
        args_for(rules.CLUSTER, "cluster-eks", cluster_props(vpcConfig=vpc)),
    )
    assert "EKS defaults to 0.0.0.0/0" in message


def test_prod_endpoint_left_at_the_eks_default_fails() -> None:
    args = args_for(rules.CLUSTER, "cluster-eks", cluster_props(vpcConfig={"subnetIds": ["subnet-1"]}))
    assert violations(rules.validate_eks_public_endpoint_prod, args)


def test_public_prod_endpoint_open_to_all_fails() -> None:
    vpc = {"subnetIds": ["subnet-1"], "endpointPublicAccess": True, "publicAccessCidrs": ["0.0.0.0/0"]}
    args = args_for(rules.CLUSTER, "cluster-eks", cluster_props(vpcConfig=vpc))
    assert violations(rules.validate_eks_public_endpoint_prod, args)


def test_public_dev_endpoint_is_not_this_rules_business() -> None:
    vpc = {"subnetIds": ["subnet-1"], "endpointPublicAccess": True}
    tags = {**TAGS, "dualdeploy:environment": "dev", "dualdeploy:stack": "cloud-dev"}
    args = args_for(rules.CLUSTER, "cluster-eks", cluster_props(vpcConfig=vpc, tags=tags), stack="cloud-dev")
    assert violations(rules.validate_eks_public_endpoint_prod, args) == []


def test_prod_is_recognised_by_stack_name_without_tags() -> None:
    vpc = {"subnetIds": ["subnet-1"], "endpointPublicAccess": True}
    args = args_for(rules.CLUSTER, "c", cluster_props(vpcConfig=vpc, tags={}), stack="payments-prod")
    assert violations(rules.validate_eks_public_endpoint_prod, args)


# --------------------------------------------------------------------------- tags


def test_tagged_resource_passes() -> None:
    args = args_for("aws:ec2/vpc:Vpc", "net-vpc", {"cidrBlock": "10.40.0.0/16", "tags": dict(TAGS)})
    assert violations(rules.validate_aws_resources_tagged, args) == []


def test_untagged_resource_fails_naming_the_missing_tags() -> None:
    args = args_for("aws:ec2/vpc:Vpc", "net-vpc", {"cidrBlock": "10.40.0.0/16", "tags": {"owner": "ml"}})
    (message,) = violations(rules.validate_aws_resources_tagged, args)
    assert "missing tags ['dualdeploy:stack', 'managed-by']" in message


def test_required_tags_come_from_policy_config() -> None:
    props = {"cidrBlock": "10.40.0.0/16", "tags": dict(TAGS)}
    args = args_for("aws:ec2/vpc:Vpc", "net-vpc", props, config={"requiredTags": ["cost-center"]})
    assert violations(rules.validate_aws_resources_tagged, args)


def test_resource_types_without_tags_are_exempt() -> None:
    props = {"role": "node-role", "policyArn": "arn:aws:iam::aws:policy/AmazonEKSWorkerNodePolicy"}
    args = args_for("aws:iam/rolePolicyAttachment:RolePolicyAttachment", "node-worker", props)
    assert rules.is_taggable("aws:iam/rolePolicyAttachment:RolePolicyAttachment") is False
    assert rules.is_taggable("aws:eks/nodeGroup:NodeGroup") is True
    assert violations(rules.validate_aws_resources_tagged, args) == []


def test_the_pack_has_the_cluster_and_the_service_rules() -> None:
    assert {p.name for p in rules.POLICIES} == {
        "gpu-node-groups-spot",
        "eks-secrets-encryption",
        "eks-public-endpoint-prod",
        "aws-resources-tagged",
        "k8s-images-by-digest",
        "k8s-non-root-with-limits",
        "k8s-deployment-has-hpa-and-pdb",
        "ecr-scan-on-push",
        "k8s-service-monitor-has-operator",
        "gpu-pod-fit-covers-time-slicing",
        "gpu-hpa-max-within-pool-capacity",
        "gpu-pool-one-size",
        "gpu-node-groups-accelerator-label",
        "eks-ci-access-entries",
    }


# --------------------------------------------------------------------------- our own program passes


@pytest.fixture(scope="module")
def prod_graph(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    project = make_project(tmp_path_factory.mktemp("policy-project"), ("sm_86", "sm_89"))
    out = project / "graph.json"
    command = [sys.executable, str(REPO_ROOT / "tests" / "cloud_harness.py"), "cloud-prod"]
    command += ["--project-dir", str(project), "--out", str(out)]
    done = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    graph: dict[str, Any] = json.loads(out.read_text())
    return graph


def test_cloud_prod_program_passes_every_policy(prod_graph: dict[str, Any]) -> None:
    found: list[str] = []
    for resource in prod_graph["resources"]:
        if not resource["custom"]:
            continue
        args = args_for(resource["type"], resource["name"], resource["inputs"])
        for policy in rules.POLICIES:
            if not isinstance(policy, ResourceValidationPolicy):
                continue

            def report(message: str, urn: str | None = None, name: str = policy.name) -> None:
                found.append(f"{name} {urn or ''}: {message}")

            policy.validate(args, report)
    assert found == []


def test_cloud_prod_program_would_fail_if_a_spot_pool_went_on_demand(prod_graph: dict[str, Any]) -> None:
    groups = [r for r in prod_graph["resources"] if r["type"] == rules.NODE_GROUP]
    spot = next(g for g in groups if g["inputs"].get("capacityType") == "SPOT")
    broken = copy.deepcopy(spot["inputs"])
    broken["capacityType"] = "ON_DEMAND"
    assert violations(rules.validate_gpu_node_groups_spot, args_for(rules.NODE_GROUP, spot["name"], broken))


def test_pack_starts_and_serves_the_analyzer_on_localhost() -> None:
    """What `pulumi preview --policy-pack policy` starts: the pack prints its gRPC port and serves."""
    process = subprocess.Popen(
        [sys.executable, "__main__.py"],
        cwd=REPO_ROOT / "policy",
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline().decode().strip()
        assert line.isdigit() and 0 < int(line) < 65536, f"expected a port, got {line!r}"
        assert process.poll() is None  # still serving
    finally:
        process.terminate()
        process.wait(timeout=10)


# --------------------------------------------------------------------------- the model service's objects

K8S_TYPES = {
    "Deployment": "kubernetes:apps/v1:Deployment",
    "DaemonSet": "kubernetes:apps/v1:DaemonSet",
    "HorizontalPodAutoscaler": "kubernetes:autoscaling/v2:HorizontalPodAutoscaler",
    "PodDisruptionBudget": "kubernetes:policy/v1:PodDisruptionBudget",
    "Service": "kubernetes:core/v1:Service",
}


def service_objects() -> list[dict[str, Any]]:
    """The objects the spec functions produce for a service (what pulumi-kubernetes receives)."""
    args = ModelServiceArgs(
        name="demo",
        image="123456789012.dkr.ecr.us-east-1.amazonaws.com/dualdeploy/demo@sha256:" + "ab" * 32,
        bundle_version="0123456789ab",
        pool_arches=["sm_86"],
        engine_arches=["sm_86"],
        pre_pull=True,
    )
    return k8s_specs.all_objects(args)


def k8s_args(obj: dict[str, Any]) -> ResourceValidationArgs:
    return args_for(K8S_TYPES[obj["kind"]], obj["metadata"]["name"], obj)


def stack_args(objects: list[dict[str, Any]]) -> StackValidationArgs:
    resources = []
    for obj in objects:
        if obj["kind"] not in K8S_TYPES:
            continue
        single = k8s_args(obj)
        resources.append(
            PolicyResource(
                single.resource_type, obj, single.urn, single.name, single.opts, None, None, [], {}
            )
        )
    return StackValidationArgs(resources)


def test_service_objects_pass_the_digest_rule() -> None:
    for obj in service_objects():
        if obj["kind"] in ("Deployment", "DaemonSet"):
            assert violations(rules.validate_k8s_images_by_digest, k8s_args(obj)) == []


def test_an_image_by_tag_fails_the_digest_rule() -> None:
    deployment = copy.deepcopy(k8s_specs.find(service_objects(), "Deployment"))
    deployment["spec"]["template"]["spec"]["containers"][0]["image"] = "repo/demo:latest"
    (message,) = violations(rules.validate_k8s_images_by_digest, k8s_args(dict(deployment)))
    assert "repo/demo:latest" in message


def test_service_objects_pass_the_non_root_and_limits_rule() -> None:
    for obj in service_objects():
        if obj["kind"] in ("Deployment", "DaemonSet"):
            assert violations(rules.validate_k8s_non_root_with_limits, k8s_args(obj)) == []


def test_a_root_container_without_limits_fails() -> None:
    deployment = copy.deepcopy(k8s_specs.find(service_objects(), "Deployment"))
    pod = deployment["spec"]["template"]["spec"]
    del pod["securityContext"]
    container = pod["containers"][0]
    del container["securityContext"]
    container["resources"] = {"requests": {"cpu": "1"}}
    found = violations(rules.validate_k8s_non_root_with_limits, k8s_args(dict(deployment)))
    assert any("may run as root" in f for f in found)
    assert any("no cpu or memory limit" in f for f in found)


def test_deployment_with_hpa_and_pdb_passes() -> None:
    assert violations(rules.validate_deployments_have_hpa_and_pdb, stack_args(service_objects())) == []


def test_deployment_without_hpa_or_pdb_fails() -> None:
    objects = [
        o for o in service_objects() if o["kind"] not in ("HorizontalPodAutoscaler", "PodDisruptionBudget")
    ]
    found = violations(rules.validate_deployments_have_hpa_and_pdb, stack_args(objects))
    assert found == [
        "Deployment dualdeploy/demo has no HorizontalPodAutoscaler",
        "Deployment dualdeploy/demo has no PodDisruptionBudget selecting its pods",
    ]


def test_a_pdb_that_selects_other_pods_does_not_count() -> None:
    objects = copy.deepcopy(service_objects())
    k8s_specs.find(objects, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"] = {"app": "other"}
    assert violations(rules.validate_deployments_have_hpa_and_pdb, stack_args(objects))


def test_ecr_repository_scanning_on_push_passes_and_without_fails() -> None:
    good = {
        "name": "dualdeploy/demo",
        "imageTagMutability": "IMMUTABLE",
        "imageScanningConfiguration": {"scanOnPush": True},
    }
    bad = {"name": "dualdeploy/demo", "imageTagMutability": "IMMUTABLE"}
    assert violations(rules.validate_ecr_scan_on_push, args_for(rules.ECR_REPOSITORY, "images", good)) == []
    assert violations(rules.validate_ecr_scan_on_push, args_for(rules.ECR_REPOSITORY, "images", bad))


def graph_stack_args(resources: list[dict[str, Any]]) -> StackValidationArgs:
    policy_resources = []
    for resource in resources:
        if not resource["custom"]:
            continue
        single = args_for(resource["type"], resource["name"], resource["inputs"])
        policy_resources.append(
            PolicyResource(
                single.resource_type,
                resource["inputs"],
                single.urn,
                single.name,
                single.opts,
                None,
                None,
                [],
                {},
            )
        )
    return StackValidationArgs(policy_resources)


def test_cloud_prod_program_gives_the_service_rules_something_to_check(prod_graph: dict[str, Any]) -> None:
    types = {r["type"] for r in prod_graph["resources"]}
    assert {
        rules.ECR_REPOSITORY,
        rules.DEPLOYMENT,
        rules.HPA,
        rules.PDB,
        "kubernetes:apps/v1:DaemonSet",
    } <= types


def test_cloud_prod_program_passes_the_stack_rule(prod_graph: dict[str, Any]) -> None:
    args = graph_stack_args(prod_graph["resources"])
    assert violations(rules.validate_deployments_have_hpa_and_pdb, args) == []


def test_cloud_prod_program_would_fail_without_its_hpa(prod_graph: dict[str, Any]) -> None:
    args = graph_stack_args([r for r in prod_graph["resources"] if r["type"] != rules.HPA])
    assert violations(rules.validate_deployments_have_hpa_and_pdb, args) == [
        "Deployment dualdeploy/demo has no HorizontalPodAutoscaler"
    ]


def test_cloud_prod_program_would_fail_if_the_ecr_scan_were_off(prod_graph: dict[str, Any]) -> None:
    (repo,) = [r for r in prod_graph["resources"] if r["type"] == rules.ECR_REPOSITORY]
    broken = copy.deepcopy(repo["inputs"])
    del broken["imageScanningConfiguration"]
    assert violations(rules.validate_ecr_scan_on_push, args_for(rules.ECR_REPOSITORY, repo["name"], broken))


# ------------------------------------------------------------------ monitoring and capacity (issue 17)


def _stack_rule(validate: Any, resources: list[dict[str, Any]]) -> list[str]:
    return violations(validate, graph_stack_args(resources))


def _edited(graph: dict[str, Any], resource_type: str, edit: Any) -> list[dict[str, Any]]:
    """The graph's resources with ``edit`` applied to the inputs of each of one type (a deep copy)."""
    resources = copy.deepcopy(graph["resources"])
    for resource in resources:
        if resource["type"] == resource_type:
            edit(resource["inputs"])
    return resources


def test_cloud_prod_passes_the_monitoring_and_capacity_rules(prod_graph: dict[str, Any]) -> None:
    for validate in (
        rules.validate_service_monitors_have_an_operator,
        rules.validate_gpu_pod_fit_covers_time_slicing,
        rules.validate_gpu_hpa_max_within_pool_capacity,
    ):
        assert _stack_rule(validate, prod_graph["resources"]) == [], validate.__name__
    assert rules.SERVICE_MONITOR in {r["type"] for r in prod_graph["resources"]}  # the rule had work


def test_a_service_monitor_without_the_operator_release_fails(prod_graph: dict[str, Any]) -> None:
    resources = [
        r
        for r in prod_graph["resources"]
        if not (r["type"] == rules.HELM_RELEASE and r["inputs"]["chart"] == rules.PROMETHEUS_STACK_CHART)
    ]
    found = _stack_rule(rules.validate_service_monitors_have_an_operator, resources)
    assert any("ServiceMonitor dualdeploy/demo needs the Prometheus operator" in f for f in found), found
    assert any("Helm release dcgm-exporter creates a ServiceMonitor" in f for f in found), found


def test_a_service_monitor_without_the_release_label_fails(prod_graph: dict[str, Any]) -> None:
    resources = _edited(prod_graph, rules.SERVICE_MONITOR, lambda i: i["metadata"]["labels"].pop("release"))
    (found,) = _stack_rule(rules.validate_service_monitors_have_an_operator, resources)
    assert "lacks the label release=kube-prometheus-stack" in found


def _old_requests(inputs: dict[str, Any]) -> None:
    inputs["spec"]["template"]["spec"]["containers"][0]["resources"]["requests"].update(cpu="2", memory="8Gi")


def test_pod_requests_that_leave_gpu_slots_idle_fail(prod_graph: dict[str, Any]) -> None:
    resources = _edited(prod_graph, rules.DEPLOYMENT, _old_requests)  # the requests before issue 17
    found = _stack_rule(rules.validate_gpu_pod_fit_covers_time_slicing, resources)
    assert found and all("1 pods fit a node but the device plugin offers 5 GPU slots" in f for f in found)
    assert "/ 2000m = 1" in found[0]


def test_an_hpa_maximum_above_the_pools_fails(prod_graph: dict[str, Any]) -> None:
    resources = _edited(prod_graph, rules.HPA, lambda i: i["spec"].update(maxReplicas=1000))
    (found,) = _stack_rule(rules.validate_gpu_hpa_max_within_pool_capacity, resources)
    assert "HPA dualdeploy/demo may scale to 1000 pods, but the GPU node groups hold" in found
    # The requests before issue 17: one pod a node, so prod's 200 cannot fit its pools either.
    resources = _edited(prod_graph, rules.DEPLOYMENT, _old_requests)
    (found,) = _stack_rule(rules.validate_gpu_hpa_max_within_pool_capacity, resources)
    assert "may scale to 200 pods" in found


# --------------------------------------------------------------------------- issue 17: pools and CI access


def test_a_gpu_pool_of_one_size_passes_across_families() -> None:
    one_size = spot_group(instanceTypes=["p5.48xlarge", "p5e.48xlarge", "p5en.48xlarge"])
    assert violations(rules.validate_gpu_pool_one_size, args_for(rules.NODE_GROUP, "hopper", one_size)) == []
    assert (
        violations(rules.validate_gpu_pool_one_size, args_for(rules.NODE_GROUP, "ampere", spot_group())) == []
    )


def test_a_spot_pool_with_unequal_sizes_fails_naming_each_size() -> None:
    mixed = spot_group(instanceTypes=["g6.xlarge", "g6e.xlarge"])  # same vCPUs, 16 vs 32 GiB
    (message,) = violations(rules.validate_gpu_pool_one_size, args_for(rules.NODE_GROUP, "ada", mixed))
    assert (
        "mixes node sizes: g6.xlarge (4 vCPU, 16 GiB, 1 GPU), g6e.xlarge (4 vCPU, 32 GiB, 1 GPU)" in message
    )


def test_a_gpu_type_missing_from_the_table_fails_the_size_rule() -> None:
    props = spot_group(instanceTypes=["g7.xlarge"])
    (message,) = violations(rules.validate_gpu_pool_one_size, args_for(rules.NODE_GROUP, "g7", props))
    assert "not in components/aws/gpu_instances.py" in message


def test_the_size_rule_reads_the_projects_gpu_table() -> None:
    from components.aws.gpu_instances import GPU_INSTANCE_TYPES

    assert rules.instance_sizes() == {name: t.node_size for name, t in GPU_INSTANCE_TYPES.items()}


def test_a_gpu_node_group_with_the_accelerator_label_passes() -> None:
    args = args_for(rules.NODE_GROUP, "ampere", spot_group())
    assert violations(rules.validate_gpu_accelerator_label, args) == []


def test_a_gpu_node_group_without_the_accelerator_label_fails() -> None:
    args = args_for(rules.NODE_GROUP, "ampere", spot_group(labels={"dualdeploy.io/gpu-arch": "sm_86"}))
    (message,) = violations(rules.validate_gpu_accelerator_label, args)
    assert "no k8s.amazonaws.com/accelerator label" in message


def test_a_cpu_node_group_needs_no_accelerator_label() -> None:
    props = spot_group(amiType="AL2023_x86_64_STANDARD", instanceTypes=["m6i.large"], labels={})
    assert violations(rules.validate_gpu_accelerator_label, args_for(rules.NODE_GROUP, "system", props)) == []


def access_resources(
    preview_policy: str = "AmazonEKSAdminViewPolicy",
) -> list[tuple[str, str, dict[str, Any]]]:
    """A cluster on API authentication with the deploy and preview entries, as the component makes them."""
    account = "arn:aws:iam::123456789012:role/"
    cluster = cluster_props(accessConfig={"authenticationMode": "API"})
    resources = [(rules.CLUSTER, "cluster-eks", cluster)]
    for kind, policy in (("deploy", "AmazonEKSClusterAdminPolicy"), ("preview", preview_policy)):
        principal = f"{account}dualdeploy-github-{kind}"
        resources.append(
            (
                rules.ACCESS_ENTRY,
                f"cluster-access-{kind}",
                {
                    "clusterName": cluster["name"],
                    "principalArn": principal,
                    "tags": {**TAGS, rules.ACCESS_TAG: kind},
                },
            )
        )
        resources.append(
            (
                rules.ACCESS_POLICY_ASSOCIATION,
                f"cluster-access-{kind}-policy",
                {
                    "clusterName": cluster["name"],
                    "principalArn": principal,
                    "policyArn": f"arn:aws:eks::aws:cluster-access-policy/{policy}",
                    "accessScope": {"type": "cluster"},
                },
            )
        )
    return resources


def as_stack(resources: list[tuple[str, str, dict[str, Any]]]) -> StackValidationArgs:
    policy_resources = []
    for typ, name, props in resources:
        single = args_for(typ, name, props)
        policy_resources.append(PolicyResource(typ, props, single.urn, name, single.opts, None, None, [], {}))
    return StackValidationArgs(policy_resources)


def test_a_cluster_with_access_entries_for_both_ci_roles_passes() -> None:
    assert violations(rules.validate_ci_access_entries, as_stack(access_resources())) == []


def test_a_cluster_with_no_access_entry_for_the_ci_roles_fails() -> None:
    bare = [r for r in access_resources() if r[0] == rules.CLUSTER]
    found = violations(rules.validate_ci_access_entries, as_stack(bare))
    assert len(found) == 2
    assert "no access entry for the CI deploy role" in found[0]
    assert "no access entry for the CI preview role" in found[1]


def test_a_preview_role_that_may_write_fails_least_privilege() -> None:
    found = violations(rules.validate_ci_access_entries, as_stack(access_resources("AmazonEKSEditPolicy")))
    assert found == [
        "EKS cluster 'dualdeploy-cloud-prod': the preview role has ['AmazonEKSEditPolicy']; a preview only "
        "reads (least privilege: one of AmazonEKSViewPolicy, AmazonEKSAdminViewPolicy)"
    ]


def test_an_entry_without_an_access_policy_fails() -> None:
    no_policy = [r for r in access_resources() if r[1] != "cluster-access-deploy-policy"]
    (message,) = violations(rules.validate_ci_access_entries, as_stack(no_policy))
    assert "the deploy role's access entry has no access policy" in message


def test_a_cluster_on_the_aws_auth_config_map_is_not_this_rules_business() -> None:
    cluster = cluster_props(accessConfig={"authenticationMode": "CONFIG_MAP"})
    assert violations(rules.validate_ci_access_entries, as_stack([(rules.CLUSTER, "c", cluster)])) == []


def test_cloud_prod_program_passes_the_access_rule_and_fails_without_its_entries(
    prod_graph: dict[str, Any],
) -> None:
    args = graph_stack_args(prod_graph["resources"])
    assert violations(rules.validate_ci_access_entries, args) == []
    without = [r for r in prod_graph["resources"] if r["type"] != rules.ACCESS_ENTRY]
    assert len(violations(rules.validate_ci_access_entries, graph_stack_args(without))) == 2


def test_cloud_prod_program_would_fail_if_a_pool_mixed_sizes_or_lost_its_label(
    prod_graph: dict[str, Any],
) -> None:
    (group,) = [r for r in prod_graph["resources"] if r["name"] == "cluster-gpu-spot-ampere"]
    mixed = {**copy.deepcopy(group["inputs"]), "instanceTypes": ["g5.xlarge", "g5.2xlarge"]}
    assert violations(rules.validate_gpu_pool_one_size, args_for(rules.NODE_GROUP, group["name"], mixed))
    unlabelled = copy.deepcopy(group["inputs"])
    del unlabelled["labels"]["k8s.amazonaws.com/accelerator"]
    assert violations(
        rules.validate_gpu_accelerator_label, args_for(rules.NODE_GROUP, group["name"], unlabelled)
    )
