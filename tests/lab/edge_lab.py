"""The edge device lab: real systemd devices on this machine, for the tests and for a technician's demo.

Each device is a ``systemd-nspawn`` container booted with systemd as PID 1. It runs this machine's
``/usr`` read-only on a fresh tmpfs root (``--volatile=yes``) with three folders of its own that persist
across a reboot or a power cut, as a device's disk would:

* ``/etc`` (a copy of this machine's, with the device's hostname, machine id, ssh host keys and only
  ``ssh.service`` enabled),
* ``/opt`` (where the roles install, ``/opt/dualdeploy``),
* ``/root`` (the controller's key in ``.ssh/authorized_keys``).

Each device has its own network namespace, joined to this machine by a veth pair: ``ve-<name>`` here with
``10.231.<i>.1/30``, ``host0`` in the device with ``10.231.<i>.2/30``. Nothing is routed beyond: a device
reaches only the controller's end of its own link. Traffic goes to those addresses only.

What systemd needs to run this way on a machine where systemd is not PID 1 (all measured on Debian
bookworm, root, cgroup v1 with the unified hierarchy for systemd):

* the container's own sub-cgroup in every ``/sys/fs/cgroup/*`` hierarchy before it starts;
* a private mount namespace (``unshare --mount --propagation private``) with a tmpfs on
  ``/run/systemd/nspawn``;
* ``--register=no --keep-unit`` (no machined here) and ``--system-call-filter=bpf
  --capability=CAP_BPF,CAP_PERFMON`` so that ``IPAddressDeny=`` can be enforced;
* ``systemd.mask=systemd-firstboot.service`` on its command line;
* after boot, the ``memory`` and ``pids`` cgroup hierarchies remounted read-write and ``systemctl
  daemon-reexec``, so that ``MemoryMax=`` and ``TasksMax=`` are enforced.

``python tests/lab/edge_lab.py up [--devices N]`` boots the devices and writes ``.edge-lab/devices.json``
and ``.edge-lab/inventory.yml``; ``down`` stops them and leaves no container, namespace, veth or cgroup
behind. Every wait is bounded.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import queue
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
LAB = REPO / ".edge-lab"
NET_PREFIX = "10.231"
NAME_PREFIX = "dev"
CGROUP_GROUP = "dualdeploy-lab"
BOOT_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 30.0
# A session whose device went away (a power cut, a dead link) ends after about 20 s of silence instead
# of waiting for TCP to give up (about 15 minutes): a rollout to a lost device then fails that device.
SERVER_ALIVE = ("-o", "ServerAliveInterval=5", "-o", "ServerAliveCountMax=4")


class LabError(Exception):
    """The lab cannot be brought up or down; the message says which device and why."""


@dataclass
class LabDevice:
    """One booted device, as ``.edge-lab/devices.json`` lists it."""

    name: str
    index: int
    address: str
    controller_address: str
    ssh_port: int
    leader_pid: int
    nspawn_pid: int
    device_class: str = "x86_cpu"
    boot_seconds: float = 0.0

    @property
    def root(self) -> Path:
        """The device's persistent folders on this machine."""
        return LAB / self.name

    @property
    def veth(self) -> str:
        """The controller's end of the device's link (systemd-nspawn names it ``ve-<machine>``)."""
        return f"ve-{self.name}"[:15]


