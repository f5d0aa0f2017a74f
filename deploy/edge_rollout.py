"""Run the edge playbook through ansible-runner: the one Python entry point to ``ansible/edge.yml``.

Used by ``make edge`` (the CLI below), by the ``EdgeFleet`` Pulumi component's dynamic provider, by the
tests and by the benchmark. Pure ansible-runner: no Pulumi import here.

    python -m deploy.edge_rollout up --inventory ansible/inventories/local --bundle dist/demo/latest
    python -m deploy.edge_rollout stop --inventory ansible/inventories/local
    python -m deploy.edge_rollout matrix        # the README's device compatibility matrix
"""

from __future__ import annotations

import argparse
import contextlib
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
from deploy.edge_report import DeviceReport, build_report

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
    cpu_class: str | None = None
    previous_version: str | None = None
    health: dict[str, Any] = field(default_factory=dict)
    gate_failed: bool = False
    facts: dict[str, Any] = field(default_factory=dict)
    switched: bool = False

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
    report: DeviceReport | None = None
    report_files: list[Path] = field(default_factory=list)
    vault_password_given: bool = False

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
            device = facts.get("edge_preflight_device")
            if isinstance(device, dict):
                entry.device_class = device.get("device_class")
                entry.cpu_class = (device.get("found") or {}).get("cpu_class")
            if (
                str(res.get("target", "")).startswith("releases/")
                and "previous" in res
                and not entry.switched
            ):
                # The first switch of `current` reports what it named before this run (a rollback's
                # switch back comes later and is not the previous version).
                entry.switched = True
                previous = res.get("previous")
                entry.previous_version = Path(str(previous)).name if previous else None
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
                entry.health = dict(health) if isinstance(health, dict) else {}
                # What the monitoring role reads, for a run after a stopped rollout.
                entry.facts = {
                    "edge_service_result": result,
                    "edge_service_endpoint": facts.get("edge_service_endpoint") or result.get("endpoint"),
                }
        elif kind == "runner_on_failed" and not data.get("ignore_errors"):
            entry.reason = _reason(res, "failed")
            entry.gate_failed = entry.gate_failed or "failed the health gate" in entry.reason
        elif kind == "runner_on_unreachable":
            entry.reason = _reason(res, "unreachable")
    return hosts


def _reason(res: Mapping[str, Any], default: str) -> str:
    """Why a task failed or a host went unreachable, from a task result.

    A loop task's own message is only "All items completed" or "One or more items failed": the reason is
    in the first item that failed or went unreachable. A failed command says only "non-zero return
    code": its stderr carries the reason.
    """
    items = [
        item
        for item in res.get("results") or []
        if isinstance(item, Mapping) and (item.get("failed") or item.get("unreachable"))
    ]
    if items:
        return _reason(items[0], default)
    msg = str(res.get("msg") or "")
    stderr = str(res.get("stderr") or "").strip()
    return stderr if stderr and (not msg or msg == "non-zero return code") else msg or default


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
    report_dir: str | Path | None = None,
    tags: str | None = None,
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
        report_dir: write the report of every device (``report.json``, ``report.md``) here. After the
            playbook, each host of the ``edge`` group is looked at (read-only: its ``current`` link), so
            a host the rollout never reached has its row too; when the rollout stopped, the monitoring
            role still runs for the hosts it reached.
        tags: run only the tasks with these Ansible tags (``preflight``: the checks, nothing changes).

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
            tags=tags,
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
            status=str(runner.status),
            rc=int(runner.rc or 0),
            hosts=hosts,
            seconds=seconds,
            errors=errors,
            vault_password_given=vault_password is not None,
        )
        if report_dir is not None and not _vault_fix(result):
            common = {
                "private_data_dir": private,
                "inventory": str(inventory),
                "limit": limit,
                "forks": forks,
                "cmdline": " ".join(cmdline) or None,
                "envvars": env,
                "quiet": True,
            }
            if result.status != "successful" and playbook.name == DEFAULT_PLAYBOOK.name:
                _publish_reached(common, variables, hosts)
            current = _look_at_devices(common)
            version = str(variables["edge_bundle_dir"]) if "edge_bundle_dir" in variables else None
            with contextlib.suppress(FileNotFoundError, ValueError):
                version = bundle_version(Path(version)) if version else None
            result.report = build_report(
                current.keys() | {h for h in hosts if h != "localhost"},
                hosts,
                {h: v for h, v in current.items() if v != _NO_ANSWER},
                status=result.status,
                bundle_version=version,
                seconds=seconds,
            )
            result.report_files = list(result.report.write(Path(report_dir)))
    if raise_on_failure and result.status != "successful":
        raise RolloutError(failure_message(result), result)
    return result


