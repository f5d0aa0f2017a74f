"""The deployment advisor (``make advise``): monthly cost of cloud, Spot, edge and hybrid against calls.

Inputs, each named in the output with where it came from:

* the x86 CPU box's throughput and p99, **measured here** (``bench/results/serving.json``, 16 clients);
* GPU instance and Jetson/Atlas figures, **user-supplied** (``--figures``; the shipped
  ``bench/figures.example.yaml`` holds labelled estimates), because nothing here measures them;
* a price table with the date and source of every price (``bench/prices.yaml``, or ``--prices``);
* the cascade's escalation rate from ``bench/results/cascade.json`` when that benchmark has run
  (or ``--escalation-rate``, labelled user-supplied); without either, hybrid is not priced.

The cost model (per month, ``N`` calls, ``H`` hours):

* cloud: the platform (control plane, NAT gateways, system nodes) + GPU node-hours + operations. An
  HPA follows the load, so node-hours are ``N / (throughput x target utilisation)``, never below the
  GPU floor (``cloud_gpu_nodes_min x H``). Spot pays ``(1 - fallback) x spot + fallback x on-demand``
  an hour and the replacement time of each interruption on top;
* edge: devices cannot scale with the hour, so a site buys enough for the **peak**
  (``N / H x peak_to_mean``), each device costing its capex over the amortisation months, its power and
  its operations hours, plus the site's own hours;
* hybrid: edge devices for every call plus Spot cloud for the escalated share.

It answers: cost per mode as a function of calls, the break-even volumes, the cheapest mode under a p99
bound and a data-residency constraint (``on-site`` rules out cloud and escalation), and whether the source
article's rule ("above 500,000 calls a month the cloud's TCO is lower") holds under these prices, and
why. Prints a table, writes ``bench/results/advise.json`` and ``advise.png``.

    .venv/bin/python bench/advise.py [--figures F] [--prices P] [--p99-ms 200] [--residency any|on-site]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Literal, TypeVar

import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(ROOT))

import charts  # noqa: E402 - bench/charts.py, beside this script

from components.aws.gpu_instances import GPU_INSTANCE_TYPES  # noqa: E402
from contract.detect import DEVICE_TABLE  # noqa: E402

PRICES = BENCH / "prices.yaml"
FIGURES = BENCH / "figures.example.yaml"
RESULTS = BENCH / "results"
ARTICLE_CALLS = 500_000
"""The source article: "above 500,000 calls a month, the cloud's total cost of ownership is lower"."""
TABLE_VOLUMES = (
    10_000,
    100_000,
    ARTICLE_CALLS,
    1_000_000,
    10_000_000,
    100_000_000,
    1_000_000_000,
    10_000_000_000,
)
"""The volumes the printed table shows."""
GRID = np.unique(np.concatenate([np.round(np.logspace(3, 12, 361)), TABLE_VOLUMES]))
"""Monthly call volumes evaluated: 1,000 to a trillion (380,000 requests/s), 40 points a decade."""
MODES = ("cloud on-demand", "cloud Spot", "edge", "hybrid")
OFF_SITE = frozenset({"cloud on-demand", "cloud Spot", "hybrid"})
"""Modes that send data off the site (hybrid escalates the low-confidence inputs to the cloud)."""


class AdviseError(ValueError):
    """An input file is missing, unreadable, or has a bad key (the message names the file and key)."""


class _Strict(BaseModel):
    # Unknown keys are typos here, not extra data: refuse them by name.
    model_config = ConfigDict(extra="forbid", frozen=True)


class Price(_Strict):
    """One price or assumption, with when and where it was read."""

    value: float = Field(ge=0)
    as_of: str = Field(min_length=4)
    source: str = Field(min_length=3)


class InstancePrices(_Strict):
    """One GPU instance type's hourly prices."""

    on_demand_per_hour: Price
    spot_per_hour: Price

    @model_validator(mode="after")
    def _spot_below_on_demand(self) -> InstancePrices:
        if self.spot_per_hour.value > self.on_demand_per_hour.value:
            raise ValueError("spot_per_hour is above on_demand_per_hour (Spot is capped at on-demand)")
        return self