def _run(
    argv: Sequence[str], timeout: float = 30, check: bool = True, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    try:
        done = subprocess.run(
            list(argv), capture_output=True, text=True, timeout=timeout, check=False, input=stdin
        )
    except subprocess.TimeoutExpired as exc:
        raise LabError(f"{' '.join(argv)}: no answer within {timeout:g} s") from exc
    if check and done.returncode != 0:
        raise LabError(
            f"{' '.join(argv)}: exit {done.returncode}: {(done.stderr or done.stdout).strip()[-500:]}"
        )
    return done


def missing_tools() -> list[str]:
    """The Debian packages the lab needs that this machine lacks."""
    need = {
        "systemd-nspawn": "systemd-container",
        "nft": "nftables",
        "ip": "iproute2",
        "sshd": "openssh-server",
    }
    return sorted(
        {pkg for tool, pkg in need.items() if not shutil.which(tool) and not Path("/usr/sbin", tool).exists()}
    )


# --------------------------------------------------------------------------- one device's disk


def _prepare_disk(name: str, public_key: str) -> Path:
    """Create the device's persistent ``etc``, ``opt`` and ``root`` folders (kept if they exist)."""
    root = LAB / name
    etc = root / "etc"
    if not etc.exists():
        shutil.copytree("/etc", etc, symlinks=True, ignore_dangling_symlinks=True)
        # Only what a fresh device runs: ssh. This machine's own enabled units stay here.
        shutil.rmtree(etc / "systemd" / "system")
        wants = etc / "systemd" / "system" / "multi-user.target.wants"
        wants.mkdir(parents=True)
        (wants / "ssh.service").symlink_to("/lib/systemd/system/ssh.service")
        (etc / "hostname").write_text(name + "\n")
        (etc / "machine-id").write_text(secrets.token_hex(16) + "\n")
        (etc / "fstab").write_text("# the lab's devices mount nothing\n")
        for key in (etc / "ssh").glob("ssh_host_*"):
            key.unlink()
        _run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(etc / "ssh" / "ssh_host_ed25519_key")])
        conf = etc / "ssh" / "sshd_config.d"
        conf.mkdir(exist_ok=True)
        (conf / "dualdeploy-lab.conf").write_text(
            "PermitRootLogin prohibit-password\nPasswordAuthentication no\nUseDNS no\n"
        )
    ssh = root / "root" / ".ssh"
    ssh.mkdir(parents=True, mode=0o700, exist_ok=True)
    (ssh / "authorized_keys").write_text(public_key.strip() + "\n")
    (ssh / "authorized_keys").chmod(0o600)
    (root / "opt").mkdir(exist_ok=True)
    return root


def _controller_key() -> tuple[Path, str]:
    """The controller's SSH key for the lab (made once)."""
    key = LAB / "controller-key"
    if not key.exists():
        LAB.mkdir(parents=True, exist_ok=True)
        _run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "dualdeploy-lab", "-f", str(key)])
    return key, (key.with_suffix(".pub")).read_text()


# --------------------------------------------------------------------------- boot and network


def _cgroup_dirs(name: str) -> list[Path]:
    return [
        h / CGROUP_GROUP / name
        for h in sorted(Path("/sys/fs/cgroup").iterdir())
        if (h / "cgroup.procs").exists()
    ]


