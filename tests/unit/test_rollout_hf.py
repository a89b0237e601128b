"""HFRollout: in-process generation on a tiny locally built policy."""

import pytest
import torch

from gprl.config import RolloutSpec
from gprl.rollout.hf import HFRollout


@pytest.mark.parametrize("share_prompt", [True, False], ids=["prompt-once", "prompt-per-row"])
def test_generation_samples_what_plain_generate_samples_and_trains(tiny_assets, toy_tokenizer, share_prompt,
                                                                    monkeypatch):
    """HFRollout runs `generate` in inference mode (cheaper per decoding step), and by default each prompt's prefill
    once for its G rows, decoding into a KV cache with room reserved (ReservedLayer): at a fixed seed it must sample
    exactly the tokens of a plain no-grad `generate` with the same settings, and its token ids must feed a backward
    pass (inference-mode tensors cannot be saved for one)."""
    from transformers import AutoModelForCausalLM

    from gprl.rollout.hf import ReservedLayer

    reserved = []
    update = ReservedLayer.update
    monkeypatch.setattr(ReservedLayer, "update", lambda self, *a, **k: reserved.append(1) or update(self, *a, **k))

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
    # every decoding step of every layer wrote into the reserved room (shared prefill only)
    assert len(reserved) == (len(passes) - 1) * policy.config.num_hidden_layers if share_prompt else not reserved

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


def test_reserved_layer_holds_what_dynamic_layer_holds_without_copying_it():
    """ReservedLayer hands attention the keys and values DynamicLayer would, and writes each step into its room:
    one buffer for as many steps as it has room, a larger one (with the contents) after; a cache reassigned from
    outside (a row selection) is taken over, not overwritten."""
    from transformers.cache_utils import DynamicLayer

    from gprl.rollout.hf import ReservedLayer

    torch.manual_seed(0)
    plain, start = DynamicLayer(), (torch.randn(3, 2, 5, 4), torch.randn(3, 2, 5, 4))
    plain.update(*start)
    layer = ReservedLayer.taking_over(plain, room=4)
    want = DynamicLayer()
    want.update(*start)
    buffers = []
    for step in range(9):
        if step == 6:
            rows = torch.tensor([2, 0])
            want.batch_select_indices(rows)
            layer.batch_select_indices(rows)
        kv = torch.randn(2, 2, 2, 1, 4).unbind(0) if step >= 6 else torch.randn(2, 3, 2, 1, 4).unbind(0)
        got, expected = layer.update(*kv), want.update(*kv)
        assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
        assert layer.get_seq_length() == want.get_seq_length() == 6 + step
        buffers.append(layer.buffers[0].data_ptr())
    # room for 4 after the first 6 positions: steps 0-4 in one buffer, 5 in a larger one, a new one after the
    # selection for steps 6-8 (each allocated while the one before is still held: a new address)
    moved = [a != b for a, b in zip(buffers, buffers[1:])]
    assert moved == [False, False, False, False, True, True, False, False]
