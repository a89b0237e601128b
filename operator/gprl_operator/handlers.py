"""kopf handlers of the gprl operator. They only call the Kubernetes API; all decisions are pure functions
in `gprl_operator.children` (what the run needs) and `gprl_operator.ownership` (what the operator may touch).

- create / update / resume of a GPRLRun: every child is created if absent (POST: atomic, never adopts an object
  of the same name) or, when this run already controls it (same UID), updated by server-side apply. Any other
  object of that name is left untouched: Ready=False, reason NameConflict, a Warning Event, retried with backoff
  (the owner may rename or remove it). Idempotent: a restart in the middle or a second replica creates nothing twice.
- failures: every one posts an Event; permanent ones (4xx, a spec the operator cannot realise) set Ready=False
  with a short reason and wait for the next spec change; temporary ones retry with exponential backoff.
- children events (watched by label, kept in one index per kind): a deleted child is recreated, a hand edit of
  what the operator applied is reverted within seconds (Ready reason ChildRestored, a Normal Event).
- Job and Pod events of a run: mirror the Job's state into the run's phase and conditions; a failed pod shows
  as the `PodFailed` condition with its reason.
- status: the operator's fields are re-asserted when anyone else (e.g. the trainer's ServiceAccount) changes them.
- deletion: nothing to do, and no finalizer: every child has the run as its controller owner and is
  garbage-collected by Kubernetes, with or without the operator running.
- state: what this process remembers of a run is a RunState in kopf's memo of the run (see RunState).
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as _dt
import logging
import os
import random
import threading
from typing import Any, Optional

import kopf

from gprl.crd import GROUP, KIND, PLURAL, VERSION
from gprl_operator import metrics
from gprl_operator.children import (
    API_VERSION,
    KUEUE_PREFIX,
    MANAGER,
    InvalidRun,
    build_children,
    pod_failure,
    run_status,
)
from gprl_operator.kube import ApiError, Kube, path_of, shared
from gprl_operator.ownership import (
    NameConflict,
    backoff,
    bounded,
    child_view,
    classify,
    controller_name,
    controller_uid,
    drifted,
    event_name,
)

log = logging.getLogger("gprl_operator")

MANAGED = {"app.kubernetes.io/managed-by": MANAGER}
PEERING_NAME = os.environ.get("GPRL_OPERATOR_PEERING", "gprl-operator")
# set by __main__ before kopf starts: the namespaces of watchNamespaces mode (empty: the whole cluster)
WATCH_NAMESPACES: list[str] = [n.strip() for n in os.environ.get("GPRL_WATCH_NAMESPACES", "").split(",") if n.strip()]

# The kinds of children the operator watches (by its label) to repair them. A child kind not listed here is
# still created safely; it is only not repaired between reconciles.
CHILD_RESOURCES = (
    ("", "v1", "configmaps", "ConfigMap"),
    ("", "v1", "serviceaccounts", "ServiceAccount"),
    ("", "v1", "services", "Service"),
    ("", "v1", "persistentvolumeclaims", "PersistentVolumeClaim"),
    ("rbac.authorization.k8s.io", "v1", "roles", "Role"),
    ("rbac.authorization.k8s.io", "v1", "rolebindings", "RoleBinding"),
    ("apps", "v1", "deployments", "Deployment"),
    ("apps", "v1", "statefulsets", "StatefulSet"),
    ("batch", "v1", "jobs", "Job"),
    ("networking.k8s.io", "v1", "networkpolicies", "NetworkPolicy"),
)


@dataclasses.dataclass(eq=False)
class RunState:
    """What this process remembers of one run between handler calls. It lives in kopf's per-object memo of the run
    (and is reachable from the children's handlers through the `gprl_runs` index), so it is created with the run's
    first event and dropped with the run: no global table to clean up, a recreated run (new UID) starts afresh."""

    observed: Optional[int] = None  # the generation this process last reconciled
    problem: Optional[tuple[str, str]] = None  # (reason, message) of the failing reconcile
    note: Optional[tuple[str, str]] = None  # (reason, message) of the last repair
    failure: Optional[dict] = None  # the newest failed pod
    events: dict[str, int] = dataclasses.field(default_factory=dict)  # Event name -> count posted
    desired: Optional[tuple[Any, list]] = None  # ((uid, generation, suspend, kueue labels), children)
    progress: Optional[tuple[int, dict]] = None  # (generation, children applied so far) of a failing reconcile
    written: Any = None  # fingerprint of the status this process last applied
    status: tuple[int, Optional[dict]] = (0, None)  # (resourceVersion, status) of the newest such write
    # Status writes of this process in flight, and the newest run event seen meanwhile: such an event may show one
    # of those writes before its thread has recorded it, which is no foreign change (re-asserting would put an
    # older status back); it is compared once the writes are recorded.
    writing: int = 0
    seen: tuple[int, Optional[dict]] = (0, None)
    phase: Optional[str] = None  # counted in gprl_operator_runs
    gone: bool = False  # deleted: its drift-loop timer stops (see _without_finalizers)
    # two handler threads may write one run's status at once (its reconcile, a child's repair)
    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)


def run_state(memo: Any) -> RunState:
    """The run's RunState from kopf's memo of the run (created on first use)."""
    state = memo.get("gprl")
    if state is None:
        state = memo["gprl"] = RunState()
    return state


def kube() -> Kube:
    return shared()  # one client for the whole operator (gprl_operator.kube.shared)


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def _fingerprint(status: dict) -> Any:
    conds = tuple(
        (c["type"], c["status"], c["reason"], c["message"], c.get("observedGeneration"))
        for c in status.get("conditions", [])
    )
    rest = tuple(sorted((k, str(v)) for k, v in status.items() if k != "conditions"))
    return conds, rest


def _count_phase(state: RunState, phase: Optional[str]) -> None:
    """Move the run from its counted phase to `phase` in gprl_operator_runs (None: the run is gone)."""
    if state.phase == phase:
        return
    if state.phase is not None:
        metrics.RUNS.labels(state.phase).dec()
    if phase is not None:
        metrics.RUNS.labels(phase).inc()
    state.phase = phase


def status_change(run: dict, job: Optional[dict], state: RunState,
                  generation: Optional[int] = None) -> Optional[tuple[dict, Any]]:
    """The operator's part of the run's status and its fingerprint, or None when this process wrote exactly that
    last. No I/O: the event handlers call it in kopf's event loop and go to a thread only to write.

    A failing reconcile's reason (`state.problem`) stays on Ready until a reconcile succeeds, whichever event writes."""
    if generation is None:
        generation = state.observed
    reason, error = state.problem or ("", None)
    status = run_status(run, job, now=_now(), pod_failure=state.failure, generation=generation, error=error,
                        reason=reason or "ReconcileError", note=state.note)
    fp = _fingerprint(status)
    return None if state.written == fp else (status, fp)


def apply_status(run: dict, state: RunState, change: Optional[tuple[dict, Any]], *, trigger: str) -> Optional[dict]:
    """Server-side apply of a `status_change` (nothing to do for None)."""
    if change is None:
        return None
    status, fp = change
    out = _write_status(run["metadata"]["namespace"], run["metadata"]["name"], status, state, trigger)
    if out is not None:
        with state.lock:
            state.written = fp
            if not state.gone:
                _count_phase(state, status["phase"])
    return out


def _write_status(ns: str, name: str, status: dict, state: RunState, trigger: str) -> Optional[dict]:
    """Apply `status` (the operator's fields) and record it; then check what the run's events showed meanwhile."""
    body = {"apiVersion": API_VERSION, "kind": KIND, "metadata": {"name": name, "namespace": ns}, "status": status}
    with state.lock:
        state.writing += 1
    out = None
    try:
        out = kube().apply(body, subresource="status")
    except ApiError as exc:
        if exc.status != 404:  # 404: the run is gone
            raise
    finally:
        with state.lock:
            state.writing -= 1
            if out is not None:
                _remember_status(state, out, status)
            seen, state.seen = (state.seen, (0, None)) if state.writing == 0 else ((0, None), state.seen)
    if out is None:
        return None
    metrics.STATUS_WRITES.labels(trigger).inc()
    if seen[1] is not None:
        written = status_to_reassert({"metadata": {"resourceVersion": str(seen[0])}, "status": seen[1]}, state)
        if written is not None:
            reassert_status(ns, name, written, state)
    return out


def write_status(run: dict, job: Optional[dict], state: RunState, *, trigger: str,
                 generation: Optional[int] = None) -> Optional[dict]:
    """Apply the operator's part of the run's status (skipped when nothing changed since our last write)."""
    return apply_status(run, state, status_change(run, job, state, generation), trigger=trigger)


async def in_thread(fn: Any, *args: Any) -> Any:
    """Run blocking work (API calls with the sync client) off kopf's event loop."""
    return await asyncio.get_running_loop().run_in_executor(None, fn, *args)


# --------------------------------------------------------------------------------------
# settings


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=GROUP, key="last-handled-configuration"
    )
    settings.persistence.finalizer = f"{GROUP}/kopf-finalizer"
    # The handlers post their own Events (one per failure, counted up on repeats, with a reason that says what
    # failed); kopf's would repeat each of them as "Handler 'reconcile' failed temporarily" on every retry.
    settings.posting.enabled = False
    # watchNamespaces mode: serve exactly those namespaces. With scanning on, kopf first lists `namespaces` (a
    # cluster-wide read the chart does not grant), gets 403s and starts late; nothing here needs that listing.
    settings.scanning.disabled = bool(WATCH_NAMESPACES)
    settings.peering.clusterwide = True  # one ClusterKopfPeering, whatever namespaces are watched
    settings.peering.name = PEERING_NAME
    settings.peering.stealth = True
    settings.execution.max_workers = int(os.environ.get("GPRL_OPERATOR_WORKERS", "16"))
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    settings.networking.request_timeout = 60
    settings.batching.worker_limit = int(os.environ.get("GPRL_OPERATOR_WORKER_LIMIT", "0")) or None
    kube()  # load credentials now, not in the first handler