def _spawn(name: str, index: int) -> subprocess.Popen[bytes]:
    root = LAB / name
    nspawn = [
        "systemd-nspawn",
        "--quiet",
        "--directory=/",
        "--volatile=yes",
        f"--machine={name}",
        f"--hostname={name}",
        f"--bind={root / 'etc'}:/etc",
        f"--bind={root / 'opt'}:/opt",
        f"--bind={root / 'root'}:/root",
        "--network-veth",
        "--boot",
        "--register=no",
        "--keep-unit",
        "--console=read-only",
        "--system-call-filter=bpf",
        "--capability=CAP_BPF,CAP_PERFMON",
        "systemd.mask=systemd-firstboot.service",
    ]
    groups = " ".join(str(d) for d in _cgroup_dirs(name))
    script = (
        # Its own cgroup in every hierarchy, then a private mount namespace for nspawn's runtime folder.
        f'for g in {groups}; do mkdir -p "$g" && echo $$ > "$g/cgroup.procs"; done; '
        "exec unshare --mount --propagation private sh -c "
        "'mkdir -p /run/systemd/nspawn && mount -t tmpfs tmpfs /run/systemd/nspawn && exec \"$@\"' nspawn "
        + " ".join(nspawn)
    )
    log = (root / "console.log").open("ab")
    return subprocess.Popen(
        ["sh", "-c", script],
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def _children(pid: int) -> list[int]:
    with contextlib.suppress(OSError):
        tasks = Path(f"/proc/{pid}/task")
        return [int(c) for t in tasks.iterdir() for c in (t / "children").read_text().split()]
    return []


def _leader(shell_pid: int, deadline: float) -> tuple[int, int]:
    """(nspawn's pid, the container's PID 1 as seen here): sh → unshare → sh → nspawn → systemd."""
    while time.monotonic() < deadline:
        for pid in _walk(shell_pid):
            with contextlib.suppress(OSError):
                if Path(f"/proc/{pid}/comm").read_text().strip() == "systemd-nspawn":
                    for child in _children(pid):
                        if Path(f"/proc/{child}/comm").read_text().strip() == "systemd":
                            return pid, child
        time.sleep(0.1)
    raise LabError("systemd did not start as the container's PID 1")


def _walk(pid: int) -> Iterable[int]:
    yield pid
    for child in _children(pid):
        yield from _walk(child)


def _fence(device: LabDevice) -> list[str]:
    """The route that keeps the device's addresses here when its link is gone: without it, traffic to a
    powered-off device or over a pulled link would follow this machine's default route out."""
    return ["unreachable", f"{device.controller_address.rsplit('.', 1)[0]}.0/30", "metric", "4000"]


def _configure_link(device: LabDevice) -> None:
    _run(["ip", "route", "replace", *_fence(device)])
    _run(["ip", "addr", "replace", f"{device.controller_address}/30", "dev", device.veth])
    _run(["ip", "link", "set", device.veth, "up"])
    inside = ["nsenter", "-t", str(device.leader_pid), "-n"]
    _run([*inside, "ip", "link", "set", "lo", "up"])
    _run([*inside, "ip", "addr", "replace", f"{device.address}/30", "dev", "host0"])
    _run([*inside, "ip", "link", "set", "host0", "up"])
    # Everything else goes to the controller, as to a site's gateway: a sibling's address is then one
    # hop away, and only the device's own egress rules keep its traffic in.
    _run([*inside, "ip", "route", "replace", "default", "via", device.controller_address, "dev", "host0"])


def set_link(device: LabDevice, *, up: bool) -> None:
    """Take the device's link down (as a pulled cable) or bring it back with its addresses and route."""
    _run(["ip", "link", "set", device.veth, "up" if up else "down"])
    if up:
        _configure_link(device)


def _fault_table(device: LabDevice) -> str:
    return f"dualdeploy_lab_fault_{device.name}"


def shape(device: LabDevice, *, loss_percent: int = 0, rate_kbit: int = 0) -> None:
    """Make the device's link lossy and slow; :func:`unshape` undoes it.

    ``loss_percent``: each packet the controller sends to the device is dropped with that chance (an
    nftables rule here, where ``tc netem`` on the controller's end of the link would drop it).
    ``rate_kbit``: what goes to the device is held to that rate (an htb class on the link).
    This kernel may lack ``sch_netem`` (a Firecracker build has neither it nor modules), so loss
    comes from nftables' random numbers and delay from :class:`DelayRelay`.
    """
    unshape(device)
    if loss_percent:
        veth, table, chance = json.dumps(device.veth), _fault_table(device), int(loss_percent)
        ruleset = (
            f"table inet {table} {{\n"
            f"  chain out {{ type filter hook output priority 0; oifname {veth} counter "
            f"numgen random mod 100 < {chance} counter drop; }}\n"
            "}\n"
        )
        _run(["nft", "-f", "-"], stdin=ruleset)
    if rate_kbit:
        link = ["dev", device.veth]
        _run(["tc", "qdisc", "replace", *link, "root", "handle", "1:", "htb", "default", "1"])
        _run(
            [
                "tc",
                "class",
                "add",
                *link,
                "parent",
                "1:",
                "classid",
                "1:1",
                "htb",
                "rate",
                f"{int(rate_kbit)}kbit",
            ]
        )


def unshape(device: LabDevice) -> None:
    """Remove what :func:`shape` added to the device's link (nothing happens when there is none)."""
    if _run(["nft", "list", "table", "inet", _fault_table(device)], check=False).returncode == 0:
        _run(["nft", "delete", "table", "inet", _fault_table(device)])
    if "htb" in _run(["tc", "qdisc", "show", "dev", device.veth], check=False).stdout:
        _run(["tc", "qdisc", "del", "dev", device.veth, "root"])


def loss_counters(device: LabDevice) -> tuple[int, int]:
    """(packets sent to the device, packets dropped) since :func:`shape` made its link lossy."""
    shown = _run(["nft", "list", "table", "inet", _fault_table(device)]).stdout
    counts = [int(n) for n in re.findall(r"counter packets (\d+)", shown)]
    if len(counts) != 2:
        raise LabError(f"{device.name}: no loss counters in table {_fault_table(device)}: {shown!r}")
    return counts[0], counts[1]


class DelayRelay:
    """A TCP relay from ``127.0.0.1:<port>`` to the device's sshd that holds every chunk ``delay_s``
    seconds in each direction: ``2 * delay_s`` more round trip on the SSH path, for a kernel without
    ``sch_netem``. Point the inventory at it: ``write_inventory(..., via={name: ("127.0.0.1", port)})``.
    """

    def __init__(self, device: LabDevice, delay_s: float) -> None:
        """Listen on a free loopback port; relay each connection to the device's sshd."""
        self.target, self.delay_s = (device.address, device.ssh_port), delay_s
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.server.getsockname()[1])
        self.connections = 0
        self._closed = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self.server.accept()
                upstream = socket.create_connection(self.target, timeout=10)
            except OSError:
                continue
            upstream.settimeout(None)
            self.connections += 1
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        held: queue.Queue[tuple[float, bytes]] = queue.Queue()

        def send() -> None:
            while True:
                due, data = held.get()
                time.sleep(max(0.0, due - time.monotonic()))
                try:
                    if not data:
                        dst.shutdown(socket.SHUT_WR)
                        return
                    dst.sendall(data)
                except OSError:
                    return

        threading.Thread(target=send, daemon=True).start()
        while True:
            try:
                data = src.recv(65536)
            except OSError:
                data = b""
            held.put((time.monotonic() + self.delay_s, data))
            if not data:
                return

    def close(self) -> None:
        """Stop accepting; connections already open end with their peers."""
        self._closed.set()
        self.server.close()


