"""The trainer's Prometheus metrics. Names here are the catalogue of docs/operations.md."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

TRAINER_GAUGES = {
    "gprl_step": "Training steps completed.",
    "gprl_policy_version": "Version of the policy weights (increments per update).",
    "gprl_drift_divergence": "D(t) = KL(α(t) ‖ α(t − N)) of the variance spectrum (N = referenceLag).",
    "gprl_drift_threshold": "Trigger threshold τ of the drift monitor.",
    "gprl_drift_triggered": "1 while the drift monitor is triggered.",
    "gprl_drift_win_rate_lead": "Win-rate lead L = w_top − max(½, w_second) of the last probe (in_process mode).",
    "gprl_drift_win_rate_lead_threshold": "Trigger threshold τ_L on the win-rate lead.",
    "gprl_kl_coef": "β_KL in use.",
    "gprl_clip_eps_low": "ε_low in use.",
    "gprl_clip_eps_high": "ε_high in use.",
    "gprl_kl": "Mean per-token KL(π_θ ‖ π_ref) estimate of the last step.",
    "gprl_clip_fraction": "Share of response tokens whose ratio was clipped.",
    "gprl_entropy": "Mean per-token policy entropy (nats).",
    "gprl_response_length": "Mean response length (tokens).",
    "gprl_tokens_per_second": "Generated tokens per second of wall time of the last step.",
    "gprl_loss": "Policy loss of the last step.",
    "gprl_learning_rate": "Learning rate of the last step.",
}
TRAINER_AXIS_GAUGES = {
    "gprl_axis_variance": "E_batch[var_i ŝ_l(i)]: spread of the raw group scores on axis l.",
    "gprl_axis_spectrum": "α_l(t): share of axis l in the variance spectrum.",
    "gprl_axis_spectrum_baseline": "The reference spectrum D(t) is measured against (α_l(t − N), N = referenceLag).",
    "gprl_axis_weight": "Control weight m_l of axis l.",
    "gprl_axis_eigenvalue": "Mean eigenvalue λ_l(x) over the batch's prompts.",
    "gprl_axis_win_rate": "Win rate of policy samples against the policy's N steps earlier on axis l (last probe).",
}


class TrainerMetrics:
    def __init__(self, run: str = "local"):
        self.registry = CollectorRegistry()
        self.run = run
        self.gauges = {n: Gauge(n, d, ["run"], registry=self.registry) for n, d in TRAINER_GAUGES.items()}
        self.axis = {n: Gauge(n, d, ["run", "axis"], registry=self.registry) for n, d in TRAINER_AXIS_GAUGES.items()}
        self.interventions = Counter(
            "gprl_drift_interventions", "Drift-monitor trigger events.", ["run"], registry=self.registry
        )
        self.interventions.labels(run)  # exported as 0 from the start, so rate() and alerts see it
        self.gpm_nonfinite = Counter(
            "gprl_gpm_nonfinite_responses", "Responses whose GPM output (embedding or eigenvalues) was not finite; "
            "their groups were left out of the advantages and the drift statistics.", ["run"], registry=self.registry,
        )
        self.gpm_nonfinite.labels(run)
        self.updates_skipped = Counter(
            "gprl_updates_skipped", "Updates skipped because the loss or the gradient norm was not finite.", ["run"],
            registry=self.registry,
        )
        self.updates_skipped.labels(run)
        self.step_seconds = Histogram(
            "gprl_step_seconds",
            "Wall time of one training step.",
            ["run", "phase"],
            registry=self.registry,
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600),
        )

    def serve(self, port: int) -> None:
        start_http_server(port, registry=self.registry)

    def record(self, rec: dict) -> None:
        r = self.run
        for name, key in [
            ("gprl_step", "step"), ("gprl_policy_version", "policy_version"), ("gprl_drift_divergence", "divergence"),
            ("gprl_drift_threshold", "tau"), ("gprl_drift_triggered", "triggered"), ("gprl_kl_coef", "kl_coef"),
            ("gprl_clip_eps_low", "eps_low"), ("gprl_clip_eps_high", "eps_high"), ("gprl_kl", "kl"),
            ("gprl_clip_fraction", "clip_fraction"), ("gprl_entropy", "entropy"),
            ("gprl_response_length", "response_length"), ("gprl_tokens_per_second", "tokens_per_second"),
            ("gprl_loss", "loss"), ("gprl_learning_rate", "learning_rate"),
        ]:
            self.gauges[name].labels(r).set(float(rec[key]))
        if rec.get("win_rate_lead") is not None:
            self.gauges["gprl_drift_win_rate_lead"].labels(r).set(float(rec["win_rate_lead"]))
        if rec.get("win_rate_lead_threshold") is not None:
            self.gauges["gprl_drift_win_rate_lead_threshold"].labels(r).set(float(rec["win_rate_lead_threshold"]))
        for name, key in [
            ("gprl_axis_variance", "axis_variance"), ("gprl_axis_spectrum", "spectrum"),
            ("gprl_axis_spectrum_baseline", "spectrum_baseline"), ("gprl_axis_weight", "weights"),
            ("gprl_axis_eigenvalue", "eigenvalues"), ("gprl_axis_win_rate", "axis_win_rate"),
        ]:
            for axis, value in enumerate(rec.get(key) or []):
                self.axis[name].labels(r, str(axis)).set(float(value))
        if rec.get("gpm_nonfinite"):
            self.gpm_nonfinite.labels(r).inc(rec["gpm_nonfinite"])
        if rec.get("update_skipped"):
            self.updates_skipped.labels(r).inc(rec["update_skipped"])
        if rec.get("trigger_events"):
            self.interventions.labels(r).inc(rec["trigger_events"])
        for phase, seconds in rec["timings"].items():
            self.step_seconds.labels(r, phase).observe(seconds)
