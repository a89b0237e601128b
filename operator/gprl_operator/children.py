"""Pure functions from a GPRLRun to the Kubernetes objects that run it. No API calls here.

`build_children(run)` returns, in apply order:

    ConfigMap       <run>-config       the rendered run configuration (config.yaml)
    NetworkPolicy   <run>              only the run's own pods reach its pods (servers, rendezvous); the monitoring
                                       namespace reaches the metrics and server ports
    ServiceAccount  <run>-trainer      identity of the job's pods
    Role            <run>-trainer      get/list/watch its own GPRLRun, patch its status; nothing else
    RoleBinding     <run>-trainer
    PVC             <run>-checkpoints  unless spec.resources.checkpointClaim names an existing claim
    Service         <run>              headless; pods are <run>-<index>.<run> (rendezvous, MASTER_ADDR)
    Service         <run>-metrics      Prometheus metrics of the trainer pods
    [disaggregated] Service+StatefulSet <run>-rollout  headless; rollout servers <run>-rollout-<i>.<run>-rollout
    [disaggregated] Deployment+Service <run>-gpm       GPM scoring servers behind one load-balanced Service
    [hf:// sources] PVC <run>-models   hub cache, unless spec.resources.modelCache.claim names an existing claim
    Job             <run>              indexed batch/v1 Job, one pod per learner node; torchrun starts one rank
                                       per GPU in each (world size = pods x ranks per pod)

Every pod gets the run's pod overrides (`resources.pods`: `all`, then its role's block), read-only mounts of its
model sources (`pvc://` claims, the hub cache that an init container fills from `hf://` ids). A run labelled
`kueue.x-k8s.io/queue-name` has the label on its Job and servers; its Job is created suspended and Kueue admits it.

Besides these, `token_secret(run, token)` is the run's server token (Secret <run>-server-token), which the handler
creates once with a random token and never overwrites (a new token would lock the learner out of running servers);
every pod mounts it and finds it through $GPRL_SERVER_TOKEN_FILE.

Every object carries the run's labels and a controller owner reference to the run, so deleting the run
garbage-collects them (and only them: the operator never adds its owner reference to an object it did not
create, see `ownership`). `run_status(...)` computes the operator's part of the run's status from the Job.
"""

from __future__ import annotations

import copy
import os
import posixpath
from typing import Any, Optional

import yaml

from gprl.config import ConfigError, RunSpec, parse_config
from gprl.crd import GROUP, KIND, VERSION
from gprl.api.manifest import WEIGHT_SYNC_PORT
from gprl.api.pods import MODELS_ROOT, PodOverrides, Source, parse_source
from gprl_operator.ownership import bounded

API_VERSION = f"{GROUP}/{VERSION}"
MANAGER = "gprl-operator"
TRAINER_PORT_METRICS = 9400
RDZV_PORT = 29500
ROLLOUT_PORT = 8000
GPM_PORT = 8001
WORKDIR = "/workspace"
CONFIG_DIR = "/etc/gprl"
RUN_AS_USER = 1000
TOKEN_DIR = "/etc/gprl-token"
TOKEN_KEY = "token"
# The namespace whose pods may scrape the runs' metrics and server ports (chart value networkPolicy.monitoringNamespace)
MONITORING_NAMESPACE = os.environ.get("GPRL_MONITORING_NAMESPACE", "monitoring")
HUB_CACHE = f"{MODELS_ROOT}/hub"
KUEUE_PREFIX = "kueue.x-k8s.io/"
KUEUE_QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
ROLES = {"trainer": "learner", "rollout": "rollout", "gpm": "gpm"}  # component label -> resources.pods block

# Operator-owned condition types (DriftDetected belongs to the drift loop).
CONDITION_TYPES = ("Ready", "Running", "Succeeded", "Failed", "Suspended", "PodFailed")


class InvalidRun(ValueError):
    """A GPRLRun whose spec does not validate (the CRD schema should have refused it)."""


# --------------------------------------------------------------------------------------
# helpers


def run_spec(run: dict) -> RunSpec:
    raw = {k: v for k, v in (run.get("spec") or {}).items() if k != "suspend"}
    try:
        return parse_config(raw, f"GPRLRun {run['metadata'].get('namespace')}/{run['metadata']['name']}")
    except ConfigError as exc:
        raise InvalidRun(str(exc)) from None


def labels(run: dict, component: str | None = None) -> dict[str, str]:
    name = run["metadata"]["name"]
    out = {
        "app.kubernetes.io/name": "gprl",
        "app.kubernetes.io/instance": name,
        "app.kubernetes.io/managed-by": MANAGER,
        "gprl.dev/run": name,
    }
    if component:
        out["app.kubernetes.io/component"] = component
    return out


def owner_reference(run: dict) -> dict[str, Any]:
    meta = run["metadata"]
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "name": meta["name"],
        "uid": meta["uid"],
        "controller": True,
        "blockOwnerDeletion": True,
    }


def _meta(run: dict, name: str, component: str) -> dict[str, Any]:
    return {
        "name": name,
        "namespace": run["metadata"]["namespace"],
        "labels": labels(run, component),
        "ownerReferences": [owner_reference(run)],
    }


