"""GPRL's training step against TRL's GRPOTrainer (HF generation, no vLLM), at several policy sizes.

Same policy, G, prompt set, completion length, batch (prompts × G), one optimizer update per batch,
β_KL (so both run a reference forward) and the same preference-model forward for the reward.
TRL gets a scalar reward per completion from the world GPM (the mean pairwise preference over its group,
summed over axes); GPRL scores the same GPM's k axes and runs the drift monitor on top.
Each side runs in its own subprocess (clean peak-memory figures), one after the other, in one invocation:

    python benchmarks/trl_compare.py [--size world|8m|30m|100m] [--steps 12] [--warmup 2] [--threads 2]
                                     [--profile DIR] [--which both|interleaved] [--context-words N]

On a shared machine the load moves between the two sides' turns; `--which interleaved` runs both in one process, a
GPRL step after each TRL step, so that both see the same load step by step (no per-side peak RSS in that mode).

--size world is the world's SFT policy and GPM (0.35M parameters); the other sizes are random-weight Llama policies
built here on the world's tokenizer (so the world's prompts feed them), with a GPM of random heads on a random
backbone of the same shape; nothing is downloaded. Random policies rarely stop early: nearly every response runs to
--max-new-tokens, so the step is the model's compute. --context-words N puts the same N-word preamble before every
prompt on both sides (the world's prompts are ~12 tokens; chat and RLHF prompts are often longer than the
response). --profile writes, per side, cProfile's top functions and
torch.profiler's operator table (time and CPU memory) of the timed steps to DIR.
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
from pathlib import Path

# name: (hidden, layers, heads, intermediate); vocabulary: the world tokenizer's (504 words)
SIZES = {"8m": (384, 4, 6, 1024), "30m": (576, 8, 8, 1536), "100m": (768, 14, 12, 2048)}


def model_dirs(size: str) -> tuple[str, str]:
    """(policy folder, GPM folder) of a size; random Llama ones are built once into GPRL's cache."""
    from gprl.sources import cache_dir, resolve_model

    quiet = lambda *_: None  # noqa: E731
    world_policy = resolve_model("world:policy", "policy", quiet)
    if size == "world":
        return world_policy, resolve_model("world:gpm", "gpm", quiet)
    root = cache_dir() / "bench-models" / size
    policy, gpm = root / "policy", root / "gpm"
    if not (policy / "config.json").exists() or not (gpm / "gpm_config.json").exists():
        import torch
        from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

        from gprl.gpm import GeneralPreferenceModel
        from gprl.gpm.model import GPMConfig

        tok = AutoTokenizer.from_pretrained(world_policy)
        hidden, layers, heads, inter = SIZES[size]
        cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                          num_key_value_heads=heads, intermediate_size=inter, max_position_embeddings=512,
                          tie_word_embeddings=False, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                          eos_token_id=tok.eos_token_id)
        torch.manual_seed(0)
        model = LlamaForCausalLM(cfg)
        model.generation_config.pad_token_id, model.generation_config.eos_token_id = tok.pad_token_id, tok.eos_token_id
        model.save_pretrained(policy)
        tok.save_pretrained(policy)
        GeneralPreferenceModel.from_backbone_config(cfg, GPMConfig(axes=3)).save_pretrained(gpm)
        tok.save_pretrained(gpm)
    return str(policy), str(gpm)


