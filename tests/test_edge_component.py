"""The EdgeFleet component under Pulumi mocks (the provider itself runs for real in test_edge_fleet.py).

The mocks answer the rollout resource the way the real provider does: its inputs (minus the vault
password) plus one ``hosts`` entry for each device of the inventory at the bundle's version.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pulumi
import pytest
import yaml
from pulumi.runtime import rpc

from components.edge_fleet import EdgeFleet, EdgeFleetArgs, EdgeRolloutProvider
from deploy.edge_rollout import REPO_ROOT, inventory_hash, playbook_hash

LOCAL_INVENTORY = "ansible/inventories/local"


class FleetMocks(pulumi.runtime.Mocks):
    """Records every resource; answers the rollout like the provider would after a clean rollout."""

    def __init__(self) -> None:
        self.resources: list[pulumi.runtime.MockResourceArgs] = []

    def new_resource(self, args: pulumi.runtime.MockResourceArgs) -> tuple[str, dict[str, Any]]:
        self.resources.append(args)
        outputs = dict(args.inputs)
        if args.typ.endswith("edge_fleet:EdgeRollout"):
            inventory = yaml.safe_load((REPO_ROOT / LOCAL_INVENTORY / "hosts.yml").read_text())
            devices = inventory["all"]["children"]["edge"]["hosts"]
            outputs.pop("vault_password", None)
            outputs["hosts"] = {
                h: {"version": args.inputs["bundle_version"], "status": "changed"} for h in devices
            }
        return f"{args.name}-id", outputs

    def call(self, args: pulumi.runtime.MockCallArgs) -> tuple[dict[str, Any], list[tuple[str, str]] | None]:
        return {}, None


@pytest.fixture
def mocks() -> FleetMocks:
    recorder = FleetMocks()
    pulumi.runtime.set_mocks(recorder, preview=False)
    return recorder


@pytest.fixture
def bundle(tmp_path: Path) -> Path:
    """A bundle folder with just a manifest: the component only reads the version (the playbook verifies)."""
    folder = tmp_path / "demo" / "0123abcd"
    folder.mkdir(parents=True)
    (folder / "manifest.json").write_text(
        json.dumps(
            {
                "schema_version": 1,
                "model": "demo",
                "version": "0123abcd",
                "task": "classification",
                "inputs": [{"name": "image", "dtype": "float32", "shape": ["batch", 3]}],
                "outputs": [{"name": "logits", "dtype": "float32", "shape": ["batch", 10]}],
                "golden": {"inputs": "golden/inputs.npz", "outputs": "golden/outputs.npz"},
                "files": {"model.fp32.onnx": {"sha256": "0" * 64, "size": 1}},
            }
        )
    )
    return folder


def _rollout(mocks: FleetMocks) -> pulumi.runtime.MockResourceArgs:
    return next(r for r in mocks.resources if r.typ.endswith("edge_fleet:EdgeRollout"))


@pulumi.runtime.test
def test_rollout_inputs_carry_the_three_fingerprints(mocks: FleetMocks, bundle: Path) -> Any:
    fleet = EdgeFleet("edge", EdgeFleetArgs(inventory=LOCAL_INVENTORY, bundle_dir=str(bundle)))

    def check(_hosts: Any) -> None:
        inputs = _rollout(mocks).inputs
        assert inputs["bundle_version"] == "0123abcd"
        assert inputs["inventory_hash"] == inventory_hash(REPO_ROOT / LOCAL_INVENTORY)
        assert inputs["playbook_hash"] == playbook_hash(REPO_ROOT / "ansible" / "edge.yml")

    return fleet.hosts.apply(check)


@pulumi.runtime.test
def test_hosts_output_maps_each_device_to_version_and_status(mocks: FleetMocks, bundle: Path) -> Any:
    fleet = EdgeFleet("edge", EdgeFleetArgs(inventory=LOCAL_INVENTORY, bundle_dir=str(bundle)))

    def check(hosts: dict[str, dict[str, Any]]) -> None:
        assert hosts == {"edge-local": {"version": "0123abcd", "status": "changed"}}

    return fleet.hosts.apply(check)


@pulumi.runtime.test
def test_component_type_token_and_child_name(mocks: FleetMocks, bundle: Path) -> Any:
    fleet = EdgeFleet("site-a", EdgeFleetArgs(inventory=LOCAL_INVENTORY, bundle_dir=str(bundle)))

    def check(_hosts: Any) -> None:
        kinds = {(r.typ, r.name) for r in mocks.resources}
        assert ("dualdeploy:edge_fleet:EdgeFleet", "site-a") in kinds
        assert any(t.endswith("edge_fleet:EdgeRollout") and n == "site-a-rollout" for t, n in kinds)

    return fleet.hosts.apply(check)


@pulumi.runtime.test
def test_vault_password_reaches_the_provider_as_a_secret(mocks: FleetMocks, bundle: Path) -> Any:
    fleet = EdgeFleet(
        "edge",
        EdgeFleetArgs(
            inventory=LOCAL_INVENTORY,
            bundle_dir=str(bundle),
            vault_password=pulumi.Output.secret("s3cret-vault"),
        ),
    )

    def check(_hosts: Any) -> None:
        # The engine sees a secret envelope (the special signature), never a plain string.
        sent = _rollout(mocks).inputs["vault_password"]
        assert sent == {rpc._special_sig_key: rpc._special_secret_sig, "value": "s3cret-vault"}

    return fleet.hosts.apply(check)


def test_missing_inventory_is_refused_naming_the_input(
    mocks: FleetMocks, bundle: Path, tmp_path: Path
) -> None:
    with pytest.raises(ValueError, match=r"EdgeFleetArgs.inventory: .*nowhere does not exist"):
        EdgeFleet("edge", EdgeFleetArgs(inventory=str(tmp_path / "nowhere"), bundle_dir=str(bundle)))


def test_bundle_without_manifest_is_refused_naming_the_input(mocks: FleetMocks, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"EdgeFleetArgs.bundle_dir: .*manifest.json: no bundle manifest"):
        EdgeFleet("edge", EdgeFleetArgs(inventory=LOCAL_INVENTORY, bundle_dir=str(tmp_path)))


def test_missing_public_key_is_refused_naming_the_input(
    mocks: FleetMocks, bundle: Path, tmp_path: Path
) -> None:
    with pytest.raises(ValueError, match=r"EdgeFleetArgs.public_key"):
        EdgeFleet(
            "edge",
            EdgeFleetArgs(
                inventory=LOCAL_INVENTORY, bundle_dir=str(bundle), public_key=str(tmp_path / "missing.pub")
            ),
        )


def test_provider_diff_keys_on_version_inventory_and_playbook_only() -> None:
    provider = EdgeRolloutProvider()
    base = {
        "bundle_version": "a",
        "inventory_hash": "i",
        "playbook_hash": "p",
        "limit": None,
        "public_key": None,
        "playbook": "ansible/edge.yml",
        "vault_password": "x",
    }
    assert provider.diff("id", base, dict(base)).changes is False
    assert provider.diff("id", base, {**base, "vault_password": "rotated"}).changes is False
    for key in ("bundle_version", "inventory_hash", "playbook_hash"):
        result = provider.diff("id", base, {**base, key: "changed"})
        assert result.changes is True and result.replaces == []


def test_provider_check_names_missing_inputs() -> None:
    result = EdgeRolloutProvider().check({}, {"inventory": "", "bundle_dir": "dist/demo/latest"})
    assert {f.property for f in result.failures} == {"inventory", "bundle_version"}


def test_playbook_hash_is_the_same_wherever_the_checkout_lies(tmp_path: Path) -> None:
    """The hash is a rollout's diff key: a checkout moved or reached through a link must not
    trigger a rollout (it did once, through the sort order of absolute paths)."""
    here = playbook_hash(REPO_ROOT / "ansible" / "edge.yml")
    for name in ("aaa", "zzz"):  # sorts before and after the real checkout's path
        (tmp_path / name).mkdir()
        (tmp_path / name / "ansible").symlink_to(REPO_ROOT / "ansible")
        assert playbook_hash(tmp_path / name / "ansible" / "edge.yml") == here
    copy = tmp_path / "copy" / "ansible"
    shutil.copytree(REPO_ROOT / "ansible", copy, ignore=shutil.ignore_patterns("__pycache__"))
    assert playbook_hash(copy / "edge.yml") == here


def test_inventory_hash_covers_host_vars_beside_an_inventory_file(tmp_path: Path) -> None:
    inventory = tmp_path / "hosts.yml"
    inventory.write_text("all:\n  hosts:\n    box: {}\n")
    (tmp_path / "host_vars").mkdir()
    (tmp_path / "host_vars" / "box.yml").write_text("edge_service_port: 8000\n")
    before = inventory_hash(inventory)
    (tmp_path / "host_vars" / "box.yml").write_text("edge_service_port: 8001\n")
    assert inventory_hash(inventory) != before
