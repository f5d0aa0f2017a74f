"""Fixtures for the edge tests: real sshd servers, device inventories and derived bundles.

Nothing here stands in for the thing under test: devices are real prefixes reached over Ansible's
local connection or over real OpenSSH servers (Debian's openssh-server) on 127.0.0.1, the bundles are the
prebuild's real demo bundle and copies of it re-signed with the development key after one change.
"""

from __future__ import annotations

import contextlib
import getpass
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import yaml
from serving_support import free_port

from contract.bundle import (
    canonical_json,
    file_entries,
    load_private_key,
    load_tensors,
    read_manifest,
    save_tensors,
    write_manifest,
)

REPO = Path(__file__).resolve().parent.parent
ANSIBLE = REPO / "ansible"
BIN = Path(sys.executable).parent
SSHD = Path("/usr/sbin/sshd")
DEV_KEY = REPO / ".keys" / "dev-ed25519.pem"
DEV_PUB = REPO / ".keys" / "dev-ed25519.pub"
DEMO_LATEST = REPO / "dist" / "demo" / "latest"


def wait_port(port: int, timeout: float = 10.0) -> None:
    """Block until something accepts connections on 127.0.0.1:port."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            sock.settimeout(0.2)
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout}s")


# --------------------------------------------------------------------------- demo bundle


def demo_bundle() -> Path:
    """The prebuild's demo bundle (built with `python -m model_build build` when absent)."""
    if not (DEMO_LATEST / "manifest.json").is_file():
        subprocess.run(
            [
                str(REPO / ".venv" / "bin" / "python"),
                "-m",
                "model_build",
                "build",
                "models/demo.yaml",
                "--out",
                "dist",
            ],
            cwd=REPO,
            check=True,
        )
    return DEMO_LATEST.resolve()


def derive_bundle(
    src: Path, dst: Path, suffix: str, mutate: Callable[[Path], None], *, sign: bool = True
) -> Path:
    """Copy a bundle, change it with ``mutate``, and re-sign it as version ``<version>-<suffix>``.

    With ``sign=False`` the mutation happens after signing, which is what tampering looks like.
    """
    manifest = json.loads((src / "manifest.json").read_text())  # a writer: the plain data it signs
    version = f"{manifest['version']}-{suffix}"
    out = dst / version
    shutil.copytree(src, out)
    if sign:
        mutate(out)
    manifest["version"] = version
    manifest["files"] = file_entries(out, manifest["files"].keys())
    write_manifest(out, manifest, load_private_key(DEV_KEY))
    assert (out / "manifest.json").read_bytes() == canonical_json(manifest)
    if not sign:
        mutate(out)
    return out


def touch_onnx_docstring(bundle: Path, relpath: str = "model.fp32.onnx", text: str = "update") -> None:
    """Change one ONNX file's doc string: new bytes, same behaviour (a realistic one-file update)."""
    import onnx

    model = onnx.load(str(bundle / relpath))
    model.doc_string = f"{model.doc_string} {text}".strip()
    onnx.save(model, str(bundle / relpath))


def flip_byte(bundle: Path, relpath: str = "model.int8.onnx") -> None:
    """Corrupt one byte in the middle of a file (after signing: a tampered bundle)."""
    path = bundle / relpath
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def skew_golden(bundle: Path) -> None:
    """Make the golden outputs disagree with the model (signed: a bundle that fails the health gate)."""
    manifest = read_manifest(bundle)
    path = bundle / manifest.golden.outputs
    outputs = load_tensors(path)
    save_tensors(path, {k: np.roll(v, 1, axis=-1) + 1.0 for k, v in outputs.items()})


# --------------------------------------------------------------------------- sshd


