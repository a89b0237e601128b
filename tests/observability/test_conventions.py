"""Monitoring conventions of the dashboards and alert rules (kube-prometheus / monitoring-mixin style):

- the dashboards round-trip through grafana-foundation-sdk's typed models without loss;
- datasource, cluster and namespace variables, every query scoped by them, a unit on every panel, thresholds,
  stable unique panel ids, drift interventions as annotations;
- every aggregation in an alert keeps `namespace`; the runbook base URL is configurable;
- the mixin layout (prometheus_alerts.yaml, dashboards_out/) is generated from the same source.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
BOARDS = sorted((ROOT / "charts/gprl/dashboards").glob("*.json"))
AGG = re.compile(r"\b(sum|max|min|avg|count|stddev|stdvar|topk|bottomk|quantile|group)\s*(by|without)?\s*(\([^()]*\))?\s*\(")


def _panels(board: dict) -> list[dict]:
    out = []
    for p in board["panels"]:
        out += [p, *(p.get("panels") or [])]
    return out


@pytest.mark.parametrize("path", BOARDS, ids=lambda p: p.stem)
def test_dashboard_round_trips_through_the_sdk_models(path):
    from grafana_foundation_sdk.cog.encoder import JSONEncoder
    from grafana_foundation_sdk.models.dashboard import Dashboard

    data = json.loads(path.read_text())
    again = json.loads(json.dumps(Dashboard.from_json(data), cls=JSONEncoder))
    assert again == data


@pytest.mark.parametrize("path", BOARDS, ids=lambda p: p.stem)
def test_dashboard_conventions(path):
    from gprl.observability.dashboards import panel_id

    board = json.loads(path.read_text())
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert {"datasource", "cluster", "namespace"} <= set(variables)
    assert variables["datasource"]["type"] == "datasource"
    panels = _panels(board)
    ids = [p["id"] for p in panels]
    assert all(isinstance(i, int) and i > 0 for i in ids) and len(ids) == len(set(ids)), ids
    for p in panels:
        assert p["id"] == panel_id(p["type"], p["title"]), p["title"]  # from the title: adding a panel renumbers nothing
        if p["type"] == "row":
            continue
        defaults = p["fieldConfig"]["defaults"]
        assert defaults.get("unit"), f"{path.name}: panel {p['title']!r} has no unit"
        assert defaults.get("thresholds", {}).get("steps"), f"{path.name}: panel {p['title']!r} has no thresholds"
        assert p["datasource"]["uid"] == "${datasource}"
        for t in p["targets"]:
            assert 'cluster=~"$cluster"' in t["expr"] and 'namespace=~"$namespace"' in t["expr"], t["expr"]
            for m in AGG.finditer(t["expr"]):
                assert m.group(2) == "by" and "namespace" in m.group(3), f"{p['title']}: {t['expr']}"
    # the alert levels are drawn where the alerts look
    assert any(len(p["fieldConfig"]["defaults"]["thresholds"]["steps"]) > 1 for p in panels if p["type"] != "row")
    names = [a["name"] for a in board["annotations"]["list"]]
    assert any("Drift interventions" in n for n in names)
    assert all("interventions_total" in a["expr"] for a in board["annotations"]["list"])


def _rules() -> list[dict]:
    doc = yaml.safe_load((ROOT / "charts/gprl/rules/gprl-alerts.yaml").read_text())
    return [r for g in doc["groups"] for r in g["rules"]]


def test_every_alert_aggregation_keeps_namespace():
    for r in _rules():
        for m in AGG.finditer(r["expr"]):
            assert m.group(2) == "by" and "namespace" in m.group(3), f"{r['alert']}: {m.group(0)} in {r['expr']}"


def test_aggregation_check_catches_a_dropped_namespace():
    assert [m.group(0) for m in AGG.finditer("max by (run) (x) or sum(rate(y[5m]))")] == ["max by (run) (",
                                                                                           "sum("]


def test_runbook_base_url_is_configurable(tmp_path):
    from gprl.observability import alerts
    from gprl.observability.__main__ import main

    assert all(r["annotations"]["runbook_url"].startswith(alerts.RUNBOOK) for r in _rules())
    assert main(["--mixin-out", str(tmp_path), "--runbook-base-url", "https://runbooks.example/gprl/"]) == 0
    mixin = yaml.safe_load((tmp_path / "prometheus_alerts.yaml").read_text())
    urls = [r["annotations"]["runbook_url"] for g in mixin["groups"] for r in g["rules"]]
    assert urls and all(u.startswith("https://runbooks.example/gprl/gprl") for u in urls)
    assert sorted(p.name for p in (tmp_path / "dashboards_out").iterdir()) == sorted(p.name for p in BOARDS)


def test_committed_mixin_matches_the_chart():
    mixin = ROOT / "mixin"
    assert yaml.safe_load((mixin / "prometheus_alerts.yaml").read_text()) == \
        yaml.safe_load((ROOT / "charts/gprl/rules/gprl-alerts.yaml").read_text())
    for b in BOARDS:
        assert (mixin / "dashboards_out" / b.name).read_text() == b.read_text()