# --------------------------------------------------------------------------------------
# indexes (in-memory views kept up to date by kopf's watches; no extra API calls). They are `async` on purpose: kopf
# runs a sync handler in its thread pool, and these small dict builds (called for every watch event of every
# child) cost less than the hop there and back.


@kopf.index(GROUP, VERSION, PLURAL)
async def gprl_runs(namespace: str, name: str, meta: Any, spec: Any, status: Any, memo: Any, **_: Any) -> dict:
    """The runs, as the children's handlers need them, each with its RunState (kopf's memo of the run)."""
    return {
        (namespace, name): {
            "metadata": {
                "name": name,
                "namespace": namespace,
                "uid": meta.get("uid"),
                "generation": meta.get("generation"),
                # the phase of a Kueue run (Queued vs Suspended) depends on its Kueue labels and spec.suspend
                "labels": {k: v for k, v in (meta.get("labels") or {}).items() if k.startswith(KUEUE_PREFIX)},
                "deletionTimestamp": meta.get("deletionTimestamp"),
            },
            "spec": dict(spec or {}),
            # only what run_status reads (the conditions' transition times): a training run's status carries its
            # statistics history, which the index would otherwise keep a second copy of for every run
            "status": {"conditions": list((status or {}).get("conditions") or [])},
            "state": run_state(memo),
        }
    }


