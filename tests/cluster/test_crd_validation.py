"""The generated GPRLRun CRD on the real API server: structural schema accepted, defaults filled in, bad specs
refused with a message naming the field, and `gprl.config.parse_config` gives the same verdict on the same spec;
whole manifests (tests/manifest_cases.py) get the same verdict from `gprl config`; the change marks hold on
updates; the run's own ServiceAccount cannot write the operator's status fields."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from gprl.config import ConfigError, parse_config
from gprl_k8s_testlib import RUNS, create_run, ensure_crd, get_run, patch_run, wait_for

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from manifest_cases import CASES as MANIFESTS  # noqa: E402
from manifest_cases import manifest  # noqa: E402

pytestmark = pytest.mark.cluster


@pytest.fixture(scope="module")
def crd(control_plane):
    ensure_crd(control_plane)
    return control_plane


# (id, spec, field the server's message must name, field parse_config's problem must name) -- None: valid
CASES = [
    ("valid-defaults", {}, None),
    ("valid-example", {"algo": {"groupSize": 4, "epsLow": 0.2, "epsHigh": 0.28}, "drift": {"pinnedWeights": [1, 2, 0.5]},
                       "resources": {"gpus": 0, "memory": "8Gi", "nodeSelector": {"gpu": "h100"}}}, None),
    ("valid-null-optional", {"model": {"reference": None}, "drift": {"pinnedWeights": None}}, None),
    ("group-size-below-2", {"algo": {"groupSize": 1}}, "groupSize"),
    ("group-size-wrong-type", {"algo": {"groupSize": "eight"}}, "groupSize"),
    ("axes-zero", {"gpm": {"axes": 0}}, "axes"),
    ("learning-rate-zero", {"algo": {"learningRate": 0}}, "learningRate"),
    ("release-ratio-one", {"drift": {"releaseRatio": 1.0}}, "releaseRatio"),
    ("gpus-negative", {"resources": {"gpus": -1}}, "gpus"),
    ("backend-unknown", {"rollout": {"backend": "tgi"}}, "backend"),
    ("zero-stage-4", {"learner": {"zeroStage": 4}}, "zeroStage"),
    ("dtype-unknown", {"model": {"dtype": "fp8"}}, "dtype"),
    ("memory-pattern", {"resources": {"memory": "16 GB"}}, "memory"),
    ("empty-prompts", {"data": {"prompts": ""}}, "prompts"),
    ("no-target-modules", {"model": {"lora": {"targetModules": []}}}, "targetModules"),
    ("cel-eps-high-below-low", {"algo": {"epsLow": 0.3, "epsHigh": 0.1}}, "epsHigh"),
    ("cel-axis-spread-floor-not-per-axis", {"algo": {"normalization": "scalar", "axisSpreadFloor": 0.25}},
     "axisSpreadFloor"),
    ("cel-kl-coef-max-below-kl-coef", {"algo": {"klCoef": 0.2}, "drift": {"klCoefMax": 0.1}}, "klCoefMax"),
    ("cel-pins-length", {"gpm": {"axes": 3}, "drift": {"pinnedWeights": [1.0, 1.0]}}, "pinnedWeights"),
    ("cel-pins-positive", {"drift": {"pinnedWeights": [1.0, -1.0, 1.0]}}, "pinnedWeights"),
    ("unknown-field", {"algo": {"groupSze": 8}}, "groupSze"),
    ("unknown-section", {"optimizer": {"lr": 0.1}}, "optimizer"),
]


def _snake(s: str) -> str:
    return "".join("_" + c.lower() if c.isupper() else c for c in s)


@pytest.mark.parametrize("spec,field", [(c[1], c[2]) for c in CASES], ids=[c[0] for c in CASES])
def test_server_and_config_agree(crd, namespace, spec, field):
    cp = crd
    name = "r-" + (field or "ok").lower()[:20]
    status, body = create_run(cp, namespace, name, spec)
    try:
        parse_config(spec)
        config_ok, problems = True, ""
    except ConfigError as exc:
        config_ok, problems = False, "\n".join(exc.problems)

    if field is None:
        assert status == 201, body
        assert config_ok, problems
        return
    assert status in (400, 422), f"the API server accepted a bad spec ({field}): {status} {body}"
    message = body.get("message", "") if isinstance(body, dict) else str(body)
    assert field in message, f"server message does not name {field}: {message}"
    assert not config_ok, f"gprl.config accepted what the API server refused ({field})"
    assert field in problems or _snake(field) in problems, f"config problems do not name {field}: {problems}"


def test_defaults_are_filled_in_and_unknown_fields_pruned_without_strict(crd, namespace):
    cp = crd
    status, body = create_run(cp, namespace, "defaults", {"algo": {"groupSize": 4, "typo": 1}}, strict=False)
    assert status == 201, body
    run = get_run(cp, namespace, "defaults")
    spec = run["spec"]
    assert spec["algo"]["groupSize"] == 4 and spec["algo"]["epsLow"] == 0.2
    assert "typo" not in spec["algo"]
    assert spec["drift"]["tau"] == 0.05 and spec["suspend"] is False
    assert spec["resources"]["topology"] == "colocated"
    # what the server stored is a valid run config
    parse_config({k: v for k, v in spec.items() if k != "suspend"})


def test_bad_name_refused(crd, namespace):
    status, body = create_run(crd, namespace, "x" * 60, {})
    assert status == 422 and "metadata.name" in body["message"], body


IMMUTABLE_CHANGES = [
    ({"model": {"policy": "other"}}, "spec.model.policy"),
    ({"gpm": {"axes": 4}}, "spec.gpm.axes"),
    ({"resources": {"topology": "disaggregated"}}, "spec.resources.topology"),
    ({"output": {"dir": "elsewhere"}}, "spec.output.dir"),
    # the trainer's resume check refuses exactly these too (one declaration: the marks on gprl.config's fields)
    ({"seed": 7}, "spec.seed"),
    ({"algo": {"groupSize": 4}}, "spec.algo.groupSize"),
    ({"algo": {"promptsPerStep": 4}}, "spec.algo.promptsPerStep"),
    ({"algo": {"normalization": "global"}}, "spec.algo.normalization"),
    ({"learner": {"backend": "deepspeed"}}, "spec.learner.backend"),
    # pod-template fields: Kubernetes cannot change a Job's template, so the API server refuses
    ({"resources": {"image": "other:1"}}, "spec.resources.image"),
    ({"output": {"metricsPort": 9100}}, "spec.output.metricsPort"),
    ({"resources": {"checkpointClaim": "someone-elses"}}, "spec.resources.checkpointClaim"),  # unset -> set
    ({"rollout": {"weightSync": {"port": 31000}}}, "spec.rollout.weightSync.port"),  # the learner's containerPort
]


@pytest.mark.parametrize("patch,field", IMMUTABLE_CHANGES, ids=[f for _, f in IMMUTABLE_CHANGES])
def test_immutable_fields(crd, namespace, patch, field):
    cp = crd
    assert create_run(cp, namespace, "immutable", {})[0] == 201
    for suspended in (False, True):  # immutable even while suspended
        assert patch_run(cp, namespace, "immutable", {"spec": {"suspend": suspended}})[0] == 200
        status, body = patch_run(cp, namespace, "immutable", {"spec": patch})
        assert status == 422, body
        assert f"{field} is immutable" in body["message"], body
    # the resume check has the same list
    from gprl.trainer import RESUME_FIELDS

    leaf = field.removeprefix("spec.")
    snake = ".".join("".join("_" + c.lower() if c.isupper() else c for c in p) for p in leaf.split("."))
    assert (snake in RESUME_FIELDS) == (not leaf.startswith(("resources.", "output.", "rollout.weightSync.")))


def test_restart_required_fields_change_only_while_suspended(crd, namespace):
    cp = crd
    assert create_run(cp, namespace, "restart", {})[0] == 201
    change = {"drift": {"tau": 0.2}, "algo": {"klCoef": 0.1, "steps": 50}}
    status, body = patch_run(cp, namespace, "restart", {"spec": {**change, "suspend": True}})
    assert status == 422 and "set spec.suspend: true first" in body["message"], body
    for f in ("spec.drift.tau", "spec.algo.klCoef", "spec.algo.steps"):
        assert f in body["message"], body
    assert patch_run(cp, namespace, "restart", {"spec": {"suspend": True}})[0] == 200
    status, body = patch_run(cp, namespace, "restart", {"spec": change})
    assert status == 200, body
    # resuming and changing at once is fine too: the stored run is suspended, no pod runs the old value
    status, body = patch_run(cp, namespace, "restart", {"spec": {"suspend": False, "algo": {"steps": 60}}})
    assert status == 200, body
    assert body["spec"]["drift"]["tau"] == 0.2 and body["spec"]["algo"]["steps"] == 60
    status, body = patch_run(cp, namespace, "restart", {"spec": {"algo": {"steps": 70}}})
    assert status == 422 and "spec.algo.steps" in body["message"], body


@pytest.mark.parametrize("name,spec,field", [c[1:] for c in MANIFESTS], ids=[c[0] for c in MANIFESTS])
def test_manifests_same_verdict_from_server_and_gprl_config(crd, namespace, name, spec, field):
    """The same manifest: the real API server (strict field validation, as kubectl) and `gprl config`'s check."""
    from gprl.api.manifest import parse_manifest

    cp = crd
    status, body = cp.request_raw("POST", f"{RUNS}/namespaces/{namespace}/gprlruns?fieldValidation=Strict",
                                  manifest(name, spec, namespace), token=cp.admin_token)
    try:
        parse_manifest(manifest(name, spec))
        offline_ok, problems = True, ""
    except ConfigError as exc:
        offline_ok, problems = False, "\n".join(exc.problems)
    if field is None:
        assert status == 201, body
        assert offline_ok, problems
        return
    assert status in (400, 422), f"the API server accepted a bad manifest ({field}): {status} {body}"
    message = body.get("message", "") if isinstance(body, dict) else str(body)
    assert field in message, f"server message does not name {field}: {message}"
    assert not offline_ok, f"gprl config accepted what the API server refused ({field}): {message}"
    assert field in problems, f"gprl config's problems do not name {field}: {problems}"


