"""HFRollout: in-process generation on a tiny locally built policy."""

import pytest
import torch

from gprl.config import RolloutSpec
from gprl.rollout.hf import HFRollout


@pytest.mark.parametrize("share_prompt", [True, False], ids=["prompt-once", "prompt-per-row"])
def test_generation_samples_what_plain_generate_samples_and_trains(tiny_assets, toy_tokenizer, share_prompt):
    """HFRollout runs `generate` in inference mode (cheaper per decoding step), and by default each prompt's prefill
    once for its G rows: at a fixed seed it must sample exactly the tokens of a plain no-grad `generate` with the
    same settings, and its token ids must feed a backward pass (inference-mode tensors cannot be saved for one)."""
    from transformers import AutoModelForCausalLM

    policy = AutoModelForCausalLM.from_pretrained(tiny_assets / "policy")
    prompts = ["rock", "which wins y", "the rock wins"]  # different lengths: left padding in the batch
    G, new = 4, 8
    rollout = HFRollout(policy, toy_tokenizer, RolloutSpec(max_new_tokens=new, temperature=0.9),
                        share_prompt=share_prompt)
    passes = []
    hook = policy.model.embed_tokens.register_forward_hook(lambda m, args, out: passes.append(tuple(args[0].shape)))
    torch.manual_seed(7)
    batch = rollout.generate(prompts, G)
    hook.remove()
    # the prefill: 3 prompts but their last token once, then that token in each of the 12 rows; or 12 whole prompts
    assert passes[:2] == ([(3, 2), (12, 1)] if share_prompt else [(12, 3), (12, 1)])

    toy_tokenizer.padding_side = "left"
    enc = toy_tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    torch.manual_seed(7)
    with torch.no_grad():
        plain = policy.generate(**enc, do_sample=True, temperature=0.9, top_p=1.0, top_k=0, max_new_tokens=new,
                                num_return_sequences=G, pad_token_id=toy_tokenizer.pad_token_id,
                                eos_token_id=toy_tokenizer.eos_token_id)
    width = batch.prompt_width
    assert torch.equal(batch.sequences[:, :width], plain[:, :width])
    m = batch.response_mask.bool()
    assert m.sum() > len(prompts) * G  # more than one token per response: the check below covers decoding steps
    assert torch.equal(batch.sequences[:, width:][m], plain[:, width:][m])

    policy.train()
    logits = policy(input_ids=batch.sequences, attention_mask=batch.attention_mask).logits
    logits.logsumexp(-1).mean().backward()
    assert policy.model.embed_tokens.weight.grad is not None
