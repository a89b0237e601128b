"""Do the world GPM's axes mean something? (issue 14, item 1: the measurements.)

For the world's GPM (k = 3) and BT model (k = 1), on held-out prompts only:

- per-axis alignment: correlation, within groups of SFT-policy samples of one prompt, of each GPM axis's group score
  ŝ_l(i) with each oracle quality (relevance, form, length, style compliance on prompts that ask for a style,
  the cyclic taste's opener on prompts that do not) and with the exploit's proxy (topic mentions);
- share of the group-score variance on each axis (the spectrum α at the SFT policy);
- held-out accuracy on the world's held-out preference pairs (labels drawn from the oracle, 5 % flipped; ceiling
  ≈ the oracle's own agreement with them);
- accuracy on the world's cyclic triples: one SFT sample of a prompt that asks for no style, opened by each of the
  three styles (same body), so the oracle's cyclic taste alone decides formal ≻ casual ≻ poetic ≻ formal; a scalar
  model gets at most 2 of every 3;
- λ(x) across prompt kinds (style asked: formal / casual / poetic, any tone, none): mean per kind and the spread.

    python benchmarks/gpm_axes.py [--prompts 96] [--samples 8] [--world-seed 0]
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch


def corr(x: list[float], y: list[float]) -> float:
    if len(x) < 3:
        return float("nan")
    mx, my = statistics.mean(x), statistics.mean(y)
    sx = sum((a - mx) ** 2 for a in x) ** 0.5
    sy = sum((b - my) ** 2 for b in y) ** 0.5
    return float("nan") if sx == 0 or sy == 0 else sum((a - mx) * (b - my) for a, b in zip(x, y)) / (sx * sy)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=96)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--world-seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from gprl.algo import group_axis_scores
    from gprl.evaluate import sample
    from gprl.gpm import GeneralPreferenceModel
    from gprl.world import build_world
    from gprl.world import vocab as V
    from gprl.world.grammar import parse_prompt
    from gprl.world.oracle import Oracle, response_style, topic_mentions
    from gprl.world.pairs import read_pairs_jsonl

    world = build_world(seed=args.world_seed, log=lambda *_: None)
    oracle = Oracle(world.spec.oracle)
    tok = AutoTokenizer.from_pretrained(world.policy_dir)
    policy = AutoModelForCausalLM.from_pretrained(world.policy_dir).eval()
    models = {"gpm": GeneralPreferenceModel.from_pretrained(world.gpm_dir).eval(),
              "bt": GeneralPreferenceModel.from_pretrained(world.bt_dir).eval()}
    prompts = list(world.heldout_prompts[: args.prompts])
    rep, responses = sample(policy, tok, prompts, args.samples, 32, 1.0, seed=11)
    G = args.samples
    report: dict = {"world_seed": args.world_seed, "prompts": len(prompts), "samples": G}

    quals = {
        "relevance": lambda p, r: oracle.relevance(p, r),
        "form": lambda p, r: oracle.form(r),
        "length": lambda p, r: oracle.length(p, r),
        "style (asked)": lambda p, r: oracle.style(p, r) if parse_prompt(p).style else None,
        "opener rank (cyclic)": lambda p, r: (None if parse_prompt(p).style else
                                              {"formal": 1.0, "casual": 0.0, "poetic": -1.0}.get(response_style(r) or "", None)),
        "topic mentions (exploit proxy)": lambda p, r: float(topic_mentions(p, r)),
    }
    with torch.no_grad():
        for name, model in models.items():
            out = model.score(tok, rep, responses, batch_size=64)
            k = model.config.axes
            v = out.embeddings.view(-1, G, 2 * k)
            lam = out.eigenvalues.view(-1, G, k)[:, 0]
            s = group_axis_scores(v, lam)  # (P, G, k)
            var = s.var(dim=1, unbiased=False).mean(dim=0)
            entry: dict = {"spectrum": (var / var.sum()).tolist(), "alignment": {}}
            for q, fn in quals.items():
                row = []
                for l in range(k):
                    xs, ys = [], []
                    for b, p in enumerate(prompts):
                        vals = [fn(p, responses[b * G + i]) for i in range(G)]
                        keep = [i for i in range(G) if vals[i] is not None]
                        if len(keep) < 2:
                            continue
                        mq = statistics.mean(vals[i] for i in keep)
                        ms = statistics.mean(float(s[b, i, l]) for i in keep)
                        xs += [float(s[b, i, l]) - ms for i in keep]
                        ys += [vals[i] - mq for i in keep]
                    row.append(round(corr(xs, ys), 3))
                entry["alignment"][q] = row

            # held-out pairs
            pairs = read_pairs_jsonl(world.pairs_heldout)
            po = model.score(tok, [p.prompt for p in pairs], [p.chosen for p in pairs], batch_size=64)
            pr = model.score(tok, [p.prompt for p in pairs], [p.rejected for p in pairs], batch_size=64)
            from gprl.gpm.training import pair_axis_scores

            margin = pair_axis_scores(po, pr).sum(-1)
            entry["heldout_accuracy"] = float((margin > 0).float().mean())
            # the labels' own ceiling: the oracle's side, right unless the draw or the 5 % flip went the other way
            flip = world.spec.pairs.flip_rate
            q = [oracle.prob(p.prompt, p.chosen, p.rejected) for p in pairs]
            entry["heldout_ceiling"] = statistics.mean(max(x, 1 - x) * (1 - flip) + min(x, 1 - x) * flip for x in q)

            # cyclic triples from the no-style prompts' samples that have a body after an opener
            trip_p, trip_a, trip_b, want = [], [], [], []
            for b, p in enumerate(prompts):
                if parse_prompt(p).style is not None:
                    continue
                body = responses[b * G]
                words = body.split()
                if words and words[0] in V.STYLE_OF_OPENER:
                    words = words[2:] if len(words) > 1 and words[1] == V.COMMA else words[1:]
                body = " ".join(words)
                opened = {st: f"{V.STYLE_OPENERS[st][0]} {V.COMMA} {body}" for st in V.STYLES}
                for a, c in (("formal", "casual"), ("casual", "poetic"), ("poetic", "formal")):
                    trip_p.append(p), trip_a.append(opened[a]), trip_b.append(opened[c]), want.append(1)
            ca = model.score(tok, trip_p, trip_a, batch_size=64)
            cb = model.score(tok, trip_p, trip_b, batch_size=64)
            cm = pair_axis_scores(ca, cb).sum(-1)
            entry["cyclic_accuracy"] = float((cm > 0).float().mean())
            entry["cyclic_pairs"] = len(want)
            entry["oracle_cyclic_check"] = float(statistics.mean(
                oracle.prob(p, a, c) > 0.5 for p, a, c in zip(trip_p, trip_a, trip_b)))

            # λ by prompt kind
            kinds: dict[str, list] = {}
            for b, p in enumerate(prompts):
                info = parse_prompt(p)
                kind = info.style or ("any tone" if "any tone" in p else "none")
                kinds.setdefault(kind, []).append(lam[b].tolist())
            entry["lambda_by_kind"] = {kd: [round(statistics.mean(x[l] for x in xs), 3) for l in range(k)]
                                       for kd, xs in sorted(kinds.items())}
            means = list(entry["lambda_by_kind"].values())
            entry["lambda_spread"] = max(max(m[l] for m in means) - min(m[l] for m in means) for l in range(k))
            report[name] = entry
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
