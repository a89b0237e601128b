"""A thin, counted Kubernetes client: server-side apply, get, merge-patch, delete on any resource.

Uses the `kubernetes` package only for its configuration and authentication (kubeconfig or in-cluster);
requests go through its REST layer. Every request increments `gprl_operator_api_requests_total`.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from typing import Any, Optional
from urllib.parse import quote, urlencode

import urllib3

from gprl_operator import metrics

FIELD_MANAGER = "gprl-operator"

_PLURALS = {
    ("v1", "ConfigMap"): "configmaps",
    ("v1", "ServiceAccount"): "serviceaccounts",
    ("v1", "Service"): "services",
    ("v1", "PersistentVolumeClaim"): "persistentvolumeclaims",
    ("v1", "Pod"): "pods",
    ("v1", "Secret"): "secrets",
    ("networking.k8s.io/v1", "NetworkPolicy"): "networkpolicies",
    ("v1", "Namespace"): "namespaces",
    ("v1", "Event"): "events",
    ("rbac.authorization.k8s.io/v1", "Role"): "roles",
    ("rbac.authorization.k8s.io/v1", "RoleBinding"): "rolebindings",
    ("rbac.authorization.k8s.io/v1", "ClusterRole"): "clusterroles",
    ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding"): "clusterrolebindings",
    ("batch/v1", "Job"): "jobs",
    ("apps/v1", "Deployment"): "deployments",
    ("apps/v1", "StatefulSet"): "statefulsets",
    ("gprl.dev/v1alpha1", "GPRLRun"): "gprlruns",
}


class ApiError(RuntimeError):
    def __init__(self, status: int, body: Any, method: str, path: str):
        self.status, self.body, self.method, self.path = status, body, method, path
        msg = body.get("message") if isinstance(body, dict) else body
        super().__init__(f"{method} {path}: HTTP {status}: {msg}")

    @property
    def reason(self) -> str:
        return self.body.get("reason", "") if isinstance(self.body, dict) else ""


def plural(api_version: str, kind: str) -> str:
    try:
        return _PLURALS[(api_version, kind)]
    except KeyError:
        return kind.lower() + "s"


def path_of(api_version: str, kind: str, namespace: Optional[str], name: Optional[str] = None,
            subresource: Optional[str] = None) -> str:
    base = "/api/v1" if api_version == "v1" else f"/apis/{api_version}"
    p = f"{base}/namespaces/{quote(namespace)}/{plural(api_version, kind)}" if namespace else \
        f"{base}/{plural(api_version, kind)}"
    if name:
        p += f"/{quote(name)}"
    if subresource:
        p += f"/{subresource}"
    return p


class Kube:
    """Synchronous client; safe to share between threads (urllib3 pool)."""

    def __init__(self, api_client=None, timeout: float = 30.0):
        from kubernetes import client, config

        if api_client is None:
            try:
                config.load_incluster_config()
            except config.ConfigException:
                config.load_kube_config()
            cfg = client.Configuration.get_default_copy()
            # one pooled (TLS) connection per handler thread: the default pool (5 x CPUs) is smaller than the
            # thread pool, and every request beyond it would pay a fresh TLS handshake on both sides
            cfg.connection_pool_maxsize = int(os.environ.get("GPRL_OPERATOR_WORKERS", "16")) + 8
            api_client = client.ApiClient(cfg)
        self.api = api_client
        self.timeout = timeout
        self._lock = threading.Lock()

    def request(self, method: str, path: str, body: Any = None, query: Optional[dict] = None,
                content_type: str = "application/json") -> Any:
        headers = {"Accept": "application/json"}
        payload = None
        if body is not None:
            headers["Content-Type"] = content_type
            # The client serialises a plain application/json body itself (a pre-serialised string would be
            # encoded twice); other types (merge-patch, apply-patch) go through as the string we make.
            payload = body if content_type == "application/json" else json.dumps(body)
        url_path = path + (("?" + urlencode(query)) if query else "")
        m, url, hdrs, b, _ = self.api.param_serialize(
            method, url_path, header_params=headers, body=payload, auth_settings=["BearerToken"]
        )
        resource = metrics.resource_of(path)
        t0 = time.perf_counter()
        code = "error"
        try:
            resp = self.api.call_api(m, url, header_params=hdrs, body=b, _request_timeout=self.timeout)
            raw = resp.read() if hasattr(resp, "read") else resp.data
            data = resp.data if raw is None else raw
            code = str(resp.status)
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            # no answer (a read timeout from an overloaded API server, a dropped connection): status 0, which the
            # handlers treat as temporary (backoff, an Event) instead of an unhandled traceback. A create that timed
            # out may still have happened: its retry gets 409 and reads the object back.
            raise ApiError(0, {"message": f"no answer from the API server: {exc}"}, method, path) from exc
        finally:
            metrics.API_REQUESTS.labels(client="operator", verb=method, resource=resource, code=code).inc()
            metrics.API_LATENCY.labels(verb=method).observe(time.perf_counter() - t0)
        try:
            out = json.loads(data) if data else None
        except ValueError:
            out = data.decode(errors="replace") if isinstance(data, bytes) else data
        if not 200 <= resp.status < 300:
            raise ApiError(resp.status, out, method, path)
        return out

    # -- verbs --
    def apply(self, obj: dict, field_manager: str = FIELD_MANAGER, subresource: Optional[str] = None,
              dry_run: bool = False) -> dict:
        """Server-side apply (create if missing, else update the fields this manager owns). Callers that must not
        adopt someone else's object check ownership first (`create` for new children)."""
        meta = obj["metadata"]
        path = path_of(obj["apiVersion"], obj["kind"], meta.get("namespace"), meta["name"], subresource)
        query = {"fieldManager": field_manager, "force": "true"}
        if dry_run:
            query["dryRun"] = "All"
        return self.request("PATCH", path, obj, query, "application/apply-patch+yaml")

    def create(self, obj: dict, field_manager: str = FIELD_MANAGER) -> dict:
        """POST: atomic create-if-absent. An existing object of that name is a 409 AlreadyExists, never adopted."""
        meta = obj["metadata"]
        path = path_of(obj["apiVersion"], obj["kind"], meta.get("namespace"))
        return self.request("POST", path, obj, {"fieldManager": field_manager})

    def event(self, involved: dict, etype: str, reason: str, message: str, name: str, count: int = 1,
              component: str = FIELD_MANAGER) -> None:
        """A core/v1 Event about `involved`; a repeat (same `name`) counts up the existing one."""
        meta = involved["metadata"]
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        ns = meta["namespace"]
        if count > 1:
            try:
                self.merge_patch("v1", "Event", ns, name, {"count": count, "lastTimestamp": now})
                return
            except ApiError as exc:
                if exc.status != 404:
                    raise
        body = {
            "apiVersion": "v1", "kind": "Event",
            "metadata": {"name": name, "namespace": ns},
            "involvedObject": {"apiVersion": involved.get("apiVersion"), "kind": involved.get("kind"),
                               "name": meta["name"], "namespace": ns, "uid": meta.get("uid")},
            "type": etype, "reason": reason, "message": message[:1024],
            "source": {"component": component}, "reportingComponent": f"gprl.dev/{component}",
            "reportingInstance": socket.gethostname()[:128],
            "firstTimestamp": now, "lastTimestamp": now, "count": count,
        }
        try:
            self.request("POST", path_of("v1", "Event", ns), body)
        except ApiError as exc:
            if exc.status != 409:
                raise
            self.merge_patch("v1", "Event", ns, name, {"count": count, "lastTimestamp": now})

    def get(self, api_version: str, kind: str, namespace: Optional[str], name: str) -> Optional[dict]:
        try:
            return self.request("GET", path_of(api_version, kind, namespace, name))
        except ApiError as exc:
            if exc.status == 404:
                return None
            raise

    def merge_patch(self, api_version: str, kind: str, namespace: Optional[str], name: str, patch: dict,
                    subresource: Optional[str] = None) -> dict:
        return self.request("PATCH", path_of(api_version, kind, namespace, name, subresource), patch,
                            content_type="application/merge-patch+json")

    def delete(self, api_version: str, kind: str, namespace: Optional[str], name: str) -> None:
        try:
            self.request("DELETE", path_of(api_version, kind, namespace, name),
                         {"kind": "DeleteOptions", "apiVersion": "v1", "propagationPolicy": "Background"})
        except ApiError as exc:
            if exc.status != 404:
                raise


_shared: Optional[Kube] = None
_shared_lock = threading.Lock()


def shared() -> Kube:
    """The operator's one client (credentials loaded once; handlers and the drift loop share its pool)."""
    global _shared
    with _shared_lock:
        if _shared is None:
            _shared = Kube()
        return _shared
