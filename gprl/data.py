"""Prompts for RL: rows of a JSONL, JSON or parquet file or folder, a `datasets` dataset, or a source provider's set.

A row holds `prompt` text, chat `messages`, or TRL's conversational layout (`prompt` as a list of {role, content}).
Chat prompts go through the policy tokenizer's chat template (with the generation prompt); text is never otherwise
changed — whitespace and newlines are content. The sampler's order is a pure function of (seed, epoch, cursor), so a
resumed run sees the same prompts.
"""

from __future__ import annotations

import random
from typing import Any, Sequence

from gprl.config import DataSpec
from gprl.gpm.data import DataError, records

# A prompt more characters than this many times data.maxPromptTokens is refused before tokenizing it (no tokenizer
# averages more characters per token; a runaway line would otherwise stall the run).
MAX_CHARS_PER_TOKEN = 64


def _is_messages(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(
        isinstance(m, dict) and {"role", "content"} <= m.keys() for m in value)


def _prompt_of(rec: Any, where: str, spec: DataSpec, tokenizer, chat: bool) -> str:
    if not isinstance(rec, dict):
        raise DataError(f"{where}: expected an object, got {type(rec).__name__}")
    messages = rec.get(spec.messages_field)
    if messages is None and isinstance(rec.get(spec.prompt_field), list):
        messages = rec[spec.prompt_field]  # TRL's conversational rows: `prompt` is the message list
    if messages is not None:
        if not _is_messages(messages):
            raise DataError(f"{where}: chat messages must be a non-empty list of {{role, content}} objects")
        if chat and getattr(tokenizer, "chat_template", None):
            return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return "\n".join(f"{m['role']}: {m['content']}" for m in messages)
    text = rec.get(spec.prompt_field)
    if not isinstance(text, str) or not text.strip():
        raise DataError(
            f"{where}: needs a non-empty string field `{spec.prompt_field}`, a `{spec.messages_field}` list or a "
            f"conversational `{spec.prompt_field}` list (set data.promptField / data.messagesField if yours are "
            f"named differently)"
        )
    if chat and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)
    return text


def load_prompts(spec: DataSpec, tokenizer=None, chat_template: bool = True, provided: Sequence[str] | None = None,
                 log=print, max_new_tokens: int = 0, context: int | None = None) -> list[str]:
    """The prompts of data.prompts (or `provided`, a source provider's set). With a tokenizer, prompts longer than
    data.maxPromptTokens are reported (they are left-truncated), and with a `context` the longest prompt plus
    `max_new_tokens` must fit it."""
    limit = spec.max_prompt_tokens * MAX_CHARS_PER_TOKEN
    prompts, places = [], []
    rows = ((f"{spec.prompts}[{i}]", {spec.prompt_field: p}) for i, p in enumerate(provided or ())) \
        if provided is not None else records(spec.prompts, spec.split)
    for where, rec in rows:
        if provided is not None:
            prompts.append(rec[spec.prompt_field])
            places.append(where)
            continue
        text = _prompt_of(rec, where, spec, tokenizer, chat_template)
        if len(text) > limit:
            raise DataError(f"{where}: the prompt is {len(text):,} characters, far past data.maxPromptTokens "
                            f"({spec.max_prompt_tokens} tokens); shorten or drop the row")
        prompts.append(text)
        places.append(where)
    if not prompts:
        raise DataError(f"{spec.prompts}: no prompts in it")
    if tokenizer is not None:
        lengths = [len(ids) for ids in tokenizer(prompts, add_special_tokens=False)["input_ids"]]
        over = [i for i, n in enumerate(lengths) if n > spec.max_prompt_tokens]
        if over:
            log(f"warning: {len(over)} of {len(prompts)} prompts are longer than data.maxPromptTokens "
                f"({spec.max_prompt_tokens}) and are left-truncated (first: {places[over[0]]}, {lengths[over[0]]} tokens)")
        longest = max(range(len(prompts)), key=lengths.__getitem__)
        need = min(lengths[longest], spec.max_prompt_tokens) + max_new_tokens
        if context is not None and need > context:
            raise DataError(
                f"{places[longest]}: this prompt ({min(lengths[longest], spec.max_prompt_tokens)} tokens, after "
                f"data.maxPromptTokens) + rollout.maxNewTokens ({max_new_tokens}) = {need} exceeds the policy's context "
                f"of {context} tokens; lower data.maxPromptTokens or rollout.maxNewTokens"
            )
    return prompts


def context_length(config) -> int | None:
    """The longest sequence the model takes, from its config (None when it does not say)."""
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


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
