"""Checked weight commits: the versioned push protocol of a rollout server, whatever carries the tensors.

A push is a session: begin(version) -> stage(tensors)... -> commit. The server holds the model's manifest (every
parameter's name, shape and dtype, in Hugging Face checkpoint names) and accepts a commit only when

* the session is one it opened (its id is random and comes from begin, so only the caller that began can commit);
* the version moves forward (> the engine's), unless the learner says it resumed from an older checkpoint
  (`rewind`, sent on a learner process's first push only);
* every staged tensor is a manifest name, staged once, with the manifest's shape and dtype, and finite;
* the staged set is the whole manifest.

Every check runs before the engine is touched, so a refused push leaves the engine exactly on its previous weights
and version. A streamed push (`stream`, `rollout.weightSync.streamLoad`) instead feeds each checked tensor to the
engine as it arrives, so the transfer overlaps the engine's load; the store then keeps the last committed push's
tensors in host memory (one more copy of the model) and, when a streamed push fails part-way, reloads them: the
engine again ends exactly on its previous weights and version; the commit before last's tensors are the next
collective push's receive buffers. Sessions idle for longer than `ttl_s` expire and free their tensors; at most
`max_sessions` are open (a new one evicts the oldest). If the engine's own load raises after the checks passed, its
weights may be mixed: the store marks itself broken (generation answers 503, /readyz fails) until a later push
commits whole.
"""

from __future__ import annotations

import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping, Protocol

import torch


@dataclass(frozen=True)
class TensorSpec:
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n * torch.empty((), dtype=self.dtype).element_size()


def manifest_of(model: torch.nn.Module, dtype: torch.dtype | None = None) -> dict[str, TensorSpec]:
    """The manifest of a model's parameters (HF names, as `policy_weights` yields them), in `dtype` if given."""
    # ds_shape: a ZeRO-3 parameter's whole shape (its own tensor is this rank's partition)
    return {n: TensorSpec(tuple(getattr(p, "ds_shape", p.shape)), dtype or p.dtype)
            for n, p in model.named_parameters()}


def _finite(t: torch.Tensor) -> bool:
    """No NaN or infinity in `t`. A NaN or an infinity makes the sum non-finite, so a finite sum settles it in one
    reduction (25x faster than isfinite().all() on a CPU: no bool tensor of t's size); only a non-finite sum, which
    a finite tensor gives when the sum overflows, needs the element-wise check."""
    return bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all())


class WeightEngine(Protocol):
    version: int

    def load_weights(self, weights: Iterable, version: int) -> None:
        """Copy the (name, tensor) pairs into the engine's weights: the store reuses the tensors' memory later."""


class PushRejected(ValueError):
    """The push failed a check (422): the engine is untouched."""


class StaleVersion(ValueError):
    """The push's version does not move forward (409)."""

    def __init__(self, message: str, version: int):
        self.version = version
        super().__init__(message)


class UnknownSession(KeyError):
    """404: a session this server never opened, or one that expired (the server may have restarted)."""

    def __str__(self) -> str:
        return str(self.args[0])


@dataclass
class _Session:
    version: int
    rewind: bool
    transport: str
    t0: float
    touched: float
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    nbytes: int = 0


