"""The benchmarks' charts come from their real JSON, and a bad JSON names its file and key.

``make charts`` (``bench/charts.py``) redraws every chart from ``bench/results/*.json``; these tests run
it on copies of those files, so the README's charts are proven to be drawable from what the benchmarks
actually wrote.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import matplotlib.image as mpimg
import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
sys.path.insert(0, str(REPO / "bench"))

import charts  # noqa: E402 - bench/charts.py, found through the path above


@pytest.fixture
def results(tmp_path: Path) -> Path:
    """A copy of the benchmarks' real JSON files (the charts are written next to them)."""
    for name in charts.CHARTS:
        shutil.copy(RESULTS / f"{name}.json", tmp_path / f"{name}.json")
    return tmp_path


def _charts_command(results: Path, *names: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, str(REPO / "bench" / "charts.py"), "--results", str(results), *names]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)


def test_make_charts_draws_every_benchmark_from_its_json(results: Path) -> None:
    run = _charts_command(results)
    assert run.returncode == 0, run.stderr
    for name in charts.CHARTS:
        png = results / f"{name}.png"
        assert f"wrote {png}" in run.stdout
        image = mpimg.imread(png)
        assert image.shape[0] >= 300 and image.shape[1] >= 600, (name, image.shape)
        # A chart, not a blank canvas: many distinct colours.
        assert len(np.unique(image.reshape(-1, image.shape[-1]), axis=0)) > 50, name


def test_serving_chart_plots_the_measured_throughput_against_clients() -> None:
    data = json.loads((RESULTS / "serving.json").read_text())
    fig = charts.figure("serving", RESULTS / "serving.json")
    try:
        throughput_axes = fig.axes[0]
        plotted = {
            line.get_label(): np.asarray(line.get_ydata()).tolist() for line in throughput_axes.get_lines()
        }
        for result in data["results"]:
            label = f"{result['model']} ({result['variant']})"
            expected = [
                result["http_1_client"]["throughput_rps"],
                result["http_16_clients"]["throughput_rps"],
            ]
            assert plotted[label] == pytest.approx(expected)
            raw = plotted[f"{result['model']}: raw session.run, batch 1"]
            assert raw[0] == pytest.approx(result["raw_in_process"]["throughput_rps"])
    finally:
        fig.clf()


def test_edge_chart_plots_rollout_time_against_devices() -> None:
    data = json.loads((RESULTS / "edge.json").read_text())
    fig = charts.figure("edge", RESULTS / "edge.json")
    try:
        lines = {line.get_label(): line for line in fig.axes[0].get_lines()}
        assert np.asarray(lines["fresh rollout"].get_xdata()).tolist() == [1, 8]
        assert np.asarray(lines["fresh rollout"].get_ydata()).tolist() == [
            data["fresh_1_s"],
            data["fresh_8_s"],
        ]
        assert np.asarray(lines["bundle update"].get_ydata()).tolist() == [
            data["update_1_s"],
            data["update_8_s"],
        ]
    finally:
        fig.clf()


def test_a_missing_key_is_named_with_its_file(results: Path) -> None:
    path = results / "serving.json"
    data = json.loads(path.read_text())
    del data["results"][1]["http_16_clients"]["throughput_rps"]
    path.write_text(json.dumps(data))
    with pytest.raises(charts.ChartInputError) as caught:
        charts.draw("serving", path)
    assert str(path) in str(caught.value)
    assert "key results.1.http_16_clients.throughput_rps: Field required" in str(caught.value)
    assert not path.with_suffix(".png").exists()


def test_a_value_of_the_wrong_type_is_named(results: Path) -> None:
    path = results / "edge.json"
    data = json.loads(path.read_text())
    data["update_8_s"] = "forty"
    path.write_text(json.dumps(data))
    with pytest.raises(
        charts.ChartInputError, match=r"edge\.json: key update_8_s: Input should be a valid number"
    ):
        charts.draw("edge", path)


def test_a_file_that_is_not_json_is_named_with_the_line(results: Path) -> None:
    path = results / "cloud.json"
    path.write_text('{"stack": "cloud-prod",\n  "resources": 88,\n')
    with pytest.raises(charts.ChartInputError, match=r"cloud\.json: not JSON: .* at line 3"):
        charts.draw("cloud", path)


def test_make_charts_fails_naming_the_bad_file_and_still_draws_the_others(results: Path) -> None:
    (results / "prebuild.json").unlink()
    data = json.loads((results / "int8_portability.json").read_text())
    data["rows"] = []
    (results / "int8_portability.json").write_text(json.dumps(data))
    run = _charts_command(results)
    assert run.returncode == 1
    assert (
        f"{results / 'prebuild.json'}: missing; `.venv/bin/python bench/prebuild_bench.py` writes it"
        in run.stderr
    )
    assert "int8_portability.json: key rows: List should have at least 1 item" in run.stderr
    for name in ("serving", "edge", "cloud"):
        assert (results / f"{name}.png").is_file()


def test_an_unknown_chart_name_is_refused(results: Path) -> None:
    run = _charts_command(results, "servng")
    assert run.returncode == 2
    assert "no chart named servng" in run.stderr
