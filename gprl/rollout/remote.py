"""Rollouts from `gprl serve-rollout` servers (the disaggregated topology), with versioned weight pushes.

* generate: the step's prompts are split over the servers (contiguous chunks, whole groups), requested in parallel,
  each request carrying `min_version` = the learner's policy version; the batch is assembled as HFRollout's.
* sync_weights: rank 0 pushes the policy to every server in buckets (safetensors over HTTP: begin / bucket… /
  commit), then all ranks meet at a barrier, so no rank samples from old weights.
* a server that restarted (Kubernetes replaced its pod) comes back at an older version and answers 409: the client
  re-pushes the current weights to it — from any rank that holds whole parameters (ZeRO 0-2); under ZeRO-3 only a
  collective gather can, so that rank fails the step with StaleRollout — and retries. Connection errors are retried
  with exponential backoff for GPRL_ROLLOUT_ATTEMPTS attempts (default 10, ~1 min), then the step fails.
"""

from __future__ import annotations

import os
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

from gprl import distributed as gdist
from gprl.rollout.base import RolloutBatch, StaleRollout
from gprl.rollout.tokens import assemble_batch, bucketed, encode_prompts, policy_weights
from gprl.serving.http import ServerUnavailable, call_with_retries, json_body, request, wait_healthy


class RolloutServerUnavailable(ServerUnavailable):
    pass


class RemoteRollout:
    def __init__(self, urls: Sequence[str], tokenizer, spec, max_prompt_tokens: int = 256, learner=None,
                 bucket_mb: float = 64.0, attempts: int | None = None, base_delay: float = 0.5, log=print,
                 seed: int = 0):
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

    def _post(self, url: str, path: str, payload=None, what: str = "", timeout: float = 600.0):
        status, _, body = self._retry(lambda: request(url + path, payload, method="POST", timeout=timeout),
                                      what or f"rollout server {url}{path.split('?')[0]}")
        return status, body

    def _retry(self, fn, what: str):
        try:
            return call_with_retries(fn, what=what, attempts=self.attempts, base_delay=self.base_delay, log=self.log)
        except ServerUnavailable as exc:
            raise RolloutServerUnavailable(str(exc)) from None

    # ------------------------------------------------------------------ weights

    def _can_push(self) -> bool:
        stage = getattr(self.learner, "stage", 0) if self.learner is not None else 0
        return self._policy is not None and (stage < 3 or gdist.world_size() == 1)

    def push(self, url: str, policy, version: int) -> dict:
        """Send the policy's weights to one server in buckets and commit them as `version`. A server that restarts
        mid-push forgets the session (400 unknown session): the push starts over."""
        from gprl.serving.http import ServerError

        for attempt in range(3):
            try:
                return self._push_once(url, policy, version)
            except ServerError as exc:
                if "unknown weight session" not in str(exc) or attempt == 2:
                    raise
                self.log(f"rollout server {url} lost the weight push (restarted?): pushing version {version} again")
        raise AssertionError("unreachable")

    def _push_once(self, url: str, policy, version: int) -> dict:
        import time

        from safetensors.torch import save

        t0 = time.perf_counter()
        session = uuid.uuid4().hex
        self._check(*self._post(url, f"/weights/begin?session={session}&version={version}"), url)
        for bucket in bucketed(policy_weights(policy, self.learner), self.bucket_bytes):
            payload = save({name: t.contiguous().cpu() for name, t in bucket})
            self._check(*self._post(url, f"/weights/bucket?session={session}", payload), url)
        out = self._check(*self._post(url, f"/weights/commit?session={session}"), url)
        self.pushes += 1
        self.last_push_seconds = time.perf_counter() - t0
        return out

    def _check(self, status: int, body: bytes, url: str) -> dict:
        return json_body(status, body, f"rollout server {url}")

    def sync_weights(self, policy, version: int) -> None:
        self._policy = policy
        if version == 0 and self.version == 0:
            self.version = 0  # the servers start from the initial policy folder: nothing to push
            return
        self._ready()
        if gdist.rank() == 0:
            with ThreadPoolExecutor(len(self.urls)) as pool:
                list(pool.map(lambda u: self.push(u, policy, version), self.urls))
        self.version = version
        gdist.barrier()

    # ------------------------------------------------------------------ generation

    def _generate_on(self, url: str, ids: list[list[int]], group_size: int, seed: int):
        s = self.spec
        req = {"prompt_ids": ids, "n": group_size, "temperature": s.temperature, "top_p": s.top_p, "top_k": s.top_k,
               "max_tokens": s.max_new_tokens, "seed": seed, "stop_token_ids": [self.tokenizer.eos_token_id],
               "min_version": self.version}
        for _ in range(3):
            status, body = self._post(url, "/generate", req)
            if status == 409:  # the server is behind: it restarted, or a push is still on its way
                import json

                have = int(json.loads(body).get("version", -1))
                if not self._can_push():
                    raise StaleRollout(have, self.version, url)
                self.log(f"rollout server {url} at version {have}, learner at {self.version}: re-syncing weights")
                self.push(url, self._policy, self.version)
                continue
            out = self._check(status, body, url)
            if int(out["version"]) != self.version:
                raise StaleRollout(int(out["version"]), self.version, url)
            return [[(c["token_ids"], c["logprobs"]) for c in group] for group in out["completions"]]
        raise StaleRollout(-1, self.version, url)

    def generate(self, prompts: Sequence[str], group_size: int) -> RolloutBatch:
        self._ready()
        ids = encode_prompts(self.tokenizer, prompts, self.max_prompt_tokens)
        self.calls += 1
        n = len(self.urls)
        per = -(-len(ids) // n)
        chunks = [(self.urls[i], ids[i * per : (i + 1) * per]) for i in range(n) if ids[i * per : (i + 1) * per]]
        base = (self.seed * 1_000_003 + self.calls) * 97 + gdist.rank() * 7919
        with ThreadPoolExecutor(len(chunks)) as pool:
            parts = list(pool.map(lambda a: self._generate_on(a[1][0], a[1][1], group_size, base + a[0]),
                                  enumerate(chunks)))
        completions = [g for part in parts for g in part]
        return assemble_batch(self.tokenizer, prompts, ids, completions, group_size, self.version)
