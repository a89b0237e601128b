"""The real-model path on a GPU: a ~0.5B random-weight Llama (Qwen2-0.5B's shape, tied embeddings) with a locally
trained byte-level BPE tokenizer and a chat template, saved in the Hugging Face hub-cache layout and used BY ID with
HF_HUB_OFFLINE=1 — `gprl gpm train --backbone <id>`, `gprl train` in bf16 on TRL conversational prompts, samples
checked for newlines, `gprl export`, and the export loaded back by transformers in bf16. The CPU test
tests/unit/test_real_model.py runs the same path on a tiny model (and imports `build_hub_model` from here).

    python3 benchmarks/gpu/real_model.py [--shape 0.5b] [--steps 8] [--out results.json]
    python3 benchmarks/gpu/real_model.py --shape small --steps 2      # the script itself, on any machine

Prints and writes: parameters, step seconds and generated tokens/s (steps after the first), whether newlines reached
samples.jsonl, GPM-training, training and export wall times. Nothing reaches the network.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
CORPUS = [
    "Here is a list:\n- apples\n- pears\n- plums\n",
    "def add(a, b):\n    return a + b\n",
    "First line.\nSecond line.\n\nA new paragraph.\n",
    "Steps:\n1. open the file\n2. read each line\n3. close it\n",
    "The answer is yes.\nThe reason is simple.\n",
] * 20
SHAPES = {
    # Qwen2-0.5B's shape as a Llama: ~0.49B parameters with tied embeddings
    "0.5b": dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                 intermediate_size=4864, vocab_size=151936, tie_word_embeddings=True, max_position_embeddings=4096),
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                 intermediate_size=128, max_position_embeddings=256),
    "small": dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                  intermediate_size=256, vocab_size=2048, max_position_embeddings=512),
}


def build_hub_model(cache: Path, repo: str, rev: str, shape: str = "tiny", seed: int = 0) -> Path:
    """A random Llama of `shape` + a byte-level BPE tokenizer trained here + a chat template, in the hub-cache layout
    (models--org--name/snapshots/<rev>/, refs/main). The model's vocabulary is at least the tokenizer's. Returns the
    snapshot folder."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    specials = ["<|pad|>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>"]
    core.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                                         initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    dims = dict(SHAPES[shape])
    tok = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|end|>", pad_token="<|pad|>",
                                  chat_template=CHAT_TEMPLATE, model_max_length=dims["max_position_embeddings"])
    dims["vocab_size"] = max(dims.get("vocab_size", 0), len(tok))
    config = LlamaConfig(**dims, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=None)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    org, name = repo.split("/")
    root = Path(cache) / f"models--{org}--{name}"
    snap = root / "snapshots" / rev
    model.save_pretrained(snap)
    tok.save_pretrained(snap)
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / "main").write_text(rev)
    return snap


def gprl(*args: str, env: dict) -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "gprl.cli", *args], check=True, env=env, cwd=REPO)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="0.5b")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--prompts-per-step", type=int, default=8)
    ap.add_argument("--group-size", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--out", help="write the results as JSON here")
    args = ap.parse_args()
    import torch

    gpu = torch.cuda.is_available()
    work = Path(tempfile.mkdtemp(prefix="gprl-real-model-"))
    repo, rev = "bench-org/random-llama", "0" * 40
    snap = build_hub_model(work / "hf-cache", repo, rev, args.shape)
    env = dict(os.environ, HF_HUB_CACHE=str(work / "hf-cache"), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    pairs = [{"prompt": f"Question {i}?\n", "chosen": "Yes.\n- because\n- it is", "rejected": "no"} for i in range(64)]
    (work / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    rows = [{"prompt": [{"role": "user", "content": f"Give a list of {i} things:\n- first"}]} for i in range(64)]
    (work / "prompts.json").write_text(json.dumps(rows))
    gpm_seconds = gprl("gpm", "train", "--data", str(work / "pairs.jsonl"), "--backbone", repo, "--out",
                       str(work / "gpm"), "--axes", "3", "--epochs", "1", "--batch-size", "8", env=env)
    run = work / "run"
    cfg = {
        "model": {"policy": repo, "dtype": "bfloat16" if gpu else "float32"},
        "gpm": {"path": str(work / "gpm"), "axes": 3, "batchSize": 32},
        "data": {"prompts": str(work / "prompts.json"), "maxPromptTokens": 64},
        "algo": {"steps": args.steps, "promptsPerStep": args.prompts_per_step, "groupSize": args.group_size,
                 "microBatchSize": 16, "learningRate": 1e-6},
        "rollout": {"maxNewTokens": args.max_new_tokens},
        "checkpoint": {"everySteps": args.steps},
        "output": {"dir": str(run), "progress": False, "evalEvery": 0, "samplesEvery": 1, "samplesGroups": 2,
                   "report": False},
    }
    import yaml

    (work / "run.yaml").write_text(yaml.safe_dump(cfg))  # YAML 1.1: a float needs its dot (1.0e-06, not 1e-06)
    train_seconds = gprl("train", "--config", str(work / "run.yaml"), env=env)
    steps = [json.loads(l) for l in (run / "steps.jsonl").read_text().splitlines()]
    samples = [json.loads(l) for l in (run / "samples.jsonl").read_text().splitlines()]
    export_seconds = gprl("export", str(run), "--out", str(work / "export"), env=env)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = torch.bfloat16 if gpu else torch.float32
    model = AutoModelForCausalLM.from_pretrained(work / "export", dtype=dtype).to("cuda" if gpu else "cpu")
    tok = AutoTokenizer.from_pretrained(work / "export")
    ids = tok.apply_chat_template([{"role": "user", "content": "List two things:\n-"}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True).to(model.device)
    model.generate(**ids, max_new_tokens=16, do_sample=True, pad_token_id=tok.pad_token_id)
    timed = steps[1:] or steps
    result = {
        "shape": args.shape, "parameters": sum(p.numel() for p in model.parameters()),
        "device": torch.cuda.get_device_name() if gpu else "cpu", "dtype": str(dtype),
        "torch": torch.__version__, "steps": len(steps),
        "step_seconds": sum(r["step_seconds"] for r in timed) / len(timed),
        "tokens_per_second": sum(r["tokens"] for r in timed) / sum(r["step_seconds"] for r in timed),
        "samples_with_newlines": sum("\n" in s["response"] for s in samples), "samples": len(samples),
        "gpm_train_seconds": gpm_seconds, "train_seconds": train_seconds, "export_seconds": export_seconds,
        "export_loads": True,
    }
    print(json.dumps(result, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
