"""The learner's forward passes: cutting padding and prompt logits changes no number."""

import pytest
import torch

from gprl.learner import sequence_logprobs
from gprl.rollout.base import RolloutBatch


def _batch(vocab: int, pad: int) -> RolloutBatch:
    """Three prompts × G = 2 (as HFRollout lays them out): left-padded prompts of 1-4 tokens, each the same in both
    rows of its group, responses of 1-5 tokens then padding."""
    g = torch.Generator().manual_seed(0)
    P, T = 4, 5
    prompt_lens, response_lens = [4, 4, 1, 1, 3, 3], [5, 1, 3, 2, 2, 4]
    ids = torch.randint(3, vocab, (6, P + T), generator=g)
    ids[1::2, :P] = ids[0::2, :P]
    mask = torch.ones(6, P + T, dtype=torch.long)
    for r, (p, n) in enumerate(zip(prompt_lens, response_lens)):
        ids[r, : P - p], mask[r, : P - p] = pad, 0
        ids[r, P + n :], mask[r, P + n :] = pad, 0
    return RolloutBatch(prompts=[""] * 6, responses=[""] * 6, sequences=ids, attention_mask=mask,
                        response_mask=mask[:, P:].clone(), prompt_width=P, group_size=2, policy_version=0)


def test_cut_padding_and_prompt_logits_change_no_log_prob(toy_backbone_config):
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(toy_backbone_config).eval()
    batch = _batch(toy_backbone_config.vocab_size, toy_backbone_config.pad_token_id or 0)
    P, temp = batch.prompt_width, 0.7
    # The plain way: every row at full width, logits at every position, a full log-softmax.
    mask = batch.attention_mask
    with torch.no_grad():
        logits = model(input_ids=batch.sequences, attention_mask=mask,
                       position_ids=(mask.cumsum(1) - 1).clamp_min(0)).logits[:, P - 1 : -1] / temp
    logp = torch.log_softmax(logits, -1)
    want = logp.gather(-1, batch.response_ids.unsqueeze(-1)).squeeze(-1)
    want_entropy = -(logp.exp() * logp).sum(-1)
    m = batch.response_mask.bool()
    # Row subsets whose padding differs (a short-prompt short-response pair, a long pair), a whole group with a
    # stray row, all rows in a new order; each prompt run per row and once per distinct prompt.
    subsets = (torch.tensor([3, 4]), torch.tensor([0, 5]), torch.tensor([2, 1, 3]), torch.arange(6).flip(0))
    for rows in subsets:
        for share, buckets in ((False, 1), (True, 1), (False, 4), (True, 4)):
            with torch.no_grad():
                got, entropy = sequence_logprobs(model, batch, rows, temp, with_entropy=True, share_prompt=share,
                                                 max_buckets=buckets)
            assert got.shape == entropy.shape == (len(rows), batch.response_mask.shape[1])
            torch.testing.assert_close(got[m[rows]], want[rows][m[rows]], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(entropy[m[rows]], want_entropy[rows][m[rows]], rtol=1e-5, atol=1e-5)


def test_a_shared_prompt_runs_once_and_gets_every_rows_gradient(toy_backbone_config):
    """With share_prompt each distinct prompt goes through the model once (three for six rows), the responses once
    after it; the gradients are those of the unshared pass, which runs every row's prompt."""
    from transformers import LlamaForCausalLM

    from gprl.prefix import distinct_prompts

    torch.manual_seed(0)
    model = LlamaForCausalLM(toy_backbone_config)
    batch = _batch(toy_backbone_config.vocab_size, toy_backbone_config.pad_token_id or 0)
    P = batch.prompt_width
    first, inverse = distinct_prompts(batch.sequences[:, :P], batch.attention_mask[:, :P])
    assert sorted(first.tolist()) == [0, 2, 4] and inverse.tolist() == [inverse[0]] * 2 + [inverse[2]] * 2 + [inverse[4]] * 2
    shapes = []
    model.model.embed_tokens.register_forward_hook(lambda mod, args, out: shapes.append(tuple(args[0].shape)))
    grads, rows, m = [], torch.arange(6), batch.response_mask.float()
    # Response lengths 5, 1, 3, 2, 2, 4: one pass as wide as the longest (5), or two, rows 0, 5, 2 (5 wide) and
    # rows 3, 4, 1 (2 wide): 3·5 + 3·2 = 21 cells against 30, a saving larger than one row of the longest (5).
    passes = {(False, 1): [(6, P + 5)], (True, 1): [(3, P), (6, 4)],
              (False, 4): [(3, P + 5), (3, P + 2)], (True, 4): [(3, P), (3, 4), (3, 1)]}
    for share, buckets in passes:
        shapes.clear()
        model.zero_grad()
        logp, _ = sequence_logprobs(model, batch, rows, 1.0, share_prompt=share, max_buckets=buckets)
        (logp * m * torch.arange(1.0, 7.0)[:, None]).sum().backward()  # a different weight per row
        grads.append([p.grad.clone() for p in model.parameters()])
        # the prompt and the response columns but the last (it predicts nothing) after each shared prompt pass
        assert shapes == passes[share, buckets], (share, buckets)
    for other in grads[1:]:
        for a, b in zip(grads[0], other):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def _best_split_cost(lengths: list[int], max_buckets: int) -> int:
    """Every way of cutting the rows sorted by length into at most max_buckets runs: the least padded cells, plus one
    row of the longest width per extra pass."""
    import itertools

    desc = sorted(lengths, reverse=True)
    costs = []
    for k in range(1, max_buckets + 1):
        for cuts in itertools.combinations(range(1, len(desc)), k - 1):
            runs = [desc[a:b] for a, b in zip((0, *cuts), (*cuts, len(desc)))]
            costs.append(sum(len(r) * r[0] for r in runs) + (k - 1) * desc[0])
    return min(costs)


def test_length_buckets_cut_the_fewest_padded_cells():
    """length_buckets against every split of the sorted rows: each row in one bucket, no more buckets than allowed,
    the least padded cells (a pass costs one row of the longest width); one bucket when no split saves that much."""
    import random

    from gprl.buckets import length_buckets

    rng = random.Random(0)
    for _ in range(300):
        lengths = [rng.choice([0, 1, 2, 3, 5, 8, 13, 32, 32, 32]) for _ in range(rng.randint(1, 9))]
        max_buckets = rng.randint(1, 4)
        buckets = [b.tolist() for b in length_buckets(torch.tensor(lengths), max_buckets)]
        assert sorted(i for b in buckets for i in b) == list(range(len(lengths)))
        assert 1 <= len(buckets) <= max_buckets
        cost = sum(len(b) * max(lengths[i] for i in b) for b in buckets) + (len(buckets) - 1) * max(lengths)
        assert cost == _best_split_cost(lengths, max_buckets), (lengths, max_buckets, buckets)
    assert len(length_buckets(torch.tensor([32] * 30 + [31, 30]), 4)) == 1  # saves 3 cells: not worth a pass


def test_update_equals_the_plain_full_batch_update(toy_backbone_config):
    """TorchLearner's update (length-sorted micro-batches with cut padding, fused AdamW) against the same maths done
    plainly here: one full-width forward of the whole batch, the clipped surrogate + KL over all tokens, PyTorch's
    default AdamW loop. The weights after the step and the reported loss must agree."""
    import copy

    from transformers import LlamaForCausalLM

    from gprl.algo import policy_loss
    from gprl.algo.drift import Control
    from gprl.config import parse_config
    from gprl.learner import TorchLearner

    torch.manual_seed(0)
    policy = LlamaForCausalLM(toy_backbone_config)
    reference = copy.deepcopy(policy).eval().requires_grad_(False)
    torch.nn.init.normal_(policy.lm_head.weight, std=0.2)  # the policy moved away from the reference: KL > 0
    plain = copy.deepcopy(policy)
    spec = parse_config({"model": {"policy": "p"}, "gpm": {"path": "g"}, "data": {"prompts": "d"},
                         "algo": {"micro_batch_size": 4, "learning_rate": 1e-2, "kl_coef": 0.1},
                         "rollout": {"temperature": 0.7}})
    batch = _batch(toy_backbone_config.vocab_size, toy_backbone_config.pad_token_id or 0)
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5, 2.0, -2.0])
    control = Control(weights=[1.0], kl_coef=0.1, eps_low=0.2, eps_high=0.2)
    stats = TorchLearner(policy, reference, spec).update(batch, adv, control)

    P, mask = batch.prompt_width, batch.attention_mask

    def logp_of(model):
        logits = model(input_ids=batch.sequences, attention_mask=mask,
                       position_ids=(mask.cumsum(1) - 1).clamp_min(0)).logits[:, P - 1 : -1] / 0.7
        return torch.log_softmax(logits, -1).gather(-1, batch.response_ids.unsqueeze(-1)).squeeze(-1)

    opt = torch.optim.AdamW(plain.parameters(), lr=1e-2, weight_decay=spec.algo.weight_decay, foreach=False)
    plain.train()
    logp = logp_of(plain)
    with torch.no_grad():
        ref = logp_of(reference)
    want = policy_loss(logp, logp.detach(), ref, adv, batch.response_mask.float(), kl_coef=0.1)
    want.loss.backward()
    grad_norm = float(torch.nn.utils.clip_grad_norm_(plain.parameters(), spec.algo.max_grad_norm))
    opt.step()
    assert stats.loss == pytest.approx(float(want.loss.detach()), rel=1e-5, abs=1e-6)
    assert stats.kl == pytest.approx(float(want.kl), rel=1e-4, abs=1e-7) and stats.kl > 0
    assert stats.grad_norm == pytest.approx(grad_norm, rel=1e-5)
    # Adam's first step moves each weight by about lr·g/|g|: where g is ~0, float noise in g can flip that move,
    # so the weights agree to 2 % of lr; a wrong row, position or share moves many of them by ~lr.
    for p, q in zip(policy.parameters(), plain.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=2e-4)
