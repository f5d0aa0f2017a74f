"""The edge roles on real systemd devices: the nspawn lab (tests/lab/edge_lab.py), rolled out over SSH.

Three containers boot once for the module, each with systemd as PID 1, its own network namespace and
sshd; the demo bundle is rolled out through ansible/edge.yml, on the production path (the hardened unit
started by systemd, the nftables ruleset loaded). Each test says what it did to a device and what it saw.
Traffic goes only to the lab's own addresses (10.232.<i>.0/30 here) and every wait is bounded.
"""

from __future__ import annotations

import json
import os
import re
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "lab"))
import edge_lab
from edge_support import derive_bundle, skew_golden, touch_onnx_docstring

from contract.bundle import load_tensors
from contract.codec import HEADER_LENGTH, decode_infer_response, encode_infer_request
from deploy.edge_rollout import RolloutResult, run_rollout, smoke_inference
from serving.hybrid_local import make_pki

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "dist" / "demo" / "latest"
DEVICES = 3
SHOW = "ActiveState,MainPID,NRestarts,MemoryMax,TasksMax,IPAddressDeny,IPAddressAllow,User"

pytestmark = pytest.mark.slow


def _show(device: edge_lab.LabDevice) -> dict[str, str]:
    out = edge_lab.ssh(device, "systemctl", "show", edge_lab.UNIT, "-p", SHOW).stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def _wait(predicate: object, seconds: float, what: str) -> None:
    assert callable(predicate)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.5)
    pytest.fail(f"{what}: not within {seconds:g} s")


def _ready(device: edge_lab.LabDevice) -> bool:
    try:
        return httpx.get(f"http://{device.address}:8000/v2/health/ready", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[list[edge_lab.LabDevice], RolloutResult]]:
    """Three devices of a lab of its own (not a technician's .edge-lab), rolled out once."""
    missing = edge_lab.missing_tools()
    assert not missing, f"the lab needs: apt-get install -y {' '.join(missing)} (.ci/system-packages)"
    assert os.geteuid() == 0, "the lab needs root: network namespaces, cgroups and systemd-nspawn"
    assert BUNDLE.is_dir(), "make bundles builds dist/demo (make test runs it)"
    started = time.monotonic()
    # Stops every device on the way out and raises if anything is left behind.
    with edge_lab.private_lab(tmp_path_factory.mktemp("edge-lab"), "10.232", "tlab", DEVICES) as devices:
        booted = time.monotonic() - started
        inventory = edge_lab.write_inventory(devices)
        started = time.monotonic()
        first = run_rollout(inventory, BUNDLE)
        print(
            f"\nlab: {DEVICES} devices booted in {booted:.1f} s "
            f"({', '.join(f'{d.name} {d.boot_seconds} s' for d in devices)}); "
            f"first rollout {time.monotonic() - started:.1f} s"
        )
        yield devices, first


def test_each_device_boots_systemd_as_pid_1_and_is_listed(
    lab: tuple[list[edge_lab.LabDevice], RolloutResult],
) -> None:
    devices, _ = lab
    listed = json.loads((edge_lab.LAB / "devices.json").read_text())
    assert [d["name"] for d in listed] == [d.name for d in devices]
    for entry, device in zip(listed, devices, strict=True):
        assert {"name", "address", "ssh_port", "leader_pid", "device_class"} <= set(entry)
        assert Path(f"/proc/{device.leader_pid}/comm").read_text().strip() == "systemd"
        assert edge_lab.ssh(device, "cat", "/proc/1/comm").stdout.strip() == "systemd"


def test_rollout_converges_and_a_rerun_changes_nothing(
    lab: tuple[list[edge_lab.LabDevice], RolloutResult],
) -> None:
    devices, first = lab
    assert first.status == "successful"
    on_devices = {h: r for h, r in first.hosts.items() if h != "localhost"}  # localhost: the monitoring files
    assert {h: r.status for h, r in on_devices.items()} == {d.name: "changed" for d in devices}
    assert {r.variant for r in on_devices.values()} == {"int8"}, "the CPU class is seen under the unit"
    started = time.monotonic()
    again = run_rollout(edge_lab.LAB / "inventory.yml", BUNDLE)
    print(f"\nre-run: {time.monotonic() - started:.1f} s, changed={again.changed}")
    assert again.changed == 0, {h: (r.status, r.changed) for h, r in again.hosts.items()}
    assert {h: r.status for h, r in again.hosts.items() if h != "localhost"} == {
        d.name: "unchanged" for d in devices
    }
    for device in devices:
        assert smoke_inference(f"http://{device.address}:8000", BUNDLE)["shape"] == [1, 10]