def _child_index(kind: str):
    async def index(namespace: str, name: str, meta: Any, **_: Any) -> dict:
        uid = controller_uid(meta)
        return {(namespace, name): uid} if uid else {}

    index.__name__ = f"children_{kind.lower()}"
    return index


for _group, _version, _plural, _kind in CHILD_RESOURCES:
    kopf.index(_group, _version, _plural, labels=MANAGED, id=f"children_{_kind.lower()}")(_child_index(_kind))


@kopf.index("batch", "v1", "jobs", labels=MANAGED)
async def gprl_jobs(namespace: str, name: str, labels: Any, body: Any, **_: Any) -> dict:
    run = labels.get("gprl.dev/run")
    if not run:
        return {}
    return {(namespace, run): {"metadata": {"name": name}, "spec": {"suspend": body.get("spec", {}).get("suspend")},
                               "status": dict(body.get("status") or {})}}


def _run_of(index: Any, key: tuple) -> tuple[Optional[dict], Optional[RunState]]:
    """The run of the gprl_runs index (as a GPRLRun dict) and its RunState."""
    view = _one(index, key)
    if view is None:
        return None, None
    return {"apiVersion": API_VERSION, "kind": KIND, **{k: v for k, v in view.items() if k != "state"}}, view["state"]


def _one(index: Any, key: tuple) -> Optional[dict]:
    for item in index.get(key, []):
        return item
    return None


