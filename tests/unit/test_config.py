import argparse

import pytest
import yaml

from gprl.config import ConfigError, RunSpec, add_config_flags, apply_config_flags, dump_config, load_config, parse_config

BAD = [
    ({"algo": {"group_size": 1}}, "algo.group_size: must be >= 2, got 1"),
    ({"algo": {"groupSize": 0}}, "algo.groupSize: must be >= 2, got 0"),
    ({"algo": {"eps_low": 0.3, "eps_high": 0.2}}, "eps_high (0.2) must be >= eps_low (0.3)"),
    ({"algo": {"kl_estimator": "k4"}}, "algo.kl_estimator: must be one of 'k1', 'k2' or 'k3', got 'k4'"),
    ({"algo": {"normalization": "axis"}}, "algo.normalization: must be one of"),
    ({"algo": {"axis_spread_floor": 2}}, "algo.axis_spread_floor: must be <= 1, got 2"),
    ({"algo": {"normalization": "scalar", "axis_spread_floor": 0.25}},
     "axis_spread_floor (0.25) applies to normalization: per_axis only, not scalar"),
    ({"gpm": {"axes": 0}}, "gpm.axes: must be >= 1, got 0"),
    ({"drift": {"mode": "auto"}}, "drift.mode: must be one of 'in_process', 'operator' or 'off'"),
    ({"drift": {"tau": -1}}, "drift.tau: must be > 0, got -1"),
    ({"drift": {"pinned_weights": [1, 1]}}, "drift.pinned_weights has 2 entries but gpm.axes is 3"),
    ({"rollout": {"backend": "tgi"}}, "rollout.backend: must be one of 'hf' or 'vllm'"),
    ({"resources": {"memory": "lots"}}, "resources.memory: 'lots' is not a Kubernetes quantity"),
    ({"algo": {"grup_size": 4}}, "algo.grup_size: unknown field"),
    ({"learning_rate": 1e-4}, "learning_rate: unknown field"),
    ({"output": {"metrics_port": 70000}}, "output.metrics_port: must be <= 65535, got 70000"),
]


@pytest.mark.parametrize("raw,message", BAD, ids=[m.split(":")[0] for _, m in BAD])
def test_each_invalid_field_is_named_by_path(raw, message):
    with pytest.raises(ConfigError) as err:
        parse_config(raw)
    assert any(message in p for p in err.value.problems), err.value.problems


def test_every_bad_field_is_reported_at_once():
    with pytest.raises(ConfigError) as err:
        parse_config({"algo": {"group_size": 1, "steps": 0}, "gpm": {"beta": 0}})
    assert len(err.value.problems) == 3


def test_yaml_round_trip(tmp_path):
    spec = parse_config({"algo": {"group_size": 4, "normalization": "global"}, "drift": {"tau": 0.1}, "seed": 7})
    dump_config(spec, tmp_path / "run.yaml")
    text = (tmp_path / "run.yaml").read_text()
    assert "groupSize: 4" in text
    again = load_config(tmp_path / "run.yaml")
    assert again == spec


def test_bad_yaml_file_names_the_file(tmp_path):
    f = tmp_path / "run.yaml"
    f.write_text("algo:\n  groupSize: [\n")
    with pytest.raises(ConfigError, match="run.yaml"):
        load_config(f)
    f.write_text(yaml.safe_dump({"algo": {"group_size": 1}}))
    with pytest.raises(ConfigError, match=r"in .*run.yaml:\n  algo.group_size"):
        load_config(f)


def test_gprlrun_manifest_reads_its_spec(tmp_path):
    f = tmp_path / "gprlrun.yaml"
    f.write_text(yaml.safe_dump({"apiVersion": "gprl.dev/v1alpha1", "kind": "GPRLRun", "metadata": {"name": "x"},
                                 "spec": {"algo": {"groupSize": 6}, "suspend": False, "model": {"policy": "org/p"},
                                          "gpm": {"path": "org/g"}, "data": {"prompts": "p.jsonl"}}}))
    assert load_config(f).algo.group_size == 6


def test_cli_flags_override_the_file():
    parser = argparse.ArgumentParser()
    add_config_flags(parser)
    args = parser.parse_args(["--algo.group_size", "5", "--drift.mode", "off", "--drift.pinned_weights", "[1, 2, 3]"])
    raw = apply_config_flags({"algo": {"groupSize": 8, "steps": 3}}, args)
    spec = parse_config(raw)
    assert spec.algo.group_size == 5 and spec.algo.steps == 3 and spec.drift.mode == "off"
    assert spec.drift.pinned_weights == [1, 2, 3]


def test_defaults_are_valid_and_described():
    spec = RunSpec()
    assert spec.algo.normalization == "per_axis" and spec.algo.kl_estimator == "k3"
    from gprl.config import _leaf_fields

    undocumented = [p for p, f in _leaf_fields(RunSpec) if not f.description]
    assert undocumented == []
