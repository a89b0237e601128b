"""The operator side of the closed drift loop (method.md §3, architecture "Kubernetes contract").

A kopf timer per GPRLRun whose `spec.drift.mode` is `operator`:

1. reads the statistics the job reported in `status.training` (every step since the last report is in
   `training.history`) and feeds the new ones, by step, to the same `gprl.algo.DriftMonitor` the trainer runs
   in-process;
2. writes the new control block `status.control` (weights m, klCoef, epsLow, epsHigh) with an incremented
   `generation` when the control changed; the job applies it at its next step boundary and acknowledges it;
3. on trigger / release: a Kubernetes Event and the `DriftDetected` condition;
4. a control block written by hand is validated like the job does: a malformed one is refused (Warning Event
   `ControlRefused`, and the operator's last good control is written back with a newer generation, so the job
   never applies it); a valid one is adopted as an override;
5. exports its state on /metrics (D(t), spectrum, weights, β_KL, ε, trigger state, interventions, loop latency).

The monitor's state lives in the resource (`status.driftMonitor`), so an operator restart loses nothing. The
status is written by server-side apply under its own field manager (`gprl-drift-loop`), so that it never
removes or fights over the fields the reconcile handlers (manager `gprl-operator`) or the job (merge patches)
own. `decide()` is a pure function of the run and the previous state, in named steps (load the state, consider
a block written by someone else, feed the statistics, choose the control, stamp the generation, build the patch);
the kopf handlers only do I/O, with the operator's one Kubernetes client (`gprl_operator.kube.shared`). Per-run
state of this process lives in kopf's per-object `memo`; the monitored runs are a kopf index. The status shapes
are `gprl.api.status`'s (`TrainingReport` in, `ControlBlock` and `DriftMonitorState` out).
"""

from __future__ import annotations

import copy
import datetime as _dt
import logging
import os
import socket
import time
from dataclasses import dataclass, field
from typing import Any, Optional

import kopf
from prometheus_client import Counter, Gauge, Histogram

from pydantic import ValidationError

from gprl.algo.drift import Control, DriftMonitor
from gprl.api.status import ControlBlock, DriftMonitorState
from gprl.config import RunSpec
from gprl.control import InvalidControl, control_block, validate_control
from gprl.crd import GROUP, KIND, PLURAL, VERSION
from gprl_operator.kube import ApiError, shared

log = logging.getLogger("gprl_operator.drift")

DRIFT_MANAGER = "gprl-drift-loop"
INTERVAL = float(os.environ.get("GPRL_DRIFT_INTERVAL", "5"))
CONDITION = "DriftDetected"
CHANGE_TOLERANCE = 1e-4  # relative change of any control field that makes a new generation
L = ["namespace", "run"]
LA = ["namespace", "run", "axis"]

DIVERGENCE = Gauge("gprl_operator_drift_divergence", "D(t) = KL(alpha(t) || alpha(t - N)) computed by the operator.", L)
THRESHOLD = Gauge("gprl_operator_drift_threshold", "Trigger threshold tau of the run's drift monitor.", L)
LEAD_THRESHOLD = Gauge("gprl_operator_drift_win_rate_lead_threshold", "Trigger threshold tau_L on the win-rate lead.", L)
TRIGGERED = Gauge("gprl_operator_drift_triggered", "1 while the run's drift monitor is triggered.", L)
AXIS_SPECTRUM = Gauge("gprl_operator_drift_axis_spectrum", "alpha_l(t): share of axis l in the variance spectrum.", LA)
AXIS_BASELINE = Gauge("gprl_operator_drift_axis_spectrum_baseline",
                      "Reference spectrum D(t) is measured against (alpha_l(t - N), referenceLag N).", LA)
AXIS_WEIGHT = Gauge("gprl_operator_drift_axis_weight", "Control weight m_l the operator set for axis l.", LA)
AXIS_VARIANCE = Gauge("gprl_operator_drift_axis_variance", "Last reported E_batch[var_i s_l(i)] of axis l.", LA)
AXIS_WIN_RATE = Gauge("gprl_operator_drift_axis_win_rate",
                      "Last probed win rate of policy samples against the policy's N steps earlier on axis l.", LA)
