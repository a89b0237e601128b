"""Per-axis group-relative advantages (method.md §2, steps 2-4).

Notation: a batch of B prompts, each with a group of G responses; the GPM embeds each
response into k 2-D slices (a_l, b_l) and gives each prompt eigenvalues λ_l(x).
Embeddings are laid out as v = [a_1, b_1, a_2, b_2, ...] (2k values).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

Normalization = Literal["per_axis", "global", "scalar"]


def axis_slices(v: Tensor) -> tuple[Tensor, Tensor]:
    """Split embeddings (..., 2k) into the k slices a (..., k) and b (..., k)."""
    return v[..., 0::2], v[..., 1::2]


def pairwise_axis_scores(v: Tensor, eigenvalues: Tensor) -> Tensor:
    """S_l[i, j] = λ_l (a_il b_jl − b_il a_jl), the O(G²) form.

    v: (B, G, 2k) unit embeddings; eigenvalues: (B, k). Returns (B, k, G, G).
    """
    a, b = axis_slices(v)  # (B, G, k)
    cross = a.unsqueeze(2) * b.unsqueeze(1) - b.unsqueeze(2) * a.unsqueeze(1)  # (B, G_i, G_j, k)
    return cross.permute(0, 3, 1, 2) * eigenvalues[:, :, None, None]


def pairwise_scores(v: Tensor, eigenvalues: Tensor) -> Tensor:
    """s(y_i ≻ y_j | x) = Σ_l S_l[i, j]. Returns (B, G, G), skew-symmetric."""
    return pairwise_axis_scores(v, eigenvalues).sum(dim=1)


def preference_probabilities(v: Tensor, eigenvalues: Tensor, beta: float = 0.1) -> Tensor:
    """P(y_i ≻ y_j | x) = σ(s(i, j) / β). Returns (B, G, G)."""
    return torch.sigmoid(pairwise_scores(v, eigenvalues) / beta)


def group_axis_scores(v: Tensor, eigenvalues: Tensor) -> Tensor:
    """ŝ_l(i) = 1/(G−1) Σ_{j≠i} S_l[i, j] in O(G) per axis.

    Since S_l[i, i] = 0, the sum over j ≠ i is λ_l (a_i Σ_j b_j − b_i Σ_j a_j).
    v: (B, G, 2k); eigenvalues: (B, k). Returns (B, G, k); its group mean is 0 for every axis.
    """
    a, b = axis_slices(v)
    group = v.shape[1]
    sum_a, sum_b = a.sum(dim=1, keepdim=True), b.sum(dim=1, keepdim=True)
    return eigenvalues[:, None, :] * (a * sum_b - b * sum_a) / (group - 1)


def normalize_per_axis(scores: Tensor, std_eps: float = 1e-6, min_std: float = 1e-8, spread_floor: float = 0.0) -> Tensor:
    """Â_l(i) = (ŝ_l(i) − mean_i) / (max(std_l, ρ · max_m std_m) + ε) for each group and axis separately.

    scores: (B, G, k); spread_floor: ρ in [0, 1]. With ρ = 0 each axis is on its own scale (method.md §2 step 3).
    With ρ > 0 an axis whose spread in a group is below ρ times the group's largest axis spread is divided by that
    floor instead of its own std, so it is lifted at most 1/ρ times as much as the largest axis: an axis of noise
    (spread ≪ ρ · max) keeps ~0 weight, axes within a factor 1/ρ of each other are normalised as before. ρ = 1
    puts every axis on the largest one's scale. The floor is relative, per group, so it is scale-free and needs no
    state; k = 1 is unchanged. An axis whose spread in a group is below `min_std` (or not finite) gives 0 there
    (no division of round-off noise into ±1) and does not set the floor of the others. Returns (B, G, k).
    """
    centred = scores - scores.mean(dim=1, keepdim=True)
    std = scores.std(dim=1, keepdim=True, unbiased=False)  # (B, 1, k)
    largest = torch.where(std.isfinite(), std, torch.zeros_like(std)).amax(dim=-1, keepdim=True)  # (B, 1, 1)
    out = centred / (torch.maximum(std, spread_floor * largest) + std_eps)
    return torch.where(std > min_std, out, torch.zeros_like(out))


def normalize_global(scores: Tensor, std_eps: float = 1e-6, min_std: float = 1e-8) -> Tensor:
    """Ablation: one scale per group shared by all axes, so axes with larger raw spread dominate.

    scores: (B, G, k). Returns (B, G, k).
    """
    centred = scores - scores.mean(dim=1, keepdim=True)
    std = centred.pow(2).mean(dim=(1, 2), keepdim=True).sqrt()
    out = centred / (std + std_eps)
    return torch.where(std > min_std, out, torch.zeros_like(out))


def aggregate(axis_advantages: Tensor, eigenvalues: Tensor, control: Tensor) -> Tensor:
    """A(i) = Σ_l m_l λ_l(x) Â_l(i).

    axis_advantages: (B, G, k); eigenvalues: (B, k); control weights m: (k,). Returns (B, G).
    """
    return (axis_advantages * (eigenvalues * control)[:, None, :]).sum(dim=-1)


def advantages(
    v: Tensor,
    eigenvalues: Tensor,
    control: Tensor | None = None,
    normalization: Normalization = "per_axis",
    std_eps: float = 1e-6,
    spread_floor: float = 0.0,
) -> tuple[Tensor, Tensor]:
    """Group-relative advantages of every response.

    v: (B, G, 2k) GPM embeddings; eigenvalues: (B, k); control: (k,) axis weights m (ones if None).
    Returns (A (B, G), raw per-axis scores ŝ (B, G, k)); the raw scores feed the drift monitor.

    - per_axis: normalise each axis on its own scale, then aggregate with m λ (GPRL); `spread_floor` ρ keeps an
                axis whose group spread is under ρ times the largest axis's from being lifted (`normalize_per_axis`).
    - global:   normalise all axes with one shared scale; λ is already inside ŝ, so aggregate with m only.
    - scalar:   r(i) = Σ_l m_l ŝ_l(i) first, then one group normalisation (GRPO with a preference model).
    """
    k = eigenvalues.shape[-1]
    if control is None:
        control = torch.ones(k, dtype=v.dtype, device=v.device)
    scores = group_axis_scores(v, eigenvalues)
    if normalization == "per_axis":
        adv = aggregate(normalize_per_axis(scores, std_eps, spread_floor=spread_floor), eigenvalues, control)
    elif normalization == "global":
        adv = (normalize_global(scores, std_eps) * control).sum(dim=-1)
    elif normalization == "scalar":
        adv = normalize_per_axis((scores * control).sum(dim=-1, keepdim=True), std_eps).squeeze(-1)
    else:
        raise ValueError(f"unknown normalization {normalization!r}: use per_axis, global or scalar")
    return adv, scores


def axis_variance(scores: Tensor) -> Tensor:
    """E_batch[var_i ŝ_l(i)], the drift monitor's input. scores: (B, G, k). Returns (k,)."""
    return scores.var(dim=1, unbiased=False).mean(dim=0)
