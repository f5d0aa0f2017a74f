"""The stack config: every stack file parses, and every invalid case names its key and the allowed values."""

from __future__ import annotations

import copy
import dataclasses
import importlib.metadata
import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from cloud_harness import REPO_ROOT, write_fixture_bundle
from pulumi.runtime import config as runtime_config

from components.aws.gpu_cluster import SUPPORTED_KUBERNETES_VERSIONS, capacity_types, gpu_facts
from components.aws.gpu_instances import GPU_INSTANCE_TYPES, UnknownInstanceType, lookup
from deploy.config import ConfigError, StackConfig, parse_stack_config, raw_from_stack_yaml
from deploy.pulumi_config import PINNED_PULUMI_VERSION, configured_names

STACKS = ("local", "cloud-dev", "cloud-prod", "edge-site", "hybrid")


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A project folder with fixture bundles (demo has sm_86 and sm_89 engines) and inventories."""
    root = tmp_path_factory.mktemp("project")
    write_fixture_bundle(root / "dist", "demo", ("sm_86", "sm_89"))
    write_fixture_bundle(root / "dist", "demo-distilled", teacher=("demo", "0123456789ab"))
    write_fixture_bundle(root / "dist", "plain")  # no engines at all
    for inventory in ("local", "example-site"):
        (root / "ansible" / "inventories" / inventory).mkdir(parents=True)
        (root / "ansible" / "inventories" / inventory / "hosts.yml").write_text("all: {}\n")
    return root


def cloud_raw() -> dict[str, Any]:
    """A valid cloud stack as a dict, to be broken one key at a time."""
    return {
        "environment": "dev",
        "tags": {"owner": "ml-platform"},
        "bundle": "dist/demo/latest",
        "requireEngines": True,
        "network": {"cidr": "10.20.0.0/16", "availabilityZones": ["us-west-2a", "us-west-2b"]},
        "cluster": {
            "kubernetesVersion": "1.33",
            "gpuPools": [  # one size a pool, three instance types across the Spot pools
                {"name": "ampere", "instanceTypes": ["g5.xlarge"], "maxSize": 2},
                {"name": "ampere-2x", "instanceTypes": ["g5.2xlarge"], "maxSize": 2},
                {"name": "ampere-4x", "instanceTypes": ["g5.4xlarge"], "maxSize": 2},
            ],
            "fallbackPool": {"instanceTypes": ["g5.xlarge"], "maxSize": 1},
            "devicePlugin": {"timeSlicingReplicas": 5},
        },
        "serving": {"minReplicas": 2, "maxReplicas": 10},
    }


def parse(
    raw: dict[str, Any], project: Path, stack: str = "test", region: str | None = "us-west-2"
) -> StackConfig:
    return parse_stack_config(raw, stack=stack, region=region, base_dir=project)


def error_for(raw: dict[str, Any], project: Path, **kwargs: Any) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        parse(raw, project, **kwargs)
    return info.value


def load_stack(name: str) -> tuple[dict[str, Any], str | None]:
    data = yaml.safe_load((REPO_ROOT / "stacks" / f"Pulumi.{name}.yaml").read_text())
    return raw_from_stack_yaml(data["config"])


# --------------------------------------------------------------------------- the GPU table


def test_gpu_table_covers_the_required_families() -> None:
    families = {t.family for t in GPU_INSTANCE_TYPES.values()}
    assert {"g4dn", "g5", "g6", "g6e", "p4d", "p5"} <= families


@pytest.mark.parametrize(
    ("name", "model", "arch", "gpus", "memory"),
    [
        ("g4dn.xlarge", "T4", "sm_75", 1, 16),
        ("g5.12xlarge", "A10G", "sm_86", 4, 24),
        ("g6.xlarge", "L4", "sm_89", 1, 24),
        ("g6e.48xlarge", "L40S", "sm_89", 8, 48),
        ("p4d.24xlarge", "A100", "sm_80", 8, 40),
        ("p5.48xlarge", "H100", "sm_90", 8, 80),
    ],
)
def test_gpu_table_entry_has_the_published_gpu(
    name: str, model: str, arch: str, gpus: int, memory: int
) -> None:
    entry = lookup(name)
    assert (entry.gpu_model, entry.gpu_arch, entry.gpus, entry.gpu_memory_gib) == (model, arch, gpus, memory)


def test_gpu_table_lookup_of_unknown_type_names_the_families() -> None:
    with pytest.raises(UnknownInstanceType, match="g4dn, g5, g6, g6e"):
        lookup("m5.large")


# --------------------------------------------------------------------------- the stack files


@pytest.mark.parametrize("stack", STACKS)
def test_stack_file_parses(stack: str, project: Path) -> None:
    raw, region = load_stack(stack)
    config = parse(raw, project, stack=stack, region=region)
    assert config.stack == stack
    assert config.cluster is not None or config.edge is not None


def test_local_stack_is_edge_only_on_this_machine(project: Path) -> None:
    raw, region = load_stack("local")
    config = parse(raw, project, stack="local", region=region)
    assert config.cluster is None and config.network is None
    assert config.edge is not None
    assert config.edge.inventory == "ansible/inventories/local"
    assert config.edge.playbook == "ansible/edge.yml"


def test_edge_site_stack_targets_the_example_site(project: Path) -> None:
    raw, region = load_stack("edge-site")
    config = parse(raw, project, stack="edge-site", region=region)
    assert config.cluster is None
    assert config.edge is not None and config.edge.inventory == "ansible/inventories/example-site"


def test_hybrid_stack_serves_the_large_model_in_the_cloud_and_the_distilled_one_at_the_edge(
    project: Path,
) -> None:
    raw, region = load_stack("hybrid")
    config = parse(raw, project, stack="hybrid", region=region)
    assert config.bundle is not None and config.bundle.path == "dist/demo/latest"
    assert config.edge is not None and config.edge.bundle_dir == "dist/demo-distilled/latest"
    assert config.cluster is not None
    # The edge devices escalate to this stack's teacher: HTTPS and tokens on allocated addresses.
    assert config.escalation == "low_confidence"
    assert config.service is not None and config.service.authenticated and config.service.static_ingress
    assert config.network is not None and config.network.ingress_addresses
    assert config.service.load_balancer_source_ranges == ("203.0.113.0/24",)


def test_cloud_stacks_without_escalation_serve_plain_in_the_cluster(project: Path) -> None:
    config = parse(cloud_raw(), project)
    assert config.escalation == "never"
    assert config.service is not None and not config.service.authenticated
    assert config.network is not None and not config.network.ingress_addresses


@pytest.mark.parametrize(
    ("serving", "says"),
    [
        ({"loadBalancer": "internet-facing", "loadBalancerSourceRanges": ["10.0.0.300/8"]}, "is not a CIDR"),
        ({"loadBalancerSourceRanges": ["203.0.113.0/24"]}, "only a load balancer has source ranges"),
    ],
)
def test_bad_load_balancer_source_ranges_name_the_key(
    project: Path, serving: dict[str, Any], says: str
) -> None:
    raw = cloud_raw()
    raw["serving"] = {**raw["serving"], **serving}
    error = error_for(raw, project)
    assert error.key == "dualdeploy:serving.loadBalancerSourceRanges" and says in str(error)


@pytest.mark.parametrize("grpc_port", [8000, 80, 70000, -1])
def test_a_grpc_port_that_is_not_a_port_of_its_own_names_the_key(project: Path, grpc_port: int) -> None:
    raw = cloud_raw()
    raw["serving"] = {**raw["serving"], "grpcPort": grpc_port}
    error = error_for(raw, project)
    assert error.key == "dualdeploy:serving.grpcPort"


def test_grpc_port_zero_serves_no_grpc(project: Path) -> None:
    raw = cloud_raw()
    raw["serving"] = {**raw["serving"], "grpcPort": 0}
    config = parse(raw, project)
    assert config.service is not None and config.service.grpc_port == 0


def test_an_escalation_outside_never_and_low_confidence_names_the_key(project: Path) -> None:
    raw, region = load_stack("hybrid")
    raw["edge"] = {**raw["edge"], "escalation": "always"}
    error = error_for(raw, project, stack="hybrid", region=region)
    assert error.key == "dualdeploy:edge.escalation" and "low_confidence" in str(error)


def test_escalation_without_source_ranges_warns_that_the_teacher_is_open(project: Path) -> None:
    raw, region = load_stack("hybrid")
    raw["serving"] = {k: v for k, v in raw["serving"].items() if k != "loadBalancerSourceRanges"}
    config = parse(raw, project, stack="hybrid", region=region)
    assert any("loadBalancerSourceRanges is not set" in w for w in config.warnings)


def test_cloud_dev_is_small_with_one_size_a_spot_pool_and_the_article_hpa(project: Path) -> None:
    raw, region = load_stack("cloud-dev")
    config = parse(raw, project, stack="cloud-dev", region=region)
    assert config.cluster is not None and config.service is not None
    # One architecture, one size a pool (g5.xlarge, g5.2xlarge, g5.4xlarge), no on-demand fallback.
    assert [p.instance_types for p in config.cluster.gpu_pools] == [
        ["g5.xlarge"],
        ["g5.2xlarge"],
        ["g5.4xlarge"],
    ]
    assert config.cluster.fallback_pool is None
    assert set(capacity_types(config.cluster).values()) == {"SPOT"}
    assert (config.service.min_replicas, config.service.max_replicas) == (2, 10)
    assert config.service.target_cpu_utilization == 70


def test_cloud_prod_has_zones_diversified_spot_a_fallback_and_the_peak_profile(project: Path) -> None:
    raw, region = load_stack("cloud-prod")
    config = parse(raw, project, stack="cloud-prod", region=region)
    assert config.network is not None and len(config.network.availability_zones) >= 3
    assert config.cluster is not None and config.service is not None
    assert len(config.cluster.gpu_pools) >= 2
    assert len({gpu_facts(p).gpu_arch for p in config.cluster.gpu_pools}) >= 2
    assert config.cluster.fallback_pool is not None
    capacity = capacity_types(config.cluster)
    assert capacity[config.cluster.fallback_pool.name] == "ON_DEMAND"
    assert [capacity[p.name] for p in config.cluster.gpu_pools] == ["SPOT"] * len(config.cluster.gpu_pools)
    assert (config.service.min_replicas, config.service.max_replicas) == (20, 200)
    assert config.require_engines is True
    assert config.cluster.endpoint_public_access is False


def test_cloud_prod_refuses_a_bundle_without_engines(project: Path) -> None:
    raw, region = load_stack("cloud-prod")
    raw["bundle"] = "dist/plain/latest"
    error = error_for(raw, project, stack="cloud-prod", region=region)
    assert error.key == "dualdeploy:cluster.gpuPools[0].instanceTypes"
    assert "no TensorRT engine" in str(error) and "requireEngines false" in str(error)


def test_pulumi_json_strings_parse_like_yaml_values(project: Path) -> None:
    raw = cloud_raw()
    as_pulumi = {k: v if isinstance(v, str) else json.dumps(v) for k, v in raw.items()}
    assert parse(as_pulumi, project) == parse(raw, project)


def test_config_is_frozen(project: Path) -> None:
    config = parse(cloud_raw(), project)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.environment = "prod"  # type: ignore[misc]


def test_default_tags_name_the_stack(project: Path) -> None:
    config = parse(cloud_raw(), project, stack="cloud-dev")
    assert config.tags["dualdeploy:stack"] == "cloud-dev"
    assert config.tags["managed-by"] == "pulumi"
    assert config.tags["owner"] == "ml-platform"


# --------------------------------------------------------------------------- invalid cases


def test_min_replicas_above_max_is_rejected(project: Path) -> None:
    raw = cloud_raw()
    raw["serving"] = {"minReplicas": 12, "maxReplicas": 10}
    error = error_for(raw, project)
    assert error.key == "dualdeploy:serving.minReplicas"
    assert "12 is above maxReplicas 10" in str(error)


def test_pool_min_size_above_max_is_rejected(project: Path) -> None:
    raw = cloud_raw()
    raw["cluster"]["gpuPools"][0].update(minSize=3, maxSize=2)
    error = error_for(raw, project)
    assert error.key == "dualdeploy:cluster.gpuPools[0].minSize"
    assert "minSize ≤ maxSize" in str(error)


def test_pool_mixing_gpu_architectures_is_rejected(project: Path) -> None:
    raw = cloud_raw()
    raw["cluster"]["gpuPools"][0]["instanceTypes"] = ["g5.xlarge", "g5.2xlarge", "g6.xlarge"]
    error = error_for(raw, project)
    assert error.key == "dualdeploy:cluster.gpuPools[0].instanceTypes"
    assert "mixes GPU architectures ['sm_86', 'sm_89']" in str(error)
    assert "g6.xlarge (L4, sm_89)" in str(error)


def test_pool_mixing_gpu_counts_is_rejected(project: Path) -> None:
    raw = cloud_raw()
    raw["cluster"]["gpuPools"][0]["instanceTypes"] = ["g5.xlarge", "g5.2xlarge", "g5.12xlarge"]
    error = error_for(raw, project)
    assert error.key == "dualdeploy:cluster.gpuPools[0].instanceTypes"
    assert "mixes GPUs per node [1, 4]" in str(error)


def test_instance_type_missing_from_the_table_is_rejected_with_a_suggestion(project: Path) -> None:
    raw = cloud_raw()
    raw["cluster"]["gpuPools"][0]["instanceTypes"] = ["g5.xlarge", "g5.2xlarge", "g5.4xlargee"]
    error = error_for(raw, project)
    assert error.key == "dualdeploy:cluster.gpuPools[0].instanceTypes"
    assert "'g5.4xlargee' is not in the GPU instance table" in str(error)
    assert "did you mean 'g5.4xlarge'" in str(error)
    assert "known families: g4dn, g5, g6, g6e, p4d" in str(error)


def test_spot_pools_spanning_fewer_than_three_types_are_rejected(project: Path) -> None:
    raw = cloud_raw()
    del raw["cluster"]["gpuPools"][2]
    error = error_for(raw, project)
    assert error.key == "dualdeploy:cluster.gpuPools"
    assert "list 2 instance types ['g5.2xlarge', 'g5.xlarge']; at least 3" in str(error)


@pytest.mark.parametrize(
    ("types", "shown"),
    [
        (["g5.xlarge", "g5.2xlarge", "g5.4xlarge"], "g5.2xlarge (8 vCPU, 32 GiB, 1 GPU)"),
        (["g6.xlarge", "g6e.xlarge"], "g6e.xlarge (4 vCPU, 32 GiB, 1 GPU)"),  # same vCPUs, not memory
    ],
)
def test_a_pool_mixing_node_sizes_is_rejected_showing_each_size(
    project: Path, types: list[str], shown: str
) -> None:
    raw = cloud_raw()
    raw["requireEngines"] = False
    raw["cluster"]["gpuPools"][0]["instanceTypes"] = types
    error = error_for(raw, project)
    assert error.key == "dualdeploy:cluster.gpuPools[0].instanceTypes"
    assert "mixes node sizes" in str(error) and shown in str(error)
    assert "put each size in its own pool" in str(error)


def test_a_fallback_pool_mixing_node_sizes_is_rejected(project: Path) -> None:
    raw = cloud_raw()
    raw["cluster"]["fallbackPool"]["instanceTypes"] = ["g5.xlarge", "g5.2xlarge"]
    error = error_for(raw, project)
    assert error.key == "dualdeploy:cluster.fallbackPool.instanceTypes"
    assert "mixes node sizes" in str(error)


def test_one_size_of_several_families_is_one_pool(project: Path) -> None:
    raw = cloud_raw()
    raw["requireEngines"] = False
    raw["cluster"]["gpuPools"] = [
        {"name": "hopper", "instanceTypes": ["p5.48xlarge", "p5e.48xlarge", "p5en.48xlarge"], "maxSize": 1}
    ]
    cluster = parse(raw, project).cluster
    assert cluster is not None and cluster.gpu_pools[0].instance_types == [
        "p5.48xlarge",
        "p5e.48xlarge",
        "p5en.48xlarge",
    ]


def test_access_roles_default_to_the_ci_roles_and_are_checked(project: Path) -> None:
    cluster = parse(cloud_raw(), project).cluster
    assert cluster is not None
    assert (cluster.deploy_role_name, cluster.preview_role_name, list(cluster.admin_role_names)) == (
        "dualdeploy-github-deploy",
        "dualdeploy-github-preview",
        [],
    )
    raw = cloud_raw()
    raw["cluster"]["access"] = {"previewRole": "arn:aws:iam::123456789012:role/ci"}
    error = error_for(raw, project)
    assert error.key == "dualdeploy:cluster.access.previewRole" and "not an IAM role name" in str(error)
    raw["cluster"]["access"] = {"previewRole": "ci", "deployRole": "ci"}
    assert "the preview role must differ" in str(error_for(raw, project))


def test_autoscaler_chart_must_ship_the_clusters_minor(project: Path) -> None:
    raw = cloud_raw()
    raw["cluster"]["autoscaler"] = {"chartVersion": "9.46.6"}
    error = error_for(raw, project)
    assert error.key == "dualdeploy:cluster.autoscaler.chartVersion"
    assert "not the chart of cluster-autoscaler v1.33.0" in str(error) and "use 9.50.1" in str(error)
    raw["cluster"]["kubernetesVersion"] = "1.32"
    cluster = parse(raw, project).cluster
    assert cluster is not None
    assert (cluster.autoscaler_chart_version, cluster.autoscaler_image_tag) == ("9.46.6", "v1.32.0")


def test_a_public_key_that_did_not_sign_the_bundle_is_rejected(project: Path, tmp_path: Path) -> None:
    from contract.bundle import generate_key

    generate_key(project / ".keys" / "other-ed25519.pem")
    raw = cloud_raw()
    raw["serving"] = {"minReplicas": 2, "maxReplicas": 10, "publicKey": ".keys/other-ed25519.pub"}
    error = error_for(raw, project)
    assert error.key == "dualdeploy:serving.publicKey"
    assert "does not verify with other-ed25519.pub" in str(error)


def test_a_missing_development_key_warns_and_the_image_stops_the_program(tmp_path: Path) -> None:
    write_fixture_bundle(tmp_path / "dist", "demo", ("sm_86", "sm_89"))
    (tmp_path / ".keys" / "dev-ed25519.pub").unlink()  # as in CI: signed with the release key
    stack = parse(cloud_raw(), tmp_path)
    assert any("does not exist; the image build will stop" in w for w in stack.warnings)


def test_unsupported_kubernetes_version_lists_the_supported_ones(project: Path) -> None:
    raw = cloud_raw()
    raw["cluster"]["kubernetesVersion"] = "1.27"
    error = error_for(raw, project)
    assert error.key == "dualdeploy:cluster.kubernetesVersion"
    assert f"allowed: {', '.join(SUPPORTED_KUBERNETES_VERSIONS)}" in str(error)


def test_unquoted_kubernetes_version_gets_a_yaml_hint(project: Path) -> None:
    raw = cloud_raw()
    raw["cluster"]["kubernetesVersion"] = 1.30
    error = error_for(raw, project)
    assert "'1.3' is not supported" in str(error) and "quote it" in str(error)


def test_bundle_path_without_a_manifest_is_rejected(project: Path, tmp_path: Path) -> None:
    (tmp_path / "dist" / "empty").mkdir(parents=True)
    raw = cloud_raw()
    raw["bundle"] = str(tmp_path / "dist" / "empty")
    error = error_for(raw, project)
    assert error.key == "dualdeploy:bundle"
    assert "manifest.json: missing" in str(error)


def test_bundle_path_that_does_not_exist_says_how_to_build_it(project: Path) -> None:
    raw = cloud_raw()
    raw["bundle"] = "dist/nothing/latest"
    error = error_for(raw, project)
    assert error.key == "dualdeploy:bundle"
    assert "make build" in str(error)


def test_pool_arch_without_engine_is_rejected_when_engines_are_required(project: Path) -> None:
    raw = cloud_raw()
    raw["cluster"]["gpuPools"][0]["instanceTypes"] = ["g4dn.xlarge"]
    error = error_for(raw, project)
    assert error.key == "dualdeploy:cluster.gpuPools[0].instanceTypes"
    assert "runs sm_75" in str(error) and "engines: sm_86, sm_89" in str(error)


def test_fallback_arch_without_engine_is_rejected_when_engines_are_required(project: Path) -> None:
    raw = cloud_raw()
    raw["cluster"]["fallbackPool"]["instanceTypes"] = ["p5.48xlarge"]
    error = error_for(raw, project)
    assert error.key == "dualdeploy:cluster.fallbackPool.instanceTypes"


def test_pool_arch_without_engine_only_warns_when_engines_are_optional(project: Path) -> None:
    raw = cloud_raw()
    raw["requireEngines"] = False
    raw["bundle"] = "dist/plain/latest"
    config = parse(raw, project)
    assert config.require_engines is False
    assert any("'ampere' (sm_86) has no TensorRT engine" in w for w in config.warnings)


def test_pool_arch_with_an_engine_gives_no_warning(project: Path) -> None:
    config = parse(cloud_raw(), project)
    assert config.bundle is not None and config.bundle.engine_arches == frozenset({"sm_86", "sm_89"})
    assert config.warnings == ()


def test_fallback_must_scale_from_zero(project: Path) -> None:
    raw = cloud_raw()
    raw["cluster"]["fallbackPool"]["minSize"] = 1
    error = error_for(raw, project)
    assert error.key == "dualdeploy:cluster.fallbackPool.minSize"


def test_unknown_key_is_named_with_a_suggestion(project: Path) -> None:
    raw = cloud_raw()
    raw["cluster"]["gpuPool"] = raw["cluster"].pop("gpuPools")
    error = error_for(raw, project)
    assert error.key == "dualdeploy:cluster.gpuPool"
    assert "did you mean 'gpuPools'" in str(error)


def test_unknown_top_level_key_is_named(project: Path) -> None:
    raw = cloud_raw()
    raw["requireEngine"] = True
    error = error_for(raw, project)
    assert error.key == "dualdeploy:requireEngine"
    assert "did you mean 'requireEngines'" in str(error)


def test_environment_must_be_one_of_the_allowed(project: Path) -> None:
    raw = cloud_raw()
    raw["environment"] = "production"
    error = error_for(raw, project)
    assert error.key == "dualdeploy:environment"
    assert "dev, staging, prod" in str(error)


def test_public_endpoint_without_allow_list_is_rejected(project: Path) -> None:
    raw = cloud_raw()
    raw["cluster"]["endpoint"] = {"publicAccess": True}
    error = error_for(raw, project)
    assert error.key == "dualdeploy:cluster.endpoint.publicAccessCidrs"


def test_prod_endpoint_open_to_the_internet_is_rejected(project: Path) -> None:
    raw = cloud_raw()
    raw["environment"] = "prod"
    raw["cluster"]["endpoint"] = {"publicAccess": True, "publicAccessCidrs": ["0.0.0.0/0"]}
    error = error_for(raw, project)
    assert "opens the API of a prod stack" in str(error)


def test_zone_outside_the_region_is_rejected(project: Path) -> None:
    raw = cloud_raw()
    raw["network"]["availabilityZones"] = ["us-west-2a", "us-east-1b"]
    error = error_for(raw, project)
    assert error.key == "dualdeploy:network.availabilityZones"
    assert "not a zone of region us-west-2" in str(error)


def test_a_single_zone_is_rejected(project: Path) -> None:
    raw = cloud_raw()
    raw["network"]["availabilityZones"] = ["us-west-2a"]
    error = error_for(raw, project)
    assert "at least 2 availability zones" in str(error)


def test_replicas_that_cannot_fit_the_pools_are_rejected(project: Path) -> None:
    raw = cloud_raw()
    raw["serving"] = {"minReplicas": 2, "maxReplicas": 100}
    error = error_for(raw, project)
    assert error.key == "dualdeploy:serving.maxReplicas"
    assert "at most 35" in str(error)  # (3 x 2 spot + 1 fallback) nodes x 1 GPU x 5


def test_cloud_part_needs_a_region(project: Path) -> None:
    error = error_for(cloud_raw(), project, region=None)
    assert error.key == "aws:region"


def test_cloud_part_needs_all_its_sections(project: Path) -> None:
    raw = cloud_raw()
    del raw["serving"]
    error = error_for(raw, project)
    assert error.key == "dualdeploy:serving"


def test_autoscaler_image_must_match_the_cluster_minor(project: Path) -> None:
    raw = cloud_raw()
    raw["cluster"]["autoscaler"] = {"imageTag": "v1.30.2"}
    error = error_for(raw, project)
    assert error.key == "dualdeploy:cluster.autoscaler.imageTag"


def test_edge_inventory_must_exist(project: Path) -> None:
    raw = {
        "environment": "dev",
        "edge": {"inventory": "ansible/inventories/nowhere", "bundle": "dist/demo/latest"},
    }
    error = error_for(raw, project, region=None)
    assert error.key == "dualdeploy:edge.inventory"


def test_edge_bundle_without_manifest_is_rejected(project: Path) -> None:
    raw = {"environment": "dev", "edge": {"inventory": "ansible/inventories/local", "bundle": "ansible"}}
    error = error_for(raw, project, region=None)
    assert error.key == "dualdeploy:edge.bundle"


def test_edge_defaults(project: Path) -> None:
    raw = {
        "environment": "dev",
        "edge": {"inventory": "ansible/inventories/local", "bundle": "dist/demo/latest"},
    }
    edge = parse(raw, project, region=None).edge
    assert edge is not None
    assert (edge.playbook, edge.public_key, edge.limit) == ("ansible/edge.yml", None, None)


def test_a_stack_with_neither_part_is_rejected(project: Path) -> None:
    error = error_for({"environment": "dev"}, project, region=None)
    assert "neither a cloud part" in str(error)


def test_stack_dicts_are_not_mutated_by_parsing(project: Path) -> None:
    raw = cloud_raw()
    before = copy.deepcopy(raw)
    parse(raw, project)
    assert raw == before


def test_queue_depth_metric_without_prometheus_adapter_is_rejected(project: Path) -> None:
    raw = cloud_raw()
    raw["serving"] = {"minReplicas": 2, "maxReplicas": 10, "queueDepthTarget": 4}
    error = error_for(raw, project)
    assert error.key == "dualdeploy:serving.queueDepthTarget"
    assert "prometheusAdapter true" in str(error)


def test_drain_longer_than_the_spot_notice_allows_is_rejected(project: Path) -> None:
    raw = cloud_raw()
    raw["serving"] = {"minReplicas": 2, "maxReplicas": 10, "drainSeconds": 110}
    error = error_for(raw, project)
    assert error.key == "dualdeploy:serving.drainSeconds"
    assert "two-minute Spot notice" in str(error)


def test_memory_quantity_is_checked(project: Path) -> None:
    raw = cloud_raw()
    raw["serving"] = {"minReplicas": 2, "maxReplicas": 10, "memory": "8GB"}
    error = error_for(raw, project)
    assert error.key == "dualdeploy:serving.memory"


def test_load_balancer_choices_are_listed(project: Path) -> None:
    raw = cloud_raw()
    raw["serving"] = {"minReplicas": 2, "maxReplicas": 10, "loadBalancer": "public"}
    error = error_for(raw, project)
    assert "none, internal, internet-facing" in str(error)


def test_cloud_prod_scales_on_queue_depth_through_the_adapter(project: Path) -> None:
    raw, region = load_stack("cloud-prod")
    serving = parse(raw, project, stack="cloud-prod", region=region).service
    assert serving is not None
    assert serving.queue_depth_target == 4 and serving.prometheus_adapter
    assert serving.load_balancer == "internal" and serving.pre_pull


def test_node_group_names_must_fit_eks_limit(project: Path) -> None:
    raw = cloud_raw()
    raw["cluster"]["name"] = "a-very-long-cluster-name-for-testing-x"  # 38 characters, the most allowed
    raw["cluster"]["fallbackPool"]["name"] = "ondemand-fallback-gp"
    error = error_for(raw, project)
    assert error.key == "dualdeploy:cluster.fallbackPool.name"
    assert "EKS allows 63" in str(error)


def test_prometheus_url_without_the_adapter_is_rejected(project: Path) -> None:
    raw = cloud_raw()
    raw["serving"] = {"minReplicas": 2, "maxReplicas": 10, "prometheusUrl": "http://prom.monitoring.svc:9090"}
    error = error_for(raw, project)
    assert error.key == "dualdeploy:serving.prometheusUrl"
    assert "prometheusAdapter true" in str(error)


def test_prometheus_url_must_be_http(project: Path) -> None:
    raw = cloud_raw()
    raw["serving"] = {
        "minReplicas": 2,
        "maxReplicas": 10,
        "prometheusAdapter": True,
        "prometheusUrl": "prom:9090",
    }
    assert error_for(raw, project).key == "dualdeploy:serving.prometheusUrl"


def test_keep_images_must_be_positive(project: Path) -> None:
    raw = cloud_raw()
    raw["serving"] = {"minReplicas": 2, "maxReplicas": 10, "keepImages": 0}
    error = error_for(raw, project)
    assert error.key == "dualdeploy:serving.keepImages" and "≥ 1" in str(error)


def test_image_public_key_must_exist_inside_the_project(project: Path, tmp_path: Path) -> None:
    raw = cloud_raw()
    raw["serving"] = {"minReplicas": 2, "maxReplicas": 10, "publicKey": ".keys/missing.pub"}
    assert "does not exist" in str(error_for(raw, project))
    outside = tmp_path / "release.pub"
    outside.write_text("key")
    raw["serving"]["publicKey"] = str(outside)
    error = error_for(raw, project)
    assert error.key == "dualdeploy:serving.publicKey" and "inside the project" in str(error)
    raw["serving"]["publicKey"] = ".keys/dev-ed25519.pub"
    image = parse(raw, project).image
    assert image is not None and image.public_key == project / ".keys/dev-ed25519.pub"


def test_a_prod_stack_without_an_image_key_warns_about_the_dev_key(project: Path) -> None:
    raw = cloud_raw()
    raw["environment"] = "prod"
    raw["cluster"]["endpoint"] = {"publicAccess": False}
    assert any("image trusts the development key" in w for w in parse(raw, project).warnings)
    raw["serving"] = {"minReplicas": 2, "maxReplicas": 10, "publicKey": ".keys/dev-ed25519.pub"}
    assert not any("development key" in w for w in parse(raw, project).warnings)


# --------------------------------------------------------------------------- the private Pulumi read


def test_configured_names_lists_every_key_of_the_namespace_on_the_pinned_pulumi(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """It reads pulumi's private ``runtime.config.CONFIG``, so it is pinned to the SDK it was read on."""
    assert importlib.metadata.version("pulumi") == PINNED_PULUMI_VERSION, (
        "pulumi changed: check that deploy/pulumi_config.configured_names still lists the stack's keys "
        "(runtime.config.CONFIG and get_config_env), then update PINNED_PULUMI_VERSION"
    )
    before = dict(runtime_config.CONFIG.get())
    monkeypatch.setenv("PULUMI_CONFIG", json.dumps({"dualdeploy:fromEnv": "1", "aws:region": "us-west-2"}))
    runtime_config.set_all_config({"dualdeploy:requireEngine": "true", "other:key": "x"})
    try:
        assert configured_names("dualdeploy") == {"requireEngine", "fromEnv"}
    finally:
        runtime_config.set_all_config(before)


