"""Weight pushes over torch.distributed: the learner's rank 0 broadcasts the tensors to every rollout server at once.

The learner and the servers join a process group of their own, apart from the learner's training group (as TRL's
`vllm-serve` and OpenRLHF do): the learner hosts a TCPStore, each server joins it when asked over HTTP
(`POST /weights/group`), and all build a ProcessGroupGloo on CPU (NCCL with tensors on GPUs) from that store. A push
keeps the versioned, checked protocol of gprl/serving/weights.py — HTTP carries begin, the "receive" signal and
commit; only the tensors move over the group, one broadcast per tensor in the manifest's order (the server knows
every shape and dtype from its manifest, so no metadata travels). A tensor that fails a check is still received
(a collective must complete on every member) and the commit is refused; the engine stays on its previous weights.
HTTP buckets remain the fallback (gprl/rollout/remote.py).
"""

from __future__ import annotations

import threading
from datetime import timedelta
from typing import Iterable, Sequence

import torch
from fastapi import Query
from pydantic import BaseModel, ConfigDict, Field

from gprl.serving.weights import PushRejected, WeightStore


def _group(store, rank: int, size: int, backend: str, timeout_s: float):
    import torch.distributed as dist

    timeout = timedelta(seconds=timeout_s)
    if backend == "nccl":
        return dist.ProcessGroupNCCL(store, rank, size)
    return dist.ProcessGroupGloo(store, rank, size, timeout)


class CollectiveReceiver:
    """A rollout server's side: joins the learner's group and receives pushes into its WeightStore."""

    def __init__(self, store: WeightStore, device: str = "cpu"):
        self.store, self.device = store, device
        self.group = None
        self.backend = "gloo"
        self._receiving: dict[str, threading.Thread] = {}
        self._errors: dict[str, str] = {}
        self._joining: threading.Thread | None = None

    def join(self, host: str, port: int, rank: int, world_size: int, backend: str = "gloo",
             timeout_s: float = 300.0) -> None:
        """Join in the background (the learner's rank 0 builds its side after asking every server)."""
        import torch.distributed as dist

        def run():
            tcp = dist.TCPStore(host, port, world_size, is_master=False, timeout=timedelta(seconds=timeout_s))
            self.group, self.backend = _group(tcp, rank, world_size, backend, timeout_s), backend
            self._tcp = tcp  # the group keeps using the store

        self._joining = threading.Thread(target=run, name="weight-group-join", daemon=True)
        self._joining.start()

    def receive(self, session: str) -> None:
        """Start receiving the manifest's tensors for `session` (returns at once; commit waits for the end)."""
        if self._joining is not None:
            self._joining.join()
        if self.group is None:
            raise PushRejected("no weight-sync group: POST /weights/group first")

        def run():
            device = "cuda" if self.backend == "nccl" else "cpu"
            bad = None
            for name, spec in self.store.manifest.items():
                t = torch.empty(spec.shape, dtype=spec.dtype, device=device)
                self.group.broadcast(t, 0).wait()
                if bad is None:
                    try:
                        self.store.stage(session, [(name, t if device == "cpu" else t)])
                    except Exception as exc:  # noqa: BLE001 - keep receiving: the broadcasts must all complete
                        bad = str(exc)
            if bad is not None:
                self._errors[session] = bad

        thread = threading.Thread(target=run, name=f"weight-receive-{session[:8]}", daemon=True)
        self._receiving[session] = thread
        thread.start()

    def finish(self, session: str, timeout_s: float = 600.0) -> None:
        """Before a commit: wait for the session's tensors; a refused tensor refuses the commit."""
        thread = self._receiving.pop(session, None)
        if thread is not None:
            thread.join(timeout_s)
        error = self._errors.pop(session, None)
        if error is not None:
            raise PushRejected(error)


class Join(BaseModel):
    """POST /weights/group: where the learner's store is and this server's rank in the group."""

    model_config = ConfigDict(strict=True, extra="forbid")
    host: str = Field(max_length=253)
    port: int = Field(ge=1, le=65535)
    rank: int = Field(ge=1)
    world_size: int = Field(ge=2, le=1024)
    backend: str = Field("gloo", pattern="^(gloo|nccl)$")


def add_routes(app, store: WeightStore, receiver: CollectiveReceiver) -> None:
    """POST /weights/group {host, port, rank, world_size, backend}; POST /weights/receive?session=S."""
    from gprl.serving.app import HTTPError

    @app.post("/weights/group")
    def join(req: Join):
        if req.rank >= req.world_size:
            raise HTTPError(422, f"body.rank: {req.rank} not below world_size {req.world_size}")
        receiver.join(req.host, req.port, req.rank, req.world_size, req.backend)
        return {"ok": True}

    @app.post("/weights/receive")
    def receive(session: str = Query(max_length=64)):
        try:
            receiver.receive(session)
        except PushRejected as exc:
            raise HTTPError(422, str(exc)) from None
        return {"ok": True}


class CollectiveSender:
    """The learner's rank 0: hosts the group's store, asks every server to join, broadcasts pushes."""

    def __init__(self, urls: Sequence[str], headers: dict, host: str = "127.0.0.1", port: int = 0,
                 backend: str = "gloo", timeout_s: float = 300.0):
        import torch.distributed as dist

        from gprl.serving.http import json_body, request

        self.urls, self.headers, self.backend = list(urls), headers, backend
        size = len(self.urls) + 1
        self.tcp = dist.TCPStore(host, port, size, is_master=True, wait_for_workers=False,
                                 timeout=timedelta(seconds=timeout_s))
        for i, url in enumerate(self.urls, start=1):
            status, _, body = request(url + "/weights/group", {"host": host, "port": self.tcp.port, "rank": i,
                                                                "world_size": size, "backend": backend},
                                      headers=headers, timeout=30)
            json_body(status, body, f"rollout server {url} /weights/group")
        self.group = _group(self.tcp, 0, size, backend, timeout_s)

    def push(self, weights: Iterable[tuple[str, torch.Tensor]], version: int, order: Sequence[str],
             dtype: torch.dtype | None = None) -> list[dict]:
        """One push to every server: begin and receive over HTTP, the tensors broadcast in `order` (the servers'
        manifest order), commit over HTTP. Returns each server's commit answer."""
        from gprl.serving.http import json_body, request

        def post(url, path):
            status, _, body = request(url + path, b"", method="POST", headers=self.headers, timeout=600)
            return json_body(status, body, f"rollout server {url}{path.split('?')[0]}")

        sessions = [post(u, f"/weights/begin?version={version}&rewind=true")["session"] for u in self.urls]
        for u, s in zip(self.urls, sessions):
            post(u, f"/weights/receive?session={s}")
        device = "cuda" if self.backend == "nccl" else "cpu"
        have = dict(weights) if not isinstance(weights, dict) else weights
        for name in order:
            t = have[name].detach().to(device=device, dtype=dtype or have[name].dtype).contiguous()
            self.group.broadcast(t, 0).wait()
        return [post(u, f"/weights/commit?session={s}") for u, s in zip(self.urls, sessions)]
