"""Preference pairs: oracle-labelled pairs of policy samples, a cyclic toy set, and JSONL I/O."""

from __future__ import annotations

import json
import math
import os
import random
import tempfile
from pathlib import Path
from typing import Iterable, Sequence

from gprl.gpm.data import PreferencePair  # the canonical record (prompt, chosen, rejected, prob = 1.0)

from . import vocab as V
from .oracle import COMPONENTS, Oracle, cycle


def parse_axis_labels(text: str) -> tuple[tuple[str, ...], ...]:
    """"relevance|form+length|style+cycle" → one group of oracle components per GPM axis ("" → none)."""
    if not text:
        return ()
    groups = tuple(tuple(c.strip() for c in g.split("+")) for g in text.split("|"))
    for g in groups:
        for c in g:
            if c not in COMPONENTS:
                raise ValueError(f"pairs.axis_labels: unknown oracle component {c!r} in {text!r}; known: {COMPONENTS}")
    return groups


def _sigmoid(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-z)) if z >= 0 else math.exp(z) / (1.0 + math.exp(z))


def axis_probs(oracle: Oracle, prompt: str, chosen: str, rejected: str, groups) -> tuple[float, ...]:
    """P(chosen ≻ rejected) on each group of the oracle's components alone (the annotator's per-aspect judgement)."""
    parts = oracle.component_logits(prompt, chosen, rejected)
    return tuple(_sigmoid(sum(parts[c] for c in g)) for g in groups)


def label_pair(
    oracle: Oracle, prompt: str, a: str, b: str, rng: random.Random, mode: str = "sampled", flip_rate: float = 0.0,
    axis_groups=(),
) -> PreferencePair:
    """Label (a, b) with the oracle.

    mode "sampled": chosen drawn with the oracle's P(a ≻ b) (an annotator who follows the oracle's
    Bradley–Terry-style noise), prob 1.0. mode "soft": the likelier one is chosen and prob = its
    oracle probability. Then, with `flip_rate`, chosen and rejected are swapped (annotator error;
    a soft prob is kept, so a flipped soft label is a confidently wrong one). With `axis_groups` the pair also
    carries per-aspect probabilities (`axis_probs`, oriented chosen over rejected, never flipped).
    """
    p = oracle.prob(prompt, a, b)
    if mode == "sampled":
        a_wins = rng.random() < p
        prob = 1.0
    elif mode == "soft":
        a_wins = p >= 0.5
        prob = p if a_wins else 1.0 - p
    else:
        raise ValueError(f"label mode must be 'sampled' or 'soft', not {mode!r}")
    if flip_rate > 0 and rng.random() < flip_rate:
        a_wins = not a_wins
    chosen, rejected = (a, b) if a_wins else (b, a)
    aspects = axis_probs(oracle, prompt, chosen, rejected, axis_groups) if axis_groups else None
    return PreferencePair(prompt=prompt, chosen=chosen, rejected=rejected, prob=prob, axis_probs=aspects)


def label_pairs(
    oracle: Oracle,
    prompts: Sequence[str],
    responses_a: Sequence[str],
    responses_b: Sequence[str],
    seed: int,
    mode: str = "sampled",
    flip_rate: float = 0.0,
    axis_groups=(),
) -> list[PreferencePair]:
    rng = random.Random(f"labels-{seed}")
    return [label_pair(oracle, p, a, b, rng, mode, flip_rate, axis_groups)
            for p, a, b in zip(prompts, responses_a, responses_b)]


# ------------------------------------------------------------------------------------------
# cyclic toy set (for GPM unit tests): three response types that beat each other in a cycle

CYCLIC_TYPES = V.STYLES  # type i beats type i+1: formal ≻ casual ≻ poetic ≻ formal


def cyclic_type(response: str) -> int:
    """Index of a toy response's type (its opener's style) in CYCLIC_TYPES."""
    return CYCLIC_TYPES.index(V.STYLE_OF_OPENER[response.split()[0]])