class CloudPrices(_Strict):
    """The cloud's hourly prices."""

    region: str
    control_plane_per_hour: Price
    nat_gateway_per_hour: Price
    system_node_per_hour: Price
    instances: dict[str, InstancePrices] = Field(min_length=1)

    @field_validator("instances")
    @classmethod
    def _known_types(cls, instances: dict[str, InstancePrices]) -> dict[str, InstancePrices]:
        unknown = sorted(set(instances) - set(GPU_INSTANCE_TYPES))
        if unknown:
            raise ValueError(
                f"{', '.join(unknown)}: not in the GPU instance table (components/aws/gpu_instances.py)"
            )
        return instances


class SpotTerms(_Strict):
    """What Spot costs beyond its price."""

    fallback_share: Price
    interruptions_per_node_month: Price
    replacement_minutes: Price

    @field_validator("fallback_share")
    @classmethod
    def _share(cls, share: Price) -> Price:
        if share.value > 1:
            raise ValueError("value is a share of node-hours, between 0 and 1")
        return share


class DevicePrices(_Strict):
    """One edge device's cost."""

    device_class: str
    capex: Price
    amortisation_months: int = Field(ge=1, le=120)
    power_watts: Price

    @field_validator("device_class")
    @classmethod
    def _known_class(cls, name: str) -> str:
        classes = yaml.safe_load(DEVICE_TABLE.read_text())["classes"]
        if name not in classes:
            raise ValueError(
                f"{name!r} is not a device class of contract/device_classes.yaml ({', '.join(classes)})"
            )
        return name


class EdgePrices(_Strict):
    """The edge's prices."""

    electricity_per_kwh: Price
    devices: dict[str, DevicePrices] = Field(min_length=1)


class Operations(_Strict):
    """People's time, in hours a month and its rate."""

    hourly_rate: Price
    cloud_hours_per_month: Price
    edge_hours_per_device_month: Price
    edge_site_hours_per_month: Price


class PriceTable(_Strict):
    """``bench/prices.yaml``."""

    schema_version: Literal[1]
    currency: Literal["USD"]
    hours_per_month: float = Field(gt=0, le=744)
    cloud: CloudPrices
    spot: SpotTerms
    edge: EdgePrices
    operations: Operations


class Figure(_Strict):
    """A user-supplied throughput and p99 for one target."""

    throughput_rps: float = Field(gt=0)
    p99_ms: float = Field(gt=0)
    source: str = Field(min_length=3)


class Rtt(_Strict):
    """The site-to-cloud round trip added to every cloud p99."""

    value: float = Field(ge=0)
    source: str = Field(min_length=3)


class Scenario(_Strict):
    """The deployment's shape."""

    peak_to_mean: float = Field(ge=1)
    target_utilization: float = Field(gt=0, le=1)
    cloud_gpu_nodes_min: int = Field(ge=0)
    cloud_nat_gateways: int = Field(ge=0)
    cloud_system_nodes: int = Field(ge=0)
    edge_devices_min: int = Field(ge=1)


class Figures(_Strict):
    """A user-supplied figures file (``bench/figures.example.yaml``)."""

    user_supplied: Literal[True]
    schema_version: Literal[1]
    model: str
    cloud: dict[str, Figure] = Field(default_factory=dict)
    edge: dict[str, Figure] = Field(default_factory=dict)
    network_rtt_ms: Rtt
    scenario: Scenario


class Cascade(BaseModel):
    """The keys the advisor reads from ``bench/results/cascade.json`` (issue 13's benchmark)."""

    model_config = ConfigDict(extra="ignore", frozen=True)
    escalation_rate: float = Field(ge=0, le=1)


Model = TypeVar("Model", bound=BaseModel)


