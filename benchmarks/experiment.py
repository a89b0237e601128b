"""The method under a fair test in the synthetic world (issue 14): which effect is the GPM's, which the per-axis
normalisation's, which the drift monitor's.

Rows (each a `gprl.demo.VARIANTS` entry, all on the same budget, data, seeds and evaluation):

  (a)  gprl              GPM k=3, per-axis normalisation, drift monitor
  (b)  grpo_bt           GRPO + Bradley-Terry reward model (k=1), no monitor
  (b') grpo_bt_monitor   the same with the same monitor (k=1: no axes to compare, so it never acts; checked here)
  (c)  gprl_observed     GPM k=3, per-axis, the monitor *observing only* (its control pinned at baseline), so the
                         row is GPRL without a monitor and its logs say when the monitor would have fired
  (c_ρ) gprl_floor_observed  (c) with the axis-spread floor ρ = 0.25 (algo.axis_spread_floor): an axis whose group
                         spread is under ρ times the largest axis's is not lifted to its weight
  (e)  gpm_scalar        GRPO on the same GPM collapsed to a scalar (normalization: scalar), monitor observing only
  (e') gpm_scalar_monitor  the same with the monitor acting
  (d)  gprl_global_norm  GPM k=3, global normalisation, drift monitor

Development / report split: the monitor's thresholds were chosen on development seeds (--dev-seeds, default 0)
and are reported on the others (--seeds); probe prompts are training prompts, never evaluation prompts.
Means with 95 % t-intervals over seeds. Runs go in parallel subprocesses (--jobs); a finished run is not rerun.

    python benchmarks/experiment.py --out runs/experiment [--seeds 1 2 3 4 5] [--jobs 2]

Writes <out>/results.json, <out>/table.md, <out>/curves.png and prints the table.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

LABELS = {
    "gprl": "(a) GPRL: GPM k=3, per-axis, monitor",
    "grpo_bt": "(b) GRPO + BT (k=1), no monitor",
    "grpo_bt_monitor": "(b') GRPO + BT + the same monitor",
    "gprl_observed": "(c) GPRL without monitor (observing only)",
    "gprl_floor_observed": "(c_ρ) GPRL without monitor, per-axis with spread floor ρ (0.25 unless --floor; observing)",
    "gpm_scalar": "(e) GRPO on the GPM as a scalar, no monitor (observing)",
    "gpm_scalar_monitor": "(e') GRPO on the GPM as a scalar + monitor",
    "gprl_global_norm": "(d) GPRL, global normalisation, monitor",
}
ORDER = list(LABELS)
FLOOR_ROW = "gprl_floor_observed"  # its ρ can be set with --floor (a sensitivity look: use another --out)

# t_{0.975, n-1} for 95 % intervals over n seeds
T975 = {2: 12.706, 3: 4.303, 4: 3.182, 5: 2.776, 6: 2.571, 7: 2.447, 8: 2.365, 9: 2.306, 10: 2.262}


def ci(values: list[float]) -> str:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    if not vals:
        return "–"
    m = statistics.mean(vals)
    if len(vals) < 2:
        return f"{m:.3f}"
    half = T975.get(len(vals), 1.96) * statistics.stdev(vals) / math.sqrt(len(vals))
    return f"{m:.3f} ± {half:.3f}"


def run_one(variant: str, seed: int, out: Path, args) -> Path:
    """One (variant, seed) run in its own process (one torch thread); returns its folder."""
    folder = out / variant / f"seed{seed}"
    evals = folder / "evals.jsonl"
    if evals.exists() and any(json.loads(l)["step"] == args.long for l in evals.read_text().splitlines() if l.strip()):
        return folder
    base = {
        "algo": {"steps": args.long, "prompts_per_step": 4, "group_size": 8, "learning_rate": 3e-4,
                 "kl_coef": args.kl_coef},
        "rollout": {"max_new_tokens": 32},
        "output": {"eval_every": args.eval_every, "eval_prompts": 96, "eval_samples": 2, "report": False,
                   "progress": False},
        "checkpoint": {"every_steps": 1000},
    }
    code = (
        "import json, sys, torch; torch.set_num_threads(1)\n"
        "from pathlib import Path\n"
        "from gprl.demo import variant_spec\n"
        "from gprl.trainer import Trainer\n"
        + (world_code(args.world_seed) if args.world_seed else "")
        + f"spec = variant_spec({variant!r}, json.loads(sys.argv[1]), Path({str(out)!r}), {seed}, {args.gpm!r})\n"
        + (f"spec.algo.axis_spread_floor = {args.floor!r}\n" if args.floor is not None and variant == FLOOR_ROW else "")
        + "trainer = Trainer(spec, log=lambda *a: None)\n"
        + (inject_code(args) if args.inject else "")
        + "trainer.train()\n"
    )
    env = {**os.environ, "PYTHONPATH": f"{ROOT}:{os.environ.get('PYTHONPATH', '')}", "OMP_NUM_THREADS": "1"}
    t0 = time.time()
    subprocess.run([sys.executable, "-c", code, json.dumps(base)], check=True, env=env, cwd=ROOT,
                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    print(f"  {variant} seed {seed}: {time.time() - t0:.0f}s", flush=True)
    return folder


def world_code(seed: int) -> str:
    """Make the run's `world:` sources another draw of the world (gprl_world.hook.WorldSources)."""
    return (
        "from gprl.sources import register_provider\n"
        "from gprl_world.hook import WorldSources\n"
        f"register_provider('world', lambda log: WorldSources(log, seed={seed}))\n"
    )


