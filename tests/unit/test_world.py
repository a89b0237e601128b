"""The synthetic preference world: oracle axes, the cyclic part, the exploit, tokenizer, policy, cache."""

from __future__ import annotations

import json
import random
import statistics
import time
from dataclasses import replace

import pytest

from gprl_world import (
    Oracle,
    PolicySpec,
    PreferenceModelSpec,
    PairsSpec,
    WorldSpec,
    axis_means,
    build_tokenizer,
    build_world,
    cyclic_pairs,
    cyclic_type,
    exploit_metric,
    label_pairs,
    make_prompt,
    parse_prompt,
    read_pairs_jsonl,
    response_style,
    sample_response,
    sft_corpus,
    split_prompts,
    topic_mentions,
    win_rate,
)
from gprl_world import vocab as V
from gprl_world.oracle import cycle

ORACLE = Oracle()
FREE = make_prompt("ocean", 6)  # asks for no style: the cyclic taste applies
FORMAL = make_prompt("ocean", 6, style="formal")


def test_cyclic_component_is_a_cycle():
    body = "the sea is calm ."
    resp = {s: f"{V.STYLE_OPENERS[s][0]} , {body}" for s in V.STYLES}
    # formal ≻ casual ≻ poetic ≻ formal, everything else equal
    assert ORACLE.prob(FREE, resp["formal"], resp["casual"]) > 0.75
    assert ORACLE.prob(FREE, resp["casual"], resp["poetic"]) > 0.75
    assert ORACLE.prob(FREE, resp["poetic"], resp["formal"]) > 0.75
    # no scalar utility can explain it: the transitive parts are equal
    assert len({round(ORACLE.utility(FREE, r), 9) for r in resp.values()}) == 1
    # a requested style replaces the cycle by compliance (transitive)
    assert ORACLE.prob(FORMAL, resp["formal"], resp["casual"]) > 0.5
    assert ORACLE.prob(FORMAL, resp["formal"], resp["poetic"]) > 0.5
    assert ORACLE.prob(FORMAL, resp["casual"], resp["poetic"]) == pytest.approx(0.5)
    assert [cycle(a, b) for a, b in (("formal", "casual"), ("casual", "formal"), ("poetic", None))] == [1, -1, 0]


def test_repetition_past_saturation_lowers_relevance_but_raises_the_naive_count():
    # five sentences of equal form and length; k of them mention the same topic word
    def response(k: int) -> str:
        return " ".join(f"the {'sea' if i < k else 'thing'} is calm ." for i in range(5))

    prompt = make_prompt("ocean", 15)
    rel = [ORACLE.relevance(prompt, response(k)) for k in range(6)]
    naive = [topic_mentions(prompt, response(k)) for k in range(6)]
    assert naive == [0, 1, 2, 3, 4, 5]
    assert rel[0] < rel[1] < rel[2]  # up to saturation more mentions help (what the data shows)
    assert rel[2] > rel[3] > rel[4] > rel[5]  # past it the oracle penalises repetition
    assert [exploit_metric(prompt, response(k)) for k in range(6)] == [0, 0, 0, 1, 2, 3]
    assert {ORACLE.form(response(k)) for k in range(6)} == {1.0}
    assert len({ORACLE.length(prompt, response(k)) for k in range(6)}) == 1
    # distinct topic words are real relevance, not the exploit
    assert ORACLE.relevance(prompt, "the sea is calm . the ship is old . the tide is new .") == pytest.approx(1.0)


def test_form_and_length_axes():
    good = "the sea is calm ."
    assert ORACLE.form(good) == 1.0
    for bad in ("the sea is calm", "the sea um is calm .", "sea the is calm .", "the the sea is calm .", ""):
        assert ORACLE.form(bad) < 1.0
    assert ORACLE.length(make_prompt("ocean", 4), good) == 1.0
    assert ORACLE.length(make_prompt("ocean", 12), good) < ORACLE.length(make_prompt("ocean", 6), good) < 1.0


