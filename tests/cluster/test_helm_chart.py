"""The Helm chart with the real `helm` binary: lint, template, and the rendered manifests applied to the API server."""

from __future__ import annotations

import re
import subprocess

import pytest

from gprl_k8s_testlib import CHART, CLUSTER_SCOPED, OPERATOR_NS, OPERATOR_SA, ROOT, apply_docs, find_tool, helm_template

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
    # Secrets: each run's own server token, created and read back by name; never list/watch (no enumeration)
    assert {v for r in role["rules"] if "secrets" in r["resources"] for v in r["verbs"]} <= {"get", "create"}


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
        # the server writes the status of CRDs and admission policies (type checking) after each apply
        if a["kind"] not in ("CustomResourceDefinition", "ValidatingAdmissionPolicy"):
            assert before[(a["kind"], a["metadata"]["name"])] == a["metadata"]["resourceVersion"], a["kind"]
    peering = cp.request("GET", "/apis/kopf.dev/v1/clusterkopfpeerings/gprl-operator")
    assert peering["metadata"]["name"] == "gprl-operator"


# --- chart conventions (KubeRay, cert-manager): schema, helm test, NOTES, monitors, upgrades ---------------------

def _helm(helm, *args, check=True, env=None):
    out = subprocess.run([helm, *args], capture_output=True, text=True, timeout=180, env=env)
    if check:
        assert out.returncode == 0, out.stdout + out.stderr
    return out


@pytest.mark.parametrize("bad, field", [
    ("replicaCount=two", "replicaCount"),
    ("metrics.port=0", "port"),
    ("logLevel=loud", "logLevel"),
    ("watchNamespaces={Team_A}", "watchNamespaces"),
    ("image.pullPolicy=Sometimes", "pullPolicy"),
])
def test_values_schema_refuses_bad_values(helm, bad, field):
    out = _helm(helm, "template", "gprl", str(CHART), "--set", bad, check=False)
    assert out.returncode != 0 and "values don't meet the specifications of the schema" in out.stderr, out.stderr
    assert field in out.stderr, out.stderr


def test_values_schema_accepts_the_documented_settings(helm):
    docs = helm_template(helm, "--set", "replicaCount=2", "--set", "watchNamespaces={team-a}",
                         "--set", "metrics.serviceMonitor.enabled=true", "--set", "metrics.podMonitor.enabled=true",
                         "--set", "prometheusRule.enabled=true",
                         "--set", "prometheusRule.runbookBaseURL=https://runbooks.example/gprl/")
    (sm,) = [d for d in docs if d["kind"] == "ServiceMonitor"]
    assert sm["spec"]["endpoints"][0]["honorLabels"] is True
    (pm,) = [d for d in docs if d["kind"] == "PodMonitor"]
    assert pm["spec"]["namespaceSelector"] == {"matchNames": ["team-a"]}
    assert pm["spec"]["selector"]["matchLabels"] == {"app.kubernetes.io/managed-by": "gprl-operator"}
    assert pm["spec"]["podMetricsEndpoints"][0]["port"] == "metrics"
    (rule,) = [d for d in docs if d["kind"] == "PrometheusRule"]
    urls = [r["annotations"]["runbook_url"] for g in rule["spec"]["groups"] for r in g["rules"]]
    assert urls and all(u.startswith("https://runbooks.example/gprl/gprl") for u in urls)
    # default runbooks: the docs of the installed version
    (rule,) = [d for d in helm_template(helm, "--set", "prometheusRule.enabled=true") if d["kind"] == "PrometheusRule"]
    url = rule["spec"]["groups"][0]["rules"][0]["annotations"]["runbook_url"]
    assert "/blob/v0.1.0/docs/operations.md#" in url, url


def _cluster_scoped(docs: list[dict]) -> dict[tuple[str, str], dict]:
    # CRDs live in crds/: Helm installs them once and never takes them over, so releases share them by design
    return {(d["kind"], d["metadata"]["name"]): d for d in docs
            if d["kind"] in CLUSTER_SCOPED and d["kind"] != "CustomResourceDefinition"}


