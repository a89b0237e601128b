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


# ---- axes that mean distinct things: per-aspect labels and the decorrelation term (issue 14, item 1)

def _two_quality_pairs(n, seed, with_aspects):
    """The count of `good` and the count of `x` are two independent qualities; the label follows their sum and
    the aspect labels each one alone (axis 0 ↔ good, axis 1 ↔ x)."""
    rng = random.Random(seed)

    def sig(z):
        return 1.0 / (1.0 + 2.718281828 ** -z)

    out = []
    for _ in range(n):
        qa, qb = [(rng.randint(0, 3), rng.randint(0, 3)) for _ in range(2)]
        a, b = (" ".join(["good"] * g + ["x"] * x + [rng.choice(FILLER[:4])]) for g, x in (qa, qb))
        za, zb = 1.5 * (qa[0] - qb[0]), 1.5 * (qa[1] - qb[1])
        aspects = (sig(za), sig(zb)) if with_aspects else None
        out.append(PreferencePair("which wins", a, b, sig(za + zb), aspects))
    return out


def _pair_axes(model, tok, pairs):
    from gprl.gpm.training import pair_axis_scores

    with torch.no_grad():
        c = model.score(tok, [p.prompt for p in pairs], [p.chosen for p in pairs])
        r = model.score(tok, [p.prompt for p in pairs], [p.rejected for p in pairs])
    return pair_axis_scores(c, r)


def _fit(toy_tokenizer, toy_backbone_config, axes, pairs, **kw):
    torch.manual_seed(0)
    model = GeneralPreferenceModel.from_backbone_config(toy_backbone_config, GPMConfig(axes=axes))
    train_gpm(model, toy_tokenizer, pairs, epochs=2, batch_size=32, learning_rate=1e-3, **kw)
    return model


def test_decorrelation_term_reduces_cross_axis_correlation(toy_tokenizer, toy_backbone_config):
    from gprl.gpm.training import axis_correlation_penalty

    train, held = _two_quality_pairs(800, 0, False), _two_quality_pairs(300, 1, False)
    penalties = []
    for weight in (0.0, 1.0):
        model = _fit(toy_tokenizer, toy_backbone_config, 3, train, decorrelation=weight)
        penalties.append(float(axis_correlation_penalty(_pair_axes(model, toy_tokenizer, held))))
    plain, decorrelated = penalties
    assert decorrelated < 0.5 * plain, penalties


def test_correlation_penalty_is_zero_for_uncorrelated_axes_and_one_for_copies():
    from gprl.gpm.training import axis_correlation_penalty

    x = torch.randn(500, 1)
    assert float(axis_correlation_penalty(torch.cat([x, 2 * x, -x], 1))) == pytest.approx(1.0, abs=1e-4)
    assert float(axis_correlation_penalty(torch.randn(20000, 3))) < 1e-3
    assert float(axis_correlation_penalty(torch.randn(50, 1))) == 0.0  # one axis: nothing to decorrelate


def test_aspect_labels_put_each_quality_on_its_own_axis(toy_tokenizer, toy_backbone_config):
    model = _fit(toy_tokenizer, toy_backbone_config, 2, _two_quality_pairs(800, 0, True), axis_label_weight=1.0)
    held = _two_quality_pairs(300, 1, True)
    s = _pair_axes(model, toy_tokenizer, held)
    target = torch.logit(torch.tensor([p.axis_probs for p in held]))  # each aspect's own logit
    c = torch.corrcoef(torch.cat([s, target], 1).T)[:2, 2:]  # rows: axes, columns: aspects
    assert c[0, 0] > 0.8 and c[1, 1] > 0.8, c
    assert abs(c[0, 1]) < 0.3 and abs(c[1, 0]) < 0.3, c


def test_aspect_labels_must_match_the_axes(toy_tokenizer, toy_backbone_config):
    model = GeneralPreferenceModel.from_backbone_config(toy_backbone_config, GPMConfig(axes=3))
    with pytest.raises(ValueError, match="axis_probs` has 2 entries, the GPM has 3 axes"):
        train_gpm(model, toy_tokenizer, _two_quality_pairs(8, 0, True), axis_label_weight=1.0, epochs=1)
    with pytest.raises(ValueError, match="decorrelation must be >= 0"):
        train_gpm(model, toy_tokenizer, _two_quality_pairs(8, 0, True), decorrelation=-1.0)


