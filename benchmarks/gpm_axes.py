"""Do the world GPM's axes mean something? (issue 14, item 1: the measurements, and the recipes compared.)

For the world's GPM (k = 3), its BT model (k = 1) and GPM variants trained by other recipes (`--variants`), on
held-out prompts only:

- per-axis alignment: correlation, within groups of SFT-policy samples of one prompt, of each GPM axis's group score
  ŝ_l(i) with each oracle quality (relevance, form, length, style compliance on prompts that ask for a style,
  the cyclic taste's opener on prompts that do not) and with the exploit's proxy (topic mentions);
- axis separation: the mean absolute within-group correlation between different axes' group scores;
- share of the group-score variance on each axis (the spectrum α at the SFT policy);
- held-out accuracy on the world's default held-out preference pairs (labels drawn from the oracle, 5 % flipped;
  ceiling ≈ the oracle's own agreement with them) — the same pairs for every variant;
- accuracy on the world's cyclic triples: one SFT sample of a prompt that asks for no style, opened by each of the
  three styles (same body), so the oracle's cyclic taste alone decides formal ≻ casual ≻ poetic ≻ formal; a scalar
  model gets at most 2 of every 3;
- λ(x) across prompt kinds (style asked: formal / casual / poetic, any tone, none): mean per kind and the spread.

Each variant is a world built with other `pairs` / `preference_models` settings (gprl_world.spec; the SFT policy
is shared, the BT model skipped): built once into the world cache, then only measured.

    python benchmarks/gpm_axes.py [--variants world soft aspects ...] [--prompts 96] [--samples 8] [--out FILE]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time

import torch

from gprl_world.spec import GPM_RECIPES

_ASPECTS = "relevance|form+length|style+cycle"  # one group of the oracle's components per axis of a k = 3 GPM

# name → (pairs settings, preference_models settings, what it tries); "world" is the world's default GPM
VARIANTS: dict[str, tuple[dict, dict, str]] = {
    "world": ({}, {}, "the world's GPM: 6,000 sampled labels, 2 epochs, gate T = sqrt(hidden)"),
    "soft": ({"label_mode": "soft"}, {}, "cleaner labels: the oracle's probability, same pairs"),
    "more_pairs": ({"train_pairs": 24000}, {}, "4x the pairs (24,000 sampled labels)"),
    "longer": ({}, {"gpm_epochs": 6}, "3x the epochs (6)"),
    "gate_t1": ({}, {"gate_temperature": 1.0}, "gate temperature 1 instead of sqrt(hidden) = 11.3"),
    "authors_gate": ({}, {"gate_temperature": 1.0, "gate_total": 1.0},
                     "the GPM authors' gate: softmax without temperature, Σλ = 1"),
    "decorrelated": ({}, {"decorrelation": 1.0}, "cross-axis correlation penalty, weight 1"),
    "bigger_backbone": ({}, {"gpm_backbone_hidden": 256},
                        "a larger backbone than the policy's: hidden 256 (1.3M parameters against 0.35M), "
                        "SFT-ed on the policy's corpus"),
    "aspects": (*GPM_RECIPES["gpm_aspects"],
                "soft labels + per-aspect labels (relevance | form+length | style+cycle), weight 1 (world:gpm_aspects)"),
    "aspects_gate": ({"label_mode": "soft", "axis_labels": _ASPECTS},
                     {"axis_label_weight": 1.0, "gate_temperature": 1.0}, "aspects + gate temperature 1"),
    "aspects_more": ({"label_mode": "soft", "axis_labels": _ASPECTS, "train_pairs": 24000},
                     {"axis_label_weight": 1.0, "gate_temperature": 1.0, "gpm_epochs": 3},
                     "aspects + gate T = 1 + 24,000 pairs + 3 epochs"),
    "aspects_bigger": ({"label_mode": "soft", "axis_labels": _ASPECTS},
                       {"axis_label_weight": 1.0, "gate_temperature": 1.0, "gpm_backbone_hidden": 256},
                       "aspects + gate T = 1 + the larger backbone"),
}


def corr(x: list[float], y: list[float]) -> float:
    if len(x) < 3:
        return float("nan")
    mx, my = statistics.mean(x), statistics.mean(y)
    sx = sum((a - mx) ** 2 for a in x) ** 0.5
    sy = sum((b - my) ** 2 for b in y) ** 0.5
    return float("nan") if sx == 0 or sy == 0 else sum((a - mx) * (b - my) for a, b in zip(x, y)) / (sx * sy)


def variant_world(name: str, seed: int, log):
    """The world built with variant `name`'s settings (cached after the first time)."""
    from gprl_world import build_world
    from gprl_world.spec import WorldSpec

    pairs, models, _ = VARIANTS[name]
    base = WorldSpec()
    if name == "world":
        return build_world(seed=seed, log=log)
    spec = dataclasses.replace(
        base,
        pairs=dataclasses.replace(base.pairs, **pairs),
        preference_models=dataclasses.replace(base.preference_models, **{"bt_axes": 0, **models}),
    )
    return build_world(seed=seed, spec=spec, log=log)


