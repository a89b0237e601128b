#!/usr/bin/env bash
# Builds DeepSpeed's CPU ops once (JIT, g++ + ninja, ~1-2 min) into the torch-extensions cache
# (${TORCH_EXTENSIONS_DIR:-~/.cache/torch_extensions}) so that tests and runs do not pay it each time:
#   deepspeed_shm_comm  - shared-memory collectives of the CPU accelerator (used at init_distributed)
#   cpu_adam            - DeepSpeedCPUAdam, used when learner.offload_optimizer is on
# Idempotent: a warm cache makes this a ~5 s no-op. Usage: scripts/warm-deepspeed.sh [venv]
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
venv=${1:-$("$here/scripts/bootstrap.sh")}
exec "$venv/bin/python" - <<'PY'
import time, warnings
warnings.filterwarnings("ignore")
import deepspeed  # noqa: F401  (picks the CPU accelerator by itself on a machine without GPUs)
from deepspeed.accelerator import get_accelerator

acc = get_accelerator()
for name in ("ShareMemCommBuilder", "CPUAdamBuilder"):
    t0 = time.perf_counter()
    builder = acc.create_op_builder(name)
    if builder is None or not builder.is_compatible(verbose=False):
        print(f"[warm-deepspeed] {name}: not compatible here, skipped")
        continue
    builder.load(verbose=False)
    print(f"[warm-deepspeed] {name} ({builder.name}) ready in {time.perf_counter() - t0:.1f}s")
PY