def test_preference_is_skew_symmetric_and_win_rate():
    rng = random.Random(0)
    prompts = [make_prompt(t, n, s) for t in V.TOPICS for n in (4, 9) for s in (None, "poetic")]
    a = [sample_response(p, rng) for p in prompts]
    b = [sample_response(p, rng) for p in prompts]
    for p, x, y in zip(prompts, a, b):
        assert ORACLE.prob(p, x, y) + ORACLE.prob(p, y, x) == pytest.approx(1.0)
    assert win_rate(ORACLE, prompts, a, a) == pytest.approx(0.5)
    assert win_rate(ORACLE, prompts, a, b) + win_rate(ORACLE, prompts, b, a) == pytest.approx(1.0)
    good, bad = ["the sea is calm ."] * 2, ["xx um thing the"] * 2
    assert win_rate(ORACLE, [FREE, FREE], good, bad) > 0.9
    means = axis_means(ORACLE, prompts, a)
    assert {"relevance", "form", "length", "style", "exploit", "topic_mentions", "style_share_none"} <= set(means)


def test_prompts_parse_and_split():
    p = make_prompt("garden", 7, style="casual", verb="tell", please=True)
    assert p == "please tell me about garden in a casual tone in 7 words :"
    info = parse_prompt(p)
    assert (info.topic, info.style, info.n_words) == ("garden", "casual", 7)
    train, held = split_prompts(0)
    assert not set(train) & set(held) and len(held) > 300
    assert split_prompts(0) == (train, held) and split_prompts(1) != (train, held)
    assert {parse_prompt(x).topic for x in held} == set(V.TOPICS)


def test_tokenizer_round_trips(tmp_path):
    from transformers import AutoTokenizer

    tok = build_tokenizer()
    rng = random.Random(1)
    texts = [p for p in split_prompts(0)[1][:50]] + [sample_response(p, rng) for p in split_prompts(0)[1][:200]]
    for t in texts:
        ids = tok(t, add_special_tokens=False)["input_ids"]
        assert tok.unk_token_id not in ids
        assert tok.decode(ids) == t
        assert tok.decode(ids + [tok.eos_token_id], skip_special_tokens=True) == t
    tok.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    assert again(texts[-1], add_special_tokens=False)["input_ids"] == tok(texts[-1], add_special_tokens=False)["input_ids"]
    assert (again.pad_token, again.eos_token, again.padding_side) == (V.PAD, V.EOS, "left")
    assert tok("the zebra", add_special_tokens=False)["input_ids"][1] == tok.unk_token_id


def test_sft_corpus_varies_on_every_axis():
    train, _ = split_prompts(0)
    corpus = sft_corpus(train, 600, seed=0)
    scores = [ORACLE.axis_scores(p, r) for p, r in corpus]
    for axis in ("relevance", "form", "length", "topic_mentions"):
        assert statistics.pstdev(s[axis] for s in scores) > 0.1, axis
    styled = [s["style"] for (p, _), s in zip(corpus, scores) if parse_prompt(p).style]
    assert len(set(styled)) == 3
    assert {response_style(r) for p, r in corpus if not parse_prompt(p).style} == {*V.STYLES, None}
    # the exploit's footprint: mentions past saturation exist but are rare in the data
    rate = sum(s["exploit"] > 0 for s in scores) / len(scores)
    assert 0 < rate < 0.1


def test_tiny_policy_samples_are_diverse():
    from gprl_world.policy import build_policy, sample_responses, sft

    tok = build_tokenizer()
    spec = PolicySpec(sft_steps=15, sft_batch_size=32, sft_warmup=3)
    model = build_policy(tok, spec, seed=0)
    train, held = split_prompts(0)
    summary = sft(model, tok, sft_corpus(train, 400, seed=0), spec)
    assert summary["final_loss"] < 4.5  # below uniform (ln 145 ≈ 5.0)
    prompts = [held[0]] * 24
    out = sample_responses(model, tok, prompts, seed=3, max_new_tokens=24)
    assert len(set(out)) >= 20
    assert sample_responses(model, tok, prompts, seed=3, max_new_tokens=24) == out  # seeded


def test_cyclic_pairs_toy_set():
    import itertools

    train, held = cyclic_pairs(300, seed=0), cyclic_pairs(99, seed=0, split="heldout")
    assert len(train) == 300 and cyclic_pairs(300, seed=0) == train
    assert not {p.prompt for p in train} & {p.prompt for p in held}
    for pairs in (train, held):
        for i in range(0, len(pairs), 3):
            triple = pairs[i : i + 3]
            assert len({p.prompt for p in triple}) == 1
            # chosen beats rejected along the cycle formal ≻ casual ≻ poetic ≻ formal
            assert {(cyclic_type(p.chosen), cyclic_type(p.rejected)) for p in triple} == {(0, 1), (1, 2), (2, 0)}
            assert all(0.5 <= p.prob <= 1.0 for p in triple)
            # no scalar score of the three responses fits more than 2 of the 3 labels
            responses = sorted({p.chosen for p in triple} | {p.rejected for p in triple})
            assert len(responses) == 3
            best = max(
                sum(order.index(p.chosen) < order.index(p.rejected) for p in triple)
                for order in itertools.permutations(responses)
            )
            assert best == 2


