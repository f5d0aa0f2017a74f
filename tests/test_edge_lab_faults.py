"""Faults on the edge device lab: a bad link, a pulled cable, power cuts and a full disk during rollouts.

One systemd device of a lab of its own (tests/lab/edge_lab.py; ``flab1`` on 10.233.1.0/30) boots once for
the module and takes the demo bundle; the faults follow one another on it, since each test starts from
whatever verified release the device serves and leaves it serving a verified release (so no fault hides
behind an earlier one, and the module boots and installs one device, not four).
New bundle versions are the demo bundle with one or two ONNX files changed
(new bytes, same behaviour) and re-signed with the development key (tests/edge_support.derive_bundle).

Faults are observed from this machine only through the device's files, links and processes (its file
system is visible under ``/proc/<leader_pid>/root``, its processes in this machine's ``/proc``), never
through step names inside the roles, so the tests hold whatever steps the roles take. Each test prints
what it injected and what it observed. Every wait is bounded; every link change is undone in a finally.
The fault (e), a killed server restarted by systemd, is tests/test_edge_lab.py's
test_a_killed_server_is_restarted_by_systemd.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from edge_support import derive_bundle, plugin_in_child, touch_onnx_docstring

sys.path.insert(0, str(Path(__file__).resolve().parent / "lab"))
import edge_lab

from contract.bundle import read_manifest
from deploy.edge_rollout import RolloutResult, failure_message, run_rollout

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "dist" / "demo" / "latest"
PREFIX = "/opt/dualdeploy"
DEVICES = 1
SERVE_TIMEOUT_S = 120.0
RELEASE_STAGE = (
    REPO / "ansible/collections/ansible_collections/dualdeploy/edge/plugins/modules/release_stage.py"
)

pytestmark = pytest.mark.slow


@dataclass
class Lab:
    """The module's lab: its bundles and a way to read its devices as they are now (after reboots)."""

    bundles: Path
    model: str
    made: int = 0
    timings: dict[str, float] = field(default_factory=dict)

    def device(self) -> edge_lab.LabDevice:
        """The device as devices.json lists it now (its leader pid changes on a reboot)."""
        return edge_lab.load_devices()[0]

    def new_version(self, *files: str) -> Path:
        """A new signed bundle version: the demo bundle with ``files`` changed (same behaviour)."""
        self.made += 1
        suffix = f"f{self.made}"

        def change(bundle: Path) -> None:
            for relpath in files:
                touch_onnx_docstring(bundle, relpath, text=suffix)

        return derive_bundle(BUNDLE.resolve(), self.bundles, suffix, change)


def _begin(lab: Lab, *files: str) -> tuple[edge_lab.LabDevice, str, Path]:
    """The device, the whole release it serves now, and a new bundle version with ``files`` changed."""
    device = lab.device()
    old = _assert_one_release(device, lab.model, {_current(device) or "?"})
    return device, old, lab.new_version(*files)


def _rollout(
    bundle: Path, device: edge_lab.LabDevice, via: dict[str, tuple[str, int]] | None = None
) -> RolloutResult:
    """Roll ``bundle`` out to ``device`` alone; the result, failed or not."""
    inventory = edge_lab.write_inventory(edge_lab.load_devices(), via=via)
    return run_rollout(inventory, bundle, limit=device.name, raise_on_failure=False)


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    """One device of a lab of its own, serving the demo bundle."""
    assert os.geteuid() == 0, "the lab needs root: network namespaces, cgroups and systemd-nspawn"
    assert BUNDLE.is_dir(), "make bundles builds dist/demo (make test runs it)"
    started = time.monotonic()
    with edge_lab.private_lab(
        tmp_path_factory.mktemp("edge-lab-faults"), "10.233", "flab", DEVICES
    ) as devices:
        booted = time.monotonic() - started
        started = time.monotonic()
        first = run_rollout(edge_lab.write_inventory(devices), BUNDLE)
        print(
            f"\nfault lab: {DEVICES} device booted in {booted:.1f} s, "
            f"first rollout {time.monotonic() - started:.1f} s ({first.status})"
        )
        yield Lab(bundles=tmp_path_factory.mktemp("fault-bundles"), model=read_manifest(BUNDLE).model)


# --------------------------------------------------------------------------- what a device serves


