"""Preference pairs (and the row readers of every data source): JSONL, JSON, parquet, folders, `datasets`.

A line holds `prompt`, `chosen`, `rejected` (text) and optionally `prob`, the probability
that `chosen` is preferred (soft label, default 1), and `axis_probs`, one such probability per GPM axis
(per-aspect labels, as UltraFeedback's per-aspect ratings give; used by `train_gpm(axis_label_weight=...)`). Chat format is accepted too: `chosen` and
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
    # P(chosen ≻ rejected) on each aspect the GPM's axes should carry (axis l ↔ entry l); None: no per-aspect labels
    axis_probs: tuple[float, ...] | None = None


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
    axis_probs = rec.get("axis_probs")
    if axis_probs is not None:
        if not isinstance(axis_probs, list) or not axis_probs or not all(
            isinstance(x, (int, float)) and not isinstance(x, bool) and 0.0 <= x <= 1.0 for x in axis_probs
        ):
            raise DataError(f"{where}: field `axis_probs` must be a non-empty list of numbers in [0, 1], got {axis_probs!r}")
        axis_probs = tuple(float(x) for x in axis_probs)
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
        return PreferencePair(prompt, chosen[-1]["content"], rejected[-1]["content"], float(prob), axis_probs)
    for name in ("prompt", "chosen", "rejected"):
        if not isinstance(rec.get(name), str):
            raise DataError(f"{where}: field `{name}` must be a string, got {type(rec.get(name)).__name__}")
    return PreferencePair(rec["prompt"], chosen, rejected, float(prob), axis_probs)


def jsonl_records(path: str | os.PathLike) -> Iterator[tuple[str, Any]]:
    """(`file:line`, parsed object) for every non-blank line; a line that is not JSON stops with its place."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file")
    with open(path, "rb") as fh:  # bytes, decoded per line: a bad byte is reported at its own line
        for lineno, raw in enumerate(fh, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise DataError(f"{path}:{lineno}: not UTF-8 text; JSON Lines expected (parquet files need a "
                                f".parquet name)") from None
            if not line.strip():
                continue
            try:
                yield f"{path}:{lineno}", json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{lineno}: not valid JSON ({exc.msg}, column {exc.colno})") from None


DATA_FILES = (".jsonl", ".json", ".parquet")


def _json_records(path: Path) -> Iterator[tuple[str, Any]]:
    """A .json file: an array of objects (or {"data"|"rows": [...]}); JSON Lines under a .json name are read too."""
    text = path.read_text()
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        if exc.msg == "Extra data":  # one object per line (what `Dataset.to_json` writes)
            yield from jsonl_records(path)
            return
        raise DataError(f"{path}: not valid JSON ({exc.msg}, line {exc.lineno} column {exc.colno})") from None
    if isinstance(data, dict):
        rows = next((data[k] for k in ("data", "rows", "train") if isinstance(data.get(k), list)), None)
        if rows is None:
            raise DataError(f"{path}: a JSON file needs an array of objects (or an object with a `data` array)")
        data = rows
    if not isinstance(data, list):
        raise DataError(f"{path}: a JSON file needs an array of objects, got {type(data).__name__}")
    for i, rec in enumerate(data):
        yield f"{path}[{i}]", rec


def _parquet_records(path: Path) -> Iterator[tuple[str, Any]]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises several types for a damaged file
        raise DataError(f"{path}: not a readable parquet file ({type(exc).__name__}: {str(exc).splitlines()[0]})") from None
    for i, rec in enumerate(table.to_pylist()):
        yield f"{path} row {i}", rec


def _file_records(path: Path) -> Iterator[tuple[str, Any]]:
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return _parquet_records(path)
    if suffix == ".json":
        return _json_records(path)
    return jsonl_records(path)  # .jsonl, and any other name: JSON Lines


def load_hf(name: str, split: str):
    """A `datasets` dataset: a folder written by `save_to_disk`, or a hub dataset through `load_dataset` (the local
    cache only under HF_HUB_OFFLINE=1). Failures are one-line DataErrors, never a traceback."""
    import datasets

    path = Path(name)
    try:
        if path.is_dir() and ((path / "state.json").exists() or (path / "dataset_dict.json").exists()):
            ds = datasets.load_from_disk(str(path))
            if isinstance(ds, datasets.DatasetDict):
                if split not in ds:
                    raise DataError(f"hf:{name}: no split {split!r} (splits: {sorted(ds)}); set data.split")
                ds = ds[split]
            return ds
        return datasets.load_dataset(name, split=split)
    except DataError:
        raise
    except Exception as exc:  # offline cache misses, network errors, unknown names or splits
        from gprl.sources import offline

        why = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
        hint = ("offline mode is on (HF_HUB_OFFLINE=1): only datasets already in the Hugging Face cache load"
                if offline() else "check the name, the split and the network")
        raise DataError(f"hf:{name}: cannot load the dataset ({why}); {hint}") from None


def records(source: str, split: str = "train") -> Iterator[tuple[str, Any]]:
    """(place, record) of every row of a data source: `hf:<save_to_disk folder or hub dataset>`, a JSONL, JSON or
    parquet file, or a folder of such files (read in name order). `place` names the file and line or row."""
    if source.startswith("hf:"):
        ds = load_hf(source[3:], split)
        for i, rec in enumerate(ds):
            yield f"{source}[{split}] row {i}", rec
        return
    path = Path(source).expanduser()
    if path.is_dir():
        if (path / "state.json").exists() or (path / "dataset_dict.json").exists():
            yield from records(f"hf:{path}", split)
            return
        files = sorted(f for f in path.iterdir() if f.is_file() and f.suffix.lower() in DATA_FILES)
        if not files:
            raise DataError(f"{path}: a folder with no {'/'.join(DATA_FILES)} files and no save_to_disk dataset")
        for f in files:
            yield from _file_records(f)
        return
    if not path.exists():
        raise DataError(f"{source}: no such file or folder (a JSONL/JSON/parquet file, a folder of them, or hf:<dataset>)")
    yield from _file_records(path)


def load_pairs(source: str | os.PathLike, split: str = "train", chat_template=None) -> list[PreferencePair]:
    """Read pairs from a JSONL/JSON/parquet file or folder, or `hf:<name or path>` (see `records`)."""
    source = str(source)
    pairs = [pair_from_record(rec, where, chat_template) for where, rec in records(source, split)]
    if not pairs:
        raise DataError(f"{source}: no preference pairs in it")
    return pairs


def write_pairs(pairs: Iterable[PreferencePair], path: str | os.PathLike) -> None:
    from gprl.config import atomic_write_text

    atomic_write_text(Path(path), "".join(json.dumps(_record(p)) + "\n" for p in pairs))


def _record(pair: PreferencePair) -> dict:
    rec = asdict(pair)
    if rec["axis_probs"] is None:  # the plain four-field line of every other preference data set
        del rec["axis_probs"]
    else:
        rec["axis_probs"] = list(rec["axis_probs"])
    return rec