# --------------------------------------------------------------------------------------
# helpers of the reconcile


def _rv(obj: Optional[dict]) -> int:
    try:
        return int(((obj or {}).get("metadata") or {}).get("resourceVersion") or 0)
    except ValueError:  # resourceVersions are opaque; etcd's are integers, anything else just disables the check
        return 0


def notify(run: dict, state: RunState, etype: str, reason: str, message: str) -> None:
    """Post an Event on the run; the same one again counts up instead of adding an object."""
    meta = run["metadata"]
    key = (meta["namespace"], meta["name"])
    message = bounded(message, 1024)
    name = event_name(meta["name"], meta.get("uid") or "", reason, message)
    seen = state.events
    seen[name] = seen.get(name, 0) + 1
    involved = {"apiVersion": API_VERSION, "kind": KIND, "metadata": meta}
    try:
        kube().event(involved, etype, reason, message, name=name, count=seen[name])
    except ApiError as exc:  # an Event lost must not turn into a failed reconcile
        log.warning("%s/%s: could not post Event %s: %s", key[0], key[1], reason, exc)
    (log.warning if etype == "Warning" else log.info)("%s/%s: %s: %s", key[0], key[1], reason, message)


def desired_children(run: dict, state: RunState, live_job: Optional[dict] = None) -> list[dict]:
    """build_children, cached per (uid, generation, the live Job's suspend): child events are frequent, spec
    changes are not."""
    meta = run["metadata"]
    version = (meta.get("uid"), meta.get("generation"), ((live_job or {}).get("spec") or {}).get("suspend"),
               tuple(sorted((k, v) for k, v in (meta.get("labels") or {}).items() if k.startswith(KUEUE_PREFIX))))
    cached = state.desired
    if cached is None or cached[0] != version:
        cached = state.desired = (version, build_children(run, live_job=live_job))
    return cached[1]


def _indexed_owner(child: dict, indexes: dict) -> Optional[str]:
    index = indexes.get(f"children_{child['kind'].lower()}")
    if index is None:
        return None
    meta = child["metadata"]
    for uid in index.get((meta["namespace"], meta["name"]), []):
        return uid
    return None


def ensure(child: dict, run_uid: str, indexes: dict) -> dict:
    """Create the child if absent; update it if this run controls it; otherwise raise NameConflict."""
    meta = child["metadata"]
    if _indexed_owner(child, indexes) == run_uid:
        return kube().apply(child)
    try:
        return kube().create(child)
    except ApiError as exc:
        if exc.status != 409:
            raise
    existing = kube().get(child["apiVersion"], child["kind"], meta["namespace"], meta["name"])
    if existing is None:  # deleted in between: create it next time round
        raise ApiError(409, {"message": f"{child['kind']} {meta['name']} vanished while being checked"},
                       "GET", meta["name"])
    if controller_uid(existing) != run_uid:
        raise NameConflict(child["kind"], meta["name"], controller_name(existing))
    return kube().apply(child)