def inject_code(args) -> str:
    """Wrap the run's GPM so that axis 0 favours (exploit) or penalises (patched) the world's exploit from a known
    step on (gprl_world.inject)."""
    onset, strength = (args.inject_at, args.inject_strength) if args.inject == "exploit" else (0, -args.inject_strength)
    return (
        "from gprl_world.inject import FEATURES, InjectedPreference\n"
        f"trainer.gpm = InjectedPreference(trainer.gpm, FEATURES[{args.inject_feature!r}], lambda: trainer.step, "
        f"onset={onset}, strength={strength!r})\n"
    )


def summarise(folder: Path, args) -> dict:
    steps = [json.loads(l) for l in (folder / "steps.jsonl").read_text().splitlines() if l.strip()]
    evals = {e["step"]: e for e in (json.loads(l) for l in (folder / "evals.jsonl").read_text().splitlines() if l.strip())}
    trig = [r["step"] for r in steps if r.get("trigger_events")]
    exploit = [r["exploit"] for r in steps]
    # exploit onset: first step whose 10-step running mean of the exploit exceeds 0.15 repeats per response
    onset = next((s + 1 for s in range(9, len(exploit)) if statistics.mean(exploit[s - 9 : s + 1]) > 0.15), None)
    # where the oracle's judgement of the training samples peaks (20-step running mean of the transitive utility):
    # after it, the run is getting worse by the oracle's measure
    util = [r["oracle_axes"]["utility"] for r in steps if "oracle_axes" in r]
    smooth = [statistics.mean(util[max(0, s - 19) : s + 1]) for s in range(len(util))]
    peak = max(range(len(smooth)), key=lambda s: smooth[s]) + 1 if smooth else None
    return {
        "evals": {s: {k: e.get(k) for k in ("oracle_win_rate", "gpm_win_rate", "policy_exploit")} for s, e in evals.items()},
        "triggers": trig,
        "releases": sum(1 for r in steps if r["triggered"] == 0 and r["step"] > 1 and steps[r["step"] - 2]["triggered"] == 1),
        "triggered_steps": sum(r["triggered"] for r in steps),
        "exploit_onset": onset,
        "oracle_peak": peak if peak is not None and peak < len(steps) else None,  # None: still rising at the end
        "kl_coef_mean": statistics.mean(r["kl_coef"] for r in steps),
        # the KL term's weight relative to the policy-gradient term's scale (mean |A| differs with k and normalisation)
        "effective_kl": statistics.mean(r["applied_control"]["kl_coef"] / max(r["advantage_abs_mean"], 1e-9) for r in steps),
        "probe_share": sum(r["timings"].get("probe", 0.0) for r in steps) / sum(r["step_seconds"] for r in steps),
        "curves": {k: [r.get(k) for r in steps]
                   for k in ("exploit", "win_rate_lead", "triggered", "kl_coef", "kl", "entropy")},
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="runs/experiment")
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3, 4, 5])
    ap.add_argument("--dev-seeds", type=int, nargs="*", default=[0], help="seeds the thresholds were chosen on")
    ap.add_argument("--variants", nargs="+", default=ORDER)
    ap.add_argument("--long", type=int, default=120)
    ap.add_argument("--eval-every", type=int, default=40)
    ap.add_argument("--kl-coef", type=float, default=0.02)
    ap.add_argument("--gpm", default=None,
                    help="the k = 3 rows' GPM instead of world:gpm, e.g. world:gpm_aspects (gprl_world.spec.GPM_RECIPES)")
    ap.add_argument("--floor", type=float, default=None,
                    help="ρ (algo.axis_spread_floor) of the gprl_floor_observed row instead of its 0.25")
    ap.add_argument("--inject", choices=["exploit", "patched"], default=None,
                    help="exploit: from step --inject-at on, the GPM's axis 0 favours topic-word repeats past the "
                         "oracle's saturation (a hack with a known onset); patched: from step 0 it penalises them (the "
                         "world without its exploit: every trigger is a false positive). Use another --out.")
    ap.add_argument("--inject-at", type=int, default=40)
    ap.add_argument("--inject-feature", choices=["repeats", "filler"], default="repeats",
                    help="what the hack favours: the world's exploit, or filler words (gprl_world.inject.FEATURES)")
    ap.add_argument("--inject-strength", type=float, default=0.3, help="radians per count of the feature on axis 0 (≤ 3 counts)")
    ap.add_argument("--world-seed", type=int, default=0,
                    help="another independent draw of the world (its SFT policy, pairs, GPM, BT and prompt split; the "
                         "same oracle), built first (minutes) and cached. Use another --out.")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--report-only", action="store_true", help="tabulate the finished runs in --out, start none")
    args = ap.parse_args()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    if set(args.seeds) & set(args.dev_seeds):
        sys.exit(f"--seeds {args.seeds} overlap the development seeds {args.dev_seeds}: report on other seeds")

    if args.world_seed and not args.report_only:  # built once, before the runs that share it
        from gprl.sources import cache_dir
        from gprl_world import build_world

        t0 = time.time()
        build_world(cache_dir=cache_dir() / "world", seed=args.world_seed, threads=args.jobs, log=lambda *a: None)
        print(f"  world seed {args.world_seed}: built or found in {time.time() - t0:.0f}s", flush=True)
    jobs = [(v, s) for s in args.seeds for v in args.variants]  # seed-major: a partial grid has whole seeds
    rows = []
    if args.report_only:
        for v, s in jobs:
            folder = out / v / f"seed{s}"
            evals = folder / "evals.jsonl"
            if evals.exists() and any(json.loads(l)["step"] == args.long for l in evals.read_text().splitlines() if l.strip()):
                rows.append({"variant": v, "seed": s, **summarise(folder, args)})
    else:
        with ThreadPoolExecutor(args.jobs) as pool:
            futures = {pool.submit(run_one, v, s, out, args): (v, s) for v, s in jobs}
            for fut, (v, s) in futures.items():
                try:
                    rows.append({"variant": v, "seed": s, **summarise(fut.result(), args)})
                except Exception as exc:  # a failed run is reported, not hidden
                    print(f"  {v} seed {s} failed: {exc}", flush=True)
                (out / "results.json").write_text(json.dumps(rows, indent=1))
    (out / "results.json").write_text(json.dumps(rows, indent=1))
    write_table(rows, args, out)