_NO_ANSWER = "\0no answer"


def _look_at_devices(common: Mapping[str, Any]) -> dict[str, str | None]:
    """Every ``edge`` host's ``current`` release after the run (read-only, one ad-hoc ``stat``).

    Returns:
        host -> release name (``None``: the device has no release yet); hosts that did not answer map
        to ``_NO_ANSWER``.
    """
    import ansible_runner  # noqa: PLC0415

    probe = ansible_runner.run(
        **common,
        ident="look",
        host_pattern="edge",
        module="ansible.builtin.stat",
        # edge_common's default prefix: an ad-hoc run reads no role defaults.
        module_args="path={{ edge_common_prefix | default('/opt/dualdeploy') }}/current get_checksum=false",
    )
    seen: dict[str, str | None] = {}
    for event in probe.events:
        data = event.get("event_data") or {}
        host, kind = data.get("host"), event.get("event", "")
        if not host:
            continue
        if kind == "runner_on_ok":
            stat = (data.get("res") or {}).get("stat") or {}
            target = stat.get("lnk_target") if stat.get("islnk") else None
            seen[host] = Path(str(target)).name if target else None
        elif kind in ("runner_on_unreachable", "runner_on_failed"):
            seen[host] = _NO_ANSWER
    return seen


def _publish_reached(
    common: Mapping[str, Any], variables: Mapping[str, Any], hosts: Mapping[str, HostResult]
) -> None:
    """After a stopped rollout, run the monitoring role for the hosts it reached (edge.yml stopped first)."""
    import ansible_runner  # noqa: PLC0415

    reached = {h: r.facts for h, r in hosts.items() if r.facts and r.status not in ("failed", "unreachable")}
    if not reached:
        return
    plays = [
        {
            "name": "Take what the stopped rollout reported for each host it reached.",
            "hosts": ",".join(sorted(reached)),
            "gather_facts": False,
            "tasks": [
                {
                    "name": "Record the host's endpoint and result as the rollout left them.",
                    "vars": {"_reached": "{{ edge_report_reached[inventory_hostname] }}"},
                    "ansible.builtin.set_fact": {
                        "edge_service_result": "{{ _reached.edge_service_result }}",
                        "edge_service_endpoint": "{{ _reached.edge_service_endpoint }}",
                    },
                }
            ],
        },
        {
            "name": "Publish the reached hosts to the site's Prometheus.",
            "hosts": "localhost",
            "gather_facts": False,
            "roles": [{"role": "edge_monitoring"}],
        },
    ]
    ansible_runner.run(
        **{**common, "limit": None},
        ident="monitoring",
        playbook=plays,
        extravars={**variables, "edge_report_reached": reached, "edge_common_repo_root": str(REPO_ROOT)},
    )


def _vault_fix(result: RolloutResult) -> str | None:
    """The fix for a vault error in ``result`` (Ansible's own words name no file or option), or None."""
    texts = [*result.errors, *(r.reason or "" for r in result.hosts.values())]
    if any("no vault secrets found" in t for t in texts):
        return (
            "the inventory holds Ansible Vault secrets and no vault password was given: pass "
            "--vault-password-file FILE (the site kit keeps it in ~/.config/dualdeploy/<site>.vault-password)"
        )
    if any("no vault secrets were found that could decrypt" in t or "Decryption failed" in t for t in texts):
        return (
            "the vault password given does not open this inventory's vault files: use the password file "
            "of this site (the site kit keeps it in ~/.config/dualdeploy/<site>.vault-password)"
        )
    return None


def failure_message(result: RolloutResult) -> str:
    """One message naming every failed and unreachable host with its reason."""
    fix = _vault_fix(result)
    if fix:
        return f"edge rollout {result.status}: {fix}"
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
        try:
            extra[key] = yaml.safe_load(value)
        except yaml.YAMLError:
            extra[key] = value  # not YAML (e.g. a Jinja expression "{{ … }}"): the string itself
    return extra


