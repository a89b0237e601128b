"""The learner's forward passes: cutting padding and prompt logits changes no number."""

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
