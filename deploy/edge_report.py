"""The report of every device after a rollout: one row per inventory host, as JSON and Markdown.

Built by :func:`deploy.edge_rollout.run_rollout` from what the playbook reported (ansible-runner events)
and from a read-only look at each device after the run (where its ``current`` link points), so a host the
rollout never reached (it stopped first, or the host was down) still has its row.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

OUTCOMES = ("updated", "unchanged", "failed", "unreachable", "not reached")


@dataclass
class DeviceRow:
    """What one inventory host serves after a rollout, and what the rollout did to it."""

    host: str
    reached: bool
    outcome: str  # one of OUTCOMES
    serving_version: str | None = None
    previous_version: str | None = None
    variant: str | None = None
    device_class: str | None = None
    cpu_class: str | None = None
    gate: str = "not run"  # "passed", "failed", "not run"
    gate_figures: dict[str, Any] = field(default_factory=dict)
    latency_ms: float | None = None
    endpoint: str | None = None
    reason: str | None = None


@dataclass
class DeviceReport:
    """The rows of one rollout, with the run's overall status."""

    status: str
    bundle_version: str | None
    seconds: float
    rows: list[DeviceRow]

    def as_dict(self) -> dict[str, Any]:
        """Plain data (the JSON file)."""
        return {
            "status": self.status,
            "bundle_version": self.bundle_version,
            "seconds": round(self.seconds, 1),
            "devices": [asdict(r) for r in self.rows],
        }

    def markdown(self) -> str:
        """The table a technician reads."""
        lines = [
            f"# Edge rollout report: {self.status}, bundle {self.bundle_version or '?'}, "
            f"{self.seconds:.0f} s",
            "",
            "| Device | Reached | Outcome | Serving now | Variant | Class (CPU) | Gate | Gate figures "
            "| Previous | Reason |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in self.rows:
            lines.append(
                "| "
                + " | ".join(
                    _cell(v)
                    for v in (
                        r.host,
                        "yes" if r.reached else "no",
                        r.outcome,
                        r.serving_version,
                        r.variant,
                        f"{r.device_class or '?'} ({r.cpu_class or '?'})" if r.device_class else None,
                        r.gate,
                        _figures(r),
                        r.previous_version,
                        r.reason,
                    )
                )
                + " |"
            )
        return "\n".join(lines) + "\n"

    def write(self, folder: Path) -> tuple[Path, Path]:
        """Write ``report.json`` and ``report.md`` into ``folder`` (created)."""
        folder.mkdir(parents=True, exist_ok=True)
        json_path, md_path = folder / "report.json", folder / "report.md"
        json_path.write_text(json.dumps(self.as_dict(), indent=2, sort_keys=False) + "\n")
        md_path.write_text(self.markdown())
        return json_path, md_path


def _cell(value: object) -> str:
    text = "—" if value is None or value == "" else str(value)
    return " ".join(text.split()).replace("|", "\\|")[:300]


def _figures(row: DeviceRow) -> str | None:
    parts = [
        f"{k}={_short(v)}" for k, v in sorted(row.gate_figures.items()) if not isinstance(v, Mapping | list)
    ]
    if row.latency_ms is not None:
        parts.append(f"latency_ms={row.latency_ms}")
    return ", ".join(parts) or None


def _short(value: object) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def build_report(
    inventory_hosts: Iterable[str],
    outcomes: Mapping[str, Any],
    current: Mapping[str, str | None],
    *,
    status: str,
    bundle_version: str | None,
    seconds: float,
) -> DeviceReport:
    """One row per inventory host.

    Args:
        inventory_hosts: every host of the inventory's ``edge`` group.
        outcomes: the rollout's per-host results (``HostResult``-like: status, version, variant, ...).
        current: for each host that answered the look after the run, the release its ``current`` link
            names (``None``: no release yet); hosts that did not answer are absent.
        status: the run's status.
        bundle_version: the bundle this rollout delivered.
        seconds: the run's duration.
    """
    rows = []
    for host in sorted(set(inventory_hosts)):
        result = outcomes.get(host)
        answered = host in current
        row = DeviceRow(host=host, reached=answered, outcome="not reached", serving_version=current.get(host))
        if result is not None:
            row.device_class = result.device_class
            row.cpu_class = result.cpu_class
            row.previous_version = result.previous_version
            row.reason = result.reason
            row.endpoint = result.endpoint
            if result.status == "unreachable":
                row.outcome = "unreachable"
            elif result.status == "failed":
                row.outcome = "failed"
                row.reached = True
            else:
                row.outcome = "updated" if result.changed else "unchanged"
                row.reached = True
            health = result.health or {}
            if health:
                row.gate = "passed"
                row.variant = health.get("variant")
                row.gate_figures = dict(health.get("figures") or {})
                row.latency_ms = health.get("latency_ms")
                row.cpu_class = health.get("cpu_class") or row.cpu_class
            elif result.gate_failed:
                row.gate = "failed"
            if row.serving_version is None and result.status not in ("failed", "unreachable"):
                row.serving_version = result.version
        elif not answered:
            row.outcome = "unreachable"
            row.reason = "did not answer after the rollout"
        rows.append(row)
    return DeviceReport(status=status, bundle_version=bundle_version, seconds=seconds, rows=rows)
