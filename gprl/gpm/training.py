"""GPM training: soft-label cross-entropy over preference pairs (method.md §1).

L = −[p log σ(s/β − margin) + (1 − p) log σ(−s/β − margin)], s = s(chosen ≻ rejected | x).

Two optional terms (ours, both off by default) for a GPM whose axes should mean distinct things — the pair loss
alone leaves the axes unidentified (any split of the preference over the k slices fits it equally well):
- per-aspect labels (`axis_label_weight`): where a pair carries `axis_probs`, axis l's own score s_l is fitted to
  aspect l's probability with the same cross-entropy; since s = Σ_l s_l, aspect logits that add up to the overall
  one are consistent with the main loss;
- decorrelation (`decorrelation`): the mean squared correlation, over a batch's pairs, between different axes'
  scores s_l, so that no two axes carry the same signal.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import Tensor
from torch.nn import functional as F

from gprl.gpm.data import PreferencePair
from gprl.gpm.model import GeneralPreferenceModel, GPMOutput, encode_pairs


def pair_axis_scores(chosen: GPMOutput, rejected: GPMOutput) -> Tensor:
    """s_l(chosen ≻ rejected) = λ_l (a_c b_r − b_c a_r) per axis, λ from the chosen side's prompt. Returns (N, k)."""
    a_c, b_c = chosen.embeddings[:, 0::2], chosen.embeddings[:, 1::2]
    a_r, b_r = rejected.embeddings[:, 0::2], rejected.embeddings[:, 1::2]
    return chosen.eigenvalues * (a_c * b_r - b_c * a_r)


def pair_scores(chosen: GPMOutput, rejected: GPMOutput) -> Tensor:
    """s(chosen ≻ rejected) = Σ_l λ_l (a_c b_r − b_c a_r), λ from the (shared) prompt. Returns (N,)."""
    return pair_axis_scores(chosen, rejected).sum(-1)


def preference_loss(scores: Tensor, prob: Tensor, beta: float, margin: float = 0.0) -> Tensor:
    logits = scores / beta
    return -(prob * F.logsigmoid(logits - margin) + (1 - prob) * F.logsigmoid(-logits - margin)).mean()


@dataclass
class GPMTrainResult:
    train_loss: list[float] = field(default_factory=list)
    eval_accuracy: list[float] = field(default_factory=list)

    @property
    def final_accuracy(self) -> float:
        return self.eval_accuracy[-1] if self.eval_accuracy else float("nan")


def axis_correlation_penalty(axis_scores: Tensor, eps: float = 1e-8) -> Tensor:
    """Mean squared off-diagonal correlation between the columns of (N, k) per-axis pair scores; 0 for k = 1."""
    n, k = axis_scores.shape
    if k < 2 or n < 3:
        return axis_scores.new_zeros(())
    z = axis_scores - axis_scores.mean(0, keepdim=True)
    z = z / (z.pow(2).mean(0, keepdim=True).sqrt() + eps)
    c = z.T @ z / n
    off = c - torch.diag(torch.diag(c))
    return off.pow(2).sum() / (k * (k - 1))


def _axis_label_loss(axis_scores: Tensor, batch: Sequence[PreferencePair], beta: float) -> Tensor:
    """Cross-entropy of each axis's score against its aspect label, over the pairs that carry `axis_probs`."""
    rows = [i for i, p in enumerate(batch) if p.axis_probs is not None]
    if not rows:
        return axis_scores.new_zeros(())
    k = axis_scores.shape[1]
    for i in rows:
        if len(batch[i].axis_probs) != k:
            raise ValueError(f"a pair's `axis_probs` has {len(batch[i].axis_probs)} entries, the GPM has {k} axes")
    target = torch.tensor([batch[i].axis_probs for i in rows], dtype=axis_scores.dtype, device=axis_scores.device)
    logits = axis_scores[rows] / beta
    return -(target * F.logsigmoid(logits) + (1 - target) * F.logsigmoid(-logits)).mean()


def _forward_pairs(model, tokenizer, batch: Sequence[PreferencePair], max_length: int, device) -> Tensor:
    return _forward_pair_axes(model, tokenizer, batch, max_length, device).sum(-1)


