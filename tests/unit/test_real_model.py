"""The real-model path, here on a CPU: a tiny Llama with a locally trained byte-level BPE tokenizer and a chat
template, saved in the Hugging Face hub-cache layout and used BY ID with offline mode on — `gprl gpm train
--backbone <id>`, `gprl train` on TRL conversational prompts, samples whose newlines survive from generation to
samples.jsonl, and `gprl export` to a folder transformers loads (LoRA merged, no absolute paths).
benchmarks/gpu/real_model.py runs the same path on a ~0.5B random-weight model in bf16 on a GPU.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from benchmarks.gpu.real_model import CHAT_TEMPLATE, build_hub_model

REPO = "tiny-org/tiny-chat-llama"
REV = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def hub(tmp_path, monkeypatch):
    cache = tmp_path / "hf-cache"
    snap = build_hub_model(cache, REPO, REV, "tiny")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return snap


def test_a_hub_id_resolves_offline_from_the_cache_and_a_missing_one_says_why(hub, capsys):
    from gprl.cli import main
    from gprl.sources import SourceError, resolve_model

    assert Path(resolve_model(REPO, "model.policy")) == hub
    assert Path(resolve_model(f"{REPO}@{REV}", "model.policy")) == hub
    with pytest.raises(SourceError, match=r"'tiny-org/absent'.*not in the Hugging Face cache.*HF_HUB_OFFLINE=1"):
        resolve_model("tiny-org/absent", "model.policy")
    code = main(["gpm", "train", "--data", "x.jsonl", "--backbone", "tiny-org/absent", "--out", "never"])
    assert code == 2 and "--backbone: 'tiny-org/absent'" in capsys.readouterr().err


def _write_inputs(tmp: Path) -> tuple[Path, Path]:
    pairs = [{"prompt": f"Question {i}?\n", "chosen": "Yes.\n- because\n- it is", "rejected": "no"} for i in range(8)]
    (tmp / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    # TRL's conversational layout: `prompt` is the message list
    rows = [{"prompt": [{"role": "user", "content": f"Give a list of {w}:\n- first"}]} for w in ("fruit", "steps", "tools")]
    (tmp / "prompts.json").write_text(json.dumps(rows))
    return tmp / "pairs.jsonl", tmp / "prompts.json"


def _run_config(tmp: Path, gpm: Path, prompts: Path, out: Path, **extra) -> Path:
    cfg = {
        "model": {"policy": REPO, **extra.get("model", {})},
        "gpm": {"path": str(gpm), "axes": 2},
        "data": {"prompts": str(prompts)},
        "algo": {"steps": 2, "promptsPerStep": 2, "groupSize": 4, "learningRate": 1e-3},
        "rollout": {"maxNewTokens": 24},
        "checkpoint": {"everySteps": 1},
        "output": {"dir": str(out), "progress": False, "evalPrompts": 2, "evalSamples": 1, "samplesEvery": 1,
                   "samplesGroups": 2},
    }
    path = tmp / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _no_absolute_paths(folder: Path, tmp: Path) -> None:
    for f in folder.glob("*.json"):
        assert str(tmp) not in f.read_text(), f"{f.name} records a path of this machine"


def test_a_hub_model_by_id_trains_keeps_newlines_and_exports(hub, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from gprl.cli import main

    pairs, prompts = _write_inputs(tmp_path)
    gpm = tmp_path / "gpm"
    assert main(["gpm", "train", "--data", str(pairs), "--backbone", REPO, "--out", str(gpm), "--axes", "2",
                 "--epochs", "1", "--batch-size", "4"]) == 0
    run = tmp_path / "run"
    assert main(["train", "--config", str(_run_config(tmp_path, gpm, prompts, run))]) == 0

    rows = [json.loads(l) for l in (run / "samples.jsonl").read_text().splitlines()]
    assert rows and all(r["prompt"].startswith("<|user|>\nGive a list of") for r in rows)
    assert all(r["prompt"].endswith("<|assistant|>\n") for r in rows)  # the chat template, generation prompt on
    assert any("\n" in r["response"] for r in rows), "generated newlines must reach the samples log"
    tok = AutoTokenizer.from_pretrained(hub)
    # exactly the decoded text: no whitespace normalisation anywhere between generation and the log
    for r in rows:
        assert tok.decode(tok(r["response"], add_special_tokens=False)["input_ids"]) == r["response"]

    out = tmp_path / "export"
    assert main(["export", str(run), "--out", str(out)]) == 0
    exported = AutoModelForCausalLM.from_pretrained(out)
    trained = AutoModelForCausalLM.from_pretrained(run / "checkpoints" / "step-00000002" / "policy")
    ids = torch.tensor([tok("Here is a list:\n- a")["input_ids"]])
    torch.testing.assert_close(exported(ids).logits, trained(ids).logits)
    assert AutoTokenizer.from_pretrained(out).chat_template == CHAT_TEMPLATE
    _no_absolute_paths(out, tmp_path)


def test_lora_adapters_record_the_base_by_id_and_export_merged(hub, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from gprl.cli import main

    pairs, prompts = _write_inputs(tmp_path)
    gpm = tmp_path / "gpm"
    assert main(["gpm", "train", "--data", str(pairs), "--backbone", REPO, "--out", str(gpm), "--axes", "2",
                 "--epochs", "1", "--batch-size", "8"]) == 0
    run = tmp_path / "lora"
    lora = {"model": {"lora": {"enabled": True, "r": 4, "targetModules": ["q_proj", "v_proj"]}}}
    assert main(["train", "--config", str(_run_config(tmp_path, gpm, prompts, run, **lora))]) == 0
    adapters = run / "checkpoints" / "step-00000002" / "policy"
    assert json.loads((adapters / "adapter_config.json").read_text())["base_model_name_or_path"] == REPO

    out = tmp_path / "merged"
    assert main(["export", str(adapters.parent), "--out", str(out)]) == 0
    assert not (out / "adapter_config.json").exists() and (out / "config.json").exists()
    tok = AutoTokenizer.from_pretrained(out)
    ids = torch.tensor([tok("Steps:\n1. open")["input_ids"]])
    want = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(hub), adapters)(ids).logits
    torch.testing.assert_close(AutoModelForCausalLM.from_pretrained(out)(ids).logits, want, rtol=1e-4, atol=1e-5)
    _no_absolute_paths(out, tmp_path)


def test_export_refuses_to_push_offline_and_keeps_the_folder(hub, tmp_path, capsys):
    from gprl.cli import main

    assert main(["export", str(hub), "--out", str(tmp_path / "out"), "--push-to", "me/model"]) == 2
    assert "offline mode is on" in capsys.readouterr().err and (tmp_path / "out" / "config.json").exists()


def test_the_documented_real_model_recipe_is_a_valid_config():
    import re

    from gprl.config import parse_config

    text = (Path(__file__).resolve().parents[2] / "docs" / "training.md").read_text()
    recipe = text[text.index("## A real-model recipe"):]
    spec = parse_config(yaml.safe_load(re.search(r"```yaml\n(.*?)```", recipe, re.S).group(1)))
    assert spec.model.policy == "meta-llama/Meta-Llama-3-8B-Instruct" and spec.gpm.axes == 3
    assert spec.algo.group_size == 8 and spec.rollout.max_new_tokens == 512
