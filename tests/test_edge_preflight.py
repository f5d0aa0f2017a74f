"""Bad input stops the rollout before anything changes on the device, with a message naming the problem.

Real ansible-runner runs against one local-connection device; each fails in the preconditions, so the
device's prefix is never created.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from edge_support import DEV_PUB, Device, demo_bundle, derive_bundle, flip_byte, free_port, write_inventory

from deploy.edge_rollout import RolloutError, run_rollout

pytestmark = pytest.mark.slow


def _refused(
    tmp_path: Path, bundle: Path | None = None, vault_password: str | None = None, **host_vars: object
) -> tuple[str, Device]:
    device = Device("box", tmp_path / "box", free_port(), extra=dict(host_vars))
    inventory = write_inventory(tmp_path / "hosts.yml", [device])
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
    assert "vault" in str(caught.value).lower()
    assert not device.prefix.exists()