class Probe:
    """The held-out material every model is measured on: SFT samples, the default held-out pairs, cyclic triples."""

    def __init__(self, world, n_prompts: int, samples: int):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from gprl.evaluate import sample
        from gprl_world import vocab as V
        from gprl_world.grammar import parse_prompt
        from gprl_world.oracle import Oracle, response_style, topic_mentions
        from gprl_world.pairs import read_pairs_jsonl

        self.oracle = oracle = Oracle(world.spec.oracle)
        self.tok = AutoTokenizer.from_pretrained(world.policy_dir)
        policy = AutoModelForCausalLM.from_pretrained(world.policy_dir).eval()
        self.prompts = list(world.heldout_prompts[:n_prompts])
        self.G = samples
        self.rep, self.responses = sample(policy, self.tok, self.prompts, samples, 32, 1.0, seed=11)
        self.pairs = read_pairs_jsonl(world.pairs_heldout)
        flip = world.spec.pairs.flip_rate
        q = [oracle.prob(p.prompt, p.chosen, p.rejected) for p in self.pairs]
        # the labels' own ceiling: the oracle's side, right unless the draw or the 5 % flip went the other way
        self.ceiling = statistics.mean(max(x, 1 - x) * (1 - flip) + min(x, 1 - x) * flip for x in q)
        quals = {
            "relevance": lambda p, r: oracle.relevance(p, r),
            "form": lambda p, r: oracle.form(r),
            "length": lambda p, r: oracle.length(p, r),
            "style (asked)": lambda p, r: oracle.style(p, r) if parse_prompt(p).style else None,
            "opener rank (cyclic)": lambda p, r: (None if parse_prompt(p).style else
                                                  {"formal": 1.0, "casual": 0.0, "poetic": -1.0}.get(
                                                      response_style(r) or "", None)),
            "topic mentions (exploit proxy)": lambda p, r: float(topic_mentions(p, r)),
        }
        G = samples
        self.quality_values = {q: [[fn(p, self.responses[b * G + i]) for i in range(G)]
                                   for b, p in enumerate(self.prompts)] for q, fn in quals.items()}
        # cyclic triples from the no-style prompts' samples, one body opened by each style
        self.trip = ([], [], [])
        for b, p in enumerate(self.prompts):
            if parse_prompt(p).style is not None:
                continue
            words = self.responses[b * G].split()
            if words and words[0] in V.STYLE_OF_OPENER:
                words = words[2:] if len(words) > 1 and words[1] == V.COMMA else words[1:]
            body = " ".join(words)
            opened = {st: f"{V.STYLE_OPENERS[st][0]} {V.COMMA} {body}" for st in V.STYLES}
            for a, c in (("formal", "casual"), ("casual", "poetic"), ("poetic", "formal")):
                self.trip[0].append(p), self.trip[1].append(opened[a]), self.trip[2].append(opened[c])
        self.kinds = [parse_prompt(p).style or ("any tone" if "any tone" in p else "none") for p in self.prompts]

    @torch.no_grad()
    def measure(self, model) -> dict:
        from gprl.algo import group_axis_scores
        from gprl.gpm.training import pair_axis_scores

        tok, G, k = self.tok, self.G, model.config.axes
        out = model.score(tok, self.rep, self.responses, batch_size=64)
        v = out.embeddings.view(-1, G, 2 * k)
        lam = out.eigenvalues.view(-1, G, k)[:, 0]
        s = group_axis_scores(v, lam)  # (P, G, k)
        var = s.var(dim=1, unbiased=False).mean(dim=0)
        entry: dict = {"spectrum": [round(x, 3) for x in (var / var.sum()).tolist()], "alignment": {}}
        for q, values in self.quality_values.items():
            row = []
            for l in range(k):
                xs, ys = [], []
                for b, vals in enumerate(values):
                    keep = [i for i in range(G) if vals[i] is not None]
                    if len(keep) < 2:
                        continue
                    mq = statistics.mean(vals[i] for i in keep)
                    ms = statistics.mean(float(s[b, i, l]) for i in keep)
                    xs += [float(s[b, i, l]) - ms for i in keep]
                    ys += [vals[i] - mq for i in keep]
                row.append(round(corr(xs, ys), 3))
            entry["alignment"][q] = row
        centred = (s - s.mean(dim=1, keepdim=True)).reshape(-1, k)
        cross = [abs(corr(centred[:, a].tolist(), centred[:, b].tolist())) for a in range(k) for b in range(a + 1, k)]
        entry["cross_axis_abs_corr"] = round(statistics.mean(cross), 3) if cross else None

        po = model.score(tok, [p.prompt for p in self.pairs], [p.chosen for p in self.pairs], batch_size=64)
        pr = model.score(tok, [p.prompt for p in self.pairs], [p.rejected for p in self.pairs], batch_size=64)
        entry["heldout_accuracy"] = round(float((pair_axis_scores(po, pr).sum(-1) > 0).float().mean()), 3)
        entry["heldout_ceiling"] = round(self.ceiling, 3)

        ca = model.score(tok, self.trip[0], self.trip[1], batch_size=64)
        cb = model.score(tok, self.trip[0], self.trip[2], batch_size=64)
        entry["cyclic_accuracy"] = round(float((pair_axis_scores(ca, cb).sum(-1) > 0).float().mean()), 3)
        entry["cyclic_pairs"] = len(self.trip[0])
        entry["oracle_cyclic_check"] = float(statistics.mean(
            self.oracle.prob(p, a, c) > 0.5 for p, a, c in zip(*self.trip)))

        kinds: dict[str, list] = {}
        for b, kind in enumerate(self.kinds):
            kinds.setdefault(kind, []).append(lam[b].tolist())
        entry["lambda_by_kind"] = {kd: [round(statistics.mean(x[l] for x in xs), 3) for l in range(k)]
                                   for kd, xs in sorted(kinds.items())}
        means = list(entry["lambda_by_kind"].values())
        entry["lambda_spread"] = round(max(max(m[l] for m in means) - min(m[l] for m in means) for l in range(k)), 3)
        return entry