def _toy_response(rng: random.Random, kind: int, nouns: Sequence[str]) -> tuple[str, float]:
    """A toy response of type `kind`: its style opener, and an adjective from the type's third of
    ADJECTIVES (the type shows at both ends, so a small backbone sees it at the scored last token);
    the adjective's rank inside that third is the nuisance quality q ∈ [0, 1)."""
    opener = rng.choice(V.STYLE_OPENERS[CYCLIC_TYPES[kind]])
    group = V.ADJECTIVES[kind * 5 : kind * 5 + 5]
    rank = rng.randrange(len(group))
    words = [opener, V.COMMA, rng.choice(V.DETERMINERS), rng.choice(nouns), rng.choice(V.VERBS), group[rank], V.PERIOD]
    return " ".join(words), rank / len(group)


def cyclic_pairs(
    n: int,
    seed: int = 0,
    split: str = "train",
    cycle_weight: float = 4.0,
    noise_weight: float = 1.0,
) -> list[PreferencePair]:
    """n pairs over three response types that beat each other in a cycle, plus transitive noise.

    Pairs come in triples: for one prompt, one response of each type (formal, casual, poetic
    opener; random body) and all three pairings, so the labels over those three responses form a
    cycle and no per-response score can fit more than 2 of the 3 (Bradley–Terry accuracy <= 2/3,
    whatever it memorises); a GPM with k >= 1 skew axis can fit all. P(a ≻ b) = σ(cycle_weight ·
    cyc(a, b) + noise_weight · (q_a − q_b)) with a nuisance quality q ∈ [0, 1) that the adjective
    encodes (see `_toy_response`); the likelier response is `chosen`, `prob` its probability (soft
    label; with the defaults the cycle always decides). `split` "train" and "heldout" use disjoint
    prompts and nouns, so held-out accuracy measures the cycle, not memorised texts.
    """
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', not {split!r}")
    topics = list(V.TOPICS)
    prompt_topics = topics[:6] if split == "train" else topics[6:]
    nouns = [w for t in prompt_topics for w in V.TOPICS[t]] + list(V.GENERIC_NOUNS)
    rng = random.Random(f"cyclic-{seed}-{split}")
    out: list[PreferencePair] = []
    while len(out) < n:
        prompt = f"describe {rng.choice(prompt_topics)} in {rng.choice(V.LENGTHS)} words :"
        items = [_toy_response(rng, kind, nouns) for kind in range(3)]
        triple = []
        for ka, kb in ((0, 1), (1, 2), (2, 0)):
            (a, qa), (b, qb) = items[ka], items[kb]
            z = cycle_weight * cycle(CYCLIC_TYPES[ka], CYCLIC_TYPES[kb]) + noise_weight * (qa - qb)
            p = 1.0 / (1.0 + math.exp(-z))
            if rng.random() < 0.5:  # present a and b in either order; the label follows p
                a, b, p = b, a, 1.0 - p
            chosen, rejected, prob = (a, b, p) if p >= 0.5 else (b, a, 1.0 - p)
            triple.append(PreferencePair(prompt=prompt, chosen=chosen, rejected=rejected, prob=prob))
        out.extend(triple)
    return out[:n]


# ------------------------------------------------------------------------------------------
# JSONL

def write_pairs_jsonl(path: str | os.PathLike, pairs: Iterable[PreferencePair]) -> Path:
    """Write pairs as JSONL (fields prompt, chosen, rejected, prob, and axis_probs where a pair has them), atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        for p in pairs:
            rec = {"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected, "prob": p.prob}
            if p.axis_probs is not None:
                rec["axis_probs"] = list(p.axis_probs)
            f.write(json.dumps(rec) + "\n")
    os.replace(tmp, path)
    return path


def read_pairs_jsonl(path: str | os.PathLike) -> list[PreferencePair]:
    out = []
    with open(path) as f:
        for line in f:
            if line.strip():
                d = json.loads(line)
                aspects = d.get("axis_probs")
                out.append(PreferencePair(prompt=d["prompt"], chosen=d["chosen"], rejected=d["rejected"],
                                          prob=float(d.get("prob", 1.0)),
                                          axis_probs=tuple(aspects) if aspects is not None else None))
    return out

