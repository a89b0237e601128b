"""Build (and cache) the synthetic world's artefacts: tokenizer + SFT policy, preference pairs, GPM and BT.

Each stage is cached in its own folder under `cache_dir`, keyed by a hash of the settings it
depends on (plus the code's WORLD_VERSION), written to a temp folder and renamed into place, and
guarded by a file lock, so concurrent builders of the same world do the work once and a killed
build never leaves a half-written stage behind.

    cache_dir/policy-<key>/   SFT policy + tokenizer (save_pretrained), sft.json
    cache_dir/pairs-<key>/    train.jsonl, heldout.jsonl (prompt/chosen/rejected/prob), pairs.json
    cache_dir/models-<key>/   gpm/ (k = gpm_axes), bt/ (k = 1), models.json
    cache_dir/world-<key>/    prompts_train.jsonl, prompts_heldout.jsonl, world.json (manifest)
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import random
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional

from .grammar import sft_corpus, split_prompts
from .oracle import Oracle, axis_means
from .pairs import label_pairs, parse_axis_labels, read_pairs_jsonl, write_pairs_jsonl
from .spec import WorldSpec

Log = Callable[[str], None]


@dataclass(frozen=True)
class World:
    """Paths and facts of a built world."""

    spec: WorldSpec
    root: Path  # the manifest folder
    policy_dir: Path  # SFT policy + tokenizer (AutoModelForCausalLM / AutoTokenizer loadable)
    pairs_train: Path
    pairs_heldout: Path
    gpm_dir: Optional[Path]  # GPM (k = spec.preference_models.gpm_axes); None if not built
    bt_dir: Optional[Path]  # Bradley-Terry model (k = 1); None if not built
    prompts_train_file: Path
    prompts_heldout_file: Path
    train_prompts: tuple[str, ...] = field(repr=False, default=())
    heldout_prompts: tuple[str, ...] = field(repr=False, default=())
    info: dict = field(repr=False, default_factory=dict)  # per-stage summaries (timings, stats)

    @property
    def tokenizer_dir(self) -> Path:
        return self.policy_dir

    @property
    def oracle(self) -> Oracle:
        return Oracle(self.spec.oracle)


def default_cache_dir() -> Path:
    return Path(os.environ.get("GPRL_CACHE", Path.home() / ".cache" / "gprl")) / "world"


@contextlib.contextmanager
def _stage(cache_dir: Path, name: str) -> Iterator[Optional[Path]]:
    """Yield a temp folder to build stage `name` in (renamed into place on success), or None if cached."""
    final = cache_dir / name
    cache_dir.mkdir(parents=True, exist_ok=True)
    with open(cache_dir / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if (final / "DONE").exists():
                yield None
                return
            if final.exists():  # a stage without its DONE marker is a leftover: rebuild it
                shutil.rmtree(final)
            tmp = Path(tempfile.mkdtemp(dir=cache_dir, prefix=f".{name}.tmp-"))
            try:
                yield tmp
                (tmp / "DONE").write_text(time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()) + "\n")
                os.replace(tmp, final)
            finally:
                if tmp.exists():
                    shutil.rmtree(tmp, ignore_errors=True)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _write_prompts(path: Path, prompts) -> None:
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))


@contextlib.contextmanager
def _threads(n: Optional[int]):
    import torch

    if n is None:
        yield
        return
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def build_policy_stage(spec: WorldSpec, out: Path, log: Log) -> dict:
    """Tokenizer + SFT policy into `out`."""
    from .grammar import sample_response
    from .policy import build_policy, sample_responses, sft
    from .tokenizer import build_tokenizer

    train, heldout = split_prompts(spec.seed, spec.heldout_fraction)
    tok = build_tokenizer()
    corpus = sft_corpus(train, spec.policy.sft_examples, spec.seed, spec.sampler)
    model = build_policy(tok, spec.policy, seed=spec.seed)
    log(f"world: SFT of the tiny policy ({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params, "
        f"{spec.policy.sft_steps} steps of {spec.policy.sft_batch_size})")
    summary = sft(model, tok, corpus, spec.policy, seed=spec.seed)
    log(f"world: SFT done in {summary['seconds']:.1f}s, loss {summary['final_loss']:.3f}")
    # how the SFT policy and its training data look under the oracle (held-out prompts)
    oracle = Oracle(spec.oracle)
    probe = [heldout[i % len(heldout)] for i in range(256)]
    samples = sample_responses(model, tok, probe, seed=spec.seed + 1, max_new_tokens=spec.pairs.max_new_tokens)
    rng = random.Random(f"probe-{spec.seed}")
    data = [sample_response(p, rng, spec.sampler) for p in probe]
    summary["policy_axes"] = axis_means(oracle, probe, samples)
    summary["data_axes"] = axis_means(oracle, probe, data)
    summary["params"] = sum(p.numel() for p in model.parameters())
    model.save_pretrained(out)
    tok.save_pretrained(out)
    _write_json(out / "sft.json", summary)
    return summary


def build_pairs_stage(spec: WorldSpec, policy_dir: Path, out: Path, log: Log) -> dict:
    """Oracle-labelled preference pairs of SFT-policy samples (train prompts / held-out prompts)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .policy import sample_responses

    t0 = time.perf_counter()
    train, heldout = split_prompts(spec.seed, spec.heldout_fraction)
    tok = AutoTokenizer.from_pretrained(policy_dir)
    model = AutoModelForCausalLM.from_pretrained(policy_dir)
    oracle = Oracle(spec.oracle)
    ps = spec.pairs
    summary: dict = {}
    for split, prompts, n, offset in (("train", train, ps.train_pairs, 0), ("heldout", heldout, ps.heldout_pairs, 1)):
        rng = random.Random(f"pair-prompts-{spec.seed}-{split}")
        chosen_prompts = [rng.choice(prompts) for _ in range(n)]
        # both responses of a pair in one generate call: a = first half, b = second half
        texts = sample_responses(
            model, tok, chosen_prompts + chosen_prompts, seed=spec.seed * 1000 + 17 + offset,
            temperature=ps.temperature, max_new_tokens=ps.max_new_tokens,
        )
        a, b = texts[:n], texts[n:]
        pairs = label_pairs(oracle, chosen_prompts, a, b, seed=spec.seed * 1000 + offset, mode=ps.label_mode,
                            flip_rate=ps.flip_rate, axis_groups=parse_axis_labels(ps.axis_labels))
        write_pairs_jsonl(out / f"{split}.jsonl", pairs)
        # agreement of the labels with the oracle's likelier side, and the exploit's footprint in the data
        agree = sum((oracle.prob(p.prompt, p.chosen, p.rejected) >= 0.5) for p in pairs) / n
        more = [p for p in pairs if _mentions(p.prompt, p.chosen) != _mentions(p.prompt, p.rejected)]
        more_wins = sum(_mentions(p.prompt, p.chosen) > _mentions(p.prompt, p.rejected) for p in more) / max(1, len(more))
        summary[split] = {"pairs": n, "label_agrees_with_oracle": agree,
                          "more_topic_mentions_chosen": more_wins, "pairs_with_mention_difference": len(more)}
    summary["seconds"] = time.perf_counter() - t0
    log(f"world: {ps.train_pairs}+{ps.heldout_pairs} preference pairs in {summary['seconds']:.1f}s")
    _write_json(out / "pairs.json", summary)
    return summary


