"""Grafana dashboards of GPRL, built with grafana-foundation-sdk (a dev dependency; only the generator imports it).

- `gprl-run-overview`: step, throughput, KL, entropy, length, loss, clip fraction, step time by phase
- `gprl-axes`: the k axes: per-axis score spread, eigenvalues, variance spectrum and its baseline, weights m,
  D(t) with the threshold tau, beta_KL and epsilon, trigger state and interventions (trainer in-process monitor
  and the operator's drift loop side by side)
- `gprl-operator`: reconciles, errors, API requests, status writes, runs by phase, drift-loop health and latency
"""

from __future__ import annotations

import json
from typing import Any

DS = {"type": "prometheus", "uid": "${datasource}"}


def _sdk():
    from grafana_foundation_sdk.builders import common, dashboard, prometheus, stat, timeseries
    from grafana_foundation_sdk.cog.encoder import JSONEncoder
    from grafana_foundation_sdk.models import dashboard as dm

    return common, dashboard, prometheus, stat, timeseries, JSONEncoder, dm


def _q(expr: str, legend: str = "", ref: str = "A"):
    _, _, prometheus, *_ = _sdk()
    return prometheus.Dataquery().expr(expr).legend_format(legend or "__auto").ref_id(ref)


def _ts(title: str, queries: list[tuple[str, str]], unit: str = "", desc: str = "", w: int = 12, h: int = 8,
        minimum: float | None = None):
    common, _, _, _, timeseries, _, dm = _sdk()
    p = timeseries.Panel().title(title).description(desc).span(w).height(h).datasource(dm.DataSourceRef(**{
        "type_val": DS["type"], "uid": DS["uid"]})).line_width(1).fill_opacity(8)
    if unit:
        p = p.unit(unit)
    if minimum is not None:
        p = p.min(minimum)
    for i, (expr, legend) in enumerate(queries):
        p = p.with_target(_q(expr, legend, chr(ord("A") + i)))
    return p


def _stat(title: str, expr: str, unit: str = "", desc: str = "", w: int = 4):
    _, _, _, stat, _, _, dm = _sdk()
    p = stat.Panel().title(title).description(desc).span(w).height(4).datasource(
        dm.DataSourceRef(type_val=DS["type"], uid=DS["uid"])).with_target(_q(expr, "{{run}}"))
    return p.unit(unit) if unit else p


def _base(uid: str, title: str, desc: str, run_var: bool = True):
    _, dashboard, _, _, _, _, dm = _sdk()
    d = (dashboard.Dashboard(title).uid(uid).description(desc).tags(["gprl"]).refresh("30s").time("now-6h", "now")
         .timezone("browser").tooltip(dm.DashboardCursorSync.CROSSHAIR)
         .with_variable(dashboard.DatasourceVariable("datasource").label("Prometheus").type("prometheus")))
    if run_var:
        d = d.with_variable(
            dashboard.QueryVariable("run").label("Run").datasource(dm.DataSourceRef(type_val=DS["type"], uid=DS["uid"]))
            .query("label_values(gprl_step, run)").include_all(True).multi(True).all_value(".*")
        )
    return d


def run_overview():
    _, dashboard, *_ = _sdk()
    r = 'run=~"$run"'
    d = _base("gprl-run-overview", "GPRL / Run overview", "Progress, throughput and health of GPRL training runs.")
    d = (d.with_row(dashboard.Row("Progress"))
         .with_panel(_stat("Step", f"max by (run) (gprl_step{{{r}}})", desc="Training steps completed."))
         .with_panel(_stat("Policy version", f"max by (run) (gprl_policy_version{{{r}}})"))
         .with_panel(_stat("Tokens / s", f"sum by (run) (gprl_tokens_per_second{{{r}}})", "short"))
         .with_panel(_stat("KL", f"max by (run) (gprl_kl{{{r}}})", desc="Per-token KL to the reference."))
         .with_panel(_stat("Drift triggered", f"max by (run) (gprl_drift_triggered{{{r}}})"))
         .with_panel(_stat("Interventions", f"max by (run) (gprl_drift_interventions_total{{{r}}})"))
         .with_panel(_ts("Step", [(f"gprl_step{{{r}}}", "{{run}}")], desc="Steps completed; flat = stalled."))
         .with_panel(_ts("Throughput", [(f"gprl_tokens_per_second{{{r}}}", "{{run}}")], "short",
                         "Generated tokens per second of wall time."))
         .with_row(dashboard.Row("Policy"))
         .with_panel(_ts("KL(π ‖ π_ref)", [(f"gprl_kl{{{r}}}", "{{run}} KL"), (f"gprl_kl_coef{{{r}}}", "{{run}} β_KL")],
                         desc="KL estimate per token and the β_KL weighting it."))
         .with_panel(_ts("Entropy", [(f"gprl_entropy{{{r}}}", "{{run}}")], desc="Mean per-token entropy (nats)."))
         .with_panel(_ts("Response length", [(f"gprl_response_length{{{r}}}", "{{run}}")], desc="Mean tokens."))
         .with_panel(_ts("Loss", [(f"gprl_loss{{{r}}}", "{{run}}")]))
         .with_panel(_ts("Clip fraction", [(f"gprl_clip_fraction{{{r}}}", "{{run}}")], "percentunit"))
         .with_panel(_ts("Learning rate", [(f"gprl_learning_rate{{{r}}}", "{{run}}")]))
         .with_row(dashboard.Row("Step time"))
         .with_panel(_ts("Step time by phase (p50)", [(
             f"histogram_quantile(0.5, sum by (run, phase, le) (rate(gprl_step_seconds_bucket{{{r}}}[5m])))",
             "{{run}} {{phase}}")], "s", w=24)))
    return d


