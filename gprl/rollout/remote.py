"""Rollouts from `gprl serve-rollout` servers (the disaggregated topology), with versioned weight pushes.

* generate: the step's prompts are split over the servers (contiguous chunks, whole groups), requested in parallel,
  each request carrying `min_version` = the learner's policy version; the batch is assembled as HFRollout's. The
  first contact waits for every server's /healthz (pods may still be loading their model).
* sync_weights: rank 0 pushes the policy to every server, then all ranks meet at a barrier, so no rank samples
  from old weights. `rollout.weightSync.transport` says how: `http`, in buckets to each server (safetensors:
  begin / bucket… / commit); `collective`, one broadcast per tensor to every server at once over a
  torch.distributed group of rank 0 and the servers (gprl/serving/weight_sync.py; begin and commit stay on HTTP).
  A server that cannot join the group, and every server of a push whose group failed, get the push over HTTP.
  Under ZeRO-3 every rank walks the policy one module at a time, gathering only that module's parameters (a
  collective all ranks enter), and rank 0 sends each tensor on to every server as it comes (buckets or
  broadcasts): the push holds one module whole, never the model; a failed HTTP push fails the step on every rank.
* a server that restarted (Kubernetes replaced its pod) comes back at version 0 and answers 409 to a newer
  `min_version`. Under ZeRO 0-2 the rank that saw it re-pushes the current weights to that server on its own and
  retries. Under ZeRO-3 no rank holds whole parameters outside a collective gather, so the re-sync is collective:
  each generate round starts with rank 0 asking every server its version (GET /info) and broadcasting the list of
  servers behind; if any, all ranks enter the gather and rank 0 pushes to those servers; then every rank generates
  without pushing, and the ranks agree (all-reduce) that each one's generation succeeded — a server that fell
  behind meanwhile (409) starts another round, at most RESYNC_ROUNDS, then the step fails with StaleRollout on
  every rank. Connection errors are retried with exponential backoff for GPRL_ROLLOUT_ATTEMPTS attempts
  (default 10, ~1 min), then the step fails with RolloutServerUnavailable (on every rank under ZeRO-3).
"""

from __future__ import annotations

import contextlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

from gprl import distributed as gdist
from gprl.rollout.base import RolloutBatch, StaleRollout
from gprl.rollout.tokens import assemble_batch, bucketed, encode_prompts, layerwise_weights, policy_weights
from gprl.serving.auth import auth_headers, load_token
from gprl.serving.http import ServerUnavailable, call_with_retries, json_body, request, wait_healthy


class RolloutServerUnavailable(ServerUnavailable):
    pass


RESYNC_ROUNDS = 3  # ZeRO-3: collective re-sync + generation rounds before the step fails with StaleRollout
_OK, _STALE, _FAILED = 0, 1, 2  # a rank's generation outcome, agreed on with an all-reduce (max)