def test_two_releases_in_two_namespaces_do_not_collide(helm):
    """Release names are unique per namespace only: two teams' releases (same release name, each watching its own
    namespace) must not render a cluster-scoped object of the same name, or the second `helm install` fails (or,
    with --take-ownership, takes the first one's admission policies over)."""
    def release(ns: str, *extra: str) -> dict:
        return _cluster_scoped(helm_template(helm, "--set", f"watchNamespaces={{{ns}}}", *extra, namespace=f"{ns}-ops"))

    a, b = release("team-a"), release("team-b")
    # by default only the objects meant to be shared, each with its own switch, carry the same name
    assert set(a) & set(b) == {("ClusterKopfPeering", "gprl-operator"), ("ClusterRole", "gprl-edit"),
                               ("ClusterRole", "gprl-view")}
    b = release("team-b", "--set", "peering.name=gprl-team-b", "--set", "userRoles.create=false")
    assert not set(a) & set(b), sorted(set(a) & set(b))
    for ns, docs in (("team-a", a), ("team-b", b)):
        policies = {n for k, n in docs if k == "ValidatingAdmissionPolicy"}
        assert policies == {f"gprl-operator-{ns}-ops-runs", f"gprl-operator-{ns}-ops-trainer-status"}
        for (kind, name), d in docs.items():
            if kind == "ValidatingAdmissionPolicyBinding":
                assert d["spec"]["policyName"] in policies
                # each release's policies bind in the namespaces it serves only
                assert d["spec"]["matchResources"]["namespaceSelector"]["matchExpressions"][0]["values"] == [ns]
    # cluster-wide mode: the policies bind everywhere
    default = _cluster_scoped(helm_template(helm))
    bindings = [d for (k, _), d in default.items() if k == "ValidatingAdmissionPolicyBinding"]
    assert len(bindings) == 2 and not any("matchResources" in d["spec"] for d in bindings)


def test_update_strategy_keeps_one_operator(helm):
    (dep,) = [d for d in helm_template(helm) if d["kind"] == "Deployment"]
    assert dep["spec"]["replicas"] == 1
    assert dep["spec"]["strategy"] == {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 0, "maxUnavailable": 1}}


def test_helm_test_hook(helm, tmp_path):
    docs = [d for d in helm_template(helm, tests=True) if d["kind"] == "Pod"]
    (pod,) = docs
    ann = pod["metadata"]["annotations"]
    assert ann["helm.sh/hook"] == "test" and "hook-succeeded" in ann["helm.sh/hook-delete-policy"]
    c = pod["spec"]["containers"][0]
    assert c["image"] == "ghcr.io/gprl/operator:0.1.0" and c["securityContext"]["readOnlyRootFilesystem"] is True
    assert "gprl-operator-metrics.gprl-system.svc:8000/metrics" in c["args"][0]
    assert not [d for d in helm_template(helm, "--set", "metrics.enabled=false", tests=True) if d["kind"] == "Pod"]
    # The hook's own script, run as the pod would run it, against the operator's real metrics server on loopback (the
    # dev cluster runs no containers, so this is how its check is exercised here): it passes, and it fails against a
    # server that is up but is not the operator's.
    import socket
    import sys

    def free_port() -> int:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    def run_hook(server_code: str) -> subprocess.CompletedProcess:
        port = free_port()
        server = subprocess.Popen([sys.executable, "-c", server_code.format(port=port)])
        try:
            script = c["args"][0].replace("gprl-operator-metrics.gprl-system.svc:8000", f"127.0.0.1:{port}")
            return subprocess.run([sys.executable, *c["command"][1:], script], capture_output=True, text=True,
                                  timeout=120)
        finally:
            server.kill()
            server.wait()

    ok = run_hook("from gprl_operator import metrics; import time; metrics.serve({port}, '127.0.0.1'); time.sleep(120)")
    assert ok.returncode == 0 and ok.stdout.strip() == "ok", ok.stderr
    (tmp_path / "metrics").write_text("up 1\n")  # a metrics page, but another exporter's
    other = run_hook("import functools, http.server as h; h.HTTPServer(('127.0.0.1', {port}), functools.partial("
                     f"h.SimpleHTTPRequestHandler, directory={str(tmp_path)!r})).serve_forever()")
    assert other.returncode != 0 and "no gprl_operator_ metrics" in other.stderr, (other.stdout, other.stderr)


