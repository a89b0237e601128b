"""The operator's drift loop as a pure function (`gprl_operator.drift_loop.decide`) and the shared control
validation; the same loop against the real API server is in tests/cluster/test_drift_loop_e2e.py."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "operator"))

from gprl.algo.drift import DriftMonitor  # noqa: E402
from gprl.config import parse_config  # noqa: E402
from gprl.control import InvalidControl, validate_control  # noqa: E402

NOW = "2026-11-27T08:00:00.000000Z"


def run_of(status=None, drift=None):
    spec = {"gpm": {"axes": 3}, "drift": {"mode": "operator", "warmupSteps": 2, "tau": 0.02, **(drift or {})}}
    return {"metadata": {"name": "r", "namespace": "ns", "uid": "u", "generation": 1}, "spec": spec,
            "status": status or {}}


def hist(steps, exploit=1.0):
    return [{"step": s, "axisVariance": [1.0, 1.0, 1.0 + exploit * max(0, s - 2)]} for s in steps]


def test_decide_feeds_reported_win_rates_and_names_the_leading_axis():
    """A flat spectrum (one axis dominant from the start) with axis 1 running ahead of the reference: only the
    win-rate signal sees it, in the operator exactly as in the trainer."""
    from gprl_operator.drift_loop import decide

    run = run_of(drift={"leadTau": 0.06})
    flat = [4.0, 1.0, 1.0]
    history = [{"step": s, "axisVariance": flat,
                **({"axisWinRate": [0.5, 0.5 + 0.01 * s, 0.5]} if s % 2 == 0 else {})} for s in range(1, 13)]
    history += [{"step": 13, "axisVariance": flat, "axisWinRate": [0.5, 7.0]},  # malformed: ignored
                {"step": 14, "axisVariance": flat, "axisWinRate": [0.5, 2.0, 0.5]}]
    ref = DriftMonitor(parse_config(run["spec"]).drift, 3, 0.04, 0.2, 0.2)
    for h in history:
        win = h.get("axisWinRate")
        ref.update(h["axisVariance"], win if win and len(win) == 3 and max(win) <= 1 else None)
    state = decide(run, NOW).state
    d = decide(run_of({"training": {"step": 14, "history": history, "reportedAt": NOW}},
                      drift={"leadTau": 0.06}), NOW, state)
    mon = d.state["monitor"]
    assert mon["lead"] == pytest.approx(ref.state.lead) and mon["lead_axis"] == 1 and mon["divergence"] < 0.02
    assert mon["win_rate"] == pytest.approx([0.5, 0.62, 0.5])
    assert d.state["control"]["weights"] == pytest.approx(ref.control.weights)
    assert d.state["control"]["weights"][1] < 1.0
    (ev,) = [e for e in d.events if e["reason"] == "DriftDetected"]
    assert "win-rate lead" in ev["message"] and "axis 1 " in ev["message"]


def test_validate_control_refuses_malformed_blocks():
    good = {"weights": [1, 1, 1], "klCoef": 0.04, "epsLow": 0.2, "epsHigh": 0.2}
    assert validate_control(good, 3).weights == [1.0, 1.0, 1.0]
    for bad, what in [
        ({**good, "weights": [1, 1]}, "2 entries"),
        ({**good, "weights": [1, -1, 1]}, r"weights\[1\]"),
        ({**good, "weights": [1, "x", 1]}, r"weights\[1\]"),
        ({**good, "klCoef": -1}, "klCoef"),
        ({**good, "epsLow": 1.5}, "epsLow"),
        ({**good, "epsHigh": 0.1}, "epsHigh"),
        ({k: v for k, v in good.items() if k != "klCoef"}, "klCoef"),
    ]:
        with pytest.raises(InvalidControl, match=what):
            validate_control(bad, 3)
    drift = parse_config({"gpm": {"axes": 3}}).drift
    with pytest.raises(InvalidControl, match="klCoefMax"):
        validate_control({**good, "klCoef": drift.kl_coef_max * 2}, 3, drift)


def test_decide_matches_the_in_process_monitor_and_triggers():
    from gprl_operator.drift_loop import decide

    run = run_of()
    d0 = decide(run, NOW)  # first sight: state written, nothing fed
    assert d0.fed == 0 and d0.status is not None and "control" not in d0.status
    status, state, events, gens = {}, None, [], []
    ref = DriftMonitor(parse_config(run["spec"]).drift, 3, 0.04, 0.2, 0.2)
    for s in range(1, 21):
        for h in hist([s]):
            ref.update(h["axisVariance"])
        # reports come every 2 steps, with the history since the previous report
        if s % 2:
            continue
        status = {**status, "training": {"step": s, "history": hist([s - 1, s]), "reportedAt": NOW}}
        d = decide(run_of(status), NOW, state)
        state = d.state
        status = {**status, **d.status}
        events += d.events
        gens.append(state["generation"])
    assert state["lastStep"] == 20
    assert state["monitor"]["divergence"] == pytest.approx(ref.state.divergence)
    assert status["control"]["weights"] == pytest.approx(ref.control.weights)
    assert status["control"]["klCoef"] == pytest.approx(ref.control.kl_coef)
    assert status["control"]["weights"][2] < 1 < status["control"]["weights"][0]
    assert [e["reason"] for e in events].count("DriftDetected") == 1
    cond = status["conditions"][0]
    assert cond["type"] == "DriftDetected" and cond["status"] == "True"
    assert gens == sorted(gens) and gens[-1] > 1
    # the same history again (a stale watch event): nothing fed, nothing written
    again = decide(run_of(status), NOW, state)
    assert again.fed == 0 and again.status is None


def test_state_survives_restart_and_pins_are_respected():
    from gprl_operator.drift_loop import decide

    pins = [2.0, 1.0, 1.0]
    status, state = {}, None
    for s in range(2, 21, 2):
        status = {**status, "training": {"step": s, "history": hist([s - 1, s]), "reportedAt": NOW}}
        d = decide(run_of(status, {"pinnedWeights": pins}), NOW, state)
        status, state = {**status, **d.status}, d.state
        if s == 10:
            state = None  # operator restart: only the resource remains
    assert status["driftMonitor"]["lastStep"] == 20
    assert status["control"]["triggered"] is True
    assert status["control"]["weights"] == pytest.approx([1.5, 0.75, 0.75])  # pins, renormalised, untouched
    assert status["control"]["klCoef"] > 0.04


def test_malformed_hand_written_control_is_refused_and_restored():
    from gprl_operator.drift_loop import decide

    status = {"training": {"step": 2, "history": hist([1, 2]), "reportedAt": NOW}}
    d = decide(run_of(status), NOW)
    status = {**status, **d.status}
    gen = status["control"]["generation"]
    status["control"] = {**status["control"], "generation": gen + 5, "weights": [1, 1]}
    d2 = decide(run_of(status), NOW, d.state)
    assert [e["reason"] for e in d2.events] == ["ControlRefused"] and d2.refused == 1
    assert d2.status["control"]["generation"] == gen + 6
    assert d2.status["control"]["weights"] == d.status["control"]["weights"]
    assert d2.status["control"]["reason"] == "Restore"
    # seen once, refused once
    d3 = decide(run_of({**status, **d2.status}), NOW, d2.state)
    assert d3.events == []


def test_status_patch_has_no_empty_mappings():
    """Server-side apply turns `{}` into null, which the typed status schema refuses (gprl.api.status)."""
    from gprl_operator.drift_loop import decide

    status = {"training": {"step": 2, "history": hist([1, 2], exploit=0), "reportedAt": NOW}}
    d = decide(run_of(status), NOW)
    assert d.status["driftMonitor"]["decidedAt"]  # generation 1 decided, not yet acknowledged
    gen = d.status["control"]["generation"]
    status = {**status, **d.status, "training": {"step": 4, "history": hist([3, 4], exploit=0), "reportedAt": NOW,
                                                  "appliedControlGeneration": gen}}
    d2 = decide(run_of(status), NOW, d.state)
    assert d2.fed == 2 and d2.status["control"]["generation"] == gen  # fed, no new decision, all acknowledged
    assert "decidedAt" not in d2.status["driftMonitor"]

    def empty_maps(node, path=""):
        if isinstance(node, dict):
            return ([path] if not node else []) + [p for k, v in node.items() for p in empty_maps(v, f"{path}.{k}")]
        return [p for i, v in enumerate(node) for p in empty_maps(v, f"{path}[{i}]")] if isinstance(node, list) else []

    assert d2.status is not None and empty_maps(d2.status) == []


def test_hand_written_block_under_an_old_generation_is_still_seen():
    """The loop may have decided past the generation a user writes; server-side apply's managedFields still say
    the block is not the loop's: refused (or adopted) all the same, once."""
    from gprl_operator.drift_loop import DRIFT_MANAGER, decide

    status = {"training": {"step": 2, "history": hist([1, 2]), "reportedAt": NOW}}
    d = decide(run_of(status), NOW)
    status = {**status, **d.status}
    state = {**d.state, "generation": 50}  # the loop is far ahead (it decides every tick while triggered)
    status["control"] = {**status["control"], "generation": 20, "klCoef": 7.5}
    run = run_of(status)
    owner = lambda m: [{"manager": m, "operation": "Update", "subresource": "status",  # noqa: E731
                        "fieldsV1": {"f:status": {"f:control": {"f:generation": {}, "f:klCoef": {}}}}}]
    run["metadata"]["managedFields"] = owner(DRIFT_MANAGER)
    assert decide(run, NOW, state).refused == 0  # the loop's own older write: nothing to do
    run["metadata"]["managedFields"] = owner("kubectl-patch")
    d2 = decide(run, NOW, state)
    assert d2.refused == 1 and d2.status["control"]["generation"] == 51 and d2.status["control"]["reason"] == "Restore"
    assert decide(run, NOW, d2.state).refused == 0  # seen once (a lagging watch shows it again)
    # a valid one is adopted and rewritten as the loop's own block
    status["control"] = {**status["control"], "generation": 21, "klCoef": 0.1}
    d3 = decide(run_of(status) | {"metadata": run["metadata"]}, NOW, d2.state)
    assert [e["reason"] for e in d3.events] == ["ControlOverridden"]
    assert d3.status["control"]["klCoef"] == 0.1 and d3.status["control"]["generation"] == 52
