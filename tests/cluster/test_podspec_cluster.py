"""Pod overrides, model sources and Kueue against the real API server, with the operator running under the chart's
ServiceAccount: a run's overrides, model volume and hub initializer reach every role's pod template; disallowed
overrides are refused by the API server (CEL), with or without strict field validation; a Kueue-labelled run's Job
is created suspended with the label, shows `Queued`, and starts only when admitted.

Kueue itself is not run here: its controller needs its admission webhooks (a serving certificate and a webhook
configuration the test control plane would have to trust). The test plays Kueue's part of the contract instead:
it admits the Job by unsuspending it with its own field manager, as Kueue's job reconciler does, then makes the
operator reconcile again and checks that the operator keeps Kueue's value (docs/operator.md, "Kueue")."""

from __future__ import annotations

import pytest

from gprl_k8s_testlib import (
    OPERATOR_NS,
    OPERATOR_SA,
    OperatorProcess,
    condition,
    create_run,
    find_tool,
    get_run,
    install_chart,
    run_manifest,
    wait_for,
)

pytestmark = pytest.mark.cluster

T = 90
JOBS = "/apis/batch/v1/namespaces/{ns}/jobs/{name}"

OVERRIDES = {
    "all": {
        "labels": {"team": "nlp"},
        "annotations": {"example.com/owner": "alice"},
        "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "ml", "effect": "NoSchedule"}],
        "priorityClassName": "research",
        "imagePullSecrets": ["registry-cred"],
        "env": [{"name": "NCCL_DEBUG", "value": "WARN"}],
        "volumes": [{"name": "datasets", "persistentVolumeClaim": {"claimName": "shared-data", "readOnly": True}}],
        "volumeMounts": [{"name": "datasets", "mountPath": "/data", "readOnly": True}],
    },
    "learner": {"affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
        "nodeSelectorTerms": [{"matchExpressions": [{"key": "gpu", "operator": "Exists"}]}]}}}},
    "gpm": {"nodeSelector": {"pool": "scoring"}},
}


@pytest.fixture(scope="module")
def operator(control_plane, tmp_path_factory):
    helm = find_tool(control_plane, "helm")
    if not helm:
        pytest.fail("helm not found (scripts/install-k8s-tools.sh)", pytrace=False)
    install_chart(control_plane, helm)
    kubeconfig = control_plane.service_account_kubeconfig(OPERATOR_NS, OPERATOR_SA, create=False,
                                                          expiration_seconds=7200)
    proc = OperatorProcess(kubeconfig, tmp_path_factory.mktemp("podspec-operator"), name="operator",
                           priority=100).start()
    yield proc
    proc.stop()


def _get(cp, path):
    status, body = cp.request_raw("GET", path, token=cp.admin_token)
    return body if status == 200 else None


def _templates(cp, ns, run):
    """component -> pod template of the run's Job, rollout StatefulSet and GPM Deployment (once all exist)."""
    out = {}
    for comp, path in (("trainer", f"/apis/batch/v1/namespaces/{ns}/jobs/{run}"),
                       ("rollout", f"/apis/apps/v1/namespaces/{ns}/statefulsets/{run}-rollout"),
                       ("gpm", f"/apis/apps/v1/namespaces/{ns}/deployments/{run}-gpm")):
        obj = _get(cp, path)
        if obj is None:
            return None
        out[comp] = obj["spec"]["template"]
    return out


