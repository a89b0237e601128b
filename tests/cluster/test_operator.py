"""The operator against the real API server, running under the token of the Helm chart's own ServiceAccount
(an RBAC gap is a 403 here, not in a user's cluster): create, update, suspend/resume, delete, restart in the
middle of a reconcile, two replicas, and (kwok + controller-manager) Job -> Pods on fake GPU nodes -> Running ->
Succeeded / a failed pod."""

from __future__ import annotations

import base64
import re
import time
from pathlib import Path

import pytest
import yaml

from gprl_k8s_testlib import (
    FAIL_IMAGE,
    STOPPED_IMAGE,
    OPERATOR_NS,
    OPERATOR_SA,
    RUNS,
    STAGED_NODE_LABEL,
    OperatorProcess,
    StagedKwok,
    children_of,
    condition,
    create_run,
    find_tool,
    get_run,
    install_chart,
    patch_run,
    wait_for,
)

pytestmark = pytest.mark.cluster

T = 90  # seconds; generous: the control plane shares two CPUs with everything else on a CI box

EXPECTED = {"configmaps": 1, "serviceaccounts": 1, "roles": 1, "rolebindings": 1, "persistentvolumeclaims": 1,
            "services": 2, "jobs": 1, "secrets": 1, "networkpolicies": 1}


class Operator:
    """The operator process of this module, restartable."""

    def __init__(self, cp, logdir: Path):
        self.cp, self.logdir, self.n = cp, logdir, 0
        self.kubeconfig = cp.service_account_kubeconfig(OPERATOR_NS, OPERATOR_SA, create=False,
                                                        expiration_seconds=7200)
        self.proc: OperatorProcess | None = None

    def start(self, **kw) -> OperatorProcess:
        self.n += 1
        self.proc = OperatorProcess(self.kubeconfig, self.logdir, name=f"operator-{self.n}", priority=100, **kw)
        return self.proc.start()

    def logs(self) -> str:
        return "\n".join(p.read_text(errors="replace") for p in sorted(self.logdir.glob("operator-*.log")))


@pytest.fixture(scope="module")
def operator(control_plane, tmp_path_factory):
    helm = find_tool(control_plane, "helm")
    if not helm:
        pytest.fail("helm not found (scripts/install-k8s-tools.sh)", pytrace=False)
    install_chart(control_plane, helm)
    op = Operator(control_plane, tmp_path_factory.mktemp("operator-logs"))
    op.start()
    yield op
    if op.proc:
        op.proc.stop()
    # RBAC denials read `User "system:serviceaccount:..." cannot <verb> resource ...` (other 403s, e.g. writes to a
    # namespace being deleted, are not RBAC gaps)
    forbidden = [ln for ln in op.logs().splitlines() if re.search(r"cannot [a-z]+ resource", ln)]
    assert not forbidden, "the operator hit RBAC denials:\n" + "\n".join(forbidden[:20])


def reconciled(cp, ns, name, generation=1):
    run = get_run(cp, ns, name)
    st = (run or {}).get("status") or {}
    return run if st.get("observedGeneration") == generation and condition(run, "Ready").get("status") == "True" \
        else None


def counts(cp, ns, name):
    return {k: len(v) for k, v in children_of(cp, ns, name).items()}


# --------------------------------------------------------------------------------------


