"""The generated GPRLRun CRD on the real API server: structural schema accepted, defaults filled in, bad specs
refused with a message naming the field, and `gprl.config.parse_config` gives the same verdict on the same spec."""

from __future__ import annotations

import pytest

from gprl.config import ConfigError, parse_config
from gprl_k8s_testlib import RUNS, create_run, ensure_crd, get_run, patch_run

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


@pytest.mark.parametrize(
    "patch,field",
    [
        ({"spec": {"model": {"policy": "other"}}}, "spec.model"),
        ({"spec": {"gpm": {"axes": 4}}}, "spec.gpm"),
        ({"spec": {"resources": {"topology": "disaggregated"}}}, "spec.resources"),
        ({"spec": {"output": {"dir": "elsewhere"}}}, "spec.output.dir"),
    ],
    ids=["model", "gpm", "resources", "output-dir"],
)
def test_immutable_fields(crd, namespace, patch, field):
    cp = crd
    assert create_run(cp, namespace, "immutable", {})[0] == 201
    status, body = patch_run(cp, namespace, "immutable", patch)
    assert status == 422, body
    assert f"{field} is immutable" in body["message"], body


def test_mutable_fields_update(crd, namespace):
    cp = crd
    assert create_run(cp, namespace, "mutable", {})[0] == 201
    status, body = patch_run(cp, namespace, "mutable", {"spec": {"drift": {"tau": 0.2}, "algo": {"klCoef": 0.1},
                                                                  "suspend": True}})
    assert status == 200, body
    assert body["spec"]["drift"]["tau"] == 0.2 and body["metadata"]["generation"] == 2


def test_status_subresource_and_printer_columns(crd, namespace):
    cp = crd
    assert create_run(cp, namespace, "cols", {})[0] == 201
    st = {"status": {"phase": "Running", "step": 12, "drift": 0.031, "training": {"axes": [{"alpha": 0.3}]},
                     "control": {"generation": 2, "weights": [1.0, 1.2, 0.8], "klCoef": 0.06}}}
    status, body = cp.request_raw("PATCH", f"{RUNS}/namespaces/{namespace}/gprlruns/cols/status", st,
                                  token=cp.admin_token, content_type="application/merge-patch+json")
    assert status == 200, body
    assert body["status"]["training"]["axes"][0]["alpha"] == 0.3  # free-form kept
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
