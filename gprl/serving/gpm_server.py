"""`gprl serve-gpm`: a GPM scoring server that batches concurrent requests.

POST /score   {"prompts": [...], "responses": [...]}  ->  {"embeddings": [[...]], "eigenvalues": [[...]], "axes", "beta"}
GET  /info    ->  {"axes", "beta", "embedding_dim", "model", "requests", "batches"}
GET  /healthz ->  {"ok": true}

Requests that arrive while a batch is being scored (or within `--batch-window-ms` of the first) are scored together
in one pass of up to `--max-batch` responses, then split back to their callers: k GPM forward passes for k trainer
ranks become one. Prompts and responses are text; the server tokenizes with the GPM's own tokenizer.
"""

from __future__ import annotations

import argparse
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from gprl.serving.http import make_server, serve


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
                 max_length: int = 1024):
        self.gpm, self.tokenizer = gpm, tokenizer
        self.batch_size, self.max_batch, self.window_s, self.max_length = batch_size, max_batch, window_s, max_length
        self.queue: queue.Queue[_Job] = queue.Queue()
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
            jobs = [self.queue.get()]
            size = len(jobs[0].prompts)
            deadline = time.monotonic() + self.window_s
            while size < self.max_batch:
                try:
                    job = self.queue.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                jobs.append(job)
                size += len(job.prompts)
            self._run(jobs)

    def _run(self, jobs: list[_Job]) -> None:
        prompts = [p for j in jobs for p in j.prompts]
        responses = [r for j in jobs for r in j.responses]
        try:
            if prompts:
                out = self.gpm.score(self.tokenizer, prompts, responses, batch_size=self.batch_size,
                                     max_length=self.max_length)
                emb, eig = out.embeddings, out.eigenvalues
            else:
                emb = eig = torch.zeros(0, 0)
            self.batches += 1
            start = 0
            for j in jobs:
                n = len(j.prompts)
                j.result = (emb[start : start + n], eig[start : start + n])
                start += n
        except BaseException as exc:  # noqa: BLE001 - hand the error to every caller of the batch
            for j in jobs:
                j.error = exc
        finally:
            self.requests += len(jobs)
            for j in jobs:
                j.done.set()


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


def build_server(gpm, tokenizer, host: str = "127.0.0.1", port: int = 0, model_name: str = "", **scorer_kw):
    scorer = GPMScorer(gpm, tokenizer, **scorer_kw)
    cfg = gpm.config

    def info(_h):
        return 200, {"axes": cfg.axes, "beta": cfg.beta, "embedding_dim": 2 * cfg.axes, "model": model_name,
                     "requests": scorer.requests, "batches": scorer.batches}

    def score(h):
        body = h.json()
        prompts, responses = body.get("prompts"), body.get("responses")
        if not isinstance(prompts, list) or not isinstance(responses, list):
            raise ValueError("body needs lists `prompts` and `responses`")
        emb, eig = scorer.score(prompts, responses)
        return 200, {"embeddings": emb.tolist(), "eigenvalues": eig.tolist(), "axes": cfg.axes, "beta": cfg.beta}

    routes = {("GET", "/healthz"): lambda h: (200, {"ok": True}), ("GET", "/info"): info, ("POST", "/score"): score}
    server = make_server(host, port, routes)
    server.scorer = scorer  # type: ignore[attr-defined]
    return server


def serve_gpm_main(argv: list[str] | None = None) -> int:
    """Entry of `gprl serve-gpm`."""
    p = argparse.ArgumentParser(prog="gprl serve-gpm", description="Serve a GPM: embeddings and eigenvalues over HTTP.")
    p.add_argument("--gpm", help="GPM folder (with its tokenizer), or world:gpm / world:bt")
    p.add_argument("--config", help="a run config (YAML or GPRLRun manifest): the GPM and its batch size from it "
                                    "(how the operator's GPM Deployment starts it); flags override")
    p.add_argument("--host", default="0.0.0.0")
    p.add_argument("--port", type=int, default=8001)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--batch-size", type=int, default=None, help="responses per forward pass (default 32)")
    p.add_argument("--max-batch", type=int, default=512, help="most responses gathered from concurrent requests")
    p.add_argument("--batch-window-ms", type=float, default=5.0, help="how long to wait for more requests")
    p.add_argument("--max-length", type=int, default=1024)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = p.parse_args(argv)
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
    server = build_server(gpm, tok, args.host, args.port, model_name=str(path), batch_size=args.batch_size,
                          max_batch=args.max_batch, window_s=args.batch_window_ms / 1000, max_length=args.max_length)
    return serve(server, f"[serve-gpm] {path} (k={gpm.config.axes}) on http://{args.host}:{server.server_address[1]}")


if __name__ == "__main__":
    raise SystemExit(serve_gpm_main())
