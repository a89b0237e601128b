"""Sources of a run: nothing defaults to the synthetic world, providers plug in through the `gprl.sources` hook."""

from __future__ import annotations

import json

import pytest

from gprl import sources as S
from gprl.config import ConfigError, parse_config


def test_a_run_without_models_is_refused_naming_every_missing_source(tmp_path, capsys):
    from gprl.cli import main

    with pytest.raises(ConfigError) as err:
        S.resolve_sources(parse_config({"algo": {"steps": 1}}))
    assert [p.split(":")[0] for p in err.value.problems[:3]] == ["model.policy", "gpm.path", "data.prompts"]
    assert "world:policy" in str(err.value)  # says how to ask for the world, never picks it
    assert main(["train", "--output.dir", str(tmp_path / "run")]) == 2
    assert "model.policy: required" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_a_gpm_server_stands_in_for_gpm_path():
    spec = parse_config({"model": {"policy": "p"}, "data": {"prompts": "x"}, "gpm": {"serverUrl": "http://127.0.0.1:1"}})
    assert S.missing_sources(spec) == []


def test_eval_requires_every_side_of_the_comparison(capsys):
    from gprl.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["eval", "--policy", "p"])
    assert exc.value.code == 2
    assert "--reference, --gpm, --prompts" in capsys.readouterr().err


class _Judge:
    def batch_stats(self, prompts, responses):
        return {"mean_len": sum(map(len, responses)) / len(responses)}

    def win_rate(self, prompts, a, b):
        return 0.5


class _Toy:
    """A provider in the hook's shape, over the tiny test assets."""

    def __init__(self, root, log=print):
        self.models = {"policy": str(root / "policy"), "gpm": str(root / "gpm")}
        words = [json.loads(l)["prompt"] for l in (root / "prompts.jsonl").read_text().splitlines()]
        self.prompt_sets = {"prompts": (words, words[:3])}
        self.judge = _Judge()

    @staticmethod
    def text(response):
        return response.upper()


def test_a_registered_provider_serves_models_prompts_judge_and_text_convention(tiny_assets, tmp_path):
    from gprl.trainer import Trainer

    S.register_provider("toy", lambda log: _Toy(tiny_assets, log))
    try:
        spec = parse_config({
            "model": {"policy": "toy:policy"}, "gpm": {"path": "toy:gpm"}, "data": {"prompts": "toy:prompts"},
            "algo": {"steps": 1, "prompts_per_step": 2, "group_size": 2}, "rollout": {"max_new_tokens": 4},
            "output": {"dir": str(tmp_path / "run"), "progress": False, "report": False, "eval_prompts": 2,
                       "eval_samples": 1},
        })
        src = S.resolve_sources(spec, log=lambda *_: None)
        assert src.policy == str(tiny_assets / "policy") and src.heldout_prompts == ["rock", "paper", "scissors"]
        trainer = Trainer(spec, log=lambda *_: None, sources=src)
        rec = trainer.train_step()
        assert "mean_len" in rec  # the judge's statistics sit beside the step
        ev = trainer.evaluate()
        assert ev["oracle_win_rate"] == 0.5 and "policy_mean_len" in ev
        with pytest.raises(S.SourceError, match=r"toy: offers \['toy:gpm', 'toy:policy'\]"):
            S.resolve_model("toy:bt", "gpm.path")
    finally:
        S._factories.pop("toy"), S._providers.pop("toy", None)


def test_an_unknown_scheme_names_the_known_ones():
    with pytest.raises(S.SourceError, match="no source provider for `nosuch:`.*world"):
        S.resolve_model("nosuch:policy", "model.policy")


def test_the_world_is_registered_through_entry_points_not_imported():
    from importlib.metadata import entry_points

    (ep,) = [e for e in entry_points(group=S.ENTRY_POINT_GROUP) if e.name == "world"]
    assert ep.value == "gprl_world.hook:provider"


def test_real_text_keeps_its_whitespace_the_world_keeps_its_convention():
    from gprl_world.hook import WorldSources

    assert WorldSources.text("  the  rock\nwins ") == "the rock wins"


def test_a_gprlrun_without_sources_is_refused_like_the_api_server_does():
    from gprl.api.manifest import parse_manifest

    doc = {"apiVersion": "gprl.dev/v1alpha1", "kind": "GPRLRun", "metadata": {"name": "r"}, "spec": {"gpm": {"axes": 3}}}
    with pytest.raises(ConfigError) as err:
        parse_manifest(doc)
    text = str(err.value)
    assert "spec.model.policy is required" in text and "spec.gpm.path is required" in text
    assert "spec.data.prompts is required" in text
