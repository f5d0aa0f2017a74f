#!/usr/bin/env python3
"""dualdeploy-ctl: the release switch on an edge device, behind the health gate.

    dualdeploy-ctl switch VERSION [--force]   serve releases/VERSION (the rollout runs this)
    dualdeploy-ctl rollback [--to VERSION]    serve the previous release again, through the same gate
    dualdeploy-ctl restart                    restart the current release, through the same gate
    dualdeploy-ctl start | stop | status

Under systemd the switch never stops what serves before its successor passed the gate. The public port
belongs to ``<instance>.socket``; the running release (``<instance>.service``) and a candidate
(``<instance>-next.service``) both inherit it:

1. the candidate starts on the new release, listening only on a private gate port on 127.0.0.1
   (``Type=notify``, ``Restart=no``: a server that exits or refuses its bundle fails the start at once,
   and its last journal lines are the message);
2. the gate (golden_check.py: readiness, one golden inference within the variant's tolerance, the served
   version) runs against the gate port; on failure the candidate stops, the release is marked failed
   with the reason, and the running release was never touched;
3. the candidate is promoted (SIGUSR2: it accepts on the public socket too), ``current`` is switched by
   renaming a new link over it (``previous`` keeps the release it replaced), and the main service restarts
   on it: the old server drains its in-flight requests while the candidate serves, and connections that
   arrive in between wait in the socket's queue;
4. once the main service is ready again (``READY=1``), the candidate drains and stops.

A power cut at any step leaves ``current`` on a release that was verified when it was staged; at boot the
socket and the main service start on it, and the candidate never starts by itself.

Hosts without systemd (the supervised fallback) switch the link and restart under supervisord, so a
switch there has a gap of one server start; the gate still fails fast, and a failure switches back.

Prints one JSON object on stdout; on failure exits 1 with the reason on stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import ssl
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from golden_check import HealthGateError, golden_inference, wait_ready

from contract.bundle import BundleError


class CtlError(Exception):
    """A step of the switch failed; the message says what still serves."""


class Ctl:
    """One device's service, from the JSON configuration that the edge_service role renders."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.cfg = config
        self.prefix = Path(config["prefix"])
        self.releases = self.prefix / "releases"
        self.failed_dir = self.prefix / "var" / "failed"
        self.token = Path(config["token_file"]).read_text().strip() if config.get("token_file") else None
        self.context: ssl.SSLContext | None = None
        if config.get("cafile"):
            self.context = ssl.create_default_context(cafile=config["cafile"])
            self.context.check_hostname = False  # the gate talks to the server over loopback

    # ------------------------------------------------------------------ links and records

    def link(self, name: str) -> str | None:
        """The release a link (current, previous, next) points at, or None."""
        path = self.prefix / name
        return os.path.basename(os.readlink(path)) if path.is_symlink() else None

    def set_link(self, name: str, version: str) -> None:
        """Point ``name`` at releases/version by renaming a new link over it (never delete first)."""
        path = self.prefix / name
        temp = path.with_name(f".{name}.tmp-{os.getpid()}")
        with contextlib.suppress(FileNotFoundError):
            temp.unlink()
        temp.symlink_to(f"releases/{version}")
        os.replace(temp, path)
        _sync_dir(self.prefix)

    def drop_link(self, name: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            (self.prefix / name).unlink()

    def mark_failed(self, version: str, reason: str) -> None:
        self.failed_dir.mkdir(parents=True, exist_ok=True)
        record = {
            "version": version,
            "reason": reason,
            "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        (self.failed_dir / f"{version}.json").write_text(json.dumps(record) + "\n")

    def clear_failed(self, version: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            (self.failed_dir / f"{version}.json").unlink()

    def failed(self) -> dict[str, str]:
        out = {}
        for path in sorted(self.failed_dir.glob("*.json")) if self.failed_dir.is_dir() else []:
            with contextlib.suppress(OSError, ValueError, KeyError):
                out[path.stem] = json.loads(path.read_text())["reason"]
        return out

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """One switch at a time on a device (a rollout and a technician's rollback)."""
        path = self.prefix / "var" / "ctl.lock"
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise CtlError(f"another switch is running on this device ({path} is locked)") from None
            yield

    def release_dir(self, version: str) -> Path:
        path = self.releases / version
        if not version or "/" in version or version.startswith(".") or not (path / "manifest.json").is_file():
            have = sorted(
                p.name for p in self.releases.iterdir() if p.is_dir() and not p.name.startswith(".")
            )
            raise CtlError(f"no release {version!r} on this device (releases: {', '.join(have) or 'none'})")
        return path

    # ------------------------------------------------------------------ the gate

    def gate(self, url: str, release: Path, alive: Callable[[], str | None] | None = None) -> dict[str, Any]:
        waited = wait_ready(url, float(self.cfg["health_timeout"]), self.token, self.context, alive=alive)
        result = golden_inference(url, release, self.token, self.context)
        result["ready_after_s"] = round(waited, 2)
        return result

    # ------------------------------------------------------------------ systemd

    def systemctl(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["systemctl", *args], capture_output=True, text=True, timeout=timeout, check=False
        )

    def journal(self, unit: str, lines: int = 6) -> str:
        out = subprocess.run(
            ["journalctl", "-u", unit, "-n", str(lines), "--no-pager", "-o", "cat"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        ).stdout
        tail = " / ".join(line.strip() for line in out.splitlines() if line.strip())
        return f" | {unit} log: {tail[-700:]}" if tail else ""

    def active(self, unit: str) -> bool:
        return self.systemctl("is-active", "--quiet", unit).returncode == 0

    def switch_systemd(self, version: str, current: str | None) -> dict[str, Any]:
        primary, candidate = self.cfg["units"]["main"], self.cfg["units"]["candidate"]
        release = self.release_dir(version)
        start_timeout = float(self.cfg["health_timeout"]) + 30
        self.set_link("next", version)
        self.systemctl("reset-failed", candidate)
        started = self.systemctl("start", candidate, timeout=start_timeout)
        if started.returncode != 0:
            self.systemctl("stop", candidate)
            raise CtlError(
                f"release {version} failed the health gate: its server did not become ready: "
                f"{started.stderr.strip().splitlines()[0] if started.stderr.strip() else 'start failed'}"
                f"{self.journal(candidate)}"
            )
        try:
            gate = self.gate(self.cfg["gate_url"], release)
        except (HealthGateError, BundleError, OSError, KeyError, ValueError) as exc:
            tail = self.journal(candidate)
            self.systemctl("stop", candidate)
            raise CtlError(f"release {version} failed the health gate: {exc}{tail}") from exc
        # The candidate takes its share of the public socket; then the main service moves to the release.
        self.systemctl("kill", "--signal=SIGUSR2", "--kill-whom=main", candidate)
        if current and current != version:
            self.set_link("previous", current)
        self.set_link("current", version)
        restarted = self.systemctl("restart", primary, timeout=start_timeout)
        if restarted.returncode != 0:
            tail = self.journal(primary)
            if current:
                self.set_link("current", current)
                self.systemctl("restart", primary, timeout=start_timeout)
            back = self.active(primary)
            self.systemctl("stop", candidate)
            raise CtlError(
                f"{primary} did not restart on release {version}{tail}; "
                + (
                    f"back on {current} ({'serving' if back else 'NOT serving'})"
                    if current
                    else "no earlier release"
                )
            )
        self.systemctl("stop", candidate)  # drains its in-flight requests first (SIGTERM)
        self.drop_link("next")
        return gate

    # ------------------------------------------------------------------ supervised fallback

    def supervisorctl(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [f"{self.prefix}/venv/bin/supervisorctl", "-c", self.cfg["supervisor_conf"], *args],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    def supervisor_running(self) -> bool:
        pidfile = self.prefix / "var" / "supervisord.pid"
        try:
            os.kill(int(pidfile.read_text().strip()), 0)
        except (OSError, ValueError):
            return False
        return True

    def server_pid(self) -> int:
        out = self.supervisorctl("pid", self.cfg["instance"]).stdout.strip()
        return int(out) if out.isdigit() else 0

    def log_tail(self) -> str:
        path = Path(self.cfg["log_file"])
        if not path.is_file():
            return ""
        lines = [ln for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
        return " | server log: " + " / ".join(lines[-4:])[-700:]

    def restart_supervised(self) -> int:
        if self.supervisor_running():
            self.supervisorctl("update")
            self.supervisorctl("restart", self.cfg["instance"])
        else:
            subprocess.run(
                [f"{self.prefix}/venv/bin/supervisord", "-c", self.cfg["supervisor_conf"]],
                check=True,
                timeout=60,
            )
        return self.server_pid()

    def gate_supervised(self, version: str) -> dict[str, Any]:
        pid = self.restart_supervised()

        def alive() -> str | None:
            now = self.server_pid()
            return None if now and now == pid else "the server exited (supervisord restarted it)"

        return self.gate(self.cfg["public_url"], self.release_dir(version), alive=alive)

    def switch_supervised(self, version: str, current: str | None) -> dict[str, Any]:
        self.release_dir(version)
        if current and current != version:
            self.set_link("previous", current)
        self.set_link("current", version)
        try:
            return self.gate_supervised(version)
        except (HealthGateError, BundleError, OSError, KeyError, ValueError) as exc:
            reason = f"release {version} failed the health gate: {exc}{self.log_tail()}"
            if not current or current == version:
                raise CtlError(f"{reason}; no earlier release to switch back to") from exc
            self.set_link("current", current)
            try:
                self.gate_supervised(current)
                after = f"switched back to {current}, serving and healthy"
            except (HealthGateError, BundleError, OSError, KeyError, ValueError) as again:
                after = f"switched back to {current}, which is NOT healthy: {again}"
            raise CtlError(f"{reason}; {after}") from exc

    # ------------------------------------------------------------------ commands

    def serving(self) -> bool:
        if self.cfg["manager"] == "systemd":
            return self.active(self.cfg["units"]["main"])
        return self.supervisor_running() and self.server_pid() > 0

    def switch(self, version: str, *, force: bool = False) -> dict[str, Any]:
        with self.locked():
            current = self.link("current")
            if current == version and not force and self.serving():
                return {"switched": False, "version": version, "previous": self.link("previous")}
            started = time.monotonic()
            try:
                if self.cfg["manager"] == "systemd":
                    gate = self.switch_systemd(version, current)
                else:
                    gate = self.switch_supervised(version, current)
            except CtlError as exc:
                self.drop_link("next")
                if version != current:
                    self.mark_failed(version, str(exc))
                kept = f"release {current} keeps serving" if current and version != current else ""
                raise CtlError(f"{exc}{'. ' + kept if kept else ''}") from exc
            self.clear_failed(version)
            record = {
                "switched": True,
                "version": version,
                "previous": self.link("previous"),
                "seconds": round(time.monotonic() - started, 2),
                "gate": gate,
            }
            (self.prefix / "var" / "serving.json").write_text(json.dumps(record) + "\n")
            return record

    def rollback(self, to: str | None) -> dict[str, Any]:
        target = to or self.link("previous")
        if not target:
            raise CtlError("no previous release is recorded on this device: name one with --to VERSION")
        if target == self.link("current"):
            raise CtlError(f"release {target} is already the current one")
        return self.switch(target, force=True)

    def start(self) -> dict[str, Any]:
        if self.cfg["manager"] == "systemd":
            units = self.cfg["units"]
            result = self.systemctl(
                "start", units["socket"], units["main"], timeout=float(self.cfg["health_timeout"]) + 30
            )
            if result.returncode != 0:
                raise CtlError(f"cannot start: {result.stderr.strip()}{self.journal(units['primary'])}")
        elif not self.supervisor_running():
            self.restart_supervised()
        return self.status()

    def stop(self) -> dict[str, Any]:
        if self.cfg["manager"] == "systemd":
            units = self.cfg["units"]
            # The socket first: otherwise a connection would start the service again.
            self.systemctl("stop", units["socket"], units["candidate"], units["main"], timeout=120)
            return {"stopped": True}
        if not self.supervisor_running():
            return {"stopped": False}
        pid = int((self.prefix / "var" / "supervisord.pid").read_text().strip())
        self.supervisorctl("shutdown")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except OSError:
                return {"stopped": True}
            time.sleep(0.1)
        raise CtlError(f"supervisord (pid {pid}) did not stop within 60 s")

    def status(self) -> dict[str, Any]:
        return {
            "serving": self.serving(),
            "manager": self.cfg["manager"],
            "current": self.link("current"),
            "previous": self.link("previous"),
            "failed": self.failed(),
        }


def _sync_dir(path: Path) -> None:
    """Make a rename in ``path`` durable: a power cut after the switch keeps it."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dualdeploy-ctl", description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, required=True, help="the JSON the edge_service role renders")
    sub = parser.add_subparsers(dest="command", required=True)
    switch = sub.add_parser("switch", help="serve releases/VERSION, behind the health gate")
    switch.add_argument("version")
    switch.add_argument(
        "--force", action="store_true", help="restart through the gate even if it serves already"
    )
    rollback = sub.add_parser("rollback", help="serve the previous release again, behind the health gate")
    rollback.add_argument("--to", help="a release on this device (default: the previous one)")
    for name, text in (
        ("restart", "restart the current release behind the health gate"),
        ("start", "start the service"),
        ("stop", "stop the service"),
        ("status", "what serves, the previous and the failed releases"),
    ):
        sub.add_parser(name, help=text)
    args = parser.parse_args(argv)
    ctl = Ctl(json.loads(args.config.read_text()))
    try:
        if args.command == "switch":
            result = ctl.switch(args.version, force=args.force)
        elif args.command == "rollback":
            result = ctl.rollback(args.to)
        elif args.command == "restart":
            current = ctl.link("current")
            if not current:
                raise CtlError("no current release on this device: run the rollout first")
            result = ctl.switch(current, force=True)
        else:
            result = getattr(ctl, args.command)()
    except CtlError as exc:
        print(f"dualdeploy-ctl {args.command}: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(result))
    if args.command == "status" and not result["serving"]:
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