LEAD = Gauge("gprl_operator_drift_win_rate_lead", "Win-rate lead L = w_top - max(0.5, w_second) of the last probe.", L)
KL_COEF = Gauge("gprl_operator_drift_kl_coef", "beta_KL in the operator's control block.", L)
EPS_LOW = Gauge("gprl_operator_drift_clip_eps_low", "epsilon_low in the operator's control block.", L)
EPS_HIGH = Gauge("gprl_operator_drift_clip_eps_high", "epsilon_high in the operator's control block.", L)
GENERATION = Gauge("gprl_operator_drift_control_generation", "Generation of status.control.", L)
ACKED = Gauge("gprl_operator_drift_control_acknowledged_generation", "Last control generation the job applied.", L)
PENDING = Gauge(
    "gprl_operator_drift_control_pending_seconds",
    "Age of the oldest control generation the job has not acknowledged yet (0 when all are).", L,
)
LAST_STEP = Gauge("gprl_operator_drift_last_step", "Last training step fed to the run's monitor.", L)
LAST_REPORT = Gauge("gprl_operator_drift_last_report_timestamp_seconds", "Unix time of the job's last report.", L)
INTERVENTIONS = Counter("gprl_operator_drift_interventions", "Drift-monitor trigger events decided by the operator.", L)
STEPS_FED = Counter("gprl_operator_drift_steps", "Training steps fed to the drift monitor.", L)
DECISIONS = Counter("gprl_operator_drift_control_writes", "Control generations written, by reason.", L + ["reason"])
REFUSED = Counter("gprl_operator_drift_refused_controls", "Hand-written control blocks refused as malformed.", L)
LATENCY = Histogram(
    "gprl_operator_drift_loop_latency_seconds",
    "Closed-loop latency: the oldest step statistics a control decision includes (recorded by the job) -> that "
    "control applied by the job at a step boundary (both ends on the job's clock).",
    buckets=(0.25, 0.5, 1, 2, 3, 5, 7.5, 10, 15, 20, 30, 45, 60, 120, 300, 600),
)
TICK_SECONDS = Histogram(
    "gprl_operator_drift_tick_duration_seconds", "Wall time of one drift-loop tick of one run (incl. API writes).",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10),
)
ERRORS = Counter("gprl_operator_drift_errors", "Drift-loop ticks that failed, by kind.", ["kind"])
MONITORED = Gauge("gprl_operator_drift_monitored_runs", "GPRLRuns whose drift loop runs in this operator.")

def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")


def _ts(text: Any) -> Optional[float]:
    try:
        return _dt.datetime.fromisoformat(str(text).replace("Z", "+00:00")).timestamp()
    except (TypeError, ValueError):
        return None


def _spec(run: dict) -> RunSpec:
    from gprl_operator.children import run_spec

    return run_spec(run)


_CONTROL_KEYS = ("weights", "klCoef", "epsLow", "epsHigh")


def _close(a: dict, b: dict) -> bool:
    """Two control blocks (camelCase) equal up to CHANGE_TOLERANCE (relative)."""

    def near(x: Any, y: Any) -> bool:
        if not isinstance(x, (int, float)) or not isinstance(y, (int, float)):
            return x == y
        return abs(x - y) <= CHANGE_TOLERANCE * max(abs(x), abs(y), 1e-12)

    wa, wb = a.get("weights") or [], b.get("weights") or []
    return (
        len(wa) == len(wb)
        and all(near(x, y) for x, y in zip(wa, wb))
        and all(near(a.get(k), b.get(k)) for k in _CONTROL_KEYS[1:])
    )


def _exact(a: dict, b: dict) -> bool:
    return all(a.get(k) == b.get(k) for k in _CONTROL_KEYS)


def _block(control: Control) -> ControlBlock:
    return ControlBlock.model_validate(control_block(control))


@dataclass
class Decision:
    state: dict  # the new status.driftMonitor (gprl.api.status.DriftMonitorState, camelCase)
    status: Optional[dict] = None  # status fields to apply (manager DRIFT_MANAGER); None: nothing to write
    events: list[dict] = field(default_factory=list)  # {"type", "reason", "message"}
    fed: int = 0
    trigger_events: int = 0
    refused: int = 0
    reason: Optional[str] = None  # reason of a new control generation
    latency: Optional[float] = None  # loop latency of the newest acknowledged generation


