"""Bad input stops the rollout before anything changes on the device, with a message naming the problem.

Real ansible-runner runs against one local-connection device; each fails in the preconditions, so the
device's prefix is never created.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from edge_support import (
    ANSIBLE,
    DEV_PUB,
    Device,
    SshServer,
    demo_bundle,
    derive_bundle,
    flip_byte,
    free_port,
    make_sshd,
    write_inventory,
)

from contract.bundle import generate_key, public_path
from deploy.edge_rollout import RolloutError, run_rollout

pytestmark = pytest.mark.slow


def _refused(
    tmp_path: Path,
    bundle: Path | None = None,
    vault_password: str | None = None,
    allow_dev_key: bool = True,
    ssh: SshServer | None = None,
    **host_vars: object,
) -> tuple[str, Device]:
    device = Device("box", tmp_path / "box", free_port(), ssh=ssh, extra=dict(host_vars))
    inventory = write_inventory(tmp_path / "hosts.yml", [device], allow_dev_key=allow_dev_key)
    with pytest.raises(RolloutError) as caught:
        run_rollout(inventory, bundle or demo_bundle(), public_key=DEV_PUB, vault_password=vault_password)
    assert not device.prefix.exists(), "the device changed before the preconditions failed"
    return str(caught.value), device


def test_unknown_pinned_device_class_names_the_known_classes(tmp_path: Path) -> None:
    message, _ = _refused(tmp_path, edge_preflight_device_class="tpu")
    assert "box failed" in message and "pinned to tpu" in message
    assert "Known classes: jetson, ascend, nvidia_gpu, x86_cpu, arm64_cpu" in message


def test_undetectable_device_names_the_facts_found(tmp_path: Path) -> None:
    table = yaml.safe_load(Path("contract/device_classes.yaml").read_text())
    only_accelerators = {k: v for k, v in table["classes"].items() if k in ("jetson", "ascend")}
    custom = tmp_path / "classes.yaml"
    custom.write_text(yaml.safe_dump({**table, "classes": only_accelerators}, sort_keys=False))
    message, _ = _refused(tmp_path, edge_preflight_device_classes_file=str(custom))
    assert "no class in the table matches" in message
    assert '"arch": "x86_64"' in message and "Known classes: jetson, ascend" in message


def test_token_enabled_without_a_vault_secret_is_refused(tmp_path: Path) -> None:
    message, _ = _refused(tmp_path, edge_service_token_enabled=True)
    assert "edge_service_token_enabled is true but edge_service_token is absent" in message


def test_tampered_bundle_is_refused_on_the_controller(tmp_path: Path) -> None:
    tampered = derive_bundle(demo_bundle(), tmp_path / "bundles", "tampered", flip_byte, sign=False)
    message, _ = _refused(tmp_path, bundle=tampered)
    assert "model.int8.onnx" in message and "sha256" in message


def test_missing_bundle_is_refused_naming_the_folder(tmp_path: Path) -> None:
    message, _ = _refused(tmp_path, bundle=tmp_path / "no-such-bundle")
    assert "no-such-bundle" in message and "does not exist" in message


def test_vault_encrypted_inventory_without_the_password_is_refused(tmp_path: Path) -> None:
    example = Path("ansible/inventories/example-site/group_vars/all/vault.yml").read_text()
    device = Device(
        "box", tmp_path / "box", free_port(), extra={"edge_service_token": "{{ vault_edge_token }}"}
    )
    inventory = write_inventory(tmp_path / "hosts.yml", [device])
    (tmp_path / "group_vars").mkdir()
    (tmp_path / "group_vars" / "all.yml").write_text(example)
    with pytest.raises(RolloutError) as caught:
        run_rollout(inventory, demo_bundle(), public_key=DEV_PUB)
    assert "no vault password was given: pass --vault-password-file FILE" in str(caught.value)
    assert not device.prefix.exists()
    with pytest.raises(RolloutError) as caught:
        run_rollout(inventory, demo_bundle(), public_key=DEV_PUB, vault_password="not-the-password")
    assert "the vault password given does not open this inventory's vault files" in str(caught.value)
    assert not device.prefix.exists()


def test_missing_vault_password_file_is_named_by_the_cli(tmp_path: Path) -> None:
    missing = tmp_path / "site.vault-password"
    run = subprocess.run(
        [sys.executable, "-m", "deploy.edge_rollout", "up", "--vault-password-file", str(missing)],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert run.returncode == 2
    assert f"--vault-password-file {missing} does not exist" in run.stderr
    assert "make site-init" in run.stderr


# --------------------------------------------------------------------------- the development key


def test_bundle_signed_with_the_development_key_is_refused_unless_the_site_allows_it(tmp_path: Path) -> None:
    message, _ = _refused(tmp_path, allow_dev_key=False)
    assert "box refuses bundle" in message and "signed with the" in message and "development key" in message
    assert "edge_allow_dev_key: true" in message


def _verify(*args: str) -> subprocess.CompletedProcess[str]:
    """Run the bundle verifier the way the playbook does (the contract package on PYTHONPATH)."""
    verifier = ANSIBLE / "roles" / "edge_bundle" / "files" / "verify_bundle.py"
    return subprocess.run(
        [sys.executable, str(verifier), str(demo_bundle()), "--public-key", str(DEV_PUB), *args],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "PYTHONPATH": str(ANSIBLE.parent)},
    )


def test_verifier_names_the_development_key_and_its_override(tmp_path: Path) -> None:
    refused = _verify("--dev-public-key", str(DEV_PUB))
    assert refused.returncode == 3 and "development key" in refused.stderr
    assert "edge_allow_dev_key: true" in refused.stderr
    allowed = _verify("--dev-public-key", str(DEV_PUB), "--allow-dev-key")
    assert allowed.returncode == 0 and '"dev_key": true' in allowed.stdout
    generate_key(tmp_path / "other.pem")
    unrelated = _verify("--dev-public-key", str(public_path(tmp_path / "other.pem")))
    assert unrelated.returncode == 0 and '"dev_key": false' in unrelated.stdout


# --------------------------------------------------------------------------- become and SSH


def test_user_that_cannot_become_root_is_refused_with_the_fix(tmp_path: Path) -> None:
    message, _ = _refused(
        tmp_path, ansible_become=True, ansible_become_method="su", ansible_become_user="nobody"
    )
    assert "cannot become root" in message and "NOPASSWD" in message


@pytest.fixture
def sshd(tmp_path: Path) -> Iterator[SshServer]:
    server = make_sshd(tmp_path / "sshd")
    server.start()
    try:
        yield server
    finally:
        server.stop()


def test_firewall_without_the_controller_in_the_management_networks_is_refused(
    tmp_path: Path, sshd: SshServer
) -> None:
    message, _ = _refused(
        tmp_path,
        ssh=sshd,
        edge_hardening_nftables_enabled=True,
        edge_hardening_management_networks=["10.0.0.0/24"],
    )
    assert "the nftables ruleset would cut this controller's SSH" in message
    assert "controller at 127.0.0.1" in message and "127.0.0.1/32" in message


def test_firewall_that_lets_out_another_ssh_port_than_sshd_is_refused(
    tmp_path: Path, sshd: SshServer
) -> None:
    # The ruleset lets SSH replies out from edge_hardening_ssh_port (the inventory's ansible_port by
    # default, which is this sshd's); set to 22 while sshd listens elsewhere, it would cut the session.
    message, _ = _refused(
        tmp_path,
        ssh=sshd,
        edge_hardening_nftables_enabled=True,
        edge_hardening_management_networks=["127.0.0.0/8"],
        edge_hardening_ssh_port=22,
    )
    assert f"sshd on port {sshd.port}" in message and "from port 22" in message
    assert f"set edge_hardening_ssh_port: {sshd.port}" in message


def test_check_command_runs_the_preflight_and_changes_nothing(tmp_path: Path) -> None:
    device = Device("box", tmp_path / "box", free_port())
    inventory = write_inventory(tmp_path / "hosts.yml", [device])
    run = subprocess.run(
        [sys.executable, "-m", "deploy.edge_rollout", "check", "--inventory", str(inventory)],
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines() == ["box: preflight passed"]
    assert not device.prefix.exists(), "the check changed the device"


def test_firewall_on_a_device_that_is_this_controller_is_refused(tmp_path: Path, sshd: SshServer) -> None:
    # Everything else about this firewall is right (the controller's address is a management network,
    # sshd's port is let out); but the device answers on 127.0.0.1: it is this machine, and an output
    # policy of drop would cut its DNS and package mirrors (this happened to this test machine once).
    message, _ = _refused(
        tmp_path,
        ssh=sshd,
        edge_hardening_nftables_enabled=True,
        edge_hardening_management_networks=["127.0.0.0/8"],
    )
    assert "this device is the controller itself (reached at 127.0.0.1)" in message, message
    tables = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True, check=False).stdout
    assert "dualdeploy" not in tables, "a ruleset was loaded on this machine"
