import math

import pytest
import torch

from gprl.algo import kl_penalty, masked_aggregate, policy_loss


def test_kl_estimators_are_zero_at_equal_policies_and_k3_nonnegative():
    logp = torch.log(torch.rand(4, 5))
    for est in ("k1", "k2", "k3"):
        assert torch.allclose(kl_penalty(logp, logp, est), torch.zeros_like(logp))
    other = torch.log(torch.rand(4, 5))
    assert (kl_penalty(logp, other, "k3") >= 0).all()
    assert (kl_penalty(logp, other, "k2") >= 0).all()


def test_k3_is_unbiased_for_kl():
    p = torch.tensor([0.7, 0.2, 0.1])
    q = torch.tensor([0.4, 0.4, 0.2])
    samples = torch.multinomial(p, 200_000, replacement=True, generator=torch.Generator().manual_seed(0))
    est = kl_penalty(p.log()[samples][None], q.log()[samples][None], "k3").mean()
    exact = float((p * (p / q).log()).sum())
    assert est.item() == pytest.approx(exact, abs=5e-3)


def test_clipping_bounds_the_ratio_per_sign_of_advantage():
    old = torch.zeros(2, 3)
    logp = torch.full((2, 3), math.log(1.5), requires_grad=True)  # ratio 1.5
    mask = torch.ones(2, 3)
    adv = torch.tensor([1.0, -1.0])
    stats = policy_loss(logp, old, None, adv, mask, eps_low=0.2, eps_high=0.3, kl_coef=0.0)
    # A > 0: min(1.5, 1.3) = 1.3 -> -1.3 ; A < 0: min(-1.5, -1.3) = -1.5 -> +1.5
    assert stats.loss.item() == pytest.approx((-1.3 + 1.5) / 2)
    stats.loss.backward()
    assert torch.all(logp.grad[0] == 0)  # clipped side has no gradient
    assert torch.all(logp.grad[1] != 0)
    assert stats.clip_fraction == pytest.approx(0.5)


def test_aggregations_weight_tokens_or_sequences():
    values = torch.tensor([[1.0, 1.0, 1.0, 1.0], [3.0, 0.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 0, 0, 0]])
    assert masked_aggregate(values, mask, "token_mean").item() == pytest.approx(7 / 5)
    assert masked_aggregate(values, mask, "sequence_mean").item() == pytest.approx(2.0)
    with pytest.raises(ValueError, match="token_mean or sequence_mean"):
        masked_aggregate(values, mask, "sum")


def test_kl_term_adds_to_loss():
    logp = torch.log(torch.rand(3, 4))
    ref = torch.log(torch.rand(3, 4))
    mask = torch.ones(3, 4)
    adv = torch.zeros(3)
    s = policy_loss(logp, logp, ref, adv, mask, kl_coef=0.5)
    assert s.loss.item() == pytest.approx(0.5 * s.kl, rel=1e-5)
    assert s.kl > 0