def _mentions(prompt: str, response: str) -> int:
    from .oracle import topic_mentions

    return topic_mentions(prompt, response)


def train_world_preference_models(spec: WorldSpec, policy_dir: Path, pairs_dir: Path, out: Path, log: Log,
                                  gpm_backbone_dir: Optional[Path] = None) -> dict:
    """Train the GPM (k = gpm_axes) and the BT model (k = 1; skipped when bt_axes = 0) on the world's pairs,
    backbones from the SFT policy (the GPM's from `gpm_backbone_dir` when given)."""
    import torch
    from transformers import AutoTokenizer

    from gprl.gpm import GeneralPreferenceModel, GPMConfig, train_gpm

    ms = spec.preference_models
    groups = parse_axis_labels(spec.pairs.axis_labels)
    if ms.axis_label_weight and len(groups) != ms.gpm_axes:
        raise ValueError(f"preference_models.axis_label_weight needs pairs.axis_labels with one group per GPM axis "
                         f"({ms.gpm_axes}), got {spec.pairs.axis_labels!r}")
    tok = AutoTokenizer.from_pretrained(policy_dir)
    train = read_pairs_jsonl(pairs_dir / "train.jsonl")
    heldout = read_pairs_jsonl(pairs_dir / "heldout.jsonl")
    summary: dict = {}
    recipes = {
        "gpm": dict(backbone=gpm_backbone_dir or policy_dir, config=GPMConfig(axes=ms.gpm_axes, beta=ms.beta, gate_temperature=ms.gate_temperature,
                                          gate_total=ms.gate_total),
                    epochs=ms.gpm_epochs or ms.epochs, axis_label_weight=ms.axis_label_weight,
                    decorrelation=ms.decorrelation),
        "bt": dict(backbone=policy_dir, config=GPMConfig(axes=ms.bt_axes, beta=ms.beta), epochs=ms.epochs),
    }
    if ms.bt_axes == 0:
        del recipes["bt"]
    for name, recipe in recipes.items():
        t0 = time.perf_counter()
        torch.manual_seed(spec.seed)
        config = recipe.pop("config")
        model = GeneralPreferenceModel.from_backbone(recipe.pop("backbone"), config)
        res = train_gpm(model, tok, train, heldout, batch_size=ms.batch_size, learning_rate=ms.lr, seed=spec.seed,
                        log=log, **recipe)
        model.save_pretrained(out / name)
        tok.save_pretrained(out / name)
        summary[name] = {"axes": config.axes, "train_loss": res.train_loss, "heldout_accuracy": res.eval_accuracy,
                         "seconds": time.perf_counter() - t0}
        log(f"world: {name} (k={config.axes}) trained in {summary[name]['seconds']:.1f}s, "
            f"held-out accuracy {res.final_accuracy:.3f}")
    _write_json(out / "models.json", summary)
    return summary


