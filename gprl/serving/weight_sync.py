"""Weight pushes over torch.distributed: the learner's rank 0 broadcasts the tensors to every rollout server at once.

The learner and the servers join a process group of their own, apart from the learner's training group (as TRL's
`vllm-serve` and OpenRLHF do): the learner hosts a TCPStore (`rollout.weightSync.port`), each server joins it when
asked over HTTP (`POST /weights/group`), and all build a ProcessGroupGloo on CPU (NCCL with tensors on GPUs) under
a random group id (a prefix of the store's keys). A push keeps the versioned, checked protocol of
gprl/serving/weights.py — HTTP carries begin, the "receive" signal and commit; only the tensors move over the group,
one broadcast per tensor in the manifest's order (the server knows every shape and dtype from its manifest, so no
metadata travels; the learner checks beforehand that its manifest is the server's, by digest). A tensor that fails
a check is still received (a collective must complete on every member) and the commit is refused; the engine stays
on its previous weights.

Membership changes re-form the group: a server that restarted reports another group id (or none) at begin, before
any tensor moves, and the learner forms a new group with every server under a new id (the store stays). HTTP
buckets remain the fallback (gprl/rollout/remote.py): for a server that cannot join, and for a push whose group
failed.
"""

from __future__ import annotations

import hashlib
import queue
import secrets
import threading
import time
from datetime import timedelta
from typing import Callable, Iterable, Mapping, Sequence

import torch
from fastapi import Query
from pydantic import BaseModel, ConfigDict, Field

from gprl.serving.weights import PushRejected, TensorSpec, WeightStore


def manifest_digest(manifest: Mapping[str, TensorSpec]) -> str:
    """Names, shapes and dtypes in order: equal digests mean a broadcast in this order lands on the same tensors."""
    h = hashlib.sha256()
    for name, spec in manifest.items():
        h.update(f"{name}:{tuple(spec.shape)}:{str(spec.dtype).removeprefix('torch.')};".encode())
    return h.hexdigest()[:32]


def _group(store, rank: int, size: int, backend: str, timeout_s: float):
    import torch.distributed as dist

    timeout = timedelta(seconds=timeout_s)
    if backend == "nccl":
        return dist.ProcessGroupNCCL(store, rank, size)
    return dist.ProcessGroupGloo(store, rank, size, timeout)


