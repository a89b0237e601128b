"""gprl.api: the change marks (one declaration -> CRD rules, resume check, docs), the offline manifest check
(`gprl config`) on the same manifests the API server sees in tests/cluster/test_crd_validation.py, the typed status
and who may write it, and the name-length limit against every name the operator derives."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "operator")]

from manifest_cases import BAD, CASES, VALID, manifest  # noqa: E402

from gprl import crd  # noqa: E402
from gprl.api.marks import Change, leaf_changes, resume_fields  # noqa: E402
from gprl.api.status import RunStatus, operator_fields, trainer_fields  # noqa: E402
from gprl.config import ConfigError, RunSpec, parse_config  # noqa: E402


def _snake(s: str) -> str:
    return "".join("_" + c.lower() if c.isupper() else c for c in s)


# ----------------------------------------------------------------------------- one declaration of what may change


def test_every_field_is_marked_and_the_issue_fields_agree_everywhere():
    from gprl.api.marks import unmarked

    assert unmarked(RunSpec) == [], "mark these fields (or their section) in gprl/config.py: see gprl/api/marks.py"
    marks = dict(leaf_changes(RunSpec))
    for path in ("seed", "algo.group_size", "algo.prompts_per_step", "algo.normalization", "learner.backend"):
        assert marks[path] is Change.IMMUTABLE
        assert path in resume_fields(RunSpec)
    assert marks["algo.steps"] is Change.RESTART and "algo.steps" not in resume_fields(RunSpec)
    assert not any(p.startswith(("resources.", "output.")) for p in resume_fields(RunSpec))
    # the CRD's transition rule checks every marked field and its message names it
    spec = crd.build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    (rule,) = [r for r in spec["x-kubernetes-validations"] if "messageExpression" in r]
    for path, mark in leaf_changes(RunSpec, camel=True):
        needle = f"'spec.{path} is immutable: " if mark is Change.IMMUTABLE else f"'spec.{path} is read when"
        assert needle in rule["messageExpression"] and f"has(oldSelf.{path})" in rule["rule"], path
    # and the reference page says it
    page = crd.render_markdown()
    assert "| `spec.algo.groupSize` | integer | `8` | immutable |" in page


def test_the_trainer_resume_check_uses_the_marks():
    from gprl.trainer import RESUME_FIELDS

    assert RESUME_FIELDS == resume_fields(RunSpec)
    a, b = parse_config({}), parse_config({"algo": {"group_size": 4, "steps": 7}, "output": {"dir": "elsewhere"}})
    assert b.changed_fields(a) == ["algo.group_size: 8 -> 4"]


def test_restart_required_changes_never_touch_the_job_template():
    """A restart-required change is accepted while the run is suspended; resuming must then only need the new
    ConfigMap (a Job's pod template cannot change). So no such field may reach the Job's template."""
    from gprl_operator.children import build_children

    def job_template(spec: dict) -> dict:
        run = {"apiVersion": "gprl.dev/v1alpha1", "kind": "GPRLRun",
               "metadata": {"name": "r", "namespace": "ns", "uid": "u", "generation": 1}, "spec": spec}
        (job,) = [c for c in build_children(run) if c["kind"] == "Job"]
        return job["spec"]["template"]

    base = job_template({})
    checked = 0
    for path, mark in leaf_changes(RunSpec):
        if mark is not Change.RESTART:
            continue
        default = parse_config({}).to_dict(camel=False)
        for part in path.split("."):
            default = default[part]
        for value in _other_values(default):
            raw = value
            for part in reversed(path.split(".")):
                raw = {part: raw}
            try:
                parse_config(raw)
            except ConfigError:
                continue
            assert job_template(raw) == base, f"{path} = {value!r} changes the Job's pod template"
            checked += 1
            break
    assert checked >= 40


def _other_values(default):
    if isinstance(default, bool):
        return [not default]
    if isinstance(default, int):
        return [default + 1, default - 1]
    if isinstance(default, float):
        return [default * 0.5, default * 1.5, 0.5]
    if isinstance(default, str):
        return ["sequence_mean", "linear", "k1", "vllm", "operator", "off", "collective", "nccl", "http://x:1",
                default + "x"]
    if default is None:
        return ["http://gpm:8001", [1.0, 1.0, 1.0]]
    if isinstance(default, list):
        return [["http://r:8000"]]
    return []


# ----------------------------------------------------------------------------- offline verdict on manifests


def _gprl_config(tmp_path, doc, capsys) -> tuple[int, str]:
    from gprl.cli import main

    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(doc))
    try:
        rc = main(["config", "-c", str(path)])
    except ConfigError as exc:
        return 2, str(exc)
    except SystemExit as exc:
        return int(exc.code or 0), capsys.readouterr().err
    return rc, capsys.readouterr().err


@pytest.mark.parametrize("name,spec,field", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_gprl_config_gives_the_api_servers_verdict(tmp_path, capsys, name, spec, field):
    rc, out = _gprl_config(tmp_path, manifest(name, spec), capsys)
    if field is None:
        assert rc == 0, out
    else:
        assert rc != 0, f"gprl config accepted what the API server refuses ({field})"
        assert field in out or _snake(field) in out, out


def test_enough_new_malformed_manifests():
    assert len(BAD) >= 20 and len(VALID) >= 5


def test_bare_off_in_yaml_says_how_to_fix_it(tmp_path):
    from gprl.config import load_config

    f = tmp_path / "run.yaml"
    f.write_text("drift:\n  mode: off\n")
    with pytest.raises(ConfigError, match=r'drift.mode: .*quote it \(mode: "off"\)'):
        load_config(f)


@pytest.mark.parametrize("raw,field", [
    ({"drift": {"pinned_weights": [1.0, float("nan"), 1.0]}}, "drift.pinned_weights[1]"),
    ({"algo": {"std_eps": float("inf")}}, "algo.std_eps"),
    ({"algo": {"max_grad_norm": float("inf")}}, "algo.max_grad_norm"),
    ({"algo": {"steps": True}}, "algo.steps"),
    ({"checkpoint": {"every_steps": False}}, "checkpoint.every_steps"),
    ({"gpm": {"axes": "3"}}, "gpm.axes"),
])
def test_config_numbers_are_finite_and_typed(raw, field):
    with pytest.raises(ConfigError) as err:
        parse_config(raw)
    assert any(p.startswith(field) for p in err.value.problems), err.value.problems


# ----------------------------------------------------------------------------- names derived from the run's name


@pytest.mark.parametrize("topology,name", [("colocated", "r" * 47), ("disaggregated", "d" * 44)])
def test_longest_names_give_valid_children(topology, name):
    from gprl_operator.children import build_children

    run = {"apiVersion": "gprl.dev/v1alpha1", "kind": "GPRLRun",
           "metadata": {"name": name, "namespace": "ns", "uid": "u", "generation": 1},
           "spec": {"resources": {"topology": topology, "learnerReplicas": 1024 if topology == "colocated" else 1,
                                  "rolloutReplicas": 256}}}
    for child in build_children(run):
        meta = child["metadata"]
        assert len(meta["name"]) <= 63, meta["name"]
        labels = {**meta.get("labels", {}),
                  **(((child.get("spec") or {}).get("template") or {}).get("metadata") or {}).get("labels", {})}
        assert all(len(v) <= 63 for v in labels.values()), labels
        if child["kind"] == "StatefulSet":  # pods get controller-revision-hash: <name>-<10 chars>, pod-name label
            assert len(meta["name"]) + 11 <= 63
            assert len(f"{meta['name']}-{child['spec']['replicas'] - 1}") <= 63
        if child["kind"] == "Job":  # an indexed Job's pods have the hostname <job>-<index>
            assert len(f"{meta['name']}-{child['spec'].get('completions', 1) - 1}") <= 63


# ----------------------------------------------------------------------------- typed status, trust boundary


def test_status_schema_is_generated_from_the_models():
    status = crd.build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["status"]
    assert set(status["properties"]) == {f.alias or n for n, f in RunStatus.model_fields.items()}
    control = status["properties"]["control"]["properties"]
    ack = status["properties"]["training"]["properties"]["controlAck"]["properties"]
    # one name per timestamp round the loop
    assert {"reportedAt", "statisticsAt"} <= set(control) and {"reportedAt", "statisticsAt"} <= set(ack)
    assert "statisticsAt" in status["properties"]["training"]["properties"]["history"]["items"]["properties"]
    assert "default" not in yaml.safe_dump(status)


def test_trainer_may_write_only_its_fields():
    assert set(trainer_fields()) == {"step", "policyVersion", "training"}
    policy, binding = crd.trainer_status_policy()
    checked = {v["message"].split(" ")[0] for v in policy["spec"]["validations"]}
    assert checked == {f"status.{f}" for f in operator_fields()}
    assert "phase" in operator_fields() and "driftMonitor" in operator_fields() and "control" in operator_fields()
    assert binding["spec"] == {"policyName": policy["metadata"]["name"], "validationActions": ["Deny"]}
    assert "'-trainer'" in policy["spec"]["matchConditions"][0]["expression"]
