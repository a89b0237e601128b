"""The operator on a shared cluster, against the real API server under the chart's own ServiceAccount token:
it never takes over an object it did not create (NameConflict), it repairs its children, its failures have a
story (Events, a reason, bounded retries), it re-asserts its own status fields, suspend stops a disaggregated
run's servers, and a run is deleted with the operator down."""

from __future__ import annotations

import time

import pytest

from gprl_k8s_testlib import (
    OPERATOR_NS,
    OPERATOR_SA,
    RUNS,
    OperatorProcess,
    condition,
    create_run,
    find_tool,
    get_run,
    install_chart,
    patch_run,
    run_manifest,
    wait_for,
)

pytestmark = pytest.mark.cluster

T = 60  # seconds: the control plane shares two CPUs with everything else
HEAL = 30  # issue 10: every child deleted or edited by hand is back within 30 s
DISAGG = {"resources": {"topology": "disaggregated", "rolloutReplicas": 2, "gpmReplicas": 1}}


@pytest.fixture(scope="module")
def operator(control_plane, tmp_path_factory):
    helm = find_tool(control_plane, "helm")
    if not helm:
        pytest.fail("helm not found (scripts/install-k8s-tools.sh)", pytrace=False)
    install_chart(control_plane, helm)
    kc = control_plane.service_account_kubeconfig(OPERATOR_NS, OPERATOR_SA, create=False, expiration_seconds=7200)
    logdir = tmp_path_factory.mktemp("operator-safety")
    proc = OperatorProcess(kc, logdir, name="operator-safety", priority=100).start()
    yield proc
    proc.stop()
    assert not proc.errors_in_log(), "the operator hit RBAC denials:\n" + "\n".join(proc.errors_in_log()[:20])


def ready(cp, ns, name, reason=None, status="True"):
    run = get_run(cp, ns, name)
    c = condition(run, "Ready")
    if c.get("status") == status and (reason is None or c.get("reason") == reason):
        return run
    return None


def events(cp, ns, name, reason):
    items = cp.request("GET", f"/api/v1/namespaces/{ns}/events")["items"]
    return [e for e in items if e["involvedObject"].get("name") == name and e["reason"] == reason]


def get(cp, path):
    status, body = cp.request_raw("GET", path, token=cp.admin_token)
    return body if status == 200 else None


def _content(obj):
    """What the owner wrote (the controllers' status and revision annotations do not count; that the operator
    wrote nothing at all is checked on managedFields)."""
    return {k: v for k, v in obj.items() if k not in ("metadata", "status")} | {
        "labels": obj["metadata"].get("labels")}


