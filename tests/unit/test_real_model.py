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

REPO = "tiny-org/tiny-chat-llama"
REV = "0123456789abcdef0123456789abcdef01234567"
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
CORPUS = [
    "Here is a list:\n- apples\n- pears\n- plums\n",
    "def add(a, b):\n    return a + b\n",
    "First line.\nSecond line.\n\nA new paragraph.\n",
    "Steps:\n1. open the file\n2. read each line\n3. close it\n",
    "The answer is yes.\nThe reason is simple.\n",
] * 20


def build_hub_model(cache: Path, repo: str = REPO, rev: str = REV) -> Path:
    """A random tiny Llama + BPE tokenizer + chat template in the hub-cache layout (models--org--name/snapshots/<rev>,
    refs/main). Returns the snapshot folder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    specials = ["<|pad|>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>"]
    core.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                                         initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|end|>", pad_token="<|pad|>",
                                  chat_template=CHAT_TEMPLATE, model_max_length=256)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=None)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    org, name = repo.split("/")
    root = cache / f"models--{org}--{name}"
    snap = root / "snapshots" / rev
    model.save_pretrained(snap)
    tok.save_pretrained(snap)
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(rev)
    return snap


@pytest.fixture
def hub(tmp_path, monkeypatch):
    cache = tmp_path / "hf-cache"
    snap = build_hub_model(cache)
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