def device_path(device: LabDevice, path: str) -> Path:
    """A path of the device's file system as seen from here.

    While the device runs: through ``/proc/<leader_pid>/root`` (its mounts included). When it is off:
    the persistent folder that holds it (``/etc``, ``/opt`` and ``/root`` survive; the rest was tmpfs).
    """
    if is_running(device):
        return Path(f"/proc/{device.leader_pid}/root") / path.lstrip("/")
    top, _, rest = path.lstrip("/").partition("/")
    if top not in ("etc", "opt", "root"):
        raise LabError(
            f"{device.name}: {path} did not survive the device's power-off (only /etc, /opt, /root)"
        )
    return device.root / top / rest


def device_processes(device: LabDevice) -> dict[int, list[str]]:
    """The device's processes seen from here (pid here → argv), found by the device's cgroup."""
    mark = f"/{CGROUP_GROUP}/{device.name}/"
    found = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            if mark in (proc / "cgroup").read_text():
                argv = (proc / "cmdline").read_bytes().split(b"\0")
                found[int(proc.name)] = [a.decode(errors="replace") for a in argv if a]
    return found


def ssh_argv(device: LabDevice, *command: str, timeout: int = 5) -> list[str]:
    """``ssh`` to the device as root with the lab's key and known hosts."""
    return [
        "ssh",
        "-i",
        str(LAB / "controller-key"),
        "-o",
        f"UserKnownHostsFile={LAB / 'known_hosts'}",
        "-o",
        "StrictHostKeyChecking=yes",
        "-o",
        f"ConnectTimeout={timeout}",
        "-o",
        "BatchMode=yes",
        "-o",
        "LogLevel=ERROR",
        *SERVER_ALIVE,
        f"root@{device.address}",
        *command,
    ]


def ssh(
    device: LabDevice, *command: str, timeout: float = 60, check: bool = True, script: str | None = None
) -> subprocess.CompletedProcess[str]:
    """Run a command on the device over SSH; with ``script``, ``sh -s`` runs that text (no quoting games)."""
    if script is not None:
        command = ("sh", "-s")
    return _run(ssh_argv(device, *command), timeout=timeout, check=check, stdin=script)


def _wait_ready(device: LabDevice, deadline: float) -> None:
    last = ""
    while time.monotonic() < deadline:
        done = ssh(device, "systemctl", "is-system-running", "--wait", timeout=30, check=False)
        state = done.stdout.strip()
        if state in ("running", "degraded"):
            return
        last = (done.stdout + done.stderr).strip()[-300:]
        time.sleep(0.5)
    raise LabError(f"{device.name}: not up within {BOOT_TIMEOUT_S:g} s over SSH ({last})")


def _enable_limits(device: LabDevice) -> None:
    """Make MemoryMax= and TasksMax= enforceable: memory and pids hierarchies writable, systemd re-read."""
    # nspawn bind-mounts the hierarchies read-only; a bind remount flips the flag (a plain remount is "busy").
    ssh(
        device,
        "mount -o remount,bind,rw /sys/fs/cgroup/memory && mount -o remount,bind,rw /sys/fs/cgroup/pids "
        "&& systemctl daemon-reexec",
    )


def _known_hosts(devices: Iterable[LabDevice]) -> None:
    lines = []
    for device in devices:
        key = (device.root / "etc" / "ssh" / "ssh_host_ed25519_key.pub").read_text().split()
        lines.append(f"{device.address} {key[0]} {key[1]}")
    (LAB / "known_hosts").write_text("\n".join(lines) + "\n")


# --------------------------------------------------------------------------- the lab


def load_devices() -> list[LabDevice]:
    """The devices of ``.edge-lab/devices.json`` (empty when no lab is up)."""
    path = LAB / "devices.json"
    if not path.exists():
        return []
    return [LabDevice(**entry) for entry in json.loads(path.read_text())]


