"""The drift probe: per-axis win rates against the policy N steps ago, on prompts the evaluation never uses."""

import pytest
import torch

from gprl.algo import axis_pair_scores, axis_win_rates, pairwise_axis_scores, pooled_win_rates, probe_width


@pytest.fixture(scope="module")
def assets(tiny_assets):
    return tiny_assets


def unit(x):
    return x / x.norm(dim=-1, keepdim=True)


def test_axis_win_rates_count_signs_per_axis_on_each_axis_own_scale():
    torch.manual_seed(0)
    P, n, m, k = 3, 4, 5, 3
    v, v_ref, lam = unit(torch.randn(P, n, 2 * k)), unit(torch.randn(P, m, 2 * k)), torch.rand(P, k) * 3
    s = axis_pair_scores(v, v_ref, lam)  # (P, n, m, k)
    # the same bilinear form as the training step's S_l, between the two sets
    both = torch.cat([v, v_ref], dim=1)
    S = pairwise_axis_scores(both, lam)  # (P, k, n+m, n+m)
    assert torch.allclose(s, S[:, :, :n, n:].permute(0, 2, 3, 1), atol=1e-6)
    w = axis_win_rates(v, v_ref, lam)
    assert torch.allclose(w, (s > 0).float().mean(dim=(0, 1, 2)))
    # scale-free: shrinking one axis's eigenvalue 1000-fold changes nothing
    assert torch.equal(axis_win_rates(v, v_ref, lam * torch.tensor([1e-3, 1.0, 1.0])), w)
    # a set against itself: every axis exactly ½ (skew-symmetry, ties on the diagonal)
    assert torch.allclose(axis_win_rates(v, v, lam), torch.full((k,), 0.5))


def test_pooling_and_width():
    wins, pairs = torch.tensor([[0.6, 0.5], [0.4, 0.5]]), torch.tensor([300.0, 100.0])
    assert torch.allclose(pooled_win_rates(wins, pairs), torch.tensor([0.55, 0.5]))
    assert probe_width(pool=8, every=5, lag=20, batch=4) == 2  # 4 slots of 2: each back every 20 steps
    assert probe_width(pool=8, every=5, lag=20, batch=1) == 1  # never more than the batch
    assert probe_width(pool=2, every=1, lag=20, batch=4) == 1


def probe_spec(assets, out, **over):
    from test_trainer import spec_for

    return spec_for(assets, out, **{"algo.steps": 5, "drift.probe_every": 1, "drift.reference_lag": 2,
                                    "drift.probe_prompts": 2, "drift.lead_tau": 0.06, **over})


def test_probe_rides_on_the_step_and_compares_each_slot_with_its_last_visit(assets, tmp_path):
    from gprl.trainer import Trainer

    trainer = Trainer(probe_spec(assets, tmp_path / "run"), log=lambda *_: None)
    pool = trainer._probe_pool()
    assert len(pool) == 2 and set(pool).isdisjoint(trainer._eval_prompts())
    # p = round(2 · 1 / 2) = 1 probe prompt per probe step, two slots in turn: each back every 2 steps
    assert [trainer.probe_prompts_for(s) for s in (1, 2, 3)] == [(0, pool[:1]), (1, pool[1:]), (0, pool[:1])]
    records = trainer.train()
    # steps 1 and 2 see each slot for the first time; from step 3 on each slot is compared with its last visit
    assert [r["axis_win_rate"] is None for r in records] == [True, True, False, False, False]
    assert all(len(r["axis_win_rate"]) == 3 and all(0 <= w <= 1 for w in r["axis_win_rate"]) for r in records[2:])
    assert sorted(trainer._probe_wins) == [0, 1] and all(n == 1 * 4 * 4 for _, n in trainer._probe_wins.values())
    # the same embeddings on a revisit: exactly ½ on every axis
    v, lam = trainer._probe_seen[0], torch.ones(1, 3)
    trainer._probe_wins.clear()
    assert trainer.probe(0, v, lam) == [0.5, 0.5, 0.5]


def test_probe_state_resumes(assets, tmp_path):
    from gprl.trainer import Trainer

    quiet = lambda *_: None  # noqa: E731
    full = Trainer(probe_spec(assets, tmp_path / "full", **{"algo.steps": 4}), log=quiet).train()
    Trainer(probe_spec(assets, tmp_path / "cut", **{"algo.steps": 2}), log=quiet).train()
    resumed = Trainer(probe_spec(assets, tmp_path / "cut", **{"algo.steps": 4}), log=quiet).train()
    for a, b in zip(full[2:], resumed):
        assert a["axis_win_rate"] == pytest.approx(b["axis_win_rate"]) and a["win_rate_lead"] == b["win_rate_lead"]


def test_no_probe_with_the_lead_off(assets, tmp_path):
    from gprl.trainer import Trainer

    trainer = Trainer(probe_spec(assets, tmp_path / "run", **{"algo.steps": 1, "drift.lead_tau": 0.0}), log=lambda *_: None)
    assert trainer.probe_prompts_for(1) == (None, [])
    records = trainer.train()
    assert records[0]["axis_win_rate"] is None and "probe" not in records[0]["timings"]