def names(run: dict) -> dict[str, str]:
    n = run["metadata"]["name"]
    return {
        "config": f"{n}-config",
        "account": f"{n}-trainer",
        "claim": f"{n}-checkpoints",
        "headless": n,
        "metrics": f"{n}-metrics",
        "job": n,
        "rollout": f"{n}-rollout",
        "gpm": f"{n}-gpm",
        "token": f"{n}-server-token",
        "policy": n,
        "models": f"{n}-models",
    }


def rollout_urls(run: dict, spec: RunSpec) -> list[str]:
    """One URL per rollout server pod: the StatefulSet's stable names through its headless Service, so the learner
    pushes every weight update to every replica and spreads generation over all of them."""
    ns, svc = run["metadata"]["namespace"], names(run)["rollout"]
    return [f"http://{svc}-{i}.{svc}.{ns}.svc:{ROLLOUT_PORT}" for i in range(spec.resources.rollout_replicas)]


def output_dir(spec: RunSpec) -> str:
    d = spec.output.dir
    return posixpath.normpath(d if posixpath.isabs(d) else posixpath.join(WORKDIR, d))


def model_sources(spec: RunSpec) -> dict[str, Source]:
    """The run's `hf://` and `pvc://` sources by field path (local and `world:` sources need nothing from us)."""
    out = {}
    for path, value in spec.source_fields().items():
        src = parse_source(value, path)
        if src.kind != "local":
            out[path] = src
    return out


def kueue_labels(run: dict) -> dict[str, str]:
    """The run's Kueue labels (queue name, priority class), copied to the objects Kueue admits."""
    return {k: v for k, v in ((run.get("metadata") or {}).get("labels") or {}).items() if k.startswith(KUEUE_PREFIX)}


def queued_by_kueue(run: dict) -> bool:
    return KUEUE_QUEUE_LABEL in kueue_labels(run)


def learner_ranks_per_pod(spec: RunSpec) -> int:
    """torchrun's nproc_per_node: one rank per GPU of the pod unless set (one on a CPU-only pod)."""
    return spec.resources.learner_processes_per_pod or max(pod_gpus(spec, "trainer"), 1)


def pod_overrides(spec: RunSpec, component: str) -> PodOverrides:
    """`resources.pods.all` then the role's block, with the `resources.nodeSelector` / `tolerations` shorthands."""
    o = spec.resources.pods.for_role(ROLES[component])
    o.node_selector = {**spec.resources.node_selector, **o.node_selector}
    o.tolerations = [*spec.resources.tolerations, *o.tolerations]
    return o


def referenced_claims(spec: RunSpec) -> list[str]:
    """Every existing PersistentVolumeClaim the run's pods would mount (for the permission check of the operator:
    a run may mount only claims its creator may use)."""
    r = spec.resources
    out = [r.checkpoint_claim] if r.checkpoint_claim else []
    out += [s.repo for s in model_sources(spec).values() if s.kind == "pvc"]
    if r.model_cache.claim and any(s.kind == "hf" for s in model_sources(spec).values()):
        out.append(r.model_cache.claim)
    for role in ("all", "learner", "rollout", "gpm"):
        out += [v.persistent_volume_claim.claim_name for v in getattr(r.pods, role).volumes
                if v.persistent_volume_claim is not None]
    return list(dict.fromkeys(out))


def referenced_secrets(spec: RunSpec) -> list[str]:
    """Every Secret whose contents the run's containers would see (envFromSecrets, the hub token)."""
    r = spec.resources
    out = list(r.env_from_secrets)
    if r.model_cache.hub_token_secret is not None:
        out.append(r.model_cache.hub_token_secret.name)
    return list(dict.fromkeys(out))


def rendered_config(run: dict, spec: RunSpec | None = None) -> dict[str, Any]:
    """The run config the pods read: the spec with every default filled in, plus the cluster's wiring."""
    spec = run_spec(run) if spec is None else spec
    cfg = spec.to_dict(camel=True)
    ns, n = run["metadata"]["namespace"], names(run)
    cfg["output"]["dir"] = output_dir(spec)
    cfg["output"]["progress"] = False
    for path, src in model_sources(spec).items():  # hf:// and pvc:// become the pods' read-only local paths
        section, field = path.split(".")
        local = src.local_path()
        cfg[section][field] = f"hf:{local}" if (path == "data.prompts" and src.kind == "hf") else local
    if not cfg["output"]["metricsPort"]:
        cfg["output"]["metricsPort"] = TRAINER_PORT_METRICS
    if spec.resources.topology == "disaggregated":
        cfg["rollout"]["serverUrls"] = rollout_urls(run, spec)
        cfg["rollout"]["weightSync"]["port"] = weight_sync_port(spec)
        cfg["gpm"]["serverUrl"] = f"http://{n['gpm']}.{ns}.svc:{GPM_PORT}"
    return cfg


def weight_sync_port(spec: RunSpec) -> int:
    """Where the learner's rank 0 waits for the rollout servers to join its weight-sync group (transport
    collective)."""
    return spec.rollout.weight_sync.port or WEIGHT_SYNC_PORT


def pod_gpus(spec: RunSpec, component: str) -> int:
    """GPUs of one pod of a role: its `resources.pods` block's `gpus`, else `resources.gpus`."""
    g = pod_overrides(spec, component).gpus
    return spec.resources.gpus if g is None else g