def _forward_pair_axes(model, tokenizer, batch: Sequence[PreferencePair], max_length: int, device) -> Tensor:
    enc = encode_pairs(
        tokenizer,
        [p.prompt for p in batch] * 2,
        [p.chosen for p in batch] + [p.rejected for p in batch],
        max_length,
    )
    out = model(**{k: v.to(device) for k, v in enc.items()})
    n = len(batch)
    chosen = GPMOutput(out.embeddings[:n], out.eigenvalues[:n])
    rejected = GPMOutput(out.embeddings[n:], out.eigenvalues[:n])
    return pair_axis_scores(chosen, rejected)


@torch.no_grad()
def evaluate(model, tokenizer, pairs: Sequence[PreferencePair], batch_size: int = 64, max_length: int = 1024) -> float:
    """Pair accuracy: sign of s(chosen ≻ rejected) agrees with the label (ties p = 0.5 are skipped)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    right = total = 0
    for i in range(0, len(pairs), batch_size):
        batch = pairs[i : i + batch_size]
        s = _forward_pairs(model, tokenizer, batch, max_length, device)
        for score, p in zip(s.tolist(), batch):
            if p.prob == 0.5:
                continue
            total += 1
            right += (score > 0) == (p.prob > 0.5)
    model.train(was_training)
    return right / max(total, 1)


def train_gpm(
    model: GeneralPreferenceModel,
    tokenizer,
    train_pairs: Sequence[PreferencePair],
    eval_pairs: Sequence[PreferencePair] = (),
    *,
    epochs: int = 2,
    batch_size: int = 32,
    learning_rate: float = 3e-4,
    weight_decay: float = 0.0,
    warmup_ratio: float = 0.03,
    margin: float = 0.0,
    axis_label_weight: float = 0.0,
    decorrelation: float = 0.0,
    max_length: int = 1024,
    seed: int = 0,
    log=None,
) -> GPMTrainResult:
    """AdamW with linear warm-up and cosine decay; eval accuracy after every epoch.

    `axis_label_weight` > 0 adds the per-aspect term on pairs with `axis_probs`; `decorrelation` > 0 adds the
    cross-axis correlation penalty (module docstring). Both 0: the GPM paper's loss alone.
    """
    if not train_pairs:
        raise ValueError("train_gpm needs at least one preference pair")
    if axis_label_weight < 0 or decorrelation < 0:
        raise ValueError(f"axis_label_weight and decorrelation must be >= 0, got {axis_label_weight} and {decorrelation}")
    torch.manual_seed(seed)
    order_rng = random.Random(seed)
    device = next(model.parameters()).device
    opt = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=weight_decay)
    steps = epochs * math.ceil(len(train_pairs) / batch_size)
    warmup = max(1, int(warmup_ratio * steps))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda t: (t + 1) / warmup if t < warmup else 0.5 * (1 + math.cos(math.pi * (t - warmup) / max(1, steps - warmup))),
    )
    result = GPMTrainResult()
    model.train()
    for epoch in range(epochs):
        order = list(range(len(train_pairs)))
        order_rng.shuffle(order)
        total = 0.0
        for i in range(0, len(order), batch_size):
            batch = [train_pairs[j] for j in order[i : i + batch_size]]
            s_axes = _forward_pair_axes(model, tokenizer, batch, max_length, device)
            s = s_axes.sum(-1)
            prob = torch.tensor([p.prob for p in batch], dtype=s.dtype, device=device)
            loss = preference_loss(s, prob, model.config.beta, margin)
            if axis_label_weight:
                loss = loss + axis_label_weight * _axis_label_loss(s_axes, batch, model.config.beta)
            if decorrelation:
                loss = loss + decorrelation * axis_correlation_penalty(s_axes)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            total += loss.item() * len(batch)
        result.train_loss.append(total / len(train_pairs))
        if eval_pairs:
            result.eval_accuracy.append(evaluate(model, tokenizer, eval_pairs, max_length=max_length))
        if log:
            acc = f", eval accuracy {result.eval_accuracy[-1]:.3f}" if eval_pairs else ""
            log(f"GPM epoch {epoch + 1}/{epochs}: loss {result.train_loss[-1]:.4f}{acc}")
    model.eval()
    return result
