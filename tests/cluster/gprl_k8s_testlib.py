"""Helpers of the operator / CRD / chart tests: install the chart, run the operator under the chart's
ServiceAccount, a kwok with scripted pod lifecycles. Used by tests/cluster/test_{crd,chart,operator}*.py and by
benchmarks/operator_scale.py."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from manifest_cases import with_sources  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
OPERATOR_SRC = ROOT / "operator"
CHART = ROOT / "charts" / "gprl"
CRD_NAME = "gprlruns.gprl.dev"
RUNS = "/apis/gprl.dev/v1alpha1"
RELEASE, OPERATOR_NS = "gprl", "gprl-system"
OPERATOR_SA = "gprl-operator"  # the chart's ServiceAccount for release "gprl" (fullname "<release>-operator")

if str(OPERATOR_SRC) not in sys.path:
    sys.path.insert(0, str(OPERATOR_SRC))


def wait_for(fn: Callable[[], Any], timeout: float = 60.0, interval: float = 0.25, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = fn()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}; last value: {last!r}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def find_tool(cp, name: str) -> Optional[str]:
    from gprl.devcluster.controlplane import find_bin_dir

    try:
        cand = Path(find_bin_dir()) / name
        if cand.exists():
            return str(cand)
    except Exception:
        pass
    return shutil.which(name)


# --------------------------------------------------------------------------------------
# objects


def run_manifest(name: str, spec: Optional[dict] = None, namespace: Optional[str] = None) -> dict:
    meta: dict[str, Any] = {"name": name}
    if namespace:
        meta["namespace"] = namespace
    return {"apiVersion": "gprl.dev/v1alpha1", "kind": "GPRLRun", "metadata": meta, "spec": with_sources(spec or {})}


def create_run(cp, namespace: str, name: str, spec: Optional[dict] = None, strict: bool = True) -> tuple[int, Any]:
    q = "?fieldValidation=Strict" if strict else ""
    return cp.request_raw("POST", f"{RUNS}/namespaces/{namespace}/gprlruns{q}", run_manifest(name, spec, namespace),
                          token=cp.admin_token)


def get_run(cp, namespace: str, name: str) -> Optional[dict]:
    status, body = cp.request_raw("GET", f"{RUNS}/namespaces/{namespace}/gprlruns/{name}", token=cp.admin_token)
    return body if status == 200 else None


def patch_run(cp, namespace: str, name: str, patch: dict) -> tuple[int, Any]:
    return cp.request_raw("PATCH", f"{RUNS}/namespaces/{namespace}/gprlruns/{name}?fieldValidation=Strict", patch,
                          token=cp.admin_token, content_type="application/merge-patch+json")


def condition(run: Optional[dict], ctype: str) -> dict:
    for c in ((run or {}).get("status") or {}).get("conditions") or []:
        if c.get("type") == ctype:
            return c
    return {}


CHILD_KINDS = {
    "configmaps": "/api/v1", "serviceaccounts": "/api/v1", "services": "/api/v1",
    "persistentvolumeclaims": "/api/v1", "roles": "/apis/rbac.authorization.k8s.io/v1",
    "rolebindings": "/apis/rbac.authorization.k8s.io/v1", "jobs": "/apis/batch/v1",
    "secrets": "/api/v1", "networkpolicies": "/apis/networking.k8s.io/v1",
}


def children_of(cp, namespace: str, run: str) -> dict[str, list[dict]]:
    out = {}
    for plural, base in CHILD_KINDS.items():
        body = cp.request("GET", f"{base}/namespaces/{namespace}/{plural}?labelSelector=gprl.dev%2Frun%3D{run}")
        out[plural] = body["items"]
    return out


def ensure_crd(cp) -> None:
    from gprl.crd import build_crd

    cp.apply(build_crd())
    wait_established(cp, CRD_NAME)


def wait_established(cp, name: str, timeout: float = 30) -> None:
    def ok():
        crd = cp.request("GET", f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{name}")
        conds = {c["type"]: c["status"] for c in (crd.get("status") or {}).get("conditions") or []}
        return conds.get("Established") == "True" and conds.get("NamesAccepted") == "True"

    wait_for(ok, timeout, what=f"CRD {name} Established")
    # discovery of a fresh group can lag the condition a little
    group = name.split(".", 1)[1]
    wait_for(lambda: cp.request_raw("GET", f"/apis/{group}", token=cp.admin_token)[0] == 200, timeout,
             what=f"discovery of {name}")


# --------------------------------------------------------------------------------------
# helm and the chart


def helm_template(helm: str, *extra: str, namespace: str = OPERATOR_NS, tests: bool = False) -> list[dict]:
    """The chart as `helm install` would create it; `tests=True` adds the `helm test` hook pod."""
    out = subprocess.run(
        [helm, "template", RELEASE, str(CHART), "--namespace", namespace, "--include-crds",
         *([] if tests else ["--skip-tests"]), *extra],
        check=True, capture_output=True, text=True, timeout=120,
    ).stdout
    return [d for d in yaml.safe_load_all(out) if d]


CLUSTER_SCOPED = ("CustomResourceDefinition", "Namespace", "ClusterRole", "ClusterRoleBinding", "ClusterKopfPeering",
                  "ValidatingAdmissionPolicy", "ValidatingAdmissionPolicyBinding")


def apply_docs(cp, docs: list[dict], field_manager: str = "helm-test") -> list[dict]:
    """Apply rendered manifests in dependency order (CRDs, namespaces first; peering objects after their CRD)."""
    order = {"CustomResourceDefinition": 0, "Namespace": 1, "ServiceAccount": 2, "ClusterRole": 3, "Role": 3,
             "ClusterRoleBinding": 4, "RoleBinding": 4}
    out = []
    for doc in sorted(docs, key=lambda d: order.get(d["kind"], 9)):
        if doc["kind"] not in CLUSTER_SCOPED:
            doc.setdefault("metadata", {}).setdefault("namespace", OPERATOR_NS)
        if doc["kind"] == "CustomResourceDefinition":
            out.append(cp.apply(doc, field_manager))
            wait_established(cp, doc["metadata"]["name"])
            continue
        out.append(cp.apply(doc, field_manager))
    return out


def install_chart(cp, helm: str, *extra: str) -> list[dict]:
    """`helm template` the chart and apply everything except the Deployment (the operator runs as a local
    process instead, under the chart's ServiceAccount token)."""
    cp.ensure_namespace(OPERATOR_NS)
    docs = [d for d in helm_template(helm, *extra) if d["kind"] != "Deployment"]
    return apply_docs(cp, docs)


# --------------------------------------------------------------------------------------
# the operator as a process


class OperatorProcess:
    """`python -m gprl_operator` under a given kubeconfig (the chart's ServiceAccount), logs in a file."""

    def __init__(self, kubeconfig: str, logdir: Path, name: str = "operator", standalone: bool = False,
                 priority: Optional[int] = None, namespaces: Optional[list[str]] = None,
                 extra_env: Optional[dict] = None):
        self.kubeconfig = kubeconfig
        self.log = Path(logdir) / f"{name}.log"
        self.metrics_port = free_port()
        self.health_port = free_port()
        self.standalone = standalone
        self.priority = priority
        self.namespaces = namespaces or []
        self.extra_env = extra_env or {}
        self.proc: Optional[subprocess.Popen] = None

    def start(self) -> "OperatorProcess":
        env = {k: v for k, v in os.environ.items() if not k.startswith("KUBERNETES_")}
        env.update({
            "KUBECONFIG": self.kubeconfig,
            "PYTHONPATH": os.pathsep.join([str(OPERATOR_SRC), str(ROOT), env.get("PYTHONPATH", "")]),
            "GPRL_OPERATOR_STANDALONE": "1" if self.standalone else "0",
            "PYTHONUNBUFFERED": "1",
            **self.extra_env,
        })
        if self.priority is not None:
            env["GPRL_OPERATOR_PRIORITY"] = str(self.priority)
        argv = [sys.executable, "-m", "gprl_operator", "--metrics-port", str(self.metrics_port),
                "--health-port", str(self.health_port), "--bind", "127.0.0.1"]
        for ns in self.namespaces:
            argv += ["--namespace", ns]
        self._fh = open(self.log, "ab")
        self.proc = subprocess.Popen(argv, env=env, stdout=self._fh, stderr=subprocess.STDOUT, cwd=str(ROOT),
                                     start_new_session=True)
        wait_for(self.healthy, 60, 0.3, what=f"operator health endpoint (log {self.log}):\n{self.tail()}")
        return self

    def healthy(self) -> bool:
        import urllib.request

        if self.proc is None or self.proc.poll() is not None:
            raise AssertionError(f"operator exited with {self.proc and self.proc.returncode}:\n{self.tail()}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.health_port}/healthz", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def metrics_text(self) -> str:
        import urllib.request

        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as r:
            return r.read().decode()

    def metric(self, name: str, **labels: str) -> float:
        total = 0.0
        for line in self.metrics_text().splitlines():
            if line.startswith("#") or not line.startswith(name):
                continue
            head, _, value = line.rpartition(" ")
            if head.split("{", 1)[0] != name:
                continue
            if all(f'{k}="{v}"' in head for k, v in labels.items()):
                total += float(value)
        return total

    def rss_mb(self) -> float:
        with open(f"/proc/{self.proc.pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        return 0.0

    def peak_rss_mb(self) -> float:
        with open(f"/proc/{self.proc.pid}/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
        return 0.0

    def tail(self, n: int = 60) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def errors_in_log(self) -> list[str]:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return [ln for ln in text.splitlines() if re.search(r"cannot [a-z]+ resource", ln)]

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)

    def stop(self) -> None:
        self.kill(signal.SIGTERM)
        if getattr(self, "_fh", None):
            self._fh.close()


# --------------------------------------------------------------------------------------
# a second kwok with scripted pod lifecycles: Job pods run for a while, then succeed (or fail for a marked image);
# server pods (StatefulSet, Deployment) stay Running

STAGED_NODE_ANNOTATION = ("gprl.dev/kwok-stages", "true")
STAGED_NODE_LABEL = ("gprl.dev/kwok-stages", "true")
FAIL_IMAGE = "gprl.test/trainer:fail"
STOPPED_IMAGE = "gprl.test/trainer:stopped"  # exits 143: stopped by SIGTERM after a checkpoint (gprl train)


def _stages(run_ms: int) -> str:
    ready = """
apiVersion: kwok.x-k8s.io/v1alpha1
kind: Stage
metadata:
  name: pod-ready
spec:
  resourceRef:
    apiGroup: v1
    kind: Pod
  selector:
    matchExpressions:
    - key: '.metadata.deletionTimestamp'
      operator: 'DoesNotExist'
    - key: '.status.podIP'
      operator: 'DoesNotExist'
  next:
    statusTemplate: |
      {{ $now := Now }}
      conditions:
      - lastTransitionTime: {{ $now | Quote }}
        status: "True"
        type: Initialized
      - lastTransitionTime: {{ $now | Quote }}
        status: "True"
        type: Ready
      - lastTransitionTime: {{ $now | Quote }}
        status: "True"
        type: ContainersReady
      containerStatuses:
      {{ range .spec.containers }}
      - image: {{ .image | Quote }}
        name: {{ .name | Quote }}
        ready: true
        restartCount: 0
        started: true
        state:
          running:
            startedAt: {{ $now | Quote }}
      {{ end }}
      hostIP: {{ NodeIPWith .spec.nodeName | Quote }}
      podIP: {{ PodIPWith .spec.nodeName ( or .spec.hostNetwork false ) ( or .metadata.uid "" ) ( or .metadata.name "" ) ( or .metadata.namespace "" ) | Quote }}
      phase: Running
      startTime: {{ $now | Quote }}
"""
    finish = """
apiVersion: kwok.x-k8s.io/v1alpha1
kind: Stage
metadata:
  name: pod-%(name)s
spec:
  resourceRef:
    apiGroup: v1
    kind: Pod
  selector:
    matchExpressions:
    - key: '.metadata.deletionTimestamp'
      operator: 'DoesNotExist'
    - key: '.status.phase'
      operator: 'In'
      values: ['Running']
    - key: '.spec.containers.[0].image'
      operator: '%(op)s'
      values: %(images)s
    - key: '.metadata.ownerReferences.[].kind'
      operator: 'In'
      values: ['Job']
  delay:
    durationMilliseconds: %(delay)d
  next:
    statusTemplate: |
      {{ $now := Now }}
      conditions:
      - lastTransitionTime: {{ $now | Quote }}
        status: "True"
        type: Initialized
      - lastTransitionTime: {{ $now | Quote }}
        status: "False"
        type: Ready
        reason: PodCompleted
      - lastTransitionTime: {{ $now | Quote }}
        status: "False"
        type: ContainersReady
        reason: PodCompleted
      containerStatuses:
      {{ range .spec.containers }}
      - image: {{ .image | Quote }}
        name: {{ .name | Quote }}
        ready: false
        restartCount: 0
        started: false
        state:
          terminated:
            exitCode: %(code)d
            finishedAt: {{ $now | Quote }}
            reason: %(reason)s
            message: %(message)s
            startedAt: {{ $now | Quote }}
      {{ end }}
      phase: %(phase)s
"""
    delete = """
apiVersion: kwok.x-k8s.io/v1alpha1
kind: Stage
metadata:
  name: pod-delete
spec:
  resourceRef:
    apiGroup: v1
    kind: Pod
  selector:
    matchExpressions:
    - key: '.metadata.deletionTimestamp'
      operator: 'Exists'
  next:
    finalizers:
      empty: true
    delete: true
"""
    ok = finish % dict(name="complete", op="NotIn", images=[FAIL_IMAGE, STOPPED_IMAGE], delay=run_ms, code=0,
                       reason="Completed", message='"training finished"', phase="Succeeded")
    bad = finish % dict(name="fail", op="In", images=[FAIL_IMAGE], delay=1000, code=1, reason="Error",
                        message='"CUDA error: an illegal memory access was encountered"', phase="Failed")
    stopped = finish % dict(name="stopped", op="In", images=[STOPPED_IMAGE], delay=1000, code=143, reason="Error",
                            message='"stopped by SIGTERM after step 7; checkpoint written"', phase="Failed")
    return "---".join([ready, ok, bad, stopped, delete])


class StagedKwok:
    """kwok managing only nodes annotated gprl.dev/kwok-stages=true, with our pod stages."""

    def __init__(self, cp, workdir: Path, run_ms: int = 4000):
        self.cp, self.workdir, self.run_ms = cp, Path(workdir), run_ms
        self.proc: Optional[subprocess.Popen] = None

    def start(self) -> "StagedKwok":
        kwok = find_tool(self.cp, "kwok")
        if not kwok:
            raise FileNotFoundError("kwok binary not found (scripts/install-k8s-tools.sh)")
        self.workdir.mkdir(parents=True, exist_ok=True)
        kc = self.cp.write_kubeconfig(str(self.workdir / "kwok-staged.kubeconfig"), "gprl-admin", self.cp.admin_token)
        # node stages: the kwok release's own (installed beside the binary by scripts/install-k8s-tools.sh)
        defaults = Path(kwok).parent / "kwok-stages.yaml"
        node_stages = [d for d in yaml.safe_load_all(defaults.read_text()) if d and d.get("kind") == "Stage"
                       and d["spec"]["resourceRef"]["kind"] == "Node"] if defaults.exists() else []
        if not node_stages:
            raise FileNotFoundError(f"no Node stages in {defaults} (scripts/install-k8s-tools.sh writes them)")
        cfg = self.workdir / "kwok-stages.yaml"
        cfg.write_text(yaml.safe_dump_all(node_stages) + "---" + _stages(self.run_ms))
        k, v = STAGED_NODE_ANNOTATION
        self.log = open(self.workdir / "kwok-staged.log", "ab")
        self.proc = subprocess.Popen(
            [kwok, f"--kubeconfig={kc}", f"--config={cfg}", "--manage-all-nodes=false",
             f"--manage-nodes-with-annotation-selector={k}={v}", "--cidr=10.245.0.0/16", "--node-ip=10.245.255.254",
             f"--server-address=127.0.0.1:{free_port()}"],
            stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        time.sleep(0.5)
        if self.proc.poll() is not None:
            raise RuntimeError((self.workdir / "kwok-staged.log").read_text())
        return self

    def add_node(self, name: str, gpus: int = 8) -> None:
        k, v = STAGED_NODE_ANNOTATION
        lk, lv = STAGED_NODE_LABEL
        res = {"cpu": "64", "memory": "512Gi", "pods": "110", "nvidia.com/gpu": str(gpus)}
        node = {"apiVersion": "v1", "kind": "Node",
                "metadata": {"name": name, "annotations": {k: v},
                             "labels": {"kubernetes.io/hostname": name, "type": "kwok", lk: lv,
                                        "nvidia.com/gpu.present": "true"}},
                "status": {"capacity": res, "allocatable": res}}
        status, out = self.cp.request_raw("POST", "/api/v1/nodes", node, token=self.cp.admin_token)
        assert status in (201, 409), out
        if "nvidia.com/gpu" not in (out.get("status") or {}).get("allocatable", {}):
            self.cp.request("PATCH", f"/api/v1/nodes/{name}/status", {"status": {"capacity": res, "allocatable": res}},
                            content_type="application/merge-patch+json")
        self.cp.wait_node_ready(name)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        if getattr(self, "log", None):
            self.log.close()