def _resources(spec: RunSpec, component: str = "trainer") -> dict[str, Any]:
    r, o = spec.resources, pod_overrides(spec, component)
    gpus, memory = pod_gpus(spec, component), o.memory or r.memory
    requests = {"cpu": o.cpu or r.cpu, "memory": memory}
    limits: dict[str, Any] = {"memory": memory}
    if gpus:
        requests["nvidia.com/gpu"] = str(gpus)
        limits["nvidia.com/gpu"] = str(gpus)
    return {"requests": requests, "limits": limits}


def _pod_security() -> dict[str, Any]:
    return {
        "runAsNonRoot": True,
        "runAsUser": RUN_AS_USER,
        "runAsGroup": RUN_AS_USER,
        "fsGroup": RUN_AS_USER,
        "fsGroupChangePolicy": "OnRootMismatch",
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def _container_security() -> dict[str, Any]:
    return {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
        "capabilities": {"drop": ["ALL"]},
    }


def _env(run: dict, spec: RunSpec, extra: list[dict] | None = None) -> list[dict[str, Any]]:
    n = names(run)
    env = [
        {"name": "GPRL_CONFIG", "value": f"{CONFIG_DIR}/config.yaml"},
        {"name": "GPRL_RUN_NAME", "value": run["metadata"]["name"]},
        {"name": "GPRL_RUN_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
        {"name": "GPRL_RUN_UID", "value": run["metadata"]["uid"]},
        {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "HOME", "value": "/home/gprl"},
        {"name": "HF_HOME", "value": "/home/gprl/.cache/huggingface"},
        {"name": "TMPDIR", "value": "/tmp"},
        {"name": "GPRL_SERVER_TOKEN_FILE", "value": f"{TOKEN_DIR}/{TOKEN_KEY}"},
    ]
    if spec.resources.gpus == 0:
        env.append({"name": "CUDA_VISIBLE_DEVICES", "value": ""})
    return env + (extra or [])


def _volumes(run: dict, spec: RunSpec, with_claim: bool) -> tuple[list[dict], list[dict]]:
    n = names(run)
    volumes = [
        {"name": "config", "configMap": {"name": n["config"]}},
        {"name": "tmp", "emptyDir": {}},
        {"name": "home", "emptyDir": {}},
        {"name": "dshm", "emptyDir": {"medium": "Memory"}},
        {"name": "server-token", "secret": {"secretName": n["token"], "defaultMode": 0o440}},
    ]
    mounts = [
        {"name": "config", "mountPath": CONFIG_DIR, "readOnly": True},
        {"name": "tmp", "mountPath": "/tmp"},
        {"name": "home", "mountPath": "/home/gprl"},
        {"name": "dshm", "mountPath": "/dev/shm"},
        {"name": "server-token", "mountPath": TOKEN_DIR, "readOnly": True},
    ]
    if with_claim:
        claim = spec.resources.checkpoint_claim or n["claim"]
        volumes.append({"name": "checkpoints", "persistentVolumeClaim": {"claimName": claim}})
        mounts.append({"name": "checkpoints", "mountPath": output_dir(spec)})
    return volumes, mounts


def _model_volumes(run: dict, spec: RunSpec) -> tuple[list[dict], list[dict]]:
    """Read-only mounts of the run's sources: each `pvc://` claim at /models/pvc/<claim>, the hub cache (filled by
    the init container) at /models/hub."""
    sources = list(model_sources(spec).values())
    volumes, mounts = [], []
    for i, claim in enumerate(dict.fromkeys(s.repo for s in sources if s.kind == "pvc")):
        volumes.append({"name": f"gprl-model-{i}", "persistentVolumeClaim": {"claimName": claim, "readOnly": True}})
        mounts.append({"name": f"gprl-model-{i}", "mountPath": f"{MODELS_ROOT}/pvc/{claim}", "readOnly": True})
    if any(s.kind == "hf" for s in sources):
        claim = spec.resources.model_cache.claim or names(run)["models"]
        volumes.append({"name": "gprl-hub-cache", "persistentVolumeClaim": {"claimName": claim}})
        mounts.append({"name": "gprl-hub-cache", "mountPath": HUB_CACHE, "readOnly": True})
    return volumes, mounts


def fetch_init_container(run: dict, spec: RunSpec) -> Optional[dict[str, Any]]:
    """`gprl fetch` of every `hf://` source into the hub cache, before the main container starts (a no-op when the
    files are already there: a restarted pod, a second pod, or another run sharing the cache claim)."""
    hub = list(dict.fromkeys(s.raw for s in model_sources(spec).values() if s.kind == "hf"))
    if not hub:
        return None
    cache = spec.resources.model_cache
    env: list[dict[str, Any]] = [
        {"name": "HOME", "value": "/home/gprl"},
        {"name": "TMPDIR", "value": "/tmp"},
        {"name": "HF_HUB_DISABLE_TELEMETRY", "value": "1"},
    ]
    if cache.hub_token_secret is not None:
        ref = cache.hub_token_secret
        env.append({"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": ref.name, "key": ref.key}}})
    if cache.hub_endpoint:
        env.append({"name": "HF_ENDPOINT", "value": cache.hub_endpoint})
    return {
        "name": "fetch-models",
        "image": spec.resources.image,
        "imagePullPolicy": "IfNotPresent",
        "command": ["gprl", "fetch", "--dest", HUB_CACHE, *hub],
        "env": env,
        "securityContext": _container_security(),
        "resources": {"requests": {"cpu": "1", "memory": "2Gi"}, "limits": {"memory": "4Gi"}},
        "volumeMounts": [
            {"name": "tmp", "mountPath": "/tmp"},
            {"name": "home", "mountPath": "/home/gprl"},
            {"name": "gprl-hub-cache", "mountPath": HUB_CACHE},
        ],
    }


