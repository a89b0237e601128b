"""The operator's pure rules of ownership, drift, failure classes and bounded messages; suspend of the servers;
no finalizer from the drift-loop timer (no cluster: the same rules run against the API server in
tests/cluster/test_operator_safety.py)."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT / "operator") not in sys.path:
    sys.path.insert(0, str(ROOT / "operator"))

from gprl_operator.children import build_children, run_status  # noqa: E402
from gprl_operator.ownership import (  # noqa: E402
    MESSAGE_LIMIT,
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


def make_run(name="demo", spec=None):
    return {"apiVersion": "gprl.dev/v1alpha1", "kind": "GPRLRun",
            "metadata": {"name": name, "namespace": "ml", "uid": "u-1", "generation": 1}, "spec": spec or {}}


def test_controller_uid_reads_only_the_controller_reference():
    obj = {"metadata": {"ownerReferences": [{"kind": "X", "name": "a", "uid": "other"},
                                            {"kind": "GPRLRun", "name": "r", "uid": "u-1", "controller": True}]}}
    assert controller_uid(obj) == "u-1" and controller_name(obj) == "GPRLRun/r"
    assert controller_uid({"metadata": {"ownerReferences": [{"uid": "x"}]}}) is None
    assert controller_uid({"metadata": {}}) is None


def test_name_conflict_names_the_object_and_the_fix():
    msg = str(NameConflict("ConfigMap", "web-config", None))
    assert "ConfigMap web-config" in msg and "left untouched" in msg and "Rename the run" in msg
    assert "controlled by Deployment/x" in str(NameConflict("Service", "s", "Deployment/x"))


def test_drift_ignores_server_additions_but_not_edits():
    for child in build_children(make_run(spec={"resources": {"topology": "disaggregated"}})):
        want = child_view(child)
        actual = {**want, "status": {"x": 1}, "metadata": {**want["metadata"], "uid": "k", "resourceVersion": "9",
                                                            "labels": {**want["metadata"]["labels"], "extra": "y"}}}
        assert not drifted(want, actual), child["kind"]
    sts = next(c for c in build_children(make_run(spec={"resources": {"topology": "disaggregated"}}))
               if c["kind"] == "StatefulSet")
    scaled = {**sts, "spec": {**sts["spec"], "replicas": 0}}
    assert drifted(child_view(sts), scaled)
    role = next(c for c in build_children(make_run()) if c["kind"] == "Role")
    widened = {**role, "rules": role["rules"] + [{"apiGroups": [""], "resources": ["secrets"], "verbs": ["get"]}]}
    assert drifted(child_view(role), widened)
    assert drifted({"a": {"b": 1}}, {"a": None}) and drifted({"a": [1]}, {"a": {"0": 1}})


def test_failure_classes_and_backoff():
    assert [classify(s) for s in (400, 403, 404, 422)] == ["permanent"] * 4
    assert [classify(s) for s in (408, 409, 429, 500, 503)] == ["temporary"] * 5
    assert [backoff(r) for r in range(4)] == [2, 4, 8, 16]
    assert backoff(30) == 300


def test_messages_are_bounded_and_events_deduplicated():
    long = "x " * 5000
    assert len(bounded(long)) == MESSAGE_LIMIT and bounded(long).endswith("…")
    assert bounded("a\n  b") == "a b"
    a = event_name("run", "u", "NameConflict", "m")
    assert a == event_name("run", "u", "NameConflict", "m") != event_name("run", "u", "NameConflict", "n")
    assert len(event_name("r" * 253, "u", "x", "y")) <= 253


def test_run_status_reports_the_reason_with_a_short_message():
    st = run_status(make_run(), None, now="t", generation=1, error="HTTP 422: " + "detail " * 2000,
                    reason="ApplyRejected")
    ready = st["conditions"][0]
    assert ready["type"] == "Ready" and ready["status"] == "False" and ready["reason"] == "ApplyRejected"
    assert len(ready["message"]) <= MESSAGE_LIMIT and len(st["message"]) <= MESSAGE_LIMIT
    job = {"metadata": {"name": "demo"}, "spec": {}, "status": {"active": 1}}
    st = run_status(make_run(), job, now="t", generation=1, note=("ChildRestored", "Service demo was deleted"))
    assert st["conditions"][0]["reason"] == "ChildRestored" and st["conditions"][0]["status"] == "True"


def test_suspend_scales_the_servers_to_zero_and_back():
    spec = {"resources": {"topology": "disaggregated", "rolloutReplicas": 3, "gpmReplicas": 2}}
    def replicas(suspend):
        kids = build_children(make_run(spec={**spec, "suspend": suspend}))
        return {c["kind"]: c["spec"].get("replicas", c["spec"].get("suspend")) for c in kids
                if c["kind"] in ("StatefulSet", "Deployment", "Job")}
    assert replicas(True) == {"StatefulSet": 0, "Deployment": 0, "Job": True}
    assert replicas(False) == {"StatefulSet": 3, "Deployment": 2, "Job": False}


def test_the_drift_loop_timer_puts_no_finalizer_on_runs():
    import kopf

    from gprl_operator import handlers

    timers = list(kopf.get_default_registry()._spawning._handlers)
    assert timers, "the drift loop registers a timer"
    assert all(t.requires_finalizer is False for t in timers)
    # a deleted run's state (in kopf's memo of the run) stops its timer (kopf re-matches the filter on DELETED)
    spec = {"drift": {"mode": "operator"}}
    meta = {"uid": "gone-1", "name": "r", "namespace": "n"}
    when = timers[0].when

    def matches(memo: dict) -> bool:
        return when(meta=meta, spec=spec, body={"spec": spec, "metadata": meta}, status={}, name="r", namespace="n",
                    labels={}, annotations={}, logger=None, patch={}, memo=memo, resource=None, uid="gone-1")

    memo: dict = {}
    assert matches(memo)
    handlers.run_state(memo).gone = True
    assert not matches(memo)


def test_a_selector_must_match_exactly():
    svc = {"spec": {"selector": {"gprl.dev/run": "r", "app.kubernetes.io/component": "trainer"}}}
    widened = {"spec": {"selector": {**svc["spec"]["selector"], "app": "shop"}}}
    assert drifted(svc, widened)
    assert not drifted({"spec": {"template": {"metadata": {"labels": {"a": "1"}}}}},
                       {"spec": {"template": {"metadata": {"labels": {"a": "1", "controller-uid": "x"}}}}})
