import json
import random

import pytest
import torch
from safetensors.torch import save_file

from gprl.algo import pairwise_scores
from gprl.gpm import DataError, GeneralPreferenceModel, GPMConfig, PreferencePair, load_pairs, train_gpm

BEATS = {"rock": "scissors", "scissors": "paper", "paper": "rock"}
FILLER = ["the", "a", "of", "and", "x", "y", "z", "w"]


def _response(rng, kind, quality):
    words = [rng.choice(FILLER) for _ in range(rng.randint(1, 4))] + [kind] + ["good"] * quality
    rng.shuffle(words)
    return " ".join(words)


def cyclic_pairs(n, seed, transitive_share=0.1):
    """Three response types that beat each other in a cycle; a share of same-type pairs follows a
    transitive quality signal (count of `good`); filler words are noise."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        if rng.random() < transitive_share:
            kind = rng.choice(list(BEATS))
            hi, lo = sorted(rng.sample([0, 1, 2], 2), reverse=True)
            a, b = _response(rng, kind, hi), _response(rng, kind, lo)
        else:
            winner = rng.choice(list(BEATS))
            a, b = _response(rng, winner, rng.randint(0, 2)), _response(rng, BEATS[winner], rng.randint(0, 2))
        out.append(PreferencePair("which wins", a, b, 1.0) if rng.random() < 0.5 else PreferencePair("which wins", b, a, 0.0))
    return out


def _train(toy_tokenizer, toy_backbone_config, axes):
    torch.manual_seed(0)
    model = GeneralPreferenceModel.from_backbone_config(toy_backbone_config, GPMConfig(axes=axes))
    result = train_gpm(model, toy_tokenizer, cyclic_pairs(1500, 0), cyclic_pairs(300, 1), epochs=3, batch_size=32)
    return model, result


def test_gpm_learns_a_cyclic_preference_that_bradley_terry_cannot(toy_tokenizer, toy_backbone_config):
    _, gpm = _train(toy_tokenizer, toy_backbone_config, axes=3)
    _, bt = _train(toy_tokenizer, toy_backbone_config, axes=1)
    assert gpm.final_accuracy >= 0.95
    assert bt.final_accuracy <= 0.70


def test_scores_are_skew_symmetric_and_eigenvalues_sum_to_k(toy_tokenizer, toy_backbone_config):
    model = GeneralPreferenceModel.from_backbone_config(toy_backbone_config, GPMConfig(axes=3)).eval()
    out = model.score(toy_tokenizer, ["which wins"] * 4, ["rock", "paper good", "scissors a", "the"])
    assert torch.allclose(out.embeddings.norm(dim=-1), torch.ones(4), atol=1e-5)
    assert torch.allclose(out.eigenvalues.sum(-1), torch.full((4,), 3.0), atol=1e-5)
    assert (out.eigenvalues >= 0).all()
    s, p, axis = model.pairwise(out, group_size=4)
    assert torch.allclose(s, -s.transpose(1, 2), atol=1e-6)
    assert torch.allclose(p + p.transpose(1, 2), torch.ones_like(p), atol=1e-6)
    assert torch.allclose(axis.sum(1), s, atol=1e-6)


def test_save_and_reload_alone(tmp_path, toy_tokenizer, toy_backbone_config):
    torch.manual_seed(0)
    model = GeneralPreferenceModel.from_backbone_config(toy_backbone_config, GPMConfig(axes=2)).eval()
    model.save_pretrained(tmp_path / "gpm")
    again = GeneralPreferenceModel.from_pretrained(tmp_path / "gpm").eval()
    prompts, responses = ["which wins"] * 3, ["rock", "paper", "scissors good"]
    a, b = model.score(toy_tokenizer, prompts, responses), again.score(toy_tokenizer, prompts, responses)
    assert torch.allclose(a.embeddings, b.embeddings, atol=1e-6)
    assert again.config.axes == 2 and not list(tmp_path.glob(".gpm.tmp-*"))


def test_loads_the_gpm_authors_checkpoint_layout(tmp_path, toy_tokenizer, toy_backbone_config):
    """Their layout: a *ForCausalLM state dict (`model.` prefix), `value_head` (2k, h), `prompt_head` (k, h),
    λ = softmax(prompt_head(h_prompt)), score = v_c^T R^T v_r with R[2l, 2l+1] = -λ_l, R[2l+1, 2l] = λ_l."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(1)
    lm = LlamaForCausalLM(toy_backbone_config)
    k, h = 2, toy_backbone_config.hidden_size
    value_head, prompt_head = torch.randn(2 * k, h), torch.randn(k, h)
    state = {n: t.contiguous() for n, t in lm.state_dict().items()}
    state.update({"value_head.weight": value_head, "prompt_head.weight": prompt_head})
    (tmp_path / "ckpt").mkdir()
    save_file(state, str(tmp_path / "ckpt" / "model.safetensors"))
    toy_backbone_config.save_pretrained(tmp_path / "ckpt")

    gpm = GeneralPreferenceModel.from_pretrained(tmp_path / "ckpt").eval()
    assert gpm.config.layout == "gpm-authors" and gpm.config.axes == k
    prompts, responses = ["which wins"] * 2, ["rock good", "paper"]
    out = gpm.score(toy_tokenizer, prompts, responses)

    # Independent re-computation with the authors' formula on the raw weights.
    from gprl.gpm.model import encode_pairs

    enc = encode_pairs(toy_tokenizer, prompts, responses)
    with torch.no_grad():
        hidden = lm.model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
    rows = torch.arange(2)
    v = torch.nn.functional.normalize(hidden[rows, enc["response_last"]] @ value_head.T, dim=-1)
    lam = torch.softmax(hidden[rows, enc["prompt_last"]] @ prompt_head.T, dim=-1)
    R = torch.zeros(2 * k, 2 * k)
    for l in range(k):
        R[2 * l, 2 * l + 1], R[2 * l + 1, 2 * l] = -lam[0, l], lam[0, l]
    expected = v[0] @ R.T @ v[1]
    got = pairwise_scores(out.embeddings[None], out.eigenvalues[:1])[0, 0, 1]
    assert torch.allclose(got, expected, atol=1e-5)