def _template_metadata(run: dict, spec: RunSpec, component: str) -> dict[str, Any]:
    """Pod template metadata: the run's pod labels and annotations; the operator's labels win (its selectors)."""
    o = pod_overrides(spec, component)
    meta: dict[str, Any] = {"labels": {**o.labels, **labels(run, component)}}
    if o.annotations:
        meta["annotations"] = dict(o.annotations)
    return meta


def _pod_spec(run: dict, spec: RunSpec, container: dict, *, with_claim: bool, account: bool,
              component: str = "trainer") -> dict[str, Any]:
    n = names(run)
    o = pod_overrides(spec, component)
    volumes, mounts = _volumes(run, spec, with_claim)
    model_volumes, model_mounts = _model_volumes(run, spec)
    volumes += model_volumes + [v.manifest() for v in o.volumes]
    mounts += model_mounts + [m.manifest() for m in o.volume_mounts]
    env = list(container.get("env") or [])
    if model_volumes and any(s.kind == "hf" for s in model_sources(spec).values()):
        env.append({"name": "HF_HUB_OFFLINE", "value": "1"})  # the init container fetched everything
    env = [e for e in env if e["name"] != "CUDA_VISIBLE_DEVICES"]  # by the role's own GPU count
    if pod_gpus(spec, component) == 0:
        env.append({"name": "CUDA_VISIBLE_DEVICES", "value": ""})
    container = {**container, "env": env + [e.manifest() for e in o.env]}
    container = {
        "imagePullPolicy": "IfNotPresent",
        "workingDir": WORKDIR,
        "securityContext": _container_security(),
        "resources": _resources(spec, component),
        "volumeMounts": mounts,
        **container,
    }
    if spec.resources.env_from_secrets:
        container["envFrom"] = [{"secretRef": {"name": s}} for s in spec.resources.env_from_secrets]
    pod: dict[str, Any] = {
        "securityContext": _pod_security(),
        "containers": [container],
        "volumes": volumes,
        "enableServiceLinks": False,
        "automountServiceAccountToken": account,
    }
    if account:
        pod["serviceAccountName"] = n["account"]
    init = fetch_init_container(run, spec)
    if init is not None:
        pod["initContainers"] = [init]
    tolerations = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}] \
        if pod_gpus(spec, component) else []
    tolerations += [t.manifest() for t in o.tolerations]
    if tolerations:
        pod["tolerations"] = tolerations
    if o.node_selector:
        pod["nodeSelector"] = dict(o.node_selector)
    if o.affinity is not None:
        pod["affinity"] = o.affinity.manifest()
    if o.priority_class_name:
        pod["priorityClassName"] = o.priority_class_name
    if o.image_pull_secrets:
        pod["imagePullSecrets"] = [{"name": s} for s in o.image_pull_secrets]
    return pod


# --------------------------------------------------------------------------------------
# the children


# libyaml's emitter writes the same text ~4x faster than PyYAML's pure-Python one: the config's YAML was 95% of
# building a run's children, which the operator does once per run and spec change (1,000 at once in a burst)
_YAML_DUMPER = getattr(yaml, "CSafeDumper", yaml.SafeDumper)


def config_map(run: dict, spec: RunSpec) -> dict[str, Any]:
    text = yaml.dump(rendered_config(run, spec), Dumper=_YAML_DUMPER, sort_keys=False)
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _meta(run, names(run)["config"], "config"),
        "data": {"config.yaml": text},
    }


def rbac(run: dict) -> list[dict[str, Any]]:
    n = names(run)
    meta = lambda name: _meta(run, name, "trainer")  # noqa: E731
    return [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": meta(n["account"]), "automountServiceAccountToken": False},
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "Role",
            "metadata": meta(n["account"]),
            "rules": [
                {
                    "apiGroups": [GROUP],
                    "resources": ["gprlruns"],
                    "resourceNames": [run["metadata"]["name"]],
                    "verbs": ["get", "list", "watch"],
                },
                {
                    "apiGroups": [GROUP],
                    "resources": ["gprlruns/status"],
                    "resourceNames": [run["metadata"]["name"]],
                    "verbs": ["get", "patch"],
                },
            ],
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": meta(n["account"]),
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": n["account"]},
            "subjects": [{"kind": "ServiceAccount", "name": n["account"], "namespace": run["metadata"]["namespace"]}],
        },
    ]


