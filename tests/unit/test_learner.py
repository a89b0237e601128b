"""The learner's forward passes: cutting padding and prompt logits changes no number."""

import pytest
import torch

from gprl.learner import sequence_logprobs
from gprl.rollout.base import RolloutBatch


def _batch(vocab: int, pad: int) -> RolloutBatch:
    """Six rows: left-padded prompts of 1-4 tokens, responses of 1-5 tokens then padding (as HFRollout lays them out)."""
    g = torch.Generator().manual_seed(0)
    P, T = 4, 5
    prompt_lens, response_lens = [4, 1, 2, 3, 1, 4], [5, 1, 3, 2, 2, 4]
    ids = torch.randint(3, vocab, (6, P + T), generator=g)
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
    # Row subsets whose padding differs: a short-prompt short-response pair, a long pair, all rows in a new order.
    for rows in (torch.tensor([1, 4]), torch.tensor([0, 5]), torch.tensor([2, 1, 3]), torch.arange(6).flip(0)):
        with torch.no_grad():
            got, entropy = sequence_logprobs(model, batch, rows, temp, with_entropy=True)
        assert got.shape == entropy.shape == (len(rows), batch.response_mask.shape[1])
        torch.testing.assert_close(got[m[rows]], want[rows][m[rows]], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(entropy[m[rows]], want_entropy[rows][m[rows]], rtol=1e-5, atol=1e-5)


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
    # so the weights agree to 1 % of lr; a wrong row, position or share moves many of them by ~lr.
    for p, q in zip(policy.parameters(), plain.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-4)
