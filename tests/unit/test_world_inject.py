"""A reward hack switched on at a known step (gprl_world.inject): one axis, from the onset on, towards the exploit."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig

from gprl.algo.per_axis import group_axis_scores
from gprl.gpm import GeneralPreferenceModel, GPMConfig
from gprl_world import build_tokenizer, make_prompt
from gprl_world.inject import FEATURES, InjectedPreference

PROMPT = make_prompt("ocean", 15)
# equal form and length; the last two repeat one topic word past the oracle's saturation point (2 and 3 repeats)
GROUP = [" ".join(f"the {'sea' if i < k else 'thing'} is calm ." for i in range(5)) for k in (0, 1, 2, 4, 5)]


@pytest.fixture(scope="module")
def gpm_and_tokenizer():
    torch.manual_seed(0)
    tok = build_tokenizer()
    backbone = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128)
    return GeneralPreferenceModel.from_backbone_config(backbone, GPMConfig(axes=3)).eval(), tok


def _group_scores(model, tok) -> torch.Tensor:
    out = model.score(tok, [PROMPT] * len(GROUP), GROUP)
    return group_axis_scores(out.embeddings[None], out.eigenvalues[:1])[0]  # (G, k)


def test_the_hack_moves_one_axis_towards_the_exploit_from_its_onset(gpm_and_tokenizer):
    model, tok = gpm_and_tokenizer
    step = {"done": 0}
    hacked = InjectedPreference(model, FEATURES["repeats"], lambda: step["done"], onset=10, strength=0.4)
    plain = _group_scores(model, tok)
    step["done"] = 9  # scoring for step 10: not yet
    assert torch.equal(_group_scores(hacked, tok), plain)
    step["done"] = 10
    on = _group_scores(hacked, tok)
    gain = on[:, 0] - plain[:, 0]
    # the responses with repeats gain on axis 0 against those without, more repeats more; the other axes are untouched
    assert gain[3] > gain[2] and gain[4] > gain[3] and gain[4] > 0 > gain[0]
    torch.testing.assert_close(on[:, 1:], plain[:, 1:])
    # with the sign turned, the repeats lose instead (the world without its exploit)
    patched = InjectedPreference(model, FEATURES["repeats"], lambda: 0, onset=0, strength=-0.4)
    loss = _group_scores(patched, tok)[:, 0] - plain[:, 0]
    assert loss[4] < 0 < loss[0]


def test_a_strength_that_would_wrap_the_sine_is_refused(gpm_and_tokenizer):
    model, _ = gpm_and_tokenizer
    with pytest.raises(ValueError, match="π/2"):
        InjectedPreference(model, FEATURES["repeats"], lambda: 0, onset=0, strength=0.6)
    with pytest.raises(ValueError, match="axis 3"):
        InjectedPreference(model, FEATURES["repeats"], lambda: 0, onset=0, strength=0.1, axis=3)


def test_filler_words_are_counted():
    assert FEATURES["filler"](PROMPT, "um the sea is uh calm . hmm") == 3
    assert FEATURES["filler"](PROMPT, GROUP[0]) == 0