def test_create_makes_children_with_owner_references(control_plane, operator, namespace):
    cp = control_plane
    status, body = create_run(cp, namespace, "alpha", {"algo": {"groupSize": 4}, "resources": {"gpus": 2}})
    assert status == 201, body
    run = wait_for(lambda: reconciled(cp, namespace, "alpha"), T, what="alpha reconciled\n" + operator.proc.tail())
    uid = run["metadata"]["uid"]
    kids = children_of(cp, namespace, "alpha")
    assert {k: len(v) for k, v in kids.items()} == EXPECTED
    for objs in kids.values():
        for o in objs:
            (ref,) = o["metadata"]["ownerReferences"]
            assert ref["uid"] == uid and ref["kind"] == "GPRLRun" and ref["controller"] is True
    (job,) = kids["jobs"]
    assert job["spec"]["completionMode"] == "Indexed"
    c = job["spec"]["template"]["spec"]["containers"][0]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == "2"
    (cm,) = kids["configmaps"]
    assert yaml.safe_load(cm["data"]["config.yaml"])["algo"]["groupSize"] == 4
    # the run's server token: random, immutable, mounted into the learner; only the run's pods reach its pods
    (secret,) = kids["secrets"]
    assert secret["metadata"]["name"] == "alpha-server-token" and secret["immutable"] is True
    token = base64.b64decode(secret["data"]["token"]).decode()
    assert len(token) == 64 and int(token, 16) >= 0
    assert {"name": "server-token", "mountPath": "/etc/gprl-token", "readOnly": True} in c["volumeMounts"]
    (policy,) = kids["networkpolicies"]
    assert policy["spec"]["podSelector"]["matchLabels"] == {"gprl.dev/run": "alpha"}
    # a later reconcile (a spec change) keeps the token: it is created once, never overwritten
    assert patch_run(cp, namespace, "alpha", {"spec": {"suspend": True}})[0] == 200
    wait_for(lambda: reconciled(cp, namespace, "alpha", generation=2), T, what="alpha generation 2")
    (again,) = children_of(cp, namespace, "alpha")["secrets"]
    assert again["data"]["token"] == secret["data"]["token"]
    assert run["status"]["phase"] in ("Pending", "Running")
    assert run["status"]["jobName"] == "alpha"


def test_update_of_drift_settings_reaches_the_config_map(control_plane, operator, namespace):
    cp = control_plane
    assert create_run(cp, namespace, "beta", {"drift": {"tau": 0.05}})[0] == 201
    wait_for(lambda: reconciled(cp, namespace, "beta"), T, what="beta reconciled")
    # drift settings are restart-required (gprl.api.marks): refused on a live run, accepted once suspended
    status, body = patch_run(cp, namespace, "beta", {"spec": {"drift": {"tau": 0.25, "kappa": 2.0}}})
    assert status == 422 and "set spec.suspend: true first" in body["message"], body
    assert patch_run(cp, namespace, "beta", {"spec": {"suspend": True}})[0] == 200
    status, body = patch_run(cp, namespace, "beta", {"spec": {"drift": {"tau": 0.25, "kappa": 2.0}}})
    assert status == 200, body

    def tau():
        cm = cp.request("GET", f"/api/v1/namespaces/{namespace}/configmaps/beta-config")
        return yaml.safe_load(cm["data"]["config.yaml"])["drift"]

    drift = wait_for(lambda: (lambda d: d if d["tau"] == 0.25 else None)(tau()), T, what="new tau in ConfigMap")
    assert drift["kappa"] == 2.0
    wait_for(lambda: reconciled(cp, namespace, "beta", generation=3), T, what="observedGeneration 3")
    assert counts(cp, namespace, "beta") == EXPECTED


def test_suspend_and_resume(control_plane, operator, namespace):
    cp = control_plane
    assert create_run(cp, namespace, "gamma", {})[0] == 201
    wait_for(lambda: reconciled(cp, namespace, "gamma"), T, what="gamma reconciled")
    job = lambda: cp.request("GET", f"/apis/batch/v1/namespaces/{namespace}/jobs/gamma")  # noqa: E731

    assert patch_run(cp, namespace, "gamma", {"spec": {"suspend": True}})[0] == 200
    wait_for(lambda: job()["spec"].get("suspend") is True, T, what="Job suspended")
    run = wait_for(lambda: (lambda r: r if r["status"].get("phase") == "Suspended" else None)(
        get_run(cp, namespace, "gamma")), T, what="phase Suspended")
    assert condition(run, "Suspended")["status"] == "True"

    assert patch_run(cp, namespace, "gamma", {"spec": {"suspend": False}})[0] == 200
    wait_for(lambda: job()["spec"].get("suspend") is False, T, what="Job resumed")
    run = wait_for(lambda: (lambda r: r if r["status"].get("phase") != "Suspended" else None)(
        get_run(cp, namespace, "gamma")), T, what="phase after resume")
    assert condition(run, "Suspended")["status"] == "False"
    assert counts(cp, namespace, "gamma") == EXPECTED


