"""The deployment advisor (``make advise``, ``bench/advise.py``): its answers and its refusals.

Every test runs the real advisor on the shipped price table and example figures, or on copies of them
with one thing changed, and on copies of the real ``bench/results`` JSON.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))

import advise  # noqa: E402 - bench/advise.py, found through the path above

SERVING = json.loads((REPO / "bench" / "results" / "serving.json").read_text())
DEMO_16 = next(r for r in SERVING["results"] if r["model"] == "demo")["http_16_clients"]


@pytest.fixture
def results(tmp_path: Path) -> Path:
    """A results folder with the real serving.json and no cascade.json."""
    folder = tmp_path / "results"
    folder.mkdir()
    shutil.copy(REPO / "bench" / "results" / "serving.json", folder / "serving.json")
    return folder


def _yaml(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(path.read_text())
    return data


def _write(tmp_path: Path, name: str, data: dict[str, Any]) -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


def _run(
    results: Path, prices: Path = advise.PRICES, figures: Path = advise.FIGURES, **kw: Any
) -> dict[str, Any]:
    options: dict[str, Any] = {"p99_ms": 200.0, "residency": "any", "calls": 500_000} | kw
    return advise.advise(prices, figures, results, **options)


def test_make_advise_writes_the_table_json_and_chart_from_the_shipped_inputs(
    results: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert advise.main(["--results", str(results)]) == 0
    printed = capsys.readouterr().out
    doc = json.loads((results / "advise.json").read_text())
    assert (results / "advise.png").stat().st_size > 10_000
    assert "using the EXAMPLE figures" in printed and "article's claim" in printed
    assert set(doc["modes"]) == {"cloud on-demand", "cloud Spot", "edge"}
    for mode in doc["modes"].values():
        assert len(mode["cost_per_month"]) == len(advise.GRID)
    x86 = doc["inputs"]["targets"]["x86-mini-pc"]
    assert x86["origin"] == "measured here"
    assert x86["throughput_rps"] == DEMO_16["throughput_rps"] and x86["p99_ms"] == DEMO_16["p99_ms"]
    for name in ("g5.xlarge", "jetson-orin-nano-super", "atlas-200i-dk-a2"):
        assert doc["inputs"]["targets"][name]["origin"] == "user-supplied"


def test_without_cascade_json_hybrid_is_not_priced_and_says_why(results: Path) -> None:
    doc = _run(results)
    assert "hybrid" not in doc["modes"]
    assert doc["inputs"]["escalation_rate"] is None
    assert "cascade.json missing" in doc["inputs"]["escalation_source"]


def test_hybrid_reads_the_escalation_rate_from_cascade_json(results: Path) -> None:
    (results / "cascade.json").write_text(json.dumps({"threshold": 0.9, "escalation_rate": 0.05}))
    doc = _run(results)
    assert doc["inputs"]["escalation_rate"] == 0.05
    assert doc["inputs"]["escalation_source"] == "measured here (cascade.json)"
    prices = advise.load_prices(advise.PRICES)
    costs = advise.Costs(prices, advise.load_figures(advise.FIGURES, prices))
    target = {
        n: advise.Target(n, t["throughput_rps"], t["p99_ms"], t["origin"], "")
        for n, t in doc["inputs"]["targets"].items()
    }
    i = int(np.argmin(np.abs(advise.GRID - 1e10)))
    calls = advise.GRID[i : i + 1]
    name = doc["modes"]["hybrid"]["cheapest_option"][i]
    device, instance = name.removesuffix(" Spot").split(" + ")
    expected = costs.edge(target[device], calls) + costs.cloud(target[instance], calls * 0.05, spot=True)
    assert doc["modes"]["hybrid"]["cost_per_month"][i] == pytest.approx(float(expected[0]), abs=0.01)


def test_the_cost_model_is_the_one_documented(results: Path) -> None:
    """Spot cost at 10 billion calls, recomputed by hand from the price table and figures."""
    prices, figures = _yaml(advise.PRICES), _yaml(advise.FIGURES)
    doc = _run(results)
    i = int(np.argmin(np.abs(advise.GRID - 1e10)))
    calls = float(advise.GRID[i])
    instance = doc["modes"]["cloud Spot"]["cheapest_option"][i]
    cloud, spot, ops, scenario = prices["cloud"], prices["spot"], prices["operations"], figures["scenario"]
    hours = prices["hours_per_month"]
    rate = (1 - spot["fallback_share"]["value"]) * cloud["instances"][instance]["spot_per_hour"]["value"]
    rate += spot["fallback_share"]["value"] * cloud["instances"][instance]["on_demand_per_hour"]["value"]
    rate *= (
        1 + spot["interruptions_per_node_month"]["value"] * spot["replacement_minutes"]["value"] / 60 / hours
    )
    node_hours = max(
        calls / (figures["cloud"][instance]["throughput_rps"] * scenario["target_utilization"]) / 3600,
        scenario["cloud_gpu_nodes_min"] * hours,
    )
    platform = hours * (
        cloud["control_plane_per_hour"]["value"]
        + scenario["cloud_nat_gateways"] * cloud["nat_gateway_per_hour"]["value"]
        + scenario["cloud_system_nodes"] * cloud["system_node_per_hour"]["value"]
    )
    platform += ops["cloud_hours_per_month"]["value"] * ops["hourly_rate"]["value"]
    assert doc["modes"]["cloud Spot"]["cost_per_month"][i] == pytest.approx(
        platform + node_hours * rate, abs=0.01
    )


def test_break_even_volumes_are_where_the_two_costs_meet(results: Path) -> None:
    doc = _run(results)
    assert doc["break_even"], "the shipped inputs have a cloud/edge crossing below a trillion calls"
    modes = doc["modes"]
    for point in doc["break_even"]:
        a, b = point["between"]
        volume = point["calls_per_month"]
        below = np.interp(volume * 0.9, modes[a]["calls_per_month"], modes[a]["cost_per_month"]) - np.interp(
            volume * 0.9, modes[b]["calls_per_month"], modes[b]["cost_per_month"]
        )
        above = np.interp(volume * 1.1, modes[a]["calls_per_month"], modes[a]["cost_per_month"]) - np.interp(
            volume * 1.1, modes[b]["calls_per_month"], modes[b]["cost_per_month"]
        )
        assert np.sign(below) != np.sign(above), point


def test_data_that_must_stay_on_site_rules_out_cloud_and_escalation(results: Path) -> None:
    (results / "cascade.json").write_text(json.dumps({"escalation_rate": 0.05}))
    doc = _run(results, residency="on-site")
    assert set(doc["modes"]) == {"edge"}
    assert doc["decision"]["cheapest_mode"] == "edge"
    assert doc["excluded"]["cloud Spot: g5.xlarge"] == "data must stay on site"
    assert any(k.startswith("hybrid: ") and v == "data must stay on site" for k, v in doc["excluded"].items())
    assert doc["article_claim"]["verdict"] == "not checked"


def test_a_p99_bound_excludes_the_slower_options(results: Path) -> None:
    figures = _yaml(advise.FIGURES)
    rtt = figures["network_rtt_ms"]["value"]
    doc = _run(results, p99_ms=30.0)
    # Every cloud p99 is its instance's plus the site's round trip (10-12 + 40 ms); the devices are within.
    assert set(doc["modes"]) == {"edge"}
    expected = f"p99 {figures['cloud']['g5.xlarge']['p99_ms'] + rtt:g} ms > 30 ms"
    assert doc["excluded"]["cloud Spot: g5.xlarge"] == expected
    assert not any(name.startswith("edge: ") for name in doc["excluded"])
    tighter = _run(results, p99_ms=16.0)
    assert tighter["excluded"]["edge: atlas-200i-dk-a2"] == "p99 20 ms > 16 ms"
    assert "atlas-200i-dk-a2" not in tighter["modes"]["edge"]["cheapest_option"]


def test_the_article_claim_is_checked_against_the_prices(results: Path, tmp_path: Path) -> None:
    shipped = _run(results)["article_claim"]
    assert shipped["cloud_cost_at_500k"] > shipped["edge_cost_at_500k"]
    assert shipped["verdict"] != "holds"
    assert shipped["share_of_volumes_above_500k_where_cloud_is_cheaper"] < 0.5
    assert "floor" in shipped["reason"]
    # A free cloud platform and nearly free Spot make the rule true: the check follows the prices.
    prices = _yaml(advise.PRICES)
    for key in ("control_plane_per_hour", "nat_gateway_per_hour", "system_node_per_hour"):
        prices["cloud"][key]["value"] = 0.0
    for instance in prices["cloud"]["instances"].values():
        instance["spot_per_hour"]["value"] = 0.001
    prices["spot"]["fallback_share"]["value"] = 0.0
    prices["operations"]["cloud_hours_per_month"]["value"] = 0.0
    cheap = _run(results, prices=_write(tmp_path, "cheap.yaml", prices))["article_claim"]
    assert cheap["verdict"] == "holds"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            lambda p: p["cloud"]["instances"]["g5.xlarge"]["spot_per_hour"].update(value=-1),
            'key cloud.instances."g5.xlarge".spot_per_hour.value: Input should be greater than or equal to 0',
        ),
        (
            lambda p: p["cloud"]["instances"]["g5.xlarge"]["spot_per_hour"].update(value=2.0),
            'key cloud.instances."g5.xlarge": Value error, spot_per_hour is above on_demand_per_hour',
        ),
        (
            lambda p: p["cloud"]["instances"].update({"g9.xlarge": p["cloud"]["instances"]["g5.xlarge"]}),
            "key cloud.instances: Value error, g9.xlarge: not in the GPU instance table",
        ),
        (
            lambda p: p["edge"]["devices"]["x86-mini-pc"]["capex"].pop("source"),
            "key edge.devices.x86-mini-pc.capex.source: Field required",
        ),
        (
            lambda p: p["edge"]["devices"]["x86-mini-pc"].update(device_class="toaster"),
            "key edge.devices.x86-mini-pc.device_class: Value error, 'toaster' is not a device class",
        ),
        (
            lambda p: p["operations"].update(hourly_rat=p["operations"].pop("hourly_rate")),
            "key operations.hourly_rat: Extra inputs are not permitted",
        ),
        (lambda p: p["spot"]["fallback_share"].update(value=1.5), "key spot.fallback_share: Value error"),
    ],
)
def test_an_invalid_price_table_is_refused_naming_the_key(
    results: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], change: Any, message: str
) -> None:
    prices = _yaml(advise.PRICES)
    change(prices)
    path = _write(tmp_path, "prices.yaml", prices)
    assert advise.main(["--results", str(results), "--prices", str(path)]) == 1
    err = capsys.readouterr().err
    assert str(path) in err and message in err, err
    assert not (results / "advise.json").exists()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda f: f.pop("user_supplied"), "key user_supplied: Field required"),
        (lambda f: f.update(user_supplied=False), "key user_supplied: Input should be True"),
        (lambda f: f["cloud"]["g5.xlarge"].update(throughput_rps=0), 'key cloud."g5.xlarge".throughput_rps'),
        (
            lambda f: f["cloud"].update({"g5.2xlarge": f["cloud"]["g5.xlarge"]}),
            "key cloud.g5.2xlarge: no price for it in the price table's cloud.instances",
        ),
        (
            lambda f: f["edge"].update({"pi5": f["edge"]["jetson-orin-nano-super"]}),
            "key edge.pi5: no price for it in the price table's edge.devices",
        ),
        (
            lambda f: f["scenario"].update(peak_to_mean=0.5),
            "key scenario.peak_to_mean: Input should be greater",
        ),
    ],
)
def test_invalid_figures_are_refused_naming_the_key(
    results: Path, tmp_path: Path, change: Any, message: str
) -> None:
    figures = _yaml(advise.FIGURES)
    change(figures)
    path = _write(tmp_path, "figures.yaml", figures)
    with pytest.raises(advise.AdviseError) as caught:
        _run(results, figures=path)
    assert str(path) in str(caught.value) and message in str(caught.value), caught.value


def test_a_file_that_is_not_yaml_is_named(results: Path, tmp_path: Path) -> None:
    path = tmp_path / "prices.yaml"
    path.write_text("cloud: [unclosed\n")
    with pytest.raises(advise.AdviseError, match=r"prices\.yaml: the price table is not valid YAML"):
        _run(results, prices=path)
    with pytest.raises(advise.AdviseError, match=r"nowhere\.yaml: cannot read the price table"):
        _run(results, prices=tmp_path / "nowhere.yaml")


def test_a_malformed_cascade_json_is_named(results: Path) -> None:
    (results / "cascade.json").write_text(json.dumps({"escalation_rate": 1.7}))
    with pytest.raises(
        advise.AdviseError, match=r"cascade\.json: key escalation_rate: Input should be less than"
    ):
        _run(results)


def test_measured_figures_must_exist_for_the_model(results: Path, tmp_path: Path) -> None:
    figures = _yaml(advise.FIGURES)
    figures["model"] = "resnet"
    with pytest.raises(advise.AdviseError, match=r"serving\.json: no serving result for model 'resnet'"):
        _run(results, figures=_write(tmp_path, "figures.yaml", figures))
    (results / "serving.json").unlink()
    with pytest.raises(advise.AdviseError, match=r"serving\.json: missing"):
        _run(results)


def test_bad_flags_are_refused(results: Path) -> None:
    with pytest.raises(SystemExit) as caught:
        advise.main(["--results", str(results), "--escalation-rate", "2"])
    assert caught.value.code == 2