class WeightStore:
    def __init__(self, engine: WeightEngine, manifest: Mapping[str, TensorSpec], *, ttl_s: float = 300.0,
                 max_sessions: int = 2, metrics=None, clock: Callable[[], float] = time.monotonic,
                 stream_load: bool = False):
        if not manifest:
            raise ValueError("the weight manifest is empty")
        self.engine, self.manifest = engine, dict(manifest)
        self.ttl_s, self.max_sessions, self.metrics, self.clock = ttl_s, max_sessions, metrics, clock
        self.sessions: dict[str, _Session] = {}
        self.lock = threading.Lock()
        self.commit_lock = threading.Lock()  # one engine load at a time
        self.broken: str | None = None
        self.stream_load = stream_load
        # stream_load: the last committed push's tensors (on the CPU), what a failed streamed push reloads
        self.kept: dict[str, torch.Tensor] | None = None
        # stream_load: the commit before last's tensors, no longer needed, received into again: fresh buffers cost
        # page faults on every push (~0.17 s/GB here), and the peak (kept + incoming) stays two model copies
        self.spare: dict[str, torch.Tensor] = {}
        self.largest_tensor_bytes = max(s.nbytes for s in self.manifest.values())
        self.model_bytes = sum(s.nbytes for s in self.manifest.values())
        self._gauges()

    # -------------------------------------------------------------- sessions

    def begin(self, version: int, *, rewind: bool = False, transport: str = "http") -> str:
        if version < 0:
            raise PushRejected(f"version: {version} is negative")
        with self.lock:
            self._expire_locked()
            if version <= self.engine.version and not rewind and self.broken is None:
                raise StaleVersion(f"version: the engine is at {self.engine.version}; a push must move it forward "
                                   f"(got {version})", self.engine.version)
            while len(self.sessions) >= self.max_sessions:
                oldest = min(self.sessions, key=lambda s: self.sessions[s].touched)
                self._drop_locked(oldest)
            sid = secrets.token_hex(16)
            now = self.clock()
            self.sessions[sid] = _Session(version, rewind, transport, now, now)
            self._gauges()
            return sid

    def stage(self, session: str, tensors: Iterable[tuple[str, torch.Tensor]]) -> int:
        """Check and keep tensors for `session`; any bad tensor drops the whole session (PushRejected)."""
        with self.lock:
            sess = self._get_locked(session)
        count = 0
        try:
            for name, t in tensors:
                self._take(session, sess, name, t)
                count += 1
        except (PushRejected, UnknownSession):
            self.abort(session)
            raise
        with self.lock:
            self._gauges()
        return count

    def set_transport(self, session: str, transport: str) -> None:
        """What carries the session's tensors (a label of the sync metrics)."""
        with self.lock:
            self._get_locked(session).transport = transport

    def commit(self, session: str) -> dict:
        with self.lock:
            sess = self._get_locked(session)
            del self.sessions[session]  # whatever happens next, this session is over
            self._gauges()
        try:
            self._require_whole(sess)
        except PushRejected:
            self._count(sess, "rejected")
            raise
        transfer_s = self.clock() - sess.t0
        with self.commit_lock:
            if sess.version <= self.engine.version and not sess.rewind and self.broken is None:
                self._count(sess, "rejected")
                raise StaleVersion(f"version: the engine moved to {self.engine.version} during this push "
                                   f"(got {sess.version})", self.engine.version)
            previous = self.engine.version
            t0 = time.perf_counter()
            try:
                self.engine.load_weights(((n, sess.tensors[n]) for n in self.manifest), sess.version)
            except Exception as exc:
                self.broken = (f"the engine's load of version {sess.version} failed after version {previous} "
                               f"({type(exc).__name__}: {exc}); waiting for a complete push")
                self._count(sess, "failed")
                raise
            load_s = time.perf_counter() - t0
            self.broken = None
            self._keep(sess)
        return self._committed(sess, transfer_s, load_s)

    def can_stream(self) -> bool:
        """A push may stream into the engine: streaming is on and a whole, good version is kept to roll back to
        (the first push after a start, or after a failed load, is staged)."""
        return self.stream_load and self.kept is not None and self.broken is None

    def stream(self, session: str, incoming: Iterable[tuple[str, torch.Tensor]]) -> dict:
        """Load `session`'s tensors into the engine while they arrive. `incoming` yields the manifest's tensors,
        then returns once the learner commits (raising if it aborts or the transfer fails). Each tensor is checked
        before the engine sees it; any failure reloads the kept previous version and raises."""
        with self.lock:
            sess = self._get_locked(session)
        kept = self.kept
        if kept is None:
            raise PushRejected("no kept version to roll back to: this push must be staged")
        t0 = self.clock()
        transfer_s = 0.0

        def checked():
            nonlocal transfer_s
            for name, t in incoming:
                self._take(session, sess, name, t.to("cpu"))  # kept: the next rollback target, off the accelerator
                yield name, t
            transfer_s = self.clock() - t0
            self._require_whole(sess)

        try:
            with self.commit_lock:
                if sess.version <= self.engine.version and not sess.rewind:
                    raise StaleVersion(f"version: the engine moved to {self.engine.version} during this push "
                                       f"(got {sess.version})", self.engine.version)
                previous, l0 = self.engine.version, time.perf_counter()
                try:
                    self.engine.load_weights(checked(), sess.version)
                except Exception as exc:
                    self._roll_back(sess, kept, previous, exc)
                    if isinstance(exc, (PushRejected, StaleVersion, UnknownSession)):
                        raise
                    raise PushRejected(f"the push failed part-way ({type(exc).__name__}: {exc}); the engine "
                                       f"reloaded version {previous}") from exc
                load_s = time.perf_counter() - l0
                self._keep(sess)
        except (PushRejected, StaleVersion, UnknownSession):
            self._count(sess, "rejected")
            raise
        finally:
            self.abort(session)
        return {**self._committed(sess, transfer_s, load_s), "streamed": True}

    def _take(self, session: str, sess: _Session, name: str, t: torch.Tensor) -> None:
        """Check one tensor of `session` and hold it (PushRejected / UnknownSession otherwise)."""
        self._check(sess, name, t)
        with self.lock:
            if self.sessions.get(session) is not sess:
                raise UnknownSession(f"unknown weight session {session} (expired, aborted or superseded)")
            sess.tensors[name] = t
            sess.nbytes += t.numel() * t.element_size()
            sess.touched = self.clock()

    def _require_whole(self, sess: _Session) -> None:
        missing = [n for n in self.manifest if n not in sess.tensors]
        if missing:
            raise PushRejected(f"incomplete push: {len(missing)} of {len(self.manifest)} tensors missing "
                               f"(first: {', '.join(missing[:3])})")

    def _committed(self, sess: _Session, transfer_s: float, load_s: float) -> dict:
        self._count(sess, "ok")
        if self.metrics is not None:
            self.metrics.weight_version.set(self.engine.version)
            self.metrics.weight_sync.labels(transport=sess.transport, phase="transfer").observe(transfer_s)
            self.metrics.weight_sync.labels(transport=sess.transport, phase="load").observe(load_s)
        # a commit is whole: every manifest tensor (the session's own dict is cleared when it closes)
        return {"version": self.engine.version, "tensors": len(self.manifest), "transfer_seconds": transfer_s,
                "load_seconds": load_s}

    def _roll_back(self, sess: _Session, kept: Mapping[str, torch.Tensor], previous: int, exc: Exception) -> None:
        """The engine may hold part of the failed push: reload the kept version whole."""
        try:
            self.engine.load_weights(((n, kept[n]) for n in self.manifest), previous)
        except Exception as again:
            self.broken = (f"a streamed push of version {sess.version} failed ({type(exc).__name__}: {exc}) and "
                           f"reloading version {previous} failed too ({type(again).__name__}: {again}); waiting "
                           f"for a complete push")
            self.kept, self.spare = None, {}
            self._gauges()
            self._count(sess, "failed")
            raise again from exc

    def buffer(self, name: str, device: str = "cpu") -> torch.Tensor:
        """Where to receive tensor `name` of a collective push: a spare buffer of the commit before last when there
        is one, else new memory."""
        with self.lock:
            t = self.spare.pop(name, None) if device == "cpu" else None
        if t is not None:  # it passed the manifest's shape and dtype check when it was received
            return t
        spec = self.manifest[name]
        return torch.empty(spec.shape, dtype=spec.dtype, device=device)

    def _keep(self, sess: _Session) -> None:
        """After a commit: with streaming on, its tensors are the next rollback target, and the old ones the next
        push's receive buffers."""
        if self.stream_load:
            old, self.kept = self.kept, {n: t.to("cpu") for n, t in sess.tensors.items()}
            with self.lock:
                self.spare = dict(old or {})
            self._gauges()

    def abort(self, session: str) -> None:
        with self.lock:
            if session in self.sessions:
                self._drop_locked(session, expired=False)

    def expire(self) -> int:
        with self.lock:
            return self._expire_locked()

    def start_reaper(self) -> None:
        """Expire idle sessions in the background too, so an abandoned push frees its memory without a next call."""

        def loop():
            while True:
                time.sleep(max(0.05, self.ttl_s / 4))
                self.expire()

        threading.Thread(target=loop, name="weight-session-reaper", daemon=True).start()

    @property
    def staged_bytes(self) -> int:
        return sum(s.nbytes for s in self.sessions.values())

    # -------------------------------------------------------------- internals

    def _check(self, sess: _Session, name: str, t: torch.Tensor) -> None:
        spec = self.manifest.get(name)
        if spec is None:
            raise PushRejected(f"tensor {name!r} is not a parameter of this model")
        if name in sess.tensors:
            raise PushRejected(f"tensor {name!r} sent twice in one push")
        if tuple(t.shape) != spec.shape:
            raise PushRejected(f"tensor {name!r}: shape {tuple(t.shape)}, the model's is {spec.shape}")
        if t.dtype != spec.dtype:
            raise PushRejected(f"tensor {name!r}: dtype {t.dtype}, the engine's is {spec.dtype}")
        if t.is_floating_point() and not _finite(t):
            raise PushRejected(f"tensor {name!r} has NaN or infinite values")

    def _get_locked(self, session: str) -> _Session:
        self._expire_locked()
        sess = self.sessions.get(session)
        if sess is None:
            raise UnknownSession(f"unknown weight session {session} (begin first; it may have expired after "
                                 f"{self.ttl_s:.0f}s idle, or the server restarted)")
        sess.touched = self.clock()
        return sess

    def _expire_locked(self) -> int:
        now = self.clock()
        old = [s for s, v in self.sessions.items() if now - v.touched > self.ttl_s]
        for s in old:
            self._drop_locked(s)
        return len(old)

    def _drop_locked(self, session: str, expired: bool = True) -> None:
        sess = self.sessions.pop(session)
        sess.tensors.clear()
        if expired and self.metrics is not None:
            self.metrics.weight_sessions_expired.inc()
        self._gauges()

    def _gauges(self) -> None:
        if self.metrics is not None:
            self.metrics.weight_sessions.set(len(self.sessions))
            self.metrics.weight_staged_bytes.set(self.staged_bytes)
            self.metrics.weight_kept_bytes.set((self.model_bytes if self.kept is not None else 0)
                                               + sum(t.numel() * t.element_size() for t in list(self.spare.values())))
            self.metrics.weight_version.set(self.engine.version)

    def _count(self, sess: _Session, result: str) -> None:
        if self.metrics is not None:
            self.metrics.weight_commits.labels(transport=sess.transport, result=result).inc()
