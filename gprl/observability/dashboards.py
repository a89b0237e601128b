"""Grafana dashboards of GPRL, built with grafana-foundation-sdk (a dev dependency; only the generator imports it).

- `gprl-run-overview`: step, throughput, KL, entropy, length, loss, clip fraction, step time by phase
- `gprl-axes`: the k axes: per-axis score spread, eigenvalues, variance spectrum and its baseline, weights m,
  D(t) with the threshold tau, beta_KL and epsilon, trigger state and interventions (trainer in-process monitor
  and the operator's drift loop side by side)
- `gprl-operator`: reconciles, errors, API requests, status writes, runs by phase, drift-loop health and latency
"""

from __future__ import annotations

import json
import zlib
from typing import Any

DS = {"type": "prometheus", "uid": "${datasource}"}
# Every query of the run dashboards is scoped by these variables (kube-prometheus conventions: `cluster` is the
# external label of a multi-cluster Prometheus; absent on a single cluster, where ".*" matches the empty value).
SCOPE = 'cluster=~"$cluster", namespace=~"$namespace"'
RUN = SCOPE + ', run=~"$run"'
BY_RUN = "namespace, run"  # aggregations keep the namespace: run names repeat across namespaces
LEGEND = "{{namespace}}/{{run}}"


def _sdk():
    from grafana_foundation_sdk.builders import common, dashboard, prometheus, stat, timeseries
    from grafana_foundation_sdk.cog.encoder import JSONEncoder
    from grafana_foundation_sdk.models import common as cm
    from grafana_foundation_sdk.models import dashboard as dm

    return common, dashboard, prometheus, stat, timeseries, JSONEncoder, dm, cm


def _ds():
    dm = _sdk()[6]
    return dm.DataSourceRef(type_val=DS["type"], uid=DS["uid"])


def panel_id(kind: str, title: str) -> int:
    """A panel's id from its type and title: stable when panels are added, removed or moved (links and alerts
    address panels by id); the tests check that no two panels of a dashboard share one."""
    return zlib.crc32(f"{kind}: {title}".encode()) % 1_000_000 + 1


def _thresholds(steps: list[tuple[float | None, str]]):
    _, dashboard, *_ = _sdk()
    dm = _sdk()[6]
    return dashboard.ThresholdsConfig().mode(dm.ThresholdsMode.ABSOLUTE).steps(
        [dm.Threshold(value=v, color=c) for v, c in steps])


def _q(expr: str, legend: str = "", ref: str = "A"):
    _, _, prometheus, *_ = _sdk()
    return prometheus.Dataquery().expr(expr).legend_format(legend or "__auto").ref_id(ref)


def _ts(title: str, queries: list[tuple[str, str]], unit: str, desc: str = "", w: int = 12, h: int = 8,
        minimum: float | None = None, warn: float | None = None, crit: float | None = None):
    """A time series panel. `warn`/`crit`: thresholds drawn as dashed lines (the alert rules' levels)."""
    common, _, _, _, timeseries, _, _, cm = _sdk()
    p = (timeseries.Panel().id(panel_id("timeseries", title)).title(title).description(desc).span(w).height(h).datasource(_ds())
         .line_width(1).fill_opacity(8).unit(unit))
    if minimum is not None:
        p = p.min(minimum)
    steps = [(None, "green")] + ([(warn, "orange")] if warn is not None else []) + \
        ([(crit, "red")] if crit is not None else [])
    p = p.thresholds(_thresholds(steps))
    if len(steps) > 1:
        p = p.thresholds_style(common.GraphThresholdsStyleConfig().mode(cm.GraphThresholdsStyleMode.DASHED))
    for i, (expr, legend) in enumerate(queries):
        p = p.with_target(_q(expr, legend, chr(ord("A") + i)))
    return p


def _stat(title: str, expr: str, unit: str, desc: str = "", w: int = 4, warn: float | None = None,
          crit: float | None = None):
    _, _, _, stat, *_ = _sdk()
    steps = [(None, "green")] + ([(warn, "orange")] if warn is not None else []) + \
        ([(crit, "red")] if crit is not None else [])
    return (stat.Panel().id(panel_id("stat", title)).title(title).description(desc).span(w).height(4).datasource(_ds())
            .unit(unit).thresholds(_thresholds(steps)).with_target(_q(expr, LEGEND)))


def _row(title: str):
    _, dashboard, *_ = _sdk()
    return dashboard.Row(title).id(panel_id("row", title))


def _var(name: str, label: str, query: str):
    _, dashboard, *_ = _sdk()
    dm = _sdk()[6]
    return (dashboard.QueryVariable(name).label(label).datasource(_ds()).query(query).include_all(True).multi(True)
            .all_value(".*").refresh(dm.VariableRefresh.ON_TIME_RANGE_CHANGED).sort(dm.VariableSort.ALPHABETICAL_ASC))