def _load(path: Path, model: type[Model], what: str) -> Model:
    try:
        text = path.read_text()
    except OSError as error:
        raise AdviseError(f"{path}: cannot read the {what}: {error.strerror}") from None
    try:
        raw = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as error:
        raise AdviseError(
            f"{path}: the {what} is not valid {path.suffix.lstrip('.').upper()}: {error}"
        ) from None
    try:
        return model.model_validate(raw)
    except ValidationError as error:
        raise AdviseError(f"{path}: {charts.describe(error)}") from None


def load_prices(path: Path) -> PriceTable:
    """Read and check a price table.

    Raises:
        AdviseError: unreadable, not YAML, or a key missing, unknown or out of range (named).
    """
    return _load(path, PriceTable, "price table")


def load_figures(path: Path, prices: PriceTable) -> Figures:
    """Read and check a user-supplied figures file against the price table.

    Raises:
        AdviseError: as :func:`load_prices`, or a target without a price (the key is named).
    """
    figures = _load(path, Figures, "figures file")
    for name in figures.cloud:
        if name not in prices.cloud.instances:
            raise AdviseError(
                f"{path}: key cloud.{name}: no price for it in the price table's cloud.instances"
            )
    for name in figures.edge:
        if name not in prices.edge.devices:
            raise AdviseError(f"{path}: key edge.{name}: no price for it in the price table's edge.devices")
    return figures


@dataclass(frozen=True)
class Target:
    """A place the model can run, with its figures and where they came from."""

    name: str
    throughput_rps: float
    p99_ms: float
    origin: Literal["measured here", "user-supplied"]
    source: str


def measured_x86(results: Path, model: str, prices: PriceTable) -> dict[str, Target]:
    """The price table's x86 CPU devices, with the throughput and p99 measured here.

    Raises:
        AdviseError: serving.json is missing or malformed, or has no result for ``model``.
    """
    path = results / "serving.json"
    try:
        serving = charts.load("serving", path)
    except charts.ChartInputError as error:
        raise AdviseError(str(error)) from None
    assert isinstance(serving, charts.Serving)
    found = [r for r in serving.results if r.model == model]
    if not found:
        known = ", ".join(r.model for r in serving.results)
        raise AdviseError(f"{path}: no serving result for model {model!r} (it has {known})")
    load = found[0].http_16_clients
    source = (
        f"{path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}: {model} ({found[0].variant}), "
        f"{load.clients} HTTP clients on this host (2 vCPUs shared with the load generator)"
    )
    return {
        name: Target(name, load.throughput_rps, load.p99_ms, "measured here", source)
        for name, device in prices.edge.devices.items()
        if device.device_class == "x86_cpu"
    }


def escalation(results: Path, override: float | None) -> tuple[float | None, str]:
    """The hybrid's escalation rate and where it came from (``None`` when nothing gives one).

    Raises:
        AdviseError: cascade.json exists but is malformed (the key is named).
    """
    if override is not None:
        return override, "user-supplied (--escalation-rate)"
    path = results / "cascade.json"
    if not path.exists():
        return None, f"{path.name} missing: run bench/cascade_bench.py (issue 13) or pass --escalation-rate"
    return _load(path, Cascade, "cascade benchmark result").escalation_rate, f"measured here ({path.name})"