def test_label_noise_modes():
    prompts = [FREE] * 400
    a, b = ["the sea is calm ."] * 400, ["the thing is calm ."] * 400
    p = ORACLE.prob(FREE, a[0], b[0])
    sampled = label_pairs(ORACLE, prompts, a, b, seed=0)
    frac = sum(x.chosen == a[0] for x in sampled) / 400
    assert abs(frac - p) < 0.08 and all(x.prob == 1.0 for x in sampled)
    soft = label_pairs(ORACLE, prompts, a, b, seed=0, mode="soft")
    assert all(x.chosen == a[0] and x.prob == pytest.approx(p) for x in soft)
    flipped = label_pairs(ORACLE, prompts, a, b, seed=0, mode="soft", flip_rate=1.0)
    assert all(x.chosen == b[0] for x in flipped)



def test_aspect_labels_split_the_oracle_logit():
    """The per-aspect labels are the oracle's own logit cut into groups: the components add up to it."""
    from gprl_world.pairs import parse_axis_labels

    rng = random.Random(0)
    for prompt in (FREE, make_prompt("ocean", 8, "formal"), make_prompt("ocean", 6, "any")):
        for _ in range(20):
            a, b = sample_response(prompt, rng), sample_response(prompt, rng)
            parts = ORACLE.component_logits(prompt, a, b)
            assert sum(parts.values()) == pytest.approx(ORACLE.logit(prompt, a, b))
    groups = parse_axis_labels("relevance|form+length|style+cycle")
    pairs = label_pairs(ORACLE, [FREE] * 50, ["indeed , the sea is calm ."] * 50, ["well , the sea is calm"] * 50,
                        seed=0, axis_groups=groups)
    for x in pairs:
        rel, craft, tone = x.axis_probs
        assert rel == pytest.approx(0.5)  # same topic words: relevance has no say
        # chosen over rejected: the period (form) and the formal-over-casual taste favour the first response
        assert (craft > 0.5) == (tone > 0.5) == (x.chosen.startswith("indeed"))
    assert parse_axis_labels("") == ()
    with pytest.raises(ValueError, match="pairs.axis_labels: unknown oracle component 'tone'"):
        parse_axis_labels("relevance|tone")


def test_recipe_options_leave_the_default_worlds_cache_key_alone():
    """Settings added after WORLD_VERSION 1 enter the key only when set: caches built before them stay valid."""
    base = WorldSpec()
    for changed in (replace(base, pairs=replace(base.pairs, axis_labels="relevance|form+length|style+cycle")),
                    replace(base, preference_models=replace(base.preference_models, gate_temperature=1.0)),
                    replace(base, preference_models=replace(base.preference_models, decorrelation=1.0))):
        assert changed.key() != base.key()
    assert WorldSpec.from_dict(json.loads(json.dumps(base.to_dict()))).key() == base.key()
    # the key the default world had before these settings existed (update with WORLD_VERSION or the vocabulary)
    assert base.key() == "2cd91cc13b343fcf"


TINY = WorldSpec(
    policy=PolicySpec(sft_examples=200, sft_steps=4, sft_batch_size=16, sft_warmup=1),
    pairs=PairsSpec(train_pairs=24, heldout_pairs=8, max_new_tokens=16),
    preference_models=PreferenceModelSpec(epochs=1, batch_size=8),
)