def build_world(
    cache_dir: str | os.PathLike | None = None,
    seed: int = 0,
    spec: WorldSpec | None = None,
    *,
    preference_models: bool = True,
    threads: Optional[int] = None,
    log: Log = print,
) -> World:
    """Build the world (or load it from the cache) and return its paths.

    `spec` gives every setting (its seed is replaced by `seed`); `preference_models=False` skips
    the GPM/BT stage (gpm_dir / bt_dir are then None unless cached already). `threads` sets torch's
    intra-op threads while building (None: leave as is).
    """
    import dataclasses

    spec = dataclasses.replace(spec or WorldSpec(), seed=seed)
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    train, heldout = split_prompts(spec.seed, spec.heldout_fraction)
    info: dict = {}
    with _threads(threads):
        policy_dir = cache / f"policy-{spec.key(('sampler', 'policy'))}"
        with _stage(cache, policy_dir.name) as tmp:
            if tmp is not None:
                build_policy_stage(spec, tmp, log)
        info["sft"] = json.loads((policy_dir / "sft.json").read_text())

        pairs_dir = cache / f"pairs-{spec.key(('sampler', 'policy', 'oracle', 'pairs'))}"
        with _stage(cache, pairs_dir.name) as tmp:
            if tmp is not None:
                build_pairs_stage(spec, policy_dir, tmp, log)
        info["pairs"] = json.loads((pairs_dir / "pairs.json").read_text())

        models_dir = cache / f"models-{spec.key(('sampler', 'policy', 'oracle', 'pairs', 'preference_models'))}"
        if preference_models:
            backbone_spec = spec.preference_models.gpm_backbone(spec.policy)
            backbone_dir = None
            if backbone_spec is not None:  # the GPM's own, larger LM: SFT-ed like the policy, cached the same way
                backbone_world = dataclasses.replace(spec, policy=backbone_spec)
                backbone_dir = cache / f"policy-{backbone_world.key(('sampler', 'policy'))}"
                with _stage(cache, backbone_dir.name) as tmp:
                    if tmp is not None:
                        build_policy_stage(backbone_world, tmp, log)
            with _stage(cache, models_dir.name) as tmp:
                if tmp is not None:
                    train_world_preference_models(spec, policy_dir, pairs_dir, tmp, log, backbone_dir)
        have_models = (models_dir / "DONE").exists()
        if have_models:
            info["models"] = json.loads((models_dir / "models.json").read_text())

    root = cache / f"world-{spec.key()}"
    with _stage(cache, root.name) as tmp:
        if tmp is not None:
            _write_prompts(tmp / "prompts_train.jsonl", train)
            _write_prompts(tmp / "prompts_heldout.jsonl", heldout)
            _write_json(tmp / "world.json", {"spec": spec.to_dict(), "key": spec.key(), "policy": policy_dir.name,
                                            "pairs": pairs_dir.name, "models": models_dir.name})
    return World(
        spec=spec,
        root=root,
        policy_dir=policy_dir,
        pairs_train=pairs_dir / "train.jsonl",
        pairs_heldout=pairs_dir / "heldout.jsonl",
        gpm_dir=models_dir / "gpm" if have_models else None,
        bt_dir=models_dir / "bt" if have_models and (models_dir / "bt").exists() else None,
        prompts_train_file=root / "prompts_train.jsonl",
        prompts_heldout_file=root / "prompts_heldout.jsonl",
        train_prompts=tuple(train),
        heldout_prompts=tuple(heldout),
        info=info,
    )
