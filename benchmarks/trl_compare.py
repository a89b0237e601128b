"""GPRL's training step against TRL's GRPOTrainer (HF generation, no vLLM) on the same tiny world policy.

Same policy, G, prompt set, completion length, batch (prompts × G), one optimizer update per batch,
β_KL (so both run a reference forward) and the same preference-model forward for the reward.
TRL gets a scalar reward per completion from the world GPM (the mean pairwise preference over its group,
summed over axes); GPRL scores the same GPM's k axes and runs the drift monitor on top.
Each side runs in its own subprocess (clean peak-memory figures), one after the other, in one invocation:

    python benchmarks/trl_compare.py [--steps 12] [--warmup 2] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time


def common(args):
    return dict(prompts=args.prompts, group=args.group, max_new_tokens=args.max_new_tokens, lr=1e-5, beta=0.04)


def run_gprl(args) -> dict:
    from gprl.config import parse_config
    from gprl.trainer import Trainer

    c = common(args)
    out = tempfile.mkdtemp(prefix="bench-gprl-")
    spec = parse_config({
        "seed": 0,
        "model": {"policy": "world:policy"}, "gpm": {"path": "world:gpm"}, "data": {"prompts": "world:prompts"},
        "algo": {"steps": args.steps, "prompts_per_step": c["prompts"], "group_size": c["group"], "learning_rate": c["lr"],
                 "kl_coef": c["beta"], "micro_batch_size": c["prompts"] * c["group"]},
        "rollout": {"max_new_tokens": c["max_new_tokens"], "top_k": 0},
        "output": {"dir": out, "progress": False, "report": False},
        "checkpoint": {"every_steps": 10_000},
    })
    trainer = Trainer(spec, log=lambda *_: None)
    trainer.sources.oracle = None  # oracle bookkeeping is a world-only extra TRL does not do
    trainer.spec.output.eval_every = 0
    t_start, recs = None, []
    while trainer.step < args.steps:
        if trainer.step == args.warmup:
            t_start = time.perf_counter()
        recs.append(trainer.train_step())
    wall = time.perf_counter() - t_start
    timed = recs[args.warmup :]
    phases = {}
    for r in timed:
        for k, v in r["timings"].items():
            phases[k] = phases.get(k, 0.0) + v
    total = sum(r["step_seconds"] for r in timed)
    return {
        "steps_per_second": len(timed) / wall,
        "tokens_per_second": sum(r["tokens"] for r in timed) / wall,
        "phase_share": {k: v / total for k, v in phases.items()},
        "overhead_share": 1.0 - sum(phases.get(k, 0.0) for k in ("generate", "score", "update")) / total,
    }


def run_trl(args) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from gprl.algo import group_axis_scores
    from gprl.gpm import GeneralPreferenceModel
    from gprl.sources import provider, resolve_model

    c = common(args)
    quiet = lambda *_: None  # noqa: E731
    policy, gpm_dir = resolve_model("world:policy", "policy", quiet), resolve_model("world:gpm", "gpm", quiet)
    tok = AutoTokenizer.from_pretrained(policy)
    model = AutoModelForCausalLM.from_pretrained(policy)
    gpm = GeneralPreferenceModel.from_pretrained(gpm_dir).eval()
    G = c["group"]
    tokens = {"n": 0}

    def gpm_reward(prompts, completions, **kw):
        texts = [" ".join(t.split()) for t in completions]
        out = gpm.score(tok, prompts, texts, batch_size=len(texts))
        k = out.eigenvalues.shape[-1]
        v = out.embeddings.view(-1, G, out.embeddings.shape[-1])
        lam = out.eigenvalues.view(-1, G, k)[:, 0]
        tokens["n"] += sum(len(ids) for ids in kw.get("completion_ids", [])) or sum(len(t.split()) + 1 for t in texts)
        return group_axis_scores(v, lam).sum(-1).reshape(-1).tolist()

    n_prompts = c["prompts"] * (args.steps + 2)
    ds = Dataset.from_dict({"prompt": (list(provider("world").prompt_sets["prompts"][0]) * 10)[:n_prompts]})
    cfg = GRPOConfig(
        output_dir=tempfile.mkdtemp(prefix="bench-trl-"), per_device_train_batch_size=c["prompts"] * G,
        num_generations=G, max_completion_length=c["max_new_tokens"], steps_per_generation=1, num_iterations=1,
        beta=c["beta"], learning_rate=c["lr"], max_steps=args.steps, logging_steps=1, report_to=[], use_cpu=True,
        save_strategy="no", temperature=1.0, top_k=0, top_p=1.0, gradient_accumulation_steps=1, seed=0,
        disable_dropout=True, shuffle_dataset=False, dataloader_num_workers=0,
    )
    marks = []

    class Clock(TrainerCallback):
        def on_step_end(self, *a, **k):
            marks.append((time.perf_counter(), tokens["n"]))

    trainer = GRPOTrainer(model=model, reward_funcs=gpm_reward, args=cfg, train_dataset=ds, processing_class=tok,
                          callbacks=[Clock()])
    trainer.train()
    (t0, n0), (t1, n1) = marks[args.warmup - 1], marks[-1]
    return {"steps_per_second": (len(marks) - args.warmup) / (t1 - t0), "tokens_per_second": (n1 - n0) / (t1 - t0)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--which", choices=["both", "gprl", "trl"], default="both")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    if args.which != "both":
        import torch

        torch.set_num_threads(args.threads)
        res = run_gprl(args) if args.which == "gprl" else run_trl(args)
        res["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print("RESULT " + json.dumps(res))
        return
    results = {}
    for which in ("trl", "gprl"):
        cmd = [sys.executable, __file__, "--which", which] + [
            f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if k != "which"
        ]
        out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        line = [l for l in out.stdout.splitlines() if l.startswith("RESULT ")]
        if not line:
            sys.exit(f"{which} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
        results[which] = json.loads(line[-1][7:])
    g, t = results["gprl"], results["trl"]
    print(f"policy: world tiny Llama; {args.prompts} prompts x G={args.group}, {args.max_new_tokens} new tokens, "
          f"{args.steps} steps ({args.warmup} warm-up), {args.threads} torch threads\n")
    print("| | TRL GRPOTrainer | GPRL | GPRL / TRL |\n|---|---|---|---|")
    for key, label in (("steps_per_second", "optimizer steps/s"), ("tokens_per_second", "generated tokens/s")):
        print(f"| {label} | {t[key]:.3f} | {g[key]:.3f} | {g[key] / t[key]:.2f}x |")
    print(f"| peak RSS (MB) | {t['peak_rss_mb']:.0f} | {g['peak_rss_mb']:.0f} | {g['peak_rss_mb'] / t['peak_rss_mb']:.2f}x |")
    print("\nGPRL step breakdown (share of step time): "
          + ", ".join(f"{k} {v:.1%}" for k, v in sorted(g["phase_share"].items(), key=lambda kv: -kv[1])))
    print(f"everything but generation, scoring and update: {g['overhead_share']:.1%}")


if __name__ == "__main__":
    main()
