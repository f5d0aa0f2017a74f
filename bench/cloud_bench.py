"""Benchmark: the Pulumi program for cloud-prod under mocks (target: under 5 s).

Measures, side by side in one run:
- ``program``: running ``__main__.py`` inside the harness until every resource is registered
  and every output resolved (what the issue's target is about);
- ``process``: a whole fresh interpreter doing the same (imports included), as a test or a
  ``pulumi preview`` start-up would pay it.

Each is repeated; the table shows median and worst. Writes ``bench/results/cloud.json``.

    .venv/bin/python bench/cloud_bench.py [--repeat 5]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import charts  # bench/charts.py, beside this script

REPO_ROOT = Path(__file__).resolve().parent.parent
TARGET_S = 5.0
STACK = "cloud-prod"
ENGINES = ("sm_86", "sm_89")  # cloud-prod requires engines for both of its Spot pool architectures


def _harness(project: Path, out: Path) -> float:
    """One fresh interpreter running the program; returns its wall time."""
    command = [sys.executable, str(REPO_ROOT / "tests" / "cloud_harness.py"), STACK]
    command += ["--project-dir", str(project), "--out", str(out)]
    started = time.perf_counter()
    subprocess.run(command, cwd=REPO_ROOT, check=True, capture_output=True, text=True, timeout=120)
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark, print the table and write the JSON."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeat", type=int, default=5, help="runs of each measurement (default 5)")
    args = parser.parse_args(argv)

    sys.path.insert(0, str(REPO_ROOT / "tests"))
    from cloud_harness import make_project  # noqa: PLC0415 - the harness lives with the tests

    program_s: list[float] = []
    process_s: list[float] = []
    resources = 0
    with tempfile.TemporaryDirectory() as tmp:
        project = make_project(Path(tmp) / "project", ENGINES)
        for index in range(args.repeat):
            out = Path(tmp) / f"graph-{index}.json"
            process_s.append(_harness(project, out))
            graph = json.loads(out.read_text())
            program_s.append(float(graph["seconds"]))
            resources = len(graph["resources"])

    rows = [("program (in-process)", program_s), ("process (fresh interpreter)", process_s)]
    print(f"cloud-prod under mocks: {resources} resources registered, {args.repeat} runs each")
    print(f"{'measurement':<30} {'median s':>9} {'max s':>7} {'target s':>9} {'ok':>4}")
    for label, values in rows:
        ok = "yes" if max(values) < TARGET_S else "NO"
        median, worst = statistics.median(values), max(values)
        print(f"{label:<30} {median:9.2f} {worst:7.2f} {TARGET_S:9.1f} {ok:>4}")

    result = {
        "benchmark": "cloud",
        "stack": STACK,
        "resources": resources,
        "repeat": args.repeat,
        "target_s": TARGET_S,
        "program_s": {"median": statistics.median(program_s), "max": max(program_s), "runs": program_s},
        "process_s": {"median": statistics.median(process_s), "max": max(process_s), "runs": process_s},
        "meets_target": max(program_s) < TARGET_S,
        "python": platform.python_version(),
        "machine": platform.machine(),
    }
    out_dir = REPO_ROOT / "bench" / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "cloud.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out_dir / 'cloud.json'} and {charts.draw('cloud', out_dir / 'cloud.json')}")
    return 0 if result["meets_target"] else 1


if __name__ == "__main__":
    sys.exit(main())
