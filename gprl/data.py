"""Prompts for RL: JSONL (`prompt` text or chat `messages`), a `datasets` dataset, or the synthetic world.

The sampler's order is a pure function of (seed, epoch, cursor), so a resumed run sees the same prompts.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any, Sequence

from gprl.config import DataSpec
from gprl.gpm.data import DataError, jsonl_records, load_hf


def _prompt_of(rec: Any, where: str, spec: DataSpec, tokenizer, chat: bool) -> str:
    if not isinstance(rec, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    messages = rec.get(spec.messages_field)
    if messages is not None:
        if not isinstance(messages, list) or not all(isinstance(m, dict) and {"role", "content"} <= m.keys() for m in messages):
            raise DataError(f"{where}: field `{spec.messages_field}` must be a list of {{role, content}} messages")
        if chat and getattr(tokenizer, "chat_template", None):
            return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return "\n".join(f"{m['role']}: {m['content']}" for m in messages)
    text = rec.get(spec.prompt_field)
    if not isinstance(text, str) or not text.strip():
        raise DataError(
            f"{where}: needs a non-empty string field `{spec.prompt_field}` or a `{spec.messages_field}` list "
            f"(set data.promptField / data.messagesField if yours are named differently)"
        )
    if chat and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)
    return text


def load_prompts(spec: DataSpec, tokenizer=None, chat_template: bool = True, world_prompts: Sequence[str] | None = None) -> list[str]:
    source = spec.prompts
    if source.startswith("world:"):
        if world_prompts is None:
            raise DataError(f"data.prompts: {source!r} needs the synthetic world (model.policy world:policy)")
        return list(world_prompts)
    if source.startswith("hf:"):
        ds = load_hf(source[3:], spec.split)
        return [_prompt_of(r, f"{source}[{spec.split}] row {i}", spec, tokenizer, chat_template) for i, r in enumerate(ds)]
    if not Path(source).exists():
        raise DataError(f"data.prompts: no such file {source} (a JSONL path, hf:<dataset>, or world:prompts)")
    prompts = [_prompt_of(rec, where, spec, tokenizer, chat_template) for where, rec in jsonl_records(source)]
    if not prompts:
        raise DataError(f"{source}: no prompts in the file")
    return prompts


class PromptSampler:
    """Epochs of seeded permutations; `state_dict` is (epoch, cursor)."""

    def __init__(self, prompts: Sequence[str], seed: int, shuffle: bool = True):
        self.prompts = list(prompts)
        self.seed, self.shuffle = seed, shuffle
        self.epoch, self.cursor = 0, 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> list[int]:
        order = list(range(len(self.prompts)))
        if self.shuffle:
            random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
        return order

    def next(self, n: int) -> list[str]:
        out = []
        while len(out) < n:
            if self.cursor >= len(self._order):
                self.epoch, self.cursor = self.epoch + 1, 0
                self._order = self._permutation(self.epoch)
            out.append(self.prompts[self._order[self.cursor]])
            self.cursor += 1
        return out

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.cursor = state["epoch"], state["cursor"]
        self._order = self._permutation(self.epoch)
