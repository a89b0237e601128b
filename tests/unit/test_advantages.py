import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gprl.algo import (
    advantages,
    aggregate,
    group_axis_scores,
    normalize_per_axis,
    pairwise_axis_scores,
    pairwise_scores,
    preference_probabilities,
)


def random_gpm_outputs(seed: int, batch: int, group: int, k: int):
    g = torch.Generator().manual_seed(seed)
    v = torch.nn.functional.normalize(torch.randn(batch, group, 2 * k, generator=g, dtype=torch.float64), dim=-1)
    lam = k * torch.softmax(torch.randn(batch, k, generator=g, dtype=torch.float64), dim=-1)
    return v, lam


shapes = dict(
    seed=st.integers(0, 10_000), batch=st.integers(1, 4), group=st.integers(2, 12), k=st.integers(1, 6)
)


@settings(max_examples=60, deadline=None)
@given(**shapes)
def test_scores_are_skew_symmetric_and_probabilities_complementary(seed, batch, group, k):
    v, lam = random_gpm_outputs(seed, batch, group, k)
    s = pairwise_scores(v, lam)
    assert torch.allclose(s, -s.transpose(1, 2), atol=1e-12)
    assert torch.allclose(torch.diagonal(s, dim1=1, dim2=2), torch.zeros(batch, group, dtype=s.dtype))
    p = preference_probabilities(v, lam, beta=0.1)
    assert torch.allclose(p + p.transpose(1, 2), torch.ones_like(p), atol=1e-12)


@settings(max_examples=60, deadline=None)
@given(**shapes)
def test_linear_group_scores_equal_quadratic_matrix_form(seed, batch, group, k):
    v, lam = random_gpm_outputs(seed, batch, group, k)
    matrix = pairwise_axis_scores(v, lam)  # (B, k, G, G)
    quadratic = matrix.sum(dim=-1).transpose(1, 2) / (group - 1)  # Σ_{j≠i}, diagonal is 0
    linear = group_axis_scores(v, lam)
    assert torch.allclose(linear, quadratic, atol=1e-12)
    assert torch.allclose(linear.mean(dim=1), torch.zeros(batch, k, dtype=linear.dtype), atol=1e-12)


@settings(max_examples=60, deadline=None)
@given(**shapes)
def test_per_axis_advantages_are_standardised_per_group(seed, batch, group, k):
    v, lam = random_gpm_outputs(seed, batch, group, k)
    adv = normalize_per_axis(group_axis_scores(v, lam), std_eps=0.0, min_std=1e-9)
    spread = group_axis_scores(v, lam).std(dim=1, unbiased=False)
    ok = spread > 1e-9
    assert torch.allclose(adv.mean(dim=1), torch.zeros_like(spread), atol=1e-9)
    assert torch.allclose(adv.std(dim=1, unbiased=False)[ok], torch.ones_like(spread)[ok], atol=1e-6)


def test_flat_axis_contributes_zero_without_nan():
    v, lam = random_gpm_outputs(0, 2, 6, 3)
    v[..., 2:4] = torch.tensor([0.6, 0.8], dtype=v.dtype)  # axis 1 identical for every response
    v = torch.nn.functional.normalize(v, dim=-1)
    adv, scores = advantages(v, lam)
    axis_adv = normalize_per_axis(scores)
    assert torch.isfinite(adv).all()
    assert torch.equal(axis_adv[..., 1], torch.zeros_like(axis_adv[..., 1]))


@settings(max_examples=40, deadline=None)
@given(**shapes)
def test_equal_eigenvalues_and_unit_control_sum_the_axes(seed, batch, group, k):
    v, _ = random_gpm_outputs(seed, batch, group, k)
    lam = torch.ones(batch, k, dtype=v.dtype)
    adv, scores = advantages(v, lam, torch.ones(k, dtype=v.dtype))
    assert torch.allclose(adv, normalize_per_axis(scores).sum(dim=-1), atol=1e-12)


def test_control_weight_scales_its_axis():
    v, lam = random_gpm_outputs(3, 2, 8, 3)
    norm = normalize_per_axis(group_axis_scores(v, lam))
    m = torch.tensor([2.0, 0.5, 0.5], dtype=v.dtype)
    expected = 2.0 * lam[:, None, 0] * norm[..., 0] + 0.5 * lam[:, None, 1] * norm[..., 1] + 0.5 * lam[:, None, 2] * norm[..., 2]
    assert torch.allclose(aggregate(norm, lam, m), expected)


