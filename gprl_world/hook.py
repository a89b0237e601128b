"""The world's side of the product's source-provider hook (`gprl.sources`, see gprl/sources.py).

Registered in pyproject.toml under the `gprl.sources` entry points as `world`, so `world:policy`, `world:gpm`,
`world:bt` and `world:prompts` resolve to the locally built (and cached) world, runs on the world's prompts get the
oracle's statistics beside every step and evaluation, and the world's policy text is put in the word-level convention
its GPM was trained on. The product never imports this package.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Callable, Iterator, Sequence

from .build import build_world
from .oracle import Oracle, axis_means
from .spec import GPM_RECIPES, recipe_spec
from .oracle import win_rate as oracle_win_rate


class WorldJudge:
    """The oracle as the product's `Judge`: per-axis truth and the exploit count of a batch, and the true win rate."""

    def __init__(self, oracle: Oracle):
        self.oracle = oracle

    def batch_stats(self, prompts: Sequence[str], responses: Sequence[str]) -> dict[str, Any]:
        exploit = sum(self.oracle.exploit_metric(p, r) for p, r in zip(prompts, responses)) / len(prompts)
        return {"oracle_axes": axis_means(self.oracle, prompts, responses), "exploit": exploit}

    def win_rate(self, prompts: Sequence[str], a: Sequence[str], b: Sequence[str]) -> float:
        return float(oracle_win_rate(self.oracle, prompts, a, b))


class _Models(Mapping):
    """The world's models by name: policy, gpm, bt, and the GPMs of other recipes (spec.GPM_RECIPES), each of
    those built only when a run asks for it (minutes, then cached)."""

    def __init__(self, built: dict[str, str], cache, log: Callable[[str], None], seed: int = 0):
        self._built, self._cache, self._log, self._seed = dict(built), cache, log, seed

    def __getitem__(self, name: str) -> str:
        if name not in self._built:
            if name not in GPM_RECIPES:
                raise KeyError(name)
            world = build_world(cache_dir=self._cache, seed=self._seed, spec=recipe_spec(name), log=self._log)
            self._built[name] = str(world.gpm_dir)
        return self._built[name]

    def __contains__(self, name: object) -> bool:  # without building (Mapping's default would)
        return name in self._built or name in GPM_RECIPES

    def __iter__(self) -> Iterator[str]:
        return iter(dict.fromkeys([*self._built, *GPM_RECIPES]))

    def __len__(self) -> int:
        return len(set(self._built) | set(GPM_RECIPES))


class WorldSources:
    """The built world as a `SourceProvider`. `seed` draws another world (its own SFT policy, pairs, models and
    prompt split; the same oracle): `register_provider("world", lambda log: WorldSources(log, seed=1))` makes a
    process's `world:` sources that draw."""

    def __init__(self, log: Callable[[str], None] = print, seed: int = 0):
        from gprl.sources import cache_dir

        world = build_world(cache_dir=cache_dir() / "world", seed=seed, log=log)
        self.models = _Models({"policy": str(world.policy_dir), "gpm": str(world.gpm_dir), "bt": str(world.bt_dir)},
                              cache_dir() / "world", log, seed)
        self.prompt_sets = {"prompts": (list(world.train_prompts), list(world.heldout_prompts))}
        self.judge = WorldJudge(Oracle(world.spec.oracle))

    @staticmethod
    def text(response: str) -> str:
        """Words separated by single spaces: the word-level tokenizer's text, as the world's GPM was trained on it."""
        return " ".join(response.split())


def provider(log: Callable[[str], None] = print) -> WorldSources:
    return WorldSources(log=log)
