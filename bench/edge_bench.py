"""Edge rollout benchmark: fleet scaling, idempotent re-runs, incremental updates and `make edge`.

Everything is measured side by side in one run, on this machine, with real ansible-runner rollouts of the
real demo bundle to local-connection devices (each its own prefix, venv and server):

- fresh provisioning of 1 device vs 8 devices (wheelhouse already prepared on the controller);
- a bundle update (one changed file) to 1 device vs 8 devices, runtime already in place;
- an unchanged re-run vs the first rollout of the same 8 devices;
- bundle bytes sent by a one-file update vs that file's size;
- `make edge` with the bundle already built: on a fresh device, and re-run.

All devices of a rollout go in one batch (``edge_rollout_serial: 100%``), forks 16. On a machine with
fewer cores than devices the devices' own work (venv install, server start) competes for the same CPUs,
which a real fleet does not: the table reports the cores so the ratios can be read in that light.

Prints a table and writes ``bench/results/edge.json``.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests")]

# The benchmark reuses the tests' device helpers (tests/edge_support.py): imports follow the path set-up.
import charts  # noqa: E402 - bench/charts.py, beside this script
from edge_support import (  # noqa: E402
    DEV_PUB,
    Device,
    demo_bundle,
    derive_bundle,
    free_port,
    touch_onnx_docstring,
    write_inventory,
)

from deploy.edge_rollout import RolloutResult, run_rollout  # noqa: E402

ALL_AT_ONCE = {"edge_rollout_serial": "100%", "edge_rollout_max_fail_percentage": 0}
RESULTS = REPO / "bench" / "results" / "edge.json"
TARGETS = {
    "update_8_vs_1_ratio": 2.5,
    "rerun_vs_first_ratio": 0.5,
    "one_file_bytes_ratio": 1.1,
    "make_edge_seconds": 60.0,
}


def _fleet(root: Path, name: str, count: int) -> tuple[list[Device], Path]:
    devices = [Device(f"{name}-{i}", root / f"{name}-{i}", free_port()) for i in range(count)]
    return devices, write_inventory(root / f"{name}.yml", devices)


CPU_SECONDS: dict[str, float] = {}


def _roll(inventory: Path, bundle: Path, label: str) -> RolloutResult:
    """One rollout; records the CPU seconds that Ansible and the modules it ran used (children of this
    process; the servers run under supervisord and are not counted)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    result = run_rollout(inventory, bundle, public_key=DEV_PUB, extravars=ALL_AT_ONCE, forks=16)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    CPU_SECONDS[label] = round((after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime), 2)
    return result


def _make(target: str) -> float:
    started = time.perf_counter()
    subprocess.run(["make", target], cwd=REPO, check=True, capture_output=True, text=True)
    return time.perf_counter() - started


