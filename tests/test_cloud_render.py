"""``make render``: the rendered objects of each cloud stack, validated as a cluster would.

Each stack renders from a project with fixture bundles (``cloud-prod`` gets its required
sm_86/sm_89 engines). Every file must pass ``kubernetes-validate --strict`` at the stack's
Kubernetes version and ``checkov --framework kubernetes`` with only the skips listed, with
reasons, in ``deploy/checkov-skips.yaml``. What the objects say (GPU limits, probes, HPA, PDB,
spread, images by digest, hardening, monitoring) is tested once, on the program's graph, in
``tests/test_cloud_stacks.py``, which also proves the rendered files are exactly those objects.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from cloud_harness import REPO_ROOT, make_project

from components import k8s_specs
from deploy.render import RenderError, render

CLOUD_STACKS = ("cloud-dev", "cloud-prod", "hybrid")  # every stack with a cloud part
ENGINES = {"cloud-prod": ("sm_86", "sm_89")}
CHECKOV = REPO_ROOT / ".tools" / "checkov" / "bin" / "checkov"
CRD_KINDS = {"ServiceMonitor"}  # custom resources: kubernetes-validate ships no schema for them


def stack_config(stack: str) -> dict[str, Any]:
    config: dict[str, Any] = yaml.safe_load((REPO_ROOT / "stacks" / f"Pulumi.{stack}.yaml").read_text())[
        "config"
    ]
    return config


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folders: dict[str, Path] = {}
    for stack in CLOUD_STACKS:
        project = make_project(tmp_path_factory.mktemp(f"render-{stack}"), ENGINES.get(stack, ()))
        out = project / "build" / "manifests" / stack
        render(stack, out, project)
        folders[stack] = out
    return folders


def objects_of(folder: Path) -> list[dict[str, Any]]:
    return [yaml.safe_load(p.read_text()) for p in sorted(folder.glob("*.yaml"))]


@pytest.fixture(params=CLOUD_STACKS)
def stack(request: pytest.FixtureRequest) -> str:
    name: str = request.param
    return name


# --------------------------------------------------------------------------- validators


def test_every_object_passes_kubernetes_validate_strict(stack: str, rendered: dict[str, Path]) -> None:
    version = stack_config(stack)["dualdeploy:cluster"]["kubernetesVersion"]
    checked = 0
    for path in sorted(rendered[stack].glob("*.yaml")):
        data = yaml.safe_load(path.read_text())
        if data["kind"] in CRD_KINDS:
            continue
        kubernetes_validate.validate(data, f"{version}.0", strict=True)
        checked += 1
    assert checked >= 7


def test_strict_validation_rejects_an_unknown_field() -> None:
    """The control for the test above: strict mode really rejects what a typo would produce."""
    bad = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "x"}, "spec": {"prots": []}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, "1.33.0", strict=True)


def test_checkov_finds_no_failed_check(stack: str, rendered: dict[str, Path]) -> None:
    assert CHECKOV.is_file(), "checkov is not installed: run `make checkov` (it lives in .tools/checkov)"
    skips = yaml.safe_load((REPO_ROOT / "deploy" / "checkov-skips.yaml").read_text())["skips"] or []
    assert all(skip.get("reason") for skip in skips), "every checkov skip needs a reason"
    command = [str(CHECKOV), "-d", str(rendered[stack]), "--framework", "kubernetes", "--skip-download"]
    command += ["--output", "json", "--quiet"]
    if skips:
        command += ["--skip-check", ",".join(skip["id"] for skip in skips)]
    # No network: no update check against PyPI, no policy mapping download.
    env = {**os.environ, "CKV_SKIP_PACKAGE_UPDATE_CHECK": "true", "BC_SKIP_MAPPING": "TRUE"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False, env=env)
    report = json.loads(done.stdout)
    summary = report["summary"] if isinstance(report, dict) else report[0]["summary"]
    results = report["results"] if isinstance(report, dict) else report[0]["results"]
    failed = [f"{c['check_id']} {c['resource']}" for c in results.get("failed_checks", [])]
    assert failed == [], failed
    assert summary["passed"] > 50


# --------------------------------------------------------------------------- the renderer


def test_render_marks_the_placeholders(rendered: dict[str, Path]) -> None:
    deployment = k8s_specs.find(objects_of(rendered["cloud-dev"]), "Deployment")
    assert "image" in deployment["metadata"]["annotations"][k8s_specs.PLACEHOLDER_ANNOTATION]
    assert "placeholders" in (rendered["cloud-dev"] / "PLACEHOLDERS.txt").read_text()


def test_render_replaces_the_folder_whole(tmp_path: Path) -> None:
    project = make_project(tmp_path / "project")
    out = project / "build" / "manifests" / "cloud-dev"
    out.mkdir(parents=True)
    (out / "99-stale.yaml").write_text("kind: Stale\n")
    render("cloud-dev", out, project)
    assert not (out / "99-stale.yaml").exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]


def test_render_of_an_edge_only_stack_says_there_is_nothing_to_render(tmp_path: Path) -> None:
    project = make_project(tmp_path / "project")
    (project / "ansible" / "inventories" / "local").mkdir(parents=True, exist_ok=True)
    with pytest.raises(RenderError, match="no cloud part"):
        render("local", tmp_path / "out", project)
    assert not (tmp_path / "out").exists()


def test_render_of_prod_without_engines_renders_but_says_pulumi_up_would_stop(tmp_path: Path) -> None:
    project = make_project(tmp_path / "project")  # no engines
    command = [sys.executable, "-m", "deploy.render", "cloud-prod", "--project-dir", str(project)]
    command += ["--out", str(tmp_path / "out")]
    done = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert "`pulumi up` would stop here" in done.stdout
    deployment = k8s_specs.find(objects_of(tmp_path / "out"), "Deployment")
    assert "gpu-arches" in deployment["metadata"]["annotations"][k8s_specs.PLACEHOLDER_ANNOTATION]


def test_render_of_an_unknown_stack_lists_the_stacks(tmp_path: Path) -> None:
    with pytest.raises(RenderError, match="cloud-dev, cloud-prod"):
        render("cloud-staging", tmp_path / "out", tmp_path)
