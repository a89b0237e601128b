"""GPRL vs TRL's GRPOTrainer on one H100-class GPU, in one run: step time and generated tokens/s.

Same card, same random-weight ~0.39B policy of Qwen2-0.5B's shape (Llama architecture — a Qwen2 config would make
transformers swap in Qwen2's tokenizer class over our word-level tokenizer; hidden 896, 24 layers, 14 heads / 2 KV
heads, MLP 4864, vocab 32768, tied embeddings), same prompts, 8 prompts × G=8,
128 new tokens, bf16, HF generation (no vLLM) on both sides, one optimizer update per batch, β_KL = 0.04 (so both
run a reference forward), and the same GPM (a small random Qwen2 backbone, k = 3) as the reward: TRL gets the
GPM's scalar preference score (group-mean pairwise score summed over axes); GPRL scores the same GPM's k axes and
runs its drift monitor. Everything is built locally (no hub access: the GPU machines reach no network).

Each side runs in its own subprocess, one after the other (clean peak-memory figures):

    python3 benchmarks/gpu/h100_gprl_vs_trl.py [--steps 10] [--warmup 2] [--sides trl,gprl,gprl-deepspeed]
    (--out results.json writes the numbers; --small for a quick check of the script on any machine)

Python packages beyond the GPU image's (trl, datasets, pydantic, deepspeed, hjson, ...): see fetch-wheels.sh here.
TORCH_CUDA_ARCH_LIST is set to 9.0 (DeepSpeed's JIT rejects `9.0a`); the DeepSpeed side uses torch's AdamW, so it
compiles nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

SHAPES = {
    "0.4b": dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                 intermediate_size=4864, vocab_size=32768),
    "small": dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                  intermediate_size=256, vocab_size=2048),
}
GPM_SHAPE = dict(hidden_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                 intermediate_size=512)


def build_assets(root: Path, shape: str, n_prompts: int, prompt_words: int) -> None:
    """Tokenizer (word-level over a synthetic vocabulary), policy, GPM and prompts, saved under root."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

    from gprl.gpm import GeneralPreferenceModel, GPMConfig

    if (root / "done").exists():
        return
    V = SHAPES[shape]["vocab_size"]
    specials = ["<pad>", "<eos>", "<bos>", "<unk>"]
    words = specials + [f"w{i}" for i in range(V - len(specials))]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>",
                                  unk_token="<unk>")
    base = dict(max_position_embeddings=1024, tie_word_embeddings=True, pad_token_id=0, eos_token_id=1,
                bos_token_id=2)
    torch.manual_seed(0)
    policy = AutoModelForCausalLM.from_config(LlamaConfig(**SHAPES[shape], **base), dtype=torch.bfloat16)
    policy.generation_config.pad_token_id, policy.generation_config.eos_token_id = 0, 1
    policy.save_pretrained(root / "policy")
    tok.save_pretrained(root / "policy")
    gcfg = LlamaConfig(vocab_size=V, **GPM_SHAPE, **base)
    gpm = GeneralPreferenceModel.from_backbone_config(gcfg, GPMConfig(axes=3))
    torch.nn.init.normal_(gpm.eigenvalue_gate.weight, std=1.0)
    gpm.save_pretrained(root / "gpm")
    tok.save_pretrained(root / "gpm")
    g = torch.Generator().manual_seed(1)
    with open(root / "prompts.jsonl", "w") as fh:
        for _ in range(n_prompts):
            ids = torch.randint(4, V, (prompt_words,), generator=g).tolist()
            fh.write(json.dumps({"prompt": " ".join(words[i] for i in ids)}) + "\n")
    (root / "done").write_text("ok")


def _peak_gb() -> float:
    import torch

    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0