def _current(device: edge_lab.LabDevice) -> str | None:
    """The release the device's ``current`` link names (its folder name), read from here."""
    with contextlib.suppress(OSError):
        return os.path.basename(os.readlink(edge_lab.device_path(device, f"{PREFIX}/current")))
    return None


def _served(device: edge_lab.LabDevice, model: str) -> str | None:
    """The model version the device's server answers with, or None when it does not answer."""
    try:
        answer = httpx.get(f"http://{device.address}:8000/v2/models/{model}", timeout=3)
    except httpx.HTTPError:
        return None
    return str(answer.json()["versions"][0]) if answer.status_code == 200 else None


def _serving_releases(device: edge_lab.LabDevice) -> list[str]:
    """The release (folder name) of each server process on the device, from its command line."""
    found = []
    for argv in edge_lab.device_processes(device).values():
        if "serving" in argv and "--bundle" in argv and "-m" in argv:
            found.append(os.path.basename(argv[argv.index("--bundle") + 1].rstrip("/")))
    return sorted(found)


def _wait_for(what: str, seconds: float, probe: Callable[[], object]) -> object:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        value = probe()
        if value:
            return value
        time.sleep(0.5)
    pytest.fail(f"{what}: not within {seconds:g} s")


def _device_check(device: edge_lab.LabDevice, release: str) -> dict[str, object]:
    """The device's own checks of ``release``: the signature and checksums of every file (the verifier
    the roles ship), then one golden-input inference against the server (the health gate's check)."""
    app = f"{PREFIX}/app/current"
    script = (
        f"export PYTHONPATH={app}\n"
        f"{PREFIX}/venv/bin/python {app}/edge/verify_bundle.py {PREFIX}/releases/{release} "
        f"--public-key {PREFIX}/etc/bundle-signing.pub || exit 10\n"
        f"exec {PREFIX}/venv/bin/python {app}/edge/golden_check.py --url http://{device.address}:8000 "
        f"--bundle {PREFIX}/releases/{release} --timeout 60\n"
    )
    done = edge_lab.ssh(device, script=script, timeout=120, check=False)
    assert done.returncode != 10, f"{device.name}: release {release} fails the verifier: {done.stderr}"
    assert done.returncode == 0, f"{device.name}: release {release} fails the golden check: {done.stderr}"
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def _assert_one_release(device: edge_lab.LabDevice, model: str, allowed: set[str]) -> str:
    """The device serves one release, whole: the ``current`` link, the version the server answers with
    and every server process agree; the release passes the device's verifier and golden check."""
    served = _wait_for(f"{device.name} serving", SERVE_TIMEOUT_S, lambda: _served(device, model))
    current = _current(device)
    assert current in allowed, f"{device.name}: current → {current}, expected one of {sorted(allowed)}"
    assert served == current, f"{device.name}: serves {served} while current → {current}: a mix"
    processes = _serving_releases(device)
    assert processes and set(processes) == {current}, f"{device.name}: server processes run {processes}"
    health = _device_check(device, current)
    assert health.get("version") in (None, current), health
    return current


class Watch(threading.Thread):
    """Polls ``condition`` from this machine every 20 ms and runs ``action`` once, when it first holds."""

    def __init__(self, condition: Callable[[], bool], action: Callable[[], None], seconds: float) -> None:
        super().__init__(daemon=True)
        self.condition, self.action, self.seconds = condition, action, seconds
        self.started = time.monotonic()
        self.fired_after: float | None = None
        self.polls = 0
        self._stop_event = threading.Event()

    def run(self) -> None:
        deadline = self.started + self.seconds
        while not self._stop_event.is_set() and time.monotonic() < deadline:
            self.polls += 1
            held = False
            with contextlib.suppress(OSError, edge_lab.LabError):
                held = self.condition()
            if held:
                self.fired_after = time.monotonic() - self.started
                self.action()
                return
            time.sleep(0.02)

    def finish(self) -> None:
        self._stop_event.set()
        self.join(timeout=60)


def _files_in(device: edge_lab.LabDevice, folder: str) -> list[str]:
    path = edge_lab.device_path(device, folder)
    return sorted(p.name for p in path.iterdir() if p.is_file()) if path.is_dir() else []


# --------------------------------------------------------------------------- (a) a lossy, slow link