def test_notes_point_at_the_installed_version(control_plane, helm):
    import os

    env = {**os.environ, "KUBECONFIG": control_plane.kubeconfig}  # helm asks the server for its version
    # a second release: its own peering, no second copy of the user roles (the tests' release has them)
    out = _helm(helm, "install", "gprl-notes", str(CHART), "-n", OPERATOR_NS, "--dry-run=client",
                "--set", "peering.name=gprl-notes-test", "--set", "userRoles.create=false", env=env).stdout
    notes = out.split("NOTES:", 1)[1]
    assert "https://github.com/gprl/gprl/blob/v0.1.0/docs/quickstart-kubernetes.md" in notes
    assert "blob/v0.1.0/examples/gprlrun.yaml" in notes and "helm test gprl-notes" in notes
    assert "kubectl apply --server-side --force-conflicts -f" in notes  # the CRD upgrade step


def test_install_upgrade_keeps_scale_and_the_documented_crd_step_upgrades_it(control_plane, helm, namespace):
    """Real `helm install`/`upgrade` against the API server: an upgrade keeps a `kubectl scale`d replica count,
    Helm leaves an outdated CRD alone, and the documented pre-upgrade step (docs/operations.md) updates it."""
    import os

    import yaml

    cp = control_plane
    env = {**os.environ, "KUBECONFIG": cp.kubeconfig}
    kubectl = find_tool(cp, "kubectl")
    release = "gprl-up"
    # a second release beside the tests' one: its cluster-scoped objects have names of their own (no
    # --take-ownership: a collision fails the install), given its own peering and no second copy of the user roles
    common = [str(CHART), "-n", namespace, "--set", "peering.name=gprl-up-test", "--set", "dashboards.enabled=false",
              "--set", "userRoles.create=false"]
    _helm(helm, "install", release, *common, env=env)
    dep = f"/apis/apps/v1/namespaces/{namespace}/deployments/{release}-operator"
    assert cp.request("GET", dep)["spec"]["replicas"] == 1
    cp.request("PATCH", f"{dep}/scale", {"spec": {"replicas": 2}}, content_type="application/merge-patch+json")
    _helm(helm, "upgrade", release, *common, env=env)
    assert cp.request("GET", dep)["spec"]["replicas"] == 2  # the live count survived the upgrade
    _helm(helm, "upgrade", release, *common, "--set", "replicaCount=3", env=env)
    assert cp.request("GET", dep)["spec"]["replicas"] == 3  # an explicit value wins

    # an older CRD in the cluster (a printer column fewer): helm upgrade does not touch it ...
    crd_path = "/apis/apiextensions.k8s.io/v1/customresourcedefinitions/gprlruns.gprl.dev"
    old = yaml.safe_load((CHART / "crds" / "gprlrun.yaml").read_text())
    old["spec"]["versions"][0]["additionalPrinterColumns"] = old["spec"]["versions"][0]["additionalPrinterColumns"][:1]
    cp.apply(old, "older-chart")
    cols = lambda: len(cp.request("GET", crd_path)["spec"]["versions"][0]["additionalPrinterColumns"])  # noqa: E731
    assert cols() == 1
    _helm(helm, "upgrade", release, *common, env=env)
    assert cols() == 1
    # ... the documented step does
    step = re.search(r"^(kubectl apply --server-side --force-conflicts -f charts/gprl/crds/)$",
                     (ROOT / "docs" / "operations.md").read_text(), flags=re.M)
    assert step, "docs/operations.md lost the CRD upgrade step"
    out = subprocess.run([kubectl, *step.group(1).split()[1:]], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert cols() == len(yaml.safe_load((CHART / "crds" / "gprlrun.yaml").read_text())
                         ["spec"]["versions"][0]["additionalPrinterColumns"])
    _helm(helm, "uninstall", release, "-n", namespace, env=env)