def _save(devices: Sequence[LabDevice]) -> None:
    (LAB / "devices.json").write_text(json.dumps([asdict(d) for d in devices], indent=2) + "\n")


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs: not gone, not a zombie (a zombie child of ours is reaped here)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    if state != "Z":
        return True
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)
    return False


def is_running(device: LabDevice) -> bool:
    """Whether the device's container still runs."""
    if device.leader_pid <= 0 or not _alive(device.leader_pid):
        return False
    with contextlib.suppress(OSError):
        return Path(f"/proc/{device.leader_pid}/comm").read_text().strip() == "systemd"
    return False


def _stale(name: str) -> list[int]:
    """nspawn processes of a device that devices.json no longer lists (an interrupted ``up``)."""
    stale = []
    for pid in _pids_named("systemd-nspawn"):
        with contextlib.suppress(OSError):
            if f"--machine={name}".encode() in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0"):
                stale.append(pid)
    return stale


def boot(name: str, index: int) -> LabDevice:
    """Boot one device (its disk is kept from an earlier boot) and wait until it answers over SSH."""
    for pid in _stale(name):
        stop(LabDevice(name, index, "", "", 22, leader_pid=-1, nspawn_pid=pid))
    _, public_key = _controller_key()
    _prepare_disk(name, public_key)
    started = time.monotonic()
    deadline = started + BOOT_TIMEOUT_S
    shell = _spawn(name, index)
    try:
        return _come_up(name, index, shell.pid, started, deadline)
    except BaseException:
        # devices.json does not name a device that never came up, so `down` would not find it: stop it
        # here: everything it started is in its cgroups (the spawn script moves itself there first).
        _signal(shell.pid, signal.SIGKILL)
        _kill_members(name)
        with contextlib.suppress(subprocess.TimeoutExpired):
            shell.wait(timeout=STOP_TIMEOUT_S)
        _remove_cgroups(name)
        _run(["ip", "route", "del", "unreachable", f"{NET_PREFIX}.{index}.0/30"], check=False)
        raise


def _come_up(name: str, index: int, shell_pid: int, started: float, deadline: float) -> LabDevice:
    """Wait for a spawned device: its PID 1, its link, SSH, its cgroup limits."""
    try:
        nspawn_pid, leader = _leader(shell_pid, deadline)
    except LabError as exc:
        console = (LAB / name / "console.log").read_text(errors="replace").strip().splitlines()[-5:]
        raise LabError(f"{name}: {exc}: {' | '.join(console)}") from None
    device = LabDevice(
        name=name,
        index=index,
        address=f"{NET_PREFIX}.{index}.2",
        controller_address=f"{NET_PREFIX}.{index}.1",
        ssh_port=22,
        leader_pid=leader,
        nspawn_pid=nspawn_pid,
    )
    while not Path(f"/sys/class/net/{device.veth}").exists():
        if time.monotonic() > deadline:
            raise LabError(f"{name}: its veth {device.veth} never appeared")
        time.sleep(0.1)
    _configure_link(device)
    _known_hosts([*[d for d in load_devices() if d.name != name], device])
    _wait_ready(device, deadline)
    _enable_limits(device)
    device.boot_seconds = round(time.monotonic() - started, 2)
    return device


def up(count: int) -> list[LabDevice]:
    """Boot ``count`` devices (``dev1`` … ``devN``), reusing any that already run; write devices.json."""
    problems = missing_tools()
    if problems:
        raise LabError(f"the lab needs: apt-get install -y {' '.join(problems)}")
    if os.geteuid() != 0:
        raise LabError("the lab needs root (network namespaces, cgroups, systemd-nspawn)")
    LAB.mkdir(parents=True, exist_ok=True)
    running = {d.name: d for d in load_devices() if is_running(d)}
    devices = []
    for index in range(1, count + 1):
        name = f"{NAME_PREFIX}{index}"
        device = running.get(name) or boot(name, index)
        devices.append(device)
        _save(devices + [d for d in running.values() if d.name not in {x.name for x in devices}])
    _known_hosts(devices)
    write_inventory(devices)
    return devices