def axes():
    _, dashboard, *_ = _sdk()
    r = 'run=~"$run"'
    d = _base("gprl-axes", "GPRL / Preference axes and drift",
              "The k axes of the GPM: score spread, variance spectrum, control weights, D(t) against τ.")
    d = (d.with_row(dashboard.Row("Drift D(t)"))
         .with_panel(_ts("D(t) and τ — operator", [
             (f"gprl_operator_drift_divergence{{{r}}}", "{{run}} D(t)"),
             (f"gprl_operator_drift_threshold{{{r}}}", "{{run}} τ")],
             desc="KL(α(t) ‖ α(0)) computed by the operator's drift loop (drift.mode: operator), with the trigger "
                  "threshold τ; the monitor releases below release_ratio·τ.", minimum=0))
         .with_panel(_ts("D(t) and τ — in-process", [
             (f"gprl_drift_divergence{{{r}}}", "{{run}} D(t)"), (f"gprl_drift_threshold{{{r}}}", "{{run}} τ")],
             desc="The same, computed in the trainer (drift.mode: in_process).", minimum=0))
         .with_panel(_ts("Win-rate lead L and τ_L", [
             (f"gprl_operator_drift_win_rate_lead{{{r}}}", "{{run}} L operator"),
             (f"gprl_operator_drift_win_rate_lead_threshold{{{r}}}", "{{run}} τ_L operator"),
             (f"gprl_drift_win_rate_lead{{{r}}}", "{{run}} L in-process"),
             (f"gprl_drift_win_rate_lead_threshold{{{r}}}", "{{run}} τ_L")],
             desc="The second signal: how much further the leading axis beats the reference than any other axis "
                  "(w_top − max(½, w_second)), from the periodic probe. It sees exploitation of an axis that "
                  "dominated from the start, which leaves D(t) flat.", minimum=0))
         .with_panel(_ts("Per-axis win rate against the reference", [
             (f"gprl_axis_win_rate{{{r}}}", "{{run}} axis {{axis}}"),
             (f"gprl_operator_drift_axis_win_rate{{{r}}}", "{{run}} axis {{axis}} operator")], "percentunit",
             "How often policy samples beat reference samples on axis l alone (probe every drift.probeEvery steps)."))
         .with_panel(_ts("Triggered", [(f"gprl_operator_drift_triggered{{{r}}}", "{{run}} operator"),
                                      (f"gprl_drift_triggered{{{r}}}", "{{run}} in-process")], w=8, minimum=0))
         .with_panel(_ts("Interventions", [
             (f"gprl_operator_drift_interventions_total{{{r}}}", "{{run}} operator"),
             (f"gprl_drift_interventions_total{{{r}}}", "{{run}} in-process")], w=8, minimum=0))
         .with_panel(_ts("β_KL and ε", [
             (f"gprl_kl_coef{{{r}}}", "{{run}} β_KL"), (f"gprl_clip_eps_low{{{r}}}", "{{run}} ε_low"),
             (f"gprl_clip_eps_high{{{r}}}", "{{run}} ε_high")], w=8,
             desc="The trust region the trainer uses (its applied control)."))
         .with_row(dashboard.Row("Per-axis"))
         .with_panel(_ts("Per-axis score spread", [(f"gprl_axis_variance{{{r}}}", "{{run}} axis {{axis}}")],
                         desc="E_batch[var_i ŝ_l(i)]: how much the group's raw scores differ on axis l."))
         .with_panel(_ts("Eigenvalues λ_l", [(f"gprl_axis_eigenvalue{{{r}}}", "{{run}} axis {{axis}}")],
                         desc="Mean eigenvalue gate λ_l(x) over the batch's prompts (Σ λ = k)."))
         .with_panel(_ts("Variance spectrum α(t)", [
             (f"gprl_axis_spectrum{{{r}}}", "{{run}} α_{{axis}}(t)"),
             (f"gprl_operator_drift_axis_spectrum{{{r}}}", "{{run}} α_{{axis}}(t) operator")], "percentunit",
             "Share of each axis in the variance spectrum.", minimum=0))
         .with_panel(_ts("Start-of-run spectrum α(0)", [
             (f"gprl_axis_spectrum_baseline{{{r}}}", "{{run}} α_{{axis}}(0)"),
             (f"gprl_operator_drift_axis_spectrum_baseline{{{r}}}", "{{run}} α_{{axis}}(0) operator")], "percentunit",
             minimum=0))
         .with_panel(_ts("Axis weights m_l", [
             (f"gprl_axis_weight{{{r}}}", "{{run}} m_{{axis}} applied"),
             (f"gprl_operator_drift_axis_weight{{{r}}}", "{{run}} m_{{axis}} operator")],
             desc="Control weights (mean 1): the trainer's applied weights and the operator's decision.", w=24)))
    return d