def test_systemd_runs_the_hardened_unit_with_its_limits(
    lab: tuple[list[edge_lab.LabDevice], RolloutResult],
) -> None:
    devices, _ = lab
    for device in devices:
        props = _show(device)
        assert props["ActiveState"] == "active"
        assert props["MemoryMax"] == str(2 << 30)  # x86_cpu's memory_max in contract/device_classes.yaml
        assert props["TasksMax"] == "256"
        assert set(props["IPAddressDeny"].split()) == {"0.0.0.0/0", "::/0"}
        assert set(props["IPAddressAllow"].split()) == {
            "127.0.0.0/8",
            "::1/128",
            f"{device.address}/32",
            f"{device.controller_address}/32",
        }
        # The kernel holds the limit, not only systemd's bookkeeping.
        limit = edge_lab.ssh(
            device, "cat", f"/sys/fs/cgroup/memory/system.slice/{edge_lab.UNIT}/memory.limit_in_bytes"
        )
        assert limit.stdout.strip() == str(2 << 30)
        tables = edge_lab.ssh(device, "nft", "list", "table", "inet", "dualdeploy").stdout
        assert "policy drop" in tables and f"ip daddr {device.controller_address}" in tables


def test_the_unit_scores_on_the_device_as_the_offline_check_claims(
    lab: tuple[list[edge_lab.LabDevice], RolloutResult],
) -> None:
    devices, _ = lab
    out = edge_lab.ssh(
        devices[0], "systemd-analyze", "security", "--no-pager", edge_lab.UNIT, check=False
    ).stdout
    score = re.search(r"Overall exposure level for \S+: ([0-9.]+) (\w+)", out)
    assert score, out[-2000:]
    # test_edge_static checks the rendered unit offline at below 3.0, "OK"; the running unit holds it.
    assert float(score.group(1)) < 3.0 and score.group(2) == "OK", score.group(0)


def test_a_killed_server_is_restarted_by_systemd(lab: tuple[list[edge_lab.LabDevice], RolloutResult]) -> None:
    """Fault (e): SIGKILL to the server's main process."""
    devices, _ = lab
    device = devices[1]
    before = _show(device)
    edge_lab.ssh(device, "kill", "-9", before["MainPID"])
    _wait(lambda: _show(device)["MainPID"] not in ("0", before["MainPID"]), 30, "a new main process")
    _wait(lambda: _ready(device), 60, f"{device.name} ready again")
    after = _show(device)
    print(
        f"\ninjected SIGKILL to pid {before['MainPID']}; "
        f"observed restarts {before['NRestarts']} → {after['NRestarts']}"
    )
    assert int(after["NRestarts"]) == int(before["NRestarts"]) + 1


def test_a_process_past_memory_max_is_killed_by_the_kernel(
    lab: tuple[list[edge_lab.LabDevice], RolloutResult],
) -> None:
    """A process in the unit's memory cgroup allocates 3 GiB against MemoryMax=2G: the kernel kills it."""
    devices, _ = lab
    device = devices[2]
    cgroup = f"/sys/fs/cgroup/memory/system.slice/{edge_lab.UNIT}"

    def oom_kills() -> int:
        return int(
            edge_lab.ssh(device, script=f"grep oom_kill {cgroup}/memory.oom_control").stdout.split()[-1]
        )

    before = oom_kills()
    probe = (
        f"echo $$ > {cgroup}/cgroup.procs\n"
        "python3 -c 'blocks = [bytearray(64 << 20) for _ in range(48)]; print(len(blocks))'\n"
        "echo exit=$?\n"
    )
    done = edge_lab.ssh(device, script=probe, check=False, timeout=120)
    after = oom_kills()
    print(
        f"\ninjected a 3 GiB allocation into {edge_lab.UNIT}'s cgroup; "
        f"observed {done.stdout.strip()!r}, the cgroup's oom_kill {before} → {after}"
    )
    assert "exit=137" in done.stdout, (done.returncode, done.stdout, done.stderr)  # SIGKILL, from the kernel
    assert after == before + 1
    _wait(lambda: _ready(device), 60, f"{device.name} still serving")