def run_gprl(args, learner: str) -> dict:
    import torch

    from gprl.config import parse_config
    from gprl.trainer import Trainer

    root = Path(args.workdir)
    spec = parse_config({
        "seed": 0,
        "model": {"policy": str(root / "policy"), "dtype": "bfloat16", "chat_template": False},
        "gpm": {"path": str(root / "gpm"), "axes": 3, "batch_size": args.prompts * args.group},
        "data": {"prompts": str(root / "prompts.jsonl"), "shuffle": False},
        "algo": {"steps": args.steps, "prompts_per_step": args.prompts, "group_size": args.group,
                 "learning_rate": 1e-6, "kl_coef": 0.04, "micro_batch_size": args.prompts * args.group},
        "rollout": {"max_new_tokens": args.max_new_tokens, "top_k": 0, "temperature": 1.0},
        "learner": {"backend": learner, "zero_stage": 2, "gradient_checkpointing": args.checkpointing == "both"},
        "drift": {"mode": "in_process"},
        "checkpoint": {"every_steps": 1_000_000, "resume": False},
        "output": {"dir": tempfile.mkdtemp(prefix="gpu-bench-gprl-"), "progress": False, "report": False},
    })
    trainer = Trainer(spec, log=lambda *_: None)
    assert trainer.device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    times, tokens, phases, generate = [], [], {}, []
    for i in range(args.steps):
        torch.cuda.synchronize() if torch.cuda.is_available() else None
        t0 = time.perf_counter()
        rec = trainer.train_step()
        torch.cuda.synchronize() if torch.cuda.is_available() else None
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
            tokens.append(rec["tokens"])
            generate.append(rec["timings"]["generate"])
            for k, v in rec["timings"].items():
                phases[k] = phases.get(k, 0.0) + v
    total = sum(times)
    return {"side": f"gprl-{learner}", "median_step_seconds": statistics.median(times), "step_seconds": times,
            "generate_seconds": generate, "tokens_per_second": sum(tokens) / total, "mean_new_tokens": sum(tokens) / len(tokens) / (args.prompts * args.group),
            "phase_share": {k: v / total for k, v in phases.items()}, "peak_gpu_gb": _peak_gb()}


