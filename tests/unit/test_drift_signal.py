"""The drift monitor's signals on synthetic streams: progress on every axis does not trigger it, one axis surging
does, it lets go once the surge has stopped, it does not chatter near a threshold, and non-finite statistics never
enter its state."""

import math
import random

import pytest

from gprl.algo.drift import DriftMonitor, hysteresis, win_rate_lead
from gprl.config import DriftSpec


def monitor(axes=3, **kw):
    spec = DriftSpec(**{"warmup_steps": 5, "reference_lag": 10, "tau": 0.05, "lead_tau": 0.06, "ema": 0.3,
                        "relax_time": 3.0, **kw})
    return DriftMonitor(spec, axes=axes, kl_coef=0.04, eps_low=0.2, eps_high=0.28)


def jitter(rng, xs, rel=0.05):
    return [x * (1 + rel * rng.uniform(-1, 1)) for x in xs]


def run(mon, variances, win_rates=None):
    """Feed a stream; returns the trigger state after every step and the transitions."""
    states, events = [], []
    for t, var in enumerate(variances):
        mon.update(var, None if win_rates is None else win_rates[t])
        states.append(mon.state.triggered)
        events += [e["type"] for e in mon.state.events]
    return states, events


def test_uniform_improvement_on_every_axis_does_not_trigger():
    """Every axis's spread grows tenfold and every axis beats the policy of N steps ago equally often: progress,
    not hacking. (The old rule, against step 0 with the lead measured from ½, fired here and never released.)"""
    rng = random.Random(0)
    mon = monitor()
    variances = [jitter(rng, [2.0 * g, 1.0 * g, 0.5 * g]) for g in (1 + 0.1 * t for t in range(100))]
    wins = [jitter(rng, [0.65, 0.65, 0.65], 0.02) if t % 5 == 4 else None for t in range(100)]
    states, events = run(mon, variances, wins)
    assert not any(states) and mon.state.interventions == 0
    assert mon.state.divergence < 0.01 and mon.state.lead < 0.03
    assert mon.control.weights == [1.0, 1.0, 1.0] and mon.control.kl_coef == 0.04


def test_a_one_axis_surge_in_the_spectrum_triggers_and_releases_once_it_stops():
    rng = random.Random(1)
    mon = monitor(lead_tau=0.0)
    calm = [jitter(rng, [1.0, 1.0, 1.0]) for _ in range(20)]
    surge = [jitter(rng, [1.0 + 0.6 * t, 1.0, 1.0]) for t in range(15)]  # axis 0's spread climbs to ~9.4x
    plateau = [jitter(rng, [9.4, 1.0, 1.0]) for _ in range(40)]  # the surge has stopped (at its new level)
    states, events = run(mon, calm + surge + plateau)
    onset = states.index(True)
    assert 20 < onset < 35, onset
    assert events.count("trigger") == 1 and events.count("release") == 1
    assert not states[-1] and mon.state.divergence < 0.025
    # while triggered the surging axis was held back; after release everything relaxes to baseline
    assert mon.control.weights == pytest.approx([1.0, 1.0, 1.0], abs=0.05)
    assert mon.control.kl_coef == pytest.approx(0.04, abs=0.005)


def test_a_one_axis_win_rate_surge_triggers_holds_that_axis_back_and_releases():
    """The world's failure mode: the spectrum never moves (one axis dominates from the start), but against the
    policy of N steps ago one axis keeps winning while the others do not."""
    rng = random.Random(2)
    mon = monitor()
    n = 90
    variances = [jitter(rng, [8.0, 1.0, 0.2]) for _ in range(n)]

    def probe(t):
        if t % 5 != 4:
            return None
        if t < 30:
            return jitter(rng, [0.58, 0.57, 0.57], 0.01)  # ordinary progress on every axis
        if t < 55:
            return jitter(rng, [0.75, 0.48, 0.50], 0.01)  # axis 0 runs ahead, the others stall
        return jitter(rng, [0.51, 0.50, 0.49], 0.01)  # the surge has stopped

    weights_when_triggered = None
    states, events = [], []
    for t in range(n):
        c = mon.update(variances[t], probe(t))
        states.append(mon.state.triggered)
        events += [e for e in mon.state.events]
        if t == 50:
            weights_when_triggered, kl = list(c.weights), c.kl_coef
    trig = [e for e in events if e["type"] == "trigger"]
    assert len(trig) == 1 and trig[0]["signal"] == "win_rate" and trig[0]["step"] == 35
    assert weights_when_triggered[0] < 1.0 < min(weights_when_triggered[1:]) and kl > 0.04
    assert [e["type"] for e in events] == ["trigger", "release"] and not states[-1]
    assert mon.control.weights == pytest.approx([1.0, 1.0, 1.0], abs=0.05)


