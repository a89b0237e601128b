"""Shared by the scale-out tests and the processes they launch (no pytest import here)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]


def fixed_batch(vocab: int, seed: int = 0, prompts: int = 4, group: int = 4, width: int = 5, T: int = 6):
    """A deterministic RolloutBatch (left-padded prompts, ragged responses) and advantages."""
    from gprl.rollout.base import RolloutBatch

    g = torch.Generator().manual_seed(seed)
    n = prompts * group
    prompt_ids = torch.randint(4, vocab, (prompts, width), generator=g).repeat_interleave(group, 0)
    plen = torch.randint(2, width + 1, (prompts,), generator=g).repeat_interleave(group, 0)
    pmask = (torch.arange(width)[None, :] >= (width - plen)[:, None]).long()
    prompt_ids = torch.where(pmask.bool(), prompt_ids, torch.zeros_like(prompt_ids))
    resp = torch.randint(4, vocab, (n, T), generator=g)
    rlen = torch.randint(1, T + 1, (n,), generator=g)
    rmask = (torch.arange(T)[None, :] < rlen[:, None]).long()
    resp = torch.where(rmask.bool(), resp, torch.zeros_like(resp))
    batch = RolloutBatch(
        prompts=[f"p{i // group}" for i in range(n)], responses=[f"r{i}" for i in range(n)],
        sequences=torch.cat([prompt_ids, resp], 1), attention_mask=torch.cat([pmask, rmask], 1),
        response_mask=rmask, prompt_width=width, group_size=group, policy_version=0,
    )
    adv = torch.randn(n, generator=g)
    return batch, adv


def shard(batch, adv, rank: int, world: int):
    """Rank's contiguous share of the batch (whole groups)."""
    from dataclasses import replace

    n = batch.sequences.shape[0]
    per = n // world
    rows = slice(rank * per, (rank + 1) * per)
    return (
        replace(batch, prompts=batch.prompts[rows], responses=batch.responses[rows], sequences=batch.sequences[rows],
                attention_mask=batch.attention_mask[rows], response_mask=batch.response_mask[rows]),
        adv[rows],
    )


def equivalence_spec(policy_dir: str, stage: int, offload: bool = False, backend: str = "deepspeed"):
    """ZeRO-3 runs every row's prompt (model.sharePrompt is off there): the torch reference for stage 3 does too,
    so that both sum the same numbers in the same order."""
    from gprl.config import parse_config

    return parse_config({
        "model": {"policy": policy_dir, "share_prompt": stage != 3},
        "algo": {"micro_batch_size": 3, "learning_rate": 5e-3, "steps": 3, "max_grad_norm": 0.5, "kl_coef": 0.1},
        "learner": {"backend": backend, "zero_stage": stage, "offload_optimizer": offload},
    })


def python() -> str:
    return sys.executable


def torchrun(args: list[str], nproc: int = 2, env: dict | None = None, timeout: float = 600, max_restarts: int = 0,
             log: Path | None = None, popen: bool = False):
    """Launch `python -m torch.distributed.run --standalone` on loopback with this interpreter."""
    cmd = [python(), "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           f"--max_restarts={max_restarts}", "--monitor_interval=0.5", *args]
    full_env = dict(os.environ)
    full_env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
                    PYTHONPATH=os.pathsep.join([str(REPO), full_env.get("PYTHONPATH", "")]))
    full_env.update(env or {})
    out = open(log, "w") if log else subprocess.PIPE
    if popen:
        return subprocess.Popen(cmd, env=full_env, stdout=out, stderr=subprocess.STDOUT, text=True, cwd=REPO)
    return subprocess.run(cmd, env=full_env, stdout=out, stderr=subprocess.STDOUT, text=True, timeout=timeout, cwd=REPO)