@dataclass
class _Tick:
    """What one decision works on: the run's spec and reports, the monitor and its (typed) state."""

    run: dict
    spec: RunSpec
    training: dict
    current: dict  # status.control as found (maybe written by hand)
    state: DriftMonitorState
    monitor: DriftMonitor
    first: bool  # no state in the resource yet
    d: Decision
    write_control: bool = False
    statistics_at: Optional[str] = None  # job-clock time of the oldest statistics fed in this tick

    @property
    def name(self) -> str:
        return self.run["metadata"]["name"]


def decide(run: dict, now: str, cached: Optional[dict] = None) -> Decision:
    """One tick of the drift loop for one run: pure, no I/O. `cached`: the state this process wrote last (the
    watch may not have shown it yet)."""
    t = _load(run, cached)
    _consider_foreign_control(t)
    _feed_statistics(t)
    _choose_control(t)
    _stamp_generation(t, now)
    return _status_patch(t, now)


def _load(run: dict, cached: Optional[dict]) -> _Tick:
    """1. The monitor's state: from the resource, or this process's newer copy."""
    spec = _spec(run)
    k = spec.gpm.axes
    status = run.get("status") or {}
    persisted = status.get("driftMonitor") or {}
    raw = persisted
    if cached is not None and cached.get("lastStep", -1) >= persisted.get("lastStep", -1) and \
            cached.get("generation", 0) >= persisted.get("generation", 0):
        raw = cached
    try:
        state = DriftMonitorState.model_validate(copy.deepcopy(raw))
    except ValidationError as exc:
        log.warning("%s: drift monitor state unreadable (%s); starting afresh", run["metadata"]["name"], exc)
        state = DriftMonitorState()
    if state.axes not in (None, k):
        state = DriftMonitorState()  # gpm.axes is immutable, so only a foreign or damaged state gets here
    state.axes = k
    monitor = DriftMonitor(spec.drift, k, spec.algo.kl_coef, spec.algo.eps_low, spec.algo.eps_high)
    if state.monitor:
        try:
            monitor.load_state_dict(state.monitor)
        except (TypeError, ValueError) as exc:
            log.warning("%s: drift monitor state unusable (%s); starting afresh", run["metadata"]["name"], exc)
            state.monitor = None
    return _Tick(run=run, spec=spec, training=status.get("training") or {}, current=status.get("control") or {},
                 state=state, monitor=monitor, first=not persisted, d=Decision(state={}))


def _consider_foreign_control(t: _Tick) -> None:
    """2. A control block written by someone else (kubectl patch --subresource=status): refused when malformed
    (the last good one is written back under a newer generation), adopted as an override when valid."""
    state, current = t.state, t.current
    own = state.control.wire() if state.control is not None else None
    gen = current.get("generation")
    if not (isinstance(gen, int) and "weights" in current):
        return
    newer = gen > state.generation or (gen == state.generation and own is not None and not _exact(current, own))
    # A block someone else wrote under a generation this loop has already passed (it decides a new one every tick
    # while triggered) is still theirs: server-side apply records who last set status.control.generation.
    foreign = _control_owner(t.run) not in (None, DRIFT_MANAGER)
    if not (newer or foreign) or gen in (state.refused_generation, state.adopted_generation):
        return
    try:
        adopted = validate_control(current, t.spec.gpm.axes, t.spec.drift)
    except InvalidControl as exc:
        state.refused_generation = gen
        t.d.refused += 1
        t.d.events.append({"type": "Warning", "reason": "ControlRefused",
                           "message": f"status.control generation {gen} refused, never applied: {exc}"})
        state.generation = max(gen, state.generation)
        if state.control is None:  # nothing decided yet: restore the baseline
            state.control = _block(t.monitor.control)
        t.d.reason = "Restore"
        t.write_control = True
    else:
        t.monitor.state.control = adopted
        state.generation = max(gen, state.generation)
        state.adopted_generation = gen
        state.control = _block(adopted)
        t.d.reason = t.d.reason or "Override"
        t.write_control = True  # rewritten as this loop's own block (the same values, a newer generation)
        t.d.events.append({"type": "Normal", "reason": "ControlOverridden",
                           "message": f"status.control generation {gen} was written by hand; the drift loop "
                                      "adopts it and continues from it"})


