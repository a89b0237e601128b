"""The Helm chart with the real `helm` binary: lint, template, and the rendered manifests applied to the API server."""

from __future__ import annotations

import subprocess

import pytest

from gprl_k8s_testlib import CHART, OPERATOR_NS, OPERATOR_SA, apply_docs, find_tool, helm_template

pytestmark = pytest.mark.cluster


@pytest.fixture(scope="module")
def helm(control_plane):
    path = find_tool(control_plane, "helm")
    if not path:
        pytest.fail("helm not found (scripts/install-k8s-tools.sh installs it)", pytrace=False)
    return path


def test_helm_lint(helm):
    out = subprocess.run([helm, "lint", "--strict", str(CHART)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "0 chart(s) failed" in out.stdout


def test_chart_crd_is_the_generated_one():
    from gprl.crd import render_yaml

    assert (CHART / "crds" / "gprlrun.yaml").read_text() == render_yaml()


def test_template_renders_hardened_operator(helm):
    docs = helm_template(helm)
    kinds = {(d["kind"], d["metadata"]["name"]) for d in docs}
    assert ("CustomResourceDefinition", "gprlruns.gprl.dev") in kinds
    assert ("CustomResourceDefinition", "clusterkopfpeerings.kopf.dev") in kinds
    assert ("ServiceAccount", OPERATOR_SA) in kinds
    assert ("ClusterKopfPeering", "gprl-operator") in kinds
    (dep,) = [d for d in docs if d["kind"] == "Deployment"]
    pod = dep["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == OPERATOR_SA
    assert pod["securityContext"]["runAsNonRoot"] is True
    (c,) = pod["containers"]
    sc = c["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert c["resources"]["limits"]["memory"] and c["resources"]["limits"]["cpu"]
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["GPRL_WATCH_NAMESPACES"] == ""
    (role,) = [d for d in docs if d["kind"] == "ClusterRole" and d["metadata"]["name"] == OPERATOR_SA]
    verbs = {v for r in role["rules"] for v in r["verbs"]}
    assert not verbs & {"*", "delete", "deletecollection", "escalate", "bind", "impersonate"}
    assert not any("secrets" in r["resources"] for r in role["rules"])


def test_template_namespaced_mode(helm):
    docs = helm_template(helm, "--set", "watchNamespaces={team-a,team-b}", "--set", "replicaCount=2")
    roles = [d for d in docs if d["kind"] == "Role"]
    assert sorted(r["metadata"]["namespace"] for r in roles) == ["team-a", "team-b"]
    assert not [d for d in docs if d["kind"] == "ClusterRole" and d["metadata"]["name"] == OPERATOR_SA]
    (dep,) = [d for d in docs if d["kind"] == "Deployment"]
    env = {e["name"]: e.get("value") for e in dep["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["GPRL_WATCH_NAMESPACES"] == "team-a,team-b" and dep["spec"]["replicas"] == 2


def test_rendered_chart_applies_to_the_api_server(control_plane, helm):
    cp = control_plane
    cp.ensure_namespace(OPERATOR_NS)
    docs = helm_template(helm, "--set", "metrics.serviceMonitor.enabled=false")
    applied = apply_docs(cp, docs)
    assert len(applied) == len(docs)
    dep = cp.request("GET", f"/apis/apps/v1/namespaces/{OPERATOR_NS}/deployments/{OPERATOR_SA}")
    assert dep["spec"]["template"]["spec"]["containers"][0]["securityContext"]["readOnlyRootFilesystem"] is True
    # the Deployment cannot run here (no image, no kubelet); remove it so that it does not linger
    cp.request_raw("DELETE", f"/apis/apps/v1/namespaces/{OPERATOR_NS}/deployments/{OPERATOR_SA}",
                   token=cp.admin_token)
    # applying the same rendering again changes nothing (server-side apply is idempotent)
    again = apply_docs(cp, [d for d in docs if d["kind"] != "Deployment"])
    before = {(a["kind"], a["metadata"]["name"]): a["metadata"]["resourceVersion"] for a in applied}
    for a in again:
        if a["kind"] not in ("CustomResourceDefinition",):
            assert before[(a["kind"], a["metadata"]["name"])] == a["metadata"]["resourceVersion"], a["kind"]
    peering = cp.request("GET", "/apis/kopf.dev/v1/clusterkopfpeerings/gprl-operator")
    assert peering["metadata"]["name"] == "gprl-operator"