def test_trainer_service_account_cannot_write_operator_status(crd, namespace):
    """The run's ServiceAccount (`<run>-trainer`, with the Role the operator gives it) may write status.step,
    status.policyVersion and status.training; the admission policy generated from gprl.api.status refuses the
    rest (phase, conditions, control, driftMonitor, ...), while the operator (here: the admin) still writes them."""
    import sys as _sys

    _sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "operator"))
    from gprl.crd import trainer_status_policy
    from gprl_operator.children import rbac

    cp = crd
    for doc in trainer_status_policy(name="gprl-operator-test-trainer-status"):  # as one release would name it
        cp.apply(doc)
    assert create_run(cp, namespace, "tb", {})[0] == 201
    run = get_run(cp, namespace, "tb")
    for obj in rbac(run):
        cp.apply(obj)
    token = cp.service_account_token(namespace, "tb-trainer", create=False)
    path = f"{RUNS}/namespaces/{namespace}/gprlruns/tb/status"

    def patch(status: dict, as_token: str) -> tuple[int, dict]:
        return cp.request_raw("PATCH", path, {"status": status}, token=as_token,
                              content_type="application/merge-patch+json")

    # the policy takes effect once the API server has loaded it: wait for the first refusal (of a real change:
    # writing a value already there changes nothing, and passes)
    probes = iter(range(10**6))
    wait_for(lambda: patch({"message": f"probe {next(probes)}"}, token)[0] in (403, 422), 30,
             what="the status policy in force")
    for status in ({"phase": "Succeeded"}, {"message": "hi"}, {"control": {"generation": 9, "weights": [1.0]}},
                   {"driftMonitor": {"lastStep": 99}},
                   {"conditions": [{"type": "Ready", "status": "True"}]}):
        code, body = patch(status, token)
        field = next(iter(status))
        assert code in (403, 422), (status, code, body)
        assert f"status.{field} is written by the gprl operator only" in body["message"], body
    code, body = patch({"step": 3, "policyVersion": 3, "training": {"step": 3, "kl": 0.1}}, token)
    assert code == 200, body
    assert body["status"]["training"]["kl"] == 0.1 and "phase" not in body["status"]
    # the operator's own writes are not affected
    code, body = patch({"phase": "Running", "driftMonitor": {"lastStep": 3}}, cp.admin_token)
    assert code == 200 and body["status"]["phase"] == "Running", body
    # and the trainer may keep reporting next to them
    code, body = patch({"training": {"step": 4}}, token)
    assert code == 200, body