def test_axis_probs_field_round_trips_and_is_checked(tmp_path):
    from gprl.gpm import write_pairs

    path = tmp_path / "pairs.jsonl"
    write_pairs([PreferencePair("p", "a", "b", 0.8, (0.9, 0.4)), PreferencePair("p", "c", "d")], path)
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    assert lines[0]["axis_probs"] == [0.9, 0.4] and "axis_probs" not in lines[1]
    pairs = load_pairs(str(path))
    assert pairs[0].axis_probs == (0.9, 0.4) and pairs[1].axis_probs is None
    path.write_text(json.dumps({"prompt": "p", "chosen": "a", "rejected": "b", "axis_probs": [0.5, 1.5]}) + "\n")
    with pytest.raises(DataError, match="pairs.jsonl:1: field `axis_probs` must be a non-empty list of numbers"):
        load_pairs(str(path))


def test_gpm_train_cli_takes_the_aspect_and_decorrelation_terms(tiny_assets, tmp_path, capsys):
    from gprl.cli import main

    from gprl.gpm import write_pairs

    pairs = [PreferencePair("which wins", "rock good", "paper", 0.8, (0.9, 0.6, 0.5)),
             PreferencePair("which wins", "scissors", "rock a", 0.3, (0.2, 0.5, 0.5))] * 4
    write_pairs(pairs, tmp_path / "pairs.jsonl")
    base = ["gpm", "train", "--data", str(tmp_path / "pairs.jsonl"), "--backbone", str(tiny_assets / "policy"),
            "--epochs", "1", "--batch-size", "4"]
    assert main([*base, "--out", str(tmp_path / "gpm"), "--axis-label-weight", "1", "--decorrelation", "0.5"]) == 0
    assert GeneralPreferenceModel.from_pretrained(tmp_path / "gpm").config.axes == 3
    with pytest.raises(SystemExit):
        main([*base, "--out", str(tmp_path / "never"), "--decorrelation", "-1"])
    assert "--decorrelation: must be a number >= 0, got -1" in capsys.readouterr().err


def test_scoring_with_each_prompt_run_once_changes_no_number(toy_tokenizer, toy_backbone_config):
    """Groups of responses to the same prompt (prompts and responses of several lengths, batches that cut a group):
    one pass per distinct prompt then the responses on its cache, in one pass or in passes of similar length, gives
    each pair's own full pass's embeddings and eigenvalues; an encoder backbone, whose prompt sees the response, is
    scored pair by pair."""
    from transformers import BertConfig

    torch.manual_seed(0)
    gpm = GeneralPreferenceModel.from_backbone_config(toy_backbone_config, GPMConfig(axes=3)).eval()
    torch.nn.init.normal_(gpm.eigenvalue_gate.weight, std=1.0)  # λ depends on the prompt
    assert gpm.causal
    groups = [("which wins", ["rock good", "paper", "scissors good good the a"]), ("rock", ["x", "paper of y"]),
              ("the a of and rock paper", ["good", "rock scissors", "z w"])]
    prompts = [p for p, rs in groups for _ in rs]
    responses = [r for _, rs in groups for r in rs]
    passes = []
    gpm.backbone.embed_tokens.register_forward_hook(lambda m, args, out: passes.append(tuple(args[0].shape)))
    for batch_size, buckets in ((8, 1), (3, 1), (8, 4)):
        passes.clear()
        want = gpm.score(toy_tokenizer, prompts, responses, batch_size=batch_size, share_prompt=False)
        assert len(passes) == -(-8 // batch_size)  # one pass of prompt + response per batch
        passes.clear()
        got = gpm.score(toy_tokenizer, prompts, responses, batch_size=batch_size, max_buckets=buckets)
        if buckets == 1:
            assert len(passes) == 2 * -(-8 // batch_size) and passes[0][0] == (3 if batch_size == 8 else 1)
        else:
            # responses (+ eos) of 3, 2, 6, 2, 4, 2, 3, 3 tokens: the 3 prompts, then the 6- and 4-token responses,
            # then the six others 3 wide (36 cells and one extra pass's 6, against 48 in one pass)
            assert [(rows, cols) for rows, cols in passes[1:]] == [(2, 6), (6, 3)]
        torch.testing.assert_close(got.embeddings, want.embeddings, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got.eigenvalues, want.eigenvalues, rtol=1e-5, atol=1e-5)
    assert want.eigenvalues[0].sub(want.eigenvalues[3]).abs().max() > 1e-3  # the prompts' λ differ

    bert = BertConfig(vocab_size=len(toy_tokenizer), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                      intermediate_size=64)
    assert not GeneralPreferenceModel.from_backbone_config(bert, GPMConfig(axes=3)).causal
