"""What keeps a run folder safe: atomic checkpoint folders with a manifest, pickle-free trainer state, the
output-folder lock and the clean-up of what a killed writer left behind.

A checkpoint folder is valid when its `manifest.json` (written last, after every other file was fsynced) lists
each file with its size and SHA-256 and the files match. The folder is renamed into place only after that, so a
kill at any moment leaves either the old set of checkpoints or the new one, plus at most a temp folder that the
next start removes.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Any, Iterator

MANIFEST = "manifest.json"
TEMP_MARKERS = (".tmp-", ".partial", ".old-")  # names of what an interrupted writer leaves (see atomic_dir)


class OutputFolderError(ValueError):
    """The output folder cannot be used as asked (locked, holds another run, not writable): a user error."""


class InvalidCheckpoint(ValueError):
    pass


# ------------------------------------------------------------------ atomic folders and manifests


def _fsync_tree(folder: Path) -> None:
    for f in folder.rglob("*"):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_manifest(folder: Path) -> None:
    """List every file of `folder` with size and SHA-256; fsync the files first and the manifest last."""
    _fsync_tree(folder)
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)
    entries = {str(p.relative_to(folder)): {"bytes": p.stat().st_size, "sha256": _sha256(p)} for p in files}
    with open(folder / MANIFEST, "w") as fh:
        json.dump({"format": 1, "files": entries}, fh, indent=1)
        fh.flush()
        os.fsync(fh.fileno())


def verify_manifest(folder: Path) -> None:
    """Raise InvalidCheckpoint saying what is wrong unless every file of the manifest is there, whole."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        entries = manifest["files"]
    except FileNotFoundError:
        if (folder / "trainer_state.pt").exists():
            raise InvalidCheckpoint(
                "written by an earlier version, with a pickled trainer state; it is not loaded (unpickling can run "
                "code): resume it with the version that wrote it, or start a new output.dir"
            ) from None
        raise InvalidCheckpoint("no manifest.json (written last: the writer did not finish)") from None
    except (ValueError, KeyError, TypeError) as exc:
        raise InvalidCheckpoint(f"unreadable manifest.json ({exc})") from None
    for name, meta in entries.items():
        f = folder / name
        if not f.is_file():
            raise InvalidCheckpoint(f"{name} is missing")
        if f.stat().st_size != meta["bytes"]:
            raise InvalidCheckpoint(f"{name} has {f.stat().st_size} bytes, the manifest says {meta['bytes']}")
        if _sha256(f) != meta["sha256"]:
            raise InvalidCheckpoint(f"{name} does not match its checksum")


def publish(tmp: Path, path: Path) -> None:
    """Write tmp's manifest and rename tmp to path, replacing a folder already there."""
    write_manifest(tmp)
    if path.exists():
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, path)
    _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike):
    """Yield a temp folder beside `path`; on success it gets a manifest and replaces `path` by rename, else it is
    removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.tmp-"))
    try:
        yield tmp
        publish(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def remove_stale_temps(folder: Path) -> list[Path]:
    """Remove the temp folders and files an interrupted writer left in `folder` (not recursive). Only call it
    while holding the folder's lock: then no writer is running."""
    removed = []
    if not folder.is_dir():
        return removed
    for p in folder.iterdir():
        if p.name.startswith(".") and any(m in p.name for m in TEMP_MARKERS):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
            removed.append(p)
    return removed


# ------------------------------------------------------------------ pickle-free state


def encode_state(state: Any) -> tuple[Any, dict]:
    """Split a nested state (dicts, lists, tuples, numbers, strings, tensors) into a JSON-able tree and a flat
    dict of tensors for safetensors. Loading it back runs no code (unlike a pickle). Returns (tree, tensors)."""
    import torch

    tensors: dict[str, torch.Tensor] = {}

    def enc(x: Any) -> Any:
        if isinstance(x, torch.Tensor):
            key = f"t{len(tensors)}"
            tensors[key] = x.detach().cpu().contiguous().clone()
            return {"__tensor__": key}
        if isinstance(x, dict):
            if all(isinstance(k, str) for k in x) and "__tensor__" not in x:
                return {k: enc(v) for k, v in x.items()}
            return {"__items__": [[enc(k), enc(v)] for k, v in x.items()]}
        if isinstance(x, tuple):
            return {"__tuple__": [enc(v) for v in x]}
        if isinstance(x, list):
            return [enc(v) for v in x]
        if x is None or isinstance(x, (bool, int, float, str)):
            return x
        raise TypeError(f"cannot store a {type(x).__name__} in trainer state")

    return enc(state), tensors


def decode_state(tree: Any, tensors: dict) -> Any:
    def dec(x: Any) -> Any:
        if isinstance(x, dict):
            if "__tensor__" in x:
                return tensors[x["__tensor__"]]
            if "__tuple__" in x:
                return tuple(dec(v) for v in x["__tuple__"])
            if "__items__" in x:
                return {dec(k): dec(v) for k, v in x["__items__"]}
            return {k: dec(v) for k, v in x.items()}
        if isinstance(x, list):
            return [dec(v) for v in x]
        return x

    return dec(tree)


def save_state(state: Any, folder: Path, name: str) -> None:
    """`name`.json (structure and numbers) + `name`.safetensors (tensors)."""
    from safetensors.torch import save_file

    tree, tensors = encode_state(state)
    (folder / f"{name}.json").write_text(json.dumps(tree))
    save_file(tensors, str(folder / f"{name}.safetensors"))


def load_state(folder: Path, name: str) -> Any:
    from safetensors.torch import load_file

    tree = json.loads((folder / f"{name}.json").read_text())
    tensors = load_file(str(folder / f"{name}.safetensors"))
    return decode_state(tree, tensors)


# ------------------------------------------------------------------ the output-folder lock

LOCK_NAME = ".gprl.lock"


class OutputLock:
    """An exclusive flock on `<output>/.gprl.lock`, held for the life of the trainer. The kernel drops it when the
    process dies (even by SIGKILL), so a crashed run never leaves a stale lock. The file says who holds it. On
    network file systems without flock support the lock is advisory at best (documented)."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self._fh = None

    def acquire(self) -> "OutputLock":
        fh = open(self.path, "a+")
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "unknown process"
            fh.close()
            raise OutputFolderError(
                f"output.dir {self.folder} is in use by another trainer ({holder}; lock file {self.path}). "
                "Stop that run, or give this one another output.dir."
            ) from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()} on host {socket.gethostname()}\n")
        fh.flush()
        self._fh = fh
        return self

    def release(self) -> None:
        if self._fh is not None:
            fcntl.flock(self._fh.fileno(), fcntl.LOCK_UN)
            self._fh.close()
            self._fh = None


def checkpoint_folders(root: Path) -> Iterator[Path]:
    """Published checkpoint folders under root, newest first."""
    return iter(sorted((p for p in root.glob("step-*") if p.is_dir()), reverse=True))