# --------------------------------------------------------------------------- capacity (issue 17, item 2)


def test_an_xlarge_node_has_the_eks_allocatable_cpu_and_memory() -> None:
    from components.aws.node_capacity import allocatable, cpu_millicores, memory_mib

    # 4 vCPU less 6 % + 1 % + 0.5 % + 0.5 % of a core; 16 GiB less 6 %, 11 MiB x 110 pods + 255, 100 MiB.
    assert allocatable("g5.xlarge").cpu_m == 3920
    assert allocatable("g5.xlarge").memory_mib == int(16 * 1024 * 0.94) - 1465 - 100
    assert (cpu_millicores("1.5"), cpu_millicores("700m"), memory_mib("8Gi")) == (1500, 700, 8192)


def test_pods_that_defeat_time_slicing_are_rejected_with_the_arithmetic(project: Path) -> None:
    raw = cloud_raw()
    raw["serving"] = {"minReplicas": 2, "maxReplicas": 10, "cpu": "2", "memory": "8Gi"}  # the old requests
    error = error_for(raw, project)
    assert error.key == "dualdeploy:serving.cpu"
    assert "pool 'ampere' offers 5 time-sliced GPU slots a node" in str(error)
    assert "g5.xlarge: CPU (3920m allocatable - 150m DaemonSets) / 2000m = 1" in str(error)
    assert "-> 1 pods per node" in str(error)