class RemoteRollout:
    def __init__(self, urls: Sequence[str], tokenizer, spec, max_prompt_tokens: int = 256, learner=None,
                 bucket_mb: float = 64.0, attempts: int | None = None, base_delay: float = 0.5, log=print,
                 seed: int = 0, token: str | None = None):
        if not urls:
            raise ValueError("RemoteRollout needs at least one server URL")
        self.urls = [u.rstrip("/") for u in urls]
        self.tokenizer, self.spec, self.max_prompt_tokens = tokenizer, spec, max_prompt_tokens
        self.learner = learner
        self.bucket_bytes = int(bucket_mb * 2**20)
        self.attempts = attempts or int(os.environ.get("GPRL_ROLLOUT_ATTEMPTS", "10"))
        self.base_delay = base_delay
        self.log = log
        self.version = 0
        self.seed = seed
        self.calls = 0
        self._policy = None
        self.pushes = 0  # weight pushes done by this process (re-syncs included)
        self.last_push_seconds = 0.0
        self.headers = auth_headers(token if token is not None else load_token())
        self._dtypes: dict[str, str] = {}  # url -> the engine's weight dtype (pushes are cast to it)
        self._pushed_to: set[str] = set()
        self.weight_sync = spec.weight_sync
        self._sender = None  # rank 0's CollectiveSender, made at the first collective push
        self._collective_off: str | None = None  # why this process gave up the collective transport

    # ------------------------------------------------------------------ HTTP

    def _ready(self) -> None:
        """First contact: wait for every server to be healthy (pods may still be starting)."""
        if getattr(self, "_seen_ready", False):
            return
        for url in self.urls:
            try:
                wait_healthy(url, f"rollout server {url}", log=self.log)
            except ServerUnavailable as exc:
                raise RolloutServerUnavailable(str(exc)) from None
        self._seen_ready = True

    def _post(self, url: str, path: str, payload=None, what: str = "", timeout: float = 600.0,
              retry_5xx: bool = True):
        status, _, body = self._retry(lambda: request(url + path, payload, method="POST", headers=self.headers,
                                                      timeout=timeout),
                                      what or f"rollout server {url}{path.split('?')[0]}", retry_5xx=retry_5xx)
        return status, body

    def _retry(self, fn, what: str, retry_5xx: bool = True):
        try:
            return call_with_retries(fn, what=what, attempts=self.attempts, base_delay=self.base_delay, log=self.log,
                                     retry_5xx=retry_5xx)
        except ServerUnavailable as exc:
            raise RolloutServerUnavailable(str(exc)) from None

    # ------------------------------------------------------------------ weights

    def _collective(self) -> bool:
        """ZeRO-3: whole parameters exist only inside a gather that every rank enters together."""
        return self.learner is not None and self.learner.collective_gather

    def _can_push(self) -> bool:
        """This rank can re-push on its own, outside a collective (ZeRO 0-2)."""
        return self._policy is not None and not self._collective()

    def push(self, url: str, policy, version: int, gathered: bool = False) -> dict:
        """Send the policy's weights to one server in buckets and commit them as `version`. A server that restarts
        mid-push forgets the session (400 unknown session): the push starts over. `gathered`: the caller already
        holds the parameters whole, so this push gathers nothing itself."""
        from gprl.serving.http import ServerError

        for attempt in range(3):
            try:
                return self._push_once(url, policy, version, gathered)
            except ServerError as exc:
                if "unknown weight session" not in str(exc) or attempt == 2:
                    raise
                self.log(f"rollout server {url} lost the weight push (restarted?): pushing version {version} again")
        raise AssertionError("unreachable")

    def _info(self, url: str) -> dict:
        status, _, body = self._retry(lambda: request(url + "/info", headers=self.headers, timeout=30),
                                      f"rollout server {url}/info")
        return self._check(status, body, url)

    def _push_once(self, url: str, policy, version: int, gathered: bool = False) -> dict:
        """begin (the server's session id) -> buckets -> commit. A learner process's first push to a server may
        rewind its version (the learner resumed from a checkpoint older than the server's weights); later pushes
        must move it forward. A 409 at begin from a server already at `version` means a lost answer to a commit
        that went through: nothing to do."""
        import time

        import torch
        from safetensors.torch import save

        t0 = time.perf_counter()
        dtype = self._dtype(url)
        rewind = "true" if url not in self._pushed_to else "false"
        status, body = self._post(url, f"/weights/begin?version={version}&rewind={rewind}")
        if status == 409 and int(json.loads(body).get("version", -1)) == version:
            return {"version": version, "tensors": 0}
        session = self._check(status, body, url)["session"]
        try:
            for bucket in bucketed(policy_weights(policy, None if gathered else self.learner), self.bucket_bytes):
                payload = save({name: t.to(dtype or t.dtype).contiguous().cpu() for name, t in bucket})
                self._check(*self._post(url, f"/weights/bucket?session={session}", payload), url)
            out = self._commit(url, session, version)
        except BaseException:
            with contextlib.suppress(Exception):  # free the server's staged tensors now rather than at its TTL
                request(url + f"/weights/abort?session={session}", b"", method="POST", headers=self.headers,
                        timeout=10)
            raise
        self._pushed_to.add(url)
        self.pushes += 1
        self.last_push_seconds = time.perf_counter() - t0
        return out

    def _commit(self, url: str, session: str, version: int) -> dict:
        """Commit a push. A 409 naming `version` itself means another learner rank re-synced this (restarted) server
        to the same version first; under ZeRO 0-2 every rank holds the same weights for a version, so the push is
        done. A commit is not repeated on a 5xx: the engine's load failed, and a retry would only find the session
        gone."""
        status, body = self._post(url, f"/weights/commit?session={session}", retry_5xx=False)
        if status == 409 and int(json.loads(body).get("version", -1)) == version:
            return {"version": version, "tensors": 0}
        return self._check(status, body, url)

    def _check(self, status: int, body: bytes, url: str) -> dict:
        return json_body(status, body, f"rollout server {url}")

    def _dtype(self, url: str):
        """The server engine's weight dtype (pushes are cast to it); None when it holds several."""
        import torch

        if url not in self._dtypes:
            self._dtypes[url] = self._info(url).get("dtype", "float32")
        return getattr(torch, self._dtypes[url]) if isinstance(self._dtypes[url], str) else None

    # ------------------------------------------------------------------ the collective transport (rank 0)

    def _group_members(self, urls: Sequence[str], policy) -> list[str]:
        """The servers of `urls` that this push reaches over the weight-sync group (forming it when there is none):
        none unless the transport is collective and the push goes to every server (a re-sync of some servers
        goes over HTTP, and the next whole push re-forms the group)."""
        if (self.weight_sync.transport != "collective" or self._collective_off is not None
                or set(urls) != set(self.urls)):
            return []
        from gprl.serving.weight_sync import CollectiveSender
        from gprl.serving.weights import manifest_of

        ws = self.weight_sync
        try:
            if self._sender is None:
                backend = ws.backend
                if backend == "auto":
                    on_gpu = next(iter(policy.parameters())).device.type == "cuda"
                    backend = "nccl" if on_gpu else "gloo"
                host = os.environ.get("GPRL_WEIGHT_SYNC_HOST") or os.environ.get("MASTER_ADDR") or "127.0.0.1"
                self._sender = CollectiveSender(self.headers, host, ws.port, backend, ws.timeout_seconds, self.log)
            if self._sender.group is None:
                dtype = self._dtype(self.urls[0])
                members = self._sender.form(self.urls, manifest_of(policy, dtype))
                self.log(f"weight-sync group ({self._sender.backend}, {self._sender.host}:{self._sender.port}): "
                         f"{len(members)} of {len(self.urls)} rollout server(s)")
        except Exception as exc:  # noqa: BLE001 - the servers are still reachable over HTTP
            self._collective_off = f"{type(exc).__name__}: {exc}"
            self.log(f"the weight-sync group could not form ({self._collective_off}): pushing over HTTP from now on")
            return []
        return list(self._sender.members)

    def _begin_collective(self, urls: Sequence[str], version: int, policy) -> list[str]:
        """Open a collective push on the group's members among `urls`: the members (empty: no group). A member
        that restarted since the group formed makes it re-form, once."""
        from gprl.serving.weight_sync import GroupChanged

        for attempt in range(2):
            members = self._group_members(urls, policy)
            if not members:
                return []
            try:
                self._sender.begin(version, rewind=[u for u in members if u not in self._pushed_to])
                return members
            except GroupChanged as exc:
                self.log(f"{exc}: re-forming the weight-sync group")
                self._sender.group = None
            except Exception as exc:  # noqa: BLE001 - e.g. a server already at `version`: HTTP sorts it out
                self.log(f"collective push of version {version} could not begin ({exc}): pushing over HTTP")
                self._sender.group = None
                return []
        return []

    def _commit_collective(self, members: Sequence[str], t0: float) -> None:
        import time

        self._sender.commit()
        self._pushed_to.update(members)
        self.pushes += len(members)
        self.last_push_seconds = time.perf_counter() - t0

    def _push_rank0(self, urls: Sequence[str], version: int, policy) -> None:
        """Rank 0, parameters whole (ZeRO 0-2): over the group to its members, over HTTP to the rest (and to
        everyone when the group fails mid-push: the parameters are still here to send again)."""
        import time

        t0 = time.perf_counter()
        rest = list(urls)
        members = self._begin_collective(urls, version, policy)
        if members:
            dtype = self._dtype(members[0])
            try:
                for _, t in policy_weights(policy):
                    self._sender.send(t, dtype)
                self._commit_collective(members, t0)
                rest = [u for u in urls if u not in members]
            except Exception as exc:  # noqa: BLE001 - falls back to HTTP below
                self._sender.group = None
                self.log(f"collective push of version {version} failed ({exc}): pushing it over HTTP")
        if rest:
            with ThreadPoolExecutor(len(rest)) as pool:
                list(pool.map(lambda u: self.push(u, policy, version, gathered=True), rest))

    def _push_layerwise(self, urls: Sequence[str], version: int) -> Exception | None:
        """ZeRO-3, every rank: one walk over the policy, one module gathered at a time (collectives every rank
        enters, so every rank walks to the end whatever happens on rank 0); rank 0 sends each tensor on as it
        comes, to the group's members (a broadcast) and into each other server's HTTP buckets. Returns rank 0's
        error. A group that fails mid-push leaves its members behind; the next generate round re-syncs them."""
        import time

        t0 = time.perf_counter()
        stream = layerwise_weights(self._policy, self.learner)
        error: Exception | None = None
        if gdist.rank() == 0 and urls:
            members, https = [], []
            try:
                members = self._begin_collective(urls, version, self._policy)
                dtype = self._dtype(members[0]) if members else None
                https = [_HttpStream(self, u, version) for u in urls if u not in members]
                with ThreadPoolExecutor(max(1, len(https))) as pool:
                    for name, t in stream:
                        if members:
                            try:
                                self._sender.send(t, dtype)
                            except Exception as exc:  # noqa: BLE001 - those servers stay behind: re-synced later
                                self.log(f"collective push of version {version} failed ({exc}); the next "
                                         "rollout re-syncs its servers")
                                self._sender.group, members = None, []
                        if len(https) == 1:
                            https[0].add(name, t)
                        elif https:
                            list(pool.map(lambda h: h.add(name, t), https))
                if members:
                    self._commit_collective(members, t0)
                for h in https:
                    h.commit()
            except Exception as exc:  # noqa: BLE001 - every rank hears of it (the caller), after the walk
                error = exc
                for h in https:
                    h.abort()
                if self._sender is not None:
                    self._sender.abort()
        for _ in stream:  # the rest of the walk: the other ranks are in these gathers too
            pass
        return error

    def _push_all(self, urls: Sequence[str], version: int) -> None:
        """Every rank: push the policy to `urls` (rank 0 sends). Under ZeRO-3 the parameters are gathered one
        module at a time by every rank, and rank 0's outcome is broadcast, so a failed push fails on every rank."""
        policy, error = self._policy, None
        if self._collective():
            error = self._push_layerwise(urls, version)
        elif gdist.rank() == 0 and urls:
            try:
                self._push_rank0(urls, version, policy)
            except Exception as exc:  # noqa: BLE001 - re-raised below
                error = exc
        if self._collective():
            told = gdist.broadcast_object(None if error is None else f"{type(error).__name__}: {error}")
            if error is None and told is not None:
                raise RolloutServerUnavailable(f"rank 0 could not push weights version {version}: {told}")
        if error is not None:
            raise error

    def sync_weights(self, policy, version: int) -> None:
        self._policy = policy
        if version == 0 and self.version == 0:
            self.version = 0  # the servers start from the initial policy folder: nothing to push
            return
        self._ready()
        self._push_all(self.urls, version)
        self.version = version
        gdist.barrier()

    def _versions(self) -> list[int]:
        """Each server's weights version (GET /info, retried while a replaced pod starts)."""

        def one(url: str) -> int:
            return int(self._info(url)["version"])

        with ThreadPoolExecutor(len(self.urls)) as pool:
            return list(pool.map(one, self.urls))

    def _resync_behind(self) -> None:
        """Collective (ZeRO-3): rank 0 asks every server its version and broadcasts which ones are not at the
        learner's; all ranks then enter the gather and rank 0 re-pushes the current weights to those servers."""
        behind, error = [], None
        if gdist.rank() == 0:
            try:
                behind = [u for u, v in zip(self.urls, self._versions()) if v != self.version]
            except Exception as exc:  # noqa: BLE001 - every rank raises it below
                error = f"{type(exc).__name__}: {exc}"
        behind, error = gdist.broadcast_object((behind, error))
        if error is not None:
            raise RolloutServerUnavailable(f"rank 0 could not read the rollout servers' versions: {error}")
        if not behind:
            return
        if self._policy is None:  # same on every rank: nothing was ever synced, so there is nothing to push
            raise StaleRollout(-1, self.version, ", ".join(behind))
        self.log(f"rollout server(s) {', '.join(behind)} not at the learner's version {self.version}: "
                 "re-syncing weights (collective gather)")
        self._push_all(behind, self.version)

    # ------------------------------------------------------------------ generation

    def _generate_on(self, url: str, ids: list[list[int]], group_size: int, seed: int, resync: bool = True):
        s = self.spec
        req = {"prompt_ids": ids, "n": group_size, "temperature": s.temperature, "top_p": s.top_p, "top_k": s.top_k,
               "max_tokens": s.max_new_tokens, "seed": seed, "stop_token_ids": [self.tokenizer.eos_token_id],
               "min_version": self.version}
        for _ in range(3):
            status, body = self._post(url, "/generate", req)
            if status == 409:  # the server is behind: it restarted, or a push is still on its way
                have = int(json.loads(body).get("version", -1))
                if not (resync and self._can_push()):
                    raise StaleRollout(have, self.version, url)
                self.log(f"rollout server {url} at version {have}, learner at {self.version}: re-syncing weights")
                self.push(url, self._policy, self.version)
                continue
            out = self._check(status, body, url)
            if int(out["version"]) != self.version:
                raise StaleRollout(int(out["version"]), self.version, url)
            return [[(c["token_ids"], c["logprobs"]) for c in group] for group in out["completions"]]
        raise StaleRollout(-1, self.version, url)

    def _generate_chunks(self, chunks, group_size: int, base: int, resync: bool):
        if not chunks:
            return []
        with ThreadPoolExecutor(len(chunks)) as pool:
            return list(pool.map(lambda a: self._generate_on(a[1][0], a[1][1], group_size, base + a[0], resync),
                                 enumerate(chunks)))

    def _generate_collectively(self, chunks, group_size: int, base: int):
        """ZeRO-3: rounds of (collective re-sync of the servers behind, generation without pushing, agreement)."""
        last: Exception | None = None
        for round_ in range(1, RESYNC_ROUNDS + 1):
            self._resync_behind()
            outcome, parts = _OK, None
            try:
                parts = self._generate_chunks(chunks, group_size, base, resync=False)
            except StaleRollout as exc:
                outcome, last = _STALE, exc
            except Exception as exc:  # noqa: BLE001 - every rank learns of it, then it is raised
                outcome, last = _FAILED, exc
            worst = gdist.all_reduce_max(outcome)
            if worst == _OK:
                return parts
            if worst == _FAILED:
                if outcome == _FAILED:
                    raise last
                raise RolloutServerUnavailable("rollout generation failed on another learner rank")
            self.log(f"a rollout server fell behind during generation (round {round_}/{RESYNC_ROUNDS}"
                     + (f": {last}" if outcome == _STALE else "") + ")")
        have = last.have if isinstance(last, StaleRollout) else -1
        raise StaleRollout(have, self.version, f"the rollout servers, still behind after {RESYNC_ROUNDS} "
                                               f"collective re-syncs{f' ({last})' if last else ''}")

    def generate(self, prompts: Sequence[str], group_size: int) -> RolloutBatch:
        self._ready()
        ids = encode_prompts(self.tokenizer, prompts, self.max_prompt_tokens)
        self.calls += 1
        n = len(self.urls)
        per = -(-len(ids) // n)
        chunks = [(self.urls[i], ids[i * per : (i + 1) * per]) for i in range(n) if ids[i * per : (i + 1) * per]]
        base = (self.seed * 1_000_003 + self.calls) * 97 + gdist.rank() * 7919
        if self._collective():
            parts = self._generate_collectively(chunks, group_size, base)
        else:
            parts = self._generate_chunks(chunks, group_size, base, resync=True)
        completions = [g for part in parts for g in part]
        return assemble_batch(self.tokenizer, prompts, ids, completions, group_size, self.version)


class _HttpStream:
    """One server's HTTP push fed a tensor at a time (the ZeRO-3 walk): buckets of the server's dtype, posted as
    they fill; commit after the last tensor. Holds at most one bucket of copies."""

    def __init__(self, client: RemoteRollout, url: str, version: int):
        self.client, self.url, self.version = client, url, version
        self.dtype = client._dtype(url)
        rewind = "true" if url not in client._pushed_to else "false"
        status, body = client._post(url, f"/weights/begin?version={version}&rewind={rewind}")
        # 409 from a server already at `version`: a lost answer to a commit that went through
        self.session = None if status == 409 and int(json.loads(body).get("version", -1)) == version else \
            client._check(status, body, url)["session"]
        self.bucket: dict = {}
        self.size = 0

    def add(self, name: str, t) -> None:
        if self.session is None:
            return
        self.bucket[name] = t.to(self.dtype or t.dtype).contiguous().cpu()
        self.size += t.numel() * t.element_size()
        if self.size >= self.client.bucket_bytes:
            self._flush()

    def _flush(self) -> None:
        from safetensors.torch import save

        if self.bucket:
            payload = save(self.bucket)
            self.bucket, self.size = {}, 0
            self.client._check(*self.client._post(self.url, f"/weights/bucket?session={self.session}", payload),
                               self.url)

    def commit(self) -> None:
        if self.session is None:
            return
        self._flush()
        c = self.client
        c._commit(self.url, self.session, self.version)
        c._pushed_to.add(self.url)
        c.pushes += 1

    def abort(self) -> None:
        if self.session is not None:
            with contextlib.suppress(Exception):
                request(self.url + f"/weights/abort?session={self.session}", b"", method="POST",
                        headers=self.client.headers, timeout=10)