def test_normalisation_modes_differ_and_bt_matches_grpo():
    v, lam = random_gpm_outputs(5, 3, 8, 3)
    v[..., 0:2] *= 5  # axis 0 has a much larger raw spread (before re-normalisation)
    per_axis, _ = advantages(v, lam, normalization="per_axis")
    glob, _ = advantages(v, lam, normalization="global")
    scalar, _ = advantages(v, lam, normalization="scalar")
    assert not torch.allclose(per_axis, glob) and not torch.allclose(per_axis, scalar)
    # Bradley-Terry (k = 1, v = [r, 1]): per-axis advantages are exactly GRPO's (r - mean) / std.
    r = torch.randn(4, 8, dtype=torch.float64)
    v_bt = torch.stack([r, torch.ones_like(r)], dim=-1)
    adv, _ = advantages(v_bt, torch.ones(4, 1, dtype=r.dtype), std_eps=0.0)
    grpo = (r - r.mean(1, keepdim=True)) / r.std(1, keepdim=True, unbiased=False)
    assert torch.allclose(adv, grpo, atol=1e-9)


# the axis-spread floor ρ (algo.axis_spread_floor): an axis whose group spread is under ρ × the largest is not lifted


def test_a_noise_axis_under_the_floor_gets_about_zero_weight():
    g = torch.Generator().manual_seed(7)
    scores = torch.randn(4, 8, 3, generator=g, dtype=torch.float64)
    scores[..., 2] *= 1e-3  # axis 2: noise at a thousandth of the others' scale
    lam = torch.ones(4, 3, dtype=scores.dtype)
    lifted = normalize_per_axis(scores)  # ρ = 0: the noise is lifted to unit spread like the others
    floored = normalize_per_axis(scores, spread_floor=0.25)
    assert torch.allclose(lifted[..., 2].std(dim=1, unbiased=False), torch.ones(4, dtype=scores.dtype), atol=1e-2)
    assert floored[..., 2].abs().max() < 0.02
    assert torch.equal(floored[..., :2], lifted[..., :2])  # the meaningful axes are normalised as before
    ones = torch.ones(3, dtype=scores.dtype)
    assert torch.allclose(aggregate(floored, lam, ones), lifted[..., :2].sum(dim=-1), atol=0.05)


@settings(max_examples=40, deadline=None)
@given(**shapes, rho=st.floats(0.0, 1.0))
def test_axes_within_the_floor_and_one_axis_are_unchanged(seed, batch, group, k, rho):
    v, lam = random_gpm_outputs(seed, batch, group, k)
    scores = group_axis_scores(v, lam)
    std = scores.std(dim=1, unbiased=False)
    same = scores / std[:, None, :]  # every axis with unit spread
    assert torch.allclose(normalize_per_axis(same, spread_floor=rho), normalize_per_axis(same), atol=1e-12)
    one = scores[..., :1]  # k = 1: the axis is its own largest
    assert torch.equal(normalize_per_axis(one, spread_floor=rho), normalize_per_axis(one))
    assert torch.equal(normalize_per_axis(scores, spread_floor=0.0), normalize_per_axis(scores))
    within = float((std.amin(dim=-1) / std.amax(dim=-1)).min())  # the smallest axis's relative spread
    assert torch.allclose(normalize_per_axis(scores, spread_floor=0.99 * within), normalize_per_axis(scores), atol=1e-12)


def test_a_full_floor_puts_every_axis_on_the_largest_scale():
    v, lam = random_gpm_outputs(11, 3, 8, 3)
    scores = group_axis_scores(v, lam)
    std = scores.std(dim=1, unbiased=False)
    out = normalize_per_axis(scores, std_eps=0.0, spread_floor=1.0)
    assert torch.allclose(out.std(dim=1, unbiased=False), std / std.amax(dim=-1, keepdim=True), atol=1e-12)


def test_a_non_finite_axis_gives_zero_and_does_not_set_the_others_floor():
    v, lam = random_gpm_outputs(2, 2, 6, 3)
    scores = group_axis_scores(v, lam)
    for bad in (float("nan"), float("inf")):
        broken = scores.clone()
        broken[0, 1, 0] = bad  # group 0, axis 0
        out = normalize_per_axis(broken, spread_floor=0.5)
        assert torch.isfinite(out).all()
        assert torch.equal(out[0, :, 0], torch.zeros_like(out[0, :, 0]))  # as without the floor
        clean = normalize_per_axis(scores[:, :, 1:], spread_floor=0.5)  # axes 1, 2 with axis 0 left out
        assert torch.allclose(out[0, :, 1:], clean[0], atol=1e-12)
        assert torch.equal(out[1], normalize_per_axis(scores, spread_floor=0.5)[1])  # other groups untouched


def test_the_floor_reaches_the_advantages_per_axis_only():
    v, lam = random_gpm_outputs(4, 2, 8, 3)
    v[..., 4:6] *= 1e-3  # axis 2 nearly flat
    plain, _ = advantages(v, lam)
    floored, scores = advantages(v, lam, spread_floor=0.25)
    assert torch.allclose(floored, aggregate(normalize_per_axis(scores, spread_floor=0.25), lam, torch.ones(3, dtype=v.dtype)))
    assert not torch.allclose(plain, floored)