@dataclass(frozen=True)
class Costs:
    """The cost model over the inputs; each method is vectorised over monthly calls."""

    prices: PriceTable
    figures: Figures

    @property
    def hours(self) -> float:
        return self.prices.hours_per_month

    def _ops(self, hours: float) -> float:
        return hours * self.prices.operations.hourly_rate.value

    def cloud_platform(self) -> float:
        """The cloud's fixed monthly cost: control plane, NAT, system nodes, operations."""
        cloud, scenario = self.prices.cloud, self.figures.scenario
        hourly = (
            cloud.control_plane_per_hour.value
            + scenario.cloud_nat_gateways * cloud.nat_gateway_per_hour.value
            + scenario.cloud_system_nodes * cloud.system_node_per_hour.value
        )
        return hourly * self.hours + self._ops(self.prices.operations.cloud_hours_per_month.value)

    def node_hours(self, target: Target, calls: np.ndarray) -> np.ndarray:
        """GPU node-hours a month: the load over usable throughput, never below the floor."""
        usable = target.throughput_rps * self.figures.scenario.target_utilization
        floor = self.figures.scenario.cloud_gpu_nodes_min * self.hours
        return np.maximum(calls / usable / 3600.0, floor)

    def spot_rate(self, instance: str) -> float:
        """Spot's effective $/node-hour: the fallback share on on-demand, interruptions paid twice."""
        price, spot = self.prices.cloud.instances[instance], self.prices.spot
        share = spot.fallback_share.value
        blended = (1 - share) * price.spot_per_hour.value + share * price.on_demand_per_hour.value
        overlap = spot.interruptions_per_node_month.value * spot.replacement_minutes.value / 60.0 / self.hours
        return blended * (1 + overlap)

    def cloud(self, target: Target, calls: np.ndarray, spot: bool) -> np.ndarray:
        """Monthly cost of serving ``calls`` on ``target`` instances, on-demand or Spot."""
        price = self.prices.cloud.instances[target.name]
        rate = self.spot_rate(target.name) if spot else price.on_demand_per_hour.value
        return self.cloud_platform() + self.node_hours(target, calls) * rate

    def devices(self, target: Target, calls: np.ndarray) -> np.ndarray:
        """Edge devices a site needs for the peak of ``calls`` a month."""
        scenario = self.figures.scenario
        peak = calls / (self.hours * 3600.0) * scenario.peak_to_mean
        needed = np.ceil(peak / (target.throughput_rps * scenario.target_utilization))
        return np.maximum(needed, scenario.edge_devices_min)

    def device_month(self, name: str) -> float:
        """One device's monthly cost: capex over its amortisation, power, operations hours."""
        device, edge = self.prices.edge.devices[name], self.prices.edge
        power = device.power_watts.value / 1000.0 * self.hours * edge.electricity_per_kwh.value
        ops = self._ops(self.prices.operations.edge_hours_per_device_month.value)
        return device.capex.value / device.amortisation_months + power + ops

    def hybrid(self, device: Target, instance: Target, rate: float, calls: np.ndarray) -> np.ndarray:
        """Monthly cost of devices answering every call and Spot instances the escalated share."""
        return self.edge(device, calls) + self.cloud(instance, calls * rate, spot=True)

    def edge(self, target: Target, calls: np.ndarray) -> np.ndarray:
        """Monthly cost of a site serving ``calls`` on ``target`` devices."""
        site = self._ops(self.prices.operations.edge_site_hours_per_month.value)
        return self.devices(target, calls) * self.device_month(target.name) + site


@dataclass(frozen=True)
class Option:
    """One way to serve: a mode on a target (a hybrid pairs an edge device with a cloud type)."""

    mode: str
    name: str
    target: Target  # for a hybrid, its edge device
    p99_ms: float
    origin: str
    cost: Callable[[np.ndarray], np.ndarray]


def options(
    costs: Costs, cloud: dict[str, Target], edge: dict[str, Target], rate: float | None, rtt: float
) -> list[Option]:
    """Every (mode, target) the inputs can price, with its p99 as a client sees it."""
    found: list[Option] = []
    for t in cloud.values():
        for mode, spot in (("cloud on-demand", False), ("cloud Spot", True)):
            found.append(
                Option(mode, t.name, t, t.p99_ms + rtt, t.origin, partial(costs.cloud, t, spot=spot))
            )
    for e in edge.values():
        found.append(Option("edge", e.name, e, e.p99_ms, e.origin, partial(costs.edge, e)))
        if rate is None:
            continue
        for t in cloud.values():
            # Above 1 % escalated, the 99th percentile is an escalated call: the device, then the cloud.
            p99 = e.p99_ms + t.p99_ms + rtt if rate > 0.01 else e.p99_ms
            origin = "measured here" if e.origin == t.origin == "measured here" else "user-supplied"
            found.append(
                Option(
                    "hybrid",
                    f"{e.name} + {t.name} Spot",
                    e,
                    p99,
                    origin,
                    partial(costs.hybrid, e, t, rate),
                )
            )
    return found