def checkpoint_claim(run: dict, spec: RunSpec) -> Optional[dict[str, Any]]:
    r = spec.resources
    if r.checkpoint_claim:
        return None
    pvc: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": _meta(run, names(run)["claim"], "checkpoints"),
        "spec": {
            # every learner rank mounts it; more than one pod needs a shared (RWX) volume
            "accessModes": ["ReadWriteOnce" if r.learner_replicas == 1 else "ReadWriteMany"],
            "resources": {"requests": {"storage": r.checkpoint_size}},
        },
    }
    if r.storage_class:
        pvc["spec"]["storageClassName"] = r.storage_class
    return pvc


def model_cache_claim(run: dict, spec: RunSpec) -> Optional[dict[str, Any]]:
    """The hub cache of a run with `hf://` sources, unless it names an existing one. Mounted by every pod of the
    run (read-write by the init container, read-only by the rest), so shared (RWX) when there is more than one."""
    cache = spec.resources.model_cache
    if cache.claim or not any(s.kind == "hf" for s in model_sources(spec).values()):
        return None
    r = spec.resources
    pods = r.learner_replicas + (r.rollout_replicas + r.gpm_replicas if r.topology == "disaggregated" else 0)
    pvc: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": _meta(run, names(run)["models"], "models"),
        "spec": {
            "accessModes": ["ReadWriteOnce" if pods == 1 else "ReadWriteMany"],
            "resources": {"requests": {"storage": cache.size}},
        },
    }
    if cache.storage_class:
        pvc["spec"]["storageClassName"] = cache.storage_class
    return pvc


def services(run: dict, spec: RunSpec) -> list[dict[str, Any]]:
    n = names(run)
    selector = {"gprl.dev/run": run["metadata"]["name"], "app.kubernetes.io/component": "trainer"}
    headless = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _meta(run, n["headless"], "trainer"),
        "spec": {
            "clusterIP": "None",
            "selector": selector,
            "publishNotReadyAddresses": True,  # ranks must resolve each other before they are Ready
            "ports": [{"name": "rendezvous", "port": RDZV_PORT, "targetPort": RDZV_PORT, "protocol": "TCP"}]
            + _weight_sync_ports(spec, "port"),
        },
    }
    metrics_port = spec.output.metrics_port or TRAINER_PORT_METRICS
    metrics = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            **_meta(run, n["metrics"], "metrics"),
            "annotations": {
                "prometheus.io/scrape": "true",
                "prometheus.io/port": str(metrics_port),
                "prometheus.io/path": "/metrics",
            },
        },
        "spec": {
            "type": "ClusterIP",
            "selector": selector,
            "ports": [{"name": "metrics", "port": metrics_port, "targetPort": "metrics", "protocol": "TCP"}],
        },
    }
    return [headless, metrics]


def _weight_sync_ports(spec: RunSpec, key: str) -> list[dict[str, Any]]:
    """The learner's weight-sync port, on every disaggregated run: whether the servers use it (transport) may change
    on a suspended run, the Job's pod template may not."""
    if spec.resources.topology != "disaggregated":
        return []
    port = weight_sync_port(spec)
    entry = {"name": "weight-sync", key: port, "protocol": "TCP"}
    return [{**entry, "targetPort": port} if key == "port" else entry]


def server_deployments(run: dict, spec: RunSpec) -> list[dict[str, Any]]:
    """Disaggregated topology: the rollout (vLLM/HF) servers and the GPM scoring servers.

    Rollout servers hold weights the learner pushes to each of them, so they are a StatefulSet behind a headless
    Service (stable per-pod names, listed one by one in `rollout.serverUrls`); a replaced pod keeps its name and is
    re-synced by the learner. GPM servers are stateless: a Deployment behind one load-balanced Service.
    Both scale to zero while `spec.suspend` is true.
    """
    if spec.resources.topology != "disaggregated":
        return []
    n, out = names(run), []
    # spec.suspend frees the servers' accelerators too, not only the Job's; resume scales them back
    suspended = bool((run.get("spec") or {}).get("suspend", False))
    for role, port, replicas, command in (
        ("rollout", ROLLOUT_PORT, 0 if suspended else spec.resources.rollout_replicas, "serve-rollout"),
        ("gpm", GPM_PORT, 0 if suspended else spec.resources.gpm_replicas, "serve-gpm"),
    ):
        sel = {"gprl.dev/run": run["metadata"]["name"], "app.kubernetes.io/component": role}
        container = {
            "name": role,
            "image": spec.resources.image,
            # all interfaces of the pod: the run's NetworkPolicy and token decide who gets in
            "command": ["gprl", command, "--config", f"{CONFIG_DIR}/config.yaml", "--host", "0.0.0.0",
                        "--port", str(port)],
            "env": _env(run, spec),
            "ports": [{"name": "http", "containerPort": port, "protocol": "TCP"}],
            "readinessProbe": {"httpGet": {"path": "/healthz", "port": "http"}, "periodSeconds": 10},
        }
        template = {
            "metadata": _template_metadata(run, spec, role),
            "spec": _pod_spec(run, spec, container, with_claim=False, account=False, component=role),
        }
        ports = [{"name": "http", "port": port, "targetPort": "http", "protocol": "TCP"}]
        if role == "rollout":
            out.append(
                {
                    "apiVersion": "v1",
                    "kind": "Service",
                    "metadata": _meta(run, n[role], role),
                    "spec": {
                        "clusterIP": "None",
                        "selector": sel,
                        # the learner waits for /healthz itself; names must resolve while vLLM is still loading
                        "publishNotReadyAddresses": True,
                        "ports": ports,
                    },
                }
            )
            out.append(
                {
                    "apiVersion": "apps/v1",
                    "kind": "StatefulSet",
                    "metadata": _kueue_meta(run, n[role], role),
                    "spec": {
                        "serviceName": n[role],
                        "replicas": replicas,
                        "podManagementPolicy": "Parallel",  # independent servers: start and replace them together
                        "selector": {"matchLabels": sel},
                        "template": template,
                    },
                }
            )
        else:
            out.append(
                {
                    "apiVersion": "apps/v1",
                    "kind": "Deployment",
                    "metadata": _kueue_meta(run, n[role], role),
                    "spec": {"replicas": replicas, "selector": {"matchLabels": sel}, "template": template},
                }
            )
            out.append(
                {"apiVersion": "v1", "kind": "Service", "metadata": _meta(run, n[role], role),
                 "spec": {"selector": sel, "ports": ports}}
            )
    return out


