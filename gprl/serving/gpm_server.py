"""`gprl serve-gpm`: a GPM scoring server that batches concurrent requests.

POST /score   {"prompts": [...], "responses": [...]}  ->  {"embeddings": [[...]], "eigenvalues": [[...]], "axes", "beta"}
GET  /info    ->  {"axes", "beta", "embedding_dim", "model", "requests", "batches", "max_pairs"}
GET  /healthz, /readyz, /metrics   probes and Prometheus (no token; every other route needs the run's bearer token)

Requests that arrive while a batch is being scored (or within `--batch-window-ms` of the first) are scored together
in one pass of up to `--max-batch` responses, then split back to their callers: k GPM forward passes for k trainer
ranks become one. A request is validated before it joins a batch (lists of strings, as many prompts as responses,
at most `--max-pairs` pairs and `--max-chars` characters each: 422 naming the field otherwise), and if a batch's
pass still fails its requests are scored one by one, so a bad request fails alone. Prompts and responses are text;
the server tokenizes with the GPM's own tokenizer.
"""

from __future__ import annotations

import argparse
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict

from gprl.serving.app import HTTPError, Limits, Server, guard, make_app, serve
from gprl.serving.metrics import GPMMetrics


@dataclass
class _Job:
    prompts: list
    responses: list
    done: threading.Event = field(default_factory=threading.Event)
    result: tuple | None = None
    error: BaseException | None = None


class GPMScorer:
    """The batching core, usable without HTTP (tests and benchmarks)."""

    def __init__(self, gpm, tokenizer, batch_size: int = 32, max_batch: int = 256, window_s: float = 0.005,
                 max_length: int = 1024, metrics: GPMMetrics | None = None):
        self.gpm, self.tokenizer = gpm, tokenizer
        self.batch_size, self.max_batch, self.window_s, self.max_length = batch_size, max_batch, window_s, max_length
        self.metrics = metrics
        self.queue: queue.Queue[_Job] = queue.Queue()
        self._carry: _Job | None = None  # a job that would have overfilled the last batch: first of the next
        self.requests = 0
        self.batches = 0
        self._thread = threading.Thread(target=self._loop, name="gpm-batcher", daemon=True)
        self._thread.start()

    def score(self, prompts: list, responses: list, timeout: float = 600.0):
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        job = _Job(list(prompts), list(responses))
        self.queue.put(job)
        if not job.done.wait(timeout):
            raise TimeoutError("scoring timed out")
        if job.error is not None:
            raise job.error
        return job.result

    def _loop(self) -> None:
        while True:
            first = self._carry if self._carry is not None else self.queue.get()
            self._carry = None
            jobs, size = [first], len(first.prompts)
            deadline = time.monotonic() + self.window_s
            while size < self.max_batch:
                try:
                    job = self.queue.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if size + len(job.prompts) > self.max_batch:
                    self._carry = job
                    break
                jobs.append(job)
                size += len(job.prompts)
            self._run(jobs)

    def _score(self, prompts: list, responses: list):
        if not prompts:
            return torch.zeros(0, 0), torch.zeros(0, 0)
        out = self.gpm.score(self.tokenizer, prompts, responses, batch_size=self.batch_size,
                             max_length=self.max_length)
        return out.embeddings, out.eigenvalues

    def _run(self, jobs: list[_Job]) -> None:
        try:
            try:
                emb, eig = self._score([p for j in jobs for p in j.prompts], [r for j in jobs for r in j.responses])
                start = 0
                for j in jobs:
                    n = len(j.prompts)
                    j.result = (emb[start : start + n], eig[start : start + n])
                    start += n
            except Exception:  # noqa: BLE001 - isolate: score each request alone, so only the bad one fails
                if len(jobs) == 1:
                    raise
                for j in jobs:
                    try:
                        j.result = self._score(j.prompts, j.responses)
                    except Exception as exc:  # noqa: BLE001 - this request's own error, handed to its caller
                        j.error = exc
        except BaseException as exc:  # noqa: BLE001 - a single request's error goes to its caller
            for j in jobs:
                j.error = exc
        finally:
            self.batches += 1
            self.requests += len(jobs)
            if self.metrics is not None:
                self.metrics.batch_size.observe(sum(len(j.prompts) for j in jobs))
                self.metrics.batch_requests.observe(len(jobs))
                self.metrics.scored.inc(sum(len(j.prompts) for j in jobs if j.error is None))
            for j in jobs:
                j.done.set()