def cheapest(candidates: Sequence[Option], calls: np.ndarray) -> tuple[np.ndarray, list[str]]:
    """Per volume, the lowest cost among ``candidates`` and the option that gives it."""
    table = np.stack([o.cost(calls) for o in candidates])
    best = np.argmin(table, axis=0)
    return table[best, np.arange(len(calls))], [candidates[i].name for i in best]


def crossings(a: Callable[[np.ndarray], np.ndarray], b: Callable[[np.ndarray], np.ndarray]) -> list[float]:
    """The monthly volumes on the grid's range where ``a - b`` changes sign (refined by bisection)."""
    diff = a(GRID) - b(GRID)
    found: list[float] = []
    for i in np.nonzero(np.sign(diff[:-1]) * np.sign(diff[1:]) < 0)[0]:
        low, high = float(GRID[i]), float(GRID[i + 1])
        sign_low = np.sign(diff[i])
        while high - low > 1:
            mid = (low + high) / 2
            value = (a(np.array([mid])) - b(np.array([mid])))[0]
            if np.sign(value) == sign_low:
                low = mid
            else:
                high = mid
        found.append(math.ceil(high))
    return found


def _money(value: float) -> str:
    return f"${value:,.0f}"


def advise(
    prices_path: Path,
    figures_path: Path,
    results: Path,
    *,
    p99_ms: float,
    residency: Literal["any", "on-site"],
    calls: int,
    escalation_override: float | None = None,
) -> dict[str, Any]:
    """Price every mode over the grid of volumes and decide; returns the JSON document.

    Raises:
        AdviseError: any input is missing or malformed (named).
    """
    prices = load_prices(prices_path)
    figures = load_figures(figures_path, prices)
    costs = Costs(prices, figures)
    cloud = {
        name: Target(name, f.throughput_rps, f.p99_ms, "user-supplied", f.source)
        for name, f in figures.cloud.items()
    }
    edge = {
        name: Target(name, f.throughput_rps, f.p99_ms, "user-supplied", f.source)
        for name, f in figures.edge.items()
    }
    for name, target in measured_x86(results, figures.model, prices).items():
        edge.setdefault(name, target)  # a figure the user supplies for the same device wins
    rate, rate_source = escalation(results, escalation_override)
    everything = options(costs, cloud, edge, rate, figures.network_rtt_ms.value)

    allowed = [
        o for o in everything if o.p99_ms <= p99_ms and not (residency == "on-site" and o.mode in OFF_SITE)
    ]
    excluded = {
        f"{o.mode}: {o.name}": (
            "data must stay on site"
            if residency == "on-site" and o.mode in OFF_SITE
            else f"p99 {o.p99_ms:g} ms > {p99_ms:g} ms"
        )
        for o in everything
        if o not in allowed
    }
    curves: dict[str, dict[str, Any]] = {}
    for mode in MODES:
        candidates = [o for o in allowed if o.mode == mode]
        if not candidates:
            continue
        cost, names = cheapest(candidates, GRID)
        curves[mode] = {"cost": cost, "names": names, "candidates": candidates}

    def best(mode: str) -> Callable[[np.ndarray], np.ndarray]:
        return lambda n: cheapest(curves[mode]["candidates"], n)[0]

    break_even = [
        {
            "between": [a, b],
            "calls_per_month": volume,
            "cost_per_month": float(best(a)(np.array([volume]))[0]),
        }
        for i, a in enumerate(curves)
        for b in list(curves)[i + 1 :]
        for volume in crossings(best(a), best(b))
    ]
    at = np.array([float(calls)])
    decision_rows = {mode: float(best(mode)(at)[0]) for mode in curves}
    decision = min(decision_rows, key=decision_rows.__getitem__) if decision_rows else None

    claim = _check_claim(curves, costs, break_even)
    return {
        "inputs": {
            "prices": str(prices_path),
            "figures": str(figures_path),
            "figures_note": "user-supplied: nothing here measures GPUs, Jetson or Atlas devices",
            "escalation_rate": rate,
            "escalation_source": rate_source,
            "targets": {
                t.name: {
                    "throughput_rps": t.throughput_rps,
                    "p99_ms": t.p99_ms,
                    "origin": t.origin,
                    "source": t.source,
                }
                for t in (*cloud.values(), *edge.values())
            },
            "scenario": figures.scenario.model_dump(),
            "network_rtt_ms": figures.network_rtt_ms.value,
            "hours_per_month": prices.hours_per_month,
        },
        "constraints": {"p99_ms": p99_ms, "residency": residency},
        "excluded": excluded,
        "modes": {
            mode: {
                "calls_per_month": GRID.tolist(),
                "cost_per_month": [round(float(c), 2) for c in curve["cost"]],
                "cheapest_option": curve["names"],
            }
            for mode, curve in curves.items()
        },
        "break_even": break_even,
        "decision": {
            "calls_per_month": calls,
            "cost_per_month": decision_rows,
            "cheapest_mode": decision,
            "cheapest_option": (
                cheapest(curves[decision]["candidates"], at)[1][0] if decision is not None else None
            ),
        },
        "article_claim": claim,
    }