def test_memory_that_defeats_time_slicing_names_the_memory_key(project: Path) -> None:
    raw = cloud_raw()
    raw["serving"] = {"minReplicas": 2, "maxReplicas": 10, "memory": "4Gi"}
    error = error_for(raw, project)
    assert error.key == "dualdeploy:serving.memory"
    assert "/ 4096Mi = 3" in str(error)


def test_the_service_daemonsets_count_against_each_gpu_node(project: Path) -> None:
    raw = cloud_raw()
    # 760m fits five a node beside EKS's 150m (3770m / 760m = 4.96 -> no), so it is refused.
    raw["serving"] = {"minReplicas": 2, "maxReplicas": 10, "cpu": "760m"}
    assert "150m DaemonSets) / 760m = 4" in str(error_for(raw, project))
    # 700m fits beside EKS's DaemonSets, the pre-pull holder and the DCGM exporter (310m with node-exporter).
    raw["serving"] = {"minReplicas": 2, "maxReplicas": 10, "prePull": True, "dcgmExporter": True}
    parse(raw, project)


def test_an_hpa_maximum_the_pools_cannot_hold_is_rejected_with_the_arithmetic(project: Path) -> None:
    raw = cloud_raw()
    cluster = parse(raw, project).cluster
    assert cluster is not None
    held = sum(pool.max_size * 5 for pool in cluster.all_gpu_pools)  # five pods fit each node
    raw["serving"] = {"minReplicas": 2, "maxReplicas": held + 1}
    error = error_for(raw, project)
    assert error.key == "dualdeploy:serving.maxReplicas"
    assert f"{held + 1} replicas cannot fit: the GPU pools hold at most {held}" in str(error)
    detail = " + ".join(f"{pool.name} {pool.max_size} × 5" for pool in cluster.all_gpu_pools)
    assert f"({detail}: maxSize × model pods per node)" in str(error)


@pytest.mark.parametrize("stack", ["cloud-dev", "cloud-prod", "hybrid"])
def test_each_cloud_stack_fits_five_pods_a_node_and_holds_its_hpa_maximum(stack: str, project: Path) -> None:
    from deploy.config import pool_fits

    raw, region = load_stack(stack)
    config = parse({**raw, "bundle": "dist/demo/latest"}, project, stack=stack, region=region)
    assert config.cluster is not None and config.service is not None
    fits = pool_fits(config.cluster, config.service)
    assert all(fit.pods == fit.gpu_slots == 5 for _, fit in fits)
    assert sum(pool.max_size * fit.pods for pool, fit in fits) >= config.service.max_replicas


def test_the_adapter_without_a_prometheus_to_query_is_rejected(project: Path) -> None:
    raw = cloud_raw()
    raw["serving"] = {"minReplicas": 2, "maxReplicas": 10, "queueDepthTarget": 4, "prometheusAdapter": True}
    error = error_for(raw, project)
    assert error.key == "dualdeploy:serving.prometheusAdapter"
    assert "prometheusOperator true" in str(error)
    raw["serving"]["prometheusOperator"] = True
    service = parse(raw, project).service
    assert service is not None and service.prometheus_url is None  # the installed stack's Prometheus
