"""The few torch.distributed helpers the trainer needs; every one is a no-op in a single process.

A multi-rank run is launched by `torchrun` (or DeepSpeed's launcher, or an indexed Kubernetes Job) which sets
RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT; the DeepSpeed learner initialises the process group
(gloo on CPUs, NCCL on GPUs — DeepSpeed picks it from its accelerator).
"""

from __future__ import annotations

import os
import socket

import torch


def is_distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def rank() -> int:
    return torch.distributed.get_rank() if is_distributed() else int(os.environ.get("RANK", "0"))


def world_size() -> int:
    return torch.distributed.get_world_size() if is_distributed() else 1


def barrier() -> None:
    if is_distributed():
        torch.distributed.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum of t over ranks (a new CPU float64 tensor; t is untouched)."""
    out = t.detach().to("cpu", torch.float64).clone()
    if is_distributed() and world_size() > 1:
        dev = _comm_device()
        out = out.to(dev)
        torch.distributed.all_reduce(out, op=torch.distributed.ReduceOp.SUM)
        out = out.cpu()
    return out


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    return all_reduce_sum(t) / world_size()


def all_reduce_max(value: int) -> int:
    """The largest of every rank's integer (ranks agreeing on a status: 0 = fine on every rank)."""
    if not is_distributed() or world_size() == 1:
        return int(value)
    t = torch.tensor([int(value)], dtype=torch.int64, device=_comm_device())
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return int(t.item())


def broadcast_object(obj, src: int = 0):
    if not is_distributed() or world_size() == 1:
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=src)
    return box[0]


def _comm_device() -> torch.device:
    backend = torch.distributed.get_backend()
    if backend == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def shutdown() -> None:
    """Meet the other ranks, then tear the process group down before the interpreter exits (left to interpreter
    teardown, a ZeRO-3 run's gloo threads can abort the process: "terminate called without an active exception")."""
    if is_distributed():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ensure_env_for_single_process() -> None:
    """Without a launcher, make this process rank 0 of 1 on loopback (so DeepSpeed can start)."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return
    os.environ.update(
        RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(free_port()),
    )