def _check_claim(
    curves: dict[str, dict[str, Any]], costs: Costs, break_even: list[dict[str, Any]]
) -> dict[str, Any]:
    """The article's rule, checked: is the cloud cheaper than the edge at every volume above 500k, and why."""
    cloud_modes = [m for m in ("cloud on-demand", "cloud Spot") if m in curves]
    if not cloud_modes or "edge" not in curves:
        return {
            "verdict": "not checked",
            "reason": "the constraints leave no cloud or no edge option to compare",
        }
    cloud_cost = np.min(np.stack([curves[m]["cost"] for m in cloud_modes]), axis=0)
    edge_cost = curves["edge"]["cost"]
    above = GRID >= ARTICLE_CALLS
    cheaper = cloud_cost[above] < edge_cost[above]
    i = int(np.argmin(np.abs(GRID - ARTICLE_CALLS)))
    scenario, hours = costs.figures.scenario, costs.hours

    # Why: each side is a floor plus a slope (per call, once past the floor).
    def cloud_terms(o: Option) -> tuple[float, float]:
        t = o.target
        on_demand = costs.prices.cloud.instances[t.name].on_demand_per_hour.value
        rate = costs.spot_rate(t.name) if o.mode == "cloud Spot" else on_demand
        floor = costs.cloud_platform() + scenario.cloud_gpu_nodes_min * hours * rate
        return floor, rate / (t.throughput_rps * scenario.target_utilization * 3600)

    def edge_terms(t: Target) -> tuple[float, float]:
        per_device = costs.device_month(t.name)
        site = (
            costs.prices.operations.edge_site_hours_per_month.value
            * costs.prices.operations.hourly_rate.value
        )
        calls_per_device = (
            t.throughput_rps * scenario.target_utilization * 3600 * hours / scenario.peak_to_mean
        )
        return site + scenario.edge_devices_min * per_device, per_device / calls_per_device

    c_option = min((o for m in cloud_modes for o in curves[m]["candidates"]), key=lambda o: cloud_terms(o)[1])
    c_target = c_option.target
    c_floor, c_slope = cloud_terms(c_option)
    e_target = min((o.target for o in curves["edge"]["candidates"]), key=lambda t: edge_terms(t)[1])
    e_floor, e_slope = edge_terms(e_target)
    crossings_found = [
        p["calls_per_month"]
        for p in break_even
        if "edge" in p["between"] and set(p["between"]) & set(cloud_modes)
    ]
    reason = (
        f"At {ARTICLE_CALLS:,} calls a month the cloud costs {_money(float(cloud_cost[i]))} and the edge "
        f"{_money(float(edge_cost[i]))}. Each is a floor plus a cost per call. The cloud's floor is "
        f"{_money(c_floor)} a month ({c_option.mode}, {c_target.name}: control plane, NAT, system node, "
        f"{scenario.cloud_gpu_nodes_min} GPU node(s), operations) and then ${c_slope * 1e6:.3f} per million "
        f"calls; the edge's floor is {_money(e_floor)} (the site's hours and {scenario.edge_devices_min} "
        f"{e_target.name}) and then ${e_slope * 1e6:.3f} per million calls, because devices are bought for "
        f"the peak ({scenario.peak_to_mean:g}x the mean) while the cloud's nodes follow the load. "
    )
    if c_slope < e_slope and c_floor > e_floor:
        reason += (
            "So the cloud does win at high volume, but only past "
            + (
                f"the break-even, {min(crossings_found):,.0f} calls a month"
                if crossings_found
                else f"about {(c_floor - e_floor) / (e_slope - c_slope):,.0f} calls a month (beyond the grid)"
            )
            + ", not at 500,000: a GPU cluster's fixed monthly cost needs that much traffic to amortise."
        )
    elif c_slope >= e_slope:
        reason += "The edge is cheaper per call as well, so the cloud never catches up under these prices."
    else:
        reason += "The cloud is cheaper both in floor and per call under these prices."
    if bool(np.all(cheaper)):
        verdict = "holds"
    elif not bool(np.any(cheaper)):
        verdict = (
            f"does not hold: the edge is cheaper at every volume from 500,000 to {GRID[-1]:,.0f} a month"
        )
    else:
        first = min(crossings_found) if crossings_found else float(GRID[above][np.argmax(cheaper)])
        verdict = f"holds only far above 500,000: the cloud is cheaper from about {first:,.0f} calls a month"
    return {
        "claim": "above 500,000 calls a month, the cloud's total cost of ownership is lower",
        "verdict": verdict,
        "cloud_cost_at_500k": float(cloud_cost[i]),
        "edge_cost_at_500k": float(edge_cost[i]),
        "cloud_floor_per_month": c_floor,
        "cloud_per_million_calls": c_slope * 1e6,
        "edge_floor_per_month": e_floor,
        "edge_per_million_calls": e_slope * 1e6,
        "share_of_volumes_above_500k_where_cloud_is_cheaper": round(float(np.mean(cheaper)), 3),
        "reason": reason,
    }


