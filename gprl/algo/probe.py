"""The drift probe's statistic (method.md §3, second signal): per-axis win rates of current policy samples over
samples of the policy N steps ago, on the same probe prompts.

Notation as in `per_axis.py`: P probe prompts, n current and m reference samples per prompt, k axes, embeddings
v = [a_1, b_1, …] (2k values), eigenvalues λ_l(x) ≥ 0.
"""

from __future__ import annotations

from torch import Tensor

from gprl.algo.per_axis import axis_slices


def axis_pair_scores(v: Tensor, v_ref: Tensor, eigenvalues: Tensor) -> Tensor:
    """s_l(y_i ≻ y'_j | x) = λ_l (a_il b'_jl − b_il a'_jl) for every current sample i and reference sample j of the
    same prompt. v: (P, n, 2k); v_ref: (P, m, 2k); eigenvalues: (P, k). Returns (P, n, m, k)."""
    a, b = axis_slices(v)  # (P, n, k)
    ar, br = axis_slices(v_ref)  # (P, m, k)
    cross = a[:, :, None] * br[:, None] - b[:, :, None] * ar[:, None]
    return eigenvalues[:, None, None, :] * cross


def axis_win_rates(v: Tensor, v_ref: Tensor, eigenvalues: Tensor) -> Tensor:
    """w_l = P(s_l(y ≻ y') > 0): how often axis l alone prefers a current sample to a reference sample of the same
    prompt (a tie counts ½), over all P·n·m pairs. Counting signs, not σ(s_l/β), puts every axis on its own
    scale — as the per-axis normalisation does — so a near-empty axis that moves is seen, and a dominant axis does
    not lead by magnitude alone. v: (P, n, 2k); v_ref: (P, m, 2k); eigenvalues: (P, k). Returns (k,)."""
    s = axis_pair_scores(v, v_ref, eigenvalues)
    return ((s > 0).float() + 0.5 * (s == 0).float()).mean(dim=(0, 1, 2))


def probe_width(pool: int, every: int, lag: int, batch: int) -> int:
    """p, the probe prompts that replace fresh ones on a probe step, so that each of the `pool` probe prompts comes
    back about every `lag` steps when a probe step comes every `every` steps: round(pool · every / lag), at least 1,
    at most the pool and the batch."""
    return max(1, min(pool, batch, round(pool * every / lag)))


def pooled_win_rates(wins: Tensor, pairs: Tensor) -> Tensor:
    """Per-axis win rate over several probe steps: Σ_s w_s · n_s / Σ_s n_s. wins: (S, k) win rates; pairs: (S,) pair
    counts. Returns (k,)."""
    return (wins * pairs[:, None]).sum(dim=0) / pairs.sum()