class CollectiveReceiver:
    """A rollout server's side: joins the learner's group and receives pushes into its WeightStore."""

    def __init__(self, store: WeightStore):
        self.store = store
        self.group = None
        self.group_id: str | None = None  # the group of the latest join (reported at begin, checked at receive)
        self.backend = "gloo"
        self._receiving: dict[str, list[threading.Thread]] = {}
        self._errors: dict[str, Exception] = {}  # why a session's push failed, raised at its commit
        self._commits: dict[str, threading.Event] = {}  # streamed sessions: set when the learner commits
        self._results: dict[str, dict] = {}
        self._joining: threading.Thread | None = None
        self.timeout_s = 60.0  # the group's: how long a collective (and a streamed load's wait for its commit) may take

    @property
    def _device(self) -> str:
        return "cuda" if self.backend == "nccl" else "cpu"

    def join(self, host: str, port: int, rank: int, world_size: int, group_id: str, backend: str = "gloo",
             timeout_s: float = 60.0) -> None:
        """Join in the background (the learner's rank 0 builds its side after asking every server). A new join
        replaces the previous group (the learner re-formed it after a member restarted)."""
        import torch.distributed as dist

        self.group, self.group_id, self.timeout_s = None, group_id, timeout_s

        def run():
            tcp = dist.TCPStore(host, port, is_master=False, timeout=timedelta(seconds=timeout_s))
            group = _group(dist.PrefixStore(group_id, tcp), rank, world_size, backend, timeout_s)
            if self.group_id == group_id:  # not superseded by a newer join meanwhile
                self.group, self.backend, self._tcp = group, backend, tcp  # the group keeps using the store

        self._joining = threading.Thread(target=run, name="weight-group-join", daemon=True)
        self._joining.start()

    def receive(self, session: str, group_id: str | None = None) -> None:
        """Start receiving the manifest's tensors for `session` (returns at once; commit waits for the end). With
        the store's streaming on, each tensor goes on into the engine's load while the next one arrives."""
        if self._joining is not None:
            self._joining.join()
        if self.group is None or (group_id is not None and group_id != self.group_id):
            raise PushRejected(f"not in weight-sync group {group_id}: POST /weights/group first")
        self._forget_finished()
        self.store.set_transport(session, "collective")
        if self.store.can_stream():
            self._receive_streaming(session)
            return
        group, device = self.group, self._device

        def run():
            bad = None
            for name in self.store.manifest:
                t = self.store.buffer(name, device)
                try:
                    group.broadcast(t, 0).wait()
                except Exception as exc:  # noqa: BLE001 - the group broke (the learner died): this push is over
                    self._errors[session] = PushRejected(f"weight-sync group failed: {exc}")
                    return
                if bad is None:
                    try:
                        self.store.stage(session, [(name, t)])
                    except Exception as exc:  # noqa: BLE001 - keep receiving: the broadcasts must all complete
                        bad = exc if isinstance(exc, PushRejected) else PushRejected(str(exc))
            if bad is not None:
                self._errors[session] = bad

        thread = threading.Thread(target=run, name=f"weight-receive-{session[:8]}", daemon=True)
        self._receiving[session] = [thread]
        thread.start()

    def _receive_streaming(self, session: str) -> None:
        """Two threads: one receives the broadcasts into a queue, the other feeds the queue to `store.stream`, so
        tensor i+1 crosses the wire while the engine loads tensor i. The receiver completes every broadcast even
        after the load gave up (a collective must complete on every member)."""
        group, device, timeout_s = self.group, self._device, self.timeout_s
        arrived: queue.Queue = queue.Queue()
        committed, gave_up = threading.Event(), threading.Event()
        self._commits[session] = committed

        def receive():
            for name in self.store.manifest:
                t = self.store.buffer(name, device)
                try:
                    group.broadcast(t, 0).wait()
                except Exception as exc:  # noqa: BLE001 - the group broke (the learner died): this push is over
                    arrived.put(PushRejected(f"weight-sync group failed: {exc}"))
                    return
                if not gave_up.is_set():
                    arrived.put(t)

        def incoming():
            for name in self.store.manifest:
                item = arrived.get()
                if isinstance(item, Exception):
                    raise item
                yield name, item
            # every tensor arrived: the load waits inside the engine for the learner's commit, which follows its last
            # broadcast at once. A learner that died in between breaks no collective, so the wait is bounded by the
            # group's timeout (not the session's idle expiry): generation resumes on the previous weights.
            deadline = time.monotonic() + timeout_s
            while not committed.wait(0.2):
                if session not in self.store.sessions:
                    raise PushRejected(f"weight session {session} aborted or expired before its commit")
                if time.monotonic() > deadline:
                    raise PushRejected(f"weight session {session}: no commit within the group's timeout "
                                       f"({timeout_s:.0f}s) after its last tensor; the previous weights were reloaded")

        def load():
            try:
                self._results[session] = self.store.stream(session, incoming())
            except Exception as exc:  # noqa: BLE001 - handed to the commit
                self._errors[session] = exc
            finally:
                gave_up.set()

        receiver = threading.Thread(target=receive, name=f"weight-receive-{session[:8]}", daemon=True)
        loader = threading.Thread(target=load, name=f"weight-load-{session[:8]}", daemon=True)
        self._receiving[session] = [loader, receiver]  # the load first: a commit must not wait on a stuck receive
        receiver.start()
        loader.start()

    def _forget_finished(self) -> None:
        """Drop what the receiver holds for sessions that ended without a commit (aborted, expired, or a learner
        that died), once their threads are done: a run that never commits must not grow the server."""
        for session in [s for s, threads in self._receiving.items()
                        if s not in self.store.sessions and not any(t.is_alive() for t in threads)]:
            self._receiving.pop(session, None)
            self._commits.pop(session, None)
            self._errors.pop(session, None)
            self._results.pop(session, None)

    def finish(self, session: str, timeout_s: float = 600.0) -> dict | None:
        """Before a commit: wait for the session's tensors; a refused tensor refuses the commit. A streamed push
        commits here (its answer is returned); a staged one returns None and commits in the store."""
        committed = self._commits.pop(session, None)
        if committed is not None:
            committed.set()
        for thread in self._receiving.pop(session, []):
            thread.join(timeout_s)  # the receiver too: its last broadcasts precede the next push's
        error = self._errors.pop(session, None)
        if error is not None:
            raise error
        return self._results.pop(session, None)