def _control_owner(run: dict) -> Optional[str]:
    """The field manager that last set status.control.generation (metadata.managedFields), if recorded."""
    for entry in (run.get("metadata") or {}).get("managedFields") or []:
        fields = ((entry.get("fieldsV1") or {}).get("f:status") or {}).get("f:control") or {}
        if "f:generation" in fields:
            return entry.get("manager")
    return None


def _history(training: dict) -> list[dict]:
    history = training.get("history") or []
    if not history and training.get("axisVariance") is not None and training.get("step") is not None:
        history = [{"step": training["step"], "axisVariance": training["axisVariance"],
                    "statisticsAt": training.get("reportedAt")}]
    return sorted((h for h in history if isinstance(h, dict)), key=lambda h: h.get("step", 0))


def _feed_statistics(t: _Tick) -> None:
    """3. Feed every step reported since the last tick to the monitor, in order; say when it triggers/releases."""
    state, monitor, spec, k = t.state, t.monitor, t.spec, t.spec.gpm.axes
    for item in _history(t.training):
        step, var = item.get("step"), item.get("axisVariance")
        if not isinstance(step, int) or step <= state.last_step:
            continue
        t.statistics_at = t.statistics_at or item.get("statisticsAt") or t.training.get("reportedAt")
        if not isinstance(var, list) or len(var) != k or not all(isinstance(v, (int, float)) for v in var):
            log.warning("%s: step %s reports %r, not %d axis variances; skipped", t.name, step, var, k)
            state.last_step = step
            continue
        win = item.get("axisWinRate")
        if win is not None and (not isinstance(win, list) or len(win) != k
                                or not all(isinstance(w, (int, float)) and 0 <= w <= 1 for w in win)):
            log.warning("%s: step %s reports win rates %r, not %d values in [0, 1]; ignored", t.name, step, win, k)
            win = None
        monitor.update([float(v) for v in var], None if win is None else [float(w) for w in win])
        state.last_step = step
        t.d.fed += 1
        for ev in monitor.state.events:
            _explain(t, ev, step)


def _explain(t: _Tick, ev: dict, step: int) -> None:
    ms, spec, d = t.monitor.state, t.spec, t.d
    if ev["type"] == "trigger":
        d.trigger_events += 1
        d.reason = "Restore" if d.reason == "Restore" else "Trigger"
        top = t.monitor.overused_axis()
        if ev.get("signal") == "win_rate":
            what = (f"win-rate lead L = {ev['lead']:.3f} > tau_L = {spec.drift.lead_tau:g} at step {step}: "
                    f"axis {top} beats the reference {ms.win_rate[top]:.3f} of the time, no other axis more "
                    f"than {max([0.5] + [w for i, w in enumerate(ms.win_rate) if i != top]):.3f}")
        else:
            what = (f"D(t) = {ev['divergence']:.4g} > tau = {spec.drift.tau:g} at step {step}: "
                    f"axis {top} holds {ms.spectrum[top]:.3f} of the variance spectrum "
                    f"(reference, N steps back: {ms.baseline[top]:.3f})")
        d.events.append({"type": "Warning", "reason": "DriftDetected",
                         "message": what + "; down-weighting it and tightening the trust region"})
    elif ev["type"] == "release":
        d.reason = d.reason or "Release"
        d.events.append({"type": "Normal", "reason": "DriftReleased",
                         "message": f"D(t) = {ev['divergence']:.4g} < {spec.drift.release_ratio:g} tau and "
                                    f"L = {ev['lead']:.3f} < {spec.drift.release_ratio:g} tau_L at step "
                                    f"{step}; relaxing the control to baseline"})