def load_models(size: str):
    """(policy folder, tokenizer, policy, GPM) of a size, as every benchmark of the step loads them."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from gprl.gpm import GeneralPreferenceModel

    policy, gpm = model_dirs(size)
    return (policy, AutoTokenizer.from_pretrained(policy), AutoModelForCausalLM.from_pretrained(policy),
            GeneralPreferenceModel.from_pretrained(gpm).eval())


def n_params(folder: str) -> int:
    from transformers import AutoModelForCausalLM

    return sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(folder).parameters())


class Profile:
    """cProfile + torch.profiler around the timed steps of one side (--profile DIR); a no-op without DIR."""

    def __init__(self, args, side: str):
        self.dir, self.side = (Path(args.profile) if args.profile else None), side
        self.on = False

    def start(self):
        if self.dir is None or self.on:
            return
        import cProfile

        import torch

        # CPU time, not wall time: on a shared machine other jobs' load would be charged to whatever ran meanwhile
        self.cprof = cProfile.Profile(time.process_time)
        self.tprof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True,
                                            record_shapes=False)
        self.tprof.__enter__()
        self.cprof.enable()
        self.on = True

    def stop(self):
        if not self.on:
            return
        import io
        import pstats

        self.cprof.disable()
        self.tprof.__exit__(None, None, None)
        self.on = False
        self.dir.mkdir(parents=True, exist_ok=True)
        buf = io.StringIO()
        pstats.Stats(self.cprof, stream=buf).sort_stats("cumulative").print_stats(60)
        (self.dir / f"{self.side}-cprofile.txt").write_text(buf.getvalue())
        table = self.tprof.key_averages()
        (self.dir / f"{self.side}-ops-time.txt").write_text(table.table(sort_by="self_cpu_time_total", row_limit=40))
        (self.dir / f"{self.side}-ops-memory.txt").write_text(table.table(sort_by="self_cpu_memory_usage", row_limit=30))


def common(args):
    return dict(prompts=args.prompts, group=args.group, max_new_tokens=args.max_new_tokens, lr=1e-5, beta=0.04)


def prompt_list(args) -> list[str]:
    """The world's training prompts, each after the same preamble of --context-words words (drawn once, seeded, from
    the prompts' own words, so every token is in the world's vocabulary): the same list on both sides."""
    import random

    from gprl.sources import provider

    prompts = list(provider("world").prompt_sets["prompts"][0])
    if not args.context_words:
        return prompts
    words = sorted({w for p in prompts for w in p.split()})
    preamble = " ".join(random.Random(0).choices(words, k=args.context_words))
    return [f"{preamble} {p}" for p in prompts]


def gprl_trainer(args):
    from gprl.config import parse_config
    from gprl.trainer import Trainer

    c = common(args)
    out = tempfile.mkdtemp(prefix="bench-gprl-")
    prompts = "world:prompts"
    if args.context_words:
        prompts = os.path.join(out, "prompts.jsonl")
        Path(prompts).write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompt_list(args)))
    world = args.size == "world"
    policy, gpm = ("world:policy", "world:gpm") if world else model_dirs(args.size)
    spec = parse_config({
        "seed": 0,
        "model": {"policy": policy}, "gpm": {"path": gpm, "batch_size": c["prompts"] * c["group"]},
        "data": {"prompts": prompts},
        "algo": {"steps": args.steps, "prompts_per_step": c["prompts"], "group_size": c["group"], "learning_rate": c["lr"],
                 "kl_coef": c["beta"], "micro_batch_size": c["prompts"] * c["group"]},
        "rollout": {"max_new_tokens": c["max_new_tokens"], "top_k": 0},
        "drift": {"probe_every": args.probe_every} if args.probe_every is not None else {},
        "output": {"dir": out, "progress": False, "report": False},
        "checkpoint": {"every_steps": 10_000},
        "learner": {"gradient_checkpointing": args.gradient_checkpointing == "on"},
    })
    trainer = Trainer(spec, log=lambda *_: None)
    trainer.sources.oracle = None  # oracle bookkeeping is a world-only extra TRL does not do
    trainer.spec.output.eval_every = 0
    return trainer


def gprl_summary(timed: list[dict]) -> dict:
    """Phase shares, probe steps and mean response length of GPRL's timed step records."""
    phases = {}
    for r in timed:
        for k, v in r["timings"].items():
            phases[k] = phases.get(k, 0.0) + v
    total = sum(r["step_seconds"] for r in timed)
    return {
        "phase_share": {k: v / total for k, v in phases.items()},
        "overhead_share": 1.0 - sum(phases.get(k, 0.0) for k in ("generate", "score", "reference", "update")) / total,
        "probe_steps": sum("probe" in r["timings"] for r in timed),
        "response_length": sum(r["response_length"] for r in timed) / len(timed),
    }


