"""kopf handlers of the gprl operator. They only call the Kubernetes API; all decisions are pure functions
in `gprl_operator.children`.

- create / update / resume of a GPRLRun: server-side apply of every child (idempotent: a re-run, a restart in the
  middle of a reconcile, or a second replica creates nothing twice), then the run's status.
- Job and Pod events of a run: mirror the Job's state into the run's phase and conditions; a failed pod shows
  as the `PodFailed` condition with its reason.
- deletion: nothing to do; every child has the run as its controller owner and is garbage-collected.
"""

from __future__ import annotations

import datetime as _dt
import logging
import os
import random
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

log = logging.getLogger("gprl_operator")

MANAGED = {"app.kubernetes.io/managed-by": MANAGER}
PEERING_NAME = os.environ.get("GPRL_OPERATOR_PEERING", "gprl-operator")

_last_written: dict[tuple[str, str], Any] = {}  # (ns, run) -> status fingerprint this process last applied
_observed: dict[tuple[str, str], int] = {}  # (ns, run) -> generation this process last reconciled
_failures: dict[tuple[str, str], dict] = {}  # (ns, run) -> newest failed pod
_phases: dict[tuple[str, str], str] = {}


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


def _update_phase_gauge() -> None:
    counts: dict[str, int] = {}
    for p in list(_phases.values()):
        counts[p] = counts.get(p, 0) + 1
    for phase in ("Pending", "Queued", "Running", "Succeeded", "Failed", "Suspended"):
        metrics.RUNS.labels(phase).set(counts.get(phase, 0))


def write_status(run: dict, job: Optional[dict], *, trigger: str, generation: Optional[int] = None,
                 error: Optional[str] = None) -> Optional[dict]:
    """Apply the operator's part of the run's status (skipped when nothing changed since our last write)."""
    ns, name = run["metadata"]["namespace"], run["metadata"]["name"]
    key = (ns, name)
    if generation is None:
        generation = _observed.get(key)
    status = run_status(run, job, now=_now(), pod_failure=_failures.get(key), generation=generation, error=error)
    fp = _fingerprint(status)
    if _last_written.get(key) == fp:
        return None
    body = {"apiVersion": API_VERSION, "kind": KIND, "metadata": {"name": name, "namespace": ns}, "status": status}
    try:
        out = kube().apply(body, subresource="status")
    except ApiError as exc:
        if exc.status == 404:  # the run is gone
            return None
        raise
    metrics.STATUS_WRITES.labels(trigger).inc()
    _last_written[key] = fp
    _phases[key] = status["phase"]
    _update_phase_gauge()
    return out


# --------------------------------------------------------------------------------------
# settings


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=GROUP, key="last-handled-configuration"
    )
    settings.persistence.finalizer = f"{GROUP}/kopf-finalizer"
    settings.posting.level = logging.WARNING  # k8s Events only for warnings and errors
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
# indexes (in-memory views kept up to date by kopf's watches; no extra API calls)


@kopf.index(GROUP, VERSION, PLURAL)
def gprl_runs(namespace: str, name: str, meta: Any, spec: Any, status: Any, **_: Any) -> dict:
    return {
        (namespace, name): {
            "metadata": {
                "name": name,
                "namespace": namespace,
                "uid": meta.get("uid"),
                "generation": meta.get("generation"),
                # the phase of a Kueue run (Queued vs Suspended) depends on its Kueue labels and spec.suspend
                "labels": {k: v for k, v in (meta.get("labels") or {}).items() if k.startswith(KUEUE_PREFIX)},
            },
            "spec": {"suspend": bool((spec or {}).get("suspend", False))},
            "status": dict(status or {}),
        }
    }


@kopf.index("batch", "v1", "jobs", labels=MANAGED)
def gprl_jobs(namespace: str, name: str, labels: Any, body: Any, **_: Any) -> dict:
    run = labels.get("gprl.dev/run")
    if not run:
        return {}
    return {(namespace, run): {"metadata": {"name": name}, "spec": {"suspend": body.get("spec", {}).get("suspend")},
                               "status": dict(body.get("status") or {})}}


def _one(index: Any, key: tuple) -> Optional[dict]:
    for item in index.get(key, []):
        return item
    return None


# --------------------------------------------------------------------------------------
# reconcile