def _listener(address: str, port: int = 0) -> tuple[socket.socket, list[str]]:
    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind((address, port))
    server.listen(8)
    seen: list[str] = []

    def accept() -> None:
        server.settimeout(20)
        try:
            conn, peer = server.accept()
            seen.append(peer[0])
            conn.close()
        except OSError:
            pass

    threading.Thread(target=accept, daemon=True).start()
    return server, seen


def _connect_from_unit(device: edge_lab.LabDevice, host: str, port: int) -> str:
    """Open a TCP connection from inside the server's cgroups (the unit's IP filter and the ruleset).

    Returns ``connected`` or the errno's name: a dropped packet times out (``EAGAIN``).
    """
    script = (
        f"for g in /sys/fs/cgroup/unified/system.slice/{edge_lab.UNIT} "
        f"/sys/fs/cgroup/systemd/system.slice/{edge_lab.UNIT}; do echo $$ > $g/cgroup.procs; done\n"
        "exec python3 -c 'import errno, socket\n"
        "s = socket.socket(); s.settimeout(3)\n"
        f'print(errno.errorcode.get(s.connect_ex(("{host}", {port})), "connected"))\'\n'
    )
    return edge_lab.ssh(device, script=script, timeout=30, check=False).stdout.strip()


def test_the_server_cannot_reach_a_sibling_or_an_unlisted_port(
    lab: tuple[list[edge_lab.LabDevice], RolloutResult],
) -> None:
    devices, _ = lab
    device, sibling = devices[0], devices[1]
    blocked, seen_blocked = _listener(device.controller_address)
    # The control: a listener on a port the ruleset allows (NTP's 123, over TCP here) is reached.
    allowed, seen_allowed = _listener(device.controller_address, 123)
    try:
        to_unlisted = _connect_from_unit(device, device.controller_address, blocked.getsockname()[1])
        to_sibling = _connect_from_unit(device, sibling.address, 22)
        to_allowed = _connect_from_unit(device, device.controller_address, 123)
    finally:
        blocked.close()
        allowed.close()
    print(
        f"\nfrom {device.name}'s unit: an unlisted controller port → "
        f"{to_unlisted}, sibling {sibling.address}:22 → {to_sibling}, controller port 123 → {to_allowed}"
    )
    assert to_unlisted == "EAGAIN" and not seen_blocked, (
        "a port outside edge_hardening_management_ports was reached"
    )
    assert to_sibling == "EAGAIN", "a sibling device was reached"
    assert to_allowed == "connected" and seen_allowed == [device.address]
    counters = edge_lab.ssh(device, "nft", "list", "table", "inet", "dualdeploy").stdout
    dropped = int(re.search(r"counter packets (\d+)", counters).group(1))  # type: ignore[union-attr]
    assert dropped > 0


def test_the_allowed_paths_work(lab: tuple[list[edge_lab.LabDevice], RolloutResult]) -> None:
    """Inference and the metrics scrape from the controller, and SSH from the controller."""
    devices, _ = lab
    for device in devices:
        assert smoke_inference(f"http://{device.address}:8000", BUNDLE)["shape"] == [1, 10]
        assert (
            "dualdeploy_requests_total" in httpx.get(f"http://{device.address}:8000/metrics", timeout=5).text
        )
        assert edge_lab.ssh(device, "true").returncode == 0


