"""The world's side of the product's source-provider hook (`gprl.sources`, see gprl/sources.py).

Registered in pyproject.toml under the `gprl.sources` entry points as `world`, so `world:policy`, `world:gpm`,
`world:bt` and `world:prompts` resolve to the locally built (and cached) world, runs on the world's prompts get the
oracle's statistics beside every step and evaluation, and the world's policy text is put in the word-level convention
its GPM was trained on. The product never imports this package.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

from .build import build_world
from .oracle import Oracle, axis_means
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


class WorldSources:
    """The built world as a `SourceProvider`."""

    def __init__(self, log: Callable[[str], None] = print):
        from gprl.sources import cache_dir

        world = build_world(cache_dir=cache_dir() / "world", seed=0, log=log)
        self.models = {"policy": str(world.policy_dir), "gpm": str(world.gpm_dir), "bt": str(world.bt_dir)}
        self.prompt_sets = {"prompts": (list(world.train_prompts), list(world.heldout_prompts))}
        self.judge = WorldJudge(Oracle(world.spec.oracle))

    @staticmethod
    def text(response: str) -> str:
        """Words separated by single spaces: the word-level tokenizer's text, as the world's GPM was trained on it."""
        return " ".join(response.split())


def provider(log: Callable[[str], None] = print) -> WorldSources:
    return WorldSources(log=log)
