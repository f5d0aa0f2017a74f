"""The GitHub workflows for PR previews and deploys: schema-valid, and saying what they must.

They cannot run here (no GitHub runner, no AWS, no Pulumi CLI). ``check-jsonschema`` validates
each file against the GitHub workflow schema it vendors (offline), and the tests below read the
files for the promises the README makes: previews of every cloud stack on pull requests with a
PR comment and the policy pack, AWS through OIDC only, deploys from main with an approval
environment for prod.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from cloud_harness import REPO_ROOT

WORKFLOWS = REPO_ROOT / ".github" / "workflows"
CHECK_JSONSCHEMA = Path(sys.executable).parent / "check-jsonschema"


def cloud_stacks() -> list[str]:
    """Stacks with a cloud part: the ones a preview must cover."""
    stacks = []
    for path in sorted((REPO_ROOT / "stacks").glob("Pulumi.*.yaml")):
        config = yaml.safe_load(path.read_text())["config"]
        if "dualdeploy:cluster" in config and "dualdeploy:edge" not in config:
            stacks.append(path.name.removeprefix("Pulumi.").removesuffix(".yaml"))
    return stacks


def workflow(name: str) -> dict[Any, Any]:
    data: dict[Any, Any] = yaml.safe_load((WORKFLOWS / name).read_text())
    # YAML 1.1 reads the bare key `on` as True.
    data["on"] = data.pop(True, data.get("on"))
    return data


def steps_using(job: dict[str, Any], action: str) -> list[dict[str, Any]]:
    return [s for s in job["steps"] if str(s.get("uses", "")).split("@")[0] == action]


def pulumi_command(job: dict[str, Any]) -> dict[str, Any]:
    """The one pulumi/actions step that runs a command (the other only installs the CLI)."""
    (step,) = [s for s in steps_using(job, "pulumi/actions") if "command" in s.get("with", {})]
    return step


def signer_step(job: dict[str, Any]) -> dict[str, Any]:
    (step,) = [
        s for s in job["steps"] if str(s.get("name", "")).startswith("Point the stack at the bundle's signer")
    ]
    return step


def validate(*paths: Path) -> subprocess.CompletedProcess[str]:
    command = [str(CHECK_JSONSCHEMA), "--builtin-schema", "vendor.github-workflows", *map(str, paths)]
    return subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)


def test_every_workflow_is_valid_against_the_github_schema() -> None:
    files = sorted(WORKFLOWS.glob("*.yml"))
    assert {f.name for f in files} >= {"preview.yml", "deploy.yml", "prebuild.yml"}
    done = validate(*files)
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_schema_check_rejects_a_broken_workflow(tmp_path: Path) -> None:
    broken = workflow("preview.yml")
    broken["jobs"]["preview"]["runs-on"] = None
    broken["jobs"]["preview"]["strategy"]["fail-fast"] = "sometimes"
    path = tmp_path / "broken.yml"
    path.write_text(yaml.safe_dump(broken))
    done = validate(path)
    assert done.returncode != 0
    assert "broken.yml" in done.stdout + done.stderr


def test_preview_runs_on_pull_requests_for_every_cloud_stack() -> None:
    preview = workflow("preview.yml")
    assert "pull_request" in preview["on"]
    matrix = preview["jobs"]["preview"]["strategy"]["matrix"]["include"]
    assert sorted(m["stack"] for m in matrix) == sorted(cloud_stacks()) == ["cloud-dev", "cloud-prod"]


def test_preview_runs_after_the_prebuild_with_the_pulumi_action_and_comments() -> None:
    jobs = workflow("preview.yml")["jobs"]
    assert jobs["prebuild"]["uses"] == "./.github/workflows/prebuild.yml"
    job = jobs["preview"]
    assert job["needs"] == "prebuild"
    pulumi = pulumi_command(job)
    assert pulumi["with"]["command"] == "preview"
    assert pulumi["with"]["stack-name"] == "${{ matrix.stack }}"
    assert pulumi["with"]["comment-on-pr"] is True
    assert pulumi["with"]["policyPacks"] == "policy"
    assert job["permissions"]["pull-requests"] == "write"


@pytest.mark.parametrize(("name", "job"), [("preview.yml", "preview"), ("deploy.yml", "up")])
def test_aws_access_is_oidc_role_assumption_without_stored_keys(name: str, job: str) -> None:
    text = (WORKFLOWS / name).read_text()
    for stored in (
        "aws-access-key-id",
        "aws-secret-access-key",
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
    ):
        assert stored not in text
    spec = workflow(name)["jobs"][job]
    assert spec["permissions"]["id-token"] == "write"
    (aws,) = steps_using(spec, "aws-actions/configure-aws-credentials")
    assert aws["with"]["role-to-assume"].startswith("${{ vars.")
    # The role is assumed before Pulumi runs.
    names = [str(s.get("uses", "")).split("@")[0] for s in spec["steps"]]
    assert names.index("aws-actions/configure-aws-credentials") < names.index("pulumi/actions")
    assert spec["steps"].index(signer_step(spec)) < spec["steps"].index(pulumi_command(spec))


def test_deploy_runs_up_from_main_for_selected_stacks_with_an_approval_for_prod() -> None:
    deploy = workflow("deploy.yml")
    inputs = deploy["on"]["workflow_dispatch"]["inputs"]
    assert set(inputs) == set(cloud_stacks())
    assert all(i["type"] == "boolean" for i in inputs.values())
    assert inputs["cloud-prod"]["default"] is False
    assert deploy["jobs"]["select"]["if"] == "${{ github.ref == 'refs/heads/main' }}"
    up = deploy["jobs"]["up"]
    assert "production" in up["environment"] and "cloud-prod" in up["environment"]
    assert up["strategy"]["matrix"]["stack"] == "${{ fromJSON(needs.select.outputs.stacks) }}"
    pulumi = pulumi_command(up)
    assert pulumi["with"]["command"] == "up"
    assert pulumi["with"]["policyPacks"] == "policy"
    assert deploy["concurrency"]["cancel-in-progress"] is False


def test_deploy_stack_selection_script_builds_the_matrix(tmp_path: Path) -> None:
    bash = shutil.which("bash")
    assert bash is not None, "bash is missing: the deploy workflow's selection step is a bash script"
    (step,) = workflow("deploy.yml")["jobs"]["select"]["steps"]
    for dev, prod, expected in (
        ("true", "false", '["cloud-dev"]'),
        ("true", "true", '["cloud-dev","cloud-prod"]'),
        ("false", "true", '["cloud-prod"]'),
    ):
        output = tmp_path / f"output-{dev}-{prod}"
        env = {"DEV": dev, "PROD": prod, "GITHUB_OUTPUT": str(output), "PATH": "/usr/bin:/bin"}
        subprocess.run([bash, "-eo", "pipefail", "-c", step["run"]], env=env, check=True, timeout=10)
        assert output.read_text().strip() == f"stacks={expected}"
    env = {"DEV": "false", "PROD": "false", "GITHUB_OUTPUT": "/dev/null", "PATH": "/usr/bin:/bin"}
    none = subprocess.run([bash, "-eo", "pipefail", "-c", step["run"]], env=env, timeout=10, check=False)
    assert none.returncode != 0


def test_the_prebuild_hands_on_the_bundle_but_never_a_private_key() -> None:
    job = workflow("prebuild.yml")["jobs"]["bundle"]
    runs = "\n".join(str(s.get("run", "")) for s in job["steps"])
    assert "python -m model_build build" in runs
    assert "make render STACK=cloud-prod" in runs
    pack = next(s for s in job["steps"] if s.get("name") == "Pack the bundle")
    assert pack["run"].index("rm -f .keys/*.pem") < pack["run"].index("tar -czf")
    (upload,) = steps_using(job, "actions/upload-artifact")
    assert upload["with"]["path"] == "bundle.tgz"


# --------------------------------------------------------------------------- issue 17: keys and engines


def run_signer_step(
    job: dict[str, Any], tmp_path: Path, engines: tuple[str, ...], release_key: bool
) -> tuple[list[str], str]:
    """Run the step's script in a fixture checkout with a fake `pulumi` that records its arguments."""
    from cloud_harness import write_fixture_bundle

    bash = shutil.which("bash")
    assert bash is not None
    checkout = tmp_path / "checkout"
    write_fixture_bundle(checkout / "dist", "demo", engines)
    if release_key:
        (checkout / ".keys" / "release-ed25519.pub").write_text("release public key\n")
    (checkout / ".venv").symlink_to(Path(sys.executable).parent.parent)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "calls"
    (bin_dir / "pulumi").write_text(f'#!/bin/sh\necho "$*" >> {calls}\n')
    (bin_dir / "pulumi").chmod(0o755)
    summary = tmp_path / "summary.md"
    env = {
        "PATH": f"{bin_dir}:/usr/bin:/bin",
        "PYTHONPATH": str(REPO_ROOT),
        "STACK": "cloud-prod",
        "PULUMI_BACKEND_URL": "s3://state",
        "GITHUB_STEP_SUMMARY": str(summary),
    }
    done = subprocess.run(
        [bash, "-eo", "pipefail", "-c", signer_step(job)["run"]],
        cwd=checkout, env=env, capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    shown = done.stdout + (summary.read_text() if summary.exists() else "")
    return calls.read_text().splitlines(), shown


def test_a_preview_without_engines_relaxes_require_engines_and_says_so(tmp_path: Path) -> None:
    job = workflow("preview.yml")["jobs"]["preview"]
    calls, shown = run_signer_step(job, tmp_path, engines=(), release_key=True)
    assert calls == [
        "login s3://state",
        "stack select cloud-prod",
        "config set --path dualdeploy:serving.publicKey .keys/release-ed25519.pub",
        "config set dualdeploy:requireEngines false",
    ]
    assert "::warning title=Preview without TensorRT engines::" in shown
    assert "**Warning:**" in shown and "A deploy of cloud-prod needs engines" in shown


def test_a_preview_with_engines_keeps_require_engines_and_the_dev_key_without_a_release_key(
    tmp_path: Path,
) -> None:
    job = workflow("preview.yml")["jobs"]["preview"]
    calls, shown = run_signer_step(job, tmp_path, engines=("sm_86", "sm_89"), release_key=False)
    assert calls == ["login s3://state", "stack select cloud-prod"]
    assert "warning" not in shown


def test_a_deploy_trusts_the_release_key_and_never_relaxes_require_engines(tmp_path: Path) -> None:
    up = workflow("deploy.yml")["jobs"]["up"]
    assert "requireEngines" not in signer_step(up)["run"]
    calls, _ = run_signer_step(up, tmp_path, engines=(), release_key=True)
    assert "config set --path dualdeploy:serving.publicKey .keys/release-ed25519.pub" in calls
    assert not [c for c in calls if "requireEngines" in c]


def test_the_deploy_prebuild_runs_on_the_gpu_runner_when_there_is_one() -> None:
    deploy = workflow("deploy.yml")
    assert deploy["jobs"]["prebuild"]["with"]["runner"] == "${{ vars.GPU_RUNNER || 'ubuntu-latest' }}"
    prebuild = workflow("prebuild.yml")
    assert prebuild["on"]["workflow_call"]["inputs"]["runner"]["default"] == "ubuntu-latest"
    assert prebuild["jobs"]["bundle"]["runs-on"] == "${{ inputs.runner }}"