def _base(uid: str, title: str, desc: str, probe: str, run_var: bool = True):
    """Datasource, cluster and namespace variables (and run), and the drift interventions as annotations."""
    _, dashboard, *_ = _sdk()
    dm = _sdk()[6]
    d = (dashboard.Dashboard(title).uid(uid).description(desc).tags(["gprl"]).refresh("30s").time("now-6h", "now")
         .timezone("browser").tooltip(dm.DashboardCursorSync.CROSSHAIR)
         .with_variable(dashboard.DatasourceVariable("datasource").label("Prometheus").type("prometheus"))
         .with_variable(_var("cluster", "Cluster", f"label_values({probe}, cluster)"))
         .with_variable(_var("namespace", "Namespace", f'label_values({probe}{{cluster=~"$cluster"}}, namespace)')))
    if run_var:
        d = d.with_variable(_var("run", "Run", f"label_values(gprl_step{{{SCOPE}}}, run)"))
    sel = RUN if run_var else SCOPE
    for name, metric, color in (("Drift interventions (operator)", "gprl_operator_drift_interventions_total", "orange"),
                                ("Drift interventions (in-process)", "gprl_drift_interventions_total", "yellow")):
        d = d.annotation(dashboard.AnnotationQuery().name(name).datasource(_ds()).enable(True).icon_color(color)
                         .expr(f"sum by ({BY_RUN}) (changes({metric}{{{sel}}}[2m])) > 0"))
    return d


def run_overview():
    r, by, lg = RUN, BY_RUN, LEGEND
    d = _base("gprl-run-overview", "GPRL / Run overview", "Progress, throughput and health of GPRL training runs.",
              "gprl_step")
    d = (d.with_row(_row("Progress"))
         .with_panel(_stat("Step", f"max by ({by}) (gprl_step{{{r}}})", "none", "Training steps completed."))
         .with_panel(_stat("Policy version", f"max by ({by}) (gprl_policy_version{{{r}}})", "none"))
         .with_panel(_stat("Tokens / s", f"sum by ({by}) (gprl_tokens_per_second{{{r}}})", "short"))
         .with_panel(_stat("KL", f"max by ({by}) (gprl_kl{{{r}}})", "suffix: nats",
                           "Per-token KL to the reference; the KL-runaway alert starts at 0.5.", crit=0.5))
         .with_panel(_stat("Drift triggered", f"max by ({by}) (gprl_drift_triggered{{{r}}})", "bool_yes_no",
                           crit=1))
         .with_panel(_stat("Interventions", f"max by ({by}) (gprl_drift_interventions_total{{{r}}})", "none"))
         .with_panel(_ts("Step", [(f"gprl_step{{{r}}}", lg)], "none", "Steps completed; flat = stalled."))
         .with_panel(_ts("Throughput", [(f"gprl_tokens_per_second{{{r}}}", lg)], "short",
                         "Generated tokens per second of wall time.", minimum=0))
         .with_row(_row("Policy"))
         .with_panel(_ts("KL(π ‖ π_ref)", [(f"gprl_kl{{{r}}}", lg + " KL"), (f"gprl_kl_coef{{{r}}}", lg + " β_KL")],
                         "suffix: nats", "KL estimate per token (nats) and the β_KL weighting it; the KL-runaway "
                         "alert starts at 0.5.", minimum=0, crit=0.5))
         .with_panel(_ts("Entropy", [(f"gprl_entropy{{{r}}}", lg)], "suffix: nats",
                         "Mean per-token entropy; the collapse alert fires below a quarter of its 6-hour maximum.",
                         minimum=0))
         .with_panel(_ts("Response length", [(f"gprl_response_length{{{r}}}", lg)], "suffix: tokens",
                         "Mean response length.", minimum=0))
         .with_panel(_ts("Loss", [(f"gprl_loss{{{r}}}", lg)], "none", "The GPRL surrogate loss (dimensionless)."))
         .with_panel(_ts("Clip fraction", [(f"gprl_clip_fraction{{{r}}}", lg)], "percentunit",
                         "Share of tokens whose ratio was clipped; above 20 % the trust region binds hard.",
                         minimum=0, warn=0.2))
         .with_panel(_ts("Learning rate", [(f"gprl_learning_rate{{{r}}}", lg)], "sci", minimum=0))
         .with_row(_row("Step time"))
         .with_panel(_ts("Step time by phase (p50)", [(
             f"histogram_quantile(0.5, sum by ({by}, phase, le) (rate(gprl_step_seconds_bucket{{{r}}}[5m])))",
             lg + " {{phase}}")], "s", w=24, minimum=0)))
    return d


