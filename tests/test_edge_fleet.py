"""The edge rollout end to end: real Ansible (ansible-runner), real sshd, the real server and bundle.

One fleet for the whole module, because a fresh device costs a venv install: three devices over
Ansible's local connection and two over real OpenSSH servers on 127.0.0.1, each with its own prefix and
port. One local device serves over TLS with a bearer token, both from an Ansible Vault file that only the
runner's vault password opens. Each test first brings the fleet to the state it starts from
(``Fleet.converge``), so every test passes alone and in any order; the fleet remembers when its last
rollout already left it there, which spares a rollout when the tests run in the order written.
"""

from __future__ import annotations

import json
import shutil
import ssl
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import yaml
from edge_support import (
    DEV_PUB,
    SSHD,
    Device,
    SshServer,
    demo_bundle,
    derive_bundle,
    flip_byte,
    make_sshd,
    skew_golden,
    touch_onnx_docstring,
    write_inventory,
    write_vault_file,
)
from serving_support import free_port, self_signed_cert

from components.edge_fleet import EdgeRolloutProvider, fingerprints
from deploy.edge_rollout import RolloutError, RolloutResult, run_rollout

pytestmark = [pytest.mark.slow]

# Every device in one batch: the tests that exercise the canary set their own strategy.
ALL_AT_ONCE = {"edge_rollout_serial": "100%", "edge_rollout_max_fail_percentage": 100}
VAULT_PASSWORD = "fleet-test-vault-password"


@dataclass
class Observed:
    """What one device had and served, read right after the fixture's first rollout."""

    current: str | None
    served: list[str]


@dataclass
class Fleet:
    """The module's devices, their inventory, the bundles and the first rollout's result."""

    devices: list[Device]
    inventory: Path
    v1: Path
    v2: Path
    first: RolloutResult
    after_first: dict[str, Observed]
    root: Path
    # The bundle that the last rollout put on every device with the default settings, all of it a success,
    # with nothing done to the devices since; None when the state is anything else.
    converged_to: Path | None = None

    def rollout(
        self, bundle: Path, *, extravars: dict[str, object] | None = None, limit: str | None = None
    ) -> RolloutResult:
        """Roll ``bundle`` out (every device in one batch unless ``extravars`` says otherwise)."""
        variables = {**ALL_AT_ONCE, **(extravars or {})}
        self.converged_to = None
        result = run_rollout(
            self.inventory,
            bundle,
            public_key=DEV_PUB,
            extravars=variables,
            limit=limit,
            vault_password=VAULT_PASSWORD,
        )
        if limit is None and not extravars:
            self.converged_to = bundle
        return result

    def serves(self, bundle: Path) -> bool:
        """Whether every device's current link points at ``bundle`` and its server says it serves it."""
        if any(d.current_version() != bundle.name for d in self.devices):
            return False
        try:
            return all(d.served()["versions"] == [bundle.name] for d in self.devices)
        except httpx.HTTPError:  # a server that is down or refuses: not serving it
            return False

    def converge(self, bundle: Path, *, holding: tuple[Path, ...] = ()) -> None:
        """Start a test from: every device serves ``bundle`` (rolled out unless it already does).

        Releases in ``holding`` must be on every device too (rolled out first where one is missing).
        """
        for earlier in holding:
            if any(not (d.prefix / "releases" / earlier.name).is_dir() for d in self.devices):
                self.rollout(earlier)
        if self.converged_to != bundle and not self.serves(bundle):
            self.rollout(bundle)

    def settle(self) -> None:
        """Start a test from a fleet that a full, successful rollout left serving (of v1 unless one did)."""
        if self.converged_to is None:
            self.rollout(self.v1)

    def drop_other_releases(self) -> None:
        """Remove every release but the current one from every device (as a fresh device would be)."""
        for device in self.devices:
            current = device.current_version()
            for folder in (device.prefix / "releases").iterdir():
                if folder.name != current:
                    shutil.rmtree(folder)

    def device(self, name: str) -> Device:
        return next(d for d in self.devices if d.name == name)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    # make test installs sshd (.ci/system-packages); a missing one is a broken set-up, not a skip.
    assert SSHD.exists(), "sshd is missing: run .ci/system-packages (Debian openssh-server)"
    root = tmp_path_factory.mktemp("edge-fleet")
    v1 = demo_bundle()
    v2 = derive_bundle(v1, root / "bundles", "u1", touch_onnx_docstring)
    servers: list[SshServer] = []
    devices = [Device(f"local-{i}", root / f"local-{i}", free_port()) for i in (1, 2, 3)]
    # local-3: TLS and a bearer token, the secrets in an encrypted host_vars file beside the inventory.
    cert_pem, key_pem = self_signed_cert(root)
    secure = devices[2]
    secure.tls_cert, secure.token = root / "server.crt", "fleet-token-" + "x" * 20
    write_vault_file(
        root / "host_vars" / "local-3.yml",
        {
            "edge_service_tls_cert": cert_pem,
            "edge_service_tls_key": key_pem,
            "edge_service_token": secure.token,
        },
        VAULT_PASSWORD,
    )
    secure.extra.update({"edge_service_tls_enabled": True, "edge_service_token_enabled": True})
    for i in (1, 2):
        server = make_sshd(root / f"sshd-{i}")
        server.start()
        servers.append(server)
        devices.append(Device(f"ssh-{i}", root / f"ssh-{i}", free_port(), ssh=server))
    inventory = write_inventory(root / "hosts.yml", devices)
    try:
        first = run_rollout(
            inventory, v1, public_key=DEV_PUB, extravars=ALL_AT_ONCE, vault_password=VAULT_PASSWORD
        )
        # Read now: later tests move the devices on, and the first test checks where this rollout left them.
        after_first = {d.name: Observed(d.current_version(), d.served()["versions"]) for d in devices}
        yield Fleet(devices, inventory, v1, v2, first, after_first, root, converged_to=v1)
    finally:
        for device in devices:
            device.stop_service()
        for server in servers:
            server.stop()