def test_unknown_checkpoint_is_refused_clearly(tmp_path, toy_backbone_config):
    from transformers import LlamaForCausalLM

    LlamaForCausalLM(toy_backbone_config).save_pretrained(tmp_path / "lm")
    with pytest.raises(ValueError, match="not a GPM checkpoint"):
        GeneralPreferenceModel.from_pretrained(tmp_path / "lm")


def test_preference_data_lines_and_errors(tmp_path):
    good = [
        {"prompt": "p", "chosen": "a", "rejected": "b"},
        {"prompt": "p", "chosen": "a", "rejected": "b", "prob": 0.7},
        {"chosen": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "A"}],
         "rejected": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "B"}]},
    ]
    f = tmp_path / "pairs.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in good) + "\n")
    pairs = load_pairs(f)
    assert pairs[1].prob == 0.7 and pairs[2].chosen == "A" and "hi" in pairs[2].prompt

    cases = [
        ("{not json", "pairs.jsonl:2: not valid JSON"),
        (json.dumps({"prompt": "p", "chosen": "a"}), "pairs.jsonl:2: missing field(s) ['rejected']"),
        (json.dumps({"prompt": "p", "chosen": "a", "rejected": "b", "prob": 2}), "pairs.jsonl:2: field `prob` must be"),
        (json.dumps({"prompt": 3, "chosen": "a", "rejected": "b"}), "pairs.jsonl:2: field `prompt` must be a string"),
    ]
    for line, message in cases:
        f.write_text(json.dumps(good[0]) + "\n" + line + "\n")
        with pytest.raises(DataError) as err:
            load_pairs(f)
        assert message in str(err.value)