def token_secret(run: dict, token: str) -> dict[str, Any]:
    """The run's server token: required by its rollout and GPM servers, sent by its learner (immutable: a token
    is never rotated under running servers; a new run gets a new one)."""
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": _meta(run, names(run)["token"], "token"),
        "type": "Opaque",
        "immutable": True,
        "stringData": {TOKEN_KEY: token},
    }


def network_policy(run: dict, spec: RunSpec, monitoring_namespace: str = MONITORING_NAMESPACE) -> dict[str, Any]:
    """Ingress to the run's pods: from the run's own pods on any port (the servers, the rendezvous and weight-sync
    ports, and the ports gloo/NCCL open between the members of a process group), and from the monitoring namespace
    on the metrics and server ports only (/metrics needs no token; every other server route does). Nothing else
    reaches the learner's weight-sync port: whoever joins that group receives the policy's weights."""
    run_pods = {"gprl.dev/run": run["metadata"]["name"]}
    metrics_port = spec.output.metrics_port or TRAINER_PORT_METRICS
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": _meta(run, names(run)["policy"], "network"),
        "spec": {
            "podSelector": {"matchLabels": run_pods},
            "policyTypes": ["Ingress"],
            "ingress": [
                {"from": [{"podSelector": {"matchLabels": run_pods}}]},
                {"from": [{"namespaceSelector": {"matchLabels": {
                    "kubernetes.io/metadata.name": monitoring_namespace}}}],
                 "ports": [{"protocol": "TCP", "port": p} for p in (metrics_port, ROLLOUT_PORT, GPM_PORT)]},
            ],
        },
    }


STOPPED_EXIT_CODE = 143  # `gprl train --exit-code-on-stop`: stopped by a signal after a checkpoint (128 + SIGTERM)


def _kueue_meta(run: dict, name: str, component: str) -> dict[str, Any]:
    """Object metadata with the run's Kueue labels: Kueue's Job / StatefulSet / Deployment integrations read them."""
    meta = _meta(run, name, component)
    meta["labels"] = {**kueue_labels(run), **meta["labels"]}
    return meta


def job_suspend(run: dict, live_job: Optional[dict] = None) -> bool:
    """`spec.suspend` of the Job. A run's own `suspend` always holds it. A Kueue run's Job is created suspended
    and then keeps whatever its live value is: Kueue admits it by unsuspending (and preempts by suspending), and
    the operator must never apply the opposite value over Kueue's."""
    if bool((run.get("spec") or {}).get("suspend", False)):
        return True
    if queued_by_kueue(run):
        live = ((live_job or {}).get("spec") or {}).get("suspend")
        return True if live_job is None or live is None else bool(live)
    return False


