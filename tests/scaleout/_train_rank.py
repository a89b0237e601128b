"""One rank of `gprl train` under torchrun, writing its pid where the kill test can find it."""

import os
import sys
from pathlib import Path

import torch

if __name__ == "__main__":
    torch.set_num_threads(1)
    from gprl.config import load_config
    from gprl.trainer import Trainer

    spec = load_config(sys.argv[1])
    pids = Path(spec.output.dir) / "pids"
    pids.mkdir(parents=True, exist_ok=True)
    (pids / f"rank-{os.environ['RANK']}.pid").write_text(str(os.getpid()))
    Trainer(spec, log=lambda m: print(f"[rank {os.environ['RANK']}] {m}", flush=True)).train()
    from gprl.distributed import shutdown

    shutdown()