class Join(BaseModel):
    """POST /weights/group: where the learner's store is, this server's rank in the group, and the group's id."""

    model_config = ConfigDict(strict=True, extra="forbid")
    host: str = Field(max_length=253)
    port: int = Field(ge=1, le=65535)
    rank: int = Field(ge=1)
    world_size: int = Field(ge=2, le=1024)
    group: str = Field(min_length=8, max_length=64, pattern="^[0-9a-f]+$")
    backend: str = Field("gloo", pattern="^(gloo|nccl)$")
    timeout_seconds: float = Field(60.0, gt=0, le=3600)


def add_routes(app, store: WeightStore, receiver: CollectiveReceiver) -> None:
    """POST /weights/group {host, port, rank, world_size, group, backend}; POST /weights/receive?session=S&group=G."""
    from gprl.serving.app import HTTPError

    @app.post("/weights/group")
    def join(req: Join):
        if req.rank >= req.world_size:
            raise HTTPError(422, f"body.rank: {req.rank} not below world_size {req.world_size}")
        receiver.join(req.host, req.port, req.rank, req.world_size, req.group, req.backend, req.timeout_seconds)
        return {"ok": True, "manifest": manifest_digest(store.manifest)}

    @app.post("/weights/receive")
    def receive(session: str = Query(max_length=64), group: str | None = Query(None, max_length=64)):
        try:
            receiver.receive(session, group)
        except PushRejected as exc:
            raise HTTPError(422, str(exc)) from None
        return {"ok": True}


class GroupChanged(RuntimeError):
    """A member is not in the sender's group any more (it restarted): re-form the group before pushing."""


