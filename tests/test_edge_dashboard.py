"""The Grafana dashboard that the edge_monitoring role writes beside the scrape snippet.

No Grafana or Prometheus server runs here, so the test checks what can be checked without one: the file is
a dashboard Grafana can import (schema fields, unique panel ids, a grid position and queries per panel, the
datasource variable), and every metric its PromQL names is one the server really exports (the sample names
of serving.metrics.Metrics's registry, rendered and parsed with prometheus-client).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from serving.metrics import Metrics

DASHBOARD = (
    Path(__file__).resolve().parents[1]
    / "ansible"
    / "roles"
    / "edge_monitoring"
    / "files"
    / "dualdeploy-edge.dashboard.json"
)


def _exported() -> set[str]:
    """Every sample name the server's /metrics can carry (histogram buckets and counters' _total too)."""
    metrics = Metrics()
    # A labelled family renders samples only once a child exists: make one of each.
    for family in vars(metrics).values():
        labels = getattr(family, "_labelnames", ())
        if labels and hasattr(family, "labels"):
            family.labels(*["x"] * len(labels))
    exported: set[str] = set()
    for parsed in text_string_to_metric_families(metrics.render().decode()):
        exported.update(sample.name for sample in parsed.samples)
    return exported


def test_the_dashboard_is_an_importable_grafana_dashboard() -> None:
    doc = json.loads(DASHBOARD.read_text())
    assert doc["uid"] == "dualdeploy-edge" and doc["title"] and isinstance(doc["schemaVersion"], int)
    variables = {v["name"]: v for v in doc["templating"]["list"]}
    source = variables["datasource"]
    assert source["type"] == "datasource" and source["query"] == "prometheus"
    ids = [p["id"] for p in doc["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in doc["panels"]:
        grid = panel["gridPos"]
        assert 0 <= grid["x"] < 24 and 0 < grid["w"] <= 24 - grid["x"] and grid["h"] > 0, panel["title"]
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        refs = [t["refId"] for t in panel["targets"]]
        assert refs and len(refs) == len(set(refs)), panel["title"]
        for target in panel["targets"]:
            expr = target["expr"]
            assert expr.count("(") == expr.count(")") and expr.count("{") == expr.count("}"), expr
            assert "$job" in expr, f"{panel['title']}: every query is scoped to the scrape job"


def test_every_metric_the_dashboard_queries_is_one_the_server_exports() -> None:
    doc = json.loads(DASHBOARD.read_text())
    queried = {
        name
        for panel in doc["panels"]
        for target in panel["targets"]
        for name in re.findall(r"\bdualdeploy_[a-z0-9_]+", target["expr"])
    }
    queried |= set(re.findall(r"\bdualdeploy_[a-z0-9_]+", json.dumps(doc["templating"])))
    exported = _exported()
    assert queried, "the dashboard queries no dualdeploy metric"
    assert queried <= exported, f"not exported by the server: {sorted(queried - exported)}"
