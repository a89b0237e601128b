"""Each pass of GPRL's step with every row running its prompt against each prompt run once for its group
(model.sharePrompt), in one process, alternating, on the same sampled batch: the HF generation (prefill shared),
the GPM's scoring pass, the reference pass (no grad) and the policy's forward + backward.

    python benchmarks/shared_prompt.py [--size world|8m|30m|100m] [--prompts 8] [--group 8] [--max-new-tokens 32]
                                       [--context-words 0] [--repeats 5] [--threads 1]

CPU seconds per call, the median over --repeats rounds (each round times both ways, per-row first); the models
and prompts are trl_compare.py's (the world's, or random Llama policies on the world's tokenizer).
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
    ap.add_argument("--size", choices=["world", "8m", "30m", "100m"], default="world")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--context-words", type=int, default=0, help="a preamble of this many words before every prompt")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()

    import torch

    from gprl.config import RolloutSpec
    from gprl.learner.torch_learner import sequence_logprobs
    from gprl.rollout.hf import HFRollout
    from trl_compare import load_models, prompt_list

    torch.set_num_threads(args.threads)
    _, tok, model, gpm = load_models(args.size)
    prompts = prompt_list(args)[: args.prompts]
    spec = RolloutSpec(max_new_tokens=args.max_new_tokens)
    torch.manual_seed(0)
    batch = HFRollout(model, tok, spec, share_prompt=False).generate(prompts, args.group)
    rows = torch.arange(batch.sequences.shape[0])

    def generation(share):
        torch.manual_seed(1)
        HFRollout(model, tok, spec, share_prompt=share).generate(prompts, args.group)

    def gpm_pass(share):
        gpm.score(tok, batch.prompts, batch.responses, batch_size=len(rows), share_prompt=share)

    def reference(share):
        with torch.no_grad():
            sequence_logprobs(model, batch, rows, 1.0, share_prompt=share)

    def policy(share):
        model.train()
        model.zero_grad(set_to_none=True)
        logp, _ = sequence_logprobs(model, batch, rows, 1.0, with_entropy=True, share_prompt=share)
        (logp * batch.response_mask).sum().backward()
        model.eval()

    passes = {"generation": generation, "GPM scoring": gpm_pass, "reference pass": reference,
              "policy forward + backward": policy}
    times = {(name, share): [] for name in passes for share in (False, True)}
    for name, fn in passes.items():  # one untimed call of each: first-call allocations
        fn(False), fn(True)
    for _ in range(args.repeats):
        for name, fn in passes.items():
            for share in (False, True):
                t = time.process_time()
                fn(share)
                times[(name, share)].append(time.process_time() - t)
    prompt_tokens = float(batch.attention_mask[:, : batch.prompt_width].sum(1).float().mean())
    print(f"policy {args.size} ({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters), {args.prompts} prompts x "
          f"G={args.group}, prompts of {prompt_tokens:.1f} tokens, responses of "
          f"{float(batch.response_mask.sum(1).float().mean()):.1f}, {args.threads} torch threads, median of "
          f"{args.repeats}\n")
    print("| pass | every row its prompt (CPU s) | each prompt once (CPU s) | ratio |\n|---|---|---|---|")
    total = [0.0, 0.0]
    for name in passes:
        a, b = (statistics.median(times[(name, s)]) for s in (False, True))
        total[0], total[1] = total[0] + a, total[1] + b
        print(f"| {name} | {a:.3f} | {b:.3f} | {a / b:.2f}x |")
    print(f"| the four together | {total[0]:.3f} | {total[1]:.3f} | {total[0] / total[1]:.2f}x |")


if __name__ == "__main__":
    main()
