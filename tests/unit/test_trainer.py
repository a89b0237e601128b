"""The training loop on a tiny locally built policy and GPM (no world build, no hub)."""

import json
import socket
import urllib.request

import pytest
import torch
import yaml

from gprl.config import parse_config


@pytest.fixture(scope="module")
def assets(tiny_assets):
    return tiny_assets


def spec_for(assets, out, **over):
    raw = {
        "seed": 3,
        "model": {"policy": str(assets / "policy")},
        "gpm": {"path": str(assets / "gpm"), "axes": 3},
        "data": {"prompts": str(assets / "prompts.jsonl")},
        "algo": {"steps": 2, "prompts_per_step": 2, "group_size": 4, "micro_batch_size": 3, "learning_rate": 1e-3},
        "rollout": {"max_new_tokens": 6},
        "drift": {"warmup_steps": 1, "tau": 1e-4},
        "checkpoint": {"every_steps": 1, "keep_last": 5},
        "output": {"dir": str(out), "progress": False, "eval_prompts": 3, "eval_samples": 2},
    }
    for path, value in over.items():
        node = raw
        *parents, leaf = path.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return parse_config(raw)


def test_two_step_run_end_to_end(assets, tmp_path):
    from gprl.trainer import Trainer

    records = Trainer(spec_for(assets, tmp_path / "run"), log=lambda *_: None).train()
    assert [r["step"] for r in records] == [1, 2]
    for r in records:
        assert len(r["axis_variance"]) == 3 and all(v >= 0 for v in r["axis_variance"])
        assert r["tokens"] > 0 and r["kl"] >= 0
        assert set(r["timings"]) >= {"generate", "score", "reference", "advantages", "update", "monitor"}
    run = tmp_path / "run"
    assert len((run / "steps.jsonl").read_text().splitlines()) == 2
    assert (run / "checkpoints" / "step-00000002" / "trainer_state.json").exists()
    assert (run / "report" / "summary.md").exists() and (run / "report" / "drift.png").stat().st_size > 1000
    ev = [json.loads(l) for l in (run / "evals.jsonl").read_text().splitlines()]
    assert 0.0 <= ev[-1]["gpm_win_rate"] <= 1.0


def test_resume_equals_uninterrupted_run(assets, tmp_path):
    from gprl.trainer import Trainer

    quiet = lambda *_: None  # noqa: E731
    full = Trainer(spec_for(assets, tmp_path / "full", **{"algo.steps": 3}), log=quiet).train()
    # "Kill" after step 2: run to 2, then a new process-like Trainer resumes to 3.
    Trainer(spec_for(assets, tmp_path / "cut", **{"algo.steps": 2}), log=quiet).train()
    resumed = Trainer(spec_for(assets, tmp_path / "cut", **{"algo.steps": 3}), log=quiet).train()
    assert [r["step"] for r in resumed] == [3]
    a, b = full[2], resumed[0]
    for key in ("loss", "kl", "entropy", "response_length", "axis_variance", "weights", "kl_coef", "divergence"):
        assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7), key
    lines = (tmp_path / "cut" / "steps.jsonl").read_text().splitlines()
    assert [json.loads(l)["step"] for l in lines] == [1, 2, 3]


def test_half_written_checkpoint_is_ignored(assets, tmp_path):
    from gprl.trainer import Trainer

    Trainer(spec_for(assets, tmp_path / "run", **{"algo.steps": 1}), log=lambda *_: None).train()
    ckpts = tmp_path / "run" / "checkpoints"
    (ckpts / ".step-00000002.tmp-dead").mkdir()  # a writer killed mid-write leaves only a temp folder
    t = Trainer(spec_for(assets, tmp_path / "run", **{"algo.steps": 2}), log=lambda *_: None)
    assert t.latest_checkpoint().name == "step-00000001"