@kopf.on.resume(GROUP, VERSION, PLURAL, backoff=2)
@kopf.on.create(GROUP, VERSION, PLURAL, backoff=2)
@kopf.on.update(GROUP, VERSION, PLURAL, backoff=2)
@metrics.timed("reconcile")
def reconcile(body: Any, meta: Any, namespace: str, name: str, logger: logging.Logger, gprl_jobs: kopf.Index,
              **_: Any) -> None:
    if meta.get("deletionTimestamp"):
        return
    run = {"apiVersion": API_VERSION, "kind": KIND, "metadata": dict(meta), "spec": dict(body.get("spec") or {}),
           "status": dict(body.get("status") or {})}
    generation = int(meta.get("generation") or 0)
    try:
        # the live Job: on a Kueue run its spec.suspend is Kueue's (admission), never overwritten
        children = build_children(run, live_job=_one(gprl_jobs, (namespace, name)))
    except InvalidRun as exc:
        write_status(run, None, trigger="invalid", generation=generation, error=str(exc))
        raise kopf.PermanentError(str(exc)) from None
    job = None
    try:
        child = {"kind": "Secret", "metadata": {"name": f"{name}-server-token"}}  # names it in the error below
        ensure_token_secret(run)
        for child in children:
            applied = kube().apply(child)
            if child["kind"] == "Job":
                job = applied
    except ApiError as exc:
        msg = f"{exc.method} {child['kind']}/{child['metadata']['name']}: HTTP {exc.status}: " \
              f"{exc.body.get('message') if isinstance(exc.body, dict) else exc.body}"
        if exc.status == 403 and "being terminated" in msg:
            log.info("%s/%s: namespace is being deleted; nothing to reconcile", namespace, name)
            return
        write_status(run, None, trigger="error", generation=generation, error=msg)
        if exc.status in (400, 422):
            raise kopf.PermanentError(msg) from None
        raise kopf.TemporaryError(msg, delay=2 if exc.status in (409, 429) or exc.status >= 500 else 10) from None
    _observed[(namespace, name)] = generation
    write_status(run, job, trigger="reconcile", generation=generation)
    log.info("reconciled %s/%s generation %d: %d children applied, phase %s", namespace, name, generation,
             len(children), _phases.get((namespace, name), "?"))


def ensure_token_secret(run: dict) -> None:
    """The run's server token: created once with a random value, never overwritten (running servers and the
    learner hold it). A create that races another replica's finds it there (409), which is as good."""
    import secrets

    from gprl_operator.children import token_secret

    secret = token_secret(run, secrets.token_hex(32))
    meta = secret["metadata"]
    if kube().get("v1", "Secret", meta["namespace"], meta["name"]) is not None:
        return
    try:
        kube().request("POST", path_of("v1", "Secret", meta["namespace"]), secret)
    except ApiError as exc:
        if exc.status != 409:
            raise


@kopf.on.event(GROUP, VERSION, PLURAL)
def run_event(event: dict, namespace: str, name: str, **_: Any) -> None:
    if event.get("type") == "DELETED":
        key = (namespace, name)
        for d in (_last_written, _observed, _failures, _phases):
            d.pop(key, None)
        _update_phase_gauge()


@kopf.on.event("batch", "v1", "jobs", labels=MANAGED)
@metrics.timed("job_event")
def job_event(event: dict, body: Any, namespace: str, labels: Any, gprl_runs: kopf.Index, **_: Any) -> None:
    run_name = labels.get("gprl.dev/run")
    if not run_name or event.get("type") == "DELETED":
        return
    run = _one(gprl_runs, (namespace, run_name))
    if run is None:
        return
    owners = {o.get("uid") for o in body.get("metadata", {}).get("ownerReferences") or []}
    if run["metadata"]["uid"] not in owners:
        return  # a Job of an older run of the same name, on its way out
    job = {"metadata": dict(body["metadata"]), "spec": dict(body.get("spec") or {}), "status": dict(body.get("status") or {})}
    write_status(run, job, trigger="job")


@kopf.on.event("", "v1", "pods", labels={**MANAGED, "gprl.dev/run": kopf.PRESENT})
@metrics.timed("pod_event")
def pod_event(event: dict, body: Any, namespace: str, labels: Any, gprl_runs: kopf.Index, gprl_jobs: kopf.Index,
              **_: Any) -> None:
    if event.get("type") == "DELETED":
        return
    failure = pod_failure(dict(body))
    if failure is None:
        return
    key = (namespace, labels["gprl.dev/run"])
    if _failures.get(key, {}).get("pod") == failure["pod"]:
        return
    _failures[key] = failure
    run = _one(gprl_runs, key)
    if run is None:
        return
    write_status(run, _one(gprl_jobs, key), trigger="pod")


@kopf.on.probe(id="runs")
def probe_runs(**_: Any) -> int:
    return len(_phases)


def default_priority() -> int:
    """Peering priority: replicas with equal priorities would all pause, so each one draws its own."""
    env = os.environ.get("GPRL_OPERATOR_PRIORITY")
    return int(env) if env else random.SystemRandom().randint(1, 2**31 - 1)


# The closed drift loop (a kopf timer per GPRLRun with spec.drift.mode: operator) lives in its own module.
# GPRL_OPERATOR_DRIFT_LOOP=0 leaves it out (a cluster where every run keeps its drift monitor in-process).
if os.environ.get("GPRL_OPERATOR_DRIFT_LOOP", "1") != "0":
    from gprl_operator import drift_loop as _drift_loop  # noqa: E402,F401  (registers its handlers)
