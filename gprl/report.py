"""End-of-run report: PNG plots and a markdown summary from steps.jsonl / evals.jsonl."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def samples_section(samples: list[dict], per_step: int = 4) -> list[str]:
    """A few samples of the first and the last sample step, beside the drift figure: what the policy wrote then,
    with the GPM's per-axis scores and the advantage it got. Fenced blocks keep the text as written."""
    if not samples:
        return []
    steps = sorted({r["step"] for r in samples})
    lines = ["## Samples", "", "Responses with the GPM's per-axis scores ŝ_l and their advantage A "
             "(all samples: samples.jsonl).", ""]
    for step in dict.fromkeys([steps[0], steps[-1]]):
        lines += [f"### Step {step}", ""]
        for r in [r for r in samples if r["step"] == step][:per_step]:
            scores = ", ".join(f"{x:.3f}" for x in r["scores"])
            flag = " · **GPM output non-finite: left out**" if r.get("gpm_nonfinite") else ""
            lines += [f"group {r['group']} · A = {r['advantage']:+.3f} · ŝ = [{scores}]{flag}", "",
                      "prompt:", "", "```text", r["prompt"], "```", "", "response:", "", "```text", r["response"],
                      "```", ""]
    return lines


def write_report(run_dir: str | Path) -> Path:
    run_dir = Path(run_dir)
    out = run_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    steps, evals = read_jsonl(run_dir / "steps.jsonl"), read_jsonl(run_dir / "evals.jsonl")
    if not steps:
        raise ValueError(f"{run_dir}: no steps.jsonl to report on")
    x = [r["step"] for r in steps]
    k = len(steps[0]["axis_variance"])

    fig, axes = plt.subplots(1, 2 if "oracle_axes" in steps[0] else 1, figsize=(11, 3.6), squeeze=False)
    ax = axes[0][0]
    for l in range(k):
        ax.plot(x, [r["axis_variance"][l] for r in steps], label=f"axis {l}")
    ax.set(title="GPM per-axis spread of group scores", xlabel="step", ylabel="E[var ŝ_l]")
    ax.legend(fontsize=8)
    if "oracle_axes" in steps[0]:
        ax = axes[0][1]
        for name in steps[0]["oracle_axes"]:
            ax.plot(x, [r["oracle_axes"][name] for r in steps], label=name)
        ax.plot(x, [r["exploit"] for r in steps], "k--", label="exploit (repeats)")
        ax.set(title="Oracle per-axis scores of samples", xlabel="step")
        ax.legend(fontsize=8)
    _save(fig, out / "axes.png")

    probes = [r for r in steps if r.get("axis_win_rate")]
    fig, (a1, a3, a2) = plt.subplots(1, 3, figsize=(15, 3.6))
    a1.plot(x, [r["divergence"] for r in steps], label="D(t)")
    a1.axhline(steps[0]["tau"], color="r", ls="--", label="τ")
    trig = [r["step"] for r in steps if r["triggered"]]
    if trig:
        a1.scatter(trig, [0] * len(trig), marker="|", color="r", label="triggered")
    a1.set(title="Drift D(t) = KL(α(t) ‖ α(t − N))", xlabel="step")
    a1.legend(fontsize=8)
    for l in range(k):
        a3.plot([r["step"] for r in probes], [r["axis_win_rate"][l] for r in probes], ".-", label=f"w_{l}")
    a3.axhline(0.5, color="grey", lw=0.8)
    a3.set(title="Probe: per-axis win rate vs reference", xlabel="step")
    a3.legend(fontsize=8)
    for l in range(k):
        a2.plot(x, [r["weights"][l] for r in steps], label=f"m_{l}")
    a2.plot(x, [r["kl_coef"] / max(steps[0]["kl_coef"], 1e-9) for r in steps], "k--", label="β_KL / β_0")
    a2.set(title="Control", xlabel="step")
    a2.legend(fontsize=8)
    _save(fig, out / "drift.png")

    if evals:
        fig, ax = plt.subplots(figsize=(6, 3.6))
        ex = [e["step"] for e in evals]
        ax.plot(ex, [e["gpm_win_rate"] for e in evals], "o-", label="GPM-judged")
        if "oracle_win_rate" in evals[0]:
            ax.plot(ex, [e["oracle_win_rate"] for e in evals], "s-", label="oracle")
        ax.axhline(0.5, color="grey", lw=0.8)
        ax.set(title="Win rate against the reference policy", xlabel="step", ylim=(0, 1))
        ax.legend(fontsize=8)
        _save(fig, out / "win_rate.png")

    last = steps[-1]
    lines = [
        f"# GPRL run report: {run_dir.name}",
        "",
        f"- steps: {last['step']}, interventions of the drift monitor: {last['interventions']}",
        f"- final KL to reference: {last['kl']:.4f}, entropy: {last['entropy']:.3f}, response length: {last['response_length']:.1f}",
        f"- final control: weights {[round(w, 3) for w in last['weights']]}, β_KL {last['kl_coef']:.4f}, "
        f"ε [{last['eps_low']:.3f}, {last['eps_high']:.3f}]",
        f"- mean step time: {sum(r['step_seconds'] for r in steps) / len(steps):.2f} s",
    ]
    if evals:
        e = evals[-1]
        lines.append(f"- win rate against the reference at step {e['step']}: GPM-judged {e['gpm_win_rate']:.3f}"
                     + (f", oracle {e['oracle_win_rate']:.3f}" if "oracle_win_rate" in e else ""))
    lines += ["", "![axes](axes.png)", "", "![drift](drift.png)", ""]
    lines += samples_section(read_jsonl(run_dir / "samples.jsonl"))
    if evals:
        lines += ["![win rate](win_rate.png)", ""]
    (out / "summary.md").write_text("\n".join(lines))
    return out
