"""Render the panels of the `gprl-axes` dashboard from a run's step log, without Grafana.

    python -m gprl.observability.render RUN_DIR [OUT.png] [--title TEXT]

RUN_DIR holds the trainer's `steps.jsonl` (and `config.yaml`). The series are those the trainer exports on
/metrics (per-axis score spread, probed per-axis win rates, applied weights m_l, β_KL, ε) and D(t), α(t), α(0) and
the win-rate lead L as the drift monitor computes them from the same statistics (in `drift.mode: operator` the trainer's own monitor is idle, so they are
replayed here with the run's drift settings: the operator feeds its monitor exactly these statistics).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def series(run_dir: Path) -> dict:
    import yaml

    from gprl.algo.drift import DriftMonitor
    from gprl.config import parse_config

    recs = [json.loads(line) for line in (run_dir / "steps.jsonl").read_text().splitlines() if line.strip()]
    spec = parse_config(yaml.safe_load((run_dir / "config.yaml").read_text()))
    k = len(recs[0]["axis_variance"])
    mon = DriftMonitor(spec.drift, k, spec.algo.kl_coef, spec.algo.eps_low, spec.algo.eps_high)
    out = {"step": [], "D": [], "alpha": [], "alpha0": [], "weights": [], "kl_coef": [], "eps_low": [], "kl": [],
           "var": [], "triggered": [], "lead": [], "probe_step": [], "win_rate": [], "tau": spec.drift.tau,
           "release": spec.drift.release_ratio * spec.drift.tau, "lead_tau": spec.drift.lead_tau}
    for r in recs:
        mon.update(r["axis_variance"], r.get("axis_win_rate"))
        if r.get("axis_win_rate"):
            out["probe_step"].append(r["step"])
            out["win_rate"].append(r["axis_win_rate"])
        s = mon.state
        c = r["applied_control"]
        out["step"].append(r["step"])
        out["D"].append(s.divergence)
        out["alpha"].append(list(s.spectrum))
        out["alpha0"].append(list(s.baseline) if s.baseline else [float("nan")] * k)
        out["weights"].append(c["weights"])
        out["kl_coef"].append(c["kl_coef"])
        out["eps_low"].append(c["eps_low"])
        out["kl"].append(r["kl"])
        out["var"].append(r["axis_variance"])
        out["triggered"].append(bool(s.triggered))
        out["lead"].append(s.lead)
    return out


def render(run_dir: Path, png: Path, title: str = "") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = series(Path(run_dir))
    k = len(s["weights"][0])
    colors = ["#73bf69", "#f2cc0c", "#8ab8ff", "#ff780a", "#f2495c", "#5794f2"]
    plt.rcParams.update({"axes.facecolor": "#181b1f", "figure.facecolor": "#111217", "text.color": "#ccccdc",
                         "axes.labelcolor": "#ccccdc", "xtick.color": "#9fa7b3", "ytick.color": "#9fa7b3",
                         "axes.edgecolor": "#2c3235", "grid.color": "#2c3235", "font.size": 9})
    fig, axes = plt.subplots(2, 3, figsize=(17, 7))
    x = s["step"]

    def shade(ax):
        on = None
        for i, t in enumerate(s["triggered"] + [False]):
            if t and on is None:
                on = x[i]
            elif not t and on is not None:
                ax.axvspan(on, x[i - 1], color="#f2495c", alpha=0.12, lw=0)
                on = None

    def finish(ax, title: str, ncol: int = 1):
        shade(ax)
        ax.set_title(title)
        ax.legend(loc="upper left", fontsize=8, ncol=ncol, facecolor="#181b1f", edgecolor="#2c3235")

    ax = axes[0][0]
    ax.plot(x, s["D"], color=colors[0], label="D(t)")
    ax.axhline(s["tau"], color="#f2495c", ls="--", lw=1, label="τ (trigger)")
    ax.axhline(s["release"], color="#ff9830", ls=":", lw=1, label="release")
    finish(ax, "D(t) = KL(α(t) ‖ α(0)) and τ")
    ax = axes[0][1]
    for i in range(k):
        ax.plot(x, [a[i] for a in s["alpha"]], color=colors[i], label=f"α_{i}(t)")
        ax.plot(x, [a[i] for a in s["alpha0"]], color=colors[i], ls="--", lw=1, label=f"α_{i}(0)")
    finish(ax, "Variance spectrum α(t) vs start of run", ncol=k)
    ax = axes[0][2]
    for i in range(k):
        ax.plot(s["probe_step"], [w[i] for w in s["win_rate"]], ".-", color=colors[i], label=f"w_{i}")
    ax.axhline(0.5, color="#9fa7b3", lw=0.8)
    finish(ax, "Per-axis win rate against the reference (probe)", ncol=k)
    ax = axes[1][2]
    ax.plot(x, s["lead"], color=colors[0], label="L")
    ax.axhline(s["lead_tau"], color="#f2495c", ls="--", lw=1, label="τ_L (trigger)")
    finish(ax, "Win-rate lead L = w_top − max(½, w_second)")
    ax = axes[1][0]
    for i in range(k):
        ax.plot(x, [w[i] for w in s["weights"]], color=colors[i], label=f"m_{i}")
    finish(ax, "Axis weights m_l applied by the trainer", ncol=k)
    ax = axes[1][1]
    ax.plot(x, s["kl_coef"], color=colors[3], label="β_KL")
    ax.plot(x, s["eps_low"], color=colors[2], label="ε_low")
    ax.plot(x, s["kl"], color=colors[4], lw=1, label="KL(π ‖ π_ref)")
    finish(ax, "Trust region: β_KL, ε and KL")
    for row in axes:
        for ax in row:
            ax.grid(True, lw=0.5)
            ax.set_xlabel("step")
    fig.suptitle(title or "GPRL / Preference axes and drift", color="#ccccdc")
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m gprl.observability.render", description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir")
    p.add_argument("out", nargs="?", default=None)
    p.add_argument("--title", default="")
    args = p.parse_args(argv)
    out = Path(args.out or Path(args.run_dir) / "axes-dashboard.png")
    print(render(Path(args.run_dir), out, args.title))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