def _choose_control(t: _Tick) -> None:
    """4. A new control generation when the monitor's control moved by more than CHANGE_TOLERANCE."""
    state, monitor = t.state, t.monitor
    if t.d.fed:
        state.monitor = monitor.state_dict()
        new = _block(monitor.control)
        if state.control is None or not _close(new.wire(), state.control.wire()):
            t.write_control = True
            t.d.reason = t.d.reason or ("Tighten" if monitor.state.triggered else "Relax")
            new.reported_at, new.statistics_at = t.training.get("reportedAt"), t.statistics_at
            state.control = new
    state.triggered = bool(monitor.state.triggered)


def _stamp_generation(t: _Tick, now: str) -> None:
    """5. Number a new decision, remember when it was made (until acknowledged), measure the loop's latency."""
    state, training = t.state, t.training
    gen = t.current.get("generation")
    acked = int(training.get("appliedControlGeneration") or 0)
    if t.write_control:
        state.generation = max(state.generation, gen if isinstance(gen, int) else 0) + 1
        state.control.source_step = state.last_step
        state.control.reason = t.d.reason
        state.control.updated_at = now[:19] + "Z"
        state.decided_at[str(state.generation)] = _ts(now)
    state.decided_at = {g: ts for g, ts in state.decided_at.items() if int(g) > acked}
    # loop latency of the newest acknowledged generation: its oldest statistics (or report) -> applied (job clock)
    ack = training.get("controlAck") or {}
    t_rep = _ts(ack.get("statisticsAt")) or _ts(ack.get("reportedAt"))
    t_app = _ts(ack.get("appliedAt"))
    if t_rep is not None and t_app is not None and ack.get("generation"):
        t.d.latency = max(0.0, t_app - t_rep)


def _status_patch(t: _Tick, now: str) -> Decision:
    """6. The status fields this loop owns, or none when nothing is new (no API call)."""
    d, state, ms = t.d, t.state, t.monitor.state
    d.state = state.wire()
    if not (d.fed or t.write_control or d.events or t.first):
        return d
    out: dict[str, Any] = {"driftMonitor": d.state, "drift": float(ms.divergence)}
    if state.control is not None:
        block = state.control.model_copy(update={"generation": state.generation, "triggered": bool(ms.triggered)})
        block.source_step = block.source_step if block.source_step is not None else state.last_step
        block.reason = block.reason or "Relax"
        out["control"] = block.wire()
    out["conditions"] = [_condition(t.run, t.spec, ms, now)]
    d.status = out
    return d


def _condition(run: dict, spec: RunSpec, ms: Any, now: str) -> dict:
    previous = next((c for c in (run.get("status") or {}).get("conditions") or []
                     if isinstance(c, dict) and c.get("type") == CONDITION), {})
    value = "True" if ms.triggered else "False"
    if ms.baseline is None:
        reason, msg = "WarmingUp", f"measuring the first reference spectrum ({ms.step}/{spec.drift.warmup_steps} steps)"
    elif ms.triggered:
        reason = "DriftAboveThreshold"
        msg = f"D(t) = {ms.divergence:.4g} > tau = {spec.drift.tau:g}; {ms.interventions} intervention(s)"
    else:
        reason = "DriftBelowThreshold"
        msg = f"D(t) = {ms.divergence:.4g} (tau = {spec.drift.tau:g}); {ms.interventions} intervention(s)"
    ltt = previous.get("lastTransitionTime") if previous.get("status") == value else None
    return {"type": CONDITION, "status": value, "reason": reason, "message": msg,
            "lastTransitionTime": ltt or now[:19] + "Z",
            "observedGeneration": int(run["metadata"].get("generation") or 0)}


# --------------------------------------------------------------------------------------
# metrics


