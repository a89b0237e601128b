"""Resolve a run's model and prompt sources.

A model source (`model.policy`, `model.reference`, `gpm.path`, `gpm train --backbone`) is one of

- a local Hugging Face model folder;
- a hub id, `org/name` or `org/name@revision`, resolved through the Hugging Face cache (`HF_HOME`, `HF_HUB_CACHE`). In
  offline mode (`HF_HUB_OFFLINE=1`) only the cache is read, and a model missing from it is an error that says so;
  online, a missing model is downloaded into the cache (and logged);
- `<scheme>:<name>`, served by a *source provider* that stands beside the product.

Source providers are the hook through which something beside the product (the synthetic world, `gprl_world`) offers
models, prompt sets, a ground-truth judge and its text convention, without the product importing it. A provider
registers a factory under the `gprl.sources` entry-point group, named by its scheme:

    [project.entry-points."gprl.sources"]
    world = "gprl_world.hook:provider"

or calls `register_provider("world", factory)`. The factory is called once per process, on the first use of its scheme,
with a log callback, and returns a `SourceProvider`.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, Callable, Mapping, Protocol, Sequence

from gprl.config import ConfigError, RunSpec

ENTRY_POINT_GROUP = "gprl.sources"


def cache_dir() -> Path:
    return Path(os.environ.get("GPRL_CACHE", Path.home() / ".cache" / "gprl"))


class SourceError(ValueError):
    """A source that cannot be resolved; the message names the field and the fix."""


# ---------------------------------------------------------------------------------------------- the provider hook


class Judge(Protocol):
    """Ground truth beside the GPM (the synthetic world's oracle)."""

    def batch_stats(self, prompts: Sequence[str], responses: Sequence[str]) -> dict[str, Any]:
        """Statistics of a batch logged beside the step record (e.g. per-axis truth, an exploit count)."""

    def win_rate(self, prompts: Sequence[str], a: Sequence[str], b: Sequence[str]) -> float:
        """True mean P(a ≻ b | x)."""


class SourceProvider(Protocol):
    models: Mapping[str, str]  # name -> local model folder
    prompt_sets: Mapping[str, tuple[Sequence[str], Sequence[str]]]  # name -> (train, held-out) prompts
    judge: Judge | None  # ground truth for runs on the provider's prompts

    def text(self, response: str) -> str:
        """The text convention of the provider's policies: what their GPM was trained to read."""


_factories: dict[str, Callable[..., SourceProvider]] = {}
_providers: dict[str, SourceProvider] = {}


def register_provider(scheme: str, factory: Callable[..., SourceProvider]) -> None:
    """Make `<scheme>:<name>` sources resolvable; `factory(log=...)` builds the provider on first use."""
    _factories[scheme] = factory
    _providers.pop(scheme, None)


def provider(scheme: str, log: Callable[[str], None] = print) -> SourceProvider:
    if scheme not in _providers:
        factory = _factories.get(scheme)
        if factory is None:
            found = {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}
            if scheme not in found:
                raise SourceError(
                    f"no source provider for `{scheme}:` sources (known: {sorted(found) or 'none'}); "
                    f"`world:` comes with the gprl_world package of this repository (pip install -e .)"
                )
            factory = found[scheme].load()
        _providers[scheme] = factory(log=log)
    return _providers[scheme]


def _scheme(value: str) -> str | None:
    """The provider scheme of a source (`world:policy` -> `world`); None for paths and hub ids."""
    m = re.fullmatch(r"([a-z][a-z0-9_]*):(?!//)(.+)", value)
    return m.group(1) if m and m.group(1) not in ("hf",) and not Path(value).exists() else None


# ---------------------------------------------------------------------------------------------- models

_HUB_ID = re.compile(r"(?:[A-Za-z0-9][\w.-]*/)?[A-Za-z0-9][\w.-]*(?:@[\w./-]+)?")


def offline() -> bool:
    """HF_HUB_OFFLINE as set now (huggingface_hub reads it once, at import)."""
    value = os.environ.get("HF_HUB_OFFLINE")
    if value is not None:
        return value.strip().upper() in ("1", "ON", "YES", "TRUE")
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def hub_cache() -> str:
    """The Hugging Face hub cache as set now: HF_HUB_CACHE, else HF_HOME/hub, else huggingface_hub's default."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return os.path.join(os.environ["HF_HOME"], "hub")
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE


def hub_snapshot(repo_id: str, field: str, log: Callable[[str], None] = print, repo_type: str = "model") -> str:
    """Local folder of a hub repo (`org/name[@revision]`) from the Hugging Face cache, downloading it when online."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    name, _, revision = repo_id.partition("@")
    cache = hub_cache()
    where = f"the Hugging Face cache ({cache})"
    if offline():
        try:
            return snapshot_download(name, revision=revision or None, repo_type=repo_type, local_files_only=True,
                                     cache_dir=cache)
        except (LocalEntryNotFoundError, FileNotFoundError, ValueError):
            raise SourceError(
                f"{field}: {repo_id!r} is not a local folder, and as a hub id it is not in {where}; offline mode is on "
                f"(HF_HUB_OFFLINE=1), so nothing is downloaded. Download it where there is network "
                f"(`hf download {name}`) into that cache, or give a local folder"
            ) from None
    log(f"{field}: resolving hub id {repo_id} through {where} (downloads what is missing)")
    try:
        return snapshot_download(name, revision=revision or None, repo_type=repo_type, cache_dir=cache)
    except Exception as exc:  # network, authentication, unknown repo: one line, not a traceback
        raise SourceError(
            f"{field}: could not fetch {repo_id!r} from the hub ({type(exc).__name__}: {str(exc).splitlines()[0]}); "
            f"check the id and the network, or set HF_HUB_OFFLINE=1 to use only {where}"
        ) from None


def resolve_model(value: str, field: str, log: Callable[[str], None] = print) -> str:
    """A model source -> a local folder (see the module docstring)."""
    if value.startswith(("hf://", "pvc://")):  # the cluster's spelling (docs/recipes.md): hf:// is a hub id here too
        from gprl.api.pods import parse_source

        src = parse_source(value, field)
        if src.kind == "pvc":
            raise SourceError(f"{field}: {value} names a PersistentVolumeClaim, which only a GPRLRun can mount; "
                              "outside Kubernetes give the folder itself")
        value = src.repo + (f"@{src.revision}" if src.revision else "")
    scheme = _scheme(value)
    if scheme is not None:
        models = provider(scheme, log).models
        name = value.split(":", 1)[1]
        if name not in models:
            raise SourceError(f"{field}: unknown source {value!r}; {scheme}: offers {sorted(f'{scheme}:{m}' for m in models)}")
        return models[name]
    path = Path(value).expanduser()
    if path.is_dir():
        return str(path)
    if path.exists():
        raise SourceError(f"{field}: {value} is a file; give a model folder or a hub id (org/name)")
    if value.startswith((".", "/", "~")) or value.count("/") > 1 or not _HUB_ID.fullmatch(value):
        raise SourceError(f"{field}: no such folder {value}")
    return hub_snapshot(value, field, log)


# ---------------------------------------------------------------------------------------------- a run's sources


@dataclass
class Sources:
    policy: str
    reference: str
    gpm: str | None
    train_prompts: list[str] | None = None  # prompts from a provider (None: read data.prompts)
    heldout_prompts: list[str] | None = None
    oracle: Judge | None = None  # ground truth, for runs on a provider's prompts
    text: Callable[[str], str] | None = None  # the policy's text convention (None: text exactly as generated)


REQUIRED = {
    "model.policy": "the policy to train: a Hugging Face model folder or hub id (org/name)",
    "gpm.path": "the General Preference Model: a folder or hub id (or gpm.serverUrl for a scoring server)",
    "data.prompts": "the prompts: a JSONL/JSON/parquet file or folder, a save_to_disk folder, or hf:<dataset>",
}


def missing_sources(spec: RunSpec) -> list[str]:
    """One line per source a run needs and its config leaves unset. The synthetic world is never a default: it is
    asked for by name (`world:policy`, `world:gpm`, `world:prompts`) or by `gprl demo`."""
    have = {"model.policy": spec.model.policy, "gpm.path": spec.gpm.path or spec.gpm.server_url,
            "data.prompts": spec.data.prompts}
    return [f"{field}: required — {what}" for field, what in REQUIRED.items() if not have[field]]


def resolve_sources(spec: RunSpec, log: Callable[[str], None] = print) -> Sources:
    missing = missing_sources(spec)
    if missing:
        raise ConfigError(missing + ["(the synthetic world's are world:policy, world:gpm and world:prompts; "
                                     "`gprl demo` runs it)"])
    policy = resolve_model(spec.model.policy, "model.policy", log)
    reference = resolve_model(spec.model.reference, "model.reference", log) if spec.model.reference else policy
    gpm = resolve_model(spec.gpm.path, "gpm.path", log) if spec.gpm.path else None
    policy_scheme = _scheme(spec.model.policy)
    text = provider(policy_scheme, log).text if policy_scheme else None
    train = heldout = oracle = None
    scheme = _scheme(spec.data.prompts)
    if scheme is not None:
        p = provider(scheme, log)
        name = spec.data.prompts.split(":", 1)[1]
        if name not in p.prompt_sets:
            raise SourceError(f"data.prompts: unknown source {spec.data.prompts!r}; "
                              f"{scheme}: offers {sorted(f'{scheme}:{m}' for m in p.prompt_sets)}")
        train, heldout = (list(x) for x in p.prompt_sets[name])
        oracle = p.judge
    return Sources(policy, reference, gpm, train, heldout, oracle, text)