def run_gprl(args) -> dict:
    trainer = gprl_trainer(args)
    t_start, recs, prof = None, [], Profile(args, "gprl")
    while trainer.step < args.steps:
        if trainer.step == args.warmup:
            t_start, c_start = time.perf_counter(), time.process_time()
            prof.start()
        recs.append(trainer.train_step())
    wall, cpu = time.perf_counter() - t_start, time.process_time() - c_start
    prof.stop()
    timed = recs[args.warmup :]
    return {
        "steps_per_second": len(timed) / wall,
        "cpu_seconds_per_step": cpu / len(timed),
        "tokens_per_second": sum(r["tokens"] for r in timed) / wall,
        **gprl_summary(timed),
    }


def run_trl(args, gprl=None) -> dict:
    """TRL's timed steps; with `gprl` (a GPRL Trainer, --which interleaved) one GPRL step runs after each TRL step,
    timed on its own and taken out of TRL's step times: both sides then see the same load, step by step."""
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from gprl.algo import group_axis_scores

    c = common(args)
    _, tok, model, gpm = load_models(args.size)
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
    ds = Dataset.from_dict({"prompt": (prompt_list(args) * 10)[:n_prompts]})
    cfg = GRPOConfig(
        output_dir=tempfile.mkdtemp(prefix="bench-trl-"), per_device_train_batch_size=c["prompts"] * G,
        num_generations=G, max_completion_length=c["max_new_tokens"], steps_per_generation=1, num_iterations=1,
        beta=c["beta"], learning_rate=c["lr"], max_steps=args.steps, logging_steps=1, report_to=[], use_cpu=True,
        save_strategy="no", temperature=1.0, top_k=0, top_p=1.0, gradient_accumulation_steps=1, seed=0,
        disable_dropout=True, shuffle_dataset=False, dataloader_num_workers=0,
        gradient_checkpointing=args.gradient_checkpointing == "on",  # TRL's default is on, GPRL's off: set on both
        # TRL's default autocasts to bf16 (slow on a CPU without bf16 matmuls); GPRL runs the weights' dtype, fp32 here
        bf16=args.trl_bf16 == "on",
    )
    marks, prof = [], Profile(args, "trl")
    other = {"wall": 0.0, "cpu": 0.0, "recs": [], "walls": [], "cpus": []}  # GPRL's steps (interleaved)

    class Clock(TrainerCallback):
        def on_step_end(self, *a, **k):
            # TRL's clock without the GPRL steps run so far
            marks.append((time.perf_counter() - other["wall"], tokens["n"], time.process_time() - other["cpu"]))
            if len(marks) == args.warmup:
                prof.start()
            if gprl is not None:
                w, c = time.perf_counter(), time.process_time()
                other["recs"].append(gprl.train_step())
                w, c = time.perf_counter() - w, time.process_time() - c
                other["wall"] += w
                other["cpu"] += c
                other["walls"].append(w)
                other["cpus"].append(c)

    trainer = GRPOTrainer(model=model, reward_funcs=gpm_reward, args=cfg, train_dataset=ds, processing_class=tok,
                          callbacks=[Clock()])
    trainer.train()
    prof.stop()
    (t0, n0, c0), (t1, n1, c1) = marks[args.warmup - 1], marks[-1]
    timed = len(marks) - args.warmup
    res = {"steps_per_second": timed / (t1 - t0), "cpu_seconds_per_step": (c1 - c0) / timed,
           "tokens_per_second": (n1 - n0) / (t1 - t0)}
    if gprl is not None:
        recs = other["recs"][args.warmup :]
        wall, cpu = sum(other["walls"][args.warmup :]), sum(other["cpus"][args.warmup :])
        res["gprl"] = {"steps_per_second": len(recs) / wall, "cpu_seconds_per_step": cpu / len(recs),
                       "tokens_per_second": sum(r["tokens"] for r in recs) / wall, **gprl_summary(recs)}
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--which", choices=["both", "interleaved", "gprl", "trl"], default="both",
                    help="both: each side in its own process, one after the other (peak RSS per side); interleaved: "
                         "one process, a GPRL step after each TRL step (the same load on both sides; no RSS)")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--size", choices=["world", *SIZES], default="world")
    ap.add_argument("--context-words", type=int, default=0,
                    help="a preamble of this many words before every prompt, on both sides (a longer prompt)")
    ap.add_argument("--probe-every", type=int, default=None, help="GPRL's drift.probeEvery (default: the config's)")
    ap.add_argument("--gradient-checkpointing", choices=["on", "off"], default="off", help="on both sides")
    ap.add_argument("--trl-bf16", choices=["on", "off"], default="off",
                    help="TRL's bf16 autocast (its default: on); off runs fp32 as GPRL does")
    ap.add_argument("--profile", default=None, help="a folder for per-side profiles of the timed steps")
    args = ap.parse_args()
    if args.which == "interleaved":
        import torch

        torch.set_num_threads(args.threads)
        model_dirs(args.size)
        load = os.getloadavg()
        res = run_trl(args, gprl=gprl_trainer(args))
        report(args, res.pop("gprl"), res, load, os.getloadavg())
        return
    if args.which != "both":
        import torch

        torch.set_num_threads(args.threads)
        res = run_gprl(args) if args.which == "gprl" else run_trl(args)
        res["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print("RESULT " + json.dumps(res))
        return
    results = {}
    model_dirs(args.size)  # built once, before either side is timed
    load = os.getloadavg()
    for which in ("trl", "gprl"):
        cmd = [sys.executable, __file__, "--which", which] + [
            f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if k != "which" and v is not None
        ]
        out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        line = [l for l in out.stdout.splitlines() if l.startswith("RESULT ")]
        if not line:
            sys.exit(f"{which} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
        results[which] = json.loads(line[-1][7:])
    report(args, results["gprl"], results["trl"], load, os.getloadavg())


def report(args, g: dict, t: dict, load, load_after) -> None:
    policy, _ = model_dirs(args.size)
    print(f"mode: {args.which}; "
          + f"policy: {args.size} ({n_params(policy) / 1e6:.2f}M parameters); {args.prompts} prompts x G={args.group}, "
          f"{args.max_new_tokens} new tokens{f', a {args.context_words}-word preamble before each prompt' if args.context_words else ''} (GPRL mean response {g['response_length']:.1f}), {args.steps} steps "
          f"({args.warmup} warm-up; {g['probe_steps']} timed GPRL probe steps), {args.threads} torch threads, activation checkpointing {args.gradient_checkpointing} on both sides, TRL bf16 autocast {args.trl_bf16}; "
          f"load average (1/5/15 min) before {load[0]:.2f}/{load[1]:.2f}/{load[2]:.2f}, "
          f"after {load_after[0]:.2f}/{load_after[1]:.2f}/{load_after[2]:.2f}\n")
    print("| | TRL GRPOTrainer | GPRL | GPRL / TRL |\n|---|---|---|---|")
    for key, label in (("steps_per_second", "optimizer steps/s"), ("tokens_per_second", "generated tokens/s")):
        print(f"| {label} | {t[key]:.3f} | {g[key]:.3f} | {g[key] / t[key]:.2f}x |")
    # CPU seconds a step cost the process: less moved by other jobs on the machine than wall time (with --threads 1
    # no thread waits on a descheduled sibling), though shared caches still make it grow with the load
    print(f"| CPU seconds per step | {t['cpu_seconds_per_step']:.3f} | {g['cpu_seconds_per_step']:.3f} | "
          f"{t['cpu_seconds_per_step'] / g['cpu_seconds_per_step']:.2f}x (TRL / GPRL) |")
    if "peak_rss_mb" in g:
        print(f"| peak RSS (MB) | {t['peak_rss_mb']:.0f} | {g['peak_rss_mb']:.0f} | "
              f"{g['peak_rss_mb'] / t['peak_rss_mb']:.2f}x |")
    print("\nGPRL step breakdown (share of step time): "
          + ", ".join(f"{k} {v:.1%}" for k, v in sorted(g["phase_share"].items(), key=lambda kv: -kv[1])))
    print(f"everything but generation, scoring and update: {g['overhead_share']:.1%}")


if __name__ == "__main__":
    main()