SHAREABLE = ("gprl.dev/shareable", "true")


def check_claim(run: dict) -> None:
    """`spec.resources.checkpointClaim` may name the run's own claim or one labelled gprl.dev/shareable=true:
    otherwise a user who may only create runs would mount another team's (or another run's) checkpoints read-write."""
    claim = ((run.get("spec") or {}).get("resources") or {}).get("checkpointClaim")
    if not claim:
        return
    meta = run["metadata"]
    pvc = kube().get("v1", "PersistentVolumeClaim", meta["namespace"], claim)
    if pvc is None:
        raise ClaimRefused("ClaimNotFound", f"spec.resources.checkpointClaim: PersistentVolumeClaim {claim} does not "
                                            f"exist in namespace {meta['namespace']}; create it or unset the field",
                           permanent=False)
    k, v = SHAREABLE
    if controller_uid(pvc) == meta["uid"] or (pvc["metadata"].get("labels") or {}).get(k) == v:
        return
    raise ClaimRefused("ClaimNotShareable", f"spec.resources.checkpointClaim: PersistentVolumeClaim {claim} is not "
                                            f"this run's and is not labelled {k}={v}; its owner may label it, or "
                                            f"unset the field to get a claim of the run's own", permanent=False)


class ClaimRefused(RuntimeError):
    def __init__(self, reason: str, message: str, permanent: bool):
        super().__init__(message)
        self.reason, self.permanent = reason, permanent


def _job_changes_pods(job: dict, indexes: dict, run_uid: str, generation: int, state: RunState) -> None:
    """A spec change that needs a new Job template is refused by the API server (the template is immutable):
    find out with a dry run before anything else is touched, so a change is applied completely or not at all."""
    if state.observed in (None, generation) or _indexed_owner(job, indexes) != run_uid:
        return
    kube().apply(job, dry_run=True)


# --------------------------------------------------------------------------------------
# reconcile