def axes():
    r, lg = RUN, LEGEND
    d = _base("gprl-axes", "GPRL / Preference axes and drift",
              "The k axes of the GPM: score spread, variance spectrum, control weights, D(t) against τ.", "gprl_step")
    d = (d.with_row(_row("Drift D(t)"))
         .with_panel(_ts("D(t) and τ — operator", [
             (f"gprl_operator_drift_divergence{{{r}}}", lg + " D(t)"),
             (f"gprl_operator_drift_threshold{{{r}}}", lg + " τ")], "suffix: nats",
             "KL(α(t) ‖ α(0)) computed by the operator's drift loop (drift.mode: operator), with the trigger "
             "threshold τ; the monitor releases below release_ratio·τ.", minimum=0))
         .with_panel(_ts("D(t) and τ — in-process", [
             (f"gprl_drift_divergence{{{r}}}", lg + " D(t)"), (f"gprl_drift_threshold{{{r}}}", lg + " τ")],
             "suffix: nats", "The same, computed in the trainer (drift.mode: in_process).", minimum=0))
         .with_panel(_ts("Win-rate lead L and τ_L", [
             (f"gprl_operator_drift_win_rate_lead{{{r}}}", lg + " L operator"),
             (f"gprl_operator_drift_win_rate_lead_threshold{{{r}}}", lg + " τ_L operator"),
             (f"gprl_drift_win_rate_lead{{{r}}}", lg + " L in-process"),
             (f"gprl_drift_win_rate_lead_threshold{{{r}}}", lg + " τ_L")], "percentunit",
             "The second signal: how much further the leading axis beats the reference than any other axis "
             "(w_top − max(½, w_second)), from the periodic probe. It sees exploitation of an axis that "
             "dominated from the start, which leaves D(t) flat.", minimum=0))
         .with_panel(_ts("Per-axis win rate against the reference", [
             (f"gprl_axis_win_rate{{{r}}}", lg + " axis {{axis}}"),
             (f"gprl_operator_drift_axis_win_rate{{{r}}}", lg + " axis {{axis}} operator")], "percentunit",
             "How often policy samples beat reference samples on axis l alone (probe every drift.probeEvery steps).",
             minimum=0))
         .with_panel(_ts("Triggered", [(f"gprl_operator_drift_triggered{{{r}}}", lg + " operator"),
                                      (f"gprl_drift_triggered{{{r}}}", lg + " in-process")], "bool_yes_no",
                         w=8, minimum=0, crit=1))
         .with_panel(_ts("Interventions", [
             (f"gprl_operator_drift_interventions_total{{{r}}}", lg + " operator"),
             (f"gprl_drift_interventions_total{{{r}}}", lg + " in-process")], "none", w=8, minimum=0))
         .with_panel(_ts("β_KL and ε", [
             (f"gprl_kl_coef{{{r}}}", lg + " β_KL"), (f"gprl_clip_eps_low{{{r}}}", lg + " ε_low"),
             (f"gprl_clip_eps_high{{{r}}}", lg + " ε_high")], "none", w=8,
             desc="The trust region the trainer uses (its applied control).", minimum=0))
         .with_row(_row("Per-axis"))
         .with_panel(_ts("Per-axis score spread", [(f"gprl_axis_variance{{{r}}}", lg + " axis {{axis}}")], "none",
                         "E_batch[var_i ŝ_l(i)]: how much the group's raw scores differ on axis l.", minimum=0))
         .with_panel(_ts("Eigenvalues λ_l", [(f"gprl_axis_eigenvalue{{{r}}}", lg + " axis {{axis}}")], "none",
                         "Mean eigenvalue gate λ_l(x) over the batch's prompts (Σ λ = k).", minimum=0))
         .with_panel(_ts("Variance spectrum α(t)", [
             (f"gprl_axis_spectrum{{{r}}}", lg + " α_{{axis}}(t)"),
             (f"gprl_operator_drift_axis_spectrum{{{r}}}", lg + " α_{{axis}}(t) operator")], "percentunit",
             "Share of each axis in the variance spectrum; the exploitation alert looks above 60 %.", minimum=0,
             warn=0.6))
         .with_panel(_ts("Start-of-run spectrum α(0)", [
             (f"gprl_axis_spectrum_baseline{{{r}}}", lg + " α_{{axis}}(0)"),
             (f"gprl_operator_drift_axis_spectrum_baseline{{{r}}}", lg + " α_{{axis}}(0) operator")], "percentunit",
             minimum=0))
         .with_panel(_ts("Axis weights m_l", [
             (f"gprl_axis_weight{{{r}}}", lg + " m_{{axis}} applied"),
             (f"gprl_operator_drift_axis_weight{{{r}}}", lg + " m_{{axis}} operator")], "none",
             "Control weights (mean 1): the trainer's applied weights and the operator's decision.", w=24,
             minimum=0)))
    return d