def _versions(fleet: Fleet) -> dict[str, list[str]]:
    return {d.name: d.served()["versions"] for d in fleet.devices}


def test_first_rollout_converges_every_device_over_local_and_ssh(fleet: Fleet) -> None:
    version = json.loads((fleet.v1 / "manifest.json").read_text())["version"]
    assert fleet.first.status == "successful"
    for device in fleet.devices:
        host = fleet.first.hosts[device.name]
        assert host.status == "changed", (device.name, host)
        assert (host.version, host.device_class) == (version, "x86_cpu")
        assert fleet.after_first[device.name].current == version
    # Each device's own server answers with the version on its own port.
    assert {name: seen.served for name, seen in fleet.after_first.items()} == {
        d.name: [version] for d in fleet.devices
    }


def test_second_run_changes_nothing_on_any_host(fleet: Fleet) -> None:
    if fleet.converged_to != fleet.v1:
        fleet.rollout(fleet.v1)  # the first run (the fixture's, unless a test has rolled out since)
    result = fleet.rollout(fleet.v1)
    assert {h: r.changed for h, r in result.hosts.items()} == {
        **{d.name: 0 for d in fleet.devices},
        "localhost": 0,
    }


def test_prometheus_targets_list_every_device(fleet: Fleet) -> None:
    fleet.settle()  # the files that a full rollout wrote
    targets = json.loads((fleet.root / "monitoring" / "dualdeploy-edge.json").read_text())
    listed = {t["labels"]["instance"]: t["targets"][0] for t in targets}
    assert listed == {d.name: f"127.0.0.1:{d.port}" for d in fleet.devices}
    scrape = yaml.safe_load((fleet.root / "monitoring" / "dualdeploy-edge.scrape.yml").read_text())[0]
    assert scrape["file_sd_configs"][0]["files"][0].endswith("dualdeploy-edge.json")
    # One server needs TLS and a token, so the job scrapes over https with a credentials file.
    assert scrape["scheme"] == "https" and scrape["authorization"]["type"] == "Bearer"
    dashboard = json.loads((fleet.root / "monitoring" / "dualdeploy-edge.dashboard.json").read_text())
    assert dashboard["uid"] == "dualdeploy-edge", "the dashboard is written beside the scrape snippet"