class RequestLoop:
    """Golden-input inferences against one device, one after another on a keep-alive client (as a real
    client would), on a thread, bounded in time; counts answers and failures per phase."""

    def __init__(self, url: str, bundle: Path, seconds: float = 900.0) -> None:
        manifest = json.loads((bundle / "manifest.json").read_text())
        inputs = load_tensors(bundle / manifest["golden"]["inputs"])
        self.body, self.headers = encode_infer_request(inputs)
        self.url = f"{url}/v2/models/{manifest['model']}/infer"
        self.deadline = time.monotonic() + seconds
        self.stop = threading.Event()
        self.ok = 0
        self.failed: list[str] = []
        self.versions: dict[str, int] = {}
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        with httpx.Client(timeout=30.0) as client:
            while not self.stop.is_set() and time.monotonic() < self.deadline:
                try:
                    response = client.post(self.url, content=self.body, headers=self.headers)
                    if response.status_code == 200:
                        self.ok += 1
                        answer, _ = decode_infer_response(
                            response.content, response.headers.get(HEADER_LENGTH)
                        )
                        version = str(answer.get("model_version"))
                        self.versions[version] = self.versions.get(version, 0) + 1
                    else:
                        self.failed.append(f"HTTP {response.status_code}: {response.text[:200]}")
                except httpx.HTTPError as exc:
                    self.failed.append(f"{type(exc).__name__}: {exc}")
                time.sleep(0.02)

    def phase(self) -> tuple[int, list[str], dict[str, int]]:
        """Counts since the last phase, then start counting afresh."""
        counts = (self.ok, list(self.failed), dict(self.versions))
        self.ok, self.failed, self.versions = 0, [], {}
        return counts


def _ctl(device: edge_lab.LabDevice, *args: str, check: bool = True) -> tuple[int, dict[str, object], str]:
    done = edge_lab.ssh(device, "/opt/dualdeploy/bin/dualdeploy-ctl", *args, check=False, timeout=400)
    if check:
        assert done.returncode == 0, done.stderr
    return done.returncode, (json.loads(done.stdout) if done.stdout.strip() else {}), done.stderr


def test_updates_a_failed_update_and_a_rollback_drop_no_request(
    lab: tuple[list[edge_lab.LabDevice], RolloutResult], tmp_path: Path
) -> None:
    """Issue 18, item 1: under a steady request loop, 0 failed requests while a new release rolls out, while
    a failing one is refused, and during `dualdeploy-ctl rollback`."""
    devices, _ = lab
    device = devices[0]
    first = json.loads((BUNDLE / "manifest.json").read_text())["version"]
    good = derive_bundle(BUNDLE.resolve(), tmp_path, "b", touch_onnx_docstring)
    bad = derive_bundle(BUNDLE.resolve(), tmp_path, "c", skew_golden)
    inventory = edge_lab.LAB / "inventory.yml"
    loop = RequestLoop(f"http://{device.address}:8000", BUNDLE)
    loop.thread.start()
    try:
        time.sleep(2)
        loop.phase()
        started = time.monotonic()
        update = run_rollout(inventory, good, limit=device.name)
        took = time.monotonic() - started
        ok, failed, versions = loop.phase()
        print(
            f"\ngood update {good.name}: {took:.1f} s, {ok} answered, {len(failed)} failed, "
            f"by version {versions}"
        )
        assert update.hosts[device.name].status == "changed"
        assert not failed, failed[:5]
        assert versions.get(good.name, 0) > 0, "the loop saw the new release"

        started = time.monotonic()
        refused = run_rollout(inventory, bad, limit=device.name, raise_on_failure=False)
        took = time.monotonic() - started
        ok, failed, versions = loop.phase()
        message = refused.hosts[device.name].reason or ""
        print(
            f"failed update {bad.name}: refused in {took:.1f} s ({message[:300]}); {ok} answered, "
            f"{len(failed)} failed, by version {versions}"
        )
        assert refused.hosts[device.name].status == "failed"
        assert "health gate" in message or "did not become ready" in message, message
        assert f"release {good.name} keeps serving" in message, message
        assert not failed, failed[:5]
        assert set(versions) == {good.name}, "the old release served throughout"
        _, status, _ = _ctl(device, "status")
        assert status["current"] == good.name and bad.name in status["failed"], status  # type: ignore[operator]

        started = time.monotonic()
        _, back, _ = _ctl(device, "rollback")
        took = time.monotonic() - started
        time.sleep(1)
        ok, failed, versions = loop.phase()
        print(
            f"rollback to {back['version']}: {took:.1f} s, {ok} answered, {len(failed)} failed, "
            f"by version {versions}"
        )
        assert back["version"] == first and back["switched"] is True
        assert not failed, failed[:5]
        assert versions.get(first, 0) > 0

        # Item 4 of issue 12: the next rollout prunes (the failed release does not count against the two
        # kept), and a rollback after the pruning still works.
        again = run_rollout(inventory, good, limit=device.name)
        assert again.hosts[device.name].status == "changed"
        releases = edge_lab.ssh(device, "ls", "/opt/dualdeploy/releases").stdout.split()
        records = edge_lab.ssh(device, "ls", "/opt/dualdeploy/var/failed", check=False).stdout.split()
        _, after_prune, _ = _ctl(device, "rollback")
        ok, failed, versions = loop.phase()
        print(
            f"update and rollback after pruning: releases {releases}, failed records {records}; "
            f"{ok} answered, {len(failed)} failed, by version {versions}"
        )
        assert sorted(releases) == sorted([first, good.name]), releases
        assert f"{bad.name}.json" not in records
        assert after_prune["version"] == first
        assert not failed, failed[:5]
    finally:
        loop.stop.set()
        loop.thread.join(timeout=60)


