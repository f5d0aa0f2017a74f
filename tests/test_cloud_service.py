"""ModelImage and ModelService as components, in this process, under ``pulumi.runtime.set_mocks``.

The whole-program tests (test_cloud_stacks.py) check what each stack creates; these check the
components' own contract: the ValueError each bad Args gets before any resource is registered,
the CUDA-fallback warning, the provider taken from ``opts``, and the image's tag and outputs.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pulumi
import pulumi_kubernetes as k8s
import pytest
from cloud_harness import REPO_ROOT, make_project, mock_outputs

from components import k8s_specs
from components.aws import model_image
from components.aws.model_image import ModelImage, ModelImageArgs, image_tag, lifecycle_policy, source_hash
from components.model_service import ModelService, ModelServiceArgs, prometheus_adapter_values, validate

REGION = "eu-west-1"
DIGEST = "123456789012.dkr.ecr.eu-west-1.amazonaws.com/dualdeploy/demo@sha256:" + "ab" * 32


class ComponentMocks(pulumi.runtime.Mocks):
    """Per-type realistic outputs (shared with the program harness), and a log of registrations."""

    def __init__(self) -> None:
        self.registered: list[tuple[str, str, dict[str, Any]]] = []
        self.providers: dict[str, str | None] = {}

    def new_resource(self, args: pulumi.runtime.MockResourceArgs) -> tuple[str, dict[str, Any]]:
        self.registered.append((args.typ, args.name, dict(args.inputs)))
        self.providers[args.name] = args.provider
        return mock_outputs(args.typ, args.name, dict(args.inputs), REGION)

    def call(self, args: pulumi.runtime.MockCallArgs) -> tuple[dict[str, Any], list[tuple[str, str]]]:
        if args.token == "aws:ecr/getAuthorizationToken:getAuthorizationToken":
            return {"userName": "AWS", "password": "unit-ecr-password", "proxyEndpoint": "https://x"}, []
        raise AssertionError(f"unexpected provider call {args.token}")


@pytest.fixture(autouse=True)
def mocks() -> Iterator[ComponentMocks]:
    """Fresh mocks for each test, installed when the test starts."""
    instance = ComponentMocks()
    pulumi.runtime.set_mocks(instance, project="dualdeploy", stack="unit", preview=False)
    yield instance


def service_args(**overrides: Any) -> ModelServiceArgs:
    fields: dict[str, Any] = {
        "name": "demo",
        "image": DIGEST,
        "bundle_version": "0123456789ab",
        "pool_arches": ["sm_86"],
        "engine_arches": ["sm_86"],
    }
    fields.update(overrides)
    return ModelServiceArgs(**fields)


# --------------------------------------------------------------------------- ModelService


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"min_replicas": 12, "max_replicas": 10}, "min_replicas: 12 must be between 1 and max_replicas"),
        ({"min_replicas": 0}, "min_replicas: 0 must be between 1"),
        (
            {"pool_arches": ["sm_86", "sm_89"]},
            "engine_arches: the service targets pools of sm_89 but the bundle has TensorRT engines only "
            "for sm_86",
        ),
        ({"engine_arches": []}, "engine_arches: .* engines only for none"),
        (
            {"queue_depth_target": 4},
            "queue_depth_target: the HPA can only read .* through prometheus-adapter",
        ),
        ({"pool_arches": []}, "pool_arches: the service needs at least one"),
        ({"drain_seconds": 110}, "drain_seconds: .* exceeds the 110 s"),
        ({"gpu_resource": "amd.com/gpu"}, "gpu_resource: 'amd.com/gpu' is not one of"),
        ({"load_balancer": "public"}, "load_balancer: 'public' is not one of"),
        ({"image": None}, r"image: required; pass the image by digest \(ModelImage.image_ref\)"),
        (
            {"queue_depth_target": 4, "prometheus_adapter": True},
            "prometheus_url: prometheus-adapter needs a Prometheus to query",
        ),
        ({"authenticated": True}, r"credentials: an authenticated service needs them"),
        (
            {"static_ingress": True, "eip_allocation_ids": ["eipalloc-1"], "load_balancer": "internal"},
            "static_ingress: needs load_balancer 'internet-facing' and eip_allocation_ids",
        ),
        (
            {"static_ingress": True, "load_balancer": "internet-facing"},
            "static_ingress: needs load_balancer 'internet-facing' and eip_allocation_ids",
        ),
        (
            {"load_balancer_source_ranges": ["203.0.113.0/24"]},
            "load_balancer_source_ranges: only a load balancer has source ranges",
        ),
    ],
)
def test_bad_service_args_raise_before_any_resource(
    overrides: dict[str, Any], message: str, mocks: ComponentMocks
) -> None:
    with pytest.raises(ValueError, match=message):
        ModelService("bad", service_args(**overrides))
    assert mocks.registered == []


def test_a_missing_engine_is_a_warning_when_the_cuda_fallback_is_allowed() -> None:
    (warning,) = validate(service_args(pool_arches=["sm_86", "sm_89"], allow_cuda_fallback=True))
    assert "no TensorRT engine for sm_89 (engines: sm_86)" in warning
    assert "ONNX variant through CUDA" in warning
    assert validate(service_args()) == []


def _k8s_provider() -> k8s.Provider:
    return k8s.Provider("cluster-k8s", kubeconfig=pulumi.Output.secret("{}"))


def test_every_object_is_created_with_the_provider_from_opts(mocks: ComponentMocks) -> None:
    ModelService(
        "svc",
        service_args(pre_pull=True, prometheus_operator=True, dcgm_exporter=True),
        opts=pulumi.ResourceOptions(provider=_k8s_provider()),
    )
    _wait()
    children = [(t, n) for t, n, _ in mocks.registered if t.startswith("kubernetes:")]
    assert {t for t, _ in children} >= {
        "kubernetes:core/v1:Namespace",
        "kubernetes:core/v1:ServiceAccount",
        "kubernetes:apps/v1:Deployment",
        "kubernetes:core/v1:Service",
        "kubernetes:autoscaling/v2:HorizontalPodAutoscaler",
        "kubernetes:policy/v1:PodDisruptionBudget",
        "kubernetes:networking.k8s.io/v1:NetworkPolicy",
        "kubernetes:monitoring.coreos.com/v1:ServiceMonitor",
        "kubernetes:apps/v1:DaemonSet",
        "kubernetes:helm.sh/v3:Release",
    }
    for _, name in children:
        # A component never builds a provider: every child uses the one passed in through opts.
        provider = mocks.providers[name]
        assert provider is not None and "pulumi:providers:kubernetes::cluster-k8s" in provider, name


def test_service_objects_carry_the_args(mocks: ComponentMocks) -> None:
    ModelService(
        "svc",
        service_args(
            min_replicas=3,
            max_replicas=7,
            queue_depth_target=5,
            prometheus_adapter=True,
            prometheus_operator=True,
        ),
        opts=pulumi.ResourceOptions(provider=_k8s_provider()),
    )
    _wait()
    by_type = {t: inputs for t, _, inputs in mocks.registered}
    hpa = by_type["kubernetes:autoscaling/v2:HorizontalPodAutoscaler"]["spec"]
    assert (hpa["minReplicas"], hpa["maxReplicas"]) == (3, 7)
    (pods,) = [m for m in hpa["metrics"] if m["type"] == "Pods"]
    assert pods["pods"]["target"]["averageValue"] == "5"
    releases = {i["chart"]: i for t, _, i in mocks.registered if t == "kubernetes:helm.sh/v3:Release"}
    # prometheus-adapter queries the Prometheus that the installed kube-prometheus-stack runs.
    assert releases["prometheus-adapter"]["values"]["prometheus"] == {
        "url": "http://kube-prometheus-stack-prometheus.monitoring.svc",
        "port": 9090,
        "path": "",
    }
    assert releases["kube-prometheus-stack"]["name"] == k8s_specs.PROMETHEUS_STACK_RELEASE
    assert (
        releases["kube-prometheus-stack"]["values"]["fullnameOverride"] == k8s_specs.PROMETHEUS_STACK_RELEASE
    )
    deployment = by_type["kubernetes:apps/v1:Deployment"]
    assert deployment["spec"]["template"]["spec"]["containers"][0]["image"] == DIGEST


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("http://prom.monitoring.svc:9091", {"url": "http://prom.monitoring.svc", "port": 9091, "path": ""}),
        ("http://prom.monitoring.svc", {"url": "http://prom.monitoring.svc", "port": 9090, "path": ""}),
        (
            "https://amp.example/workspaces/ws-1/",
            {"url": "https://amp.example", "port": 443, "path": "/workspaces/ws-1"},
        ),
    ],
)
def test_the_adapter_gets_the_prometheus_url_split_as_its_chart_joins_it(
    url: str, expected: dict[str, Any]
) -> None:
    args = service_args(queue_depth_target=4, prometheus_adapter=True, prometheus_url=url)
    assert prometheus_adapter_values(args)["prometheus"] == expected


def test_the_objects_derive_the_architectures_and_the_queue_metric_from_the_args() -> None:
    args = service_args(pool_arches=["sm_89", "sm_86", "sm_89"], engine_arches=["sm_86", "sm_89"])
    assert k8s_specs.gpu_arches(args) == ["sm_86", "sm_89"]
    assert k8s_specs.queue_metric(args) is None
    assert k8s_specs.queue_metric(service_args(queue_depth_target=4, prometheus_adapter=True)) == (
        k8s_specs.QUEUE_METRIC
    )
    with pytest.raises(ValueError, match="queue_metric: not set"):
        k8s_specs.prometheus_adapter_rules(args)


def test_a_service_monitor_exists_only_beside_the_installed_operator_and_carries_its_label(
    mocks: ComponentMocks,
) -> None:
    ModelService(
        "off", service_args(dcgm_exporter=True), opts=pulumi.ResourceOptions(provider=_k8s_provider())
    )
    _wait()
    types = [t for t, _, _ in mocks.registered]
    assert "kubernetes:monitoring.coreos.com/v1:ServiceMonitor" not in types
    (dcgm,) = [i for t, _, i in mocks.registered if t == "kubernetes:helm.sh/v3:Release"]
    assert dcgm["values"]["serviceMonitor"] == {"enabled": False}  # the chart's default is on

    mocks.registered.clear()
    ModelService(
        "on",
        service_args(dcgm_exporter=True, prometheus_operator=True),
        opts=pulumi.ResourceOptions(provider=_k8s_provider()),
    )
    _wait()
    (monitor,) = [
        i for t, _, i in mocks.registered if t == "kubernetes:monitoring.coreos.com/v1:ServiceMonitor"
    ]
    assert monitor["metadata"]["labels"]["release"] == k8s_specs.PROMETHEUS_STACK_RELEASE
    releases = {i["chart"]: i for t, _, i in mocks.registered if t == "kubernetes:helm.sh/v3:Release"}
    assert set(releases) == {"kube-prometheus-stack", "dcgm-exporter"}
    assert releases["dcgm-exporter"]["values"]["serviceMonitor"]["additionalLabels"] == {
        "release": k8s_specs.PROMETHEUS_STACK_RELEASE
    }


def _wait() -> None:
    """Let the mock monitor receive every pending registration."""
    from pulumi.runtime.stack import wait_for_rpcs
    from pulumi.runtime.sync_await import _sync_await

    _sync_await(wait_for_rpcs())


# --------------------------------------------------------------------------- ModelImage


@pytest.fixture
def project(tmp_path: Path) -> Path:
    return make_project(tmp_path / "project")


def image_args(project: Path, **overrides: Any) -> ModelImageArgs:
    fields: dict[str, Any] = {
        "repository_name": "dualdeploy/demo",
        "context_dir": project,
        "bundle_dir": (project / "dist" / "demo" / "latest").resolve(),
        "bundle_version": "0123456789ab",
        "tags": {"owner": "test"},
    }
    fields.update(overrides)
    return ModelImageArgs(**fields)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            {"repository_name": "Dualdeploy/Demo"},
            "repository_name: 'Dualdeploy/Demo' is not an ECR repository name",
        ),
        ({"bundle_version": "v1 beta"}, "bundle_version: 'v1 beta' cannot be part of an image tag"),
        ({"base": "rocm"}, "base: 'rocm' is not one of cpu, gpu"),
        ({"keep_images": 0}, "keep_images: must be ≥ 1"),
        ({"tensorrt_version": "latest"}, "tensorrt_version: 'latest' is not a release number"),
        ({"base": "cpu", "tensorrt_version": "10.9"}, "tensorrt_version: only the gpu base"),
        ({"bundle_dir": Path("/")}, "bundle_dir: / is outside the build context"),
        ({"public_key": Path("/etc/hostname")}, "public_key: /etc/hostname is outside the build context"),
    ],
)
def test_bad_image_args_raise_before_any_resource(
    project: Path, overrides: dict[str, Any], message: str, mocks: ComponentMocks
) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        ModelImage("bad", image_args(project, **overrides))
    assert mocks.registered == []


def test_a_context_without_the_dockerfile_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"context_dir: .* has no serving/Dockerfile"):
        model_image.validate(image_args(tmp_path, bundle_dir=tmp_path))


def test_a_bundle_folder_without_a_manifest_is_rejected(project: Path) -> None:
    (project / "dist" / "empty").mkdir()
    with pytest.raises(ValueError, match=r"bundle_dir: .* holds no manifest\.json"):
        model_image.validate(image_args(project, bundle_dir=project / "dist" / "empty"))


def test_the_tag_is_the_bundle_version_and_changes_with_the_servers_sources(tmp_path: Path) -> None:
    for name in model_image.IMAGE_SOURCES:
        source = REPO_ROOT / name
        target = tmp_path / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            for path in source.glob("*.py"):
                target.mkdir(exist_ok=True)
                (target / path.name).write_bytes(path.read_bytes())
        else:
            target.write_bytes(source.read_bytes())
    before = source_hash(tmp_path, "gpu")
    assert re.fullmatch(r"[0-9a-f]{12}", before)
    assert source_hash(tmp_path, "cpu") != before
    (tmp_path / "serving" / "__pycache__").mkdir()
    (tmp_path / "serving" / "__pycache__" / "app.cpython-311.pyc").write_bytes(b"cache")
    assert source_hash(tmp_path, "gpu") == before  # caches do not change the image
    (tmp_path / "serving" / "app.py").write_text("# changed\n")
    assert source_hash(tmp_path, "gpu") != before


def test_image_tag_starts_with_the_bundle_version(project: Path) -> None:
    assert re.fullmatch(r"0123456789ab-[0-9a-f]{12}", image_tag(image_args(project)))


def test_lifecycle_policy_keeps_the_newest_n() -> None:
    (rule,) = json.loads(lifecycle_policy(7))["rules"]
    assert rule["selection"] == {"tagStatus": "any", "countType": "imageCountMoreThan", "countNumber": 7}
    assert rule["action"] == {"type": "expire"}


@pulumi.runtime.test
def test_image_ref_is_the_pushed_digest(project: Path) -> pulumi.Output[Any]:
    image = ModelImage("img", image_args(project, public_key=project / ".keys" / "dev-ed25519.pub"))

    def check(values: list[Any]) -> None:
        ref, url = values
        assert url == f"123456789012.dkr.ecr.{REGION}.amazonaws.com/dualdeploy/demo"
        assert re.fullmatch(re.escape(url) + r"@sha256:[0-9a-f]{64}", ref)

    return pulumi.Output.all(image.image_ref, image.repository_url).apply(check)
