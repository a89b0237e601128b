"""The local control plane itself: API server, RBAC, Jobs -> Pods on a fake GPU node, ServiceAccount tokens."""

from __future__ import annotations

import os
import socket

import pytest

from gprl.devcluster import ControlPlane
from gprl_k8s_testlib import wait_for
from gprl.devcluster.controlplane import DEFAULT_K8S_VERSION

FAKE_GPU_NODE, GPUS_PER_NODE = "gpu-node-0", 8  # as created by the control_plane fixture (conftest.py)

pytestmark = pytest.mark.cluster


def test_api_server_answers(control_plane, k8s_api_client):
    from kubernetes import client

    version = control_plane.request("GET", "/version")
    assert version["gitVersion"].startswith("v1."), version
    if not os.environ.get("GPRL_K8S_BIN"):
        assert version["gitVersion"] == f"v{DEFAULT_K8S_VERSION}"
    assert control_plane.request_raw("GET", "/readyz")[0] == 200
    names = {ns.metadata.name for ns in client.CoreV1Api(k8s_api_client).list_namespace().items}
    assert {"default", "kube-system", "kube-node-lease"} <= names


def test_rbac_is_enforced(control_plane, namespace):
    cp = control_plane
    nobody = cp.unprivileged_token
    # authenticated, but no grants -> 403; no credentials at all -> anonymous -> 403 too
    status, body = cp.request_raw("GET", f"/api/v1/namespaces/{namespace}/pods", token=nobody)
    assert status == 403, body
    assert "gprl-nobody" in body["message"]
    assert cp.request_raw("GET", f"/api/v1/namespaces/{namespace}/pods")[0] == 403
    assert cp.request_raw("GET", "/api/v1/nodes", token="not-a-token")[0] == 401
    # a Role + RoleBinding grants exactly list/get of pods in that namespace
    cp.apply({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
              "metadata": {"name": "pod-reader", "namespace": namespace},
              "rules": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list"]}]})
    cp.apply({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
              "metadata": {"name": "pod-reader", "namespace": namespace},
              "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "pod-reader"},
              "subjects": [{"kind": "User", "name": "gprl-nobody", "apiGroup": "rbac.authorization.k8s.io"}]})
    wait_for(lambda: cp.request_raw("GET", f"/api/v1/namespaces/{namespace}/pods", token=nobody)[0] == 200,
             timeout=10, what="RoleBinding to take effect")
    assert cp.request_raw("GET", "/api/v1/namespaces/default/pods", token=nobody)[0] == 403
    status, _ = cp.request_raw("POST", f"/api/v1/namespaces/{namespace}/configmaps",
                               {"metadata": {"name": "x"}, "data": {}}, token=nobody)
    assert status == 403


def test_fake_node_has_gpus(control_plane):
    node = control_plane.request("GET", f"/api/v1/nodes/{FAKE_GPU_NODE}")
    assert node["status"]["allocatable"]["nvidia.com/gpu"] == str(GPUS_PER_NODE)
    assert node["status"]["capacity"]["nvidia.com/gpu"] == str(GPUS_PER_NODE)
    conds = {c["type"]: c["status"] for c in node["status"]["conditions"]}
    assert conds["Ready"] == "True"


def _gpu_job(name: str, gpus: int) -> dict:
    return {
        "apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": name},
        "spec": {"backoffLimit": 0, "template": {"spec": {
            "restartPolicy": "Never",
            "containers": [{"name": "train", "image": "example.invalid/trainer:latest",
                            "resources": {"limits": {"nvidia.com/gpu": str(gpus)}}}]}}},
    }


def test_job_runs_on_fake_gpu_node(control_plane, k8s_api_client, namespace):
    """Job -> Pod (controller-manager) -> scheduled on the GPU node (scheduler) -> Running -> Succeeded (kwok)."""
    from kubernetes import client, watch

    core, batch = client.CoreV1Api(k8s_api_client), client.BatchV1Api(k8s_api_client)
    rv = core.list_namespaced_pod(namespace).metadata.resource_version
    batch.create_namespaced_job(namespace, _gpu_job("train", 2))

    phases, node = [], None
    w = watch.Watch()
    for ev in w.stream(core.list_namespaced_pod, namespace, resource_version=rv, timeout_seconds=90):
        pod = ev["object"]
        node = pod.spec.node_name or node
        if not phases or phases[-1] != pod.status.phase:
            phases.append(pod.status.phase)
        if pod.status.phase in ("Succeeded", "Failed"):
            w.stop()
    assert node == FAKE_GPU_NODE
    assert phases[-1] == "Succeeded", phases
    assert "Running" in phases, phases
    assert phases.index("Running") < phases.index("Succeeded")

    def job_complete():
        job = batch.read_namespaced_job(namespace=namespace, name="train")
        return job if (job.status.succeeded or 0) == 1 and any(
            c.type == "Complete" and c.status == "True" for c in job.status.conditions or []) else None

    wait_for(job_complete, timeout=30, what="Job Complete")


def test_unsatisfiable_gpu_request_stays_pending(control_plane, k8s_api_client, namespace):
    from kubernetes import client

    core, batch = client.CoreV1Api(k8s_api_client), client.BatchV1Api(k8s_api_client)
    batch.create_namespaced_job(namespace, _gpu_job("too-big", GPUS_PER_NODE + 1))

    def unschedulable():
        for pod in core.list_namespaced_pod(namespace).items:
            for c in pod.status.conditions or []:
                if c.type == "PodScheduled" and c.status == "False" and c.reason == "Unschedulable":
                    return pod, c
        return None

    pod, cond = wait_for(unschedulable, timeout=60, what="PodScheduled=False/Unschedulable")
    assert "nvidia.com/gpu" in cond.message
    assert pod.status.phase == "Pending" and not pod.spec.node_name


def test_deleting_a_job_garbage_collects_its_pods(control_plane, k8s_api_client, namespace):
    from kubernetes import client

    core, batch = client.CoreV1Api(k8s_api_client), client.BatchV1Api(k8s_api_client)
    batch.create_namespaced_job(namespace, _gpu_job("gc-me", 1))
    wait_for(lambda: core.list_namespaced_pod(namespace).items, timeout=30, what="the Job's pod")
    batch.delete_namespaced_job("gc-me", namespace, propagation_policy="Background")
    wait_for(lambda: not core.list_namespaced_pod(namespace).items, timeout=60, what="pods garbage-collected")


def test_serviceaccount_token_request(control_plane, namespace):
    cp = control_plane
    token = cp.service_account_token(namespace, "gprl-operator", expiration_seconds=600)
    assert token.count(".") == 2  # a JWT
    who = cp.request("POST", "/apis/authentication.k8s.io/v1/selfsubjectreviews",
                     {"apiVersion": "authentication.k8s.io/v1", "kind": "SelfSubjectReview"}, token=token)
    assert who["status"]["userInfo"]["username"] == f"system:serviceaccount:{namespace}:gprl-operator"
    assert "system:serviceaccounts" in who["status"]["userInfo"]["groups"]
    review = cp.request("POST", "/apis/authentication.k8s.io/v1/tokenreviews",
                        {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview", "spec": {"token": token}})
    assert review["status"]["authenticated"] is True
    # the ServiceAccount has no grants yet
    assert cp.request_raw("GET", f"/api/v1/namespaces/{namespace}/pods", token=token)[0] == 403


def test_serviceaccount_kubeconfig_with_python_client(control_plane, namespace):
    from kubernetes import client, config
    from kubernetes.client.rest import ApiException

    cp = control_plane
    kc = cp.service_account_kubeconfig(namespace, "gprl-operator")
    cp.apply({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
              "metadata": {"name": "op-view", "namespace": namespace},
              "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "view"},
              "subjects": [{"kind": "ServiceAccount", "name": "gprl-operator", "namespace": namespace}]})
    api = config.new_client_from_config(config_file=kc)
    try:
        core = client.CoreV1Api(api)
        wait_for(lambda: core.list_namespaced_config_map(namespace) is not None, timeout=10, what="view access")
        with pytest.raises(ApiException) as e:
            core.create_namespaced_config_map(namespace, {"metadata": {"name": "nope"}})
        assert e.value.status == 403
        with pytest.raises(ApiException) as e:
            core.list_namespaced_config_map("kube-system")
        assert e.value.status == 403
    finally:
        api.close()


def test_start_stop_leaves_nothing_behind(control_plane):
    """A second, bare control plane (etcd + apiserver) beside the session one; stop() removes every trace."""
    with ControlPlane() as cp:
        pids, port, workdir = cp.pids(), cp.port, cp.workdir
        assert set(pids) == {"etcd", "kube-apiserver"}
        assert cp.request("GET", "/version")["gitVersion"].startswith("v1.")
    assert not workdir.exists()
    for name, pid in pids.items():
        alive = os.path.exists(f"/proc/{pid}") and "zombie" not in open(f"/proc/{pid}/status").read().lower()
        assert not alive, f"{name} (pid {pid}) still running"
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", port)) != 0, "apiserver port still open"