def test_no_chatter_near_the_threshold():
    """A lead that wanders around τ_L (and never below τ_L/2) triggers once and stays; a spectrum whose D(t)
    crosses τ back and forth within the hysteresis band does the same."""
    rng = random.Random(3)
    mon = monitor()
    var = [[1.0, 1.0, 1.0]] * 200
    wins = [[0.5 + 0.06 + rng.uniform(-0.025, 0.025), 0.5, 0.5] for _ in range(200)]
    states, events = run(mon, var, wins)
    assert events.count("trigger") == 1 and events.count("release") == 0

    assert hysteresis(False, high=False, low=False) is False  # between the levels: keep the state
    assert hysteresis(True, high=False, low=False) is True
    assert hysteresis(False, high=True, low=False) is True
    assert hysteresis(True, high=False, low=True) is False


def test_non_finite_statistics_are_counted_and_skipped():
    rng = random.Random(4)
    clean, dirty = monitor(), monitor()
    bad_var = [[math.nan, 1.0, 1.0], [1.0, math.inf, 1.0], [1.0, 1.0, -math.inf]]
    bad_win = [[math.nan, 0.5, 0.5], [0.5, math.inf, 0.5], [1.5, 0.5, 0.5]]
    stream = [(jitter(rng, [3.0, 1.0, 1.0]), [0.55, 0.52, 0.5] if t % 5 == 4 else None) for t in range(40)]
    for t, (var, win) in enumerate(stream):
        clean.update(var, win)
        if t in (7, 17, 27):
            before = dirty.state_dict()
            c = dirty.update(bad_var[t // 10])
            assert dirty.state_dict() == {**before, "rejected": before["rejected"] + 1}  # nothing else moved
            assert c == dirty.control and dirty.state.events[0]["type"] == "reject"
        if t in (9, 19, 29):
            dirty.update(var, bad_win[t // 10])  # the variances count, the probe does not
            assert dirty.state.events[0] == {"type": "reject", "step": dirty.state.step, "input": "axis_win_rate"}
            dirty.update(var, win)
            continue
        dirty.update(var, win)
    assert dirty.state.rejected == 6
    assert all(math.isfinite(x) for x in dirty.state.spectrum + dirty.state.baseline + dirty.state.win_rate)
    assert math.isfinite(dirty.state.divergence) and math.isfinite(dirty.state.lead)
    assert dirty.state.spectrum == pytest.approx(clean.state.spectrum, rel=0.2)


def test_the_lead_compares_axes_with_each_other():
    assert win_rate_lead([0.62, 0.53, 0.51]) == (pytest.approx(0.09), 0)
    assert win_rate_lead([0.55, 0.40, 0.45]) == (pytest.approx(0.05), 0)  # others losing: measured from ½
    assert win_rate_lead([0.48, 0.49, 0.47])[0] == 0.0  # nothing beats the reference
    assert win_rate_lead([0.5, 0.7, 0.69]) == (pytest.approx(0.01), 1)  # two axes rising together: no lead
    assert win_rate_lead([0.9]) == (0.0, 0)  # k = 1: nothing to compare with, so never a lead


def test_a_one_axis_model_never_triggers():
    """k = 1 (a BT model): the spectrum is always [1] and there is no lead, whatever its win rate does."""
    mon = monitor(axes=1)
    states, _ = run(mon, [[1.0 + t] for t in range(60)], [[min(0.99, 0.5 + 0.01 * t)] for t in range(60)])
    assert not any(states) and mon.state.divergence == 0.0


def test_the_surging_axis_falling_back_releases_and_does_not_retrigger_the_other_way():
    """Held back, the surged axis loses its share again; against the moving reference that looks like the other
    axes gaining. The monitor measures it against the spectrum from before the surge, so it releases, once."""
    rng = random.Random(5)
    mon = monitor(lead_tau=0.0)
    up = [jitter(rng, [1.0 + 0.6 * t, 1.0, 1.0]) for t in range(15)]
    down = [jitter(rng, [9.4 - 0.6 * t, 1.0, 1.0]) for t in range(15)]
    states, events = run(mon, [jitter(rng, [1.0, 1.0, 1.0]) for _ in range(20)] + up + down
                         + [jitter(rng, [1.0, 1.0, 1.0]) for _ in range(40)])
    assert events == ["trigger", "release"] and not states[-1]
    assert mon.control.weights == pytest.approx([1.0, 1.0, 1.0], abs=0.05)


def test_an_axis_the_monitor_pushes_is_not_a_lead():
    """Held back on axis 0, the weights of axes 1 and 2 go above 1; their running ahead then is the control at
    work, so it does not re-trigger the monitor on them (no see-saw between axes)."""
    assert win_rate_lead([0.5, 0.7, 0.5], weights=[0.5, 1.25, 1.25]) == (0.0, 0)
    assert win_rate_lead([0.72, 0.6, 0.5], weights=[0.5, 1.25, 1.25]) == (pytest.approx(0.12), 0)
    assert win_rate_lead([0.5, 0.7, 0.5], weights=[1.0, 1.0, 1.0]) == (pytest.approx(0.2), 1)