def table(report: dict) -> str:
    """The comparison as a markdown table (one column per model)."""
    names = [n for n in report["models"]]
    qualities = list(next(iter(report["models"].values()))["alignment"])

    def cell(e, q):
        return " / ".join(f"{x:+.2f}" for x in e["alignment"][q])

    rows = [("variance share per axis", lambda e: " / ".join(f"{x:.2f}" for x in e["spectrum"]))]
    rows += [(f"{q} (corr. per axis)", lambda e, q=q: cell(e, q)) for q in qualities]
    rows += [
        ("mean abs corr. between axes", lambda e: "—" if e["cross_axis_abs_corr"] is None else f"{e['cross_axis_abs_corr']:.2f}"),
        ("held-out accuracy", lambda e: f"{e['heldout_accuracy']:.3f}"),
        ("cyclic triples", lambda e: f"{e['cyclic_accuracy']:.3f}"),
        ("λ spread across prompt kinds", lambda e: "—" if len(e["spectrum"]) == 1 else f"{e['lambda_spread']:.3f}"),
        ("training s", lambda e: f"{e['train_seconds']:.0f}" if e.get("train_seconds") else "—"),
    ]
    lines = ["| | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for label, fn in rows:
        lines.append(f"| {label} | " + " | ".join(fn(report["models"][n]) for n in names) + " |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--variants", nargs="*", default=["world"], choices=list(VARIANTS),
                    help="GPM recipes to compare (each built once into the world cache); the world's BT is always measured")
    ap.add_argument("--prompts", type=int, default=96)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--world-seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", help="write the JSON report here too")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from gprl.gpm import GeneralPreferenceModel

    quiet = lambda *_: None  # noqa: E731
    world = variant_world("world", args.world_seed, quiet)
    probe = Probe(world, args.prompts, args.samples)
    report: dict = {"world_seed": args.world_seed, "prompts": len(probe.prompts), "samples": probe.G, "models": {}}
    for name in dict.fromkeys(["world", *args.variants]):
        t0 = time.perf_counter()
        w = variant_world(name, args.world_seed, lambda m: print(f"[{name}] {m}", flush=True))
        built = time.perf_counter() - t0
        entry = probe.measure(GeneralPreferenceModel.from_pretrained(w.gpm_dir).eval())
        entry["recipe"] = VARIANTS[name][2]
        entry["train_seconds"] = w.info.get("models", {}).get("gpm", {}).get("seconds")
        entry["build_seconds_this_run"] = round(built, 1)
        report["models"][name] = entry
        print(f"[{name}] held-out {entry['heldout_accuracy']:.3f}, cyclic {entry['cyclic_accuracy']:.3f}, "
              f"λ spread {entry['lambda_spread']:.3f}, spectrum {entry['spectrum']}", flush=True)
        if name == "world":
            report["models"]["bt"] = probe.measure(GeneralPreferenceModel.from_pretrained(w.bt_dir).eval())
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(report, fh, indent=1)
    print(json.dumps(report, indent=1))
    print(table(report))


if __name__ == "__main__":
    main()
