"""`gprl demo`: the synthetic world end to end — GPRL against scalar GRPO with a Bradley-Terry model on the same budget."""

from __future__ import annotations

import json
from pathlib import Path

from gprl.config import RunSpec, parse_config

# The world is asked for by name (its sources are never a run's defaults); the variants pick its GPM or BT model.
WORLD = {"model": {"policy": "world:policy"}, "data": {"prompts": "world:prompts"}}
_GPM, _BT = {"path": "world:gpm", "axes": 3}, {"path": "world:bt", "axes": 1}
_MONITOR = {"mode": "in_process"}
# The same monitor with its control pinned at baseline (κ = 1, weights clamped to 1): it measures and logs when it
# would fire, and changes nothing, so the row is the method without a monitor plus a detector read-out.
_OBSERVING = {"mode": "in_process", "kappa": 1.0, "weight_min": 1.0, "weight_max": 1.0, "tighten_eps": False}
VARIANTS = {
    "gprl": {"gpm": _GPM, "algo": {"normalization": "per_axis"}, "drift": _MONITOR},
    "grpo_bt": {"gpm": _BT, "algo": {"normalization": "per_axis"}, "drift": {"mode": "off"}},
    # k = 1 gives the monitor no axes to compare: no lead, a constant spectrum, so it never acts
    "grpo_bt_monitor": {"gpm": _BT, "algo": {"normalization": "per_axis"}, "drift": _MONITOR},
    "gprl_no_monitor": {"gpm": _GPM, "algo": {"normalization": "per_axis"}, "drift": {"mode": "off"}},
    "gprl_observed": {"gpm": _GPM, "algo": {"normalization": "per_axis"}, "drift": _OBSERVING},
    # (c) with the axis-spread floor: an axis under a quarter of the group's largest axis spread is not lifted
    "gprl_floor_observed": {"gpm": _GPM, "algo": {"normalization": "per_axis", "axis_spread_floor": 0.25},
                            "drift": _OBSERVING},
    "gpm_scalar": {"gpm": _GPM, "algo": {"normalization": "scalar"}, "drift": _OBSERVING},
    "gpm_scalar_monitor": {"gpm": _GPM, "algo": {"normalization": "scalar"}, "drift": _MONITOR},
    "gprl_global_norm": {"gpm": _GPM, "algo": {"normalization": "global"}, "drift": _MONITOR},
}


def monitor_of(name: str) -> str:
    """What the drift monitor does in a variant, for tables."""
    drift = VARIANTS[name]["drift"]
    if drift["mode"] == "off":
        return "off"
    if drift.get("kappa") == 1.0:
        return "observing only"
    return "on (k = 1: never acts)" if VARIANTS[name]["gpm"]["axes"] == 1 else "on"

# The long budget of docs/experiment.md: past ~80 steps every method without a monitor reward-hacks the world's
# exploit, which is what the demo is there to show (at 40 steps all methods are equal).
DEMO_BASE = {
    "algo": {"steps": 120, "prompts_per_step": 4, "group_size": 8, "learning_rate": 3e-4, "kl_coef": 0.02},
    "rollout": {"max_new_tokens": 32},
    "output": {"eval_every": 40, "eval_prompts": 96, "eval_samples": 2},
    "checkpoint": {"every_steps": 40},
}


def _merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for key, value in b.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def variant_spec(name: str, base: dict, out_dir: Path, seed: int, gpm: str | None = None) -> RunSpec:
    """The run of variant `name`; `gpm` replaces the k = 3 rows' GPM (e.g. `world:gpm_aspects`), not the BT rows'."""
    raw = _merge(_merge(_merge(WORLD, base), VARIANTS[name]), {"seed": seed, "output": {"dir": str(out_dir / name / f"seed{seed}")}})
    if gpm is not None and VARIANTS[name]["gpm"]["axes"] > 1:
        raw = _merge(raw, {"gpm": {"path": gpm}})
    return parse_config(raw)


def run_variants(names, base: dict, out_dir: Path, seeds=(0,), log=print, progress=True) -> list[dict]:
    from gprl.trainer import Trainer

    rows = []
    for seed in seeds:
        for name in names:
            spec = variant_spec(name, _merge(base, {"output": {"progress": progress}}), out_dir, seed)
            log(f"== {name} (seed {seed}): {spec.algo.steps} steps of {spec.algo.prompts_per_step}x{spec.algo.group_size}")
            trainer = Trainer(spec, log=log)
            trainer.train()
            evals = [json.loads(l) for l in Path(spec.output.dir, "evals.jsonl").read_text().splitlines() if l.strip()]
            steps = [json.loads(l) for l in Path(spec.output.dir, "steps.jsonl").read_text().splitlines() if l.strip()]
            rows.append({"variant": name, "seed": seed, "evals": evals, "final": evals[-1],
                         "interventions": steps[-1]["interventions"], "dir": spec.output.dir})
    return rows


def table(rows: list[dict]) -> str:
    """Oracle win rate against the SFT reference at every evaluation, then the last evaluation's proxy win rate and
    exploit."""
    steps = sorted({e["step"] for r in rows for e in r["evals"] if e["step"] > 0})
    nan = float("nan")
    lines = ["| variant | drift monitor | seed | " + " | ".join(f"oracle win @ {s}" for s in steps)
             + " | proxy (own RM) win | exploit (repeats/response) | interventions |",
             "|---|---|---|" + "---|" * len(steps) + "---|---|---|"]
    for r in rows:
        f, at = r["final"], {e["step"]: e for e in r["evals"]}
        wins = " | ".join(f"{at[s].get('oracle_win_rate', nan):.3f}" if s in at else "" for s in steps)
        lines.append(
            f"| {r['variant']} | {monitor_of(r['variant'])} | {r['seed']} | {wins} | {f['gpm_win_rate']:.3f} | "
            f"{f.get('policy_exploit', nan):.2f} (SFT {f.get('reference_exploit', nan):.2f}) | {r['interventions']} |"
        )
    return "\n".join(lines)


def demo(out_dir: str = "runs/demo", steps: int | None = None, log=print) -> str:
    import torch

    # Tiny models gain nothing from intra-op threads, and spinning OpenMP threads slow down a shared 2-core box.
    torch.set_num_threads(1)
    out = Path(out_dir)
    base = DEMO_BASE if steps is None else _merge(DEMO_BASE, {"algo": {"steps": steps}, "output": {"eval_every": max(1, steps // 3)}})
    # like with like: both rows run the same drift monitor (on the BT model it has no axes to compare, so never acts)
    rows = run_variants(["gprl", "grpo_bt_monitor"], base, out, log=log)
    text = table(rows)
    (out / "demo.md").write_text(
        "# GPRL demo\n\nOracle win rate of each trained policy against the SFT reference on held-out prompts; "
        "the proxy column is the win rate judged by the preference model the run optimised.\n\n" + text + "\n"
    )
    log("\n" + text)
    log(f"\nreports: {', '.join(str(Path(r['dir']) / 'report' / 'summary.md') for r in rows)}")
    return text
