"""Turning token-level generations (from vLLM, local or remote) into a RolloutBatch — no vLLM import here."""

from __future__ import annotations

from typing import Sequence

import torch

from gprl.rollout.base import RolloutBatch, WeightSource


def encode_prompts(tokenizer, prompts: Sequence[str], max_prompt_tokens: int) -> list[list[int]]:
    """Prompt token ids exactly as HFRollout feeds them (no special tokens, left-truncated)."""
    ids = tokenizer(list(prompts), add_special_tokens=False)["input_ids"]
    return [list(x[-max_prompt_tokens:]) for x in ids]


def assemble_batch(tokenizer, prompts: Sequence[str], prompt_ids: list[list[int]],
                   completions: list[list[tuple[list[int], list[float] | None]]], group_size: int,
                   version: int) -> RolloutBatch:
    """completions[b][g] = (token ids, per-token log-probs) of response g to prompt b, eos included when emitted.

    Layout as HFRollout: prompts left-padded to the longest, responses right-padded; prompt-major rows.
    """
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    width = max(len(p) for p in prompt_ids)
    T = max(1, max(len(t) for group in completions for t, _ in group))
    rows, pmask, rmask, resp, logps = [], [], [], [], []
    for b, group in enumerate(completions):
        if len(group) != group_size:
            raise ValueError(f"prompt {b}: {len(group)} completions, expected {group_size}")
        p = prompt_ids[b]
        for tokens, lp in group:
            rows.append([pad] * (width - len(p)) + list(p))
            pmask.append([0] * (width - len(p)) + [1] * len(p))
            resp.append(list(tokens) + [pad] * (T - len(tokens)))
            rmask.append([1] * len(tokens) + [0] * (T - len(tokens)))
            lp = list(lp) if lp is not None else [0.0] * len(tokens)
            logps.append(lp + [0.0] * (T - len(lp)))
    response = torch.tensor(resp, dtype=torch.long)
    response_mask = torch.tensor(rmask, dtype=torch.long)
    texts = tokenizer.batch_decode(response, skip_special_tokens=True)
    return RolloutBatch(
        prompts=[p for p in prompts for _ in range(group_size)],
        responses=texts,  # as the model wrote them: whitespace is content
        sequences=torch.cat([torch.tensor(rows, dtype=torch.long), response], dim=1),
        attention_mask=torch.cat([torch.tensor(pmask, dtype=torch.long), response_mask], dim=1),
        response_mask=response_mask,
        prompt_width=width,
        group_size=group_size,
        policy_version=version,
        sampler_logp=torch.tensor(logps, dtype=torch.float32),
    )


def _refuse_lora(policy) -> None:
    """The vLLM backends load plain checkpoint names; a peft model's are its adapters' (merge them first)."""
    from peft import PeftModel

    if isinstance(policy, PeftModel):
        raise NotImplementedError("vLLM rollouts with LoRA: merge the adapters (model.lora.enabled: false)")


def policy_weights(policy, learner: WeightSource | None = None):
    """(name, tensor) pairs of the policy in Hugging Face checkpoint names, one at a time (a ZeRO-3 learner's
    parameters are gathered for the duration). LoRA adapters are not supported by the vLLM backends."""
    _refuse_lora(policy)
    import contextlib

    with learner.gathered_parameters() if learner is not None else contextlib.nullcontext():
        for name, param in policy.named_parameters():
            yield name, param.detach()


def layerwise_weights(policy, learner: WeightSource):
    """(name, tensor) pairs as `policy_weights` yields them (the same order), each module's own parameters gathered
    only while its tensors are consumed: a ZeRO-3 push then holds one module whole at a time, not the model. Every
    rank must run the whole iteration (each gather is a collective); a tensor stays valid after the next one is
    asked for only as long as the caller keeps a reference to it."""
    _refuse_lora(policy)
    seen: set[int] = set()
    # named_parameters' own walk (modules in order, each one's direct parameters, a shared one once)
    for prefix, module in policy.named_modules():
        own = [(f"{prefix}.{n}" if prefix else n, p) for n, p in module.named_parameters(recurse=False)
               if id(p) not in seen]
        if not own:
            continue
        seen.update(id(p) for _, p in own)
        with learner.gathered_parameters([p for _, p in own]):
            for name, p in own:
                yield name, p.detach()


def bucketed(weights, bucket_bytes: int):
    """Group (name, tensor) pairs into lists of about bucket_bytes each."""
    bucket, size = [], 0
    for name, t in weights:
        bucket.append((name, t))
        size += t.numel() * t.element_size()
        if size >= bucket_bytes:
            yield bucket
            bucket, size = [], 0
    if bucket:
        yield bucket
