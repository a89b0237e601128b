"""The drift loop's write against a hand-written control block it has not seen yet, on the real API server.

The operator decides on the watch's copy of a run, which lags behind the API server. A control block written by
hand after that copy must be refused (or adopted) by the loop, never overwritten by a decision made on the stale
copy: the loop's apply carries the copy's resourceVersion and, on the conflict, decides again on a fresh read."""

from __future__ import annotations

import pytest

from gprl_k8s_testlib import RUNS, create_run, ensure_crd, get_run

pytestmark = pytest.mark.cluster


def _events(cp, namespace: str, name: str) -> list[dict]:
    status, body = cp.request_raw("GET", f"/api/v1/namespaces/{namespace}/events", token=cp.admin_token)
    assert status == 200, body
    return [e for e in body["items"] if e["involvedObject"].get("name") == name]


def test_a_hand_written_control_is_refused_even_when_the_loop_decides_on_a_stale_copy(
        control_plane, k8s_api_client, namespace):
    from gprl_operator.drift_loop import tick
    from gprl_operator.kube import Kube

    cp, name = control_plane, "race"
    ensure_crd(cp)
    status, body = create_run(cp, namespace, name, {"drift": {"mode": "operator", "warmupSteps": 2, "tau": 0.02},
                                                    "gpm": {"axes": 3}})
    assert status == 201, body
    # the job's report: axis 2's variance running away, so the loop decides a control block of its own
    history = [{"step": s, "axisVariance": [1.0, 1.0, 1.0 + max(0, s - 2)]} for s in range(1, 13)]
    status, body = cp.request_raw(
        "PATCH", f"{RUNS}/namespaces/{namespace}/gprlruns/{name}/status",
        {"status": {"training": {"step": 12, "history": history, "reportedAt": "2026-12-01T06:00:00Z"}}},
        token=cp.admin_token, content_type="application/merge-patch+json")
    assert status == 200, body
    kube, memo = Kube(api_client=k8s_api_client), {}
    tick(get_run(cp, namespace, name), kube, memo)
    history += [{"step": s, "axisVariance": [1.0, 1.0, 1.0 + max(0, s - 2)]} for s in (13, 14)]
    status, body = cp.request_raw(  # the job reports two more steps: the loop's next decision will write
        "PATCH", f"{RUNS}/namespaces/{namespace}/gprlruns/{name}/status",
        {"status": {"training": {"step": 14, "history": history, "reportedAt": "2026-12-01T06:00:05Z"}}},
        token=cp.admin_token, content_type="application/merge-patch+json")
    assert status == 200, body
    stale = get_run(cp, namespace, name)  # the watch's copy, from before the block written by hand below
    own = stale["status"]["control"]
    assert own["weights"][2] < 1.0, own  # the exploited axis down-weighted

    bad_gen = own["generation"] + 10
    status, body = cp.request_raw(
        "PATCH", f"{RUNS}/namespaces/{namespace}/gprlruns/{name}/status",
        {"status": {"control": {**own, "weights": [1.0, -1.0, 1.0], "generation": bad_gen}}},
        token=cp.admin_token, content_type="application/merge-patch+json")
    assert status == 200, body

    tick(stale, kube, memo)  # decided on the copy from before the hand-written block
    control = get_run(cp, namespace, name)["status"]["control"]
    assert control["generation"] > bad_gen and min(control["weights"]) >= 0, control
    refused = [e for e in _events(cp, namespace, name) if e["reason"] == "ControlRefused"]
    assert len(refused) == 1 and f"generation {bad_gen}" in refused[0]["message"], refused
