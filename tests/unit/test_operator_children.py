"""Pure-function tests of the operator's spec -> manifests mapping and of the generated CRD files (no cluster)."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT / "operator") not in sys.path:  # until the operator package is installed with the project
    sys.path.insert(0, str(ROOT / "operator"))

from gprl import crd  # noqa: E402
from gprl.config import RunSpec  # noqa: E402
from gprl_operator.children import (  # noqa: E402
    InvalidRun,
    build_children,
    job_phase,
    pod_failure,
    rendered_config,
    run_status,
)


def make_run(name="demo", spec=None, **meta):
    return {
        "apiVersion": "gprl.dev/v1alpha1",
        "kind": "GPRLRun",
        "metadata": {"name": name, "namespace": "ml", "uid": "1234-abcd", "generation": 1, **meta},
        "spec": spec if spec is not None else {},
    }


def by_kind(children):
    out = {}
    for c in children:
        out.setdefault(c["kind"], []).append(c)
    return out


# --------------------------------------------------------------------------------------
# generated files


@pytest.mark.parametrize("rel", sorted(crd.OUTPUTS))
def test_generated_file_is_fresh(rel):
    expected = crd.expected_files()[rel]
    path = ROOT / rel
    assert path.exists(), f"{rel} is missing; run `python -m gprl.crd --write`"
    assert path.read_text() == expected, f"{rel} is stale; run `python -m gprl.crd --write`"


def test_crd_shape():
    c = crd.build_crd()
    assert c["spec"]["names"]["shortNames"] == ["gr"]
    v = c["spec"]["versions"][0]
    assert v["subresources"] == {"status": {}}
    assert [col["name"] for col in v["additionalPrinterColumns"]] == ["Phase", "Ready", "Reason", "Step", "Drift", "Age"]
    spec = v["schema"]["openAPIV3Schema"]["properties"]["spec"]
    text = yaml.safe_dump(c)
    assert "$ref" not in text and "anyOf" not in text and "title" not in text
    assert spec["properties"]["suspend"]["type"] == "boolean"
    algo = spec["properties"]["algo"]["properties"]
    assert algo["groupSize"]["minimum"] == 2
    assert algo["learningRate"]["exclusiveMinimum"] is True and algo["learningRate"]["minimum"] == 0
    assert spec["properties"]["model"]["properties"]["reference"]["nullable"] is True
    assert set(spec["properties"]["rollout"]["properties"]["backend"]["enum"]) == {"hf", "vllm"}
    rules = [r["rule"] for r in spec["x-kubernetes-validations"]]
    assert any("pinnedWeights" in r for r in rules) and any("klCoefMax" in r for r in rules)
    # the change marks are one transition rule on spec (see gprl.crd._transition_rules), naming the field it refuses
    (marks,) = [r for r in spec["x-kubernetes-validations"] if "messageExpression" in r]
    assert marks["rule"].startswith("self == oldSelf || ") and "oldSelf.model.policy" in marks["rule"]
    assert "'spec.model.policy is immutable: " in marks["messageExpression"]
    assert not [r for r in spec["properties"]["model"].get("x-kubernetes-validations", []) if "oldSelf" in r["rule"]]


def test_crd_command_prints_yaml_and_markdown(capsys):
    crd.main([])
    assert yaml.safe_load(capsys.readouterr().out)["kind"] == "CustomResourceDefinition"
    crd.main(["--markdown"])
    assert capsys.readouterr().out.startswith("<!-- GENERATED")


def test_every_runspec_leaf_is_in_the_crd():
    spec = crd.spec_schema()

    def leaves(model, node, prefix=""):
        for name, field in model.model_fields.items():
            alias = field.alias or name
            assert alias in node["properties"], f"{prefix}{alias} missing from the CRD"
            ann = field.annotation
            if isinstance(ann, type) and hasattr(ann, "model_fields"):
                leaves(ann, node["properties"][alias], f"{prefix}{alias}.")

    leaves(RunSpec, spec)


# --------------------------------------------------------------------------------------
# children


def test_default_run_children():
    kids = build_children(make_run())
    kinds = [c["kind"] for c in kids]
    assert kinds == ["ConfigMap", "NetworkPolicy", "ServiceAccount", "Role", "RoleBinding", "PersistentVolumeClaim",
                     "Service", "Service", "Job"]
    for c in kids:
        assert c["metadata"]["namespace"] == "ml"
        (ref,) = c["metadata"]["ownerReferences"]
        assert ref == {"apiVersion": "gprl.dev/v1alpha1", "kind": "GPRLRun", "name": "demo", "uid": "1234-abcd",
                       "controller": True, "blockOwnerDeletion": True}
        assert c["metadata"]["labels"]["gprl.dev/run"] == "demo"
    names = [(c["kind"], c["metadata"]["name"]) for c in kids]
    assert len(set(names)) == len(names)


def test_job_is_indexed_non_root_and_requests_gpus():
    run = make_run(spec={"resources": {"learnerReplicas": 4, "gpus": 8, "cpu": "16", "memory": "200Gi",
                                       "envFromSecrets": ["hf-token"]}})
    job = by_kind(build_children(run))["Job"][0]
    s = job["spec"]
    assert s["completionMode"] == "Indexed" and s["completions"] == 4 and s["parallelism"] == 4
    assert s["suspend"] is False
    pod = s["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
    (c,) = pod["containers"]
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    assert c["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert c["resources"]["requests"] == {"cpu": "16", "memory": "200Gi", "nvidia.com/gpu": "8"}
    assert c["resources"]["limits"]["nvidia.com/gpu"] == "8"
    assert c["envFrom"] == [{"secretRef": {"name": "hf-token"}}]
    env = {e["name"]: e for e in c["env"]}
    # torchrun: 4 nodes x 8 ranks (one per GPU), node rank = completion index, rendezvous at pod 0
    assert c["command"][:3] == ["torchrun", "--no-python", "gprl"]
    assert env["PET_NNODES"]["value"] == "4" and env["PET_NPROC_PER_NODE"]["value"] == "8"
    assert "job-completion-index" in env["PET_NODE_RANK"]["valueFrom"]["fieldRef"]["fieldPath"]
    assert env["PET_MASTER_ADDR"]["value"] == "demo-0.demo"
    assert pod["subdomain"] == "demo"
    assert pod["serviceAccountName"] == "demo-trainer"
    assert not any("secret" in str(e.get("value", "")).lower() for e in c["env"])


def test_checkpoint_claim_mounted_at_output_dir():
    kids = by_kind(build_children(make_run(spec={"output": {"dir": "runs/exp1"}})))
    pvc = kids["PersistentVolumeClaim"][0]
    assert pvc["metadata"]["name"] == "demo-checkpoints"
    assert pvc["spec"]["resources"]["requests"]["storage"] == "50Gi"
    pod = kids["Job"][0]["spec"]["template"]["spec"]
    mounts = {m["name"]: m for m in pod["containers"][0]["volumeMounts"]}
    assert mounts["checkpoints"]["mountPath"] == "/workspace/runs/exp1"
    vols = {v["name"]: v for v in pod["volumes"]}
    assert vols["checkpoints"]["persistentVolumeClaim"]["claimName"] == "demo-checkpoints"
    cfg = yaml.safe_load(kids["ConfigMap"][0]["data"]["config.yaml"])
    assert cfg["output"]["dir"] == "/workspace/runs/exp1"
    assert cfg["checkpoint"]["resume"] is True


def test_existing_claim_is_used_not_created():
    kids = by_kind(build_children(make_run(spec={"resources": {"checkpointClaim": "shared", "storageClass": "x"}})))
    assert "PersistentVolumeClaim" not in kids
    vols = {v["name"]: v for v in kids["Job"][0]["spec"]["template"]["spec"]["volumes"]}
    assert vols["checkpoints"]["persistentVolumeClaim"]["claimName"] == "shared"


def test_multi_rank_claim_is_rwx():
    pvc = by_kind(build_children(make_run(spec={"resources": {"learnerReplicas": 2, "storageClass": "nfs"}})))[
        "PersistentVolumeClaim"][0]
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"] and pvc["spec"]["storageClassName"] == "nfs"


def test_role_is_least_privilege():
    role = by_kind(build_children(make_run()))["Role"][0]
    for rule in role["rules"]:
        assert rule["resourceNames"] == ["demo"]
        assert rule["apiGroups"] == ["gprl.dev"]
        assert not set(rule["verbs"]) & {"create", "delete", "update", "*"}
    assert {r["resources"][0]: set(r["verbs"]) for r in role["rules"]} == {
        "gprlruns": {"get", "list", "watch"}, "gprlruns/status": {"get", "patch"}}


def test_config_map_holds_the_validated_config():
    run = make_run(spec={"algo": {"groupSize": 4, "klCoef": 0.1}, "drift": {"tau": 0.2}, "suspend": True})
    cm = by_kind(build_children(run))["ConfigMap"][0]
    cfg = yaml.safe_load(cm["data"]["config.yaml"])
    assert cfg["algo"]["groupSize"] == 4 and cfg["drift"]["tau"] == 0.2
    RunSpec.model_validate(cfg)  # round-trips
    assert "suspend" not in cfg


def test_drift_update_changes_only_the_config_map():
    a = build_children(make_run(spec={"drift": {"tau": 0.05}}))
    b = build_children(make_run(spec={"drift": {"tau": 0.3}}, generation=2))
    diff = [x["kind"] for x, y in zip(a, b) if x != y]
    assert diff == ["ConfigMap"]


def test_suspend_maps_to_job_suspend():
    job = by_kind(build_children(make_run(spec={"suspend": True})))["Job"][0]
    assert job["spec"]["suspend"] is True


def test_cpu_only_run_requests_no_gpu():
    job = by_kind(build_children(make_run(spec={"resources": {"gpus": 0}})))["Job"][0]
    c = job["spec"]["template"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in c["resources"]["requests"]
    assert "tolerations" not in job["spec"]["template"]["spec"]


def test_disaggregated_topology_adds_servers_and_wires_urls():
    run = make_run(spec={"resources": {"topology": "disaggregated", "rolloutReplicas": 3, "gpmReplicas": 2}})
    children = build_children(run)
    kids = by_kind(children)
    (sts,) = kids["StatefulSet"]
    (gpm,) = kids["Deployment"]
    assert sts["metadata"]["name"] == "demo-rollout" and sts["spec"]["replicas"] == 3
    assert gpm["metadata"]["name"] == "demo-gpm" and gpm["spec"]["replicas"] == 2
    cfg = rendered_config(run)
    # one URL per rollout pod (stable StatefulSet names through the headless Service): every replica gets every push
    assert cfg["rollout"]["serverUrls"] == [f"http://demo-rollout-{i}.demo-rollout.ml.svc:8000" for i in range(3)]
    assert cfg["gpm"]["serverUrl"] == "http://demo-gpm.ml.svc:8001"
    services = {s["metadata"]["name"]: s for s in kids["Service"]}
    assert set(services) == {"demo", "demo-metrics", "demo-rollout", "demo-gpm"}
    assert yaml.safe_load(kids["ConfigMap"][0]["data"]["config.yaml"])["rollout"]["serverUrls"] == cfg["rollout"]["serverUrls"]


def test_rollout_servers_are_a_statefulset_behind_a_headless_service():
    run = make_run(spec={"resources": {"topology": "disaggregated", "rolloutReplicas": 2, "gpus": 1}})
    children = build_children(run)
    kids = by_kind(children)
    (sts,) = kids["StatefulSet"]
    svc = {s["metadata"]["name"]: s for s in kids["Service"]}["demo-rollout"]
    assert svc["spec"]["clusterIP"] == "None" and svc["spec"]["publishNotReadyAddresses"] is True
    assert svc["spec"]["ports"] == [{"name": "http", "port": 8000, "targetPort": "http", "protocol": "TCP"}]
    spec = sts["spec"]
    assert spec["serviceName"] == "demo-rollout" and spec["podManagementPolicy"] == "Parallel"
    sel = {"gprl.dev/run": "demo", "app.kubernetes.io/component": "rollout"}
    assert spec["selector"]["matchLabels"] == sel == svc["spec"]["selector"]
    assert sel.items() <= spec["template"]["metadata"]["labels"].items()
    (c,) = spec["template"]["spec"]["containers"]
    assert c["command"] == ["gprl", "serve-rollout", "--config", "/etc/gprl/config.yaml", "--host", "0.0.0.0",
                            "--port", "8000"]
    assert c["readinessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert c["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert "volumeClaimTemplates" not in spec  # no per-pod state: a replaced pod is re-synced by the learner
    for obj in (sts, svc):
        assert obj["metadata"]["labels"]["gprl.dev/run"] == "demo"
        assert obj["metadata"]["labels"]["app.kubernetes.io/component"] == "rollout"
        (ref,) = obj["metadata"]["ownerReferences"]
        assert ref["kind"] == "GPRLRun" and ref["uid"] == "1234-abcd" and ref["controller"] is True
    # the headless Service is applied before its StatefulSet, both before the learner Job
    order = [(c["kind"], c["metadata"]["name"]) for c in children]
    assert order.index(("Service", "demo-rollout")) < order.index(("StatefulSet", "demo-rollout")) < order.index(("Job", "demo"))
    # the GPM servers stay a load-balanced Service (no clusterIP: None)
    assert "clusterIP" not in {s["metadata"]["name"]: s for s in kids["Service"]}["demo-gpm"]["spec"]


def test_invalid_spec_raises():
    with pytest.raises(InvalidRun, match="epsHigh|eps_high"):
        build_children(make_run(spec={"algo": {"epsLow": 0.3, "epsHigh": 0.1}}))


def test_build_children_does_not_mutate_its_input():
    run = make_run(spec={"algo": {"groupSize": 4}})
    before = copy.deepcopy(run)
    build_children(run)
    assert run == before


# --------------------------------------------------------------------------------------
# status


def job_with(**status):
    return {"metadata": {"name": "demo"}, "spec": {"suspend": status.pop("suspend", False)}, "status": status}


@pytest.mark.parametrize(
    "job,phase",
    [
        (None, "Pending"),
        (job_with(active=1, ready=0), "Pending"),
        (job_with(active=2, ready=2), "Running"),
        (job_with(suspend=True), "Suspended"),
        (job_with(conditions=[{"type": "Complete", "status": "True"}]), "Succeeded"),
        (job_with(conditions=[{"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded"}]), "Failed"),
    ],
)
def test_job_phase(job, phase):
    assert job_phase(job) == phase


def test_run_status_conditions_and_generation():
    run = make_run(generation=3)
    st = run_status(run, job_with(active=1, ready=1), now="2026-01-01T00:00:00Z", generation=3)
    assert st["phase"] == "Running" and st["observedGeneration"] == 3
    conds = {c["type"]: c for c in st["conditions"]}
    assert conds["Ready"]["status"] == "True" and conds["Running"]["status"] == "True"
    assert conds["Failed"]["status"] == "False"
    # lastTransitionTime is kept while a condition's status does not change
    run["status"] = st
    st2 = run_status(run, job_with(active=1, ready=1), now="2026-01-02T00:00:00Z", generation=3)
    assert {c["type"]: c["lastTransitionTime"] for c in st2["conditions"]}["Running"] == "2026-01-01T00:00:00Z"


def test_failed_pod_reason_in_conditions():
    pod = {"metadata": {"name": "demo-0-abc"}, "status": {"phase": "Failed", "containerStatuses": [
        {"name": "trainer", "state": {"terminated": {"exitCode": 137, "reason": "OOMKilled"}}}]}}
    failure = pod_failure(pod)
    assert failure["reason"] == "OOMKilled" and "137" in failure["message"]
    st = run_status(make_run(), job_with(active=1), now="t", pod_failure=failure)
    cond = {c["type"]: c for c in st["conditions"]}["PodFailed"]
    assert cond["status"] == "True" and cond["reason"] == "OOMKilled" and "demo-0-abc" in cond["message"]
    assert pod_failure({"metadata": {"name": "x"}, "status": {"phase": "Running"}}) is None


# --------------------------------------------------------------------------------------
# the operator image has no torch (gprl is installed with --no-deps): the operator must not import it


def _import_without_torch(env_extra: dict) -> "subprocess.CompletedProcess":
    import os
    import subprocess

    code = "import sys; sys.modules['torch'] = None; import gprl_operator.handlers"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "operator"), str(ROOT)]), **env_extra}
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)


def test_operator_reconcile_handlers_import_without_torch():
    out = _import_without_torch({"GPRL_OPERATOR_DRIFT_LOOP": "0"})
    assert out.returncode == 0, out.stderr[-2000:]


def test_operator_with_drift_loop_imports_without_torch():
    # gprl.algo.drift is torch-free, but gprl/algo/__init__.py imports the tensor modules eagerly
    out = _import_without_torch({})
    assert out.returncode == 0, out.stderr[-2000:]


def test_server_token_and_network_policy():
    """Every pod mounts the run's token Secret and finds it through GPRL_SERVER_TOKEN_FILE; servers bind all pod
    interfaces; the NetworkPolicy admits the run's own pods, and the monitoring namespace on metrics/server ports."""
    from gprl_operator.children import GPM_PORT, ROLLOUT_PORT, TOKEN_DIR, network_policy, run_spec, token_secret

    run = make_run(spec={"resources": {"topology": "disaggregated", "rolloutReplicas": 2}})
    kids = build_children(run)
    name = run["metadata"]["name"]
    pods = [k["spec"]["template"]["spec"] for k in kids if k["kind"] in ("Job", "StatefulSet", "Deployment")]
    assert len(pods) == 3
    for pod in pods:
        (vol,) = [v for v in pod["volumes"] if v["name"] == "server-token"]
        assert vol["secret"]["secretName"] == f"{name}-server-token"
        c = pod["containers"][0]
        assert {"name": "server-token", "mountPath": TOKEN_DIR, "readOnly": True} in c["volumeMounts"]
        assert {"name": "GPRL_SERVER_TOKEN_FILE", "value": f"{TOKEN_DIR}/token"} in c["env"]
        if c["name"] != "trainer":
            assert c["command"][c["command"].index("--host") + 1] == "0.0.0.0"
    (pol,) = [k for k in kids if k["kind"] == "NetworkPolicy"]
    assert pol["spec"]["podSelector"] == {"matchLabels": {"gprl.dev/run": name}}
    own, monitoring = pol["spec"]["ingress"]
    assert own == {"from": [{"podSelector": {"matchLabels": {"gprl.dev/run": name}}}]}
    assert monitoring["from"][0]["namespaceSelector"]["matchLabels"] == {"kubernetes.io/metadata.name": "monitoring"}
    assert {p["port"] for p in monitoring["ports"]} == {9400, ROLLOUT_PORT, GPM_PORT}
    other = network_policy(run, run_spec(run), "observability")["spec"]["ingress"][1]["from"][0]
    assert other["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"] == "observability"
    sec = token_secret(run, "abc")
    assert sec["immutable"] is True and sec["stringData"] == {"token": "abc"}
    assert sec["metadata"]["ownerReferences"][0]["kind"] == "GPRLRun"


