"""Prompts of the world (a small grammar) and the mixed-quality response generator.

Prompt: ``[please] (write about | describe | tell me about) <topic> [in a <style> tone | in any tone] in <n> words :``
(40% of the grammar's prompts ask for no particular style: there the oracle's cyclic taste decides.)
Response: sentences ``DET [ADJ] NOUN VERB (ADJ | ADV ADJ | DET [ADJ] NOUN) .`` optionally joined by
and/but, optionally opened by a style word and a comma (``behold , the sea is calm .``).
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass
from typing import Optional, Sequence

from . import vocab as V
from .spec import SamplerSpec


@dataclass(frozen=True)
class PromptInfo:
    topic: str
    style: Optional[str]  # requested style, or None
    n_words: int  # requested length in words


def make_prompt(topic: str, n_words: int, style: Optional[str] = None, verb: str = "write", please: bool = False) -> str:
    """A prompt of the grammar; `style` is one of STYLES, "any" (explicitly none) or None."""
    head = {"write": "write about", "describe": "describe", "tell": "tell me about"}[verb]
    parts = (["please"] if please else []) + [head, topic]
    if style == "any":
        parts += ["in any tone"]
    elif style is not None:
        parts += ["in a", style, "tone"]
    parts += ["in", str(n_words), "words", V.SEPARATOR]
    return " ".join(parts)


def all_prompts() -> list[str]:
    """Every prompt of the grammar, in a fixed order (2640 prompts)."""
    out = []
    for please, verb, topic, style, n in itertools.product(
        (False, True), ("write", "describe", "tell"), V.TOPICS, (None, "any", *V.STYLES), V.LENGTHS
    ):
        out.append(make_prompt(topic, n, style, verb, please))
    return out


def split_prompts(seed: int, heldout_fraction: float = 0.2) -> tuple[list[str], list[str]]:
    """Seeded train / held-out split of the prompt grammar (disjoint, both cover every topic)."""
    prompts = all_prompts()
    rng = random.Random(f"prompts-{seed}")
    rng.shuffle(prompts)
    cut = int(round(len(prompts) * (1 - heldout_fraction)))
    return prompts[:cut], prompts[cut:]


def parse_prompt(prompt: str) -> PromptInfo:
    """Read topic, requested style and length from a prompt of the grammar (or any text with those words)."""
    words = prompt.split()
    topic = next((w for w in words if w in V.TOPICS), None)
    if topic is None:  # a prompt that names a topic word rather than the topic
        topic = next((V.TOPIC_OF_WORD[w] for w in words if w in V.TOPIC_OF_WORD), "")
    style = next((w for w in words if w in V.STYLES), None)
    n = next((int(w) for w in words if w.isdigit()), 8)
    return PromptInfo(topic=topic, style=style, n_words=n)


# ------------------------------------------------------------------------------------------
# response generator

# sentence templates: slot classes; "N" is a noun slot
_TEMPLATES: dict[int, tuple[tuple[str, ...], ...]] = {
    4: (("D", "N", "V", "A"),),
    5: (("D", "A", "N", "V", "A"), ("D", "N", "V", "D", "N"), ("D", "N", "V", "R", "A")),
    6: (("D", "A", "N", "V", "D", "N"), ("D", "N", "V", "D", "A", "N"), ("D", "A", "N", "V", "R", "A")),
    7: (("D", "A", "N", "V", "D", "A", "N"),),
}
_POOLS = {"D": V.DETERMINERS, "A": V.ADJECTIVES, "V": V.VERBS, "R": V.ADVERBS}


def _sentence_sizes(rng: random.Random, words: int) -> list[int]:
    sizes = []
    rem = max(words, 4)
    while rem > 7:
        s = rng.randint(4, min(7, rem - 4))
        sizes.append(s)
        rem -= s
    sizes.append(rem)
    return sizes


def sample_response(prompt: str | PromptInfo, rng: random.Random, spec: SamplerSpec = SamplerSpec()) -> str:
    """One response from a writer of random skill: it varies on every axis the oracle judges."""
    info = parse_prompt(prompt) if isinstance(prompt, str) else prompt
    topic_words = V.TOPICS.get(info.topic, ())

    # style opener
    opener: list[str] = []
    if info.style is not None:
        if rng.random() < spec.opener_prob_requested:
            if rng.random() < spec.comply_prob:
                style = info.style
            else:
                style = rng.choice([s for s in V.STYLES if s != info.style])
            opener = [rng.choice(V.STYLE_OPENERS[style]), V.COMMA]
    elif rng.random() < spec.opener_prob:
        style = rng.choices(V.STYLES, weights=spec.style_mix)[0]
        opener = [rng.choice(V.STYLE_OPENERS[style]), V.COMMA]

    # length plan
    if rng.random() < spec.exact_length_prob:
        target = info.n_words
    else:
        target = info.n_words + rng.randint(*spec.length_miss)
    body_words = max(4, target - (1 if opener else 0))
    sentences = [list(rng.choice(_TEMPLATES[s])) for s in _sentence_sizes(rng, body_words)]

    # topic plan: distinct topic words, each mentioned 1-3 times; maybe one off-topic word
    n_distinct = rng.choices(range(len(spec.distinct_topic_probs)), weights=spec.distinct_topic_probs)[0]
    mentions: list[str] = []
    if topic_words:
        for w in rng.sample(topic_words, min(n_distinct, len(topic_words))):
            mentions += [w] * (1 + rng.choices(range(len(spec.mention_probs)), weights=spec.mention_probs)[0])
    if rng.random() < spec.off_topic_prob:
        others = [w for t, ws in V.TOPICS.items() if t != info.topic for w in ws]
        mentions.append(rng.choice(others))
    slots = [(i, j) for i, sent in enumerate(sentences) for j, c in enumerate(sent) if c == "N"]
    rng.shuffle(slots)
    rng.shuffle(mentions)
    fill = dict(zip(slots, mentions))

    words: list[str] = list(opener)
    for i, sent in enumerate(sentences):
        for j, c in enumerate(sent):
            if c == "N":
                words.append(fill.get((i, j)) or rng.choice(V.GENERIC_NOUNS))
            else:
                words.append(rng.choice(_POOLS[c]))
        last = i == len(sentences) - 1
        if not last and rng.random() < spec.conjunction_prob:
            words.append(rng.choice(V.CONJUNCTIONS))
        else:
            words.append(V.PERIOD)

    if rng.random() >= spec.clean_prob:
        for _ in range(rng.randint(1, 3)):
            words = _corrupt(words, rng)
    return " ".join(words[: spec.max_response_tokens])


def _corrupt(words: list[str], rng: random.Random) -> list[str]:
    words = list(words)
    kind = rng.choice(("junk", "swap", "drop", "duplicate", "no_period"))
    if kind == "junk":
        words.insert(rng.randint(0, len(words)), rng.choice(V.JUNK))
    elif kind == "swap" and len(words) >= 2:
        i = rng.randrange(len(words) - 1)
        words[i], words[i + 1] = words[i + 1], words[i]
    elif kind == "drop" and len(words) >= 2:
        del words[rng.randrange(len(words))]
    elif kind == "duplicate":
        i = rng.randrange(len(words))
        words.insert(i, words[i])
    elif kind == "no_period" and words and words[-1] == V.PERIOD:
        words.pop()
    return words


def sft_corpus(prompts: Sequence[str], n: int, seed: int, spec: SamplerSpec = SamplerSpec()) -> list[tuple[str, str]]:
    """n (prompt, response) pairs: prompts cycled in a seeded order, responses from `sample_response`."""
    rng = random.Random(f"sft-{seed}")
    order = list(prompts)
    out: list[tuple[str, str]] = []
    while len(out) < n:
        rng.shuffle(order)
        for p in order[: n - len(out)]:
            out.append((p, sample_response(p, rng, spec)))
    return out
