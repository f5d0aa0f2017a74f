"""Run the edge playbook through ansible-runner: the one Python entry point to ``ansible/edge.yml``.

Used by ``make edge`` (the CLI below), by the ``EdgeFleet`` Pulumi component's dynamic provider, by the
tests and by the benchmark. Pure ansible-runner: no Pulumi import here.

    python -m deploy.edge_rollout up --inventory ansible/inventories/local --bundle dist/demo/latest
    python -m deploy.edge_rollout stop --inventory ansible/inventories/local
    python -m deploy.edge_rollout matrix        # the README's device compatibility matrix
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from contract.detect import DEVICE_TABLE

REPO_ROOT = Path(__file__).resolve().parent.parent
ANSIBLE_DIR = REPO_ROOT / "ansible"
DEFAULT_PLAYBOOK = ANSIBLE_DIR / "edge.yml"
DEFAULT_INVENTORY = ANSIBLE_DIR / "inventories" / "local"


class RolloutError(Exception):
    """A rollout did not succeed on every host.

    Attributes:
        result: the full rollout result (per-host status and reasons).
    """

    def __init__(self, message: str, result: RolloutResult) -> None:
        super().__init__(message)
        self.result = result


@dataclass
class HostResult:
    """What one host ended up with after a rollout."""

    status: str  # "changed", "unchanged", "failed", "unreachable", "skipped"
    version: str | None = None
    endpoint: str | None = None
    device_class: str | None = None
    variant: str | None = None
    changed: int = 0
    reason: str | None = None
    sent_files: list[str] = field(default_factory=list)
    sent_bytes: int = 0

    def as_dict(self) -> dict[str, Any]:
        """Plain-data form (Pulumi outputs, JSON)."""
        return {
            "status": self.status,
            "version": self.version,
            "endpoint": self.endpoint,
            "device_class": self.device_class,
            "variant": self.variant,
            "changed": self.changed,
            "reason": self.reason,
            "sent_bytes": self.sent_bytes,
        }


@dataclass
class RolloutResult:
    """The outcome of one playbook run."""

    status: str
    rc: int
    hosts: dict[str, HostResult]
    seconds: float
    errors: list[str] = field(default_factory=list)

    @property
    def failed(self) -> list[str]:
        """Hosts that failed (not counting unreachable ones)."""
        return sorted(h for h, r in self.hosts.items() if r.status == "failed")

    @property
    def unreachable(self) -> list[str]:
        """Hosts that could not be reached."""
        return sorted(h for h, r in self.hosts.items() if r.status == "unreachable")

    @property
    def changed(self) -> int:
        """Total changed tasks over every host."""
        return sum(r.changed for r in self.hosts.values())


# --------------------------------------------------------------------------- fingerprints


def tree_hash(paths: Iterable[Path]) -> str:
    """sha256 over the relative names and bytes of every file under ``paths``.

    Files are taken in the order of their names relative to each root's parent, never of their
    absolute paths, so the hash is the same wherever the checkout lies (and however it is reached:
    a symlinked project folder gave a different order before, and so a different hash).
    """
    entries: list[tuple[str, Path]] = []
    for root in (Path(p) for p in paths):
        files = [root] if root.is_file() else [p for p in root.rglob("*") if p.is_file()]
        kept = [path for path in files if "__pycache__" not in path.parts]
        entries += [(path.relative_to(root.parent).as_posix(), path) for path in kept]
    digest = hashlib.sha256()
    for rel, path in sorted(entries):
        digest.update(rel.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def inventory_hash(inventory: Path) -> str:
    """Content hash of an inventory: the file or folder, plus the group_vars/ and host_vars/ that Ansible
    reads beside an inventory file."""
    inventory = Path(inventory)
    paths = [inventory]
    if inventory.is_file():
        paths += [p for p in (inventory.parent / "group_vars", inventory.parent / "host_vars") if p.exists()]
    return tree_hash(paths)


def playbook_hash(playbook: Path = DEFAULT_PLAYBOOK) -> str:
    """Content hash of the playbook, its roles, the local collection and ansible.cfg."""
    base = playbook.resolve().parent
    return tree_hash([playbook, base / "roles", base / "collections", base / "ansible.cfg"])


def bundle_version(bundle_dir: Path) -> str:
    """The ``version`` of a bundle's manifest (unverified read: the playbook verifies).

    Raises:
        FileNotFoundError: naming the missing manifest.
        ValueError: the manifest has no version.
    """
    from contract.bundle import BundleError, read_manifest  # noqa: PLC0415

    manifest_path = Path(bundle_dir) / "manifest.json"
    if not manifest_path.is_file():
        raise FileNotFoundError(f"{manifest_path}: no bundle manifest (run `make build` first?)")
    try:
        return read_manifest(Path(bundle_dir)).version
    except BundleError as exc:
        raise ValueError(f"{manifest_path}: {exc}") from None


# --------------------------------------------------------------------------- running


def _parse_events(events: Iterable[Mapping[str, Any]]) -> dict[str, HostResult]:
    hosts: dict[str, HostResult] = {}
    for event in events:
        data = event.get("event_data") or {}
        host = data.get("host")
        kind = event.get("event", "")
        if not host or not kind.startswith("runner_on_"):
            continue
        entry = hosts.setdefault(host, HostResult(status="unchanged"))
        res = data.get("res") or {}
        if kind == "runner_on_ok":
            facts = res.get("ansible_facts") or {}
            sent = facts.get("edge_bundle_sent")
            if isinstance(sent, dict):
                entry.sent_files.extend(str(f) for f in sent.get("files") or [])
                entry.sent_bytes += int(sent.get("bytes") or 0)
            result = facts.get("edge_service_result")
            if isinstance(result, dict):
                entry.version = result.get("version")
                entry.endpoint = result.get("endpoint")
                entry.device_class = result.get("device_class")
                health = result.get("health") or {}
                entry.variant = health.get("variant") if isinstance(health, dict) else None
        elif kind == "runner_on_failed" and not data.get("ignore_errors"):
            msg = str(res.get("msg") or "")
            stderr = str(res.get("stderr") or "").strip()
            # A failed command says only "non-zero return code": its stderr carries the reason.
            entry.reason = (
                stderr if stderr and (not msg or msg == "non-zero return code") else msg or "failed"
            )
        elif kind == "runner_on_unreachable":
            entry.reason = str(res.get("msg") or "unreachable")
    return hosts


def run_rollout(
    inventory: str | Path = DEFAULT_INVENTORY,
    bundle_dir: str | Path | None = None,
    *,
    playbook: str | Path = DEFAULT_PLAYBOOK,
    public_key: str | Path | None = None,
    vault_password: str | None = None,
    limit: str | None = None,
    extravars: Mapping[str, Any] | None = None,
    forks: int | None = None,
    quiet: bool = True,
    raise_on_failure: bool = True,
) -> RolloutResult:
    """Run ``playbook`` with ansible-runner and collect the per-host outcome.

    Args:
        inventory: inventory file or folder.
        bundle_dir: the bundle (version folder or ``latest`` link); sets ``edge_bundle_dir``.
        playbook: the playbook (``ansible/edge.yml`` by default; ``ansible/edge-stop.yml`` stops).
        public_key: the signer's public key; sets ``edge_bundle_public_key``.
        vault_password: the inventory's Ansible Vault password; written to a 0600 file that is
            removed when the run ends.
        limit: an Ansible host pattern restricting the run.
        extravars: more extra variables (e.g. ``edge_rollout_serial``).
        forks: parallel hosts; default from ansible.cfg.
        quiet: hide the playbook output (it is still in the runner's artifacts).
        raise_on_failure: raise :class:`RolloutError` unless the run succeeded.

    Returns:
        The per-host result.

    Raises:
        RolloutError: the run did not succeed; the message names failed and unreachable hosts
            with their reasons.
        FileNotFoundError: the playbook or inventory does not exist.
    """
    import ansible_runner  # noqa: PLC0415  (imported late: the Pulumi provider pickles this module)

    playbook, inventory = Path(playbook).resolve(), Path(inventory).resolve()
    for what, path in (("playbook", playbook), ("inventory", inventory)):
        if not path.exists():
            raise FileNotFoundError(f"{what} {path} does not exist")
    variables: dict[str, Any] = dict(extravars or {})
    if bundle_dir is not None:
        variables["edge_bundle_dir"] = str(Path(bundle_dir).absolute())
    if public_key is not None:
        variables["edge_bundle_public_key"] = str(Path(public_key).resolve())
    with tempfile.TemporaryDirectory(prefix="edge-runner-") as private:
        cmdline: list[str] = []
        if vault_password is not None:
            secret = Path(private) / "vault-password"
            fd = os.open(secret, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as handle:
                handle.write(vault_password)
            cmdline += ["--vault-password-file", str(secret)]
        # Run the ansible-playbook of this interpreter's environment, whatever PATH says.
        bindir = Path(sys.executable).parent
        env = {
            "ANSIBLE_CONFIG": str(playbook.parent / "ansible.cfg"),
            "ANSIBLE_NOCOLOR": "1",
            "PATH": f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}",
        }
        started = time.perf_counter()
        runner = ansible_runner.run(
            private_data_dir=private,
            project_dir=str(playbook.parent),
            playbook=str(playbook),
            inventory=str(inventory),
            extravars=variables,
            limit=limit,
            forks=forks,
            cmdline=" ".join(cmdline) or None,
            envvars=env,
            quiet=quiet,
        )
        seconds = time.perf_counter() - started
        hosts = _parse_events(runner.events)
        stats = runner.stats or {}
        # Errors before any host ran (inventory, vault, syntax) are only in Ansible's own output.
        errors = [
            line.strip()
            for line in runner.stdout.read().splitlines()
            if line.lstrip().startswith(("ERROR!", "[ERROR]"))
        ]
    for host, count in (stats.get("changed") or {}).items():
        hosts.setdefault(host, HostResult(status="unchanged")).changed = int(count)
    for host in hosts.values():
        host.status = "changed" if host.changed else "unchanged"
    for key, status in (("failures", "failed"), ("dark", "unreachable")):
        for host in stats.get(key) or {}:
            hosts.setdefault(host, HostResult(status=status)).status = status
    result = RolloutResult(
        status=str(runner.status), rc=int(runner.rc or 0), hosts=hosts, seconds=seconds, errors=errors
    )
    if raise_on_failure and result.status != "successful":
        raise RolloutError(failure_message(result), result)
    return result


def failure_message(result: RolloutResult) -> str:
    """One message naming every failed and unreachable host with its reason."""
    parts = [
        f"{h} {r.status}: {r.reason or 'no reason reported'}"
        for h, r in sorted(result.hosts.items())
        if r.status in ("failed", "unreachable")
    ]
    if not parts:
        parts = result.errors or [f"ansible-runner ended with status {result.status} (rc {result.rc})"]
    return f"edge rollout {result.status}: " + "; ".join(parts)


# --------------------------------------------------------------------------- device matrix


def device_matrix(table_path: Path = DEVICE_TABLE) -> str:
    """The README's device compatibility matrix, generated from the device-class table."""
    table = yaml.safe_load(table_path.read_text())
    rows = [
        "| Device class | Detected by | Formats | Precisions (preferred first) | ONNX Runtime package "
        "| Execution providers | Engine cache | Memory limit |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, entry in table["classes"].items():
        detect = entry.get("detect") or {}
        facts = []
        if "arch" in detect:
            facts.append(f"arch `{detect['arch']}`")
        facts += [f"file `{f}`" for f in detect.get("files", [])]
        facts += [f"command `{c}`" for c in detect.get("commands", [])]
        if detect.get("nvidia_gpu"):
            facts.append("NVIDIA driver")
        rows.append(
            f"| `{name}` ({entry.get('description', '')}) | {', '.join(facts) or '—'} "
            f"| {', '.join(entry.get('formats', []))} | {', '.join(entry.get('precisions', []))} "
            f"| `{entry.get('onnxruntime_package')}` | {', '.join(entry.get('providers', []))} "
            f"| {'yes' if entry.get('trt_engine_cache') else 'no'} | {entry.get('memory_max')} |"
        )
    rows += [
        "",
        "INT8 is validated per CPU class (ONNX Runtime's integer kernels differ by CPU features). A device "
        "serves an INT8 variant only on a class its manifest lists under `cpu.validated`; elsewhere it "
        "serves FP32 and says so in its log, its model metadata and `dualdeploy_int8_not_validated`.",
        "",
        "| CPU class | Arch | CPU features (`/proc/cpuinfo`) | How a build checks it |",
        "|---|---|---|---|",
    ]
    for name, entry in (table.get("cpu_classes") or {}).items():
        emulator = entry.get("emulator")
        how = (
            f"natively on such a host; elsewhere emulated (`{' '.join(emulator)}`)"
            if emulator
            else "natively on such a host only; elsewhere recorded as unverified"
        )
        rows.append(
            f"| `{name}` ({entry.get('description', '')}) | `{entry['arch']}` "
            f"| {', '.join(f'`{f}`' for f in entry.get('requires') or []) or '—'} | {how} |"
        )
    return "\n".join(rows) + "\n"


# --------------------------------------------------------------------------- smoke test


def smoke_inference(endpoint: str, bundle_dir: Path) -> dict[str, Any]:
    """One inference with the bundle's first golden input row; returns output summary and latency.

    The request uses the v2 binary tensor extension, as standard clients do, so the latency is
    the server's, not the time to format an image as JSON floats.
    """
    import httpx  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415

    from contract.bundle import load_tensors, read_manifest  # noqa: PLC0415
    from contract.codec import decode_infer_response, encode_infer_request  # noqa: PLC0415

    manifest = read_manifest(Path(bundle_dir))
    inputs = load_tensors(Path(bundle_dir) / manifest.golden.inputs)
    body, headers = encode_infer_request({n: a[:1] for n, a in inputs.items()})
    url = f"{endpoint}/v2/models/{manifest.model}/infer"
    with httpx.Client(timeout=30.0) as client:
        client.post(url, content=body, headers=headers).raise_for_status()  # first call: connection set-up
        started = time.perf_counter()
        response = client.post(url, content=body, headers=headers)
        latency_ms = (time.perf_counter() - started) * 1000
    response.raise_for_status()
    header_length = response.headers.get("inference-header-content-length")
    doc, arrays = decode_infer_response(response.content, header_length)
    name = doc["outputs"][0]["name"]
    values = arrays[name].astype(np.float64)
    summary: dict[str, Any] = {
        "output": name,
        "shape": list(values.shape),
        "latency_ms": round(latency_ms, 2),
    }
    if manifest.task == "classification":
        summary["top1"] = int(np.argmax(values[0]))
    else:
        summary["norm"] = round(float(np.linalg.norm(values[0])), 4)
    return summary


# --------------------------------------------------------------------------- CLI


def _parse_extra(pairs: list[str]) -> dict[str, Any]:
    extra: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"-e {pair!r}: expected KEY=VALUE (VALUE is YAML)")
        extra[key] = yaml.safe_load(value)
    return extra


def main(argv: list[str] | None = None) -> int:
    """The CLI behind ``make edge`` and ``make edge-stop``."""
    parser = argparse.ArgumentParser(
        prog="python -m deploy.edge_rollout", description=__doc__.splitlines()[0]
    )
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="roll the bundle out (ansible/edge.yml)")
    stop = sub.add_parser("stop", help="stop the service on the devices (ansible/edge-stop.yml)")
    for p in (up, stop):
        p.add_argument("--inventory", type=Path, default=DEFAULT_INVENTORY, help="inventory file or folder")
        p.add_argument("--limit", help="Ansible host pattern to restrict the run")
        p.add_argument("--vault-password-file", type=Path, help="file holding the inventory's vault password")
        p.add_argument("-v", "--verbose", action="store_true", help="show the playbook output")
    up.add_argument(
        "--bundle", type=Path, default=REPO_ROOT / "dist" / "demo" / "latest", help="bundle folder"
    )
    up.add_argument("--public-key", type=Path, help="signer's public key (default .keys/dev-ed25519.pub)")
    up.add_argument(
        "-e", "--extra", action="append", default=[], help="extra variable KEY=VALUE (YAML value)"
    )
    up.add_argument("--smoke", action="store_true", help="send one inference to each endpoint and time it")
    sub.add_parser("matrix", help="print the device compatibility matrix (Markdown)")
    args = parser.parse_args(argv)

    if args.command == "matrix":
        sys.stdout.write(device_matrix())
        return 0
    password = args.vault_password_file.read_text().strip() if args.vault_password_file else None
    try:
        if args.command == "stop":
            result = run_rollout(
                args.inventory,
                playbook=ANSIBLE_DIR / "edge-stop.yml",
                limit=args.limit,
                vault_password=password,
                quiet=not args.verbose,
            )
            for host, entry in sorted(result.hosts.items()):
                print(f"{host}: {'stopped' if entry.changed else 'was not running'}")
            return 0
        public_key = args.public_key
        if public_key is None and (REPO_ROOT / ".keys" / "dev-ed25519.pub").exists():
            print("warning: using the development signing key .keys/dev-ed25519.pub", file=sys.stderr)
        result = run_rollout(
            args.inventory,
            args.bundle,
            public_key=public_key,
            limit=args.limit,
            vault_password=password,
            extravars=_parse_extra(args.extra),
            quiet=not args.verbose,
        )
    except RolloutError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"edge rollout {result.status} in {result.seconds:.1f}s")
    for host, entry in sorted(result.hosts.items()):
        if host == "localhost":
            continue
        print(
            f"  {host}: {entry.status} ({entry.changed} changed) bundle {entry.version} "
            f"[{entry.device_class}, variant {entry.variant}] at {entry.endpoint}"
        )
        if args.smoke and entry.endpoint:
            smoke = smoke_inference(entry.endpoint, args.bundle)
            print(f"    smoke inference: {json.dumps(smoke)}")
    devices = {h: r for h, r in result.hosts.items() if h != "localhost"}
    if all(r.changed == 0 for r in devices.values()):
        print("No changes: every device already serves this bundle (changed=0).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