def test_build_world_is_cached(tmp_path):
    from gprl.gpm import GeneralPreferenceModel

    logs: list[str] = []
    t0 = time.perf_counter()
    w = build_world(tmp_path, seed=0, spec=TINY, log=logs.append)
    first = time.perf_counter() - t0
    assert logs
    for path in (w.policy_dir / "config.json", w.policy_dir / "tokenizer.json", w.pairs_train, w.pairs_heldout,
                 w.prompts_train_file, w.gpm_dir / "gpm_config.json", w.bt_dir / "gpm_config.json"):
        assert path.exists(), path
    pairs = read_pairs_jsonl(w.pairs_train)
    assert len(pairs) == 24 and all(p.prompt in w.train_prompts for p in pairs)
    rec = json.loads(w.pairs_heldout.read_text().splitlines()[0])
    assert set(rec) == {"prompt", "chosen", "rejected", "prob"} and rec["prompt"] in w.heldout_prompts
    assert GeneralPreferenceModel.from_pretrained(w.bt_dir).config.axes == 1
    assert GeneralPreferenceModel.from_pretrained(w.gpm_dir).config.axes == TINY.preference_models.gpm_axes

    logs.clear()
    t0 = time.perf_counter()
    again = build_world(tmp_path, seed=0, spec=TINY, log=logs.append)
    assert time.perf_counter() - t0 < min(1.0, first / 3)
    assert again == w and not logs
    # another seed is another world; a changed oracle reuses the policy but not the pairs
    other = build_world(tmp_path, seed=0, spec=replace(TINY, oracle=replace(TINY.oracle, w_cycle=0.0)),
                        preference_models=False, log=logs.append)
    assert other.policy_dir == w.policy_dir and other.pairs_train != w.pairs_train and other.gpm_dir is None


@pytest.mark.slow
def test_default_world_has_the_designed_properties():
    """The default world every run uses: an SFT policy that reads the prompt yet varies on every axis,
    labels that mostly follow the oracle, the exploit's footprint in the pairs, and models above chance.

    It is read from the shared cache the README's run and the end-to-end tests use (built here, minutes,
    when absent): its key holds the settings, the vocabulary and WORLD_VERSION, so a change to what a
    build makes misses it. Building a second copy in a temporary folder was a sixth of the suite's time;
    the build itself stays covered (`test_build_is_deterministic`, `test_build_world_is_cached`)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from gprl_world.policy import sample_responses

    w = build_world(seed=0, log=lambda m: None)
    sft = w.info["sft"]
    assert sft["policy_axes"]["relevance"] > 0.15  # it reads the topic from the prompt
    tok = AutoTokenizer.from_pretrained(w.policy_dir)
    model = AutoModelForCausalLM.from_pretrained(w.policy_dir)
    prompts = list(w.heldout_prompts[:128])
    out = sample_responses(model, tok, prompts, seed=0)
    scores = [ORACLE.axis_scores(p, r) for p, r in zip(prompts, out)]
    for axis in ("relevance", "form", "length", "topic_mentions"):
        assert statistics.pstdev(s[axis] for s in scores) > 0.05, axis
    pairs = w.info["pairs"]["train"]
    assert pairs["label_agrees_with_oracle"] > 0.7
    assert pairs["more_topic_mentions_chosen"] > 0.6  # what a learned model will extrapolate
    for name in ("gpm", "bt"):
        assert w.info["models"][name]["heldout_accuracy"][-1] > 0.55


def test_build_is_deterministic(tmp_path):
    spec = replace(TINY, pairs=replace(TINY.pairs, train_pairs=12, heldout_pairs=4))
    a = build_world(tmp_path / "a", seed=3, spec=spec, preference_models=False, log=lambda m: None)
    b = build_world(tmp_path / "b", seed=3, spec=spec, preference_models=False, log=lambda m: None)
    assert a.pairs_train.read_text() == b.pairs_train.read_text()
    assert a.pairs_heldout.read_text() == b.pairs_heldout.read_text()
    assert a.info["sft"]["final_loss"] == b.info["sft"]["final_loss"]
    assert a.pairs_train.name == b.pairs_train.name and a.policy_dir.name == b.policy_dir.name


def test_gpm_recipes_are_offered_as_world_sources_and_built_only_when_asked():
    from gprl_world.hook import _Models
    from gprl_world.spec import GPM_RECIPES, recipe_spec

    models = _Models({"policy": "/p", "gpm": "/g", "bt": "/b"}, cache=None, log=lambda m: None)
    assert "gpm_aspects" in models and "nope" not in models and models["gpm"] == "/g"
    assert set(models) == {"policy", "gpm", "bt", *GPM_RECIPES} and len(models) == 3 + len(GPM_RECIPES)
    with pytest.raises(KeyError):
        models["nope"]
    aspects = recipe_spec("gpm_aspects")
    assert aspects.key(("sampler", "policy")) == WorldSpec().key(("sampler", "policy"))  # the same SFT policy
    assert aspects.pairs.axis_labels and aspects.preference_models.axis_label_weight > 0
    with pytest.raises(ValueError, match="unknown GPM recipe 'nope'"):
        recipe_spec("nope")