def test_a_lossy_slow_link_during_a_rollout_converges_or_fails_cleanly_and_a_rerun_converges(
    lab: Lab,
) -> None:
    device, old, bundle = _begin(lab, "model.int8.onnx")
    new = bundle.name
    # 20 % of the packets to the device dropped on its link, and 100 ms more each way on the SSH path.
    relay = edge_lab.DelayRelay(device, 0.1)
    edge_lab.shape(device, loss_percent=20)
    try:
        started = time.monotonic()
        first = _rollout(bundle, device, via={device.name: ("127.0.0.1", relay.port)})
        under_fault = time.monotonic() - started
        packets, dropped = edge_lab.loss_counters(device)
    finally:
        edge_lab.unshape(device)
        relay.close()
    host = first.hosts[device.name]
    print(
        f"\n(a) injected 20 % loss on {device.veth} (nftables, controller → device) and 200 ms more "
        f"round trip on the SSH path (a delaying relay); observed {dropped} of {packets} packets dropped, "
        f"{relay.connections} SSH connections relayed; rollout {old} → {new}: {first.status} "
        f"({host.status}) in {under_fault:.1f} s, sent {len(host.sent_files)} files ({host.sent_bytes} B)"
        + (f", reason: {host.reason}" if host.reason else "")
    )
    assert dropped > 0 and relay.connections > 0, "the fault was not in place"
    if first.status == "successful":
        assert _assert_one_release(device, lab.model, {new}) == new
        return
    # Failed cleanly: the device is named with a reason and serves one whole release; a re-run converges.
    assert host.status in ("failed", "unreachable") and host.reason, failure_message(first)
    assert device.name in failure_message(first)
    _assert_one_release(device, lab.model, {old, new})
    started = time.monotonic()
    again = _rollout(bundle, device)
    print(f"    re-run on a clean link: {again.status} in {time.monotonic() - started:.1f} s")
    assert again.status == "successful", failure_message(again)
    assert _assert_one_release(device, lab.model, {new}) == new


# --------------------------------------------------------------------------- (b) the link goes down


def test_b_link_down_during_the_transfer_keeps_the_old_release_and_a_rerun_converges(lab: Lab) -> None:
    device, old, bundle = _begin(lab, "model.fp32.onnx", "model.int8.onnx")
    new = bundle.name
    staging = f"{PREFIX}/releases/.staging-{new}"
    sent = {"manifest.json", "manifest.json.sig", "model.fp32.onnx", "model.int8.onnx"}
    seen: list[str] = []

    def transfer_started() -> bool:
        # The staging folder exists and a file the controller sends (not one linked on the device) arrived.
        seen[:] = _files_in(device, staging)
        return bool(sent & set(seen))

    # 2 Mbit/s stretches the 2 MB transfer to seconds, so that the cable is pulled in the middle of it.
    edge_lab.shape(device, rate_kbit=2000)
    watch = Watch(transfer_started, lambda: edge_lab.set_link(device, up=False), seconds=600)
    try:
        watch.start()
        started = time.monotonic()
        cut = _rollout(bundle, device)
        took = time.monotonic() - started
    finally:
        watch.finish()
        edge_lab.set_link(device, up=True)
        edge_lab.unshape(device)
    host = cut.hosts[device.name]
    print(
        f"\n(b) injected: {device.veth} down {watch.fired_after or 0:.1f} s into the rollout {old} → {new}, "
        f"when staging held {seen} ({watch.polls} polls); observed: rollout {cut.status} ({host.status}) "
        f"after {took:.1f} s: {host.reason}"
    )
    assert watch.fired_after is not None, "the transfer was never seen starting"
    assert cut.status != "successful" and host.status in ("failed", "unreachable"), failure_message(cut)
    assert not edge_lab.device_path(device, f"{PREFIX}/releases/{new}").exists(), "an unverified release"
    assert _assert_one_release(device, lab.model, {old}) == old
    started = time.monotonic()
    again = _rollout(bundle, device)
    after = again.hosts[device.name]
    print(
        f"    re-run with the link back: {again.status} in {time.monotonic() - started:.1f} s, "
        f"sent {sorted(after.sent_files)}"
    )
    assert again.status == "successful", failure_message(again)
    assert _assert_one_release(device, lab.model, {new}) == new


# --------------------------------------------------------------------------- (c) power cuts in the switch