def _set_metrics(ns: str, name: str, run: dict, d: Decision, memo: Any) -> None:
    state, training = d.state, ((run.get("status") or {}).get("training") or {})
    mon = state.get("monitor") or {}
    try:
        spec = _spec(run)
        THRESHOLD.labels(ns, name).set(spec.drift.tau)
        LEAD_THRESHOLD.labels(ns, name).set(spec.drift.lead_tau)
    except Exception:  # noqa: BLE001 - metrics never break the loop
        pass
    DIVERGENCE.labels(ns, name).set(float(mon.get("divergence") or 0.0))
    TRIGGERED.labels(ns, name).set(1.0 if state.get("triggered") else 0.0)
    LEAD.labels(ns, name).set(float(mon.get("lead") or 0.0))
    own = state.get("control") or {}
    for gauge, values in ((AXIS_SPECTRUM, mon.get("spectrum")), (AXIS_BASELINE, mon.get("baseline")),
                          (AXIS_WEIGHT, own.get("weights")),
                          (AXIS_VARIANCE, training.get("axisVariance")), (AXIS_WIN_RATE, mon.get("win_rate"))):
        for i, v in enumerate(values or []):
            gauge.labels(ns, name, str(i)).set(float(v))
    for gauge, key in ((KL_COEF, "klCoef"), (EPS_LOW, "epsLow"), (EPS_HIGH, "epsHigh")):
        if key in own:
            gauge.labels(ns, name).set(float(own[key]))
    GENERATION.labels(ns, name).set(state.get("generation", 0))
    acked = int(training.get("appliedControlGeneration") or 0)
    ACKED.labels(ns, name).set(acked)
    pending = [t for g, t in (state.get("decidedAt") or {}).items() if int(g) > acked and t]
    PENDING.labels(ns, name).set(max(0.0, time.time() - min(pending)) if pending else 0.0)
    LAST_STEP.labels(ns, name).set(state.get("lastStep", 0))
    t = _ts(training.get("reportedAt"))
    if t is not None:
        LAST_REPORT.labels(ns, name).set(t)
    if d.fed:
        STEPS_FED.labels(ns, name).inc(d.fed)
    if d.trigger_events:
        INTERVENTIONS.labels(ns, name).inc(d.trigger_events)
    if d.refused:
        REFUSED.labels(ns, name).inc(d.refused)
    gen_acked = int((training.get("controlAck") or {}).get("generation") or 0)
    if d.latency is not None and memo.get("latency_seen") != gen_acked:
        memo["latency_seen"] = gen_acked  # one observation per acknowledged generation
        LATENCY.observe(d.latency)


def forget(ns: str, name: str) -> None:
    """Drop a deleted (or no longer operator-mode) run's label sets."""
    for metric in (DIVERGENCE, THRESHOLD, LEAD_THRESHOLD, LEAD, TRIGGERED, KL_COEF, EPS_LOW, EPS_HIGH, GENERATION,
                   ACKED, PENDING, LAST_STEP, LAST_REPORT, INTERVENTIONS, STEPS_FED, REFUSED):
        try:
            metric.remove(ns, name)
        except KeyError:
            pass
    for metric in (AXIS_SPECTRUM, AXIS_BASELINE, AXIS_WEIGHT, AXIS_VARIANCE, AXIS_WIN_RATE):
        for labels in list(metric._metrics):  # noqa: SLF001 - prometheus_client has no "remove by prefix"
            if labels[:2] == (ns, name):
                metric.remove(*labels)


# --------------------------------------------------------------------------------------
# kopf


def _operator_mode(spec: Any, **_: Any) -> bool:
    return ((spec or {}).get("drift") or {}).get("mode") == "operator"


def post_event(kube: Any, run: dict, etype: str, reason: str, message: str) -> None:
    meta = run["metadata"]
    now = _now()[:19] + "Z"
    body = {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {"generateName": f"{meta['name']}.", "namespace": meta["namespace"]},
        "involvedObject": {"apiVersion": f"{GROUP}/{VERSION}", "kind": KIND, "name": meta["name"],
                           "namespace": meta["namespace"], "uid": meta.get("uid")},
        "type": etype,
        "reason": reason,
        "message": message[:1024],
        "source": {"component": "gprl-operator"},
        "reportingComponent": "gprl.dev/drift-loop",
        "reportingInstance": socket.gethostname()[:128],
        "firstTimestamp": now,
        "lastTimestamp": now,
        "count": 1,
    }
    kube.request("POST", f"/api/v1/namespaces/{meta['namespace']}/events", body)


DECIDE_ATTEMPTS = 3


