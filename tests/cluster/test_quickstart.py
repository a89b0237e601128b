"""docs/quickstart-kubernetes.md on the dev cluster, with the real kubectl, helm and `gprl operator`: the example run
reaches `Succeeded`, its checkpoint claim is bound by the dev cluster's provisioner, and `kubectl get gprlruns`
prints what the docs show."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys

import pytest

from gprl.devcluster.storage import STORAGE_CLASS, DevProvisioner
from gprl_k8s_testlib import OPERATOR_NS, ROOT, find_tool, free_port, wait_for

pytestmark = pytest.mark.cluster
DOC = ROOT / "docs" / "quickstart-kubernetes.md"


def cells(listing: str) -> list[list[str]]:
    """A kubectl table as rows of cells, cut at the header's column starts: an empty cell stays in its column."""
    header, *rows = listing.strip("\n").splitlines()
    starts = [m.start() for m in re.finditer(r"\S+", header)]
    cut = lambda ln: [ln[a:b].strip() for a, b in zip(starts, starts[1:] + [None])]  # noqa: E731
    return [cut(header)] + [cut(ln) for ln in rows]


def documented_listing() -> list[list[str]]:
    """The `kubectl get gprlruns` sample of the quick start: the rows of the ```text block after it (cells)."""
    text = DOC.read_text()
    block = re.search(r"kubectl get gprlruns.*?```text\n(.*?)```", text, flags=re.S)
    assert block, "the quick start lost its `kubectl get gprlruns` sample output"
    return cells(block.group(1))


@pytest.fixture
def dev_storage(control_plane):
    prov = DevProvisioner(control_plane).start()
    yield prov
    prov.stop()
    control_plane.request_raw("DELETE", f"/apis/storage.k8s.io/v1/storageclasses/{STORAGE_CLASS}",
                              token=control_plane.admin_token)


def test_quickstart_reaches_succeeded(control_plane, namespace, dev_storage, tmp_path):
    cp = control_plane
    kubectl, helm = find_tool(cp, "kubectl"), find_tool(cp, "helm")
    assert kubectl and helm, "kubectl/helm missing: scripts/install-k8s-tools.sh"
    env = {**os.environ, "KUBECONFIG": cp.kubeconfig,
           "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "operator"), os.environ.get("PYTHONPATH", "")])}

    def sh(cmd: str, **kw) -> str:
        r = subprocess.run(cmd, shell=True, env=env, cwd=ROOT, capture_output=True, text=True, timeout=120, **kw)
        assert r.returncode == 0, f"{cmd}\n{r.stdout}\n{r.stderr}"
        return r.stdout

    # 2. install the CRD and the chart's objects; the Deployment scaled to 0, the operator as a local process
    cp.ensure_namespace(OPERATOR_NS)
    sh(f"{kubectl} apply --server-side --force-conflicts -f charts/gprl/crds/")
    sh(f"{kubectl} wait --for condition=established crd/gprlruns.gprl.dev crd/clusterkopfpeerings.kopf.dev")
    sh(f"{helm} template gprl charts/gprl -n {OPERATOR_NS} --skip-tests | "
       f"{kubectl} apply --server-side --force-conflicts -f -")
    sh(f"{kubectl} -n {OPERATOR_NS} scale deploy/gprl-operator --replicas=0")
    sh(f"{kubectl} get crd gprlruns.gprl.dev")
    health = free_port()
    log = open(tmp_path / "operator.log", "wb")
    op = subprocess.Popen([sys.executable, "-m", "gprl.cli", "operator", "--standalone", "--bind", "127.0.0.1",
                           "--metrics-port", str(free_port()), "--health-port", str(health)],
                          env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        import urllib.request

        def healthy():
            assert op.poll() is None, (tmp_path / "operator.log").read_text()
            try:
                return urllib.request.urlopen(f"http://127.0.0.1:{health}/healthz", timeout=2).status == 200
            except OSError:
                return False

        wait_for(healthy, 60, 0.5, what="gprl operator /healthz")

        # 3. start the example run and wait for it to finish
        sh(f"{kubectl} -n {namespace} apply -f examples/gprlrun.yaml")

        def phase():
            return sh(f"{kubectl} -n {namespace} get gr demo -o jsonpath={{.status.phase}}").strip()

        def drift():
            return sh(f"{kubectl} -n {namespace} get gr demo -o jsonpath={{.status.drift}}").strip()

        # the Job's fake pods succeed at once; the drift loop's first tick (status.drift) may come after that
        wait_for(lambda: phase() == "Succeeded" and drift() != "", 120, 1.0,
                 what=f"run demo Succeeded with status.drift (operator log {tmp_path / 'operator.log'})")
        pvc = sh(f"{kubectl} -n {namespace} get pvc -l gprl.dev/run=demo -o jsonpath={{.items[*].status.phase}}")
        assert pvc.split() == ["Bound"], pvc
        children = sh(f"{kubectl} -n {namespace} get jobs,pods,pvc,svc,cm -l gprl.dev/run=demo")
        assert "job.batch/demo" in children and "Completed" in children, children

        # the docs' sample output is what kubectl prints (AGE aside)
        got = cells(sh(f"{kubectl} -n {namespace} get gprlruns"))
        want = documented_listing()
        assert [r[:-1] for r in got] == [r[:-1] for r in want], f"kubectl printed {got}, the docs show {want}"
    finally:
        os.killpg(op.pid, signal.SIGTERM)
        try:
            op.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(op.pid, signal.SIGKILL)
            op.wait(5)
        log.close()
        subprocess.run([kubectl, "-n", namespace, "delete", "gr", "demo", "--wait=false"], env=env,
                       capture_output=True, timeout=60)


def test_dev_provisioner_binds_and_deletes(control_plane, namespace, dev_storage):
    """A claim of the default class gets a PV of its size; deleting the claim deletes the PV."""
    cp = control_plane
    claim = {"apiVersion": "v1", "kind": "PersistentVolumeClaim",
             "metadata": {"name": "data", "namespace": namespace},
             "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "7Gi"}}}}
    cp.request("POST", f"/api/v1/namespaces/{namespace}/persistentvolumeclaims", claim)
    path = f"/api/v1/namespaces/{namespace}/persistentvolumeclaims/data"
    wait_for(lambda: cp.request("GET", path)["status"].get("phase") == "Bound", 60, 0.5, what="claim Bound")
    got = cp.request("GET", path)
    assert got["spec"]["storageClassName"] == STORAGE_CLASS  # defaulted: the class is the default
    pv = cp.request("GET", f"/api/v1/persistentvolumes/{got['spec']['volumeName']}")
    assert pv["spec"]["capacity"]["storage"] == "7Gi"
    cp.request("DELETE", path)
    wait_for(lambda: cp.request_raw("GET", f"/api/v1/persistentvolumes/{pv['metadata']['name']}",
                                    token=cp.admin_token)[0] == 404, 60, 0.5, what="released PV deleted")
    assert not dev_storage.errors