def chart(doc: dict[str, Any], out: Path) -> Path:
    """Cost against monthly calls, one line per mode, break-even points and the article's 500k marked."""
    import matplotlib.pyplot as plt  # noqa: PLC0415 - charts chose the Agg backend on import

    fig, ax = plt.subplots(figsize=(10, 6))
    for mode, curve in doc["modes"].items():
        ax.plot(curve["calls_per_month"], curve["cost_per_month"], label=mode)
    for index, point in enumerate(doc["break_even"]):
        ax.plot(point["calls_per_month"], point["cost_per_month"], "ko", markersize=5)
        ax.annotate(
            f"{' = '.join(point['between'])}\n{point['calls_per_month']:,.0f}/month",
            (point["calls_per_month"], point["cost_per_month"]),
            textcoords="offset points",
            xytext=(-150, 12) if index % 2 else (8, -22),  # alternate sides: neighbours do not overlap
            fontsize=7,
        )
    ax.axvline(
        ARTICLE_CALLS, color="grey", linestyle="--", linewidth=1, label="article: cloud cheaper above 500k"
    )
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("calls per month")
    ax.set_ylabel("cost per month (USD)")
    constraints = doc["constraints"]
    ax.set_title(
        f"Monthly cost by mode (p99 <= {constraints['p99_ms']:g} ms, residency {constraints['residency']}); "
        "GPU/Jetson/Atlas figures user-supplied",
        fontsize=9,
    )
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    try:
        fig.savefig(out, dpi=100)
    finally:
        plt.close(fig)
    return out


