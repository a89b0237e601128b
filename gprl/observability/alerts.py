"""Prometheus alert rules of a GPRL installation (runbooks: docs/operations.md#runbooks)."""

from __future__ import annotations

from functools import partial
from typing import Any

# The runbooks' base URL; an alert's runbook is <base><alert name in lower case>. The chart's
# `prometheusRule.runbookBaseURL` and `python -m gprl.observability --runbook-base-url` replace it.
RUNBOOK = "https://github.com/gprl/gprl/blob/main/docs/operations.md#"

# Every aggregation keeps `namespace` (and `run`): run names repeat across namespaces, and routing by namespace is
# how a platform team sends a run's alerts to the team that owns it. The trainer's series get `namespace` from
# their scrape target (the PodMonitor); the operator's per-run series carry the run's own `namespace` label, kept
# by `honorLabels: true` on its ServiceMonitor.


def _alert(name: str, expr: str, for_: str, severity: str, summary: str, description: str,
           runbook_base: str) -> dict[str, Any]:
    return {
        "alert": name,
        "expr": expr,
        "for": for_,
        "labels": {"severity": severity, "team": "gprl"},
        "annotations": {"summary": summary, "description": description,
                        "runbook_url": runbook_base + name.lower()},
    }


def rules(runbook_base: str = RUNBOOK) -> dict[str, Any]:
    """The rule file (`groups:`), the same body as a PrometheusRule's `spec`."""
    alert = partial(_alert, runbook_base=runbook_base)
    training = [
        alert(
            "GPRLDriftSustained",
            "max by (namespace, run) (gprl_operator_drift_triggered) == 1"
            " or max by (namespace, run) (gprl_drift_triggered) == 1",
            "30m", "warning",
            "Drift monitor of run {{ $labels.namespace }}/{{ $labels.run }} has been triggered for 30 minutes",
            "D(t) stayed above the release level for 30 minutes although the monitor re-weights the axes and raises "
            "beta_KL: the policy keeps pulling the variance spectrum towards one part of the preference space.",
        ),
        alert(
            "GPRLSingleAxisExploitationSuspected",
            "max by (namespace, run) ((gprl_operator_drift_axis_spectrum > 0.6) and "
            "(gprl_operator_drift_axis_spectrum > 2 * gprl_operator_drift_axis_spectrum_baseline))"
            " or max by (namespace, run) ((gprl_axis_spectrum > 0.6) and"
            " (gprl_axis_spectrum > 2 * gprl_axis_spectrum_baseline))"
            " or max by (namespace, run) ((gprl_operator_drift_win_rate_lead > "
            "gprl_operator_drift_win_rate_lead_threshold) and (gprl_operator_drift_win_rate_lead_threshold > 0))"
            " or max by (namespace, run) ((gprl_drift_win_rate_lead > gprl_drift_win_rate_lead_threshold) and "
            "(gprl_drift_win_rate_lead_threshold > 0))",
            "15m", "warning",
            "One preference axis dominates run {{ $labels.namespace }}/{{ $labels.run }}",
            "For 15 minutes either a single axis has held more than 60% of the variance spectrum and more than twice "
            "its start-of-run share, or one axis has beaten the reference by more than tau_L beyond any other axis "
            "(win-rate lead) while the monitor was already steering: the policy is likely exploiting that axis.",
        ),
        alert(
            "GPRLKLRunaway",
            "(gprl_kl > 0.5) and (deriv(gprl_kl[10m]) > 0)",
            "10m", "critical",
            "KL to the reference keeps growing in run {{ $labels.namespace }}/{{ $labels.run }}",
            "Per-token KL(pi || pi_ref) is above 0.5 nats and still rising after 10 minutes; the trust region "
            "does not hold the policy.",
        ),
        alert(
            "GPRLEntropyCollapse",
            "gprl_entropy < 0.25 * max_over_time(gprl_entropy[6h])",
            "15m", "warning",
            "Policy entropy collapsed in run {{ $labels.namespace }}/{{ $labels.run }}",
            "Mean per-token entropy is below a quarter of its 6-hour maximum for 15 minutes: the policy has become "
            "(nearly) deterministic; rollouts of a group will look alike and the advantages vanish.",
        ),
        alert(
            "GPRLRunStalled",
            "changes(gprl_step[20m]) == 0",
            "10m", "warning",
            "Run {{ $labels.namespace }}/{{ $labels.run }} has not completed a step for 30 minutes",
            "gprl_step has not changed for 30 minutes while the trainer is still scraped.",
        ),
    ]
    operator = [
        alert(
            "GPRLOperatorErrors",
            # per namespace; `A or B * 0`: a namespace that has only one of the two counters still gets a sum
            "(sum by (namespace) (rate(gprl_operator_reconcile_errors_total[10m]))"
            " or sum by (namespace) (rate(gprl_operator_drift_errors_total[10m])) * 0)"
            " + (sum by (namespace) (rate(gprl_operator_drift_errors_total[10m]))"
            " or sum by (namespace) (rate(gprl_operator_reconcile_errors_total[10m])) * 0) > 0.01",
            "10m", "warning",
            "The GPRL operator keeps failing (namespace {{ $labels.namespace }})",
            "Reconcile handlers or drift-loop ticks have failed at more than one per 100 s for 10 minutes.",
        ),
        alert(
            "GPRLControlNotAcknowledged",
            "gprl_operator_drift_control_pending_seconds > 600",
            "5m", "warning",
            "Run {{ $labels.namespace }}/{{ $labels.run }} does not apply the operator's control",
            "A control generation written by the drift loop has not been acknowledged by the job for 15 minutes.",
        ),
    ]
    return {"groups": [{"name": "gprl.training", "rules": training}, {"name": "gprl.operator", "rules": operator}]}