def test_status_subresource_and_printer_columns(crd, namespace):
    cp = crd
    assert create_run(cp, namespace, "cols", {})[0] == 201
    st = {"status": {"phase": "Running", "step": 12, "drift": 0.031,
                     "training": {"kl": 0.3, "axes": [{"alpha": 0.3}]},
                     "control": {"generation": 2, "weights": [1.0, 1.2, 0.8], "klCoef": 0.06},
                     "driftMonitor": {"lastStep": 12, "monitor": {"spectrum": [0.3, 0.3, 0.4], "anything": 1}}}}
    status, body = cp.request_raw("PATCH", f"{RUNS}/namespaces/{namespace}/gprlruns/cols/status", st,
                                  token=cp.admin_token, content_type="application/merge-patch+json")
    assert status == 200, body
    training = body["status"]["training"]
    assert training["kl"] == 0.3 and "axes" not in training  # typed (gprl.api.status): unknown fields pruned
    assert body["status"]["driftMonitor"]["monitor"]["anything"] == 1  # the monitor's own state is free-form
    # a spec change through the main resource does not touch status, and vice versa
    assert body["metadata"]["generation"] == 1
    import json
    import urllib.request

    req = urllib.request.Request(cp.server + f"{RUNS}/namespaces/{namespace}/gprlruns",
                                 headers={"Authorization": f"Bearer {cp.admin_token}",
                                          "Accept": "application/json;as=Table;v=v1;g=meta.k8s.io"})
    with urllib.request.urlopen(req, context=cp._ssl, timeout=10) as r:
        table = json.loads(r.read())
    cols = [c["name"] for c in table["columnDefinitions"]]
    assert cols[:1] == ["Name"] and {"Phase", "Step", "Drift", "Age"} <= set(cols)
    row = dict(zip(cols, table["rows"][0]["cells"]))
    assert row["Phase"] == "Running" and row["Step"] == 12


def test_short_name_in_discovery(crd):
    res = crd.request("GET", "/apis/gprl.dev/v1alpha1")
    (r,) = [x for x in res["resources"] if x["name"] == "gprlruns"]
    assert r["shortNames"] == ["gr"] and r["namespaced"] is True and r["kind"] == "GPRLRun"
    assert "gprl" in r.get("categories", [])


def test_example_manifest_is_accepted(crd, namespace):
    import yaml

    from gprl.config import load_config
    from gprl_k8s_testlib import ROOT

    path = ROOT / "examples" / "gprlrun.yaml"
    doc = yaml.safe_load(path.read_text())
    doc["metadata"]["namespace"] = namespace
    status, body = crd.request_raw("POST", f"{RUNS}/namespaces/{namespace}/gprlruns?fieldValidation=Strict", doc,
                                   token=crd.admin_token)
    assert status == 201, body
    load_config(path)  # and gprl reads the same file as a run config