def job(run: dict, spec: RunSpec, live_job: Optional[dict] = None) -> dict[str, Any]:
    """The learner: an indexed Job, one pod per node. A pod of one rank runs `gprl train` itself (RANK = the
    completion index); a pod of several ranks (one per GPU) runs it under torchrun, which reads its settings from
    the PET_* environment (as in Kubeflow's training operator): nnodes = pods, nproc_per_node = ranks per pod, node
    rank = completion index, static rendezvous at pod 0 through the headless Service. Either way every rank gets
    RANK, LOCAL_RANK, WORLD_SIZE = pods x ranks per pod, MASTER_ADDR and MASTER_PORT."""
    n = names(run)
    replicas = spec.resources.learner_replicas
    metrics_port = spec.output.metrics_port or TRAINER_PORT_METRICS
    per_pod = learner_ranks_per_pod(spec)
    index = {"fieldRef": {"fieldPath": "metadata.annotations['batch.kubernetes.io/job-completion-index']"}}
    master = f"{n['job']}-0.{n['headless']}"
    if per_pod == 1:
        launch: list[str] = []
        rank_env = [
            {"name": "WORLD_SIZE", "value": str(replicas)},
            {"name": "RANK", "valueFrom": index},
            {"name": "MASTER_ADDR", "value": master},
            {"name": "MASTER_PORT", "value": str(RDZV_PORT)},
        ]
    else:
        launch = ["torchrun", "--no-python"]
        rank_env = [
            {"name": "PET_NNODES", "value": str(replicas)},
            {"name": "PET_NPROC_PER_NODE", "value": str(per_pod)},
            {"name": "PET_NODE_RANK", "valueFrom": index},
            {"name": "PET_MASTER_ADDR", "value": master},
            {"name": "PET_MASTER_PORT", "value": str(RDZV_PORT)},
            # a failed rank fails the pod; the Job replaces it and the new pod resumes from the last checkpoint
            {"name": "PET_MAX_RESTARTS", "value": "0"},
            # on SIGTERM torchrun passes it to the ranks and gives them the pod's grace period to checkpoint
            {"name": "PET_SHUTDOWN_TIMEOUT", "value": str(max(spec.resources.termination_grace_period_seconds - 5, 1))},
        ]
    container = {
        "name": "trainer",
        "image": spec.resources.image,
        "command": launch + ["gprl", "train", "--config", f"{CONFIG_DIR}/config.yaml",
                             "--exit-code-on-stop", str(STOPPED_EXIT_CODE)],
        # the address the rollout servers reach rank 0 at to join its weight-sync group (pod 0 holds rank 0)
        "env": _env(run, spec, rank_env + ([{"name": "GPRL_WEIGHT_SYNC_HOST", "value": master}]
                                           if spec.resources.topology == "disaggregated" else [])),
        "ports": [
            {"name": "metrics", "containerPort": metrics_port, "protocol": "TCP"},
            {"name": "rendezvous", "containerPort": RDZV_PORT, "protocol": "TCP"},
            *_weight_sync_ports(spec, "containerPort"),
        ],
    }
    pod = _pod_spec(run, spec, container, with_claim=True, account=True, component="trainer")
    pod["restartPolicy"] = "Never"  # the Job replaces a failed pod; the new one resumes from the last checkpoint
    # SIGTERM (eviction, preemption, suspend) -> the trainer finishes its step, checkpoints it and exits
    # STOPPED_EXIT_CODE; the grace period must cover that, and the podFailurePolicy below makes the Job replace
    # such a pod without counting it against backoffLimit (an exit 0 would mark the index complete).
    pod["terminationGracePeriodSeconds"] = spec.resources.termination_grace_period_seconds
    pod["subdomain"] = n["headless"]
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": _kueue_meta(run, n["job"], "trainer"),
        "spec": {
            "completionMode": "Indexed",
            "completions": replicas,
            "parallelism": replicas,
            "backoffLimit": getattr(spec.resources, "backoff_limit", 3),
            "podFailurePolicy": {"rules": [
                {"action": "Ignore", "onExitCodes": {"containerName": "trainer", "operator": "In",
                                                     "values": [STOPPED_EXIT_CODE]}},
                {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]},
            ]},
            "suspend": job_suspend(run, live_job),
            "template": {"metadata": _template_metadata(run, spec, "trainer"), "spec": pod},
        },
    }


def build_children(run: dict, live_job: Optional[dict] = None) -> list[dict[str, Any]]:
    """Every object the run needs, in the order they should be applied (the Job last). `live_job`: the run's Job
    as last seen (its `spec.suspend` is Kueue's to change on a Kueue run)."""
    run = copy.deepcopy(run)
    spec = run_spec(run)
    out = [config_map(run, spec), network_policy(run, spec), *rbac(run)]
    pvc = checkpoint_claim(run, spec)
    if pvc is not None:
        out.append(pvc)
    cache = model_cache_claim(run, spec)
    if cache is not None:
        out.append(cache)
    out += services(run, spec)
    out += server_deployments(run, spec)
    out.append(job(run, spec, live_job))
    return out


# --------------------------------------------------------------------------------------
# status


def _cond(ctype: str, status: bool, reason: str, message: str, generation: int | None, previous: dict, now: str) -> dict:
    value = "True" if status else "False"
    old = previous.get(ctype) or {}
    same = old.get("status") == value
    out = {
        "type": ctype,
        "status": value,
        "reason": reason,
        "message": message,
        "lastTransitionTime": old.get("lastTransitionTime", now) if same else now,
    }
    if generation is not None:
        out["observedGeneration"] = generation
    return out


def _job_condition(job: dict, ctype: str) -> Optional[dict]:
    for c in (job.get("status") or {}).get("conditions") or []:
        if c.get("type") == ctype and c.get("status") == "True":
            return c
    return None


def job_phase(job: Optional[dict], run: Optional[dict] = None) -> str:
    """The run's phase from its Job. A Kueue run's Job suspended by Kueue (not by the run) is `Queued`."""
    if job is None:
        return "Queued" if run is not None and queued_by_kueue(run) and not (run.get("spec") or {}).get("suspend") \
            else "Pending"
    # SuccessCriteriaMet / FailureTarget come first on Kubernetes >= 1.31; Complete / Failed follow once every pod
    # has terminated
    if _job_condition(job, "Complete") or _job_condition(job, "SuccessCriteriaMet"):
        return "Succeeded"
    if _job_condition(job, "Failed") or _job_condition(job, "FailureTarget"):
        return "Failed"
    if (job.get("spec") or {}).get("suspend"):
        if run is not None and queued_by_kueue(run) and not (run.get("spec") or {}).get("suspend"):
            return "Queued"
        return "Suspended"
    st = job.get("status") or {}
    if st.get("ready") or (st.get("active") and "ready" not in st):
        return "Running"
    return "Pending"