def _read_password(path: Path | None) -> str | None:
    """The vault password in ``path``, or None without a file.

    Raises:
        FileNotFoundError: naming the file and where the site kit keeps it.
    """
    if path is None:
        return None
    if not path.is_file():
        raise FileNotFoundError(
            f"--vault-password-file {path} does not exist: give the file that `make site-init` wrote for "
            "this site (~/.config/dualdeploy/<site>.vault-password by default)"
        )
    return path.read_text().strip()


def _check(args: argparse.Namespace, password: str | None) -> int:
    """Run the preflight only (the playbook's ``preflight`` tag) and name each device that passed."""
    result = _run(args, password, _parse_extra(args.extra), tags="preflight")
    for host in sorted(h for h in result.hosts if h != "localhost"):
        print(f"{host}: preflight passed")
    return 0


def _run(
    args: argparse.Namespace, password: str | None, extra: dict[str, Any], **options: Any
) -> RolloutResult:
    return run_rollout(
        args.inventory,
        args.bundle,
        public_key=args.public_key,
        limit=args.limit,
        vault_password=password,
        extravars=extra,
        quiet=not args.verbose,
        **options,
    )


def _up(args: argparse.Namespace, password: str | None) -> RolloutResult:
    """Roll out, print the report of every device, and raise naming the failed hosts."""
    extra = _parse_extra(args.extra)
    if args.allow_dev_key:
        extra["edge_allow_dev_key"] = True
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    # The site's folder name (a file inventory: its folder's, e.g. .edge-lab/inventory.yml -> edge-lab).
    inventory = Path(args.inventory).resolve()
    inventory_name = (inventory if inventory.is_dir() else inventory.parent).name.lstrip(".") or "inventory"
    report_dir = args.report_dir or REPO_ROOT / "build" / "rollouts" / inventory_name / stamp
    result = _run(args, password, extra, raise_on_failure=False, report_dir=report_dir)
    if result.report is not None:
        sys.stdout.write(result.report.markdown())
        print(f"report: {', '.join(str(p) for p in result.report_files)}")
    if result.status != "successful":
        raise RolloutError(failure_message(result), result)
    return result


def main(argv: list[str] | None = None) -> int:
    """The CLI behind ``make edge`` and ``make edge-stop``."""
    parser = argparse.ArgumentParser(
        prog="python -m deploy.edge_rollout", description=__doc__.splitlines()[0]
    )
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="roll the bundle out (ansible/edge.yml)")
    stop = sub.add_parser("stop", help="stop the service on the devices (ansible/edge-stop.yml)")
    check = sub.add_parser("check", help="run the preflight checks only: nothing changes on any device")
    for p in (up, stop, check):
        p.add_argument("--inventory", type=Path, default=DEFAULT_INVENTORY, help="inventory file or folder")
        p.add_argument("--limit", help="Ansible host pattern to restrict the run")
        p.add_argument("--vault-password-file", type=Path, help="file holding the inventory's vault password")
        p.add_argument("-v", "--verbose", action="store_true", help="show the playbook output")
    for p in (up, check):
        p.add_argument(
            "--bundle", type=Path, default=REPO_ROOT / "dist" / "demo" / "latest", help="bundle folder"
        )
        p.add_argument(
            "--public-key",
            type=Path,
            help="signer's public key (default: the inventory's edge_bundle_public_key)",
        )
        p.add_argument(
            "-e", "--extra", action="append", default=[], help="extra variable KEY=VALUE (YAML value)"
        )
    up.add_argument("--smoke", action="store_true", help="send one inference to each endpoint and time it")
    up.add_argument(
        "--report-dir",
        type=Path,
        help="folder for the report of every device (default build/rollouts/<inventory folder>/<UTC time>)",
    )
    up.add_argument(
        "--allow-dev-key",
        action="store_true",
        help="let the devices take a bundle signed with the development key (edge_allow_dev_key=true)",
    )
    sub.add_parser("matrix", help="print the device compatibility matrix (Markdown)")
    args = parser.parse_args(argv)

    if args.command == "matrix":
        sys.stdout.write(device_matrix())
        return 0
    try:
        password = _read_password(args.vault_password_file)
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
        if args.command == "check":
            return _check(args, password)
        result = _up(args, password)
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