def _cut_points(new: str) -> list[tuple[str, Callable[[edge_lab.LabDevice], bool]]]:
    """Where to cut the power, each as a condition observed from here on the device's files and processes."""
    releases = f"{PREFIX}/releases"

    def staging(device: edge_lab.LabDevice) -> bool:
        return bool(_files_in(device, f"{releases}/.staging-{new}"))

    def finalised(device: edge_lab.LabDevice) -> bool:
        return edge_lab.device_path(device, f"{releases}/{new}").is_dir()

    def linked(device: edge_lab.LabDevice) -> bool:
        return _current(device) == new

    def restarting(device: edge_lab.LabDevice) -> bool:
        return new in _serving_releases(device)

    return [
        ("while staging (a file in the staging folder)", staging),
        ("right after the new release folder is finalised", finalised),
        ("right after the current link changes", linked),
        ("while a server process of the new release starts", restarting),
    ]


def _power_cut_at(lab: Lab, step: int) -> str:
    """Roll a new version out to the device, cut its power at the ``step``-th point of the switch,
    reboot it, check that it serves one whole release, and roll out again; one line of what happened."""
    device, old, bundle = _begin(lab, "model.fp32.onnx")
    new = bundle.name
    point, condition = _cut_points(new)[step]
    watch = Watch(lambda: condition(device), lambda: edge_lab.stop(device, power_cut=True), seconds=600)
    watch.start()
    try:
        started = time.monotonic()
        cut = _rollout(bundle, device)
        took = time.monotonic() - started
    finally:
        watch.finish()
    assert watch.fired_after is not None, f"{point}: never observed in {old} → {new} ({cut.status})"
    assert not edge_lab.is_running(device)
    folder = edge_lab.device_path(device, f"{PREFIX}/releases/{new}").is_dir()
    on_disk = f"current → {_current(device)}, new release folder {'present' if folder else 'absent'}"
    started = time.monotonic()
    edge_lab.up(DEVICES)  # boots the device that lost its power, on the disk it had
    device = lab.device()
    booted = time.monotonic() - started
    serves = _assert_one_release(device, lab.model, {old, new})
    recovered = time.monotonic() - started
    started = time.monotonic()
    again = _rollout(bundle, device)
    rerun = time.monotonic() - started
    assert again.status == "successful", f"{point}: {failure_message(again)}"
    assert _assert_one_release(device, lab.model, {new}) == new
    return (
        f"    cut {point}: {watch.fired_after:.2f} s into {old} → {new} (that rollout ended {cut.status} "
        f"after {took:.1f} s); on disk {on_disk}; rebooted in {booted:.1f} s, serving {serves} "
        f"({'new' if serves == new else 'old'}) verified {recovered:.1f} s after the boot began; "
        f"next run {again.status} in {rerun:.1f} s"
    )


def test_c_power_cut_during_the_release_switch_leaves_one_whole_release_and_the_next_run_converges(
    lab: Lab,
) -> None:
    lines = [_power_cut_at(lab, step) for step in range(len(_cut_points("?")))]
    print("\n(c) injected a power cut (SIGKILL of the whole container) at each point of the switch:")
    print("\n".join(lines))


# --------------------------------------------------------------------------- (d) a full disk


def test_d_a_full_disk_during_staging_fails_naming_the_device_and_the_cause_and_the_old_release_serves(
    lab: Lab,
) -> None:
    device, old, bundle = _begin(lab, "model.fp32.onnx")
    releases = f"{PREFIX}/releases"
    used_k = int(edge_lab.ssh(device, "du", "-sk", releases).stdout.split()[0])
    size_k = used_k + 512  # the new model file (1.5 MB) does not fit beside what the device holds
    # A disk that is nearly full: the device's releases, copied onto a small tmpfs mounted over them in the
    # device's own mount namespace (links between releases kept), so the current release stays in place.
    disk = f"/run/lab-disk-{os.getpid()}"  # on the device
    fill = (
        f"mkdir -p {disk} && mount -t tmpfs -o size={size_k}k lab-disk {disk} && mount --make-private {disk} "
        f"&& cp -a {releases}/. {disk}/ && mount --bind {disk} {releases}"
    )
    filled = edge_lab.ssh(device, script=fill, check=False)
    assert filled.returncode == 0, f"the small disk was not mounted: {filled.stderr}"
    try:
        free_k = int(edge_lab.ssh(device, "df", "-k", "--output=avail", releases).stdout.split()[-1])
        started = time.monotonic()
        result = _rollout(bundle, device)
        took = time.monotonic() - started
        message = failure_message(result)
        served_during = _current(device), _served(device, lab.model)
    finally:
        edge_lab.ssh(device, script=f"umount -l {releases}; umount -l {disk}; rmdir {disk}", check=False)
    print(
        f"\n(d) injected: {releases} on a {size_k} KiB tmpfs with {free_k} KiB free; rollout {old} → "
        f"{bundle.name}: {result.status} in {took:.1f} s; observed: {message}; current → {served_during[0]}, "
        f"serving {served_during[1]}"
    )
    assert result.status != "successful" and result.hosts[device.name].status == "failed"
    assert device.name in message and "No space left on device" in message, message
    assert served_during == (old, old)
    assert _assert_one_release(device, lab.model, {old}) == old


