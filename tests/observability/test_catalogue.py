"""The observability pack agrees with the code: every metric named in a dashboard or an alert rule is exported by
the trainer (gprl/metrics.py) or the operator (gprl_operator.metrics, gprl_operator.drift_loop); every exported
metric is in the catalogue of docs/operations.md; the generated files are fresh; `helm template` renders them."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "operator"))
NAME = re.compile(r"\b(gprl_[a-zA-Z0-9_:]+)")
SUFFIXES = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"], "summary": ["_sum", "_count"]}


def _sample_names(registry) -> dict[str, str]:
    """family name -> type, plus every sample name a scrape shows -> its family."""
    out = {}
    for fam in registry.collect():
        out[fam.name] = fam.name
        for suffix in SUFFIXES.get(fam.type, []):
            out[fam.name + suffix] = fam.name
    return out


def exported() -> dict[str, set[str]]:
    from prometheus_client import REGISTRY

    from gprl.metrics import TrainerMetrics

    import gprl_operator.drift_loop  # noqa: F401  (registers its metrics)
    import gprl_operator.metrics  # noqa: F401

    trainer = _sample_names(TrainerMetrics("x").registry)
    operator = {k: v for k, v in _sample_names(REGISTRY).items() if k.startswith("gprl_operator_")}
    return {"trainer": set(trainer), "operator": set(operator), "families": set(trainer.values()) | set(operator.values())}


def used() -> dict[str, set[str]]:
    from gprl.observability.dashboards import expressions

    out: dict[str, set[str]] = {}
    for f in sorted((ROOT / "charts/gprl/dashboards").glob("*.json")):
        for expr in expressions(json.loads(f.read_text())):
            for n in NAME.findall(expr):
                out.setdefault(n, set()).add(f.name)
    rules = yaml.safe_load((ROOT / "charts/gprl/rules/gprl-alerts.yaml").read_text())
    for g in rules["groups"]:
        for r in g["rules"]:
            for n in NAME.findall(r["expr"]):
                out.setdefault(n, set()).add(r.get("alert") or r.get("record"))
    return out


def test_generated_files_are_fresh():
    out = subprocess.run([sys.executable, "-m", "gprl.observability", "--check"], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr


def test_every_metric_in_dashboards_and_rules_is_exported():
    names = exported()
    have = names["trainer"] | names["operator"]
    missing = {n: sorted(w) for n, w in used().items() if n not in have}
    assert not missing, f"named in dashboards/rules but exported by nobody: {missing}"
    assert len(used()) >= 40


def test_catalogue_lists_every_exported_metric():
    doc = (ROOT / "docs" / "operations.md").read_text()
    missing = sorted(n for n in exported()["families"] if f"`{n}" not in doc)
    assert not missing, f"docs/operations.md lacks: {missing}"


def test_helm_template_renders_dashboards_and_rules():
    from gprl.devcluster.controlplane import find_bin_dir

    helm = find_bin_dir() / "helm"
    if not helm.exists():
        if os.environ.get("GPRL_FAST") == "1":  # the fast tier installs no tools
            pytest.skip("helm not installed (GPRL_FAST=1)")
        pytest.fail("helm not found (scripts/install-k8s-tools.sh)", pytrace=False)
    out = subprocess.run([str(helm), "template", "gprl", str(ROOT / "charts/gprl"), "--kube-version", "1.36.0",
                          "--set", "prometheusRule.enabled=true"], capture_output=True, text=True, timeout=120, check=True)
    docs = [d for d in yaml.safe_load_all(out.stdout) if d]
    boards = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["labels"].get("grafana_dashboard") == "1"]
    assert len(boards) == 3
    for cm in boards:
        (body,) = cm["data"].values()
        assert json.loads(body)["uid"].startswith("gprl-")
    (rule,) = [d for d in docs if d["kind"] == "PrometheusRule"]
    alerts = {r["alert"] for g in rule["spec"]["groups"] for r in g["rules"]}
    assert {"GPRLDriftSustained", "GPRLControlNotAcknowledged", "GPRLOperatorErrors"} <= alerts
    # the defaults: dashboards on, PrometheusRule off (its CRD may not exist)
    out = subprocess.run([str(helm), "template", "gprl", str(ROOT / "charts/gprl"), "--kube-version", "1.36.0"],
                         capture_output=True, text=True, timeout=120, check=True)
    kinds = [d["kind"] for d in yaml.safe_load_all(out.stdout) if d]
    assert "PrometheusRule" not in kinds and kinds.count("ConfigMap") >= 3
