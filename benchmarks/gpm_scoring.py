"""Scoring a group of G responses: GPM (one backbone pass per response, then G² cheap bilinear products)
against a pairwise ranker on the same backbone (one pass per ordered pair on the concatenated input, as PairRM).

    python benchmarks/gpm_scoring.py [--groups 4 8 16 32] [--repeats 3]

Prints a markdown table: wall time per group for each, and their ratio.
"""

from __future__ import annotations

import argparse
import platform
import time

import torch
from transformers import LlamaConfig

from gprl.algo import pairwise_scores
from gprl.gpm import GeneralPreferenceModel, GPMConfig


class PairwiseRanker(torch.nn.Module):
    """The PairRM way: [prompt; response i; response j] → scalar logit of i ≻ j, per ordered pair."""

    def __init__(self, config):
        super().__init__()
        from transformers import AutoModel

        self.backbone = AutoModel.from_config(config)
        self.head = torch.nn.Linear(config.hidden_size, 1, bias=False)

    def forward(self, ids):
        return self.head(self.backbone(input_ids=ids).last_hidden_state[:, -1]).squeeze(-1)


def time_it(fn, repeats):
    fn()  # warm-up
    best = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best.append(time.perf_counter() - t)
    return sorted(best)[len(best) // 2]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--groups", type=int, nargs="+", default=[4, 8, 16, 32])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--response-tokens", type=int, default=64)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batch", type=int, default=64, help="sequences per forward pass, for both")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=1000, hidden_size=args.hidden, intermediate_size=4 * args.hidden,
                      num_hidden_layers=args.layers, num_attention_heads=args.hidden // 32,
                      num_key_value_heads=args.hidden // 32, max_position_embeddings=512)
    gpm = GeneralPreferenceModel.from_backbone_config(cfg, GPMConfig(axes=3)).eval()
    ranker = PairwiseRanker(cfg).eval()
    P, T = args.prompt_tokens, args.response_tokens
    print(f"machine: {platform.processor() or platform.machine()}, {args.threads} torch threads, torch {torch.__version__}")
    print(f"backbone: Llama hidden {args.hidden}, {args.layers} layers; prompt {P} + response {T} tokens; batch {args.batch}\n")
    print("| G | GPM s/group | pairwise s/group | pairwise / GPM | GPM passes | pairwise passes |")
    print("|---|---|---|---|---|---|")
    for G in args.groups:
        prompt = torch.randint(0, 1000, (P,))
        responses = torch.randint(0, 1000, (G, T))

        @torch.no_grad()
        def gpm_group():
            ids = torch.cat([prompt.expand(G, P), responses], dim=1)
            outs = []
            for i in range(0, G, args.batch):
                chunk = ids[i : i + args.batch]
                n = chunk.shape[0]
                outs.append(gpm(chunk, torch.ones_like(chunk), torch.full((n,), P - 1), torch.full((n,), P + T - 1)))
            v = torch.cat([o.embeddings for o in outs])[None]
            lam = outs[0].eigenvalues[:1]
            return pairwise_scores(v, lam)

        @torch.no_grad()
        def pairwise_group():
            pairs = [(i, j) for i in range(G) for j in range(G) if i != j]
            scores = torch.zeros(G, G)
            for s in range(0, len(pairs), args.batch):
                chunk = pairs[s : s + args.batch]
                ids = torch.stack([torch.cat([prompt, responses[i], responses[j]]) for i, j in chunk])
                for (i, j), logit in zip(chunk, ranker(ids)):
                    scores[i, j] = logit
            return scores

        tg, tp = time_it(gpm_group, args.repeats), time_it(pairwise_group, args.repeats)
        print(f"| {G} | {tg:.4f} | {tp:.4f} | {tp / tg:.1f}x | {G} | {G * (G - 1)} |", flush=True)


if __name__ == "__main__":
    main()