# --------------------------------------------------------------------------- what the faults changed


def test_a_resumed_staging_folder_loses_an_interrupted_copys_temporary_file(tmp_path: Path) -> None:
    """A power cut during a copy leaves its temporary file in the staging folder; staging again removes it
    (the verifier refuses a file the manifest does not list) and keeps the files already received."""
    staging = tmp_path / ".staging-v2"
    staging.mkdir()
    (staging / "a.onnx").write_bytes(b"received")
    (staging / ".ansible_tmpx1b2c3b.onnx").write_bytes(b"half a fi")
    files = {
        "a.onnx": {"sha256": hashlib.sha256(b"received").hexdigest(), "size": 8},
        "b.onnx": {"sha256": hashlib.sha256(b"to send").hexdigest(), "size": 7},
    }
    # In a child interpreter, as on a device: importing the module here would patch this process.
    [result] = plugin_in_child(RELEASE_STAGE, "stage", [[str(tmp_path), "v2", files]])
    assert result["removed"] == [".ansible_tmpx1b2c3b.onnx"]
    assert sorted(p.name for p in staging.iterdir()) == ["a.onnx"]
    assert result["missing"] == ["manifest.json", "manifest.json.sig", "b.onnx"]


# --------------------------------------------------------------------------- the lab itself


def _sshd_never_answers(device: edge_lab.LabDevice, deadline: float) -> None:
    raise edge_lab.LabError(f"{device.name}: sshd never answered (injected)")


@pytest.mark.parametrize("fault", ["boot-timeout", "no-ssh"])
def test_a_device_that_does_not_come_up_is_stopped_and_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fault: str
) -> None:
    """A boot that fails stops what it started, although devices.json never named the device, and
    ``private_lab`` then finds nothing left (it raises "left behind" otherwise). Injected: a boot timeout
    of 0 (the spawn script has just started: nspawn and systemd come up while it is stopped), or sshd
    never answering (the container runs, its link is configured)."""
    if fault == "boot-timeout":
        monkeypatch.setattr(edge_lab, "BOOT_TIMEOUT_S", 0.0)
    else:
        monkeypatch.setattr(edge_lab, "_wait_ready", _sshd_never_answers)
    with (
        pytest.raises(edge_lab.LabError) as caught,
        edge_lab.private_lab(tmp_path / "lab", "10.237", "blab", 1),
    ):
        pytest.fail("the device came up")
    print(f"\ninjected: {fault}; observed: {caught.value}")
    assert "left behind" not in str(caught.value), caught.value
    assert "blab1" in str(caught.value)


def test_the_remains_of_a_killed_lab_do_not_block_the_next_one(tmp_path: Path) -> None:
    """A test run killed with SIGKILL leaves empty cgroups and fence routes (no container): the next lab
    clears them instead of refusing to start as if another lab ran. Injected: one such cgroup in every
    hierarchy and a fence route, as a killed run leaves them."""
    name, prefix = "klab1", "10.239"
    for hierarchy in Path("/sys/fs/cgroup").iterdir():
        if (hierarchy / "cgroup.procs").exists():
            (hierarchy / edge_lab.CGROUP_GROUP / name).mkdir(parents=True, exist_ok=True)
    edge_lab._run(["ip", "route", "replace", "unreachable", f"{prefix}.1.0/30", "metric", "4000"])
    with edge_lab.private_lab(tmp_path / "lab", prefix, "klab", 0) as devices:
        assert devices == []
        assert not edge_lab.leftovers()
    assert not list(Path("/sys/fs/cgroup").glob(f"*/{edge_lab.CGROUP_GROUP}/{name}"))
    assert f"{prefix}.1.0/30" not in edge_lab._run(["ip", "route", "show", "type", "unreachable"]).stdout