def run_trl(args) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from gprl.algo import group_axis_scores
    from gprl.gpm import GeneralPreferenceModel

    root = Path(args.workdir)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    tok = AutoTokenizer.from_pretrained(root / "policy")
    model = AutoModelForCausalLM.from_pretrained(root / "policy", dtype=torch.bfloat16)
    gpm = GeneralPreferenceModel.from_pretrained(root / "gpm").eval().requires_grad_(False).to(dev)
    G = args.group
    count = {"tokens": 0}

    def gpm_reward(prompts, completions, completion_ids=None, **kw):
        texts = [" ".join(t.split()) for t in completions]
        out = gpm.score(tok, prompts, texts, batch_size=len(texts))
        k = out.eigenvalues.shape[-1]
        v = out.embeddings.view(-1, G, out.embeddings.shape[-1])
        lam = out.eigenvalues.view(-1, G, k)[:, 0]
        count["tokens"] += sum(len(ids) for ids in (completion_ids or []))
        return group_axis_scores(v, lam).sum(-1).reshape(-1).tolist()

    prompts = [json.loads(l)["prompt"] for l in (root / "prompts.jsonl").read_text().splitlines()]
    ds = Dataset.from_dict({"prompt": (prompts * (args.steps + 2))[: args.prompts * (args.steps + 2)]})
    cfg = GRPOConfig(
        output_dir=tempfile.mkdtemp(prefix="gpu-bench-trl-"), per_device_train_batch_size=args.prompts * G,
        num_generations=G, max_completion_length=args.max_new_tokens, steps_per_generation=1, num_iterations=1,
        beta=0.04, learning_rate=1e-6, max_steps=args.steps, logging_steps=1, report_to=[], save_strategy="no",
        temperature=1.0, top_k=0, top_p=1.0, gradient_accumulation_steps=1, seed=0, disable_dropout=True,
        shuffle_dataset=False, dataloader_num_workers=0, bf16=torch.cuda.is_available(),
        use_cpu=not torch.cuda.is_available(), use_vllm=False, gradient_checkpointing=args.checkpointing != "none",
    )
    marks = []

    class Clock(TrainerCallback):
        def on_step_begin(self, *a, **k):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            marks.append(("begin", time.perf_counter(), count["tokens"]))

        def on_step_end(self, *a, **k):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            marks.append(("end", time.perf_counter(), count["tokens"]))

    trainer = GRPOTrainer(model=model, reward_funcs=gpm_reward, args=cfg, train_dataset=ds, processing_class=tok,
                          callbacks=[Clock()])
    trainer.train()
    begins = [m for m in marks if m[0] == "begin"]
    ends = [m for m in marks if m[0] == "end"]
    # GRPO generates inside the step (steps_per_generation=1): begin→end of step i covers its whole work
    times = [e[1] - b[1] for b, e in zip(begins, ends)][args.warmup :]
    toks = [e[2] - b[2] for b, e in zip(begins, ends)][args.warmup :]
    return {"side": "trl", "median_step_seconds": statistics.median(times), "step_seconds": times, "tokens_per_second": sum(toks) / sum(times),
            "mean_new_tokens": sum(toks) / len(toks) / (args.prompts * G), "peak_gpu_gb": _peak_gb()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--side", help=argparse.SUPPRESS)
    ap.add_argument("--sides", default="trl,gprl,gprl-deepspeed")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--prompt-words", type=int, default=32)
    ap.add_argument("--checkpointing", choices=["both", "none", "trl-only"], default="both",
                    help="activation checkpointing on which side (TRL's GRPOConfig turns it on by default; the "
                         "2026-11-27 runs in BENCHMARKS.md were trl-only)")
    ap.add_argument("--small", action="store_true", help="a tiny shape, to check the script anywhere")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.side:
        res = run_trl(args) if args.side == "trl" else run_gprl(args, "deepspeed" if args.side == "gprl-deepspeed" else "torch")
        print("RESULT " + json.dumps(res), flush=True)
        return
    args.workdir = args.workdir or tempfile.mkdtemp(prefix="gpu-bench-assets-")
    shape = "small" if args.small else "0.4b"
    t0 = time.perf_counter()
    build_assets(Path(args.workdir), shape, n_prompts=args.prompts * (args.steps + 2), prompt_words=args.prompt_words)
    print(f"assets ({shape}) built in {time.perf_counter() - t0:.1f}s under {args.workdir}", flush=True)
    results = {}  # label -> result; a side named twice (ABAB order) shows the run-to-run spread
    for i, side in enumerate(args.sides.split(",")):
        label = side if side not in results else f"{side}#{i}"
        cmd = [sys.executable, __file__, f"--side={side}", f"--workdir={args.workdir}", f"--steps={args.steps}",
               f"--warmup={args.warmup}", f"--prompts={args.prompts}", f"--group={args.group}",
               f"--max-new-tokens={args.max_new_tokens}", f"--checkpointing={args.checkpointing}"]
        t0 = time.perf_counter()
        out = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=os.pathsep.join(
                             filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))))
        lines = [l for l in out.stdout.splitlines() if l.startswith("RESULT ")]
        if out.returncode or not lines:
            print(f"{side} FAILED (rc {out.returncode}):\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}", flush=True)
            continue
        results[label] = json.loads(lines[-1][7:])
        print(f"{label}: {results[label]} ({time.perf_counter() - t0:.0f}s)", flush=True)
    import torch

    card = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    print(f"\n{card}; policy {shape} bf16; {args.prompts} prompts x G={args.group}, {args.max_new_tokens} new tokens, "
          f"{args.steps} steps ({args.warmup} warm-up)\n")
    print("| side | median step (s) | generated tokens/s | mean new tokens | peak GPU GiB |\n|---|---|---|---|---|")
    for side, r in results.items():
        print(f"| {side} | {r['median_step_seconds']:.3f} | {r['tokens_per_second']:.0f} | {r['mean_new_tokens']:.1f} | "
              f"{r['peak_gpu_gb']:.1f} |")
    def pooled(side):
        runs = [r for label, r in results.items() if label.split("#")[0] == side]
        return statistics.median(t for r in runs for t in r["step_seconds"]) if runs else None

    trl, gprl = pooled("trl"), pooled("gprl")
    if trl and gprl:
        print(f"\nGPRL / TRL step time (median over every timed step of every run of each side): {gprl / trl:.2f}x")
    if args.out:
        Path(args.out).write_text(json.dumps({"card": card, "shape": shape, "args": vars(args), "results": results}, indent=2))


if __name__ == "__main__":
    main()