@contextlib.contextmanager
def private_lab(folder: Path, net_prefix: str, name_prefix: str, count: int) -> Iterator[list[LabDevice]]:
    """Boot ``count`` devices of a lab of their own (a test's, not a technician's ``.edge-lab``).

    ``folder`` holds their disks, ``net_prefix`` (``10.233``) their links and ``name_prefix`` their names;
    the module's settings are restored afterwards. On the way out every device is stopped and its links
    shaped by :func:`shape` are freed.

    Raises:
        LabError: a tool or root is missing, another lab with these prefixes runs, a device does not
            boot, or the lab left something behind.
    """
    problems = missing_tools()
    if problems:
        raise LabError(f"the lab needs: apt-get install -y {' '.join(problems)} (.ci/system-packages)")
    global LAB, NET_PREFIX, NAME_PREFIX
    saved = (LAB, NET_PREFIX, NAME_PREFIX)
    LAB, NET_PREFIX, NAME_PREFIX = folder, net_prefix, name_prefix
    running = leftovers()
    if running and not any(item.startswith(("process ", "veth ")) for item in running):
        # Only the cgroups and fence routes of a lab that was killed (no container runs): clear them.
        clear_remains()
        running = leftovers()
    if running:
        # Two labs with the same names and addresses would take each other's links and routes.
        LAB, NET_PREFIX, NAME_PREFIX = saved
        raise LabError(
            f"another lab with devices {name_prefix}* on {net_prefix}.0.0/16 runs here "
            f"({', '.join(running[:3])}): run one at a time"
        )
    try:
        yield up(count)
    finally:
        for device in load_devices():
            with contextlib.suppress(LabError):
                unshape(device)
        down()
        left = leftovers()
        LAB, NET_PREFIX, NAME_PREFIX = saved
        if left:
            raise LabError(f"the lab left behind: {', '.join(left)}")


