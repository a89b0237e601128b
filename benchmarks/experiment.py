"""The paper's table in miniature, in the synthetic world (issue 3).

Oracle win rate against the SFT reference on held-out prompts at a normal and a long budget, mean and
spread over seeds, for: (a) GPRL (k = 3, per-axis normalisation, drift monitor), (b) GRPO with the
Bradley-Terry reward model, (c) GPRL without the drift monitor, (d) GPRL with global normalisation.
One run per (variant, seed) is evaluated at both budgets (the normal budget is a prefix of the long one;
the learning rate is constant, so it is the same run a shorter job would have made).

    python benchmarks/experiment.py --out runs/experiment [--seeds 0 1 2] [--normal 40] [--long 120]

Writes <out>/results.json, <out>/table.md and <out>/exploit.png.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from gprl.demo import VARIANTS, _merge, run_variants

LABELS = {
    "gprl": "(a) GPRL: k=3, per-axis, drift monitor",
    "grpo_bt": "(b) GRPO + BT reward model (k=1)",
    "gprl_no_monitor": "(c) GPRL without drift monitor",
    "gprl_global_norm": "(d) GPRL, global normalisation",
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="runs/experiment")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--normal", type=int, default=40)
    ap.add_argument("--long", type=int, default=120)
    ap.add_argument("--prompts-per-step", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=8)
    ap.add_argument("--learning-rate", type=float, default=3e-4)
    ap.add_argument("--kl-coef", type=float, default=0.02)
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS))
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    base = {
        "algo": {"steps": args.long, "prompts_per_step": args.prompts_per_step, "group_size": args.group_size,
                 "learning_rate": args.learning_rate, "kl_coef": args.kl_coef},
        "rollout": {"max_new_tokens": 32},
        "output": {"eval_every": args.normal, "eval_prompts": 96, "eval_samples": 2, "report": True},
        "checkpoint": {"every_steps": args.normal},
    }
    rows = run_variants(args.variants, base, out, seeds=args.seeds, progress=False)
    (out / "results.json").write_text(json.dumps(rows, indent=1))

    def at(row, step, key):
        return next(e[key] for e in row["evals"] if e["step"] == step)

    lines = [
        f"Oracle win rate vs the SFT reference (held-out prompts, 96 × 2 samples), mean ± std over seeds {args.seeds}; "
        f"{args.prompts_per_step} prompts × G={args.group_size} per step, lr {args.learning_rate}, β_KL {args.kl_coef}.",
        "",
        f"| variant | oracle win @ {args.normal} steps | oracle win @ {args.long} steps | proxy win @ {args.long} | "
        f"exploit @ {args.long} (SFT) | interventions |",
        "|---|---|---|---|---|---|",
    ]
    for name in args.variants:
        rs = [r for r in rows if r["variant"] == name]

        def ms(step, key):
            vals = [at(r, step, key) for r in rs]
            return f"{statistics.mean(vals):.3f} ± {statistics.pstdev(vals):.3f}"

        ref = statistics.mean(at(r, args.long, "reference_exploit") for r in rs)
        lines.append(
            f"| {LABELS.get(name, name)} | {ms(args.normal, 'oracle_win_rate')} | {ms(args.long, 'oracle_win_rate')} | "
            f"{ms(args.long, 'gpm_win_rate')} | {ms(args.long, 'policy_exploit')} ({ref:.2f}) | "
            f"{statistics.mean(r['interventions'] for r in rs):.1f} |"
        )
    (out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(11, 3.8))
    for name in args.variants:
        rs = [r for r in rows if r["variant"] == name]
        steps = [[json.loads(l) for l in Path(r["dir"], "steps.jsonl").read_text().splitlines()] for r in rs]
        n = min(len(s) for s in steps)
        x = list(range(1, n + 1))
        ax[0].plot(x, [statistics.mean(s[i]["exploit"] for s in steps) for i in range(n)], label=name)
        ax[1].plot(x, [statistics.mean(s[i]["oracle_axes"]["relevance"] for s in steps) for i in range(n)], label=name)
    ax[0].set(title="Exploited axis: topic-word repeats past saturation per response", xlabel="step")
    ax[1].set(title="Oracle relevance of samples", xlabel="step")
    ax[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "exploit.png", dpi=110)


if __name__ == "__main__":
    main()
