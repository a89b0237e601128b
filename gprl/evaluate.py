"""Win rate of a policy against a reference policy under a GPM (a source provider's judge adds its own, see sources.py)."""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from gprl.gpm import GeneralPreferenceModel
from gprl.gpm.training import pair_axis_scores


@torch.no_grad()
def sample(model, tokenizer, prompts: Sequence[str], n: int, max_new_tokens: int, temperature: float, seed: int,
           batch_size: int = 256, synced_gpus: bool = False,
           text: Callable[[str], str] | None = None) -> tuple[list[str], list[str]]:
    """n sampled responses per prompt; returns (prompts repeated, responses). Seeded, restores the global RNG.
    Responses are the text as the model wrote it, or `text(response)` under a source provider's convention.
    synced_gpus: every rank keeps stepping until all are done (ZeRO-3: each forward is a collective)."""
    rng_state = torch.get_rng_state()
    torch.manual_seed(seed)
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    was_training = model.training
    model.eval()
    rep = [p for p in prompts for _ in range(n)]
    out: list[str] = []
    try:
        for start in range(0, len(rep), batch_size):
            chunk = rep[start : start + batch_size]
            enc = tokenizer(chunk, return_tensors="pt", padding=True, add_special_tokens=False)
            enc = {k: t.to(next(model.parameters()).device) for k, t in enc.items()}
            gen = model.generate(
                **enc, do_sample=True, temperature=temperature, top_k=0, top_p=1.0, max_new_tokens=max_new_tokens,
                pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                **({"synced_gpus": True} if synced_gpus else {}),
            )
            texts = tokenizer.batch_decode(gen[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
            out.extend(map(text, texts) if text is not None else texts)
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
        torch.set_rng_state(rng_state)
    return rep, out


@torch.no_grad()
def win_rates(gpm: GeneralPreferenceModel, tokenizer, prompts: Sequence[str], a: Sequence[str],
              b: Sequence[str]) -> tuple[float, list[float]]:
    """(mean P_GPM(a ≻ b | x) = σ(s(a, b) / β), and per axis l the mean σ(s_l(a, b) / β): how often a beats b on
    that axis alone). One scoring pass per side. One axis running ahead of the others while they stay near ½ is
    single-axis exploitation."""
    s = pair_axis_scores(gpm.score(tokenizer, prompts, a), gpm.score(tokenizer, prompts, b))  # (N, k)
    beta = gpm.config.beta
    return float(torch.sigmoid(s.sum(-1) / beta).mean()), torch.sigmoid(s / beta).mean(0).tolist()


def gpm_win_rate(gpm: GeneralPreferenceModel, tokenizer, prompts: Sequence[str], a: Sequence[str], b: Sequence[str]) -> float:
    """Mean P_GPM(a ≻ b | x) = σ(s(a, b) / β)."""
    return win_rates(gpm, tokenizer, prompts, a, b)[0]


def axis_win_rates(gpm: GeneralPreferenceModel, tokenizer, prompts: Sequence[str], a: Sequence[str],
                   b: Sequence[str]) -> list[float]:
    """Per axis l, mean σ(λ_l(x) (a_l(a) b_l(b) − b_l(a) a_l(b)) / β). Returns k floats."""
    return win_rates(gpm, tokenizer, prompts, a, b)[1]