def main() -> int:
    v1 = demo_bundle()
    results: dict[str, Any] = {
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "load_average_before": [round(x, 2) for x in os.getloadavg()],
        },
    }
    devices: list[Device] = []
    with tempfile.TemporaryDirectory(prefix="edge-bench-") as tmp:
        root = Path(tmp)
        v2 = derive_bundle(v1, root / "bundles", "bench", touch_onnx_docstring)
        try:
            # Warm the controller's wheelhouse and code archive once, so both fleets start equal.
            warm, warm_inv = _fleet(root, "warm", 1)
            devices += warm
            _roll(warm_inv, v1, "warm")

            one, one_inv = _fleet(root, "one", 1)
            eight, eight_inv = _fleet(root, "eight", 8)
            devices += one + eight
            first_1 = _roll(one_inv, v1, "fresh_1")
            first_8 = _roll(eight_inv, v1, "fresh_8")
            rerun_8 = _roll(eight_inv, v1, "rerun_8")
            update_1 = _roll(one_inv, v2, "update_1")
            update_8 = _roll(eight_inv, v2, "update_8")
            assert all(h.changed == 0 for h in rerun_8.hosts.values()), "re-run changed something"
            for device in one + eight:
                assert device.served()["versions"] == [v2.name]

            manifest_v2 = json.loads((v2 / "manifest.json").read_text())
            file_size = manifest_v2["files"]["model.fp32.onnx"]["size"]
            sent = [h.sent_bytes for n, h in update_8.hosts.items() if n != "localhost"]
            sent_files = sorted({f for h in update_8.hosts.values() for f in h.sent_files})
        finally:
            for device in devices:
                device.stop_service()

    # make edge: fresh device (prefix removed), then the re-run. The bundle is already built.
    local_prefix = Path.home() / ".local" / "share" / "dualdeploy" / "edge-local"
    subprocess.run(["make", "edge-stop"], cwd=REPO, check=False, capture_output=True)
    shutil.rmtree(local_prefix, ignore_errors=True)
    make_fresh = _make("edge")
    make_rerun = _make("edge")
    subprocess.run(["make", "edge-stop"], cwd=REPO, check=False, capture_output=True)

    results["machine"]["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    results.update(
        {
            "fresh_1_s": round(first_1.seconds, 2),
            "fresh_8_s": round(first_8.seconds, 2),
            "fresh_8_vs_1_ratio": round(first_8.seconds / first_1.seconds, 2),
            "update_1_s": round(update_1.seconds, 2),
            "update_8_s": round(update_8.seconds, 2),
            "update_8_vs_1_ratio": round(update_8.seconds / update_1.seconds, 2),
            "rerun_8_s": round(rerun_8.seconds, 2),
            "rerun_vs_first_ratio": round(rerun_8.seconds / first_8.seconds, 2),
            "one_file_size_bytes": file_size,
            "one_file_sent_bytes_per_device": max(sent),
            "one_file_sent_files": sent_files,
            "one_file_bytes_ratio": round(max(sent) / file_size, 4),
            "make_edge_fresh_device_s": round(make_fresh, 2),
            "make_edge_rerun_s": round(make_rerun, 2),
            "make_edge_seconds": round(max(make_fresh, make_rerun), 2),
            "targets": TARGETS,
        }
    )
    results["pass"] = {
        "update_8_vs_1_ratio": results["update_8_vs_1_ratio"] <= TARGETS["update_8_vs_1_ratio"],
        "fresh_8_vs_1_ratio": results["fresh_8_vs_1_ratio"] <= TARGETS["update_8_vs_1_ratio"],
        "rerun_vs_first_ratio": results["rerun_vs_first_ratio"] <= TARGETS["rerun_vs_first_ratio"],
        "one_file_bytes_ratio": results["one_file_bytes_ratio"] <= TARGETS["one_file_bytes_ratio"],
        "make_edge_seconds": results["make_edge_seconds"] < TARGETS["make_edge_seconds"],
    }
    rows = [
        ("fresh rollout, 1 device", f"{results['fresh_1_s']:.1f} s", f"{CPU_SECONDS['fresh_1']:.1f} CPU-s"),
        (
            "fresh rollout, 8 devices",
            f"{results['fresh_8_s']:.1f} s",
            f"{results['fresh_8_vs_1_ratio']:.2f}x of 1 (<= 2.5x); {CPU_SECONDS['fresh_8']:.1f} CPU-s",
        ),
        ("bundle update, 1 device", f"{results['update_1_s']:.1f} s", f"{CPU_SECONDS['update_1']:.1f} CPU-s"),
        (
            "bundle update, 8 devices",
            f"{results['update_8_s']:.1f} s",
            f"{results['update_8_vs_1_ratio']:.2f}x of 1 (<= 2.5x); {CPU_SECONDS['update_8']:.1f} CPU-s",
        ),
        (
            "unchanged re-run, 8 devices",
            f"{results['rerun_8_s']:.1f} s",
            f"{results['rerun_vs_first_ratio']:.2f} of first (target <= 0.5)",
        ),
        (
            "one-file update, sent per device",
            f"{results['one_file_sent_bytes_per_device']} B",
            f"{results['one_file_bytes_ratio']:.4f}x of {file_size} B (target <= 1.1x)",
        ),
        ("make edge, fresh device", f"{results['make_edge_fresh_device_s']:.1f} s", "target < 60 s"),
        ("make edge, re-run", f"{results['make_edge_rerun_s']:.1f} s", "target < 60 s"),
    ]
    load = results["machine"]
    print(
        f"edge benchmark ({load['cpus']} CPUs, load average before "
        f"{load['load_average_before'][0]}, after {load['load_average_after'][0]})"
    )
    print(f"{'measurement':36} {'value':>12}  ratio / target")
    for name, value, note in rows:
        print(f"{name:36} {value:>12}  {note}")
    print("pass:", json.dumps(results["pass"]))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {RESULTS.relative_to(REPO)} and {charts.draw('edge', RESULTS).relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