def run_status(
    run: dict,
    job: Optional[dict],
    *,
    now: str,
    pod_failure: Optional[dict] = None,
    generation: Optional[int] = None,
    error: Optional[str] = None,
    reason: str = "ReconcileError",
    note: Optional[tuple[str, str]] = None,
) -> dict[str, Any]:
    """The operator's part of `status`: phase, pod counts, observedGeneration and its conditions.

    `pod_failure` = {"pod", "reason", "message"} of the newest failed pod, if any.
    `generation` is the spec generation just reconciled (None keeps the stored observedGeneration).
    `error` is set when the children could not be applied; `reason` names why (NameConflict, InvalidSpec,
    ApplyRejected, ApplyFailed). `note` = (reason, message) of a healthy run worth a word (ChildRestored).
    Messages are bounded (`ownership.MESSAGE_LIMIT`), whatever the API server answered.
    """
    error = bounded(error) if error else error
    current = run.get("status") or {}
    previous = {c.get("type"): c for c in current.get("conditions") or [] if isinstance(c, dict)}
    gen = generation if generation is not None else current.get("observedGeneration")
    phase = job_phase(job, run)
    st = (job or {}).get("status") or {}
    name = run["metadata"]["name"]

    conds = []
    if error:
        conds.append(_cond("Ready", False, reason, error, gen, previous, now))
    elif job is None:
        conds.append(_cond("Ready", False, "Creating", "children are being created", gen, previous, now))
    elif note:
        conds.append(_cond("Ready", True, note[0], bounded(note[1]), gen, previous, now))
    else:
        conds.append(_cond("Ready", True, "ChildrenApplied", f"Job {job['metadata']['name']} and its objects exist", gen, previous, now))
    running = phase == "Running"
    conds.append(
        _cond("Running", running, "PodsReady" if running else phase, f"{st.get('ready', 0) or 0} ready, "
              f"{st.get('active', 0) or 0} active pod(s)", gen, previous, now)
    )
    done = _job_condition(job or {}, "Complete") or _job_condition(job or {}, "SuccessCriteriaMet")
    conds.append(
        _cond("Succeeded", bool(done), (done or {}).get("reason") or ("Completed" if done else "NotCompleted"),
              (done or {}).get("message") or ("all ranks completed" if done else ""), gen, previous, now)
    )
    failed = _job_condition(job or {}, "Failed") or _job_condition(job or {}, "FailureTarget")
    conds.append(
        _cond("Failed", bool(failed), (failed or {}).get("reason") or ("JobFailed" if failed else "NotFailed"),
              (failed or {}).get("message") or "", gen, previous, now)
    )
    suspended = phase in ("Suspended", "Queued")
    queue = kueue_labels(run).get(KUEUE_QUEUE_LABEL)
    conds.append(
        _cond("Suspended", suspended,
              "QueuedByKueue" if phase == "Queued" else "SuspendedBySpec" if suspended else "NotSuspended",
              f"waiting for Kueue to admit the Job (queue {queue})" if phase == "Queued"
              else "spec.suspend is true; the Job's pods are stopped" if suspended else "", gen, previous, now)
    )
    if pod_failure:
        conds.append(
            _cond("PodFailed", True, pod_failure.get("reason") or "PodFailed",
                  f"pod {pod_failure.get('pod')}: {pod_failure.get('message') or pod_failure.get('reason')}",
                  gen, previous, now)
        )
    else:
        conds.append(_cond("PodFailed", False, "NoFailedPods", "", gen, previous, now))

    out: dict[str, Any] = {
        "phase": phase,
        "jobName": name,
        "activePods": int(st.get("active") or 0),
        "readyPods": int(st.get("ready") or 0),
        "failedPods": int(st.get("failed") or 0),
        "succeededPods": int(st.get("succeeded") or 0),
        "conditions": conds,
    }
    if gen is not None:
        out["observedGeneration"] = int(gen)
    if st.get("startTime"):
        out["startTime"] = st["startTime"]
    if st.get("completionTime"):
        out["completionTime"] = st["completionTime"]
    if error:
        out["message"] = error
    elif pod_failure and phase != "Succeeded":
        out["message"] = f"pod {pod_failure.get('pod')} failed: {pod_failure.get('reason')}"
    return out


def pod_failure(pod: dict) -> Optional[dict]:
    """{pod, reason, message} for a Failed pod (the terminated container's reason and exit code), else None."""
    st = pod.get("status") or {}
    if st.get("phase") != "Failed":
        return None
    reason, message = st.get("reason"), st.get("message")
    for cs in st.get("containerStatuses") or []:
        term = (cs.get("state") or {}).get("terminated") or (cs.get("lastState") or {}).get("terminated")
        if term:
            reason = term.get("reason") or reason
            message = f"container {cs.get('name')} exited with code {term.get('exitCode')}" + (
                f": {term['message']}" if term.get("message") else f" ({term.get('reason')})" if term.get("reason") else ""
            )
            break
    return {"pod": pod["metadata"]["name"], "reason": reason or "Failed", "message": message or reason or "pod failed"}