@kopf.on.resume(GROUP, VERSION, PLURAL)
@kopf.on.create(GROUP, VERSION, PLURAL)
@kopf.on.update(GROUP, VERSION, PLURAL)
@metrics.timed("reconcile")
def reconcile(body: Any, meta: Any, namespace: str, name: str, retry: int, memo: Any, gprl_jobs: kopf.Index,
              **indexes: Any) -> None:
    if meta.get("deletionTimestamp"):
        return
    run = {"apiVersion": API_VERSION, "kind": KIND, "metadata": dict(meta), "spec": dict(body.get("spec") or {}),
           "status": dict(body.get("status") or {})}
    state = run_state(memo)
    generation = int(meta.get("generation") or 0)
    uid = meta["uid"]
    # the live Job: on a Kueue run its spec.suspend is Kueue's (admission), never overwritten
    live_job = _one(gprl_jobs, (namespace, name))

    def fail(reason: str, message: str, *, permanent: bool, delay: float = 0.0) -> None:
        message = bounded(message)
        first = state.problem != (reason, message)
        state.problem, state.note = (reason, message), None
        write_status(run, live_job, state, trigger="error", generation=generation)
        if first or not permanent:
            notify(run, state, "Warning", reason, message)
        if permanent:
            raise kopf.PermanentError(f"{reason}: {message}")
        raise kopf.TemporaryError(f"{reason}: {message}", delay=delay)

    try:
        children = desired_children(run, state, live_job)
    except InvalidRun as exc:
        fail("InvalidSpec", str(exc), permanent=True)
    job = None
    child = children[0]
    try:
        check_claim(run)
    except ClaimRefused as exc:
        fail(exc.reason, str(exc), permanent=exc.permanent, delay=backoff(retry + 1))
    try:
        child = {"kind": "Secret", "metadata": {"name": f"{name}-server-token"}}  # names it in the error below
        ensure_token_secret(run)
        _job_changes_pods(children[-1], indexes, uid, generation, state)
        # a retry of the same generation skips what it already applied: under API pressure (429, timeouts) a
        # retry that re-applies everything multiplies the very load that made it fail
        if state.progress is None or state.progress[0] != generation:
            state.progress = (generation, {})
        done = state.progress[1]
        for child in children:
            ckey = (child["kind"], child["metadata"]["name"])
            applied = done.get(ckey) or ensure(child, uid, indexes)
            done[ckey] = {"metadata": applied["metadata"], "spec": applied.get("spec"),
                          "status": applied.get("status")} if child["kind"] == "Job" else {"ok": True}
            if child["kind"] == "Job":
                job = applied
    except NameConflict as exc:
        # the owner of that object may rename or remove it: look again, less and less often
        fail("NameConflict", str(exc), permanent=False, delay=backoff(retry + 1))
    except ApiError as exc:
        detail = exc.body.get("message") if isinstance(exc.body, dict) else exc.body
        msg = f"{child['kind']} {child['metadata']['name']}: HTTP {exc.status}: {detail}"
        if exc.status == 403 and "being terminated" in msg:
            log.info("%s/%s: namespace is being deleted; nothing to reconcile", namespace, name)
            return
        if classify(exc.status) == "permanent":
            fail("ApplyRejected", msg, permanent=True)
        fail("ApplyFailed", msg, permanent=False, delay=backoff(retry))
    state.progress = None
    resolved, state.problem = state.problem, None
    if resolved:
        notify(run, state, "Normal", "Reconciled", f"generation {generation} applied after {resolved[0]}")
    state.observed = generation
    write_status(run, job, state, trigger="reconcile", generation=generation)
    log.info("reconciled %s/%s generation %d: %d children applied, phase %s", namespace, name, generation,
             len(children), state.phase or "?")


def ensure_token_secret(run: dict) -> None:
    """The run's server token: created once with a random value, never overwritten (running servers and the
    learner hold it). Created first and looked at only if it exists (409): one request for a new run. A create
    that races another replica's finds it there, which is as good when that replica works for the same run."""
    import secrets

    from gprl_operator.children import token_secret

    secret = token_secret(run, secrets.token_hex(32))
    meta = secret["metadata"]
    try:
        kube().request("POST", path_of("v1", "Secret", meta["namespace"]), secret)
        return
    except ApiError as exc:
        if exc.status != 409:
            raise
    existing = kube().get("v1", "Secret", meta["namespace"], meta["name"])
    if existing is None:  # deleted in between: create it next time round
        raise ApiError(409, {"message": f"Secret {meta['name']} vanished while being checked"}, "GET", meta["name"])
    # someone else's Secret of that name would hand its value to the run's pods (and the run's to it)
    if controller_uid(existing) != run["metadata"]["uid"]:
        raise NameConflict("Secret", meta["name"], controller_name(existing))


@kopf.on.event(GROUP, VERSION, PLURAL)
async def run_event(event: dict, body: Any, namespace: str, name: str, memo: Any, **_: Any) -> None:
    """Every event of a run (async: almost all of them need no more than a look)."""
    state = run_state(memo)
    if event.get("type") == "DELETED":
        with state.lock:
            state.gone = True  # kopf drops the memo with the run; its timer and counted phase go now
            _count_phase(state, None)
        return
    with state.lock:
        if state.writing:  # compared when those writes are recorded (see RunState.writing)
            if _rv(body) > state.seen[0]:
                state.seen = (_rv(body), dict(body.get("status") or {}))
            return
        written = status_to_reassert(body, state)
    if written is not None:
        await in_thread(reassert_status, namespace, name, written, state)


