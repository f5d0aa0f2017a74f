"""The report of every device: one row per inventory host after a rollout, including a stopped one.

A real rollout (ansible-runner, the real playbook) to three devices in canary order: a local-connection
device first, then a device behind a real OpenSSH server that is not running (127.0.0.1 on a port nothing
listens on), then another local device. The canary passes, the unreachable device stops the rollout, so the
third device is never reached; the report still has its row, and the monitoring targets list the device
that was reached.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from edge_support import DEV_PUB, Device, demo_bundle, make_sshd, write_inventory
from serving_support import free_port

from deploy.edge_rollout import RolloutResult, failure_message, run_rollout

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def stopped(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RolloutResult, list[Device], Path]]:
    root = tmp_path_factory.mktemp("report")
    down = make_sshd(root / "sshd-down")  # configured, never started: nothing listens on its port
    devices = [
        Device("box-a", root / "box-a", free_port()),
        Device("box-down", root / "box-down", free_port(), ssh=down),
        Device("box-c", root / "box-c", free_port()),
    ]
    inventory = write_inventory(root / "hosts.yml", devices)
    try:
        result = run_rollout(
            inventory,
            demo_bundle(),
            public_key=DEV_PUB,
            extravars={"edge_rollout_serial": [1, 1, 1]},
            raise_on_failure=False,
            report_dir=root / "report",
        )
        yield result, devices, root
    finally:
        for device in devices:
            device.stop_service()


def test_report_has_one_row_per_inventory_host_including_unreached_ones(
    stopped: tuple[RolloutResult, list[Device], Path],
) -> None:
    result, _, root = stopped
    assert result.status == "failed"
    doc = json.loads((root / "report" / "report.json").read_text())
    rows = {row["host"]: row for row in doc["devices"]}
    assert sorted(rows) == ["box-a", "box-c", "box-down"]
    assert doc["status"] == "failed" and doc["bundle_version"] == demo_bundle().name


def test_canary_row_names_version_variant_class_and_gate_figures(
    stopped: tuple[RolloutResult, list[Device], Path],
) -> None:
    result, devices, _ = stopped
    assert result.report is not None
    row = next(r for r in result.report.rows if r.host == "box-a")
    assert row.reached and row.outcome == "updated"
    assert row.serving_version == demo_bundle().name == devices[0].current_version()
    assert row.variant == devices[0].served()["parameters"]["variant"]
    assert row.device_class == "x86_cpu" and row.cpu_class
    assert row.gate == "passed" and row.gate_figures and row.latency_ms is not None
    assert row.previous_version is None  # a fresh device: nothing served before


def test_unreachable_host_is_a_row_with_the_reason(stopped: tuple[RolloutResult, list[Device], Path]) -> None:
    result, _, root = stopped
    assert result.report is not None
    row = next(r for r in result.report.rows if r.host == "box-down")
    assert not row.reached and row.outcome == "unreachable" and row.serving_version is None
    assert row.reason
    markdown = (root / "report" / "report.md").read_text()
    assert "| box-down | no | unreachable |" in markdown


def test_host_the_stopped_rollout_never_reached_is_reported_as_such(
    stopped: tuple[RolloutResult, list[Device], Path],
) -> None:
    result, devices, root = stopped
    assert result.report is not None
    row = next(r for r in result.report.rows if r.host == "box-c")
    assert row.reached and row.outcome == "not reached"  # it answered the look after the run
    assert row.serving_version is None and devices[2].current_version() is None
    assert not devices[2].prefix.joinpath("releases").exists()
    assert "| box-c | yes | not reached |" in (root / "report" / "report.md").read_text()


def test_monitoring_targets_list_the_hosts_reached_although_the_rollout_stopped(
    stopped: tuple[RolloutResult, list[Device], Path],
) -> None:
    _, devices, root = stopped
    targets = json.loads((root / "monitoring" / "dualdeploy-edge.json").read_text())
    assert [t["labels"]["instance"] for t in targets] == ["box-a"]
    assert targets[0]["targets"] == [f"127.0.0.1:{devices[0].port}"]


# --------------------------------------------------------------------------- reasons from loop tasks


LOOP_PLAYBOOKS = {
    "failed": (
        "- name: Fail in a loop.\n"
        "  ansible.builtin.command: \"sh -c 'echo boom-{{ item }} >&2; exit {{ item }}'\"\n"
        "  loop: [0, 3]\n",
        "boom-3",
    ),
    "unreachable": (
        "- name: Reach another host in a loop.\n  ansible.builtin.ping:\n  delegate_to: '{{ item }}'\n"
        "  loop: [far]\n",
        "port 1: Connection refused",
    ),
}


@pytest.mark.parametrize("status", sorted(LOOP_PLAYBOOKS))
def test_a_loop_tasks_failure_reports_the_items_reason_not_the_loops_summary(
    tmp_path: Path, status: str
) -> None:
    """A loop task's own message is "One or more items failed" / "All items completed"; the report and
    the error name what went wrong in the item."""
    tasks, reason = LOOP_PLAYBOOKS[status]
    playbook = tmp_path / "loop.yml"
    playbook.write_text(
        "- hosts: box\n  gather_facts: false\n  tasks:\n"
        + "".join(f"    {line}\n" for line in tasks.splitlines())
    )
    inventory = tmp_path / "hosts.yml"
    inventory.write_text(
        json.dumps(
            {
                "all": {
                    "hosts": {
                        "box": {"ansible_connection": "local", "ansible_python_interpreter": sys.executable},
                        "far": {"ansible_host": "127.0.0.1", "ansible_port": 1, "ansible_connection": "ssh"},
                    }
                }
            }
        )
    )
    result = run_rollout(inventory, None, playbook=playbook, raise_on_failure=False)
    host = result.hosts["box"]
    assert host.status == status and reason in (host.reason or ""), (host.status, host.reason)
    assert "items" not in (host.reason or "")
    assert reason in failure_message(result)
