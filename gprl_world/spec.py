"""Settings of the synthetic world; every built artefact is keyed by a hash of them.

Defaults are chosen on principle (see docs in `gprl_world/__init__.py`), not tuned so
that any method wins. Change them through `WorldSpec(...)` / `dataclasses.replace`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field

# Bump when a change to the code changes what a build produces (invalidates caches).
WORLD_VERSION = 1


def _option(default):
    """A setting added after WORLD_VERSION 1: it enters the cache key only when set, so caches built before it
    existed stay valid (their builds are what its default produces)."""
    return field(default=default, metadata={"key_if_set": True})


@dataclass(frozen=True)
class OracleSpec:
    """The oracle's preference: P(a ≻ b | x) = σ((Σ_k w_k (s_k(a) − s_k(b)) + w_c · cyc(a, b)) / T)."""

    w_relevance: float = 3.0
    w_form: float = 3.0
    w_length: float = 2.0
    w_style: float = 2.0  # compliance with a style the prompt asks for (transitive)
    w_cycle: float = 1.5  # cyclic style taste when the prompt asks for none (intransitive)
    temperature: float = 1.0
    # relevance: distinct topic words count, the 2nd mention of a word half, later ones hurt
    relevance_cap: float = 3.0  # coverage at which relevance saturates (=1)
    second_mention: float = 0.5  # coverage added by the 2nd mention of the same topic word
    saturation: int = 2  # mentions of one topic word beyond this are penalised
    repeat_penalty: float = 0.2  # relevance lost per mention past saturation
    off_topic_penalty: float = 0.25  # relevance lost per word of another topic
    length_scale: float = 4.0  # length score exp(−|words − n| / scale)
    style_none: float = 0.0  # style score of no opener when a style is asked for
    style_mismatch: float = -0.5  # style score of the wrong opener (match = 1)


@dataclass(frozen=True)
class SamplerSpec:
    """The mixed-quality generator of the SFT corpus (a 'crowd' of writers of varying skill)."""

    distinct_topic_probs: tuple[float, ...] = (0.2, 0.35, 0.3, 0.15)  # P(0, 1, 2, 3 distinct topic words)
    mention_probs: tuple[float, ...] = (0.7, 0.25, 0.05)  # P(a chosen topic word appears 1, 2, 3 times)
    off_topic_prob: float = 0.15
    exact_length_prob: float = 0.4  # else the length misses the request by −4..+8
    length_miss: tuple[int, int] = (-4, 8)
    clean_prob: float = 0.5  # else 1–3 form corruptions (junk word, swap, drop, duplicate, no period)
    opener_prob: float = 0.75  # open with a style word when no style is asked for
    opener_prob_requested: float = 0.7  # … when one is asked for
    comply_prob: float = 0.5  # P(opener matches the requested style), else a uniform other style
    style_mix: tuple[float, ...] = (1 / 3, 1 / 3, 1 / 3)  # formal, casual, poetic (uniform: neutral)
    conjunction_prob: float = 0.2  # join two sentences with and/but
    max_response_tokens: int = 30


@dataclass(frozen=True)
class PolicySpec:
    """The tiny causal LM (Llama architecture) and its supervised fine-tuning."""

    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 4  # head_dim 32 (vLLM-friendly)
    intermediate_size: int = 256
    max_positions: int = 96
    init_std: float = 0.09  # initializer_range (~1/sqrt(hidden); HF's 0.02 never learns to read the prompt in budget)
    sft_examples: int = 8000
    sft_steps: int = 500
    sft_batch_size: int = 32
    sft_lr: float = 3e-3
    sft_warmup: int = 30
    weight_decay: float = 0.0


@dataclass(frozen=True)
class PairsSpec:
    """Oracle-labelled preference pairs of SFT-policy samples."""

    train_pairs: int = 6000
    heldout_pairs: int = 1000
    temperature: float = 1.0  # sampling temperature of the policy
    max_new_tokens: int = 32
    label_mode: str = "sampled"  # "sampled": chosen ~ Bernoulli(oracle P), prob 1 | "soft": prob = oracle P
    flip_rate: float = 0.05  # annotator error on top: swap chosen/rejected with this probability
    # per-aspect labels, one oracle-component group per GPM axis, e.g. "relevance|form+length|style+cycle"
    # (components: relevance, form, length, style, cycle); "" = none. The GPM fits them with axis_label_weight.
    axis_labels: str = _option("")


