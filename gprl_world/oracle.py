"""The oracle: the world's ground-truth judge of (prompt, response) on several axes.

Axes (per response, transitive):
- ``relevance`` — coverage of the prompt's topic: each distinct topic word counts 1, its 2nd
  mention 0.5 more, coverage saturates at ``relevance_cap``; every mention of one word past the
  ``saturation``-th *costs* ``repeat_penalty`` (repetition is padding, not content), and words of
  other topics cost ``off_topic_penalty``. In [-1, 1].
- ``form`` — fluency: the share of valid word-class transitions under the response grammar
  (start → opener/determiner, …, last word → end only after a period); junk words, swapped or
  duplicated words and a missing final period all lower it. In [0, 1].
- ``length`` — fit to the requested number of words, exp(−|words − n| / scale). In (0, 1].
- ``style`` — only for prompts that ask for a style: 1 if the response opens with that style,
  ``style_none`` without an opener, ``style_mismatch`` with another style's opener. 0 otherwise.

Pairwise, intransitive: when the prompt asks for no style, the oracle has a cyclic taste over
openers, formal ≻ casual ≻ poetic ≻ formal (``cycle(a, b)`` ∈ {−1, 0, 1}; 0 when either has no
opener or both share a style). No scalar score can represent it.

P(a ≻ b | x) = σ((Σ_k w_k (s_k(a) − s_k(b)) + w_cycle · cycle(a, b)) / T).

The exploit: the naive count of topic mentions rises with preference in SFT-policy data (0 → 2
mentions of a word helps), but past ``saturation`` the oracle penalises it; ``exploit_metric`` counts
the mentions past saturation.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Iterable, Optional, Sequence

from . import vocab as V
from .grammar import PromptInfo, parse_prompt
from .spec import OracleSpec

AXES = ("relevance", "form", "length", "style")
# the additive parts of the oracle's logit (the four weighted axes and the cyclic taste): `component_logits`
COMPONENTS = (*AXES, "cycle")

# valid word-class transitions of the response grammar ("^" start, "$" end)
_VALID: dict[str, frozenset[str]] = {
    "^": frozenset({V.STY, V.DET}),
    V.STY: frozenset({V.COM}),
    V.COM: frozenset({V.DET}),
    V.DET: frozenset({V.ADJ, V.NOUN}),
    V.ADJ: frozenset({V.ADJ, V.NOUN, V.DOT, V.CONJ}),
    V.NOUN: frozenset({V.VERB, V.DOT, V.CONJ}),
    V.VERB: frozenset({V.DET, V.ADV, V.ADJ}),
    V.ADV: frozenset({V.ADJ}),
    V.CONJ: frozenset({V.DET}),
    V.DOT: frozenset({V.DET, "$"}),
}
# cyclic taste: each style beats the next one
_BEATS = {"formal": "casual", "casual": "poetic", "poetic": "formal"}


def _info(prompt: str | PromptInfo) -> PromptInfo:
    return parse_prompt(prompt) if isinstance(prompt, str) else prompt


def response_style(response: str) -> Optional[str]:
    """The style a response opens with (its first word is a style opener), else None."""
    words = response.split()
    return V.STYLE_OF_OPENER.get(words[0]) if words else None


def word_count(response: str) -> int:
    return sum(1 for w in response.split() if w not in (V.PERIOD, V.COMMA))


def topic_counts(prompt: str | PromptInfo, response: str) -> Counter:
    """Mentions of each of the prompt topic's words in the response."""
    topic_words = set(V.TOPICS.get(_info(prompt).topic, ()))
    return Counter(w for w in response.split() if w in topic_words)


def topic_mentions(prompt: str | PromptInfo, response: str) -> int:
    """The naive relevance proxy: how many words of the prompt's topic the response has."""
    return sum(topic_counts(prompt, response).values())


def cycle(a_style: Optional[str], b_style: Optional[str]) -> int:
    """+1 if style a beats style b in the cycle formal ≻ casual ≻ poetic ≻ formal, −1 if it loses, else 0."""
    if a_style is None or b_style is None or a_style == b_style:
        return 0
    return 1 if _BEATS[a_style] == b_style else -1


