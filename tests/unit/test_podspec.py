"""Pod overrides, model sources, Kueue and the torchrun launch: the run config's verdicts and the operator's
pure builders (the same cases against the real API server: tests/cluster/test_podspec_cluster.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT / "operator") not in sys.path:
    sys.path.insert(0, str(ROOT / "operator"))

from gprl.config import ConfigError, parse_config  # noqa: E402
from gprl.api.pods import parse_source  # noqa: E402
from gprl_operator.children import (  # noqa: E402
    build_children,
    job_phase,
    referenced_claims,
    referenced_secrets,
    run_spec,
    run_status,
)

OVERRIDES = {
    "all": {
        "labels": {"team": "nlp"},
        "annotations": {"example.com/cost-center": "42"},
        "nodeSelector": {"gpu.example.com/product": "H100"},
        "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "ml", "effect": "NoSchedule"}],
        "priorityClassName": "research-high",
        "imagePullSecrets": ["registry-cred"],
        "env": [{"name": "NCCL_DEBUG", "value": "WARN"},
                {"name": "NODE_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.hostIP"}}}],
        "volumes": [{"name": "datasets", "persistentVolumeClaim": {"claimName": "shared-data", "readOnly": True}}],
        "volumeMounts": [{"name": "datasets", "mountPath": "/data", "readOnly": True}],
    },
    "learner": {
        "affinity": {"podAntiAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [
            {"topologyKey": "kubernetes.io/hostname", "labelSelector": {"matchLabels": {"team": "nlp"}}}]}},
        "volumes": [{"name": "scratch", "emptyDir": {"sizeLimit": "100Gi"}}],
        "volumeMounts": [{"name": "scratch", "mountPath": "/scratch"}],
    },
    "rollout": {"labels": {"role": "generator"}},
    "gpm": {"env": [{"name": "GPM_ONLY", "value": "1"}]},
}


def make_run(spec=None, name="demo", labels=None):
    meta = {"name": name, "namespace": "ml", "uid": "u-1", "generation": 1}
    if labels:
        meta["labels"] = labels
    return {"apiVersion": "gprl.dev/v1alpha1", "kind": "GPRLRun", "metadata": meta, "spec": spec or {}}


def pods_by_role(children):
    """component -> (pod template, kind) of every workload."""
    out = {}
    for c in children:
        if c["kind"] in ("Job", "StatefulSet", "Deployment"):
            t = c["spec"]["template"]
            out[t["metadata"]["labels"]["app.kubernetes.io/component"]] = (t, c)
    return out


def test_overrides_reach_every_role_and_role_blocks_only_their_own():
    spec = {"resources": {"topology": "disaggregated", "gpus": 1, "tolerations": [{"key": "spot", "operator": "Exists"}],
                          "pods": OVERRIDES}}
    roles = pods_by_role(build_children(make_run(spec)))
    assert set(roles) == {"trainer", "rollout", "gpm"}
    for role, (t, _) in roles.items():
        pod, (c,) = t["spec"], t["spec"]["containers"]
        assert t["metadata"]["labels"]["team"] == "nlp" and t["metadata"]["labels"]["gprl.dev/run"] == "demo"
        assert t["metadata"]["annotations"] == {"example.com/cost-center": "42"}
        assert pod["nodeSelector"] == {"gpu.example.com/product": "H100"}
        keys = [x.get("key") for x in pod["tolerations"]]
        assert keys == ["nvidia.com/gpu", "spot", "dedicated"]  # operator's, resources.tolerations, pods.all
        assert pod["priorityClassName"] == "research-high"
        assert pod["imagePullSecrets"] == [{"name": "registry-cred"}]
        env = {e["name"]: e for e in c["env"]}
        assert env["NCCL_DEBUG"]["value"] == "WARN"
        assert env["NODE_IP"]["valueFrom"] == {"fieldRef": {"fieldPath": "status.hostIP"}}
        assert ("GPM_ONLY" in env) == (role == "gpm")
        vols = {v["name"]: v for v in pod["volumes"]}
        assert vols["datasets"] == {"name": "datasets", "persistentVolumeClaim": {"claimName": "shared-data",
                                                                                  "readOnly": True}}
        mounts = {m["name"]: m for m in c["volumeMounts"]}
        assert mounts["datasets"] == {"name": "datasets", "mountPath": "/data", "readOnly": True}
        assert ("scratch" in vols) == ("scratch" in mounts) == (role == "trainer")
        assert ("affinity" in pod) == (role == "trainer")
        assert (t["metadata"]["labels"].get("role") == "generator") == (role == "rollout")
        assert c["securityContext"]["allowPrivilegeEscalation"] is False  # the sandbox is untouched
    aff = roles["trainer"][0]["spec"]["affinity"]["podAntiAffinity"]
    assert aff["requiredDuringSchedulingIgnoredDuringExecution"][0]["topologyKey"] == "kubernetes.io/hostname"


@pytest.mark.parametrize("pods,field", [
    ({"all": {"volumes": [{"name": "h", "hostPath": {"path": "/"}}]}}, "hostPath"),
    ({"all": {"volumes": [{"name": "s", "secret": {"secretName": "db"}}]}}, "secret"),
    ({"all": {"volumes": [{"name": "two", "emptyDir": {}, "configMap": {"name": "x"}}]}}, "exactly one"),
    ({"all": {"volumes": [{"name": "config", "emptyDir": {}}]}}, "operator's"),
    ({"all": {"env": [{"name": "T", "valueFrom": {"secretKeyRef": {"name": "db", "key": "pw"}}}]}}, "secretKeyRef"),
    ({"all": {"env": [{"name": "GPRL_CONFIG", "value": "/tmp/evil.yaml"}]}}, "reserved"),
    ({"all": {"env": [{"name": "MASTER_ADDR", "value": "evil"}]}}, "reserved"),
    ({"learner": {"securityContext": {"privileged": True}}}, "securityContext"),
    ({"learner": {"privileged": True}}, "privileged"),
    ({"rollout": {"hostNetwork": True}}, "host"),
    ({"gpm": {"hostPID": True}}, "host"),
    ({"all": {"priorityClassName": "system-node-critical"}}, "system-"),
    ({"all": {"labels": {"gprl.dev/run": "other"}}}, "operator's"),
    ({"all": {"labels": {"bad key!": "x"}}}, "qualified name"),
    ({"all": {"annotations": {"container.apparmor.security.beta.kubernetes.io/trainer": "unconfined"}}}, "sandbox"),
    ({"all": {"volumes": [{"name": "v", "emptyDir": {}}], "volumeMounts": [{"name": "v", "mountPath": "/etc/gprl"}]}},
     "collides"),
    ({"all": {"volumes": [{"name": "v", "emptyDir": {}}], "volumeMounts": [{"name": "v", "mountPath": "/data/../etc"}]}},
     ".."),
    ({"learner": {"volumeMounts": [{"name": "nope", "mountPath": "/data"}]}}, "names no volume"),
    ({"all": {"tolerations": [{"key": "a", "effect": "Sometimes"}]}}, "effect"),
])
def test_disallowed_overrides_are_refused_naming_the_field(pods, field):
    with pytest.raises(ConfigError) as err:
        parse_config({"resources": {"pods": pods}})
    text = str(err.value)
    assert "resources.pods" in text and field in text, text


# --------------------------------------------------------------------------------------
# model sources


def test_sources_parse_and_refuse_malformed():
    s = parse_source("hf://meta-llama/Llama-3.1-8B-Instruct@main")
    assert (s.kind, s.repo, s.revision, s.local_path()) == (
        "hf", "meta-llama/Llama-3.1-8B-Instruct", "main", "/models/hub/models/meta-llama/Llama-3.1-8B-Instruct/main")
    d = parse_source("hf://datasets/org/prompts")
    assert d.repo_type == "dataset" and d.local_path() == "/models/hub/datasets/org/prompts/main"
    p = parse_source("pvc://models/llama/8b")
    assert (p.kind, p.repo, p.local_path()) == ("pvc", "models", "/models/pvc/models/llama/8b")
    assert parse_source("world:policy").kind == "local"
    for bad, field in (("hf://", "model.policy"), ("hf://a/b/c", "model.policy"), ("pvc://Bad_Claim/x", "gpm.path"),
                       ("pvc://models/../etc", "data.prompts")):
        section, name = field.split(".")
        with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
            parse_config({section: {name: bad}})


def test_hub_and_volume_sources_become_an_init_container_and_read_only_mounts():
    spec = {
        "model": {"policy": "hf://meta-llama/Llama-3.1-8B-Instruct", "reference": "pvc://models/llama-8b-sft"},
        "gpm": {"path": "pvc://models/gpm-8b"},
        "data": {"prompts": "hf://datasets/org/prompts"},
        "resources": {"topology": "disaggregated", "modelCache": {"size": "300Gi", "storageClass": "fast-rwx",
                                                                   "hubTokenSecret": {"name": "hf-token"}}},
    }
    run = make_run(spec)
    kids = build_children(run)
    cfg = yaml.safe_load(next(c for c in kids if c["kind"] == "ConfigMap")["data"]["config.yaml"])
    assert cfg["model"]["policy"] == "/models/hub/models/meta-llama/Llama-3.1-8B-Instruct/main"
    assert cfg["model"]["reference"] == "/models/pvc/models/llama-8b-sft"
    assert cfg["gpm"]["path"] == "/models/pvc/models/gpm-8b"
    assert cfg["data"]["prompts"] == "hf:/models/hub/datasets/org/prompts/main"
    (cache,) = [c for c in kids if c["kind"] == "PersistentVolumeClaim" and c["metadata"]["name"] == "demo-models"]
    assert cache["spec"] == {"accessModes": ["ReadWriteMany"], "resources": {"requests": {"storage": "300Gi"}},
                             "storageClassName": "fast-rwx"}
    for role, (t, _) in pods_by_role(kids).items():
        pod, (c,) = t["spec"], t["spec"]["containers"]
        (init,) = pod["initContainers"]
        assert init["command"] == ["gprl", "fetch", "--dest", "/models/hub", "hf://meta-llama/Llama-3.1-8B-Instruct",
                                   "hf://datasets/org/prompts"]
        ienv = {e["name"]: e for e in init["env"]}
        assert ienv["HF_TOKEN"]["valueFrom"] == {"secretKeyRef": {"name": "hf-token", "key": "token"}}
        assert {m["name"]: m.get("readOnly", False) for m in init["volumeMounts"]}["gprl-hub-cache"] is False
        assert init["securityContext"]["allowPrivilegeEscalation"] is False
        mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
        assert mounts["/models/hub"]["readOnly"] is True and mounts["/models/pvc/models"]["readOnly"] is True
        vols = {v["name"]: v for v in pod["volumes"]}
        assert vols[mounts["/models/pvc/models"]["name"]]["persistentVolumeClaim"] == {"claimName": "models",
                                                                                        "readOnly": True}
        env = {e["name"]: e.get("value") for e in c["env"]}
        assert env["HF_HUB_OFFLINE"] == "1" and "HF_TOKEN" not in env  # only the download container sees the token
    s = run_spec(run)
    assert referenced_claims(s) == ["models"] and referenced_secrets(s) == ["hf-token"]


def test_shared_cache_claim_and_local_sources_need_nothing():
    kids = build_children(make_run({"model": {"policy": "hf://org/m"}, "resources": {"modelCache": {"claim": "hub"}}}))
    assert not [c for c in kids if c["metadata"]["name"] == "demo-models"]
    pod = pods_by_role(kids)["trainer"][0]["spec"]
    assert {v["name"]: v for v in pod["volumes"]}["gprl-hub-cache"]["persistentVolumeClaim"] == {"claimName": "hub"}
    assert "hub" in referenced_claims(run_spec(make_run({"model": {"policy": "hf://org/m"},
                                                         "resources": {"modelCache": {"claim": "hub"}}})))
    plain = pods_by_role(build_children(make_run()))["trainer"][0]["spec"]
    assert "initContainers" not in plain and not any(v["name"].startswith("gprl-") for v in plain["volumes"])


# --------------------------------------------------------------------------------------
# Kueue


def test_kueue_run_is_labelled_created_suspended_and_keeps_kueues_suspend():
    labels = {"kueue.x-k8s.io/queue-name": "team-a", "kueue.x-k8s.io/priority-class": "high", "other": "x"}
    run = make_run({"resources": {"topology": "disaggregated"}}, labels=labels)
    kids = build_children(run)
    for c in kids:
        if c["kind"] in ("Job", "StatefulSet", "Deployment"):
            assert c["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a"
            assert c["metadata"]["labels"]["kueue.x-k8s.io/priority-class"] == "high"
            assert "other" not in c["metadata"]["labels"]
    job = next(c for c in kids if c["kind"] == "Job")
    assert job["spec"]["suspend"] is True  # created suspended: Kueue admits it
    admitted = {"spec": {"suspend": False}}
    assert next(c for c in build_children(run, live_job=admitted) if c["kind"] == "Job")["spec"]["suspend"] is False
    preempted = {"spec": {"suspend": True}}
    assert next(c for c in build_children(run, live_job=preempted) if c["kind"] == "Job")["spec"]["suspend"] is True
    paused = make_run({"suspend": True}, labels=labels)  # the run's own suspend always holds the Job
    assert next(c for c in build_children(paused, live_job=admitted) if c["kind"] == "Job")["spec"]["suspend"] is True
    plain = make_run()  # without Kueue: the run's suspend only
    assert next(c for c in build_children(plain, live_job=preempted) if c["kind"] == "Job")["spec"]["suspend"] is False


def test_queued_phase():
    labels = {"kueue.x-k8s.io/queue-name": "team-a"}
    run = make_run(labels=labels)
    waiting = {"metadata": {"name": "demo"}, "spec": {"suspend": True}, "status": {}}
    assert job_phase(waiting, run) == "Queued"
    assert job_phase(None, run) == "Queued"
    assert job_phase(waiting, make_run()) == "Suspended"
    assert job_phase(waiting, make_run({"suspend": True}, labels=labels)) == "Suspended"
    st = run_status(run, waiting, now="2026-01-01T00:00:00Z")
    assert st["phase"] == "Queued"
    cond = next(c for c in st["conditions"] if c["type"] == "Suspended")
    assert cond["reason"] == "QueuedByKueue" and "team-a" in cond["message"]
    running = {"metadata": {"name": "demo"}, "spec": {"suspend": False}, "status": {"active": 1, "ready": 1}}
    assert job_phase(running, run) == "Running"


# --------------------------------------------------------------------------------------
# every GPU used


@pytest.mark.parametrize("res,nproc", [({"gpus": 8}, "8"), ({"gpus": 0, "learnerProcessesPerPod": 2}, "2")])
def test_learner_launches_one_rank_per_gpu(res, nproc):
    job = next(c for c in build_children(make_run({"resources": {"learnerReplicas": 2, **res}})) if c["kind"] == "Job")
    (c,) = job["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e for e in c["env"]}
    assert c["command"][:4] == ["torchrun", "--no-python", "gprl", "train"]
    assert env["PET_NNODES"]["value"] == "2" and env["PET_NPROC_PER_NODE"]["value"] == nproc
    assert "job-completion-index" in env["PET_NODE_RANK"]["valueFrom"]["fieldRef"]["fieldPath"]
    assert env["PET_MASTER_ADDR"]["value"] == "demo-0.demo"
    assert int(env["PET_SHUTDOWN_TIMEOUT"]["value"]) < job["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert "RANK" not in env and "WORLD_SIZE" not in env  # torchrun sets them per rank


def test_one_rank_per_pod_runs_the_trainer_itself():
    job = next(c for c in build_children(make_run({"resources": {"learnerReplicas": 3, "gpus": 1}}))
               if c["kind"] == "Job")
    (c,) = job["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e for e in c["env"]}
    assert c["command"][:2] == ["gprl", "train"]
    assert env["WORLD_SIZE"]["value"] == "3" and "job-completion-index" in str(env["RANK"])


def test_tensor_parallel_fits_the_pod():
    parse_config({"rollout": {"tensorParallelSize": 4}, "resources": {"topology": "disaggregated", "gpus": 4}})
    with pytest.raises(ConfigError, match="tensor_parallel_size"):
        parse_config({"rollout": {"tensorParallelSize": 8}, "resources": {"topology": "disaggregated", "gpus": 4}})


def test_per_role_resources():
    spec = {"rollout": {"tensorParallelSize": 2},
            "resources": {"topology": "disaggregated", "gpus": 8, "cpu": "32", "memory": "400Gi",
                          "pods": {"rollout": {"gpus": 2, "memory": "64Gi"}, "gpm": {"gpus": 1, "cpu": "8"}}}}
    roles = pods_by_role(build_children(make_run(spec)))
    res = {r: t["spec"]["containers"][0]["resources"]["requests"] for r, (t, _) in roles.items()}
    assert res["trainer"] == {"cpu": "32", "memory": "400Gi", "nvidia.com/gpu": "8"}
    assert res["rollout"] == {"cpu": "32", "memory": "64Gi", "nvidia.com/gpu": "2"}
    assert res["gpm"] == {"cpu": "8", "memory": "400Gi", "nvidia.com/gpu": "1"}
    with pytest.raises(ConfigError, match="rollout pods' GPUs"):
        parse_config({**spec, "rollout": {"tensorParallelSize": 4}})
    cpu_gpm = {"resources": {"topology": "disaggregated", "gpus": 1, "pods": {"gpm": {"gpus": 0}}}}
    gpm = pods_by_role(build_children(make_run(cpu_gpm)))["gpm"][0]["spec"]
    assert "tolerations" not in gpm
    assert {"name": "CUDA_VISIBLE_DEVICES", "value": ""} in gpm["containers"][0]["env"]


def test_recipe_in_the_docs_is_valid_and_uses_every_gpu():
    """docs/recipes.md's 8B manifest passes the run config's validation and builds the topology it describes."""
    text = (ROOT / "docs" / "recipes.md").read_text()
    (block,) = [b.split("\n", 1)[1] for b in text.split("```")[1::2] if b.startswith("yaml")]
    manifest = yaml.safe_load(block)
    run = {**manifest, "metadata": {**manifest["metadata"], "uid": "u-8b", "generation": 1}}
    roles = pods_by_role(build_children(run))
    gpus = {r: t["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] for r, (t, _) in roles.items()}
    assert gpus == {"trainer": "8", "rollout": "2", "gpm": "1"}
    (c,) = roles["trainer"][0]["spec"]["containers"]
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["PET_NNODES"] == "2" and env["PET_NPROC_PER_NODE"] == "8"
    assert roles["trainer"][0]["spec"]["initContainers"][0]["name"] == "fetch-models"
    job = roles["trainer"][1]
    assert job["spec"]["suspend"] is True and job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-nlp"


def test_cluster_sources_outside_the_cluster(tmp_path, monkeypatch):
    """`gprl train` reads hf:// as the hub id it names (through the HF cache, offline here) and refuses pvc://."""
    from gprl import sources

    seen = []
    monkeypatch.setattr(sources, "hub_snapshot", lambda repo, field, log=print, repo_type="model":
                        seen.append(repo) or str(tmp_path))
    assert sources.resolve_model("hf://org/model@v1", "model.policy") == str(tmp_path)
    assert seen == ["org/model@v1"]
    with pytest.raises(sources.SourceError, match="PersistentVolumeClaim"):
        sources.resolve_model("pvc://models/llama", "model.policy")