def tick(run: dict, kube: Any, memo: Any = None) -> Optional[Decision]:
    """Decide, then write the status (one server-side apply) and the Events. `memo`: kopf's per-run memo (a dict),
    where this process keeps the newest state it wrote (the watch may lag behind it).

    The apply carries the resourceVersion of the copy it was decided on: the watch's copy lags, and a forced apply
    of a decision made on it would silently overwrite a control block written by hand since (never refused, never
    adopted). On a conflict the run is read afresh and the decision made again; after DECIDE_ATTEMPTS the tick
    gives up (None) and the next one decides, since the state lives in the resource."""
    memo = {} if memo is None else memo
    ns, name = run["metadata"]["namespace"], run["metadata"]["name"]
    for _ in range(DECIDE_ATTEMPTS):
        d = decide(run, _now(), memo.get("drift_state"))
        if d.status is None:
            break
        meta = {"name": name, "namespace": ns}
        if run["metadata"].get("resourceVersion"):
            meta["resourceVersion"] = run["metadata"]["resourceVersion"]
        body = {"apiVersion": f"{GROUP}/{VERSION}", "kind": KIND, "metadata": meta, "status": d.status}
        try:
            kube.apply(body, field_manager=DRIFT_MANAGER, subresource="status")
        except ApiError as exc:
            if exc.status != 409:
                raise
            fresh = kube.get(f"{GROUP}/{VERSION}", KIND, ns, name)
            if fresh is None:
                return None  # deleted meanwhile
            run = fresh
            continue
        if d.reason and "control" in d.status:
            DECISIONS.labels(ns, name, d.reason).inc()
        break
    else:
        log.info("%s/%s: the run changed during %d decisions in a row; the next tick decides", ns, name,
                 DECIDE_ATTEMPTS)
        return None
    memo["drift_state"] = d.state
    for ev in d.events:
        try:
            post_event(kube, run, ev["type"], ev["reason"], ev["message"])
        except Exception as exc:  # noqa: BLE001 - an Event lost must not undo the decision
            ERRORS.labels("event").inc()
            log.warning("%s/%s: could not post Event %s: %s", ns, name, ev["reason"], exc)
        (log.warning if ev["type"] == "Warning" else log.info)("%s/%s: %s: %s", ns, name, ev["reason"], ev["message"])
    _set_metrics(ns, name, run, d, memo)
    return d


@kopf.index(GROUP, VERSION, PLURAL, when=_operator_mode)
async def drift_runs(namespace: str, name: str, **_: Any) -> dict:
    """The runs whose drift monitor this operator runs (for the gauge; kopf keeps it current)."""
    return {(namespace, name): True}


@kopf.timer(GROUP, VERSION, PLURAL, id="drift-loop", interval=INTERVAL, when=_operator_mode)
def drift_timer(body: Any, meta: Any, namespace: str, name: str, memo: Any, drift_runs: kopf.Index,
                **_: Any) -> None:
    if meta.get("deletionTimestamp"):
        return
    MONITORED.set(len(drift_runs))
    run = copy.deepcopy({"apiVersion": f"{GROUP}/{VERSION}", "kind": KIND, "metadata": dict(meta),
                         "spec": dict(body.get("spec") or {}), "status": dict(body.get("status") or {})})
    t0 = time.perf_counter()
    try:
        tick(run, shared(), memo)
    except Exception as exc:  # noqa: BLE001 - log, count, try again at the next tick (the state is in the resource)
        kind = type(exc).__name__
        status = getattr(exc, "status", None)
        ERRORS.labels(f"{kind}{'/' + str(status) if status else ''}").inc()
        log.warning("%s/%s: drift loop tick failed: %s", namespace, name, exc)
    finally:
        TICK_SECONDS.observe(time.perf_counter() - t0)


@kopf.on.event(GROUP, VERSION, PLURAL, id="drift-loop-forget")
async def drift_forget(event: dict, namespace: str, name: str, spec: Any, memo: Any, drift_runs: kopf.Index,
                       **_: Any) -> None:
    if (event.get("type") == "DELETED" or not _operator_mode(spec)) and memo.pop("drift_state", None) is not None:
        memo.pop("latency_seen", None)
        forget(namespace, name)
        MONITORED.set(len(drift_runs))