def test_delete_cleans_up(control_plane, operator, namespace):
    cp = control_plane
    assert create_run(cp, namespace, "delta", {})[0] == 201
    wait_for(lambda: reconciled(cp, namespace, "delta"), T, what="delta reconciled")
    assert cp.request_raw("DELETE", f"{RUNS}/namespaces/{namespace}/gprlruns/delta", token=cp.admin_token)[0] == 200
    wait_for(lambda: get_run(cp, namespace, "delta") is None, T, what="run deleted")
    wait_for(lambda: not any(counts(cp, namespace, "delta").values()), 2 * T,
             what="children garbage-collected: " + str(counts(cp, namespace, "delta")))


def test_restart_mid_reconcile_creates_no_duplicates(control_plane, operator, namespace):
    cp = control_plane
    names = [f"r{i}" for i in range(8)]
    for n in names:
        assert create_run(cp, namespace, n, {})[0] == 201
    # kill -9 as soon as the first child exists: some runs are half done, some untouched
    wait_for(lambda: cp.request("GET", f"/api/v1/namespaces/{namespace}/configmaps?labelSelector=gprl.dev%2Frun")
             ["items"], T, interval=0.02, what="first child")
    operator.proc.kill()
    half = {n: counts(cp, namespace, n) for n in names}
    operator.start()
    for n in names:
        wait_for(lambda: reconciled(cp, namespace, n), T, what=f"{n} reconciled after restart")
    for n in names:
        assert counts(cp, namespace, n) == EXPECTED, (n, half[n])
    # a third start (resume of everything) is a no-op too
    operator.proc.stop()
    operator.start()
    time.sleep(3)
    for n in names:
        assert counts(cp, namespace, n) == EXPECTED


def test_operator_rbac_is_least_privilege(control_plane, operator, namespace):
    cp = control_plane
    token = cp.service_account_token(OPERATOR_NS, OPERATOR_SA, create=False)
    assert cp.request_raw("GET", f"/api/v1/namespaces/{namespace}/secrets", token=token)[0] == 403
    assert cp.request_raw("DELETE", f"/apis/batch/v1/namespaces/{namespace}/jobs/x", token=token)[0] == 403
    # it watches its children (to repair them) but creates no pods itself, reads no Secrets, deletes nothing
    assert cp.request_raw("POST", f"/api/v1/namespaces/{namespace}/pods", {"apiVersion": "v1", "kind": "Pod",
                          "metadata": {"name": "x"}, "spec": {"containers": [{"name": "c", "image": "x"}]}},
                          token=token)[0] == 403
    assert cp.request_raw("DELETE", f"/api/v1/namespaces/{namespace}/configmaps/x", token=token)[0] == 403


def test_trainer_service_account_can_only_touch_its_own_run(control_plane, operator, namespace):
    cp = control_plane
    for n in ("own", "other"):
        assert create_run(cp, namespace, n, {})[0] == 201
    for n in ("own", "other"):
        wait_for(lambda: reconciled(cp, namespace, n), T, what=f"{n} reconciled")
    token = cp.service_account_token(namespace, "own-trainer", create=False)
    base = f"{RUNS}/namespaces/{namespace}/gprlruns"
    merge = "application/merge-patch+json"
    assert cp.request_raw("GET", f"{base}/own", token=token)[0] == 200
    st, body = cp.request_raw("PATCH", f"{base}/own/status", {"status": {"step": 3, "training": {"loss": 0.5}}},
                              token=token, content_type=merge)
    assert st == 200 and body["status"]["step"] == 3, body
    assert cp.request_raw("PATCH", f"{base}/other/status", {"status": {"step": 3}}, token=token,
                          content_type=merge)[0] == 403
    assert cp.request_raw("GET", f"{base}/other", token=token)[0] == 403
    assert cp.request_raw("PATCH", f"{base}/own", {"spec": {"seed": 1}}, token=token, content_type=merge)[0] == 403
    assert cp.request_raw("GET", f"/api/v1/namespaces/{namespace}/secrets", token=token)[0] == 403
    # the operator's status writes did not clobber what the job reported
    run = wait_for(lambda: reconciled(cp, namespace, "own"), T)
    assert run["status"]["step"] == 3


