"""Closed-loop drift monitor (method.md §3), judged against a moving reference.

Two signals, each measured against where the run was N steps ago (`reference_lag`), not against step 0, so that
ordinary progress (which moves everything a little) does not accumulate into a trigger and a monitor whose
evidence is gone lets go:

- the variance spectrum α(t) — how the per-axis spread of raw group scores is shared among the k axes — and its
  divergence D(t) = KL(α(t) ‖ α(t − N)) from the spectrum N steps ago. A uniform rise of every axis's spread
  leaves α where it was; one axis surging moves it. While triggered, D is held against the spectrum from before
  the surge, the anchor; it releases when α is back near the anchor, or has stopped moving for N steps (the surge
  is over), and then measures afresh from there with the anchor as a second reference: a spectrum between the two
  is not drifting, so the surged axis falling back is not read as the others surging.
- the relative win-rate lead L(t) = w_top − max(½, w_second) of the per-axis win rates w_l of current samples
  against samples of the policy N steps ago (the probe, `gprl/algo/probe.py`). Every axis improving together
  gives w_l ≈ w_l' and no lead; one axis running ahead of all others is single-axis exploitation. With k = 1
  there is no other axis to compare with, so the lead is 0 (a one-axis model cannot tell hacking from progress).

Above τ (or L above τ_L) it down-weights the axes that gained share and the leading axis, raises β_KL and
tightens ε; when both fall below release_ratio times their thresholds (hysteresis) it relaxes back to baseline.
Non-finite statistics are counted and skipped, never folded into the state. It takes plain per-axis statistics
(lists, no torch), so the trainer and the Kubernetes operator (an image without torch) run the very same object.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Sequence

from gprl.config import DriftSpec

_TINY = 1e-12
_PUSHED = 1.05  # a control weight above this: the monitor is pushing that axis


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
    step: int = 0  # steps fed (rejected ones not counted)
    spectrum: list[float] | None = None  # α(t), EMA-smoothed
    history: list[list[float]] = field(default_factory=list)  # α of the last N steps, oldest first
    baseline: list[float] | None = None  # the reference D(t) is measured against; None while warming up
    anchor: list[float] | None = None  # the reference from before the last surge
    divergence: float = 0.0  # D(t) = KL(α(t) ‖ baseline)
    movement: float = 0.0  # KL(α(t) ‖ α(t − N)): how far the spectrum moved in the last N steps
    win_rate: list[float] | None = None  # last probed per-axis win rates against the moving reference
    lead: float = 0.0  # L(t)
    lead_axis: int | None = None
    triggered: bool = False
    interventions: int = 0  # number of trigger events
    rejected: int = 0  # non-finite inputs skipped (variances or win rates)
    control: Control | None = None
    events: list[dict] = field(default_factory=list)  # trigger/release/reject events of the last update


def finite(values: Sequence[float]) -> bool:
    """Every value a finite number. values: (k,)."""
    try:
        return all(math.isfinite(float(v)) for v in values)
    except (TypeError, ValueError):
        return False


def spectrum_of(axis_variance: Sequence[float]) -> list[float]:
    """α_l = var_l / Σ var. axis_variance: (k,) → (k,); uniform when every axis is flat."""
    total = sum(max(float(v), 0.0) for v in axis_variance)
    k = len(axis_variance)
    if total <= _TINY:
        return [1.0 / k] * k
    return [max(float(v), 0.0) / total for v in axis_variance]


def ema(new: Sequence[float], old: Sequence[float] | None, factor: float) -> list[float]:
    """factor · new + (1 − factor) · old; new when there is no old. (k,) → (k,)."""
    if old is None:
        return [float(x) for x in new]
    return [factor * n + (1 - factor) * o for n, o in zip(new, old)]


def kl_divergence(p: Sequence[float], q: Sequence[float]) -> float:
    """KL(p ‖ q) of two distributions over axes, (k,) each (floored to avoid log 0)."""
    return sum(pi * math.log(max(pi, _TINY) / max(qi, _TINY)) for pi, qi in zip(p, q) if pi > 0)


def renormalise(weights: Sequence[float], lo: float, hi: float) -> list[float]:
    """Scale to mean 1 and clamp to [lo, hi]; repeated because a clamp moves the mean. (k,) → (k,)."""
    weights = list(weights)
    for _ in range(8):
        mean = sum(weights) / len(weights)
        weights = [min(hi, max(lo, w / mean)) for w in weights]
    return weights


def nearest_reference(spectrum: Sequence[float], references: Sequence[Sequence[float]]) -> list[float]:
    """The point nearest to α(t) between several reference spectra: each axis's share clipped to the range its
    references span, renormalised. spectrum: (k,); references: (n, k) → (k,). With one reference it is that
    reference; a spectrum lying between the references (a surged axis falling back toward where it was before the
    surge) is its own nearest reference, so D = 0."""
    lo = [min(column) for column in zip(*references)]
    hi = [max(column) for column in zip(*references)]
    near = [min(h, max(l, a)) for a, l, h in zip(spectrum, lo, hi)]
    total = sum(near)
    return [x / total for x in near]


def win_rate_lead(axis_win_rate: Sequence[float], weights: Sequence[float] | None = None) -> tuple[float, int]:
    """L = w_top − max(½, w_second) and the top axis. axis_win_rate: (k,); weights: (k,) control weights m.

    How much further one axis beats the reference than any other does: 0 when no axis beats it, when two axes
    move together, and with k = 1 (no other axis to compare with). An axis the monitor itself pushes (m_l more than
    5 % above 1) cannot be the top: its running ahead is the control at work, not hacking (it still counts as a
    second)."""
    w = [float(x) for x in axis_win_rate]
    eligible = [i for i in range(len(w)) if weights is None or weights[i] <= _PUSHED]
    if len(w) < 2 or not eligible:
        return 0.0, max(range(len(w)), key=lambda i: w[i])
    top = max(eligible, key=lambda i: w[i])
    second = max(x for i, x in enumerate(w) if i != top)
    return max(0.0, w[top] - max(0.5, second)), top


def hysteresis(triggered: bool, high: bool, low: bool) -> bool:
    """Next trigger state: on when a signal is over its threshold, off only once every signal is under its
    release level (release_ratio × threshold); in between it keeps its state, so noise near a threshold does not
    make it chatter."""
    if not triggered:
        return high
    return not low


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
        """Feed one step's E_batch[var_i ŝ_l(i)] (k values), and the per-axis win rates against the moving
        reference on the steps that probed them; returns the control for the next step. A non-finite variance
        skips the step (the control holds); a non-finite or out-of-range win rate skips the probe."""
        if len(axis_variance) != self.axes:
            raise ValueError(f"expected {self.axes} per-axis variances, got {len(axis_variance)}")
        if axis_win_rate is not None and len(axis_win_rate) != self.axes:
            raise ValueError(f"expected {self.axes} per-axis win rates, got {len(axis_win_rate)}")
        s, spec = self.state, self.spec
        s.events = []
        if not finite(axis_variance):
            s.rejected += 1
            s.events.append({"type": "reject", "step": s.step + 1, "input": "axis_variance"})
            return s.control
        if axis_win_rate is not None and not (finite(axis_win_rate) and all(0 <= float(w) <= 1 for w in axis_win_rate)):
            s.rejected += 1
            s.events.append({"type": "reject", "step": s.step + 1, "input": "axis_win_rate"})
            axis_win_rate = None
        s.step += 1
        # a running mean over the warm-up (bias-corrected start), an EMA after it
        s.spectrum = ema(spectrum_of(axis_variance), s.spectrum, max(spec.ema, 1.0 / s.step))
        if axis_win_rate is not None:  # a probe is a slow signal: it holds until the next one
            s.win_rate = [float(w) for w in axis_win_rate]
            s.lead, s.lead_axis = win_rate_lead(s.win_rate, s.control.weights)
        if s.step < spec.warmup_steps:
            return s.control

        # the moving reference: the smoothed spectrum reference_lag steps ago (the warm-up mean, or the spectrum at
        # the last release, until then). The spectrum from before the last surge (the anchor) stays a reference
        # too, alone while triggered: the surged axis falling back toward it is not read as the others surging.
        s.history = (s.history + [list(s.spectrum)])[-(spec.reference_lag + 1):]
        s.movement = kl_divergence(s.spectrum, s.history[0])
        refs = [s.history[0]] + ([s.anchor] if s.anchor is not None else [])
        s.baseline = list(s.anchor) if s.triggered else nearest_reference(s.spectrum, refs)
        s.divergence = kl_divergence(s.spectrum, s.baseline)

        lead_on = spec.lead_tau > 0
        release = spec.release_ratio
        high = s.divergence > spec.tau or (lead_on and s.lead > spec.lead_tau)
        # the spectrum's evidence is gone when it is back near the anchor, or has stopped moving for N steps
        low = min(s.divergence, s.movement) < release * spec.tau and (not lead_on or s.lead < release * spec.lead_tau)
        was = s.triggered
        s.triggered = hysteresis(was, high, low)
        if s.triggered and not was:
            s.interventions += 1
            s.anchor = list(s.baseline)
            s.events.append({"type": "trigger", "step": s.step, "divergence": s.divergence, "lead": s.lead,
                             "signal": "spectrum" if s.divergence > spec.tau else "win_rate"})
        elif was and not s.triggered:
            s.history = [list(s.spectrum)]
            s.events.append({"type": "release", "step": s.step, "divergence": s.divergence, "lead": s.lead})

        s.control = self._tighten(s.control) if s.triggered else self._relax(s.control)
        return s.control

    def overused_axis(self) -> int:
        """The axis the monitor holds back most: the leader when the win-rate signal is over its threshold, else
        the axis that gained the most spectrum share over the reference."""
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