class ScoreRequest(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")

    prompts: list[str]
    responses: list[str]


def load_gpm(path: str, dtype: str = "float32", tokenizer_path: str | None = None):
    """The GPM and its tokenizer (from the GPM folder, else tokenizer_path — the policy's, as the trainer does)."""
    from transformers import AutoTokenizer

    from gprl.gpm import GeneralPreferenceModel

    gpm = GeneralPreferenceModel.from_pretrained(path, dtype=getattr(torch, dtype)).eval().requires_grad_(False)
    if torch.cuda.is_available():
        gpm = gpm.cuda()
    has_own = Path(path, "tokenizer_config.json").exists()
    tok = AutoTokenizer.from_pretrained(path if has_own or not tokenizer_path else tokenizer_path)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return gpm, tok


def build_server(gpm, tokenizer, host: str = "127.0.0.1", port: int = 0, model_name: str = "", *,
                 token: str | None = None, limits: Limits = Limits(), max_pairs: int | None = None,
                 max_chars: int = 65536, **scorer_kw) -> Server:
    """The GPM server (not started: call serve_forever). max_pairs: most pairs per request (default max_batch)."""
    metrics = GPMMetrics()
    scorer = GPMScorer(gpm, tokenizer, metrics=metrics, **scorer_kw)
    max_pairs = min(max_pairs or scorer.max_batch, scorer.max_batch)
    cfg = gpm.config
    app = make_app(title="gprl serve-gpm", token=token, limits=limits, metrics=metrics)

    @app.get("/info")
    def info():
        return {"axes": cfg.axes, "beta": cfg.beta, "embedding_dim": 2 * cfg.axes, "model": model_name,
                "requests": scorer.requests, "batches": scorer.batches, "max_pairs": max_pairs}

    @app.post("/score")
    def score(req: ScoreRequest):
        if len(req.prompts) != len(req.responses):
            raise HTTPError(422, f"body.responses: {len(req.responses)} responses for {len(req.prompts)} prompts")
        if len(req.prompts) > max_pairs:
            raise HTTPError(422, f"body.prompts: {len(req.prompts)} pairs, at most {max_pairs} per request")
        for name, items in (("prompts", req.prompts), ("responses", req.responses)):
            for i, text in enumerate(items):
                if len(text) > max_chars:
                    raise HTTPError(422, f"body.{name}.{i}: {len(text)} characters, at most {max_chars}")
        try:
            emb, eig = scorer.score(req.prompts, req.responses)
        except Exception as exc:  # noqa: BLE001 - this request's own failure (the batcher isolates it), named
            raise HTTPError(500, f"scoring failed: {type(exc).__name__}: {exc}") from None
        return {"embeddings": emb.tolist(), "eigenvalues": eig.tolist(), "axes": cfg.axes, "beta": cfg.beta}

    server = Server(guard(app), host, port, limits)
    server.scorer, server.metrics = scorer, metrics  # type: ignore[attr-defined]
    return server


def serve_gpm_main(argv: list[str] | None = None) -> int:
    """Entry of `gprl serve-gpm`."""
    from gprl.serving.auth import TOKEN_FILE_ENV, server_token

    p = argparse.ArgumentParser(prog="gprl serve-gpm", description="Serve a GPM: embeddings and eigenvalues over HTTP.")
    p.add_argument("--gpm", help="GPM folder (with its tokenizer), or world:gpm / world:bt")
    p.add_argument("--config", help="a run config (YAML or GPRLRun manifest): the GPM and its batch size from it "
                                    "(how the operator's GPM Deployment starts it); flags override")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (the operator passes 0.0.0.0 in a pod)")
    p.add_argument("--port", type=int, default=8001)
    p.add_argument("--token-file", help=f"file holding the run's bearer token (default ${TOKEN_FILE_ENV}); "
                                        "required unless --host is loopback")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--batch-size", type=int, default=None, help="responses per forward pass (default 32)")
    p.add_argument("--max-batch", type=int, default=512, help="most responses gathered from concurrent requests")
    p.add_argument("--batch-window-ms", type=float, default=5.0, help="how long to wait for more requests")
    p.add_argument("--max-length", type=int, default=1024)
    p.add_argument("--max-pairs", type=int, default=None, help="most pairs in one request (default --max-batch)")
    p.add_argument("--max-chars", type=int, default=65536, help="longest prompt or response, in characters")
    p.add_argument("--max-body-mb", type=float, default=16, help="largest request body")
    p.add_argument("--request-timeout", type=float, default=30, help="seconds from a request's first byte to its last")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = p.parse_args(argv)
    token = server_token(args.token_file, args.host)
    if args.threads:
        torch.set_num_threads(args.threads)
    from gprl.config import load_config
    from gprl.sources import resolve_model

    spec = load_config(args.config) if args.config else None
    if spec is not None:
        args.gpm = args.gpm or spec.gpm.path
        args.batch_size = args.batch_size or spec.gpm.batch_size
    if not args.gpm:
        p.error("give --gpm or --config")
    args.batch_size = args.batch_size or 32
    path, tok_path = args.gpm, None
    # a folder, a hub id or a provider's source (world:gpm); the policy's tokenizer when the GPM folder has none
    path = resolve_model(path, "--gpm")
    if spec is not None and spec.model.policy:
        tok_path = resolve_model(spec.model.policy, "model.policy")
    gpm, tok = load_gpm(path, args.dtype, tok_path)
    limits = Limits(max_body_bytes=int(args.max_body_mb * 2**20), request_timeout_s=args.request_timeout)
    server = build_server(gpm, tok, args.host, args.port, model_name=str(path), token=token, limits=limits,
                          max_pairs=args.max_pairs, max_chars=args.max_chars, batch_size=args.batch_size,
                          max_batch=args.max_batch, window_s=args.batch_window_ms / 1000, max_length=args.max_length)
    auth = "bearer token required" if token else "NO AUTHENTICATION (loopback only)"
    return serve(server, f"[serve-gpm] {path} (k={gpm.config.axes}) on http://{args.host}:{server.server_address[1]} "
                         f"({auth})")


if __name__ == "__main__":
    raise SystemExit(serve_gpm_main())