def write_table(rows: list[dict], args, out: Path) -> None:
    steps = sorted({s for r in rows for s in r["evals"] if s > 0})
    lines = [
        f"Oracle win rate against the SFT reference (96 held-out prompts × 2 samples), mean ± 95 % interval over report "
        f"seeds {args.seeds} (thresholds chosen on seeds {args.dev_seeds}); β_KL {args.kl_coef}"
        + (f"; the (c_ρ) row with ρ = {args.floor}" if args.floor is not None else "") + ".",
        "",
        "| row | n | " + " | ".join(f"oracle win @ {s}" for s in steps)
        + f" | proxy win @ {args.long} | exploit @ {args.long} | triggers | triggered steps | releases | "
          "mean β_KL | β_KL / mean abs(A) |",
        "|---|---|" + "---|" * len(steps) + "---|---|---|---|---|---|---|",
    ]
    for v in [v for v in ORDER if any(r["variant"] == v for r in rows)]:
        rs = [r for r in rows if r["variant"] == v]
        at = lambda s, k: [r["evals"].get(s, {}).get(k) for r in rs]  # noqa: E731
        lines.append(
            f"| {LABELS[v]} | {len(rs)} | " + " | ".join(ci(at(s, "oracle_win_rate")) for s in steps)
            + f" | {ci(at(args.long, 'gpm_win_rate'))} | {ci(at(args.long, 'policy_exploit'))} | "
              f"{statistics.mean(len(r['triggers']) for r in rs):.1f} | {statistics.mean(r['triggered_steps'] for r in rs):.0f} | "
              f"{statistics.mean(r['releases'] for r in rs):.1f} | {statistics.mean(r['kl_coef_mean'] for r in rs):.3f} | "
              f"{ci([r['effective_kl'] for r in rs])} |"
        )
    lines += paired_lines(rows, steps)
    lines += detector_lines(rows, args)
    shares = [r["probe_share"] for r in rows if r["variant"] in ("gprl", "gprl_global_norm", "gpm_scalar_monitor")]
    if shares:
        lines += ["", f"Probe share of step time (monitored rows): {100 * statistics.mean(shares):.2f} % "
                      f"(max {100 * max(shares):.2f} %)."]
    (out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    try:
        curves(rows, out)
    except Exception as exc:  # noqa: BLE001 - the table matters more than the figure
        print(f"(no figure: {exc})")


OBSERVED = ("gprl_observed", "gprl_floor_observed", "gpm_scalar")
# (row, its twin): the same run but for one part; paired by seed (same data order, evaluation prompts and samples)
PAIRS = [("gprl", "gprl_observed", "the monitor, on GPRL"), ("gpm_scalar_monitor", "gpm_scalar", "the monitor, on the scalar GPM"),
         ("gpm_scalar", "grpo_bt", "the GPM against BT (GRPO on both)"),
         ("gprl_observed", "gpm_scalar", "per-axis against scalar normalisation"),
         ("gprl_global_norm", "gprl", "global against per-axis normalisation (both with the monitor)")]


def paired_lines(rows: list[dict], steps: list[int]) -> list[str]:
    """Oracle win-rate differences of twin rows, paired by seed, mean ± 95 % interval."""
    lines = []
    for a, b, what in PAIRS:
        by = {v: {r["seed"]: r for r in rows if r["variant"] == v} for v in (a, b)}
        seeds = sorted(set(by[a]) & set(by[b]))
        if len(seeds) < 2:
            continue
        if not lines:
            lines = ["", "Paired by seed, oracle win rate of a row minus its twin's:", "",
                     "| effect of | rows | " + " | ".join(f"@ {s}" for s in steps) + f" | per seed @ {steps[-1]} |",
                     "|---|---|" + "---|" * len(steps) + "---|"]
        diff = lambda s, k: by[a][k]["evals"][s]["oracle_win_rate"] - by[b][k]["evals"][s]["oracle_win_rate"]  # noqa: E731
        lines.append(f"| {what} | {a} − {b} | " + " | ".join(ci([diff(s, k) for k in seeds]) for s in steps)
                     + " | " + ", ".join(f"{diff(steps[-1], k):+.3f}" for k in seeds) + " |")
    return lines


def change_alarms(series: list[float], sign: int, window: int = 20, smooth: int = 5, z: float = 3.0) -> list[int]:
    """Steps where a plain change detector on a training statistic starts firing: the mean of the last `smooth` steps
    leaves the mean of the `window` steps before them by more than z of their standard deviations, in direction
    `sign` (+1: rises, as the KL to the reference does under a hack; −1: falls, as the entropy does). Conventional
    settings, not tuned here: the baseline the drift monitor is compared against (issue 14: KL and entropy signals
    are known to fire only after the damage)."""
    alarms, firing = [], False
    for t in range(window + smooth, len(series) + 1):
        past, now = series[t - smooth - window : t - smooth], series[t - smooth : t]
        sd = statistics.pstdev(past) or 1e-12
        high = sign * (statistics.mean(now) - statistics.mean(past)) > z * sd
        if high and not firing:
            alarms.append(t)  # steps are 1-based: series[t - 1] is step t
        firing = high
    return alarms


def alarm_sets(rs: list[dict]) -> list[tuple[str, list[list[int]]]]:
    """Per detector, its alarm steps in each run: the drift monitor's triggers and the KL and entropy change alarms."""
    return [("drift monitor", [r["triggers"] for r in rs]),
            ("KL alarm", [change_alarms(r["curves"]["kl"], 1) for r in rs]),
            ("entropy alarm", [change_alarms(r["curves"]["entropy"], -1) for r in rs])]


def detector_lines(rows: list[dict], args) -> list[str]:
    """The monitor as a detector, read from the rows whose monitor only observes (it computes everything and changes
    nothing, so its would-be triggers can be set against when the hack set in and when the oracle's judgement of the
    training samples peaked)."""
    det = [r for r in rows if r["variant"] in OBSERVED]
    if not det:
        return []
    name = lambda x: "none" if x is None else str(x)  # noqa: E731
    if args.inject == "exploit":  # a hack with a known onset: it acts on the steps after --inject-at
        at = args.inject_at
        lines = ["", f"Hack switched on after step {at} ({args.inject_feature}, {args.inject_strength} rad per count "
                     "on axis 0). Detection delay: first trigger after the onset − onset. Lead to the oracle's peak: "
                     "peak − that trigger (positive: before the damage showed).", "",
                 "| observed row | seed | would-be triggers (step) | oracle peak | detection delay | lead to peak | "
                 "triggers before the onset | KL alarm: delay, before onset | entropy alarm: delay, before onset |",
                 "|---|---|---|---|---|---|---|---|---|"]
        delay = lambda trig: next((t - at for t in trig if t > at), None)  # noqa: E731
        for r in det:
            (_, [trig]), (_, [kl]), (_, [ent]) = alarm_sets([r])
            hit, peak = delay(trig), r.get("oracle_peak")
            cell = lambda a: f"{'missed' if delay(a) is None else delay(a)}, {sum(t <= at for t in a)}"  # noqa: E731
            lines.append(f"| {r['variant']} | {r['seed']} | {', '.join(map(str, trig)) or 'none'} | "
                         f"{name(peak)} | {'missed' if hit is None else hit} | "
                         f"{'–' if hit is None or peak is None else peak - at - hit} | "
                         f"{sum(t <= at for t in trig)} | {cell(kl)} | {cell(ent)} |")
        for v in [v for v in OBSERVED if any(r["variant"] == v for r in det)]:
            rs = [r for r in det if r["variant"] == v]
            for what, alarms in alarm_sets(rs):
                delays = [d for d in map(delay, alarms) if d is not None]
                lead = [r["oracle_peak"] - at - d for r, d in zip(rs, map(delay, alarms))
                        if d is not None and r.get("oracle_peak") is not None]
                early = sum(t <= at for a in alarms for t in a)
                lines += ["", f"{v}, {what}: detected in {len(delays)} of {len(rs)} runs"
                              + (f", delay median {statistics.median(delays):.0f} steps (range {min(delays)}–"
                                 f"{max(delays)}), before the oracle's peak in {sum(x > 0 for x in lead)} of {len(lead)}"
                                 if delays else "")
                              + f"; {early} alarm(s) in {len(rs) * at} steps before the onset (false positives)."]
        return lines
    if args.inject == "patched":  # nothing to catch: every trigger is a false positive
        lines = ["", "The world without its exploit (axis 0 penalises the repeats the oracle penalises, from step 0): "
                     "every would-be trigger is a false positive.", "",
                 "| observed row | seed | would-be triggers (step) | exploit @ end | oracle peak |", "|---|---|---|---|---|"]
        for r in det:
            last = r["evals"].get(args.long, {})
            lines.append(f"| {r['variant']} | {r['seed']} | {', '.join(map(str, r['triggers'])) or 'none'} | "
                         f"{last.get('policy_exploit', float('nan')):.2f} | {name(r.get('oracle_peak'))} |")
        for v in [v for v in OBSERVED if any(r["variant"] == v for r in det)]:
            rs = [r for r in det if r["variant"] == v]
            for what, alarms in alarm_sets(rs):
                n = sum(map(len, alarms))
                lines += ["", f"{v}, {what}: {n} alarm(s) in {len(rs)} runs × {args.long} steps "
                              f"({100 * n / (len(rs) * args.long):.2f} per 100 steps); runs with any: "
                              f"{sum(map(bool, alarms))} of {len(rs)}."]
        return lines
    # the world's own exploit: its onset read off afterwards (first step whose 10-step mean of repeats > 0.15)
    lines = ["", "| observed row | seed | would-be triggers (step) | exploit onset | oracle peak | "
                 "lead time to onset | lead time to peak |", "|---|---|---|---|---|---|---|"]
    for r in det:
        trig, onset, peak = r["triggers"], r["exploit_onset"], r.get("oracle_peak")
        # the trigger that answers the exploit: the first at or after 10 steps before its onset
        hit = next((t for t in trig if onset is not None and t >= onset - 10), None)
        lines.append(f"| {r['variant']} | {r['seed']} | {', '.join(map(str, trig)) or 'none'} | {name(onset)} | "
                     f"{name(peak)} | {'–' if hit is None or onset is None else onset - hit} | "
                     f"{'–' if hit is None or peak is None else peak - hit} |")
    early = sum(1 for r in det for t in r["triggers"] if r["exploit_onset"] is None or t < r["exploit_onset"] - 10)
    return lines + ["", f"Would-be triggers more than 10 steps before the exploit's onset (or in runs where it never "
                        f"set in), i.e. false positives: {early} in {len(det)} observed runs × {args.long} steps."]


def curves(rows: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(11, 3.8))
    for v in [v for v in ORDER if any(r["variant"] == v for r in rows)]:
        rs = [r for r in rows if r["variant"] == v]
        n = min(len(r["curves"]["exploit"]) for r in rs)
        x = list(range(1, n + 1))
        ax[0].plot(x, [statistics.mean(r["curves"]["exploit"][i] for r in rs) for i in range(n)], label=v)
        ax[1].plot(x, [statistics.mean(r["curves"]["kl_coef"][i] for r in rs) for i in range(n)], label=v)
    ax[0].set(title="Exploit: topic-word repeats past saturation per response", xlabel="step")
    ax[1].set(title="β_KL the monitor set", xlabel="step")
    ax[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=110)


if __name__ == "__main__":
    main()