class Oracle:
    """Ground-truth multi-axis judge of the synthetic world."""

    axes = AXES

    def __init__(self, spec: OracleSpec = OracleSpec()):
        self.spec = spec

    # ---- per-axis scores ----------------------------------------------------------------
    def relevance(self, prompt: str | PromptInfo, response: str) -> float:
        s = self.spec
        info = _info(prompt)
        counts = topic_counts(info, response)
        coverage = sum(1.0 + (s.second_mention if c >= 2 else 0.0) for c in counts.values())
        excess = sum(max(0, c - s.saturation) for c in counts.values())
        off = sum(1 for w in response.split() if w in V.TOPIC_OF_WORD and V.TOPIC_OF_WORD[w] != info.topic)
        rel = min(coverage, s.relevance_cap) / s.relevance_cap - s.repeat_penalty * excess - s.off_topic_penalty * off
        return max(-1.0, min(1.0, rel))

    @staticmethod
    def form(response: str) -> float:
        words = response.split()
        if not words:
            return 0.0
        classes = ["^", *(V.WORD_CLASS.get(w, V.OTHER) for w in words), "$"]
        valid = 0
        for i in range(len(classes) - 1):
            ok = classes[i + 1] in _VALID.get(classes[i], ())
            if ok and 1 <= i < len(words) and words[i - 1] == words[i]:  # the same word twice in a row
                ok = False
            valid += ok
        return valid / (len(classes) - 1)

    def length(self, prompt: str | PromptInfo, response: str) -> float:
        return math.exp(-abs(word_count(response) - _info(prompt).n_words) / self.spec.length_scale)

    def style(self, prompt: str | PromptInfo, response: str) -> float:
        """Compliance with a requested style; 0 when the prompt asks for none."""
        asked = _info(prompt).style
        if asked is None:
            return 0.0
        got = response_style(response)
        if got is None:
            return self.spec.style_none
        return 1.0 if got == asked else self.spec.style_mismatch

    def axis_scores(self, prompt: str | PromptInfo, response: str) -> dict[str, float]:
        """Per-axis oracle scores of one response, plus the exploit statistics (for plots)."""
        info = _info(prompt)
        return {
            "relevance": self.relevance(info, response),
            "form": self.form(response),
            "length": self.length(info, response),
            "style": self.style(info, response),
            "topic_mentions": float(topic_mentions(info, response)),
            "exploit": float(self.exploit_metric(info, response)),
        }

    def exploit_metric(self, prompt: str | PromptInfo, response: str) -> int:
        """Mentions of topic words past the saturation point (0 for every response the oracle doesn't penalise)."""
        return sum(max(0, c - self.spec.saturation) for c in topic_counts(prompt, response).values())

    def utility(self, prompt: str | PromptInfo, response: str) -> float:
        """The transitive part of the preference, Σ_k w_k s_k (the cyclic part has no scalar form)."""
        s = self.spec
        info = _info(prompt)
        return (
            s.w_relevance * self.relevance(info, response)
            + s.w_form * self.form(response)
            + s.w_length * self.length(info, response)
            + s.w_style * self.style(info, response)
        )

    # ---- preferences ----------------------------------------------------------------------
    def cyclic_term(self, prompt: str | PromptInfo, a: str, b: str) -> int:
        if _info(prompt).style is not None:
            return 0
        return cycle(response_style(a), response_style(b))

    def component_logits(self, prompt: str | PromptInfo, a: str, b: str) -> dict[str, float]:
        """The logit of P(a ≻ b) split into its additive parts (COMPONENTS); they sum to `logit`."""
        info = _info(prompt)
        s = self.spec
        parts = {
            "relevance": s.w_relevance * (self.relevance(info, a) - self.relevance(info, b)),
            "form": s.w_form * (self.form(a) - self.form(b)),
            "length": s.w_length * (self.length(info, a) - self.length(info, b)),
            "style": s.w_style * (self.style(info, a) - self.style(info, b)),
            "cycle": s.w_cycle * self.cyclic_term(info, a, b),
        }
        return {k: v / s.temperature for k, v in parts.items()}

    def logit(self, prompt: str | PromptInfo, a: str, b: str) -> float:
        info = _info(prompt)
        s = self.spec
        diff = self.utility(info, a) - self.utility(info, b) + s.w_cycle * self.cyclic_term(info, a, b)
        return diff / s.temperature

    def prob(self, prompt: str | PromptInfo, a: str, b: str) -> float:
        """P(a ≻ b | prompt); 0.5 for a tie."""
        z = self.logit(prompt, a, b)
        return 1.0 / (1.0 + math.exp(-z)) if z >= 0 else math.exp(z) / (1.0 + math.exp(z))


def exploit_metric(prompt: str, response: str, oracle: Oracle | None = None) -> int:
    return (oracle or Oracle()).exploit_metric(prompt, response)


def win_rate(oracle: Oracle, prompts: Sequence[str], responses_a: Sequence[str], responses_b: Sequence[str]) -> float:
    """Mean oracle P(a ≻ b) over aligned (prompt, a, b) triples (a tie counts 0.5)."""
    if not (len(prompts) == len(responses_a) == len(responses_b)):
        raise ValueError(f"lengths differ: {len(prompts)} prompts, {len(responses_a)} a, {len(responses_b)} b")
    if not prompts:
        raise ValueError("win_rate of nothing")
    return sum(oracle.prob(p, a, b) for p, a, b in zip(prompts, responses_a, responses_b)) / len(prompts)


def axis_means(oracle: Oracle, prompts: Sequence[str], responses: Sequence[str]) -> dict[str, float]:
    """Per-axis mean oracle scores of responses, for reports and plots.

    ``style`` is averaged over the prompts that ask for a style only; ``style_share_<s>`` and
    ``style_share_none`` give the opener distribution on the prompts that ask for none (where the
    cyclic taste applies). Also: ``utility`` (transitive part), ``topic_mentions``, ``exploit``,
    ``words``.
    """
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    sums: Counter = Counter()
    n_style = n_free = 0
    shares: Counter = Counter()
    for p, r in zip(prompts, responses):
        info = parse_prompt(p)
        sc = oracle.axis_scores(info, r)
        for k in ("relevance", "form", "length", "topic_mentions", "exploit"):
            sums[k] += sc[k]
        sums["utility"] += oracle.utility(info, r)
        sums["words"] += word_count(r)
        if info.style is not None:
            n_style += 1
            sums["style"] += sc["style"]
        else:
            n_free += 1
            shares[response_style(r) or "none"] += 1
    n = max(len(prompts), 1)
    out = {k: sums[k] / n for k in ("relevance", "form", "length", "topic_mentions", "exploit", "utility", "words")}
    out["style"] = sums["style"] / n_style if n_style else 0.0
    for s in (*V.STYLES, "none"):
        out[f"style_share_{s}"] = shares[s] / n_free if n_free else 0.0
    return out


def pairwise_win_matrix(oracle: Oracle, prompt: str, responses: Iterable[str]) -> list[list[float]]:
    """Oracle P(r_i ≻ r_j | prompt) for every pair of a group."""
    rs = list(responses)
    return [[oracle.prob(prompt, a, b) for b in rs] for a in rs]