def table(doc: dict[str, Any]) -> str:
    """The decision table: best option and cost per mode at a few volumes, then the answers."""
    modes = doc["modes"]
    lines = [f"{'calls/month':>14} " + " ".join(f"{m:>30}" for m in modes) + "  cheapest"]
    for volume in TABLE_VOLUMES:
        i = int(np.searchsorted(GRID, volume))
        cells = {m: (c["cost_per_month"][i], c["cheapest_option"][i]) for m, c in modes.items()}
        winner = min(cells, key=lambda m: cells[m][0]) if cells else "-"
        row = " ".join(f"{_money(cost) + ' ' + name:>30}" for cost, name in cells.values())
        lines.append(f"{GRID[i]:>14,.0f} {row}  {winner}")
    lines.append("")
    for point in doc["break_even"] or [{"between": ["none"], "calls_per_month": 0, "cost_per_month": 0}]:
        if point["between"] == ["none"]:
            lines.append("break-even: none between 1,000 and a trillion calls a month")
        else:
            lines.append(
                f"break-even {' = '.join(point['between'])}: {point['calls_per_month']:,.0f} calls/month "
                f"({_money(point['cost_per_month'])})"
            )
    decision = doc["decision"]
    lines.append(
        f"cheapest at {decision['calls_per_month']:,} calls/month under the constraints: "
        f"{decision['cheapest_mode']} ({decision['cheapest_option']})"
    )
    for name, why in doc["excluded"].items():
        lines.append(f"excluded {name}: {why}")
    inputs = doc["inputs"]
    lines.append(f"hybrid escalation rate: {inputs['escalation_rate']} ({inputs['escalation_source']})")
    for name, target in inputs["targets"].items():
        lines.append(
            f"  {name}: {target['throughput_rps']:,.0f} req/s, p99 {target['p99_ms']:.1f} ms, "
            f"{target['origin']}"
        )
    claim = doc["article_claim"]
    lines.append(f"article's claim ({ARTICLE_CALLS:,} calls/month): {claim['verdict']}")
    if "reason" in claim:
        lines.append(f"  {claim['reason']}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the advisor; exit 1 with a message naming the file and key on bad input."""
    parser = argparse.ArgumentParser(
        description=(__doc__ or "").splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--prices", type=Path, default=PRICES, help="price table (default bench/prices.yaml)")
    parser.add_argument(
        "--figures",
        type=Path,
        default=FIGURES,
        help="user-supplied figures (default bench/figures.example.yaml)",
    )
    parser.add_argument(
        "--results", type=Path, default=RESULTS, help="benchmark results folder (bench/results)"
    )
    parser.add_argument(
        "--p99-ms", type=float, default=200.0, help="p99 bound a client sees (default 200, the article's)"
    )
    parser.add_argument(
        "--residency", choices=("any", "on-site"), default="any", help="on-site: data never leaves the site"
    )
    parser.add_argument(
        "--calls", type=int, default=ARTICLE_CALLS, help="monthly calls to decide for (default 500000)"
    )
    parser.add_argument(
        "--escalation-rate", type=float, help="hybrid escalation share, 0-1 (default: cascade.json)"
    )
    parser.add_argument(
        "--out", type=Path, help="JSON out (default <results>/advise.json; the PNG beside it)"
    )
    args = parser.parse_args(argv)
    if args.escalation_rate is not None and not 0 <= args.escalation_rate <= 1:
        parser.error("--escalation-rate is a share between 0 and 1")
    if args.calls < 1 or args.p99_ms <= 0:
        parser.error("--calls and --p99-ms must be positive")
    if args.figures == FIGURES:
        print(
            f"using the EXAMPLE figures in {FIGURES.relative_to(ROOT)} (estimates; pass --figures with yours)"
        )
    try:
        doc = advise(
            args.prices,
            args.figures,
            args.results,
            p99_ms=args.p99_ms,
            residency=args.residency,
            calls=args.calls,
            escalation_override=args.escalation_rate,
        )
    except AdviseError as error:
        print(f"advise: {error}", file=sys.stderr)
        return 1
    out = args.out or args.results / "advise.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1) + "\n")
    png = chart(doc, out.with_suffix(".png"))
    print(table(doc))
    print(f"wrote {out} and {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