@dataclass
class SshServer:
    """One real OpenSSH server on 127.0.0.1, started from its own config in a temporary folder."""

    root: Path
    port: int
    client_key: Path
    known_hosts: Path
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Start sshd in the foreground (its own process group) and wait for it to listen."""
        if os.geteuid() == 0:
            Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # privilege separation folder
        self.proc = subprocess.Popen(
            [str(SSHD), "-D", "-e", "-f", str(self.root / "sshd_config")],
            stdout=subprocess.DEVNULL,
            stderr=(self.root / "sshd.log").open("ab"),
            start_new_session=True,
        )
        wait_port(self.port)

    def stop(self) -> None:
        """Stop sshd and every connection it serves (the whole process group)."""
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        self.proc.wait(timeout=10)
        self.proc = None

    def host_vars(self) -> dict[str, Any]:
        """Inventory variables that reach this server with host-key checking on."""
        return {
            "ansible_host": "127.0.0.1",
            "ansible_port": self.port,
            "ansible_user": getpass.getuser(),
            "ansible_ssh_private_key_file": str(self.client_key),
            "ansible_ssh_common_args": (
                f"-o UserKnownHostsFile={self.known_hosts} -o StrictHostKeyChecking=yes "
                # No persistent master connection: a stopped sshd must mean an unreachable host.
                "-o ControlMaster=no -o ControlPath=none"
            ),
            "ansible_python_interpreter": "/usr/bin/python3",
        }


def make_sshd(root: Path) -> SshServer:
    """Create host and client keys and a config for one sshd on a free port."""
    root.mkdir(parents=True, mode=0o700, exist_ok=True)
    port = free_port()
    for name in ("host", "client"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(root / name)], check=True)
    (root / "authorized_keys").write_text((root / "client.pub").read_text())
    (root / "authorized_keys").chmod(0o600)
    host_pub = (root / "host.pub").read_text().split()
    (root / "known_hosts").write_text(f"[127.0.0.1]:{port} {host_pub[0]} {host_pub[1]}\n")
    sftp = next(
        (p for p in ("/usr/lib/openssh/sftp-server", "/usr/libexec/openssh/sftp-server") if Path(p).exists()),
        "internal-sftp",
    )
    (root / "sshd_config").write_text(
        "\n".join(
            [
                f"Port {port}",
                "ListenAddress 127.0.0.1",
                f"HostKey {root / 'host'}",
                f"PidFile {root / 'sshd.pid'}",
                f"AuthorizedKeysFile {root / 'authorized_keys'}",
                "PubkeyAuthentication yes",
                "PasswordAuthentication no",
                "KbdInteractiveAuthentication no",
                "PermitRootLogin prohibit-password",
                # The keys sit under the pytest temporary folder, whose parents (/tmp) are world-writable.
                "StrictModes no",
                "UsePAM no",
                f"Subsystem sftp {sftp}",
                "LogLevel ERROR",
                "",
            ]
        )
    )
    return SshServer(root=root, port=port, client_key=root / "client", known_hosts=root / "known_hosts")


# --------------------------------------------------------------------------- inventory


@dataclass
class Device:
    """One edge device of a test fleet."""

    name: str
    prefix: Path
    port: int
    ssh: SshServer | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    tls_cert: Path | None = None
    token: str | None = None

    @property
    def endpoint(self) -> str:
        """The server's base URL."""
        return f"{'https' if self.tls_cert else 'http'}://127.0.0.1:{self.port}"

    def host_vars(self) -> dict[str, Any]:
        """Inventory variables of this device."""
        conn = (
            self.ssh.host_vars()
            if self.ssh
            else {
                "ansible_connection": "local",
                "ansible_python_interpreter": "{{ ansible_playbook_python }}",
            }
        )
        return {
            **conn,
            "edge_common_prefix": str(self.prefix),
            "edge_common_instance": "dualdeploy",
            "edge_service_port": self.port,
            **self.extra,
        }

    def current_version(self) -> str | None:
        """The release the device's `current` link points at."""
        link = self.prefix / "current"
        return link.resolve().name if link.is_symlink() else None

    def served(self) -> dict[str, Any]:
        """Ask the running server what it serves (model metadata) — a real HTTP request."""
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        verify: Any = ssl.create_default_context(cafile=str(self.tls_cert)) if self.tls_cert else True
        response = httpx.get(f"{self.endpoint}/v2/models/demo", headers=headers, verify=verify, timeout=10.0)
        response.raise_for_status()
        return dict(response.json())

    def stop_service(self) -> None:
        """Stop the device's supervised server (test teardown)."""
        ctl = self.prefix / "bin" / "dualdeploy-ctl"
        if ctl.exists():
            subprocess.run([str(ctl), "stop"], check=False, capture_output=True, timeout=60)


def write_inventory(
    path: Path,
    devices: Iterable[Device],
    group_vars: dict[str, Any] | None = None,
    *,
    allow_dev_key: bool = True,
) -> Path:
    """Write a YAML inventory with every device in the `edge` group.

    The test bundles are signed with the development key, so the inventory allows it
    (``edge_allow_dev_key``) unless ``allow_dev_key`` is false.
    """
    inventory = {
        "all": {
            "children": {
                "edge": {"hosts": {d.name: d.host_vars() for d in devices}, "vars": group_vars or {}}
            },
            "vars": {
                "edge_monitoring_output_dir": str(path.parent / "monitoring"),
                "edge_allow_dev_key": allow_dev_key,
            },
        }
    }
    path.write_text(yaml.safe_dump(inventory, sort_keys=False))
    return path


# --------------------------------------------------------------------------- secrets