def _signal(pid: int, sig: signal.Signals) -> None:
    """Signal one process; a pid that is unknown (-1, 0) is skipped: kill(-1) would reach every process."""
    if pid > 0:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def stop(device: LabDevice, *, power_cut: bool = False) -> None:
    """Shut a device down (its systemd powers off), or cut its power (SIGKILL to the whole container)."""
    if is_running(device) or _alive(device.nspawn_pid):
        if power_cut:
            _signal(device.nspawn_pid, signal.SIGKILL)
            _signal(device.leader_pid, signal.SIGKILL)
        else:
            _signal(device.nspawn_pid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_TIMEOUT_S
    while is_running(device) or _alive(device.nspawn_pid):
        if time.monotonic() > deadline:
            for pid in (device.nspawn_pid, device.leader_pid):
                _signal(pid, signal.SIGKILL)
            deadline = time.monotonic() + STOP_TIMEOUT_S
        time.sleep(0.1)
    _remove_cgroups(device.name)


def _kill_members(name: str) -> None:
    """SIGKILL every process in the device's cgroups (nspawn, the container's systemd and all below it)."""
    deadline = time.monotonic() + STOP_TIMEOUT_S
    while time.monotonic() < deadline:
        pids: set[int] = set()
        for top in _cgroup_dirs(name):
            for procs in top.rglob("cgroup.procs") if top.exists() else ():
                with contextlib.suppress(OSError):  # a cgroup its systemd removes meanwhile
                    pids.update(int(pid) for pid in procs.read_text().split())
        if not pids:
            return
        for pid in pids:
            _signal(pid, signal.SIGKILL)
        time.sleep(0.1)
    raise LabError(f"{name}: processes of a device that did not come up survive SIGKILL")


def _remove_cgroups(name: str) -> None:
    for top in _cgroup_dirs(name):
        if not top.exists():
            continue
        deadline = time.monotonic() + 10
        for folder in [*sorted((p for p in top.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)), top]:
            while folder.exists():
                try:
                    folder.rmdir()
                except OSError:
                    if time.monotonic() > deadline:
                        raise LabError(f"{name}: cgroup {folder} is still busy") from None
                    time.sleep(0.1)
    for hierarchy in Path("/sys/fs/cgroup").iterdir():
        with contextlib.suppress(OSError):
            (hierarchy / CGROUP_GROUP).rmdir()


def down() -> list[str]:
    """Stop every lab device; return their names. Their disks stay in ``.edge-lab/`` (``rm -r`` it)."""
    devices = load_devices()
    for device in devices:
        stop(device)
        _run(["ip", "route", "del", *_fence(device)], check=False)
    for name in {p.parent.name for p in LAB.glob("*/console.log")}:
        _remove_cgroups(name)
    with contextlib.suppress(FileNotFoundError):
        (LAB / "devices.json").unlink()
    return [d.name for d in devices]


def clear_remains() -> None:
    """Remove the empty cgroups and the fence routes this lab's names and addresses left when it was killed
    (SIGKILL to a test run, a power cut of the controller): they would make the next lab refuse to start."""
    for group in Path("/sys/fs/cgroup").glob(f"*/{CGROUP_GROUP}/{NAME_PREFIX}*"):
        _remove_cgroups(group.name)
    routes = _run(["ip", "route", "show", "type", "unreachable"], check=False).stdout.splitlines()
    for route in routes:
        words = route.split()
        if len(words) >= 2 and words[1].startswith(f"{NET_PREFIX}."):
            _run(["ip", "route", "del", *words], check=False)


def leftovers() -> list[str]:
    """What this lab leaves behind here: containers, veths, cgroups, routes (none after ``down``)."""
    found = []
    for pid in _pids_named("systemd-nspawn"):
        with contextlib.suppress(OSError):
            args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            if any(a.startswith(f"--machine={NAME_PREFIX}".encode()) for a in args):
                found.append(f"process {pid}")
    found += [
        f"veth {n.name}" for n in Path("/sys/class/net").iterdir() if n.name.startswith(f"ve-{NAME_PREFIX}")
    ]
    found += [f"cgroup {g}" for g in Path("/sys/fs/cgroup").glob(f"*/{CGROUP_GROUP}/{NAME_PREFIX}*")]
    routes = _run(["ip", "route", "show", "type", "unreachable"], check=False).stdout.splitlines()
    found += [f"route {r.strip()}" for r in routes if r.startswith(f"unreachable {NET_PREFIX}.")]
    return found


def _pids_named(comm: str) -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            with contextlib.suppress(OSError):
                if (proc / "comm").read_text().strip() == comm and _alive(int(proc.name)):
                    pids.append(int(proc.name))
    return pids


def write_inventory(
    devices: Sequence[LabDevice],
    path: Path | None = None,
    via: dict[str, tuple[str, int]] | None = None,
    **group_vars: Any,
) -> Path:
    """An inventory for the devices: root over SSH with the lab's key, the production (systemd) path.

    ``via`` reaches a device's sshd through another address and port (a :class:`DelayRelay`); its host key
    is still checked under the device's own address.
    """
    via = via or {}
    hosts = {
        d.name: {
            "ansible_host": via[d.name][0] if d.name in via else d.address,
            "ansible_port": via[d.name][1] if d.name in via else d.ssh_port,
            # The port sshd listens on, on the device (its firewall lets SSH replies out from it), which
            # the controller's port differs from when it goes through a relay.
            "edge_hardening_ssh_port": d.ssh_port,
            "ansible_user": "root",
            "ansible_ssh_private_key_file": str(LAB / "controller-key"),
            "ansible_ssh_common_args": (
                f"-o UserKnownHostsFile={LAB / 'known_hosts'} -o StrictHostKeyChecking=yes "
                f"-o ControlMaster=no -o ControlPath=none {' '.join(SERVER_ALIVE)} "
                f"-o HostKeyAlias={d.address}"
            ),
            "ansible_python_interpreter": "/usr/bin/python3",
            "edge_service_bind_address": d.address,
            # The controller is the site's management and client network: SSH, scrape, inference.
            "edge_hardening_management_networks": [f"{d.controller_address}/32"],
            "edge_hardening_client_networks": [f"{d.controller_address}/32"],
            "edge_service_ip_allow": [f"{d.controller_address}/32"],
        }
        for d in devices
    }
    inventory = {
        "all": {
            "children": {
                "edge": {
                    "children": {"x86_cpu": {"hosts": hosts}},
                    "vars": {
                        "edge_common_prefix": "/opt/dualdeploy",
                        "edge_service_manager": "systemd",
                        "edge_hardening_nftables_enabled": True,
                        # A test site: the bundles here are signed with the checkout's development key.
                        "edge_allow_dev_key": True,
                        **group_vars,
                    },
                }
            },
            "vars": {"edge_monitoring_output_dir": str(LAB / "monitoring")},
        }
    }
    path = path or LAB / "inventory.yml"
    path.write_text(yaml.safe_dump(inventory, sort_keys=False))
    return path


UNIT = "dualdeploy.service"


def report(devices: Sequence[LabDevice], bundle_dir: Path | None = None) -> list[dict[str, Any]]:
    """What each device runs, read on it: the unit's state and limits, the ruleset, a smoke inference."""
    rows = []
    for device in devices:
        shown = ssh(
            device, "systemctl", "show", UNIT, "-p", "ActiveState,MemoryMax,TasksMax,NRestarts", check=False
        )
        props = dict(line.split("=", 1) for line in shown.stdout.splitlines() if "=" in line)
        tables = ssh(device, "nft", "list", "tables", check=False).stdout.split()
        row: dict[str, Any] = {
            "device": device.name,
            "address": device.address,
            "unit": props.get("ActiveState", "?"),
            "memory_max": props.get("MemoryMax", "?"),
            "tasks_max": props.get("TasksMax", "?"),
            "restarts": props.get("NRestarts", "?"),
            "nft": ",".join(tables[i + 1] + " " + tables[i + 2] for i, w in enumerate(tables) if w == "table")
            or "none",
        }
        if bundle_dir is not None and row["unit"] == "active":
            sys.path.insert(0, str(REPO))
            from deploy.edge_rollout import smoke_inference

            try:
                row["smoke"] = smoke_inference(f"http://{device.address}:8000", bundle_dir)
            except Exception as exc:
                row["smoke"] = f"{type(exc).__name__}: {exc}"
        rows.append(row)
    return rows


def _print_report(rows: Iterable[dict[str, Any]]) -> None:
    for row in rows:
        print(
            f"{row['device']} {row['address']}: unit {row['unit']}, MemoryMax {row['memory_max']}, "
            f"TasksMax {row['tasks_max']}, restarts {row['restarts']}, nft {row['nft']}, "
            f"smoke {json.dumps(row.get('smoke'))}"
        )


def update(bundle_dir: Path) -> int:
    """Roll ``bundle_dir`` out to the running lab's devices, print each device's outcome, then the report.

    Returns 0 when every device took the bundle, 1 when any failed (named with its reason).

    Raises:
        LabError: no lab runs, or the bundle folder has no manifest.
    """
    devices = [d for d in load_devices() if is_running(d)]
    if not devices:
        raise LabError(f"no device of {LAB / 'devices.json'} runs: make edge-lab first")
    if not (bundle_dir / "manifest.json").is_file():
        raise LabError(
            f"BUNDLE={bundle_dir}: no manifest.json there (a bundle folder, e.g. dist/demo/latest)"
        )
    sys.path.insert(0, str(REPO))
    from deploy.edge_rollout import failure_message, run_rollout

    inventory = write_inventory(devices)
    result = run_rollout(inventory, bundle_dir, raise_on_failure=False)
    print(f"edge rollout {result.status} in {result.seconds:.1f} s")
    for host, entry in sorted(result.hosts.items()):
        if host != "localhost":
            print(
                f"  {host}: {entry.status} ({entry.changed} changed), bundle {entry.version}, "
                f"sent {len(entry.sent_files)} files ({entry.sent_bytes} bytes)"
            )
    _print_report(report(devices, bundle_dir))
    if result.status != "successful":
        print(f"edge lab: {failure_message(result)}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    """``up [--devices N]``, ``down``, ``status``, ``report``, ``update --bundle DIR``."""
    parser = argparse.ArgumentParser(prog="edge_lab", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    up_p = sub.add_parser("up", help="boot the devices and write .edge-lab/devices.json and inventory.yml")
    up_p.add_argument("--devices", type=int, default=int(os.environ.get("EDGE_LAB_DEVICES", "3")))
    sub.add_parser("down", help="stop every device; leave no container, namespace, veth or cgroup")
    sub.add_parser("status", help="print the devices and whether each runs")
    rep = sub.add_parser(
        "report", help="one line a device: unit state, MemoryMax, nft ruleset, smoke inference"
    )
    rep.add_argument("--bundle", type=Path, default=REPO / "dist" / "demo" / "latest")
    upd = sub.add_parser(
        "update",
        help="roll a bundle out to the running lab's devices, then report each (make edge-lab-update)",
    )
    upd.add_argument("--bundle", type=Path, required=True, help="the bundle folder (a version or `latest`)")
    args = parser.parse_args(argv)
    try:
        if args.command == "up":
            if not 1 <= args.devices <= 50:
                raise LabError(f"EDGE_LAB_DEVICES={args.devices}: choose 1 to 50")
            for d in up(args.devices):
                print(
                    f"{d.name}: {d.address} (ssh root@{d.address}), leader pid {d.leader_pid}, "
                    f"booted in {d.boot_seconds} s"
                )
            print(f"devices: {LAB / 'devices.json'}; inventory: {LAB / 'inventory.yml'}")
        elif args.command == "down":
            names = down()
            rest = leftovers()
            print(
                f"stopped {', '.join(names) or 'nothing'}"
                + (f"; left behind: {', '.join(rest)}" if rest else "")
            )
            return 1 if rest else 0
        elif args.command == "update":
            return update(args.bundle)
        elif args.command == "report":
            _print_report(report(load_devices(), args.bundle))
        else:
            for d in load_devices():
                print(f"{d.name}: {d.address} {'running' if is_running(d) else 'stopped'}")
    except LabError as exc:
        print(f"edge lab: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