def test_incompatible_checkpoint_is_refused_naming_fields(assets, tmp_path):
    from gprl.trainer import CheckpointMismatch, Trainer

    Trainer(spec_for(assets, tmp_path / "run", **{"algo.steps": 1}), log=lambda *_: None).train()
    t = Trainer(spec_for(assets, tmp_path / "run", **{"algo.steps": 2, "algo.group_size": 3}), log=lambda *_: None)
    with pytest.raises(CheckpointMismatch, match=r"algo.group_size: 4 -> 3"):
        t.train()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_exporter_serves_the_documented_metrics(assets, tmp_path):
    from gprl.metrics import TRAINER_AXIS_GAUGES, TRAINER_GAUGES
    from gprl.trainer import Trainer

    port = _free_port()
    Trainer(spec_for(assets, tmp_path / "run", **{"algo.steps": 2, "output.metrics_port": port, "drift.probe_every": 1,
                                               "drift.probe_prompts": 1}),
            log=lambda *_: None).train()
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    for name in [*TRAINER_GAUGES, *TRAINER_AXIS_GAUGES, "gprl_drift_interventions_total", "gprl_step_seconds_bucket"]:
        assert f"\n{name}{{" in body or body.startswith(f"{name}{{"), name
    assert 'gprl_axis_weight{axis="2"' in body or 'axis="2"' in body