def write_vault_file(path: Path, data: dict[str, Any], password: str) -> Path:
    """Write ``data`` as YAML encrypted with Ansible Vault (the ansible-vault CLI, as a site would)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    secret = path.parent / ".vault-pass"
    secret.write_text(password)
    secret.chmod(0o600)
    subprocess.run(
        [
            str(Path(sys.executable).parent / "ansible-vault"),
            "encrypt",
            "--vault-password-file",
            str(secret),
            str(path),
        ],
        check=True,
        capture_output=True,
    )
    secret.unlink()
    assert path.read_text().startswith("$ANSIBLE_VAULT;")
    return path


# --------------------------------------------------------------------------- ansible on this machine


def ansible_env() -> dict[str, str]:
    """The environment for Ansible's own CLIs: the repository's ansible.cfg and this venv's binaries."""
    return {
        **os.environ,
        "ANSIBLE_CONFIG": str(ANSIBLE / "ansible.cfg"),
        "ANSIBLE_NOCOLOR": "1",
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
    }


def run_ansible(tool: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """Run one of this venv's Ansible CLIs (``ansible``, ``ansible-playbook``) and require success."""
    run = subprocess.run(
        [str(BIN / tool), *args],
        capture_output=True,
        text=True,
        check=False,
        env=ansible_env(),
        timeout=timeout,
    )
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    return run


def render_template(
    template: Path, dest: Path, variables: dict[str, Any], *, role_vars: bool = False
) -> Path:
    """Render a role template through Ansible itself (ansible.builtin.template on localhost).

    With ``role_vars`` the role's own internals (its vars/main.yml) are defined too, so the template
    sees the role's real derived values; ``variables`` are the inventory's and the earlier roles' facts.
    """
    extra = dest.with_name(f"{dest.name}.vars.json")
    extra.write_text(json.dumps(variables))
    internals = ["-e", f"@{template.parent.parent / 'vars' / 'main.yml'}"] if role_vars else []
    run_ansible(
        "ansible",
        *("localhost", "-c", "local", "-m", "ansible.builtin.template"),
        *("-a", f"src={template} dest={dest} mode=0644", *internals, "-e", f"@{extra}"),
    )
    return dest


def render_unit(root: Path, entry: dict[str, Any], device_class: str, memory_max: str = "") -> Path:
    """Render the edge_service unit for a device class (entry: its row of the table) under ``root``.

    The wrapper it starts exists and is executable, so ``systemd-analyze verify`` checks the whole unit.
    """
    prefix = root / device_class
    (prefix / "bin").mkdir(parents=True, exist_ok=True)
    wrapper = prefix / "bin" / "dualdeploy-serve"  # the role's _edge_service_wrapper for this prefix
    wrapper.write_text("#!/bin/sh\nexit 0\n")
    wrapper.chmod(0o755)
    defaults = yaml.safe_load((ANSIBLE / "roles" / "edge_service" / "defaults" / "main.yml").read_text())
    variables = {
        **defaults,
        "edge_common_instance": "dualdeploy",
        "edge_common_service_user": "root",
        "edge_common_prefix": str(prefix),
        "edge_service_memory_max": memory_max,
        "edge_preflight_device": {"device_class": device_class, "entry": entry},
        "edge_bundle_release": {"choice": {"trt_engine_cache": entry["trt_engine_cache"]}},
    }
    templates = ANSIBLE / "roles" / "edge_service" / "templates"
    # The unit requires the socket unit that owns the public port: render it beside the unit, where
    # `systemd-analyze verify` looks for it.
    common = yaml.safe_load((ANSIBLE / "roles" / "edge_common" / "vars" / "main.yml").read_text())
    socket_vars = {**variables, "_edge_common_cidr_pattern": common["_edge_common_cidr_pattern"]}
    render_template(
        templates / "dualdeploy.socket.j2", root / "dualdeploy.socket", socket_vars, role_vars=True
    )
    (root / "dualdeploy.socket.vars.json").unlink(missing_ok=True)
    return render_template(
        templates / "dualdeploy.service.j2",
        root / f"dualdeploy-{device_class}.service",
        variables,
        role_vars=True,
    )


def plugin_in_child(plugin: Path, call: str, args: list[list[Any]]) -> list[Any]:
    """Call a function of a collection plugin in a child interpreter and return its JSON result.

    Importing an Ansible plugin pulls in ``ansible.module_utils``, whose import patches
    ``sys.intern`` and ``dataclasses`` for the whole process; torch's exporter then fails in any
    later test of the same run. The plugins run on devices in their own process anyway.
    """
    script = (
        "import importlib.util, json, sys\n"
        f"sys.path.insert(0, {str(REPO / 'ansible' / 'collections')!r})  # the collection's module_utils\n"
        "spec = importlib.util.spec_from_file_location('plugin', sys.argv[1])\n"
        "module = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(module)\n"
        f"print(json.dumps([getattr(module, {call!r})(*a) for a in json.loads(sys.argv[2])]))\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", script, str(plugin), json.dumps(args)],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    results: list[Any] = json.loads(run.stdout)
    return results