def test_tls_device_refuses_requests_without_its_vault_token(fleet: Fleet) -> None:
    fleet.settle()
    secure = fleet.device("local-3")
    assert secure.served()["name"] == "demo"  # https, certificate checked, token sent
    anonymous = httpx.get(
        f"{secure.endpoint}/v2/models/demo",
        verify=ssl.create_default_context(cafile=str(secure.tls_cert)),
        timeout=10.0,
    )
    assert anonymous.status_code == 401
    token_file = secure.prefix / "etc" / "token"
    assert token_file.read_text() == secure.token and (token_file.stat().st_mode & 0o777) == 0o600


def test_one_file_update_sends_only_that_file_and_links_the_rest(fleet: Fleet) -> None:
    new = json.loads((fleet.v2 / "manifest.json").read_text())
    old = json.loads((fleet.v1 / "manifest.json").read_text())
    changed = sorted(f for f in new["files"] if new["files"][f]["sha256"] != old["files"][f]["sha256"])
    assert changed == ["model.fp32.onnx"]
    # Every device serves v1 and holds no other release (none with v2's new file, e.g. one derived from v2).
    fleet.converge(fleet.v1)
    fleet.drop_other_releases()
    # An interrupted earlier attempt left a half-written file in staging on one device: it is re-sent.
    staging = fleet.device("local-1").prefix / "releases" / f".staging-{new['version']}"
    staging.mkdir(parents=True)
    (staging / "model.fp32.onnx").write_bytes(b"half-written")

    result = fleet.rollout(fleet.v2)

    for device in fleet.devices:
        host = result.hosts[device.name]
        assert sorted(host.sent_files) == ["manifest.json", "manifest.json.sig", "model.fp32.onnx"]
        size = new["files"]["model.fp32.onnx"]["size"]
        assert host.sent_bytes == size + (fleet.v2 / "manifest.json").stat().st_size + 64
        releases = device.prefix / "releases"
        for rel in ("model.int8.onnx", "golden/inputs.npz"):
            assert (releases / new["version"] / rel).stat().st_ino == (
                releases / old["version"] / rel
            ).stat().st_ino
        assert device.served()["versions"] == [new["version"]]


def test_tampered_bundle_is_refused_before_sending_and_old_version_serves(fleet: Fleet) -> None:
    fleet.converge(fleet.v2)
    tampered = derive_bundle(fleet.v2, fleet.root / "bundles", "tampered", flip_byte, sign=False)
    with pytest.raises(RolloutError) as caught:
        fleet.rollout(tampered)
    assert "model.int8.onnx" in str(caught.value)
    for device in fleet.devices:
        assert not (device.prefix / "releases" / tampered.name).exists()
        assert not (device.prefix / "releases" / f".staging-{tampered.name}").exists()
    version = json.loads((fleet.v2 / "manifest.json").read_text())["version"]
    assert _versions(fleet) == {d.name: [version] for d in fleet.devices}


def test_corrupted_file_on_the_device_is_caught_by_the_device_side_check(fleet: Fleet) -> None:
    """A file reused from an earlier release was corrupted on the device: the new release is refused."""
    v1_version = json.loads((fleet.v1 / "manifest.json").read_text())["version"]
    v2_version = json.loads((fleet.v2 / "manifest.json").read_text())["version"]
    victim = fleet.device("local-2")
    # The victim serves v2 and still holds v1, whose files v2 (and so v3) shares.
    fleet.converge(fleet.v2, holding=(fleet.v1,))
    fleet.converged_to = None  # a device changes behind Ansible's back
    # Corrupt v1's copy of a file that the next release reuses (break the hard link first: v2 stays intact).
    golden = victim.prefix / "releases" / v1_version / "golden" / "outputs.npz"
    data = bytearray(golden.read_bytes())
    golden.unlink()
    data[-100] ^= 0xFF
    golden.write_bytes(bytes(data))
    v3 = derive_bundle(fleet.v2, fleet.root / "bundles", "u2", lambda b: touch_onnx_docstring(b, text="u2"))
    try:
        with pytest.raises(RolloutError) as caught:
            fleet.rollout(v3, limit=victim.name)
        assert "golden/outputs.npz" in str(caught.value)
        assert f"{victim.name} failed" in str(caught.value)
        assert not (victim.prefix / "releases" / v3.name).exists()
        assert not (victim.prefix / "releases" / f".staging-{v3.name}").exists()
        assert victim.current_version() == v2_version
        assert victim.served()["versions"] == [v2_version]
    finally:
        # Drop the damaged release so later rollouts of v1 stage it afresh.
        shutil.rmtree(victim.prefix / "releases" / v1_version)