def test_cli_reports_bad_config_and_bad_dataset_line(assets, tmp_path, capsys):
    from gprl.cli import main

    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump({"algo": {"groupSize": 1}}))
    assert main(["train", "--config", str(cfg)]) == 2
    assert "algo.groupSize: must be >= 2, got 1" in capsys.readouterr().err

    assert main(["train", "--algo.kl_estimator", "k9"]) == 2
    assert "algo.kl_estimator: must be one of" in capsys.readouterr().err

    bad = tmp_path / "prompts.jsonl"
    bad.write_text(json.dumps({"prompt": "rock"}) + "\n" + json.dumps({"text": "x"}) + "\n")
    spec = spec_for(assets, tmp_path / "run")
    raw = spec.to_dict()
    raw["data"]["prompts"] = str(bad)
    cfg.write_text(yaml.safe_dump(raw))
    assert main(["train", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "prompts.jsonl:2" in err and "`prompt`" in err


def test_lora_policy_trains_adapters_only_and_resumes(assets, tmp_path):
    from gprl.trainer import Trainer

    quiet = lambda *_: None  # noqa: E731
    over = {"model.lora": {"enabled": True, "r": 4, "target_modules": ["q_proj", "v_proj"]}}
    t = Trainer(spec_for(assets, tmp_path / "lora", **{"algo.steps": 1, **over}), log=quiet)
    base_before = {n: p.detach().clone() for n, p in t.policy.named_parameters() if "lora_" not in n}
    t.train()
    trainable = [n for n, p in t.policy.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    for n, p in t.policy.named_parameters():
        if "lora_" not in n:
            assert torch.equal(p, base_before[n]), n
    resumed = Trainer(spec_for(assets, tmp_path / "lora", **{"algo.steps": 2, **over}), log=quiet).train()
    assert [r["step"] for r in resumed] == [2]


def test_prompts_from_a_datasets_folder_with_chat_messages(assets, tmp_path):
    import datasets

    from gprl.config import DataSpec
    from gprl.data import load_prompts

    datasets.Dataset.from_dict(
        {"messages": [[{"role": "user", "content": "rock"}], [{"role": "user", "content": "paper"}]]}
    ).save_to_disk(str(tmp_path / "ds"))
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(assets / "policy")
    prompts = load_prompts(DataSpec(prompts=f"hf:{tmp_path / 'ds'}"), tok)
    assert prompts == ["user: rock", "user: paper"]  # no chat template on this tokenizer: plain rendering


def test_cli_eval_prints_gpm_win_rate(assets, capsys):
    from gprl.cli import main

    args = ["eval", "--policy", str(assets / "policy"), "--reference", str(assets / "policy"), "--gpm", str(assets / "gpm"),
            "--prompts", str(assets / "prompts.jsonl"), "--num-prompts", "3", "--max-new-tokens", "4"]
    assert main(args) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["prompts"] == 3 and 0.0 < result["gpm_win_rate"] < 1.0 and "oracle_win_rate" not in result


def test_gradient_checkpointing_is_applied_and_changes_no_number(assets, tmp_path):
    """learner.gradientCheckpointing trades compute for activation memory; the update must stay the same."""
    from gprl.trainer import Trainer

    quiet = lambda *_: None  # noqa: E731
    plain = Trainer(spec_for(assets, tmp_path / "plain", **{"algo.steps": 1}), log=quiet)
    a = plain.train()[0]  # each run seeds the global RNG when built: build and run one after the other
    ckpt = Trainer(spec_for(assets, tmp_path / "ckpt", **{"algo.steps": 1, "learner.gradient_checkpointing": True}),
                   log=quiet)
    b = ckpt.train()[0]
    assert ckpt.policy.is_gradient_checkpointing and not plain.policy.is_gradient_checkpointing
    for key in ("loss", "kl", "entropy", "grad_norm"):
        assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), key
    # Adam's first step moves each weight by about lr·g/|g| (lr 1e-3 here): the checkpointed policy pass runs every
    # row's prompt (the plain one shares it), and where g is ~0 that summation order moves a weight by a fraction
    # of lr, so they agree to 1 % of lr; a wrong recomputation moves many by ~lr
    for p, q in zip(plain.policy.parameters(), ckpt.policy.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)


def test_micro_batch_size_changes_no_number(assets, tmp_path):
    """Micro-batches are rows of similar length with their common padding cut: one micro-batch of the whole batch
    (nothing cut, nothing reordered) and micro-batches of 3 give the same update."""
    from gprl.trainer import Trainer

    quiet = lambda *_: None  # noqa: E731
    whole = Trainer(spec_for(assets, tmp_path / "whole", **{"algo.steps": 1, "algo.micro_batch_size": 8}), log=quiet)
    a = whole.train()[0]
    split = Trainer(spec_for(assets, tmp_path / "split", **{"algo.steps": 1, "algo.micro_batch_size": 3}), log=quiet)
    b = split.train()[0]
    for key in ("loss", "policy_loss", "kl", "entropy", "grad_norm", "clip_fraction"):
        assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), key
    # Adam's first step moves each weight by about lr·g/|g| (lr 1e-3 here): where g is ~0, the float rounding of
    # another summation order moves a weight by a fraction of lr, so they agree to 1 % of lr
    for p, q in zip(whole.policy.parameters(), split.policy.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)


def test_gpm_scores_beside_the_reference_pass_and_changes_no_number(assets, tmp_path):
    """With two or more threads the GPM scores on a worker thread while the reference pass runs, half the threads
    each (the count restored after); with one thread one after the other. The step's numbers are the same."""
    import threading

    from gprl.trainer import Trainer

    quiet = lambda *_: None  # noqa: E731
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        alone = Trainer(spec_for(assets, tmp_path / "alone", **{"algo.steps": 1}), log=quiet)
        a = alone.train()[0]

        torch.set_num_threads(4)
        beside = Trainer(spec_for(assets, tmp_path / "beside", **{"algo.steps": 1}), log=quiet)
        seen = {}
        reference_running = threading.Event()
        score, reference = beside.gpm.score, beside.learner.reference_logprobs

        def gpm_score(*args, **kw):
            # the reference pass must start while the GPM scores: one after the other, this wait times out
            seen.setdefault("overlapped", reference_running.wait(timeout=60))
            seen.setdefault("gpm_thread", threading.get_ident())  # the step's call (the evaluation's comes after)
            seen.setdefault("gpm_threads", torch.get_num_threads())
            return score(*args, **kw)

        def reference_logprobs(batch):
            reference_running.set()
            seen.setdefault("reference_threads", torch.get_num_threads())
            seen.setdefault("reference_thread", threading.get_ident())
            return reference(batch)

        beside.gpm.score, beside.learner.reference_logprobs = gpm_score, reference_logprobs
        b = beside.train()[0]
        assert torch.get_num_threads() == 4
    finally:
        torch.set_num_threads(threads)
    assert seen["overlapped"] and seen["gpm_thread"] != seen["reference_thread"] == threading.get_ident()
    assert seen["reference_threads"] == seen["gpm_threads"] == 2
    assert {"score", "reference"} <= set(b["timings"])
    for key in ("loss", "policy_loss", "kl", "entropy", "grad_norm", "axis_variance"):
        assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), key
    for p, q in zip(alone.policy.parameters(), beside.policy.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)