def test_two_replicas_peer_and_do_not_fight(control_plane, operator, namespace):
    """kopf peering: replicas start paused; only the highest priority one resumes. The standby takes over when the
    active one leaves."""
    cp = control_plane
    second = OperatorProcess(operator.kubeconfig, operator.logdir, name="operator-standby", priority=50).start()
    try:
        def peers():
            p = cp.request("GET", "/apis/kopf.dev/v1/clusterkopfpeerings/gprl-operator")
            return len((p.get("status") or {})) >= 2

        wait_for(peers, T, what="both replicas in the ClusterKopfPeering")
        for n in ("p1", "p2", "p3"):
            assert create_run(cp, namespace, n, {})[0] == 201
        for n in ("p1", "p2", "p3"):
            wait_for(lambda: reconciled(cp, namespace, n), T, what=f"{n} reconciled")
            assert counts(cp, namespace, n) == EXPECTED
        assert second.metric("gprl_operator_reconcile_total") == 0, "the standby replica reconciled runs"
        assert "Resuming operations" not in second.log.read_text()

        # the active replica leaves (graceful: it removes itself from the peering) -> the standby takes over
        operator.proc.stop()
        wait_for(lambda: "Resuming operations" in second.log.read_text(), T,
                 what="standby resumed after the active replica left")
        assert create_run(cp, namespace, "p4", {})[0] == 201
        wait_for(lambda: reconciled(cp, namespace, "p4"), T, what="p4 reconciled by the former standby")
        assert counts(cp, namespace, "p4") == EXPECTED
        assert second.metric("gprl_operator_reconcile_total", handler="reconcile", result="ok") >= 1
    finally:
        second.stop()
        if operator.proc.proc.poll() is not None:
            operator.start()


def test_operator_metrics(control_plane, operator, namespace):
    cp = control_plane
    assert create_run(cp, namespace, "metered", {})[0] == 201
    wait_for(lambda: reconciled(cp, namespace, "metered"), T)
    op = operator.proc
    assert op.metric("gprl_operator_reconcile_total", handler="reconcile", result="ok") >= 1
    assert op.metric("gprl_operator_reconcile_duration_seconds_count", handler="reconcile") >= 1
    assert op.metric("gprl_operator_api_requests_total", client="operator", verb="PATCH") >= 8
    assert op.metric("gprl_operator_api_requests_total", client="kopf") >= 1
    assert "gprl_operator_reconcile_errors_total" in op.metrics_text()


# --------------------------------------------------------------------------------------
# with kwok + kube-controller-manager + kube-scheduler: real Jobs, Pods on fake GPU nodes


@pytest.fixture(scope="module")
def staged_nodes(control_plane, tmp_path_factory):
    kw = StagedKwok(control_plane, tmp_path_factory.mktemp("kwok-staged"), run_ms=5000).start()
    try:
        for i in range(2):
            kw.add_node(f"staged-gpu-{i}", gpus=8)
        yield kw
    finally:
        kw.stop()


def bound_claim(cp, ns: str, name: str) -> None:
    pv = {"apiVersion": "v1", "kind": "PersistentVolume", "metadata": {"name": f"{ns}-{name}"},
          "spec": {"capacity": {"storage": "10Gi"}, "accessModes": ["ReadWriteMany"], "storageClassName": "",
                   "persistentVolumeReclaimPolicy": "Delete", "hostPath": {"path": f"/tmp/gprl-pv/{ns}/{name}"},
                   "claimRef": {"namespace": ns, "name": name}}}
    cp.apply(pv)
    # labelled shareable: a checkpointClaim the run did not create must be (the operator refuses others)
    cp.apply({"apiVersion": "v1", "kind": "PersistentVolumeClaim",
              "metadata": {"name": name, "namespace": ns, "labels": {"gprl.dev/shareable": "true"}},
              "spec": {"accessModes": ["ReadWriteMany"], "storageClassName": "", "volumeName": f"{ns}-{name}",
                       "resources": {"requests": {"storage": "10Gi"}}}})
    wait_for(lambda: cp.request("GET", f"/api/v1/namespaces/{ns}/persistentvolumeclaims/{name}")["status"]
             .get("phase") == "Bound", T, what="PVC bound")


def staged_spec(**resources):
    k, v = STAGED_NODE_LABEL
    return {"resources": {"learnerReplicas": 2, "gpus": 4, "cpu": "2", "memory": "4Gi", "checkpointClaim": "ckpt",
                          "nodeSelector": {k: v}, **resources}}