def operator_health():
    s = SCOPE
    d = _base("gprl-operator", "GPRL / Operator health", "The kopf operator: reconciles, API traffic, drift loop.",
              "gprl_operator_reconcile_total", run_var=False)
    d = (d.with_row(_row("Reconcile"))
         .with_panel(_ts("Handler invocations", [(
             f"sum by (namespace, handler, result) (rate(gprl_operator_reconcile_total{{{s}}}[5m]))",
             "{{namespace}} {{handler}} {{result}}")], "ops", minimum=0))
         .with_panel(_ts("Handler errors", [(
             f"sum by (namespace, handler, kind) (rate(gprl_operator_reconcile_errors_total{{{s}}}[5m]))",
             "{{namespace}} {{handler}} {{kind}}")], "ops", "The operator-errors alert fires above 0.01/s.",
             minimum=0, crit=0.01))
         .with_panel(_ts("Handler duration p95", [(
             "histogram_quantile(0.95, sum by (namespace, handler, le) "
             f"(rate(gprl_operator_reconcile_duration_seconds_bucket{{{s}}}[5m])))",
             "{{namespace}} {{handler}}")], "s", minimum=0))
         .with_panel(_ts("Runs by phase", [(f"sum by (namespace, phase) (gprl_operator_runs{{{s}}})",
                                            "{{namespace}} {{phase}}")], "none", minimum=0))
         .with_row(_row("Kubernetes API"))
         .with_panel(_ts("API requests", [(
             f"sum by (namespace, client, verb, code) (rate(gprl_operator_api_requests_total{{{s}}}[5m]))",
             "{{namespace}} {{client}} {{verb}} {{code}}")], "reqps", minimum=0))
         .with_panel(_ts("API latency p95", [(
             "histogram_quantile(0.95, sum by (namespace, verb, le) "
             f"(rate(gprl_operator_api_request_duration_seconds_bucket{{{s}}}[5m])))",
             "{{namespace}} {{verb}}")], "s", minimum=0))
         .with_panel(_ts("Status writes", [(
             f"sum by (namespace, trigger) (rate(gprl_operator_status_writes_total{{{s}}}[5m]))",
             "{{namespace}} {{trigger}}")], "ops", minimum=0))
         .with_row(_row("Drift loop"))
         .with_panel(_ts("Monitored runs", [(f"sum by (namespace) (gprl_operator_drift_monitored_runs{{{s}}})",
                                             "{{namespace}}")], "none", minimum=0))
         .with_panel(_ts("Loop latency (report → applied)", [
             ("histogram_quantile(0.5, sum by (namespace, le) "
              f"(rate(gprl_operator_drift_loop_latency_seconds_bucket{{{s}}}[15m])))", "{{namespace}} p50"),
             ("histogram_quantile(0.95, sum by (namespace, le) "
              f"(rate(gprl_operator_drift_loop_latency_seconds_bucket{{{s}}}[15m])))", "{{namespace}} p95")],
             "s", "From the job's statistics report to the control decided from it applied at a step boundary.",
             minimum=0))
         .with_panel(_ts("Tick duration p95", [(
             "histogram_quantile(0.95, sum by (namespace, le) "
             f"(rate(gprl_operator_drift_tick_duration_seconds_bucket{{{s}}}[5m])))", "{{namespace}} p95")],
             "s", minimum=0))
         .with_panel(_ts("Drift-loop errors and refusals", [
             (f"sum by (namespace, kind) (rate(gprl_operator_drift_errors_total{{{s}}}[5m]))",
              "{{namespace}} error {{kind}}"),
             (f"sum by (namespace, run) (rate(gprl_operator_drift_refused_controls_total{{{s}}}[5m]))",
              "refused " + LEGEND)], "ops", minimum=0))
         .with_panel(_ts("Control writes", [(
             f"sum by (namespace, reason) (rate(gprl_operator_drift_control_writes_total{{{s}}}[5m]))",
             "{{namespace}} {{reason}}")], "ops", minimum=0))
         .with_panel(_ts("Unacknowledged control age", [(
             f"gprl_operator_drift_control_pending_seconds{{{s}}}", LEGEND)], "s",
             "Age of the oldest control generation the job has not applied yet; the alert fires past 600 s.",
             minimum=0, crit=600)))
    return d


DASHBOARDS = {"gprl-run-overview": run_overview, "gprl-axes": axes, "gprl-operator": operator_health}


def render(name: str) -> str:
    JSONEncoder = _sdk()[5]
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