def _remember_status(state: RunState, out: Optional[dict], status: dict) -> None:
    """The newest of this process's status writes (two handler threads may write one run at once; hold the lock)."""
    rv = _rv(out)
    if rv >= state.status[0]:
        state.status = (rv, status)


def status_to_reassert(body: Any, state: RunState) -> Optional[dict]:
    """The operator's last status when someone else has changed its fields since (None: nothing to undo)."""
    rv, written = state.status
    if written is None or _rv(body) <= rv:  # nothing written yet, or an event from before our last write
        return None
    current = dict(body.get("status") or {})
    by_type = {c.get("type"): c for c in current.get("conditions") or [] if isinstance(c, dict)}
    view = {k: current.get(k) for k in written}
    view["conditions"] = [by_type.get(c["type"]) for c in written.get("conditions", [])]
    return written if drifted(written, view) else None


def reassert_status(ns: str, name: str, written: dict, state: RunState) -> None:
    """The phase, the operator's conditions and counts are the operator's: anyone else's change is undone."""
    try:
        if _write_status(ns, name, written, state, "reassert") is None:
            return
    except ApiError as exc:
        log.warning("%s/%s: could not re-assert the status: %s", ns, name, exc)
        return
    log.info("%s/%s: status fields of the operator were changed by someone else; restored", ns, name)


# --------------------------------------------------------------------------------------
# self-healing: the children


async def child_event(event: dict, body: Any, namespace: str, labels: Any, gprl_runs: kopf.Index,
                      gprl_jobs: kopf.Index, **_: Any) -> None:
    """A child's watch event. Looked at in kopf's event loop (nearly every event is the echo of the operator's own
    write and needs nothing); only a repair goes to a thread."""
    run_name = labels.get("gprl.dev/run")
    run, state = _run_of(gprl_runs, (namespace, run_name)) if run_name else (None, None)
    if run is None or state is None:
        return
    meta = run["metadata"]
    if controller_uid(dict(body.get("metadata") or {})) != meta["uid"] or meta.get("deletionTimestamp"):
        return  # an older run's child on its way out, or the run is being deleted
    if state.observed != meta.get("generation") or state.problem is not None:
        return  # the reconcile of this generation is still to come or failing: it applies (or reports) everything
    kind, name = body.get("kind"), body["metadata"]["name"]
    job = _one(gprl_jobs, (namespace, run_name))
    try:
        want = next((c for c in desired_children(run, state, job)
                     if c["kind"] == kind and c["metadata"]["name"] == name), None)
    except InvalidRun:
        return
    if want is None:
        return
    deleted = event.get("type") == "DELETED"
    if not deleted and not drifted(child_view(want), dict(body)):
        return
    await in_thread(repair, run, state, want, deleted, job)


def repair(run: dict, state: RunState, want: dict, deleted: bool, job: Optional[dict]) -> None:
    """Create a deleted child again, or re-apply one changed by hand; say so on the run."""
    meta, kind, name = run["metadata"], want["kind"], want["metadata"]["name"]
    try:
        if deleted:
            # the run's own deletion deletes its children too: only a child of a run that still exists comes back
            live = kube().get(API_VERSION, KIND, meta["namespace"], meta["name"])
            if live is None or live["metadata"].get("uid") != meta["uid"] or live["metadata"].get("deletionTimestamp"):
                return
            try:
                kube().create(want)
            except ApiError as exc:
                if exc.status != 409:
                    raise
            what = "deleted"
        else:
            kube().apply(want)
            what = "changed by hand"
    except ApiError as exc:
        notify(run, state, "Warning", "RepairFailed", f"{kind} {name}: HTTP {exc.status}: {exc}")
        return
    message = f"{kind} {name} was {what}; restored at {_now()}"
    state.note = ("ChildRestored", message)
    notify(run, state, "Normal", "ChildRestored", message)
    state.written = None  # the note is new: write it even if nothing else changed
    write_status(run, job, state, trigger="repair")