def test_model_sources_and_overrides_reach_every_role(control_plane, operator, namespace):
    cp = control_plane
    spec = {
        "model": {"policy": "hf://org/policy-8b", "reference": "pvc://models/sft-8b"},
        "gpm": {"path": "pvc://models/gpm-8b"},
        "resources": {"topology": "disaggregated", "gpus": 1, "pods": OVERRIDES,
                      "modelCache": {"hubTokenSecret": {"name": "hf-token"}}},
    }
    status, body = create_run(cp, namespace, "src", spec)
    assert status == 201, body
    tpl = wait_for(lambda: _templates(cp, namespace, "src"), T, what="the run's workloads\n" + operator.tail())
    for comp, t in tpl.items():
        pod, (c,) = t["spec"], t["spec"]["containers"]
        assert t["metadata"]["labels"]["team"] == "nlp" and t["metadata"]["labels"]["gprl.dev/run"] == "src"
        assert t["metadata"]["annotations"]["example.com/owner"] == "alice"
        assert {"key": "dedicated", "operator": "Equal", "value": "ml", "effect": "NoSchedule"} in pod["tolerations"]
        assert pod["priorityClassName"] == "research"
        assert pod["imagePullSecrets"] == [{"name": "registry-cred"}]
        assert {"name": "NCCL_DEBUG", "value": "WARN"} in c["env"]
        mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
        assert mounts["/data"]["readOnly"] is True
        # (a) the model volume, (b) the hub cache: both read-only in the main container
        assert mounts["/models/pvc/models"]["readOnly"] is True and mounts["/models/hub"]["readOnly"] is True
        (init,) = pod["initContainers"]
        assert init["command"][:4] == ["gprl", "fetch", "--dest", "/models/hub"] and "hf://org/policy-8b" in init["command"]
        assert {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf-token", "key": "token"}}} in init["env"]
        assert ("affinity" in pod) == (comp == "trainer")
        assert pod.get("nodeSelector", {}).get("pool") == ("scoring" if comp == "gpm" else None)
    cache = wait_for(lambda: _get(cp, f"/api/v1/namespaces/{namespace}/persistentvolumeclaims/src-models"), T,
                     what="the hub cache claim")
    assert cache["spec"]["accessModes"] == ["ReadWriteMany"]
    cm = _get(cp, f"/api/v1/namespaces/{namespace}/configmaps/src-config")
    assert "policy: /models/hub/models/org/policy-8b/main" in cm["data"]["config.yaml"]
    assert "path: /models/pvc/models/gpm-8b" in cm["data"]["config.yaml"]


@pytest.mark.parametrize("strict", [True, False], ids=["strict", "lenient"])
@pytest.mark.parametrize("resources,needle", [
    ({"pods": {"all": {"volumes": [{"name": "root", "hostPath": {"path": "/"}}]}}}, "hostPath"),
    ({"pods": {"all": {"volumes": [{"name": "s", "secret": {"secretName": "db"}}]}}}, "secret volumes"),
    ({"pods": {"learner": {"securityContext": {"privileged": True}}}}, "securityContext"),
    ({"pods": {"rollout": {"hostNetwork": True}}}, "hostNetwork"),
    ({"pods": {"all": {"env": [{"name": "P", "valueFrom": {"secretKeyRef": {"name": "db", "key": "pw"}}}]}}},
     "secretKeyRef"),
    ({"pods": {"all": {"env": [{"name": "GPRL_CONFIG", "value": "/tmp/x"}]}}}, "set by the operator"),
    ({"pods": {"gpm": {"priorityClassName": "system-cluster-critical"}}}, "system-"),
    ({"pods": {"all": {"labels": {"gprl.dev/run": "victim"}}}}, "operator's"),
    ({"pods": {"learner": {"volumeMounts": [{"name": "ghost", "mountPath": "/data"}]}}}, "names a volume"),
    ({"pods": {"all": {"volumes": [{"name": "v", "emptyDir": {}}],
                       "volumeMounts": [{"name": "v", "mountPath": "/etc/gprl"}]}}}, "collides"),
])
def test_disallowed_overrides_are_refused_by_the_api_server(control_plane, namespace, resources, needle, strict):
    from gprl_k8s_testlib import ensure_crd

    ensure_crd(control_plane)
    status, body = create_run(control_plane, namespace, "bad", {"resources": resources}, strict=strict)
    assert status == 422, (status, body)
    assert needle in body["message"], body["message"]


def test_malformed_sources_are_refused_by_the_api_server(control_plane, namespace):
    from gprl_k8s_testlib import ensure_crd

    ensure_crd(control_plane)
    for spec, needle in (({"model": {"policy": "hf://a/b/c"}}, "spec.model.policy"),
                         ({"gpm": {"path": "pvc://Bad_Claim/x"}}, "spec.gpm.path"),
                         ({"data": {"prompts": "pvc://data/../../etc/passwd"}}, "spec.data.prompts")):
        status, body = create_run(control_plane, namespace, "bad", spec)
        assert status == 422 and needle in body["message"], (status, body)


def test_kueue_run_waits_for_admission_and_the_operator_keeps_it(control_plane, operator, namespace):
    cp = control_plane
    manifest = run_manifest("queued", {"algo": {"groupSize": 4}}, namespace)
    manifest["metadata"]["labels"] = {"kueue.x-k8s.io/queue-name": "team-a"}
    status, body = cp.request_raw("POST", f"/apis/gprl.dev/v1alpha1/namespaces/{namespace}/gprlruns", manifest,
                                  token=cp.admin_token)
    assert status == 201, body
    job_path = JOBS.format(ns=namespace, name="queued")
    job = wait_for(lambda: _get(cp, job_path), T, what="the Job\n" + operator.tail())
    assert job["spec"]["suspend"] is True  # created suspended
    assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a"
    wait_for(lambda: ((get_run(cp, namespace, "queued") or {}).get("status") or {}).get("phase") == "Queued", T,
             what="phase Queued")
    assert condition(get_run(cp, namespace, "queued"), "Suspended")["reason"] == "QueuedByKueue"
    pods = f"/api/v1/namespaces/{namespace}/pods?labelSelector=gprl.dev%2Frun%3Dqueued"
    assert cp.request("GET", pods)["items"] == []  # nothing starts before admission

    # Kueue admits the workload: it unsuspends the Job (an update, under its own field manager)
    status, body = cp.request_raw("PATCH", job_path + "?fieldManager=kueue-admission", {"spec": {"suspend": False}},
                                  token=cp.admin_token, content_type="application/merge-patch+json")
    assert status == 200, body
    # the operator reconciles the run again and must keep Kueue's decision (spec fields can only change while
    # suspended now; a label change is an update kopf hands to the same reconcile handler)
    marker = f"reconciled {namespace}/queued "
    before = operator.log.read_text(errors="replace").count(marker)
    status, body = cp.request_raw("PATCH", f"/apis/gprl.dev/v1alpha1/namespaces/{namespace}/gprlruns/queued",
                                  {"metadata": {"labels": {"touched": "1"}}}, token=cp.admin_token,
                                  content_type="application/merge-patch+json")
    assert status == 200, body
    wait_for(lambda: operator.log.read_text(errors="replace").count(marker) > before, T,
             what="another reconcile\n" + operator.tail())
    assert _get(cp, job_path)["spec"]["suspend"] is False
    wait_for(lambda: ((get_run(cp, namespace, "queued") or {}).get("status") or {}).get("phase") != "Queued", T,
             what="the run leaves Queued")
    wait_for(lambda: cp.request("GET", pods)["items"], T, what="the admitted Job's pods")
    for _ in range(3):  # and it stays admitted through further reconciles
        assert _get(cp, job_path)["spec"]["suspend"] is False
