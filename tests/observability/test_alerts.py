"""`promtool test rules` on the generated alert rules (charts/gprl/rules/gprl-alerts.yaml), with the real promtool.

Each alert has a case in which it fires (for the bad series only) and one in which it stays quiet (healthy series,
or the bad series before the alert's `for:` has passed). The promtool test file is built here from CASES so that the
expected annotations come from the rules themselves; it is also written next to the test log for reruns by hand:
`promtool test rules <tmp>/alerts.test.yaml`.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "charts" / "gprl" / "rules" / "gprl-alerts.yaml"


def promtool() -> str:
    from gprl.devcluster.controlplane import find_bin_dir

    for cand in (find_bin_dir() / "promtool", shutil.which("promtool")):
        if cand and Path(cand).exists():
            return str(cand)
    if os.environ.get("GPRL_FAST") == "1":  # the fast tier installs no tools
        pytest.skip("promtool not installed (GPRL_FAST=1)")
    pytest.fail("promtool not found: scripts/install-k8s-tools.sh (Debian's prometheus package)", pytrace=False)


# alert -> (input series, [(eval_time, [labels of the alerts expected])])
CASES: dict[str, tuple[dict[str, str], list[tuple[str, list[dict]]]]] = {
    "GPRLDriftSustained": (
        {
            'gprl_operator_drift_triggered{namespace="ns",run="bad"}': "1x60",
            'gprl_operator_drift_triggered{namespace="ns",run="ok"}': "0x60",
            'gprl_operator_drift_triggered{namespace="ns",run="blip"}': "0x10 1x10 0x40",
            'gprl_drift_triggered{run="local-bad"}': "1x60",
            'gprl_drift_triggered{run="local-ok"}': "0 1 0 1 0x56",
        },
        [("20m", []), ("45m", [{"namespace": "ns", "run": "bad"}, {"run": "local-bad"}])],
    ),
    "GPRLSingleAxisExploitationSuspected": (
        {
            'gprl_operator_drift_axis_spectrum{namespace="ns",run="bad",axis="0"}': "0.2x40",
            'gprl_operator_drift_axis_spectrum{namespace="ns",run="bad",axis="1"}': "0.1x40",
            'gprl_operator_drift_axis_spectrum{namespace="ns",run="bad",axis="2"}': "0.7x40",
            'gprl_operator_drift_axis_spectrum_baseline{namespace="ns",run="bad",axis="0"}': "0.34x40",
            'gprl_operator_drift_axis_spectrum_baseline{namespace="ns",run="bad",axis="1"}': "0.33x40",
            'gprl_operator_drift_axis_spectrum_baseline{namespace="ns",run="bad",axis="2"}': "0.33x40",
            # dominant from the start (a one-axis GPM): not exploitation
            'gprl_operator_drift_axis_spectrum{namespace="ns",run="ok",axis="0"}': "0.8x40",
            'gprl_operator_drift_axis_spectrum{namespace="ns",run="ok",axis="1"}': "0.2x40",
            'gprl_operator_drift_axis_spectrum_baseline{namespace="ns",run="ok",axis="0"}': "0.75x40",
            'gprl_operator_drift_axis_spectrum_baseline{namespace="ns",run="ok",axis="1"}': "0.25x40",
            'gprl_axis_spectrum{run="local-bad",axis="0"}': "0.1x40",
            'gprl_axis_spectrum{run="local-bad",axis="1"}': "0.9x40",
            'gprl_axis_spectrum_baseline{run="local-bad",axis="0"}': "0.6x40",
            'gprl_axis_spectrum_baseline{run="local-bad",axis="1"}': "0.4x40",
            # the win-rate lead: over τ_L (fires), under it, and over it with the signal turned off (τ_L = 0)
            'gprl_operator_drift_win_rate_lead{namespace="ns",run="lead"}': "0.1x40",
            'gprl_operator_drift_win_rate_lead_threshold{namespace="ns",run="lead"}': "0.06x40",
            'gprl_operator_drift_win_rate_lead{namespace="ns",run="lead-ok"}': "0.03x40",
            'gprl_operator_drift_win_rate_lead_threshold{namespace="ns",run="lead-ok"}': "0.06x40",
            'gprl_operator_drift_win_rate_lead{namespace="ns",run="lead-off"}': "0.2x40",
            'gprl_operator_drift_win_rate_lead_threshold{namespace="ns",run="lead-off"}': "0x40",
            'gprl_drift_win_rate_lead{run="local-lead"}': "0.02x5 0.09x35",
            'gprl_drift_win_rate_lead_threshold{run="local-lead"}': "0.06x40",
        },
        [("10m", []), ("30m", [{"namespace": "ns", "run": "bad"}, {"run": "local-bad"},
                               {"namespace": "ns", "run": "lead"}, {"run": "local-lead"}])],
    ),
    "GPRLKLRunaway": (
        {
            'gprl_kl{run="bad"}': "0.3+0.01x60",
            'gprl_kl{run="ok"}': "0.05x60",
            'gprl_kl{run="high-but-flat"}': "0.8x60",
        },
        [("25m", []), ("45m", [{"run": "bad"}])],
    ),
    "GPRLEntropyCollapse": (
        {'gprl_entropy{run="bad"}': "2x10 0.2x50", 'gprl_entropy{run="ok"}': "2x20 1.5x40"},
        [("20m", []), ("40m", [{"run": "bad"}])],
    ),
    "GPRLRunStalled": (
        {'gprl_step{run="bad"}': "1+1x30 31x60", 'gprl_step{run="ok"}': "1+1x90"},
        [("55m", []), ("80m", [{"run": "bad"}])],
    ),
    "GPRLOperatorErrors": (
        {
            'gprl_operator_reconcile_errors_total{handler="reconcile",kind="ApiError"}': "0+2x60",
            'gprl_operator_drift_errors_total{kind="ApiError/503"}': "0x60",
        },
        [("5m", []), ("45m", [{}])],
    ),
    "GPRLControlNotAcknowledged": (
        {
            'gprl_operator_drift_control_pending_seconds{namespace="ns",run="bad"}': "0+60x30",
            'gprl_operator_drift_control_pending_seconds{namespace="ns",run="ok"}': "0 30 0 45 0 20 0x24",
        },
        [("12m", []), ("25m", [{"namespace": "ns", "run": "bad"}])],
    ),
}
QUIET_ONLY = {
    # the operator is healthy: no errors at all (both counters flat, one of them absent)
    "GPRLOperatorErrors": ({'gprl_operator_reconcile_errors_total{handler="reconcile",kind="ApiError"}': "3x60"},
                           [("45m", [])]),
}


def _rules() -> dict[str, dict]:
    doc = yaml.safe_load(RULES.read_text())
    return {r["alert"]: r for g in doc["groups"] for r in g["rules"] if "alert" in r}


def _render(text: str, labels: dict) -> str:
    return re.sub(r"\{\{\s*\$labels\.(\w+)\s*\}\}", lambda m: labels.get(m.group(1), ""), text)


def _group(alert: str, series: dict, evals: list, rule: dict) -> dict:
    tests = []
    for at, expected in evals:
        exp = []
        for labels in expected:
            exp.append({"exp_labels": {**rule["labels"], **labels},
                        "exp_annotations": {k: _render(v, labels) for k, v in rule["annotations"].items()}})
        tests.append({"eval_time": at, "alertname": alert, "exp_alerts": exp})
    return {"interval": "1m", "input_series": [{"series": s, "values": v} for s, v in series.items()],
            "alert_rule_test": tests}


def test_every_alert_has_a_firing_and_a_quiet_case():
    rules = _rules()
    assert set(CASES) == set(rules), "every alert needs a case in CASES (and no case without its alert)"
    for alert, (_, evals) in CASES.items():
        assert any(e for _, e in evals), f"{alert}: no case where it fires"
        assert any(not e for _, e in evals), f"{alert}: no case where it stays quiet"


def test_promtool_check_rules():
    out = subprocess.run([promtool(), "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def test_promtool_test_rules(tmp_path):
    rules = _rules()
    groups = [_group(a, s, e, rules[a]) for a, (s, e) in CASES.items()]
    groups += [_group(a, s, e, rules[a]) for a, (s, e) in QUIET_ONLY.items()]
    shutil.copy(RULES, tmp_path / "gprl-alerts.yaml")
    test_file = tmp_path / "alerts.test.yaml"
    test_file.write_text(yaml.safe_dump({"rule_files": ["gprl-alerts.yaml"], "evaluation_interval": "1m",
                                         "tests": groups}, sort_keys=False, width=200))
    out = subprocess.run([promtool(), "test", "rules", str(test_file)], capture_output=True, text=True, timeout=120,
                         cwd=tmp_path)
    assert out.returncode == 0, f"{test_file}\n{out.stdout}\n{out.stderr}"
    assert "SUCCESS" in out.stdout + out.stderr