for _group, _version, _plural, _kind in CHILD_RESOURCES:
    kopf.on.event(_group, _version, _plural, labels=MANAGED, id=f"repair_{_kind.lower()}")(
        metrics.timed("child_event")(child_event))


@kopf.on.event("batch", "v1", "jobs", labels=MANAGED)
@metrics.timed("job_event")
async def job_event(event: dict, body: Any, namespace: str, labels: Any, gprl_runs: kopf.Index, **_: Any) -> None:
    """The Job's state mirrored into the run's phase and conditions (written only when they change)."""
    run_name = labels.get("gprl.dev/run")
    if not run_name or event.get("type") == "DELETED":
        return
    run, state = _run_of(gprl_runs, (namespace, run_name))
    if run is None or state is None:
        return
    owners = {o.get("uid") for o in body.get("metadata", {}).get("ownerReferences") or []}
    if run["metadata"]["uid"] not in owners:
        return  # a Job of an older run of the same name, on its way out
    job = {"metadata": dict(body["metadata"]), "spec": dict(body.get("spec") or {}), "status": dict(body.get("status") or {})}
    change = status_change(run, job, state)
    if change is not None:
        await in_thread(lambda: apply_status(run, state, change, trigger="job"))


@kopf.on.event("", "v1", "pods", labels={**MANAGED, "gprl.dev/run": kopf.PRESENT})
@metrics.timed("pod_event")
async def pod_event(event: dict, body: Any, namespace: str, labels: Any, gprl_runs: kopf.Index,
                    gprl_jobs: kopf.Index, **_: Any) -> None:
    """A failed pod of a run: the PodFailed condition with its reason."""
    if event.get("type") == "DELETED":
        return
    failure = pod_failure(dict(body))
    if failure is None:
        return
    key = (namespace, labels["gprl.dev/run"])
    run, state = _run_of(gprl_runs, key)
    if run is None or state is None or (state.failure or {}).get("pod") == failure["pod"]:
        return
    state.failure = failure
    change = status_change(run, _one(gprl_jobs, key), state)
    if change is not None:
        await in_thread(lambda: apply_status(run, state, change, trigger="pod"))


@kopf.on.probe(id="runs")
def probe_runs(gprl_runs: kopf.Index, **_: Any) -> int:
    return len(gprl_runs)


def default_priority() -> int:
    """Peering priority: replicas with equal priorities would all pause, so each one draws its own."""
    env = os.environ.get("GPRL_OPERATOR_PRIORITY")
    return int(env) if env else random.SystemRandom().randint(1, 2**31 - 1)


# The closed drift loop (a kopf timer per GPRLRun with spec.drift.mode: operator) lives in its own module.
# GPRL_OPERATOR_DRIFT_LOOP=0 leaves it out (a cluster where every run keeps its drift monitor in-process).
if os.environ.get("GPRL_OPERATOR_DRIFT_LOOP", "1") != "0":
    from gprl_operator import drift_loop as _drift_loop  # noqa: E402,F401  (registers its handlers)


def _without_finalizers() -> None:
    """kopf puts a finalizer on every object a timer runs for, so that it can stop the timer before the object
    goes; with the operator down (after `helm uninstall`) `kubectl delete` then hangs. Nothing of ours needs to
    run at deletion (the children are garbage-collected), so the timers go without one: run_event, which kopf
    calls before it re-matches the timers, marks the run's state gone, and the filter below stops the timer."""
    registry = kopf.get_default_registry()
    spawning = registry._spawning._handlers  # noqa: SLF001 - kopf offers no public switch for timers
    for i, handler in enumerate(spawning):
        def when(*, memo: Any, _orig: Any = handler.when, **kw: Any) -> bool:
            gone = memo is not None and run_state(memo).gone
            return not gone and (_orig is None or _orig(memo=memo, **kw))

        spawning[i] = dataclasses.replace(handler, requires_finalizer=False, when=when)


_without_finalizers()