def phase_history(cp, ns, name, until: set, timeout: float) -> list[str]:
    seen: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        run = get_run(cp, ns, name)
        phase = ((run or {}).get("status") or {}).get("phase")
        if phase and (not seen or seen[-1] != phase):
            seen.append(phase)
        if phase in until:
            return seen
        time.sleep(0.1)
    raise AssertionError(f"{name}: phases {seen}, never reached {until}")


def test_job_pods_run_on_fake_gpu_nodes_and_succeed(control_plane, operator, staged_nodes, namespace):
    cp = control_plane
    bound_claim(cp, namespace, "ckpt")
    assert create_run(cp, namespace, "train", staged_spec())[0] == 201
    phases = phase_history(cp, namespace, "train", {"Succeeded", "Failed"}, 2 * T)
    assert phases[-1] == "Succeeded", phases
    assert "Running" in phases, phases
    pods = cp.request("GET", f"/api/v1/namespaces/{namespace}/pods?labelSelector=gprl.dev%2Frun%3Dtrain")["items"]
    assert len(pods) == 2
    assert {p["spec"]["nodeName"] for p in pods} <= {"staged-gpu-0", "staged-gpu-1"}
    assert {p["metadata"]["annotations"]["batch.kubernetes.io/job-completion-index"] for p in pods} == {"0", "1"}
    run = get_run(cp, namespace, "train")
    assert condition(run, "Succeeded")["status"] == "True"
    assert condition(run, "Running")["status"] == "False"
    assert run["status"]["succeededPods"] == 2


def test_failed_pod_shows_in_conditions(control_plane, operator, staged_nodes, namespace):
    cp = control_plane
    bound_claim(cp, namespace, "ckpt")
    spec = staged_spec(image=FAIL_IMAGE, learnerReplicas=1, backoffLimit=0)
    assert create_run(cp, namespace, "crash", spec)[0] == 201
    phases = phase_history(cp, namespace, "crash", {"Succeeded", "Failed"}, 2 * T)
    assert phases[-1] == "Failed", phases
    run = wait_for(lambda: (lambda r: r if condition(r, "PodFailed").get("status") == "True" else None)(
        get_run(cp, namespace, "crash")), T, what="PodFailed condition")
    pf = condition(run, "PodFailed")
    assert pf["reason"] == "Error" and "exited with code 1" in pf["message"], pf
    assert "illegal memory access" in pf["message"]
    failed = condition(run, "Failed")
    assert failed["status"] == "True" and failed["reason"] == "BackoffLimitExceeded", failed


