"""The pod spec against the real server and its image: what the Deployment assumes, serving provides.

The Deployment configures the server only through ``DUALDEPLOY_*`` variables, probes two health
paths, lets the HPA read one gauge, and runs as one uid on a bundle at one path. Each of those
facts is checked here against ``serving/`` itself (its argument parser, routes, metrics) and
``serving/Dockerfile``, so a change on either side fails a test instead of a rollout.
"""

from __future__ import annotations

import os
import re
from typing import Any

import pytest
from cloud_harness import REPO_ROOT

from components import k8s_specs
from components.model_service import ModelServiceArgs

DOCKERFILE = REPO_ROOT / "serving" / "Dockerfile"


def deployment_container(**arg_fields: Any) -> dict[str, Any]:
    args = ModelServiceArgs(
        name="demo",
        image="123456789012.dkr.ecr.us-east-1.amazonaws.com/dualdeploy/demo@sha256:" + "ab" * 32,
        bundle_version="0123456789ab",
        pool_arches=["sm_86"],
        engine_arches=["sm_86"],
        **arg_fields,
    )
    (container,) = k8s_specs.deployment(args)["spec"]["template"]["spec"]["containers"]
    return dict(container)


def test_the_servers_own_parser_reads_the_deployments_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from serving import server

    container = deployment_container(drain_seconds=40, port=9000)
    for name in [n for n in os.environ if n.startswith("DUALDEPLOY_")]:
        monkeypatch.delenv(name)
    for item in container["env"]:
        monkeypatch.setenv(item["name"], item["value"])
    args = server.parser().parse_args([])
    assert str(args.bundle) == "/srv/bundle"
    assert (args.host, int(args.port)) == ("0.0.0.0", 9000)
    assert float(args.grace_period_s) == 40.0
    assert args.device_class == "nvidia_gpu"
    assert args.variant == "auto"
    assert container["command"] == ["python3", "-m", "serving"]


def test_every_variable_the_deployment_sets_is_one_the_server_reads() -> None:
    source = "\n".join(p.read_text() for p in (REPO_ROOT / "serving").glob("*.py"))
    read = set(re.findall(r'_env\("([A-Z_]+)"', source))
    for item in deployment_container()["env"]:
        assert item["name"].removeprefix("DUALDEPLOY_") in read, item["name"]


def test_probes_use_the_servers_unauthenticated_health_routes() -> None:
    from serving.app import OPEN_PATHS
    from serving.openapi import openapi_document

    container = deployment_container()
    paths = {container[p]["httpGet"]["path"] for p in ("startupProbe", "readinessProbe", "livenessProbe")}
    # Open paths stay reachable for the kubelet when the server requires a bearer token.
    assert paths == set(OPEN_PATHS)
    assert paths <= set(openapi_document("demo", "1")["paths"])


def test_the_hpa_metric_is_a_gauge_the_server_exports() -> None:
    from prometheus_client import generate_latest

    from serving.metrics import Metrics

    text = generate_latest(Metrics().registry).decode()
    assert f"# TYPE {k8s_specs.QUEUE_METRIC} gauge" in text


def dockerfile_runtime() -> str:
    text = DOCKERFILE.read_text()
    return text[text.index("AS runtime") :]


def test_the_image_runs_as_the_uid_the_pod_demands() -> None:
    runtime = dockerfile_runtime()
    (uid,) = re.findall(r"^ARG UID=(\d+)$", runtime, flags=re.M)
    assert int(uid) == k8s_specs.RUN_AS_USER
    assert re.search(r"^USER \$\{UID\}$", runtime, flags=re.M)


def test_the_image_bakes_the_bundle_where_the_pod_points() -> None:
    runtime = dockerfile_runtime()
    assert re.search(rf"^COPY \$\{{BUNDLE\}}/ {re.escape(k8s_specs.BUNDLE_PATH)}/$", runtime, flags=re.M)
    assert f"DUALDEPLOY_BUNDLE={k8s_specs.BUNDLE_PATH}" in runtime


def test_the_image_takes_the_build_arguments_model_image_passes() -> None:
    text = DOCKERFILE.read_text()
    declared = set(re.findall(r"^ARG ([A-Z_]+)", text, flags=re.M))
    assert {"BASE", "BUNDLE", "PUBLIC_KEY"} <= declared
    assert re.search(r"^FROM \S+ AS base-gpu$", text, flags=re.M)  # BASE=gpu names a stage


def test_the_read_only_root_leaves_the_server_a_writable_tmp() -> None:
    container = deployment_container()
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert {"name": "tmp", "mountPath": "/tmp"} in container["volumeMounts"]
