"""The world's tiny policy: a Llama-architecture causal LM built from a config, SFT on world samples."""

from __future__ import annotations

import math
import time
from typing import Sequence

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerBase

from .spec import PolicySpec


def policy_config(tokenizer: PreTrainedTokenizerBase, spec: PolicySpec = PolicySpec()) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_heads,
        head_dim=spec.hidden_size // spec.num_heads,
        max_position_embeddings=spec.max_positions,
        tie_word_embeddings=True,
        initializer_range=spec.init_std,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )


def build_policy(tokenizer: PreTrainedTokenizerBase, spec: PolicySpec = PolicySpec(), seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    model = LlamaForCausalLM(policy_config(tokenizer, spec))
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    return model


def _encode_examples(tokenizer, examples: Sequence[tuple[str, str]]):
    """Token ids of ``prompt response <eos>`` and the loss mask (response and eos only)."""
    out = []
    for prompt, response in examples:
        p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        r = tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        out.append((p + r, [0] * len(p) + [1] * len(r)))
    return out


def sft(
    model: LlamaForCausalLM,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[tuple[str, str]],
    spec: PolicySpec = PolicySpec(),
    seed: int = 0,
    log_every: int = 0,
) -> dict:
    """Supervised fine-tuning on (prompt, response) pairs: next-token loss on response tokens.

    AdamW, linear warm-up then cosine decay; seeded batch order. Returns a small summary.
    """
    data = _encode_examples(tokenizer, examples)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=spec.sft_lr, weight_decay=spec.weight_decay, betas=(0.9, 0.98))

    def lr_at(step: int) -> float:
        if step < spec.sft_warmup:
            return (step + 1) / spec.sft_warmup
        t = (step - spec.sft_warmup) / max(1, spec.sft_steps - spec.sft_warmup)
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * t))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    model.train()
    t0 = time.perf_counter()
    perm = torch.randperm(len(data), generator=gen)
    pos = 0
    losses = []
    pad = tokenizer.pad_token_id
    for step in range(spec.sft_steps):
        if pos + spec.sft_batch_size > len(data):
            perm, pos = torch.randperm(len(data), generator=gen), 0
        batch = [data[i] for i in perm[pos : pos + spec.sft_batch_size].tolist()]
        pos += spec.sft_batch_size
        width = max(len(ids) for ids, _ in batch)
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        labels = torch.full((len(batch), width), -100, dtype=torch.long)
        att = torch.zeros((len(batch), width), dtype=torch.long)
        for i, (seq, mask) in enumerate(batch):  # right padding for training
            ids[i, : len(seq)] = torch.tensor(seq)
            att[i, : len(seq)] = 1
            labels[i, : len(seq)] = torch.tensor([t if m else -100 for t, m in zip(seq, mask)])
        loss = model(input_ids=ids, attention_mask=att, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if log_every and (step + 1) % log_every == 0:
            print(f"sft step {step + 1}/{spec.sft_steps} loss {sum(losses[-log_every:]) / log_every:.3f}", flush=True)
    model.eval()
    tail = losses[-max(1, len(losses) // 10) :]
    return {"steps": spec.sft_steps, "final_loss": sum(tail) / len(tail), "seconds": time.perf_counter() - t0}


@torch.no_grad()
def sample_responses(
    model: LlamaForCausalLM,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    seed: int = 0,
    temperature: float = 1.0,
    max_new_tokens: int = 32,
    batch_size: int = 256,
) -> list[str]:
    """One sampled response per prompt (repeat a prompt for several), decoded without special tokens.

    Deterministic for a given seed, prompt list and batch size (it re-seeds torch's global RNG).
    """
    model.eval()
    torch.manual_seed(seed)
    old_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    out: list[str] = []
    try:
        for start in range(0, len(prompts), batch_size):
            chunk = list(prompts[start : start + batch_size])
            enc = tokenizer(chunk, return_tensors="pt", padding=True, add_special_tokens=False)
            gen = model.generate(
                **enc,
                do_sample=True,
                temperature=temperature,
                top_k=0,
                top_p=1.0,
                max_new_tokens=max_new_tokens,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
            new = gen[:, enc["input_ids"].shape[1] :]
            out.extend(" ".join(t.split()) for t in tokenizer.batch_decode(new, skip_special_tokens=True))
    finally:
        tokenizer.padding_side = old_side
    return out