@pytest.mark.parametrize("port, want", [(0, 29600), (31000, 31000)])
def test_weight_sync_port_is_exposed_on_the_learner_and_reached_only_by_the_runs_pods(port, want):
    """rollout.weightSync: the learner's rank 0 (pod 0) listens on the port for the servers to join its group. The
    Job's container and the headless Service name the port (on every disaggregated run: the transport may change
    on a suspended run, the pod template may not), the pods know where rank 0 is, the config carries the port,
    and the NetworkPolicy lets the run's own pods in on it, the monitoring namespace not."""
    run = make_run(spec={"resources": {"topology": "disaggregated"},
                         "rollout": {"weightSync": {"transport": "collective", "port": port}}})
    kids = by_kind(build_children(run))
    (job,) = kids["Job"]
    (c,) = job["spec"]["template"]["spec"]["containers"]
    assert {"name": "weight-sync", "containerPort": want, "protocol": "TCP"} in c["ports"]
    assert {"name": "GPRL_WEIGHT_SYNC_HOST", "value": "demo-0.demo"} in c["env"]
    assert job["spec"]["template"]["spec"]["subdomain"] == "demo"  # so demo-0.demo resolves to pod 0
    http = make_run(spec={"resources": {"topology": "disaggregated"}, "rollout": {"weightSync": {"port": port}}})
    assert by_kind(build_children(http))["Job"][0]["spec"]["template"] == job["spec"]["template"]
    headless = {s["metadata"]["name"]: s for s in kids["Service"]}["demo"]
    assert {"name": "weight-sync", "port": want, "targetPort": want, "protocol": "TCP"} in headless["spec"]["ports"]
    cfg = yaml.safe_load(kids["ConfigMap"][0]["data"]["config.yaml"])
    assert cfg["rollout"]["weightSync"] == {**cfg["rollout"]["weightSync"], "transport": "collective", "port": want}
    (pol,) = kids["NetworkPolicy"]
    own, monitoring = pol["spec"]["ingress"]
    assert own == {"from": [{"podSelector": {"matchLabels": {"gprl.dev/run": "demo"}}}]}  # every port, own pods
    assert "ports" not in own and want not in {p["port"] for p in monitoring["ports"]}
    # a colocated run has no servers: no weight-sync port
    (job,) = by_kind(build_children(make_run()))["Job"]
    assert "weight-sync" not in {p["name"] for p in job["spec"]["template"]["spec"]["containers"][0]["ports"]}


@pytest.mark.parametrize("port, ok", [(0, True), (31000, True), (80, False), (8000, False), (9400, False)])
def test_weight_sync_port_rule(port, ok):
    from gprl.api.manifest import parse_manifest
    from gprl.config import ConfigError

    doc = make_run(spec={"model": {"policy": "world:policy"}, "gpm": {"path": "world:gpm"},
                         "data": {"prompts": "world:prompts"}, "rollout": {"weightSync": {"port": port}}})
    if ok:
        assert parse_manifest(doc).rollout.weight_sync.port == port
    else:
        with pytest.raises(ConfigError, match="spec.rollout.weightSync.port must be 0"):
            parse_manifest(doc)
