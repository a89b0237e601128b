"""Closed-loop drift monitor (method.md §3).

Two signals:

- the variance spectrum α(t) — how the per-axis spread of raw group scores is shared among the
  k axes — and its divergence D(t) = KL(α(t) ‖ α(0)) from the start of the run;
- the win-rate lead L(t) = w_top − max(½, w_second) of the per-axis win rates w_l of current
  samples against reference samples (the second signal of §3). It sees exploitation of an axis
  that dominated from the start, which leaves the spectrum where it was.

Above τ (or L above τ_L) it down-weights the axes that gained share and the leading axis, raises
β_KL and tightens ε; when both fall below release_ratio times their thresholds it relaxes back to
baseline. It takes plain per-axis statistics (lists or tensors), so the trainer and the
Kubernetes operator run the very same object.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Sequence

from gprl.config import DriftSpec

_TINY = 1e-12


@dataclass
class Control:
    """What the monitor sets for the next step: axis weights m, β_KL and the clip range."""

    weights: list[float]
    kl_coef: float
    eps_low: float
    eps_high: float

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class DriftState:
    step: int = 0
    spectrum: list[float] | None = None  # α(t), EMA-smoothed
    baseline_sum: list[float] | None = None
    baseline_count: int = 0
    baseline: list[float] | None = None  # α(0)
    divergence: float = 0.0  # D(t)
    win_rate: list[float] | None = None  # last probed per-axis win rates against the reference
    lead: float = 0.0  # L(t)
    lead_axis: int | None = None
    triggered: bool = False
    interventions: int = 0  # number of trigger events
    control: Control | None = None
    events: list[dict] = field(default_factory=list)  # trigger/release transitions of the last update


def spectrum_of(axis_variance: Sequence[float]) -> list[float]:
    """α_l = var_l / Σ var; uniform when every axis is flat."""
    total = sum(max(float(v), 0.0) for v in axis_variance)
    k = len(axis_variance)
    if total <= _TINY:
        return [1.0 / k] * k
    return [max(float(v), 0.0) / total for v in axis_variance]


def kl_divergence(p: Sequence[float], q: Sequence[float]) -> float:
    """KL(p ‖ q) of two distributions over axes (floored to avoid log 0)."""
    return sum(pi * math.log(max(pi, _TINY) / max(qi, _TINY)) for pi, qi in zip(p, q) if pi > 0)


def renormalise(weights: Sequence[float], lo: float, hi: float) -> list[float]:
    """Scale to mean 1 and clamp to [lo, hi]; repeated because a clamp moves the mean."""
    weights = list(weights)
    for _ in range(8):
        mean = sum(weights) / len(weights)
        weights = [min(hi, max(lo, w / mean)) for w in weights]
    return weights


def win_rate_lead(axis_win_rate: Sequence[float]) -> tuple[float, int]:
    """L = w_top − max(½, w_second) and the top axis: how much further one axis beats the reference than any
    other does. 0 when no axis beats it."""
    w = [float(x) for x in axis_win_rate]
    top = max(range(len(w)), key=lambda i: w[i])
    second = max([x for i, x in enumerate(w) if i != top], default=0.5)
    return max(0.0, w[top] - max(0.5, second)), top


class DriftMonitor:
    def __init__(self, spec: DriftSpec, axes: int, kl_coef: float, eps_low: float, eps_high: float):
        self.spec = spec
        self.axes = axes
        self.base = Control([1.0] * axes, kl_coef, eps_low, eps_high)
        self.state = DriftState(control=self._baseline_control())

    def _baseline_control(self) -> Control:
        weights = [1.0] * self.axes
        if self.spec.pinned_weights is not None:
            weights = renormalise(self.spec.pinned_weights, 0.0, math.inf)
        return Control(weights, self.base.kl_coef, self.base.eps_low, self.base.eps_high)

    @property
    def control(self) -> Control:
        return self.state.control

    def update(self, axis_variance: Sequence[float], axis_win_rate: Sequence[float] | None = None) -> Control:
        """Feed one step's E_batch[var_i ŝ_l(i)] (k values), and the per-axis win rates against the reference on
        the steps that probed them; returns the control for the next step."""
        if len(axis_variance) != self.axes:
            raise ValueError(f"expected {self.axes} per-axis variances, got {len(axis_variance)}")
        if axis_win_rate is not None and len(axis_win_rate) != self.axes:
            raise ValueError(f"expected {self.axes} per-axis win rates, got {len(axis_win_rate)}")
        s, spec = self.state, self.spec
        s.events = []
        raw = spectrum_of(axis_variance)
        s.spectrum = raw if s.spectrum is None else [spec.ema * r + (1 - spec.ema) * p for r, p in zip(raw, s.spectrum)]
        s.step += 1
        if axis_win_rate is not None:  # a probe is a slow signal: it holds until the next one
            s.win_rate = [float(w) for w in axis_win_rate]
            s.lead, s.lead_axis = win_rate_lead(s.win_rate)

        if s.baseline is None:
            s.baseline_sum = raw if s.baseline_sum is None else [a + r for a, r in zip(s.baseline_sum, raw)]
            s.baseline_count += 1
            if s.baseline_count >= spec.warmup_steps:
                s.baseline = [a / s.baseline_count for a in s.baseline_sum]
                s.spectrum = list(s.baseline)
            return s.control

        s.divergence = kl_divergence(s.spectrum, s.baseline)
        leading = spec.lead_tau > 0 and s.lead > spec.lead_tau
        if not s.triggered and (s.divergence > spec.tau or leading):
            s.triggered, s.interventions = True, s.interventions + 1
            s.events.append({"type": "trigger", "step": s.step, "divergence": s.divergence, "lead": s.lead,
                             "signal": "spectrum" if s.divergence > spec.tau else "win_rate"})
        elif s.triggered and s.divergence < spec.release_ratio * spec.tau and \
                (spec.lead_tau <= 0 or s.lead < spec.release_ratio * spec.lead_tau):
            s.triggered = False
            s.events.append({"type": "release", "step": s.step, "divergence": s.divergence, "lead": s.lead})

        s.control = self._tighten(s.control) if s.triggered else self._relax(s.control)
        return s.control

    def overused_axis(self) -> int:
        """The axis the monitor holds back most: the leader when the win-rate signal is over its threshold, else
        the axis that gained the most spectrum share."""
        s, spec = self.state, self.spec
        if spec.lead_tau > 0 and s.lead > spec.lead_tau and s.lead_axis is not None:
            return s.lead_axis
        return max(range(self.axes), key=lambda l: (s.spectrum[l] - s.baseline[l]) / max(s.baseline[l], _TINY))

    def _tighten(self, c: Control) -> Control:
        spec, alpha, alpha0 = self.spec, self.state.spectrum, self.state.baseline
        if spec.pinned_weights is not None:
            weights = self._baseline_control().weights
        else:
            # pressure on axis l from each signal only while that signal is high: the relative gain of spectrum
            # share while D(t) is above its release level, and, on the leading axis, L / τ_L while L > τ_L.
            # (Spectrum pressure while only the lead is high would random-walk the weights of near-empty axes,
            # whose relative share is mostly noise.)
            s = self.state
            pressure = [0.0] * self.axes
            if s.divergence > spec.release_ratio * spec.tau:
                pressure = [(a - a0) / max(a0, _TINY) for a, a0 in zip(alpha, alpha0)]
            if spec.lead_tau > 0 and s.lead > spec.lead_tau and s.lead_axis is not None:
                pressure[s.lead_axis] += s.lead / spec.lead_tau
            weights = [m * math.exp(-spec.eta * p) for m, p in zip(c.weights, pressure)]
            weights = renormalise(weights, spec.weight_min, spec.weight_max)
        kl_coef = min(spec.kl_coef_max, max(c.kl_coef, 1e-3) * spec.kappa)
        eps_low, eps_high = c.eps_low, c.eps_high
        if spec.tighten_eps:
            eps_low = max(min(spec.eps_min, self.base.eps_low), eps_low / spec.kappa)
            eps_high = max(min(spec.eps_min, self.base.eps_high), eps_high / spec.kappa)
        return Control(weights, kl_coef, eps_low, eps_high)

    def _relax(self, c: Control) -> Control:
        decay = math.exp(-1.0 / self.spec.relax_time)
        target = self._baseline_control()

        def toward(x: float, x0: float) -> float:
            return x0 + (x - x0) * decay

        return Control(
            [toward(m, m0) for m, m0 in zip(c.weights, target.weights)],
            toward(c.kl_coef, target.kl_coef),
            toward(c.eps_low, target.eps_low),
            toward(c.eps_high, target.eps_high),
        )

    # -- persistence: the trainer checkpoints it, the operator keeps it in the GPRLRun status

    def state_dict(self) -> dict:
        d = asdict(self.state)
        d.pop("events")
        return d

    def load_state_dict(self, d: dict) -> None:
        d = dict(d)
        control = d.pop("control", None)
        known = {k: v for k, v in d.items() if k in DriftState.__dataclass_fields__}
        self.state = DriftState(**known, control=Control(**control) if control else self._baseline_control())
        if len(self.state.control.weights) != self.axes:
            raise ValueError(f"drift state has {len(self.state.control.weights)} axes, monitor has {self.axes}")