def operator_health():
    _, dashboard, *_ = _sdk()
    d = _base("gprl-operator", "GPRL / Operator health", "The kopf operator: reconciles, API traffic, drift loop.",
              run_var=False)
    d = (d.with_row(dashboard.Row("Reconcile"))
         .with_panel(_ts("Handler invocations", [(
             "sum by (handler, result) (rate(gprl_operator_reconcile_total[5m]))", "{{handler}} {{result}}")], "ops"))
         .with_panel(_ts("Handler errors", [(
             "sum by (handler, kind) (rate(gprl_operator_reconcile_errors_total[5m]))", "{{handler}} {{kind}}")], "ops"))
         .with_panel(_ts("Handler duration p95", [(
             "histogram_quantile(0.95, sum by (handler, le) (rate(gprl_operator_reconcile_duration_seconds_bucket[5m])))",
             "{{handler}}")], "s"))
         .with_panel(_ts("Runs by phase", [("sum by (phase) (gprl_operator_runs)", "{{phase}}")]))
         .with_row(dashboard.Row("Kubernetes API"))
         .with_panel(_ts("API requests", [(
             "sum by (client, verb, code) (rate(gprl_operator_api_requests_total[5m]))", "{{client}} {{verb}} {{code}}")],
             "reqps"))
         .with_panel(_ts("API latency p95", [(
             "histogram_quantile(0.95, sum by (verb, le) (rate(gprl_operator_api_request_duration_seconds_bucket[5m])))",
             "{{verb}}")], "s"))
         .with_panel(_ts("Status writes", [("sum by (trigger) (rate(gprl_operator_status_writes_total[5m]))",
                                            "{{trigger}}")], "ops"))
         .with_row(dashboard.Row("Drift loop"))
         .with_panel(_ts("Monitored runs", [("gprl_operator_drift_monitored_runs", "runs")]))
         .with_panel(_ts("Loop latency (report → applied)", [
             ("histogram_quantile(0.5, sum by (le) (rate(gprl_operator_drift_loop_latency_seconds_bucket[15m])))", "p50"),
             ("histogram_quantile(0.95, sum by (le) (rate(gprl_operator_drift_loop_latency_seconds_bucket[15m])))", "p95")],
             "s", "From the job's statistics report to the control decided from it applied at a step boundary."))
         .with_panel(_ts("Tick duration p95", [(
             "histogram_quantile(0.95, sum by (le) (rate(gprl_operator_drift_tick_duration_seconds_bucket[5m])))", "p95")],
             "s"))
         .with_panel(_ts("Drift-loop errors and refusals", [
             ("sum by (kind) (rate(gprl_operator_drift_errors_total[5m]))", "error {{kind}}"),
             ("sum by (namespace, run) (rate(gprl_operator_drift_refused_controls_total[5m]))", "refused {{run}}")], "ops"))
         .with_panel(_ts("Control writes", [(
             "sum by (reason) (rate(gprl_operator_drift_control_writes_total[5m]))", "{{reason}}")], "ops"))
         .with_panel(_ts("Unacknowledged control age", [(
             "gprl_operator_drift_control_pending_seconds", "{{namespace}}/{{run}}")], "s",
             "Age of the oldest control generation the job has not applied yet.")))
    return d


DASHBOARDS = {"gprl-run-overview": run_overview, "gprl-axes": axes, "gprl-operator": operator_health}


def render(name: str) -> str:
    *_, JSONEncoder, _ = _sdk()
    board = DASHBOARDS[name]().build()
    data: Any = json.loads(json.dumps(board, cls=JSONEncoder))
    return json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def expressions(board: dict) -> list[str]:
    """Every PromQL expression of a rendered dashboard (panels, rows' panels, variables)."""
    out = []
    for panel in board.get("panels") or []:
        for p in [panel, *(panel.get("panels") or [])]:
            out += [t["expr"] for t in p.get("targets") or [] if t.get("expr")]
    for v in (board.get("templating") or {}).get("list") or []:
        q = v.get("query")
        if isinstance(q, str) and v.get("type") == "query":
            out.append(q)
    return out
