"""Preference pairs from JSONL files or `datasets` datasets.

A line holds `prompt`, `chosen`, `rejected` (text) and optionally `prob`, the probability
that `chosen` is preferred (soft label, default 1). Chat format is accepted too: `chosen` and
`rejected` as message lists whose last message is the assistant's response, the earlier
messages being the prompt (the layout of UltraFeedback-binarized and HH-RLHF exports).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator


@dataclass(frozen=True)
class PreferencePair:
    prompt: str
    chosen: str
    rejected: str
    prob: float = 1.0


class DataError(ValueError):
    """A bad data line; the message names the file and line."""


def _render_messages(messages: list[dict], chat_template: Callable[[list[dict]], str] | None) -> str:
    if chat_template is not None:
        return chat_template(messages)
    return "\n".join(f"{m['role']}: {m['content']}" for m in messages)


def pair_from_record(rec: Any, where: str, chat_template: Callable[[list[dict]], str] | None = None) -> PreferencePair:
    """Validate one record; `where` (file:line) goes into every error message."""
    if not isinstance(rec, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    missing = [k for k in ("chosen", "rejected") if k not in rec]
    if missing:
        raise DataError(f"{where}: missing field(s) {missing}; each line needs prompt, chosen, rejected (and optional prob)")
    prob = rec.get("prob", 1.0)
    if not isinstance(prob, (int, float)) or isinstance(prob, bool) or not 0.0 <= prob <= 1.0:
        raise DataError(f"{where}: field `prob` must be a number in [0, 1], got {prob!r}")
    chosen, rejected = rec["chosen"], rec["rejected"]
    if isinstance(chosen, list) and isinstance(rejected, list):
        for name, msgs in (("chosen", chosen), ("rejected", rejected)):
            if not msgs or not all(isinstance(m, dict) and "role" in m and "content" in m for m in msgs):
                raise DataError(f"{where}: field `{name}` must be a non-empty list of {{role, content}} messages")
            if msgs[-1]["role"] != "assistant":
                raise DataError(f"{where}: the last message of `{name}` must have role 'assistant'")
        prompt = rec.get("prompt")
        if not isinstance(prompt, str):
            prompt = _render_messages(chosen[:-1], chat_template)
        return PreferencePair(prompt, chosen[-1]["content"], rejected[-1]["content"], float(prob))
    for name in ("prompt", "chosen", "rejected"):
        if not isinstance(rec.get(name), str):
            raise DataError(f"{where}: field `{name}` must be a string, got {type(rec.get(name)).__name__}")
    return PreferencePair(rec["prompt"], chosen, rejected, float(prob))


def jsonl_records(path: str | os.PathLike) -> Iterator[tuple[str, Any]]:
    """(`file:line`, parsed object) for every non-blank line; a line that is not JSON stops with its place."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file")
    with open(path) as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                yield f"{path}:{lineno}", json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{lineno}: not valid JSON ({exc.msg}, column {exc.colno})") from None


def load_hf(name: str, split: str):
    """A `datasets` dataset: a folder written by `save_to_disk`, or a name/path for `load_dataset`."""
    import datasets

    path = Path(name)
    if path.is_dir() and ((path / "state.json").exists() or (path / "dataset_dict.json").exists()):
        ds = datasets.load_from_disk(str(path))
        return ds[split] if isinstance(ds, datasets.DatasetDict) else ds
    return datasets.load_dataset(name, split=split)


def load_pairs(source: str | os.PathLike, split: str = "train", chat_template=None) -> list[PreferencePair]:
    """Read pairs from a JSONL path, or `hf:<name or path>` through `datasets.load_dataset`."""
    source = str(source)
    if source.startswith("hf:"):
        ds = load_hf(source[3:], split)
        return [pair_from_record(rec, f"{source}[{split}] row {i}", chat_template) for i, rec in enumerate(ds)]
    pairs = [pair_from_record(rec, where, chat_template) for where, rec in jsonl_records(source)]
    if not pairs:
        raise DataError(f"{source}: no preference pairs in the file")
    return pairs


def write_pairs(pairs: Iterable[PreferencePair], path: str | os.PathLike) -> None:
    from gprl.config import atomic_write_text

    atomic_write_text(Path(path), "".join(json.dumps(asdict(p)) + "\n" for p in pairs))