class CollectiveSender:
    """The learner's rank 0: hosts the group's store, asks the servers to join, broadcasts pushes.

    `form(urls, manifest)` (re-)forms the group and returns the servers that joined; then a push is
    `begin(version)` -> `send(tensor)` for each manifest tensor in order -> `commit()` (or `abort()`), or `push(...)`
    for all of it."""

    def __init__(self, headers: dict, host: str = "127.0.0.1", port: int = 0, backend: str = "gloo",
                 timeout_s: float = 60.0, log: Callable[[str], None] = print):
        import torch.distributed as dist

        self.headers, self.host, self.backend, self.timeout_s, self.log = headers, host, backend, timeout_s, log
        # the store outlives the groups: a re-formed group uses a new key prefix on it, and the port stays the same
        self.tcp = dist.TCPStore(host, port, is_master=True, wait_for_workers=False,
                                 timeout=timedelta(seconds=timeout_s))
        self.port = self.tcp.port
        self.members: list[str] = []
        self.group = None
        self.group_id: str | None = None
        self._sessions: list[tuple[str, str]] = []

    def _post(self, url: str, path: str, payload=None, timeout: float = 600.0):
        from gprl.serving.http import request

        return request(url + path, payload if payload is not None else b"", method="POST", headers=self.headers,
                       timeout=timeout)

    def _ok(self, url: str, path: str, payload=None, timeout: float = 600.0) -> dict:
        from gprl.serving.http import json_body

        status, _, body = self._post(url, path, payload, timeout)
        return json_body(status, body, f"rollout server {url}{path.split('?')[0]}")

    def form(self, urls: Sequence[str], manifest: Mapping[str, TensorSpec] | None = None) -> list[str]:
        """A new group of rank 0 and the servers of `urls` that accept to join with `manifest` (every one when
        None). Returns the members; raises when the group cannot form (a member accepted but never connected)."""
        self.group, self.members = None, []
        want = manifest_digest(manifest) if manifest is not None else None
        candidates = list(urls)
        for _ in range(2):  # a refusal changes the world size: ask the rest again, under a new id
            gid, accepted = secrets.token_hex(8), []
            for url in candidates:
                body = {"host": self.host, "port": self.port, "rank": len(accepted) + 1,
                        "world_size": len(candidates) + 1, "group": gid, "backend": self.backend,
                        "timeout_seconds": self.timeout_s}
                try:
                    out = self._ok(url, "/weights/group", body, timeout=30)
                except Exception as exc:  # noqa: BLE001 - that server is pushed over HTTP
                    self.log(f"rollout server {url} cannot join the weight-sync group ({exc}): pushing it over HTTP")
                    continue
                if want is not None and out.get("manifest") != want:
                    self.log(f"rollout server {url} holds another model (manifest {out.get('manifest')}, the "
                             f"learner's {want}): pushing it over HTTP")
                    continue
                accepted.append(url)
            if accepted == candidates:
                break
            candidates = accepted
        if not candidates:
            return []
        import torch.distributed as dist

        self.group = _group(dist.PrefixStore(gid, self.tcp), 0, len(candidates) + 1, self.backend, self.timeout_s)
        self.group_id, self.members = gid, candidates
        return list(candidates)

    def begin(self, version: int, rewind: Sequence[str] = ()) -> None:
        """Open a session on every member and start its receiver; GroupChanged if a member left the group (then
        nothing was sent and no session stays open)."""
        if self.group is None:
            raise GroupChanged("no weight-sync group")
        self._sessions = []
        try:
            for url in self.members:
                out = self._ok(url, f"/weights/begin?version={version}&rewind={'true' if url in rewind else 'false'}")
                self._sessions.append((url, out["session"]))
                if out.get("group") != self.group_id:
                    raise GroupChanged(f"rollout server {url} is not in weight-sync group {self.group_id} "
                                       f"(it restarted?)")
            for url, session in self._sessions:
                self._ok(url, f"/weights/receive?session={session}&group={self.group_id}")
        except BaseException:
            self.abort()
            raise

    def send(self, tensor: torch.Tensor, dtype: torch.dtype | None = None) -> None:
        """Broadcast the next tensor of the manifest to every member."""
        device = "cuda" if self.backend == "nccl" else "cpu"
        t = tensor.detach().to(device=device, dtype=dtype or tensor.dtype).contiguous()
        try:
            self.group.broadcast(t, 0).wait()
        except BaseException:
            self.group = None  # a member died mid-push: the next push re-forms the group
            self.abort()
            raise

    def commit(self) -> list[dict]:
        sessions, self._sessions = self._sessions, []
        return [self._ok(url, f"/weights/commit?session={s}") for url, s in sessions]

    def abort(self) -> None:
        """Drop the open sessions (their staged tensors free at once rather than at the servers' TTL)."""
        sessions, self._sessions = self._sessions, []
        for url, s in sessions:
            try:
                self._post(url, f"/weights/abort?session={s}", timeout=10)
            except Exception:  # noqa: BLE001 - best effort: the server's TTL frees it anyway
                pass

    def push(self, weights: Iterable[tuple[str, torch.Tensor]] | Mapping[str, torch.Tensor], version: int,
             order: Sequence[str], dtype: torch.dtype | None = None, rewind: Sequence[str] | None = None) -> list[dict]:
        """One whole push to every member (forming the group with every server first if there is none):
        begin, each tensor of `order` (the servers' manifest order) broadcast, commit. Returns each commit's
        answer."""
        have = weights if isinstance(weights, Mapping) else dict(weights)
        self.begin(version, self.members if rewind is None else rewind)
        for name in order:
            self.send(have[name], dtype)
        return self.commit()