def test_disaggregated_run_is_accepted_and_its_pod_graph_comes_up(control_plane, operator, staged_nodes, namespace):
    """Rollout servers (a StatefulSet of 2 behind a headless Service), GPM servers (a Deployment behind a Service)
    and the learner Job: accepted by the server, owned by the run, their pods scheduled and running on the fake GPU
    nodes (kwok) under stable names that the rendered config lists one by one; the learner Job then completes."""
    cp = control_plane
    bound_claim(cp, namespace, "ckpt")
    spec = staged_spec(topology="disaggregated", rolloutReplicas=2, gpmReplicas=1, learnerReplicas=1)
    assert create_run(cp, namespace, "disagg", spec)[0] == 201
    uid = wait_for(lambda: get_run(cp, namespace, "disagg"), T, what="run")["metadata"]["uid"]

    def workload(plural, name):
        status, body = cp.request_raw("GET", f"/apis/apps/v1/namespaces/{namespace}/{plural}/{name}",
                                      token=cp.admin_token)
        return body if status == 200 else {}

    def pods():
        items = cp.request("GET", f"/api/v1/namespaces/{namespace}/pods")["items"]
        return [(p["metadata"]["name"], p["spec"].get("nodeName"), p["status"].get("phase")) for p in items]

    for plural, name, replicas in (("statefulsets", "disagg-rollout", 2), ("deployments", "disagg-gpm", 1)):
        try:
            obj = wait_for(lambda: (lambda d: d if (d.get("status") or {}).get("readyReplicas") == replicas else None)(
                workload(plural, name)), 2 * T, what=f"{name} ready")
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{plural}: {workload(plural, name)}\npods: {pods()}\n{operator.proc.tail()}")
        (ref,) = obj["metadata"]["ownerReferences"]
        assert ref["uid"] == uid and ref["controller"] is True
        svc = cp.request("GET", f"/api/v1/namespaces/{namespace}/services/{name}")
        assert svc["spec"]["selector"] == obj["spec"]["selector"]["matchLabels"]
        (ref,) = svc["metadata"]["ownerReferences"]
        assert ref["uid"] == uid
        if plural == "statefulsets":
            assert svc["spec"]["clusterIP"] == "None" and obj["spec"]["serviceName"] == name
    running = {n: node for n, node, phase in pods() if phase == "Running"}
    assert {"disagg-rollout-0", "disagg-rollout-1"} <= set(running), pods()
    assert all(running[f"disagg-rollout-{i}"] in ("staged-gpu-0", "staged-gpu-1") for i in range(2))
    phases = phase_history(cp, namespace, "disagg", {"Succeeded", "Failed"}, 2 * T)
    assert phases[-1] == "Succeeded", phases
    cfg = yaml.safe_load(cp.request("GET", f"/api/v1/namespaces/{namespace}/configmaps/disagg-config")["data"]["config.yaml"])
    # the learner is pointed at every rollout pod by its stable name, and at the GPM Service
    assert cfg["rollout"]["serverUrls"] == [f"http://disagg-rollout-{i}.disagg-rollout.{namespace}.svc:8000"
                                            for i in range(2)]
    assert cfg["gpm"]["serverUrl"] == f"http://disagg-gpm.{namespace}.svc:8001"
    # the rollout pods are the StatefulSet's and each one carries the hostname/subdomain that its DNS name needs
    for i in range(2):
        pod = cp.request("GET", f"/api/v1/namespaces/{namespace}/pods/disagg-rollout-{i}")
        assert pod["spec"]["hostname"] == f"disagg-rollout-{i}" and pod["spec"]["subdomain"] == "disagg-rollout"
        assert pod["metadata"]["ownerReferences"][0]["kind"] == "StatefulSet"
        # the server requires the run's token: its pod mounts the run's Secret and binds the pod's interfaces
        (vol,) = [v for v in pod["spec"]["volumes"] if v["name"] == "server-token"]
        assert vol["secret"]["secretName"] == "disagg-server-token"
        (c,) = pod["spec"]["containers"]
        assert {"name": "GPRL_SERVER_TOKEN_FILE", "value": "/etc/gprl-token/token"} in c["env"]
        assert "--host" in c["command"]
    (policy,) = children_of(cp, namespace, "disagg")["networkpolicies"]
    assert policy["metadata"]["ownerReferences"][0]["uid"] == uid


def test_a_pod_stopped_by_sigterm_is_replaced_without_using_the_backoff_limit(control_plane, operator,
                                                                              staged_nodes, namespace):
    """`gprl train --exit-code-on-stop 143` after a SIGTERM: the Job's podFailurePolicy ignores the exit, so the
    Job starts a replacement pod (which resumes from the checkpoint) and the run does not fail, even with
    backoffLimit 0. (Here every pod of the image exits 143, so replacements keep coming.)"""
    cp = control_plane
    bound_claim(cp, namespace, "ckpt")
    spec = staged_spec(image=STOPPED_IMAGE, learnerReplicas=1, backoffLimit=0, terminationGracePeriodSeconds=120)
    assert create_run(cp, namespace, "preempted", spec)[0] == 201
    path = f"/api/v1/namespaces/{namespace}/pods?labelSelector=gprl.dev%2Frun%3Dpreempted"
    pods = wait_for(lambda: (lambda p: p if len(p) >= 2 else None)(cp.request("GET", path)["items"]), 2 * T,
                    what="a replacement pod")
    assert pods[0]["spec"]["terminationGracePeriodSeconds"] == 120
    job = cp.request("GET", f"/apis/batch/v1/namespaces/{namespace}/jobs/preempted")
    assert not any(c["type"] == "Failed" and c["status"] == "True" for c in job["status"].get("conditions", []))
    assert (get_run(cp, namespace, "preempted").get("status") or {}).get("phase") != "Failed"
