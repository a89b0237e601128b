"""The synthetic preference world: the embedded default for demos, tests and benchmarks.

Everything is built locally and seeded (no hub download, no GPU):

- **Prompts** from a small grammar (2640 prompts, 80/20 train / held-out split):
  ``[please] (write about | describe | tell me about) <topic> [in a <style> tone | in any tone] in <n> words :``
  over a closed vocabulary of ~150 words (8 topics × 6 topic words, generic nouns, determiners,
  adjectives, verbs, adverbs, conjunctions, punctuation, style openers, junk words).
- **Oracle** (`Oracle`) judging (prompt, response) on four transitive axes — ``relevance`` (topic
  coverage that saturates; repeating one topic word past its 2nd mention *costs*), ``form``
  (grammatical word-class transitions, final period, no junk), ``length`` (fit to the requested
  n words), ``style`` (compliance with a requested style) — plus an **intransitive** part: where the
  prompt asks for no style, a cyclic taste over the opener, formal ≻ casual ≻ poetic ≻ formal.
  P(a ≻ b | x) = σ((Σ_k w_k Δs_k + w_cycle · cycle(a, b)) / T).
- **The exploit**: in SFT-policy samples more topic mentions go with being preferred (0 → 2
  mentions of a word help), so a learned preference model extrapolates "more topic words = better";
  the oracle penalises mentions past saturation. `exploit_metric` counts them.
- **Tiny policy**: a Llama-architecture causal LM (hidden 128, 2 layers, 4 heads of 32) with a
  word-level tokenizer, supervised-fine-tuned on responses from a mixed-quality generator, so its
  samples vary on every axis.
- **Preference data**: pairs of SFT-policy samples labelled by the oracle (Bernoulli labels from
  the oracle's probability plus a flip rate, or soft labels); a GPM (k ≥ 2) and a Bradley–Terry
  model (k = 1) trained on them with `gprl.gpm`. `build_world` caches every stage.
- `cyclic_pairs`: a toy set of three response types that beat each other in a cycle, for GPM tests.
"""

from .build import World, build_world, default_cache_dir, train_world_preference_models
from .grammar import PromptInfo, all_prompts, make_prompt, parse_prompt, sample_response, sft_corpus, split_prompts
from .oracle import AXES, Oracle, axis_means, cycle, exploit_metric, response_style, topic_mentions, win_rate
from .pairs import PreferencePair, cyclic_pairs, cyclic_type, label_pairs, read_pairs_jsonl, write_pairs_jsonl
from .spec import OracleSpec, PairsSpec, PolicySpec, PreferenceModelSpec, SamplerSpec, WorldSpec
from .tokenizer import build_tokenizer

__all__ = [
    "AXES", "Oracle", "OracleSpec", "PairsSpec", "PolicySpec", "PreferenceModelSpec", "PreferencePair", "PromptInfo",
    "SamplerSpec", "World", "WorldSpec", "all_prompts", "axis_means", "build_tokenizer", "build_world", "cycle",
    "cyclic_pairs", "cyclic_type", "default_cache_dir", "exploit_metric", "label_pairs", "make_prompt",
    "parse_prompt", "read_pairs_jsonl", "response_style", "sample_response", "sft_corpus", "split_prompts",
    "topic_mentions", "train_world_preference_models", "win_rate", "write_pairs_jsonl",
]
