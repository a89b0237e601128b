"""Three cuts of GPRL's step, each on and off, in one process, alternating, on the same sampled batches:

- length buckets (learner.lengthBuckets, gprl.buckets): the update's reference pass (no grad), the policy's forward
  + backward and the GPM's scoring pass with a batch as one pass as wide as its longest response, against its rows
  split into passes of similar length (each prompt run once per group in both);
- reserved KV room (gprl.rollout.hf.ReservedLayer): HF generation with the cache copied into a new tensor at every
  decoding step (transformers' DynamicLayer), against each step's columns written into room reserved after the
  prefill (the same samples at a fixed seed);
- the GPM's scoring beside the reference pass (Trainer._score_beside_reference): one after the other with every
  torch thread, against the GPM on a worker thread during the reference pass with half the threads each (with
  --threads 2 or more; the trainer runs them one after the other on one thread).

    python benchmarks/step_cuts.py [--size world|8m|30m|100m] [--prompts 4] [--group 8] [--max-new-tokens 32]
                                   [--buckets 4] [--batches 3] [--repeats 4] [--threads 1]

CPU seconds per pass over one batch (the whole batch one micro-batch, as in trl_compare.py) — wall seconds for the two
passes at the same time, which take twice the cores — the median over --repeats rounds of the --batches batches; the
padded cells are response columns × rows computed.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", choices=["world", "8m", "30m", "100m"], default="8m")
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--buckets", type=int, default=4, help="learner.lengthBuckets to compare with 1")
    ap.add_argument("--batches", type=int, default=3, help="sampled batches (their lengths differ)")
    ap.add_argument("--repeats", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()

    import torch

    from gprl.buckets import length_buckets
    from gprl.config import RolloutSpec
    from gprl.learner.torch_learner import sequence_logprobs
    from gprl.rollout import hf
    from gprl.rollout.hf import HFRollout
    from gprl.overlap import SideThread
    from trl_compare import load_models, prompt_list

    torch.set_num_threads(args.threads)
    _, tok, model, gpm = load_models(args.size)
    args.context_words = 0
    prompts = prompt_list(args)[: args.prompts]
    torch.manual_seed(0)
    rollout = HFRollout(model, tok, RolloutSpec(max_new_tokens=args.max_new_tokens, top_k=0))
    batches = [rollout.generate(prompts, args.group) for _ in range(args.batches)]
    rows = torch.arange(batches[0].sequences.shape[0])

    def reference(batch, buckets):
        with torch.no_grad():
            sequence_logprobs(model, batch, rows, 1.0, share_prompt=True, max_buckets=buckets)

    def policy(batch, buckets):
        model.train()
        model.zero_grad(set_to_none=True)
        logp, _ = sequence_logprobs(model, batch, rows, 1.0, with_entropy=True, share_prompt=True, max_buckets=buckets)
        (logp * batch.response_mask).sum().backward()
        model.eval()

    def gpm_pass(batch, buckets):
        gpm.score(tok, batch.prompts, batch.responses, batch_size=len(rows), max_buckets=buckets)

    gpm_thread = SideThread("gpm")

    def beside(batch, on):
        # as Trainer._score_beside_reference: the GPM on a worker thread during the reference pass, half the
        # threads each; off: one after the other with all the threads
        if not on:
            gpm_pass(batch, args.buckets)
            reference(batch, args.buckets)
            return
        with gpm_thread.beside(lambda: gpm_pass(batch, args.buckets), share_cores=True) as scored:
            reference(batch, args.buckets)
        scored.result()

    def generation(batch, reserve):
        # off: the prefill's cache keeps transformers' DynamicLayers (a benchmark-only switch)
        hf.ReservedLayer.taking_over = taking_over if reserve else (lambda layer, room: layer)
        torch.manual_seed(1)
        rollout.generate(prompts, args.group)
        hf.ReservedLayer.taking_over = taking_over

    taking_over = hf.ReservedLayer.taking_over
    ways = {"reference pass": (1, args.buckets), "policy forward + backward": (1, args.buckets),
            "GPM scoring": (1, args.buckets), "generation": (False, True),
            "GPM scoring + reference pass": (False, True)}
    passes = {"reference pass": reference, "policy forward + backward": policy, "GPM scoring": gpm_pass,
              "generation": generation, "GPM scoring + reference pass": beside}
    if args.threads == 1:  # the trainer runs the two one after the other then
        del ways["GPM scoring + reference pass"], passes["GPM scoring + reference pass"]
    # CPU seconds for a pass on its own; wall seconds for two passes at the same time (they take twice the cores)
    clock = {name: time.process_time for name in passes} | {"GPM scoring + reference pass": time.perf_counter}
    times = {(name, k): [] for name in passes for k in ways[name]}
    for name, fn in passes.items():  # one untimed call each: first-call allocations
        for k in ways[name]:
            fn(batches[0], k)
    for _ in range(args.repeats):
        for name, fn in passes.items():
            for batch in batches:
                for k in ways[name]:
                    t = clock[name]()
                    fn(batch, k)
                    times[(name, k)].append(clock[name]() - t)
    cells = {k: 0 for k in (1, args.buckets)}
    for batch in batches:
        lengths = batch.response_mask.sum(1).clamp_min(1)
        for k in cells:
            cells[k] += sum(len(b) * int(lengths[b].max()) for b in length_buckets(lengths, k))
    tokens = sum(int(b.response_mask.sum()) for b in batches)
    print(f"policy {args.size} ({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters), "
          f"{args.batches} batches of {args.prompts} prompts x G={args.group}, <= {args.max_new_tokens} new tokens, responses of "
          f"{tokens / (len(rows) * len(batches)):.1f} tokens, {args.threads} torch threads, median of "
          f"{args.repeats * len(batches)}; response cells computed: {cells[1]} in one pass, {cells[args.buckets]} "
          f"with up to {args.buckets} ({tokens} tokens)\n")
    print("| pass | off (s) | on (s) | ratio |\n|---|---|---|---|")
    for name, label in (("reference pass", f"length buckets (1 → {args.buckets})"),
                        ("policy forward + backward", f"length buckets (1 → {args.buckets})"),
                        ("GPM scoring", f"length buckets (1 → {args.buckets})"),
                        ("generation", "reserved KV room"),
                        ("GPM scoring + reference pass", "at the same time, wall s")):
        if name in ways:
            a, b = (statistics.median(times[(name, k)]) for k in ways[name])
            print(f"| {name}, {label} | {a:.3f} | {b:.3f} | {a / b:.2f}x |")


if __name__ == "__main__":
    main()