def test_a_site_that_escalates_reaches_its_cloud_teacher_through_the_firewall(
    lab: tuple[list[edge_lab.LabDevice], RolloutResult], tmp_path: Path
) -> None:
    """Issue 13, item 3: with edge_escalation=low_confidence the device's server reaches exactly the
    teacher's address and port through the nftables ruleset (whose management ports are 53 and 123 only),
    over TLS with the token; uncertain rows come back from the cloud."""
    devices, _ = lab
    device = devices[1]
    student = REPO / "dist" / "demo-distilled" / "latest"
    assert student.is_dir(), "make bundles builds dist/demo-distilled"
    pki = tmp_path / "pki"
    make_pki(pki, address=device.controller_address)
    port = 18443 + device.index
    teacher_log = tmp_path / "teacher.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("DUALDEPLOY_")}
    env["PYTHONPATH"] = str(REPO)
    argv = [
        sys.executable,
        "-m",
        "serving",
        "--bundle",
        str(BUNDLE.resolve()),
        "--host",
        device.controller_address,
    ]
    argv += ["--port", str(port), "--public-key", str(REPO / ".keys" / "dev-ed25519.pub")]
    argv += ["--tls-cert", str(pki / "server.crt"), "--tls-key", str(pki / "server.key")]
    argv += ["--token-file", str(pki / "token")]
    with teacher_log.open("wb") as sink:
        teacher = subprocess.Popen(argv, cwd=REPO, env=env, stdout=sink, stderr=subprocess.STDOUT)
    try:
        base = f"https://{device.controller_address}:{port}"
        verify = ssl.create_default_context(cafile=str(pki / "ca.crt"))
        _wait(
            lambda: _ok(f"{base}/v2/health/ready", verify),
            90,
            f"the teacher on {base} (log: {teacher_log})",
        )
        extravars = {
            "edge_escalation": "low_confidence",
            "edge_escalation_endpoint": base,
            "edge_escalation_token": (pki / "token").read_text().strip(),
            "edge_escalation_ca": (pki / "ca.crt").read_text(),
        }
        started = time.monotonic()
        result = run_rollout(edge_lab.LAB / "inventory.yml", student, limit=device.name, extravars=extravars)
        took = time.monotonic() - started
        assert result.hosts[device.name].status == "changed"
        ruleset = edge_lab.ssh(device, "nft", "list", "table", "inet", "dualdeploy").stdout
        assert f"ip daddr {device.controller_address} tcp dport {port} accept" in ruleset
        rng = np.random.default_rng(7)
        url = f"http://{device.address}:8000/v2/models/demo-distilled/infer"
        served: dict[str, int] = {}
        with httpx.Client(timeout=30) as client:
            for _ in range(40):
                image = rng.normal(size=(1, 3, 224, 224)).astype(np.float32)
                body, headers = encode_infer_request({"image": image})
                response = client.post(url, content=body, headers=headers)
                assert response.status_code == 200, response.text
                answer, _ = decode_infer_response(response.content, response.headers.get(HEADER_LENGTH))
                params = answer.get("parameters", {})
                key = f"{params.get('served_by')}{' (fallback)' if params.get('fallback') else ''}"
                served[key] = served.get(key, 0) + 1
        print(f"\nescalating rollout {took:.1f} s; 40 noise images from {device.name}: {served}")
        assert served.get("cloud", 0) > 0, served
        assert not any("fallback" in k for k in served), served
    finally:
        teacher.terminate()
        teacher.wait(timeout=30)


def _ok(url: str, verify: ssl.SSLContext) -> bool:
    try:
        return httpx.get(url, verify=verify, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False