def test_failing_health_gate_rolls_the_canary_back_and_stops_the_rollout(fleet: Fleet) -> None:
    fleet.converge(fleet.v2)
    broken = derive_bundle(fleet.v2, fleet.root / "bundles", "badgolden", skew_golden)
    version = json.loads((fleet.v2 / "manifest.json").read_text())["version"]
    with pytest.raises(RolloutError) as caught:
        fleet.rollout(
            broken,
            extravars={
                "edge_rollout_serial": [1, "50%", "100%"],
                "edge_rollout_max_fail_percentage": 0,
                "edge_service_health_timeout": 12,
            },
        )
    message = str(caught.value)
    canary = fleet.devices[0]
    assert f"{canary.name} failed" in message and "health gate" in message
    assert f"switched back to {version}, serving and healthy" in message
    # The canary serves the previous version again; no other device was touched.
    assert canary.current_version() == version
    assert _versions(fleet) == {d.name: [version] for d in fleet.devices}
    for device in fleet.devices[1:]:
        assert not (device.prefix / "releases" / broken.name).exists()


def test_unreachable_host_is_reported_others_converge_and_rerun_converges(fleet: Fleet) -> None:
    down = fleet.device("ssh-2")
    assert down.ssh is not None
    v1_version = json.loads((fleet.v1 / "manifest.json").read_text())["version"]
    # Every device serves v2, so rolling v1 out changes each one that is reachable.
    fleet.converge(fleet.v2)
    down.ssh.stop()
    try:
        with pytest.raises(RolloutError) as caught:
            fleet.rollout(fleet.v1)
        result = caught.value.result
        assert result.unreachable == ["ssh-2"]
        assert "ssh-2 unreachable" in str(caught.value)
        for device in fleet.devices:
            if device is not down:
                assert result.hosts[device.name].status == "changed"
                assert device.served()["versions"] == [v1_version]
    finally:
        down.ssh.start()
    again = fleet.rollout(fleet.v1)
    assert again.status == "successful"
    assert again.hosts["ssh-2"].status == "changed"
    assert {h: r.changed for h, r in again.hosts.items() if h not in ("ssh-2", "localhost")} == {
        d.name: 0 for d in fleet.devices if d is not down
    }
    assert _versions(fleet) == {d.name: [v1_version] for d in fleet.devices}


def test_dynamic_provider_diffs_creates_and_updates_for_real(fleet: Fleet) -> None:
    """The EdgeFleet provider's own methods, run against a local-connection device of the fleet."""
    device = fleet.device("local-3")
    v1_version = json.loads((fleet.v1 / "manifest.json").read_text())["version"]
    v2_version = json.loads((fleet.v2 / "manifest.json").read_text())["version"]
    # The device serves v1, so creating the resource with v2 changes it.
    fleet.converge(fleet.v1)

    def props(bundle: Path) -> dict[str, object]:
        return {
            "inventory": str(fleet.inventory),
            "bundle_dir": str(bundle),
            "playbook": "ansible/edge.yml",
            "public_key": str(DEV_PUB),
            "limit": device.name,
            "vault_password": VAULT_PASSWORD,
            **fingerprints(str(fleet.inventory), str(bundle), "ansible/edge.yml"),
        }

    provider = EdgeRolloutProvider()
    fleet.converged_to = None  # the provider rolls out to one device, outside Fleet.rollout
    created = provider.create(props(fleet.v2))
    assert created.outs is not None and "vault_password" not in created.outs
    assert created.outs["hosts"] == {
        device.name: {"version": v2_version, "status": "changed", "endpoint": device.endpoint},
    }
    assert device.served()["versions"] == [v2_version]
    assert provider.diff(created.id, created.outs, props(fleet.v2)).changes is False
    assert provider.diff(created.id, created.outs, props(fleet.v1)).changes is True

    updated = provider.update(created.id, created.outs, props(fleet.v1))
    assert updated.outs is not None
    assert updated.outs["hosts"][device.name]["version"] == v1_version
    assert device.served()["versions"] == [v1_version]
