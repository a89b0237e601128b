import math
import random

import pytest

from gprl.algo import DriftMonitor, win_rate_lead
from gprl.config import DriftSpec


def make_monitor(**kw):
    spec = DriftSpec(**{"warmup_steps": 5, "tau": 0.05, "ema": 0.5, "relax_time": 3.0, **kw})
    return DriftMonitor(spec, axes=3, kl_coef=0.04, eps_low=0.2, eps_high=0.28)


def noisy(rng, base):
    return [b * (1 + 0.05 * rng.uniform(-1, 1)) for b in base]


def test_growing_axis_triggers_downweights_it_and_tightens():
    rng = random.Random(0)
    mon = make_monitor()
    for _ in range(10):
        mon.update(noisy(rng, [1.0, 1.0, 1.0]))
    assert not mon.state.triggered
    for t in range(30):
        mon.update(noisy(rng, [1.0 + 0.5 * t, 1.0, 1.0]))  # axis 0's spread grows
        if mon.state.triggered:
            break
    assert mon.state.triggered and mon.state.interventions == 1
    for _ in range(3):
        c = mon.update(noisy(rng, [20.0, 1.0, 1.0]))
    assert c.weights[0] < 1.0 < min(c.weights[1:])
    assert sum(c.weights) / 3 == pytest.approx(1.0, abs=0.05)
    assert c.kl_coef > 0.04
    assert c.eps_low < 0.2 and c.eps_high < 0.28


def test_stationary_run_never_triggers():
    rng = random.Random(1)
    mon = make_monitor()
    for _ in range(300):
        c = mon.update(noisy(rng, [2.0, 1.0, 0.5]))
        assert not mon.state.triggered
    assert mon.state.interventions == 0
    assert c.weights == [1.0, 1.0, 1.0] and c.kl_coef == 0.04


def test_release_has_hysteresis_and_relaxes_to_baseline():
    mon = make_monitor(ema=1.0)
    for _ in range(5):
        mon.update([1.0, 1.0, 1.0])
    mon.update([10.0, 1.0, 1.0])
    assert mon.state.triggered
    # D between τ/2 and τ keeps it triggered: hysteresis.
    mid = [1.7, 1.0, 1.0]
    from gprl.algo.drift import kl_divergence, spectrum_of

    d_mid = kl_divergence(spectrum_of(mid), [1 / 3] * 3)
    assert 0.025 < d_mid < 0.05
    mon.update(mid)
    assert mon.state.triggered
    mon.update([1.0, 1.0, 1.0])
    assert not mon.state.triggered
    assert [e["type"] for e in mon.state.events] == ["release"]
    for _ in range(40):
        c = mon.update([1.0, 1.0, 1.0])
    assert c.weights == pytest.approx([1.0] * 3, abs=1e-3)
    assert c.kl_coef == pytest.approx(0.04, abs=1e-4) and c.eps_low == pytest.approx(0.2, abs=1e-4)


def test_state_round_trip_continues_identically():
    rng = random.Random(2)
    a = make_monitor()
    series = [noisy(rng, [1.0 + 0.3 * t, 1.0, 1.0]) for t in range(25)]
    for x in series[:12]:
        a.update(x)
    b = make_monitor()
    b.load_state_dict(a.state_dict())
    for x in series[12:]:
        ca, cb = a.update(x), b.update(x)
        assert ca == cb
    assert a.state_dict() == b.state_dict()
    with pytest.raises(ValueError, match="axes"):
        DriftMonitor(a.spec, axes=2, kl_coef=0.04, eps_low=0.2, eps_high=0.2).load_state_dict(a.state_dict())


def test_pinned_weights_are_kept():
    mon = DriftMonitor(DriftSpec(warmup_steps=2, pinned_weights=[2.0, 1.0, 1.0]), 3, 0.04, 0.2, 0.2)
    for x in [[1, 1, 1], [1, 1, 1], [50, 1, 1], [80, 1, 1]]:
        c = mon.update(x)
    assert mon.state.triggered
    assert c.weights == pytest.approx([1.5, 0.75, 0.75])
    assert c.kl_coef > 0.04


def test_win_rate_lead():
    assert win_rate_lead([0.62, 0.53, 0.51]) == (pytest.approx(0.09), 0)
    assert win_rate_lead([0.55, 0.40, 0.45]) == (pytest.approx(0.05), 0)  # others losing: measured from ½
    assert win_rate_lead([0.48, 0.49, 0.47])[0] == 0.0  # nothing beats the reference
    assert win_rate_lead([0.5, 0.7, 0.69]) == (pytest.approx(0.01), 1)  # two axes rising together: no lead


def test_dominant_axis_exploitation_is_caught_by_the_win_rate_lead_not_the_spectrum():
    """The synthetic world's failure mode: one axis carries most of the spread from the start and the policy
    exploits it, so the spectrum never moves; only its win rate against the reference runs ahead."""
    rng = random.Random(1)
    off, on = make_monitor(lead_tau=0.0), make_monitor(lead_tau=0.06)
    leader = None
    for t in range(60):
        var = noisy(rng, [8.0, 1.0, 0.2])  # a fixed spectrum
        probe = [0.5 + 0.002 * t, 0.5 + 0.0004 * t, 0.5] if t % 5 == 4 else None
        c_off, c_on = off.update(var, probe), on.update(var, probe)
        if on.state.triggered and leader is None:
            leader = t
            assert on.state.events[0]["signal"] == "win_rate" and on.overused_axis() == 0
    assert not off.state.triggered and off.state.divergence < 0.05 and c_off.weights == [1.0, 1.0, 1.0]
    assert leader is not None and on.state.lead > 0.06
    assert c_on.weights[0] < 1.0 < min(c_on.weights[1:]) and c_on.kl_coef > 0.04 and c_on.eps_low < 0.2
    # with D(t) under τ the spectrum adds no pressure: the near-empty axis 2 (whose relative share is noise) is
    # treated as axis 1, not random-walked to a clamp
    assert c_on.weights[1] == pytest.approx(c_on.weights[2])
    # the probe is a slow signal: it holds between probes, and a falling lead releases
    on.update(noisy(rng, [8.0, 1.0, 0.2]))
    assert on.state.triggered and on.state.lead > 0.06
    released = []
    for t in range(40):
        on.update(noisy(rng, [8.0, 1.0, 0.2]), [0.52, 0.51, 0.5] if t % 5 == 0 else None)
        released += [e for e in on.state.events if e["type"] == "release"]
    assert not on.state.triggered and len(released) == 1
    assert on.control.weights == pytest.approx([1.0, 1.0, 1.0], abs=0.05) and on.control.kl_coef < 0.05


def test_win_rates_of_the_wrong_length_are_refused():
    with pytest.raises(ValueError, match="win rates"):
        make_monitor().update([1.0, 1.0, 1.0], [0.5, 0.5])


def test_win_rate_state_round_trips():
    a = make_monitor()
    for t in range(8):
        a.update([1.0, 1.0, 1.0], [0.6, 0.5, 0.5] if t == 6 else None)
    b = make_monitor()
    b.load_state_dict(a.state_dict())
    assert b.state.win_rate == [0.6, 0.5, 0.5] and b.state.lead == pytest.approx(0.1) and b.state.lead_axis == 0