# foreign objects, one per derived name; each taken by a different run so that every name is exercised
FOREIGN = {
    "ConfigMap": ("/api/v1", "configmaps", "{r}-config", {"data": {"mine": "yes"}}),
    "ServiceAccount": ("/api/v1", "serviceaccounts", "{r}-trainer", {}),
    "Role": ("/apis/rbac.authorization.k8s.io/v1", "roles", "{r}-trainer",
             {"rules": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get"]}]}),
    "RoleBinding": ("/apis/rbac.authorization.k8s.io/v1", "rolebindings", "{r}-trainer",
                    {"roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "view"},
                     "subjects": [{"kind": "User", "name": "alice", "apiGroup": "rbac.authorization.k8s.io"}]}),
    "PersistentVolumeClaim": ("/api/v1", "persistentvolumeclaims", "{r}-checkpoints",
                              {"spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}}}),
    "Service": ("/api/v1", "services", "{r}-metrics",
                {"spec": {"selector": {"app": "shop"}, "ports": [{"port": 80, "targetPort": 8080}]}}),
    "StatefulSet": ("/apis/apps/v1", "statefulsets", "{r}-rollout",
                    {"spec": {"replicas": 0, "serviceName": "x", "selector": {"matchLabels": {"app": "mine"}},
                              "template": {"metadata": {"labels": {"app": "mine"}},
                                           "spec": {"containers": [{"name": "c", "image": "busybox"}]}}}}),
    "Deployment": ("/apis/apps/v1", "deployments", "{r}-gpm",
                   {"spec": {"replicas": 0, "selector": {"matchLabels": {"app": "mine"}},
                             "template": {"metadata": {"labels": {"app": "mine"}},
                                          "spec": {"containers": [{"name": "c", "image": "busybox"}]}}}}),
    "Secret": ("/api/v1", "secrets", "{r}-server-token", {"stringData": {"token": "someone-elses"}}),
    "NetworkPolicy": ("/apis/networking.k8s.io/v1", "networkpolicies", "{r}",
                      {"spec": {"podSelector": {"matchLabels": {"app": "mine"}}, "policyTypes": ["Ingress"]}}),
    "Job": ("/apis/batch/v1", "jobs", "{r}",
            {"spec": {"suspend": True, "template": {"spec": {"restartPolicy": "Never",
                                                             "containers": [{"name": "c", "image": "busybox"}]}}}}),
}


def test_objects_it_did_not_create_are_never_touched(control_plane, operator, namespace):
    cp = control_plane
    runs = {kind: f"c{i}" for i, kind in enumerate(FOREIGN)}
    before = {}
    for kind, (base, plural, pattern, body) in FOREIGN.items():
        name = pattern.format(r=runs[kind])
        obj = {"apiVersion": "v1" if base == "/api/v1" else base[len("/apis/"):], "kind": kind,
               "metadata": {"name": name, "namespace": namespace, "labels": {"owner": "someone-else"}}, **body}
        st, out = cp.request_raw("POST", f"{base}/namespaces/{namespace}/{plural}", obj, token=cp.admin_token)
        assert st == 201, out
        before[kind] = (f"{base}/namespaces/{namespace}/{plural}/{name}", _content(out))
    for kind, run in runs.items():
        assert create_run(cp, namespace, run, DISAGG)[0] == 201

    def untouched():
        for kind, (path, content) in before.items():
            obj = get(cp, path)
            assert obj is not None, f"{kind} {path} was deleted"
            assert _content(obj) == content, f"{kind} {path} was modified: {obj}"
            assert not obj["metadata"].get("ownerReferences"), f"{kind} {path} was adopted"
            managers = {m["manager"] for m in obj["metadata"].get("managedFields") or []}
            assert "gprl-operator" not in managers, f"{kind} {path} was written by the operator: {managers}"

    for kind, run in runs.items():
        got = wait_for(lambda: ready(cp, namespace, run, "NameConflict", "False"), T,
                       what=f"{run}: NameConflict for the {kind}\n{operator.tail()}")
        msg = condition(got, "Ready")["message"]
        assert kind in msg and FOREIGN[kind][2].format(r=run) in msg, msg
        assert got["status"]["phase"] == "Pending"
        ev = wait_for(lambda: events(cp, namespace, run, "NameConflict"), T, what=f"{run}: NameConflict Event")
        assert ev[0]["type"] == "Warning" and FOREIGN[kind][2].format(r=run) in ev[0]["message"]
    untouched()
    # no Job was made for a run missing one of its objects (the Job comes last)
    jobs = cp.request("GET", f"/apis/batch/v1/namespaces/{namespace}/jobs")["items"]
    assert [j["metadata"]["name"] for j in jobs] == [runs["Job"]]

    # an update of every run, then its deletion: still untouched
    for run in runs.values():
        assert patch_run(cp, namespace, run, {"spec": {"suspend": True}})[0] == 200
    time.sleep(3)
    untouched()
    for run in runs.values():
        assert cp.request_raw("DELETE", f"{RUNS}/namespaces/{namespace}/gprlruns/{run}", token=cp.admin_token)[0] == 200
    for run in runs.values():
        wait_for(lambda: get_run(cp, namespace, run) is None, T, what=f"{run} deleted")
    # the run's own children go (garbage collector), the foreign objects stay
    wait_for(lambda: get(cp, f"/api/v1/namespaces/{namespace}/configmaps/{runs['Job']}-config") is None, T,
             what="the runs' own children garbage-collected")
    untouched()


def test_a_conflict_resolved_by_its_owner_lets_the_run_proceed(control_plane, operator, namespace):
    cp = control_plane
    cm = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "web-config", "namespace": namespace}}
    assert cp.request_raw("POST", f"/api/v1/namespaces/{namespace}/configmaps", cm, token=cp.admin_token)[0] == 201
    assert create_run(cp, namespace, "web", {})[0] == 201
    wait_for(lambda: ready(cp, namespace, "web", "NameConflict", "False"), T, what="NameConflict")
    cp.request_raw("DELETE", f"/api/v1/namespaces/{namespace}/configmaps/web-config", token=cp.admin_token)
    run = wait_for(lambda: ready(cp, namespace, "web"), T, what="web reconciled once the name is free")
    owned = get(cp, f"/api/v1/namespaces/{namespace}/configmaps/web-config")
    assert owned["metadata"]["ownerReferences"][0]["uid"] == run["metadata"]["uid"]


# --------------------------------------------------------------------------------------
# self-healing


def _owned_by(obj, uid):
    return obj is not None and any(r.get("uid") == uid for r in obj["metadata"].get("ownerReferences") or [])


def test_children_deleted_or_edited_by_hand_are_restored(control_plane, operator, namespace):
    cp = control_plane
    assert create_run(cp, namespace, "heal", DISAGG)[0] == 201
    run = wait_for(lambda: ready(cp, namespace, "heal"), T, what=f"heal reconciled\n{operator.tail()}")
    uid = run["metadata"]["uid"]
    ns = f"/namespaces/{namespace}"
    children = {
        "ConfigMap": f"/api/v1{ns}/configmaps/heal-config",
        "ServiceAccount": f"/api/v1{ns}/serviceaccounts/heal-trainer",
        "Role": f"/apis/rbac.authorization.k8s.io/v1{ns}/roles/heal-trainer",
        "RoleBinding": f"/apis/rbac.authorization.k8s.io/v1{ns}/rolebindings/heal-trainer",
        "Service": f"/api/v1{ns}/services/heal-metrics",
        "Service(headless)": f"/api/v1{ns}/services/heal",
        "Service(rollout)": f"/api/v1{ns}/services/heal-rollout",
        "Service(gpm)": f"/api/v1{ns}/services/heal-gpm",
        "StatefulSet": f"/apis/apps/v1{ns}/statefulsets/heal-rollout",
        "Deployment": f"/apis/apps/v1{ns}/deployments/heal-gpm",
        "Job": f"/apis/batch/v1{ns}/jobs/heal",
    }
    # (the PVC is left out of the deletions: kubernetes.io/pvc-protection keeps it while the Job's pods use it)
    for kind, path in children.items():
        old = get(cp, path)
        assert _owned_by(old, uid), kind
        st, _ = cp.request_raw("DELETE", path, {"kind": "DeleteOptions", "apiVersion": "v1",
                                                "propagationPolicy": "Background"}, token=cp.admin_token)
        assert st in (200, 202), (kind, st)
        t0 = time.monotonic()
        new = wait_for(lambda: (lambda o: o if _owned_by(o, uid) and o["metadata"]["uid"] != old["metadata"]["uid"]
                                else None)(get(cp, path)), HEAL, interval=0.2,
                       what=f"{kind} recreated\n{operator.tail()}")
        assert new["metadata"]["labels"]["gprl.dev/run"] == "heal", kind
        print(f"{kind}: recreated in {time.monotonic() - t0:.1f}s")

    merge = "application/merge-patch+json"
    edits = {
        "scale the rollout StatefulSet to 0": (children["StatefulSet"], {"spec": {"replicas": 0}},
                                               lambda o: o["spec"]["replicas"] == 2),
        "scale the GPM Deployment to 5": (children["Deployment"], {"spec": {"replicas": 5}},
                                          lambda o: o["spec"]["replicas"] == 1),
        "give the trainer's Role secrets": (children["Role"], {"rules": [
            {"apiGroups": [""], "resources": ["secrets"], "verbs": ["get", "list"]}]},
            lambda o: all("secrets" not in r.get("resources", []) for r in o["rules"]) and len(o["rules"]) == 2),
        "point the metrics Service at other pods": (children["Service"], {"spec": {"selector": {"app": "shop"}}},
                                                    lambda o: "app" not in o["spec"]["selector"]
                                                    and o["spec"]["selector"]["gprl.dev/run"] == "heal"),
        "rewrite the config": (children["ConfigMap"], {"data": {"config.yaml": "seed: 1\n"}},
                               lambda o: "algo:" in o["data"]["config.yaml"]),
        "bind the trainer's account to another role": (children["RoleBinding"], {"metadata": {"labels": {"x": "y"}},
                                                       "subjects": [{"kind": "ServiceAccount", "name": "default",
                                                                     "namespace": namespace}]},
                                                       lambda o: o["subjects"][0]["name"] == "heal-trainer"),
        "unsuspend nothing / change parallelism of the Job": (children["Job"], {"spec": {"parallelism": 0}},
                                                              lambda o: o["spec"]["parallelism"] == 1),
    }
    for what, (path, patch, restored) in edits.items():
        st, body = cp.request_raw("PATCH", path, patch, token=cp.admin_token, content_type=merge)
        assert st == 200, (what, body)
        wait_for(lambda: restored(get(cp, path)), HEAL, interval=0.2, what=f"{what}: reverted\n{operator.tail()}")
    run = wait_for(lambda: ready(cp, namespace, "heal", "ChildRestored"), T, what="Ready reason ChildRestored")
    assert "restored" in condition(run, "Ready")["message"]
    assert events(cp, namespace, "heal", "ChildRestored")


# --------------------------------------------------------------------------------------
# errors with a story


def test_a_permanent_apply_error_gives_one_event_and_no_retry_storm(control_plane, operator, namespace):
    cp = control_plane
    # the namespace allows no Jobs: the API server refuses the run's Job with 403 (exceeded quota) every time
    quota = {"apiVersion": "v1", "kind": "ResourceQuota", "metadata": {"name": "no-jobs", "namespace": namespace},
             "spec": {"hard": {"count/jobs.batch": "0"}}}
    assert cp.request_raw("POST", f"/api/v1/namespaces/{namespace}/resourcequotas", quota,
                          token=cp.admin_token)[0] == 201
    wait_for(lambda: (get(cp, f"/api/v1/namespaces/{namespace}/resourcequotas/no-jobs").get("status") or {})
             .get("hard"), T, what="quota active")
    posts_before = operator.metric("gprl_operator_api_requests_total", verb="POST", resource="jobs")
    assert create_run(cp, namespace, "refused", {})[0] == 201
    run = wait_for(lambda: ready(cp, namespace, "refused", "ApplyRejected", "False"), T,
                   what=f"ApplyRejected\n{operator.tail()}")
    msg = condition(run, "Ready")["message"]
    assert "Job refused" in msg and "403" in msg and len(msg) <= 300, msg
    time.sleep(12)  # a retry storm would re-post the Job every 2 s
    posts = operator.metric("gprl_operator_api_requests_total", verb="POST", resource="jobs") - posts_before
    assert posts <= 2, f"{posts} Job POSTs for one permanently refused Job"
    (ev,) = events(cp, namespace, "refused", "ApplyRejected")
    assert ev["type"] == "Warning" and ev.get("count", 1) == 1, ev
    # the next spec change is tried again; with the quota gone it goes through
    cp.request_raw("DELETE", f"/api/v1/namespaces/{namespace}/resourcequotas/no-jobs", token=cp.admin_token)
    assert patch_run(cp, namespace, "refused", {"spec": {"suspend": True}})[0] == 200
    wait_for(lambda: ready(cp, namespace, "refused"), T, what="reconciled after the spec change")
    assert events(cp, namespace, "refused", "Reconciled")


def test_printer_columns_show_ready_and_its_reason(control_plane, operator, namespace):
    crd = control_plane.request("GET", "/apis/apiextensions.k8s.io/v1/customresourcedefinitions/gprlruns.gprl.dev")
    cols = {c["name"]: c["jsonPath"] for c in crd["spec"]["versions"][0]["additionalPrinterColumns"]}
    assert cols["Ready"] == '.status.conditions[?(@.type=="Ready")].status'
    assert cols["Reason"] == '.status.conditions[?(@.type=="Ready")].reason'


# --------------------------------------------------------------------------------------
# status: the operator's fields are the operator's


def test_operator_reasserts_its_status_fields(control_plane, operator, namespace):
    cp = control_plane
    assert create_run(cp, namespace, "own", {})[0] == 201
    run = wait_for(lambda: ready(cp, namespace, "own"), T, what="own reconciled")
    phase = run["status"]["phase"]
    token = cp.service_account_token(namespace, "own-trainer", create=False)
    st, body = cp.request_raw("PATCH", f"{RUNS}/namespaces/{namespace}/gprlruns/own/status",
                              {"status": {"phase": "Succeeded", "observedGeneration": 99}}, token=token,
                              content_type="application/merge-patch+json")
    if st != 200:  # the status split refuses it at the API server already: nothing to re-assert
        assert st in (403, 422), body
        return
    back = wait_for(lambda: (lambda r: r if r["status"].get("phase") == phase
                             and r["status"].get("observedGeneration") == 1 else None)(get_run(cp, namespace, "own")),
                    HEAL, what="phase and observedGeneration re-asserted")
    assert condition(back, "Ready")["status"] == "True"


# --------------------------------------------------------------------------------------
# lifecycle


def test_suspend_scales_the_servers_to_zero_and_back(control_plane, operator, namespace):
    cp = control_plane
    assert create_run(cp, namespace, "pause", DISAGG)[0] == 201
    wait_for(lambda: ready(cp, namespace, "pause"), T, what="pause reconciled")
    sts = f"/apis/apps/v1/namespaces/{namespace}/statefulsets/pause-rollout"
    dep = f"/apis/apps/v1/namespaces/{namespace}/deployments/pause-gpm"
    job = f"/apis/batch/v1/namespaces/{namespace}/jobs/pause"
    assert patch_run(cp, namespace, "pause", {"spec": {"suspend": True}})[0] == 200
    wait_for(lambda: get(cp, sts)["spec"]["replicas"] == 0 and get(cp, dep)["spec"]["replicas"] == 0
             and get(cp, job)["spec"]["suspend"] is True, T, what="servers at 0, Job suspended")
    assert patch_run(cp, namespace, "pause", {"spec": {"suspend": False}})[0] == 200
    wait_for(lambda: get(cp, sts)["spec"]["replicas"] == 2 and get(cp, dep)["spec"]["replicas"] == 1
             and get(cp, job)["spec"]["suspend"] is False, T, what="servers back, Job resumed")


def test_a_run_is_deleted_with_the_operator_down(control_plane, operator, namespace):
    cp = control_plane
    assert create_run(cp, namespace, "orphan", {"drift": {"mode": "operator"}})[0] == 201
    run = wait_for(lambda: ready(cp, namespace, "orphan"), T, what="orphan reconciled")
    time.sleep(2)  # the drift loop's timer has started on it
    assert not get_run(cp, namespace, "orphan")["metadata"].get("finalizers"), "a finalizer would block deletion"
    operator.stop()
    try:
        st, _ = cp.request_raw("DELETE", f"{RUNS}/namespaces/{namespace}/gprlruns/orphan", token=cp.admin_token)
        assert st == 200
        wait_for(lambda: get_run(cp, namespace, "orphan") is None, 15, what="deleted without the operator")
        wait_for(lambda: get(cp, f"/apis/batch/v1/namespaces/{namespace}/jobs/orphan") is None, T,
                 what="its Job garbage-collected")
    finally:
        operator.start()
    assert run["metadata"]["uid"]


# --------------------------------------------------------------------------------------
# permissions: a run grants its creator nothing more


def test_a_run_creator_gets_no_more_than_they_have(control_plane, operator, namespace):
    cp = control_plane
    merge = "application/merge-patch+json"
    # alice may create runs (gprl-edit) and nothing else: no pods, no Secrets
    cp.apply({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "alice", "namespace": namespace}})
    cp.apply({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
              "metadata": {"name": "alice-runs", "namespace": namespace},
              "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "gprl-edit"},
              "subjects": [{"kind": "ServiceAccount", "name": "alice", "namespace": namespace}]})
    alice = cp.service_account_token(namespace, "alice", create=False)
    assert cp.request_raw("GET", f"/api/v1/namespaces/{namespace}/secrets", token=alice)[0] == 403
    for name in ("db-creds", "hub-token"):
        cp.apply({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name, "namespace": namespace},
                  "stringData": {"K": "v"}})
    # the admin makes hub-token usable by alice's runs: the verb `use` on that one Secret
    cp.apply({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
              "metadata": {"name": "use-hub-token", "namespace": namespace},
              "rules": [{"apiGroups": [""], "resources": ["secrets"], "resourceNames": ["hub-token"],
                         "verbs": ["use"]}]})
    cp.apply({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
              "metadata": {"name": "use-hub-token", "namespace": namespace},
              "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "use-hub-token"},
              "subjects": [{"kind": "ServiceAccount", "name": "alice", "namespace": namespace}]})

    def create(name, resources):
        body = run_manifest(name, {"resources": resources}, namespace)
        return cp.request_raw("POST", f"{RUNS}/namespaces/{namespace}/gprlruns", body, token=alice)

    def refused(name, resources, field):
        deadline = time.monotonic() + 20  # a freshly installed policy takes a moment to be enforced
        while True:
            st, body = create(name, resources)
            if st != 201 or time.monotonic() > deadline:
                break
            cp.request_raw("DELETE", f"{RUNS}/namespaces/{namespace}/gprlruns/{name}", token=cp.admin_token)
            wait_for(lambda: get_run(cp, namespace, name) is None, T, what=f"{name} deleted")
        assert st in (403, 422), (name, st, body)
        assert field in body["message"], body["message"]

    refused("evil-image", {"image": "registry.example/evil:1"}, "spec.resources.image")
    refused("near-miss", {"image": "ghcr.io/gprl-evil/trainer:1"}, "spec.resources.image")
    refused("steal-secret", {"envFromSecrets": ["db-creds"]}, "db-creds")
    refused("steal-one-of-two", {"envFromSecrets": ["hub-token", "db-creds"]}, "db-creds")
    assert create("ok-default", {})[0] == 201
    assert create("ok-marked", {"envFromSecrets": ["hub-token"]})[0] == 201
    # changing an accepted run's spec is checked the same way (or refused earlier, where the field is immutable)
    st, body = cp.request_raw("PATCH", f"{RUNS}/namespaces/{namespace}/gprlruns/ok-default",
                              {"spec": {"suspend": True, "resources": {"envFromSecrets": ["db-creds"]}}}, token=alice,
                              content_type=merge)
    assert st in (403, 422) and ("db-creds" in body["message"] or "immutable" in body["message"]), body
    wait_for(lambda: ready(cp, namespace, "ok-marked"), T, what="ok-marked reconciled")

    # another run's checkpoint claim: accepted by the API server (alice may name a claim), refused by the operator
    victim = wait_for(lambda: ready(cp, namespace, "ok-default"), T, what="ok-default reconciled")
    assert create("thief", {"checkpointClaim": "ok-default-checkpoints"})[0] == 201
    run = wait_for(lambda: ready(cp, namespace, "thief", "ClaimNotShareable", "False"), T,
                   what=f"thief refused by the operator\n{operator.tail()}")
    assert "ok-default-checkpoints" in condition(run, "Ready")["message"]
    assert get(cp, f"/apis/batch/v1/namespaces/{namespace}/jobs/thief") is None, "a Job with the claim was made"
    assert events(cp, namespace, "thief", "ClaimNotShareable")
    assert victim["metadata"]["uid"]
