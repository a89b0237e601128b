"""A real, local Kubernetes control plane: etcd + kube-apiserver (+ kube-controller-manager, kube-scheduler, kwok).

No containers, no kubelet: kwok fakes the nodes (with ``nvidia.com/gpu`` capacity) and drives pod lifecycles
(Pending -> Running, and Job pods -> Succeeded). The binaries come from ``scripts/install-k8s-tools.sh`` and live
in ``${GPRL_CACHE:-~/.cache/gprl}/k8s/<version>/bin`` (override with ``GPRL_K8S_BIN``).

Standard library only (no ``kubernetes`` import): processes are started in their own process groups and stopped by
PID; every file lives in one temporary work directory that ``stop()`` removes.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gprl.devcluster.storage import STORAGE_CLASS, DevProvisioner

DEFAULT_K8S_VERSION = "1.36.3"
INSTALL_HINT = "run scripts/install-k8s-tools.sh (builds them into ~/.cache/gprl/k8s/<version>/bin, 10-25 min once)"
FAKE_NODE_ANNOTATION = ("kwok.x-k8s.io/node", "fake")
GPU_RESOURCE = "nvidia.com/gpu"


class BinariesMissing(FileNotFoundError):
    """The control-plane binaries are not installed."""


class ControlPlaneError(RuntimeError):
    """A component did not start or a request to the API server failed."""


class ApiError(ControlPlaneError):
    def __init__(self, status: int, body: Any, method: str, path: str):
        self.status, self.body = status, body
        msg = body.get("message") if isinstance(body, dict) else body
        super().__init__(f"{method} {path} -> HTTP {status}: {msg}")


# --- binaries ---------------------------------------------------------------------------------------------------

def cache_root() -> Path:
    return Path(os.environ.get("GPRL_CACHE") or Path.home() / ".cache" / "gprl")


def find_bin_dir() -> Path:
    """``GPRL_K8S_BIN``, else ``<cache>/k8s/<GPRL_K8S_VERSION or default>/bin``, else the newest
    ``<cache>/k8s/*/bin``."""
    env = os.environ.get("GPRL_K8S_BIN")
    if env:
        return Path(env)
    k8s = cache_root() / "k8s"
    preferred = k8s / os.environ.get("GPRL_K8S_VERSION", DEFAULT_K8S_VERSION) / "bin"
    if (preferred / "kube-apiserver").exists() or not k8s.is_dir():
        return preferred
    found = [d / "bin" for d in k8s.iterdir() if (d / "bin" / "kube-apiserver").exists()]

    def key(p: Path):
        return tuple(int(x) if x.isdigit() else 0 for x in p.parent.name.split("."))

    return max(found, key=key) if found else preferred


def require_binaries(names: list[str], bin_dir: Path | None = None) -> dict[str, str]:
    bin_dir = Path(bin_dir) if bin_dir else find_bin_dir()
    paths, missing = {}, []
    for n in names:
        p = bin_dir / n
        if p.exists() and os.access(p, os.X_OK):
            paths[n] = str(p)
        else:
            missing.append(n)
    if missing:
        raise BinariesMissing(f"missing {', '.join(missing)} in {bin_dir}: {INSTALL_HINT}")
    return paths


# --- small helpers ----------------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:  # pragma: no cover - runs in the child
    """Linux: the child gets SIGTERM when the process that started it dies (a SIGKILLed pytest leaves nothing)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:
        pass


def _openssl(*args: str, cwd: Path) -> None:
    r = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True)
    if r.returncode != 0:
        raise ControlPlaneError(f"openssl {' '.join(args)} failed: {r.stderr.strip()}")


def make_pki(d: Path) -> dict[str, Path]:
    """A CA, a serving certificate for 127.0.0.1/localhost and a service-account key pair (EC P-256, openssl CLI)."""
    if not shutil.which("openssl"):
        raise ControlPlaneError("the openssl command is needed to create the control plane's keys")
    d.mkdir(parents=True, exist_ok=True)
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    _openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.crt", "-days", "3650",
             "-subj", "/CN=gprl-dev-cluster-ca", "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign,digitalSignature", cwd=d)
    _openssl("req", *ec, "-keyout", "apiserver.key", "-out", "apiserver.csr", "-subj", "/CN=kube-apiserver", cwd=d)
    (d / "apiserver.ext").write_text(
        "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n"
        "extendedKeyUsage=serverAuth\n"
        "subjectAltName=IP:127.0.0.1,IP:10.0.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,"
        "DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local\n")
    _openssl("x509", "-req", "-in", "apiserver.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
             "-out", "apiserver.crt", "-days", "3650", "-extfile", "apiserver.ext", cwd=d)
    _openssl("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", "sa.key", cwd=d)
    _openssl("ec", "-in", "sa.key", "-pubout", "-out", "sa.pub", cwd=d)
    return {k: d / f for k, f in [("ca", "ca.crt"), ("cert", "apiserver.crt"), ("key", "apiserver.key"),
                                   ("sa_key", "sa.key"), ("sa_pub", "sa.pub")]}


def kubeconfig_text(server: str, ca_file: str, user: str, token: str, context: str = "gprl-dev") -> str:
    q = json.dumps  # JSON strings are valid YAML scalars
    return (
        "apiVersion: v1\nkind: Config\n"
        f"clusters:\n- name: {context}\n  cluster:\n    server: {q(server)}\n    certificate-authority: {q(ca_file)}\n"
        f"users:\n- name: {q(user)}\n  user:\n    token: {q(token)}\n"
        f"contexts:\n- name: {context}\n  context:\n    cluster: {context}\n    user: {q(user)}\n"
        "    namespace: default\n"
        f"current-context: {context}\n"
    )


@dataclass
class _Proc:
    name: str
    popen: subprocess.Popen
    log: Path
    log_handle: Any = field(repr=False, default=None)

    def tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""


# --- the control plane ------------------------------------------------------------------------------------------

class ControlPlane:
    """etcd + kube-apiserver, and optionally kube-controller-manager, kube-scheduler and kwok.

    >>> with ControlPlane(controller_manager=True, scheduler=True, kwok=True) as cp:
    ...     cp.create_fake_node("gpu-node-0", gpus=8)
    ...     print(cp.kubeconfig)
    """

    def __init__(self, workdir: str | os.PathLike | None = None, *, controller_manager: bool = False,
                 scheduler: bool | None = None, kwok: bool = False, bin_dir: str | os.PathLike | None = None,
                 startup_timeout: float = 120.0, keep_workdir: bool = False, verbosity: int = 0,
                 die_with_parent: bool = True):
        self.with_controller_manager = controller_manager
        self.with_scheduler = (controller_manager or kwok) if scheduler is None else scheduler
        self.with_kwok = kwok
        self.startup_timeout = startup_timeout
        self.verbosity = verbosity
        # Linux PR_SET_PDEATHSIG: the children get SIGTERM when the *thread* that started them ends, so pass False
        # when starting from a short-lived worker thread.
        self.die_with_parent = die_with_parent and sys.platform.startswith("linux")
        names = ["etcd", "kube-apiserver"]
        names += ["kube-controller-manager"] if controller_manager else []
        names += ["kube-scheduler"] if self.with_scheduler else []
        names += ["kwok"] if kwok else []
        self.bin_dir = Path(bin_dir) if bin_dir else find_bin_dir()
        self.bins = require_binaries(names, self.bin_dir)
        self.kwok_stages = self.bin_dir / "kwok-stages.yaml"
        if kwok and not self.kwok_stages.exists():
            raise BinariesMissing(f"missing {self.kwok_stages} (kwok's default stages): {INSTALL_HINT}")
        self._own_workdir = workdir is None
        self._keep_workdir = keep_workdir
        self._workdir_arg = workdir
        self.workdir: Path | None = None
        self.procs: list[_Proc] = []
        self.admin_token = secrets.token_hex(24)
        self.unprivileged_token = secrets.token_hex(24)  # authenticates as user "gprl-nobody", no RBAC grants
        self.etcd_port = self.port = 0
        self.server = ""
        self.kubeconfig = ""
        self.ca_file = ""
        self._ssl: ssl.SSLContext | None = None

    # -- lifecycle --
    def __enter__(self) -> "ControlPlane":
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> "ControlPlane":
        if self._own_workdir:
            self.workdir = Path(tempfile.mkdtemp(prefix="gprl-cp-"))
        else:
            self.workdir = Path(self._workdir_arg).resolve()
            self.workdir.mkdir(parents=True, exist_ok=True)
        (self.workdir / "logs").mkdir(exist_ok=True)
        try:
            self._start_etcd()
            self._start_apiserver()
            if self.with_controller_manager:
                self._start_controller_manager()
            if self.with_scheduler:
                self._start_scheduler()
            if self.with_kwok:
                self._start_kwok()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop every process by its process group (reverse start order), then remove the work directory."""
        for p in reversed(self.procs):
            self._terminate(p)
        self.procs.clear()
        if self.workdir and self._own_workdir and not self._keep_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    @staticmethod
    def _terminate(p: _Proc, grace: float = 10.0) -> None:
        pg = p.popen.pid
        if p.popen.poll() is None:
            try:
                os.killpg(pg, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                p.popen.wait(grace)
            except subprocess.TimeoutExpired:
                pass
        try:  # the group may hold children even after the leader exited
            os.killpg(pg, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            p.popen.wait(5)
        except subprocess.TimeoutExpired:
            pass
        if p.log_handle:
            p.log_handle.close()

    def pids(self) -> dict[str, int]:
        return {p.name: p.popen.pid for p in self.procs}

    def _spawn(self, name: str, argv: list[str]) -> _Proc:
        assert self.workdir is not None
        log = self.workdir / "logs" / f"{name}.log"
        fh = open(log, "ab")
        popen = subprocess.Popen(argv, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                 cwd=self.workdir, start_new_session=True,
                                 preexec_fn=_die_with_parent if self.die_with_parent else None)
        p = _Proc(name, popen, log, fh)
        self.procs.append(p)
        return p

    def _wait(self, p: _Proc, ready, what: str, timeout: float | None = None) -> None:
        deadline = time.monotonic() + (timeout or self.startup_timeout)
        while True:
            if p.popen.poll() is not None:
                raise ControlPlaneError(f"{p.name} exited with code {p.popen.returncode} before {what}; "
                                        f"log {p.log}:\n{p.tail()}")
            try:
                if ready():
                    return
            except Exception:
                pass
            if time.monotonic() > deadline:
                raise ControlPlaneError(f"{p.name}: no {what} after {timeout or self.startup_timeout:.0f}s; "
                                        f"log {p.log}:\n{p.tail()}")
            time.sleep(0.2)

    # -- components --
    def _start_etcd(self) -> None:
        assert self.workdir is not None
        self.etcd_port, peer = free_port(), free_port()
        client, peer_url = f"http://127.0.0.1:{self.etcd_port}", f"http://127.0.0.1:{peer}"
        p = self._spawn("etcd", [
            self.bins["etcd"], "--name=default", f"--data-dir={self.workdir / 'etcd'}",
            f"--listen-client-urls={client}", f"--advertise-client-urls={client}",
            f"--listen-peer-urls={peer_url}", f"--initial-advertise-peer-urls={peer_url}",
            f"--initial-cluster=default={peer_url}", "--unsafe-no-fsync", "--log-level=warn",
            "--quota-backend-bytes=2147483648", "--listen-metrics-urls=",
        ])

        def healthy() -> bool:
            with urllib.request.urlopen(f"{client}/health", timeout=2) as r:
                return json.loads(r.read()).get("health") == "true"

        self._wait(p, healthy, "/health")

    def _start_apiserver(self) -> None:
        assert self.workdir is not None
        pki = make_pki(self.workdir / "pki")
        self.ca_file = str(pki["ca"])
        self._ssl = ssl.create_default_context(cafile=self.ca_file)
        tokens = self.workdir / "pki" / "tokens.csv"
        tokens.write_text(f'{self.admin_token},gprl-admin,gprl-admin,"system:masters"\n'
                          f"{self.unprivileged_token},gprl-nobody,gprl-nobody\n")
        tokens.chmod(0o600)
        self.port = free_port()
        self.server = f"https://127.0.0.1:{self.port}"
        p = self._spawn("kube-apiserver", [
            self.bins["kube-apiserver"],
            f"--etcd-servers=http://127.0.0.1:{self.etcd_port}",
            "--bind-address=127.0.0.1", "--advertise-address=127.0.0.1", f"--secure-port={self.port}",
            f"--cert-dir={self.workdir / 'pki'}",
            f"--tls-cert-file={pki['cert']}", f"--tls-private-key-file={pki['key']}",
            # a /24 holds 254 ClusterIPs: every run's metrics Service takes one, so a /24 stops the 253rd run
            # (its Service is refused "range is full"); a /16 is what clusters are usually given
            "--service-cluster-ip-range=10.0.0.0/16",
            "--authorization-mode=RBAC", f"--token-auth-file={tokens}",
            "--disable-admission-plugins=ServiceAccount", "--allow-privileged=true",
            "--endpoint-reconciler-type=none",
            f"--service-account-issuer={self.server}/",
            f"--service-account-key-file={pki['sa_pub']}",
            f"--service-account-signing-key-file={pki['sa_key']}",
            "--profiling=false", f"--v={self.verbosity}",
        ])
        self._wait(p, lambda: self._get_status("/readyz") == 200, "/readyz")
        self.kubeconfig = str(self.workdir / "admin.kubeconfig")
        self.write_kubeconfig(self.kubeconfig, "gprl-admin", self.admin_token)

    def _component_flags(self, name: str) -> list[str]:
        kc = self.workdir / f"{name}.kubeconfig"  # type: ignore[operator]
        self.write_kubeconfig(str(kc), "gprl-admin", self.admin_token)
        return [f"--kubeconfig={kc}", "--leader-elect=false", "--secure-port=0", f"--v={self.verbosity}"]

    def _start_controller_manager(self) -> None:
        self._spawn("kube-controller-manager", [
            self.bins["kube-controller-manager"], *self._component_flags("kube-controller-manager"),
            "--controllers=*", f"--service-account-private-key-file={self.workdir / 'pki' / 'sa.key'}",
            f"--root-ca-file={self.ca_file}", "--cluster-cidr=10.244.0.0/16", "--allocate-node-cidrs=false",
            "--node-monitor-grace-period=60s",
        ])
        self._wait(self.procs[-1], lambda: self._sa_exists("default", "default"),
                   "default ServiceAccount created by the controller-manager")

    def _sa_exists(self, ns: str, name: str) -> bool:
        return self._get_status(f"/api/v1/namespaces/{ns}/serviceaccounts/{name}", self.admin_token) == 200

    def _start_scheduler(self) -> None:
        self._spawn("kube-scheduler", [self.bins["kube-scheduler"], *self._component_flags("kube-scheduler")])

    def _start_kwok(self) -> None:
        kc = self.workdir / "kwok.kubeconfig"  # type: ignore[operator]
        self.write_kubeconfig(str(kc), "gprl-admin", self.admin_token)
        k, v = FAKE_NODE_ANNOTATION
        self._spawn("kwok", [
            self.bins["kwok"], f"--kubeconfig={kc}", f"--config={self.kwok_stages}", "--manage-all-nodes=false",
            f"--manage-nodes-with-annotation-selector={k}={v}", "--cidr=10.244.0.0/16",
            "--node-ip=10.244.255.254", "--node-lease-duration-seconds=40",
            f"--server-address=127.0.0.1:{free_port()}",
        ])
        time.sleep(0.5)
        if self.procs[-1].popen.poll() is not None:
            raise ControlPlaneError(f"kwok exited at start; log {self.procs[-1].log}:\n{self.procs[-1].tail()}")

    # -- kubeconfigs and tokens --
    def write_kubeconfig(self, path: str | os.PathLike, user: str, token: str) -> str:
        Path(path).write_text(kubeconfig_text(self.server, self.ca_file, user, token))
        os.chmod(path, 0o600)
        return str(path)

    def service_account_token(self, namespace: str, name: str, *, create: bool = True,
                              expiration_seconds: int = 3600, audiences: list[str] | None = None) -> str:
        """A TokenRequest token for ServiceAccount namespace/name (created, with its namespace, if missing)."""
        if create:
            self.ensure_namespace(namespace)
            self.apply({"apiVersion": "v1", "kind": "ServiceAccount",
                        "metadata": {"name": name, "namespace": namespace}})
        spec: dict[str, Any] = {"expirationSeconds": expiration_seconds}
        if audiences:
            spec["audiences"] = audiences
        r = self.request("POST", f"/api/v1/namespaces/{namespace}/serviceaccounts/{name}/token",
                         {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": spec})
        return r["status"]["token"]

    def service_account_kubeconfig(self, namespace: str, name: str, path: str | os.PathLike | None = None,
                                   **kw) -> str:
        """A kubeconfig that authenticates as the ServiceAccount (so RBAC gaps show up as 403s)."""
        token = self.service_account_token(namespace, name, **kw)
        path = path or self.workdir / f"sa-{namespace}-{name}.kubeconfig"  # type: ignore[operator]
        return self.write_kubeconfig(path, f"system:serviceaccount:{namespace}:{name}", token)

    # -- raw API access (urllib) --
    def _open(self, method: str, path: str, body: Any = None, token: str | None = None,
              content_type: str = "application/json", timeout: float = 30):
        data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
        req = urllib.request.Request(self.server + path, data=data, method=method)
        if token:
            req.add_header("Authorization", f"Bearer {token}")
        if data is not None:
            req.add_header("Content-Type", content_type)
        req.add_header("Accept", "application/json")
        return urllib.request.urlopen(req, context=self._ssl, timeout=timeout)

    def request_raw(self, method: str, path: str, body: Any = None, token: str | None = None,
                    content_type: str = "application/json") -> tuple[int, Any]:
        """(status, decoded JSON body or text); never raises on HTTP errors."""
        try:
            with self._open(method, path, body, token, content_type) as r:
                status, raw = r.status, r.read()
        except urllib.error.HTTPError as e:
            status, raw = e.code, e.read()
        try:
            return status, json.loads(raw) if raw else None
        except ValueError:
            return status, raw.decode(errors="replace")

    def watch(self, path: str, timeout: float = 300, token: str | None = None):
        """The events of a watch (``path`` with ``watch=1``), decoded, as the admin unless ``token`` is given; ends
        when the server closes the stream (its ``timeoutSeconds``) or after ``timeout`` seconds of silence."""
        with self._open("GET", path, token=token or self.admin_token, timeout=timeout) as r:
            for line in r:
                if line.strip():
                    yield json.loads(line)

    def request(self, method: str, path: str, body: Any = None, token: str | None = None,
                content_type: str = "application/json") -> Any:
        """As the admin unless ``token`` is given; raises ApiError on HTTP >= 400."""
        status, out = self.request_raw(method, path, body, token or self.admin_token, content_type)
        if status >= 400:
            raise ApiError(status, out, method, path)
        return out

    def _get_status(self, path: str, token: str | None = None) -> int:
        return self.request_raw("GET", path, token=token)[0]

    def apply(self, obj: dict, field_manager: str = "gprl-devcluster") -> dict:
        """Server-side apply of one object (core or grouped API; namespaced if metadata.namespace is set)."""
        api_version, kind = obj["apiVersion"], obj["kind"]
        plural = _plural(kind)
        base = f"/api/{api_version}" if "/" not in api_version else f"/apis/{api_version}"
        ns = obj["metadata"].get("namespace")
        path = f"{base}/namespaces/{ns}/{plural}/{obj['metadata']['name']}" if ns else \
            f"{base}/{plural}/{obj['metadata']['name']}"
        return self.request("PATCH", f"{path}?fieldManager={field_manager}&force=true", obj,
                            content_type="application/apply-patch+yaml")

    def ensure_namespace(self, name: str) -> None:
        self.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})

    # -- fake nodes --
    def create_fake_node(self, name: str, *, gpus: int = 8, cpu: str = "64", memory: str = "512Gi",
                         pods: str = "110", labels: dict[str, str] | None = None,
                         gpu_product: str = "NVIDIA-H100-80GB-HBM3") -> dict:
        """A node managed by kwok with ``nvidia.com/gpu`` capacity (kwok must run for it to become Ready)."""
        k, v = FAKE_NODE_ANNOTATION
        res = {"cpu": cpu, "memory": memory, "pods": pods}
        if gpus:
            res[GPU_RESOURCE] = str(gpus)
        lab = {"kubernetes.io/hostname": name, "kubernetes.io/os": "linux", "kubernetes.io/arch": "amd64",
               "type": "kwok"}
        if gpus:
            lab.update({"nvidia.com/gpu.present": "true", "nvidia.com/gpu.product": gpu_product,
                        "nvidia.com/gpu.count": str(gpus)})
        lab.update(labels or {})
        node = {"apiVersion": "v1", "kind": "Node",
                "metadata": {"name": name, "labels": lab, "annotations": {k: v, "node.alpha.kubernetes.io/ttl": "0"}},
                "spec": {},
                "status": {"capacity": res, "allocatable": res,
                           "nodeInfo": {"architecture": "amd64", "operatingSystem": "linux",
                                        "kubeletVersion": "fake", "kubeProxyVersion": "fake"}}}
        status, out = self.request_raw("POST", "/api/v1/nodes", node, self.admin_token)
        if status == 409:
            out = self.request("GET", f"/api/v1/nodes/{name}")
        elif status >= 400:
            raise ApiError(status, out, "POST", "/api/v1/nodes")
        if GPU_RESOURCE not in out.get("status", {}).get("allocatable", {}) and gpus:
            out = self.request("PATCH", f"/api/v1/nodes/{name}/status",
                               {"status": {"capacity": res, "allocatable": res}},
                               content_type="application/merge-patch+json")
        return out

    def wait_node_ready(self, name: str, timeout: float = 60.0) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            node = self.request("GET", f"/api/v1/nodes/{name}")
            conds = {c["type"]: c["status"] for c in node.get("status", {}).get("conditions", [])}
            if conds.get("Ready") == "True":
                return node
            if time.monotonic() > deadline:
                raise ControlPlaneError(f"node {name} not Ready after {timeout}s (conditions {conds}); "
                                        f"is kwok running? {self._kwok_tail()}")
            time.sleep(0.3)

    def _kwok_tail(self) -> str:
        for p in self.procs:
            if p.name == "kwok":
                return f"kwok log {p.log}:\n{p.tail(15)}"
        return "(kwok not started)"


_IRREGULAR = {"Endpoints": "endpoints", "PodSecurityPolicy": "podsecuritypolicies"}


def _plural(kind: str) -> str:
    if kind in _IRREGULAR:
        return _IRREGULAR[kind]
    low = kind.lower()
    if low.endswith("s"):
        return low + "es"
    if low.endswith("y") and low[-2:-1] not in "aeiou":
        return low[:-1] + "ies"
    return low + "s"


# --- CLI ------------------------------------------------------------------------------------------------------

def run_dev_cluster(workdir: str | None = None, with_nodes: int = 2, gpus_per_node: int = 8) -> None:
    """Start etcd, kube-apiserver, kube-controller-manager, kube-scheduler and kwok with ``with_nodes`` fake GPU
    nodes; print ``export KUBECONFIG=...`` and block until Ctrl-C (or SIGTERM), then stop everything."""
    def on_signal(signum, frame):
        raise KeyboardInterrupt

    # SIGTERM and SIGINT both unwind through ControlPlane.__exit__ (SIGINT explicitly: a process started in the
    # background by a script inherits SIGINT ignored)
    old = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    t0 = time.monotonic()
    try:
        with ControlPlane(workdir, controller_manager=True, scheduler=True, kwok=True,
                          keep_workdir=workdir is not None) as cp:
            provisioner = None
            try:
                for i in range(with_nodes):
                    cp.create_fake_node(f"gpu-node-{i}", gpus=gpus_per_node)
                for i in range(with_nodes):
                    cp.wait_node_ready(f"gpu-node-{i}")
                provisioner = DevProvisioner(cp).start()
                print(f"# GPRL dev cluster up in {time.monotonic() - t0:.1f}s: {cp.server}, "
                      f"{with_nodes} fake node(s) x {gpus_per_node} {GPU_RESOURCE}, "
                      f"default StorageClass {STORAGE_CLASS!r}", flush=True)
                print("# fake nodes run no containers: Job pods go Running -> Succeeded at once, nothing trains "
                      "(docs/dev-cluster.md#how-it-differs-from-a-real-cluster)", flush=True)
                print(f"# work dir {cp.workdir} (logs in {cp.workdir}/logs); Ctrl-C stops it", flush=True)
                print(f"export KUBECONFIG={cp.kubeconfig}", flush=True)
                while True:
                    for p in cp.procs:
                        if p.popen.poll() is not None:
                            raise ControlPlaneError(f"{p.name} exited with {p.popen.returncode}; log {p.log}:\n"
                                                    f"{p.tail()}")
                    time.sleep(1)
            finally:
                print("# stopping the dev cluster", file=sys.stderr, flush=True)
                if provisioner:
                    provisioner.stop()
    except KeyboardInterrupt:
        pass
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="gprl dev-cluster",
                                 description="A local Kubernetes control plane with fake GPU nodes (kwok).")
    ap.add_argument("--workdir", help="keep state, logs and kubeconfig here (default: a temp dir, removed at exit)")
    ap.add_argument("--nodes", type=int, default=2, help="fake nodes to create (default 2)")
    ap.add_argument("--gpus-per-node", type=int, default=8, help=f"{GPU_RESOURCE} per node (default 8)")
    a = ap.parse_args(argv)
    try:
        run_dev_cluster(a.workdir, a.nodes, a.gpus_per_node)
    except BinariesMissing as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


