"""Clipped policy surrogate with a KL penalty to the reference (method.md §2, step 5)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

KLEstimator = Literal["k1", "k2", "k3"]
LossAggregation = Literal["token_mean", "sequence_mean"]


def kl_penalty(logp: Tensor, ref_logp: Tensor, estimator: KLEstimator = "k3") -> Tensor:
    """Per-token estimate of KL(π_θ ‖ π_ref) from samples of π_θ (Schulman's k1/k2/k3).

    logp, ref_logp: (N, T) log-probabilities of the sampled tokens. Returns (N, T).
    """
    log_ratio = ref_logp - logp  # log π_ref/π_θ
    if estimator == "k1":
        return -log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio.pow(2)
    if estimator == "k3":
        return torch.expm1(log_ratio) - log_ratio
    raise ValueError(f"unknown KL estimator {estimator!r}: use k1, k2 or k3")


def masked_aggregate(values: Tensor, mask: Tensor, how: LossAggregation) -> Tensor:
    """Mean of values (N, T) over valid tokens: over all tokens, or per sequence then over sequences."""
    mask = mask.to(values.dtype)
    if how == "token_mean":
        return (values * mask).sum() / mask.sum().clamp_min(1.0)
    if how == "sequence_mean":
        per_seq = (values * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1.0)
        return per_seq.mean()
    raise ValueError(f"unknown loss aggregation {how!r}: use token_mean or sequence_mean")


@dataclass
class LossStats:
    loss: Tensor
    policy_loss: float
    kl: float
    clip_fraction: float
    ratio_mean: float


def policy_loss(
    logp: Tensor,
    old_logp: Tensor,
    ref_logp: Tensor | None,
    advantages: Tensor,
    mask: Tensor,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    kl_coef: float = 0.04,
    kl_estimator: KLEstimator = "k3",
    aggregation: LossAggregation = "token_mean",
) -> LossStats:
    """−min(r A, clip(r, 1−ε_low, 1+ε_high) A) + β_KL · KL, aggregated over valid tokens.

    logp, old_logp, ref_logp: (N, T) per-token log-probs of the sampled responses under the
    current, sampling and reference policies; advantages: (N,), broadcast to every token;
    mask: (N, T) 1 on response tokens. Returns the loss and detached statistics.
    """
    ratio = torch.exp(logp - old_logp)
    adv = advantages[:, None]
    unclipped = ratio * adv
    clipped = ratio.clamp(1.0 - eps_low, 1.0 + eps_high) * adv
    per_token = -torch.minimum(unclipped, clipped)
    kl = kl_penalty(logp, ref_logp, kl_estimator) if ref_logp is not None else torch.zeros_like(logp)
    if kl_coef > 0 and ref_logp is not None:
        per_token = per_token + kl_coef * kl
    loss = masked_aggregate(per_token, mask, aggregation)
    with torch.no_grad():
        m = mask.to(logp.dtype)
        n = m.sum().clamp_min(1.0)
        clip_frac = ((clipped < unclipped).to(logp.dtype) * m).sum() / n  # the clipped branch is the one taken
        return LossStats(
            loss=loss,
            policy_loss=float(masked_aggregate(-torch.minimum(unclipped, clipped), mask, aggregation)),
            kl=float((kl * m).sum() / n),
            clip_fraction=float(clip_frac),
            ratio_mean=float((ratio * m).sum() / n),
        )
