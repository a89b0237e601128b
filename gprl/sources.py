"""Resolve a run's model and prompt sources: local folders, or `world:` artefacts built on demand."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from gprl.config import RunSpec


def cache_dir() -> Path:
    return Path(os.environ.get("GPRL_CACHE", Path.home() / ".cache" / "gprl"))


@dataclass
class Sources:
    policy: str
    reference: str
    gpm: str
    train_prompts: list[str] | None = None  # world prompts (None: read data.prompts)
    heldout_prompts: list[str] | None = None
    oracle: object | None = None  # the world's oracle, when running in the synthetic world

    def oracle_stats(self, prompts: Sequence[str], responses: Sequence[str]) -> dict:
        """Per-axis oracle means and the exploit metric of a batch (synthetic world only)."""
        from gprl.world import oracle as O

        means = O.axis_means(self.oracle, prompts, responses)
        exploit = sum(self.oracle.exploit_metric(p, r) for p, r in zip(prompts, responses)) / len(prompts)
        return {"oracle_axes": means, "exploit": exploit}


def _check_folder(value: str, field: str) -> str:
    if not Path(value).is_dir():
        raise FileNotFoundError(
            f"{field}: {value!r} is not a folder; give a local model folder (hub downloads are off) or a world: source"
        )
    return value


def resolve_sources(spec: RunSpec, log: Callable[[str], None] = print) -> Sources:
    uses_world = any(
        str(v).startswith("world:") for v in (spec.model.policy, spec.model.reference or "", spec.gpm.path, spec.data.prompts)
    )
    world = oracle = None
    if uses_world:
        from gprl.world import build_world
        from gprl.world.oracle import Oracle

        world = build_world(cache_dir=cache_dir() / "world", seed=0, log=log)
        oracle = Oracle(world.spec.oracle)

    def pick(value: str | None, field: str, world_map: dict[str, str]) -> str:
        if value is None:
            return None
        if value.startswith("world:"):
            if value not in world_map:
                raise ValueError(f"{field}: unknown world source {value!r}; use one of {sorted(world_map)}")
            return world_map[value]
        return _check_folder(value, field)

    models = {}
    if world is not None:
        models = {"world:policy": str(world.policy_dir), "world:gpm": str(world.gpm_dir), "world:bt": str(world.bt_dir)}
    policy = pick(spec.model.policy, "model.policy", {"world:policy": models.get("world:policy", "")})
    reference = pick(spec.model.reference, "model.reference", {"world:policy": models.get("world:policy", "")}) or policy
    gpm = pick(spec.gpm.path, "gpm.path", {k: v for k, v in models.items() if k != "world:policy"})
    train = heldout = None
    if spec.data.prompts.startswith("world:"):
        if spec.data.prompts != "world:prompts":
            raise ValueError(f"data.prompts: unknown world source {spec.data.prompts!r}; use world:prompts")
        train, heldout = list(world.train_prompts), list(world.heldout_prompts)
    return Sources(policy, reference, gpm, train, heldout, oracle if train is not None else None)