@dataclass(frozen=True)
class PreferenceModelSpec:
    """GPM (k >= 2) and BT (k = 1) models trained on the world's pairs."""

    gpm_axes: int = 3
    bt_axes: int = 1
    beta: float = 0.1
    epochs: int = 2
    lr: float = 5e-4
    batch_size: int = 32
    # the GPM's own recipe (issue 14, item 1; the BT model keeps the settings above): None/0 = as the BT model
    gpm_epochs: int | None = _option(None)
    gate_temperature: float | None = _option(None)  # λ = total·softmax(z / T); None: T = sqrt(hidden)
    gate_total: float | None = _option(None)  # Σλ; None: k (the GPM authors' checkpoints: 1, with T = 1)
    axis_label_weight: float = _option(0.0)  # weight of the per-aspect term (needs pairs.axis_labels)
    decorrelation: float = _option(0.0)  # weight of the cross-axis correlation penalty
    # a larger backbone than the policy's: an LM of this width / depth SFT-ed on the policy's corpus (0 = the policy)
    gpm_backbone_hidden: int = _option(0)
    gpm_backbone_layers: int = _option(0)

    def gpm_backbone(self, policy: "PolicySpec") -> "PolicySpec | None":
        """The PolicySpec of the GPM's own backbone, or None when it starts from the SFT policy."""
        if not (self.gpm_backbone_hidden or self.gpm_backbone_layers):
            return None
        hidden = self.gpm_backbone_hidden or policy.hidden_size
        return dataclasses.replace(policy, hidden_size=hidden, intermediate_size=2 * hidden,
                                   num_layers=self.gpm_backbone_layers or policy.num_layers,
                                   init_std=policy.init_std * (policy.hidden_size / hidden) ** 0.5)


@dataclass(frozen=True)
class WorldSpec:
    seed: int = 0
    heldout_fraction: float = 0.2  # of the prompt grammar's prompts, held out from SFT, pairs and RL
    oracle: OracleSpec = field(default_factory=OracleSpec)
    sampler: SamplerSpec = field(default_factory=SamplerSpec)
    policy: PolicySpec = field(default_factory=PolicySpec)
    pairs: PairsSpec = field(default_factory=PairsSpec)
    preference_models: PreferenceModelSpec = field(default_factory=PreferenceModelSpec)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "WorldSpec":
        kinds = {
            "oracle": OracleSpec, "sampler": SamplerSpec, "policy": PolicySpec,
            "pairs": PairsSpec, "preference_models": PreferenceModelSpec,
        }
        kwargs = {}
        for key, value in data.items():
            if key in kinds:
                sub = kinds[key]
                names = {f.name: f for f in dataclasses.fields(sub)}
                kwargs[key] = sub(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in value.items() if k in names})
            else:
                kwargs[key] = value
        return cls(**kwargs)

    def key(self, parts: tuple[str, ...] | None = None) -> str:
        """Hash of the settings (and code version) that determine a build; `parts` limits it to sections."""
        data = self.to_dict()
        for section in (self.oracle, self.sampler, self.policy, self.pairs, self.preference_models):
            name = {OracleSpec: "oracle", SamplerSpec: "sampler", PolicySpec: "policy", PairsSpec: "pairs",
                    PreferenceModelSpec: "preference_models"}[type(section)]
            for f in dataclasses.fields(section):
                if f.metadata.get("key_if_set") and getattr(section, f.name) == f.default:
                    del data[name][f.name]
        if parts is not None:
            data = {k: data[k] for k in ("seed", "heldout_fraction", *parts)}
        from .vocab import all_words  # the vocabulary fixes token ids: a change must miss the cache

        blob = json.dumps({"version": WORLD_VERSION, "vocab": all_words(), **data}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


# Other recipes for the world's GPM (issue 14, item 1), offered beside the default as `world:<name>` model sources
# (built on first use into the same cache). name -> (pairs settings, preference_models settings); the default world
# keeps its GPM, because docs/experiment.md's table and the README's demo figures were measured with it.
GPM_RECIPES: dict[str, tuple[dict, dict]] = {
    "gpm_aspects": ({"label_mode": "soft", "axis_labels": "relevance|form+length|style+cycle"},
                    {"axis_label_weight": 1.0, "bt_axes": 0}),
}


def recipe_spec(name: str, base: "WorldSpec | None" = None) -> "WorldSpec":
    """The world whose GPM is built by recipe `name` (GPM_RECIPES); its SFT policy is the default world's."""
    if name not in GPM_RECIPES:
        raise ValueError(f"unknown GPM recipe {name!r}; known: {sorted(GPM_RECIPES)}")
    base = base or WorldSpec()
    pairs, models = GPM_RECIPES[name]
    return dataclasses.replace(base, pairs=dataclasses.replace(base.pairs, **pairs),
                               preference_models=dataclasses.replace(base.preference_models, **models))
