"""NCCL weight-sync bandwidth on one GPU: the learner and a rollout server as two processes on the same card.

The server is the real `build_server` (gprl/serving/rollout_server.py) with an engine that only counts what it
loads, so the number is the transport (gprl/serving/weight_sync.py with backend="nccl": begin/receive/commit over
HTTP, one NCCL broadcast per tensor) and the checks, not vLLM's reload. Prepared for a lent GPU; not run here.

    python benchmarks/gpu/nccl_weight_sync.py --gb 1 2 4      # prints GB/s per size, one push each
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import threading
import time


def _manifest(gb: float, dtype):
    from gprl.serving.weights import TensorSpec

    n, side = int(gb * 2**30 / 2 / (4096 * 4096)) or 1, 4096  # bf16 4096x4096 "layers"
    return {f"layer.{i}.weight": TensorSpec((side, side), dtype) for i in range(n)}


def server(port_q, gb: float) -> None:
    import torch

    from gprl.serving.rollout_server import build_server

    class CountingEngine:
        version, model = 0, "nccl-bench"

        def weight_manifest(self):
            return _manifest(gb, torch.bfloat16)

        def generate_ids(self, *a, **kw):
            raise NotImplementedError

        def load_weights(self, weights, version):
            for _ in weights:
                pass
            self.version = version

    srv = build_server(CountingEngine(), "127.0.0.1", 0)
    port_q.put(srv.server_address[1])
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    threading.Event().wait()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gb", type=float, nargs="+", default=[1.0, 2.0])
    args = ap.parse_args()
    import torch

    from gprl.serving.weight_sync import CollectiveSender

    assert torch.cuda.is_available(), "needs a GPU"
    results = []
    for gb in args.gb:
        q = mp.get_context("spawn").Queue()
        proc = mp.get_context("spawn").Process(target=server, args=(q, gb), daemon=True)
        proc.start()
        url = f"http://127.0.0.1:{q.get(timeout=300)}"
        manifest = _manifest(gb, torch.bfloat16)
        weights = {n: torch.randn(s.shape, dtype=s.dtype, device="cuda") for n, s in manifest.items()}
        nbytes = sum(t.numel() * t.element_size() for t in weights.values())
        sender = CollectiveSender({}, backend="nccl")
        sender.form([url])
        sender.push(weights, 1, list(manifest))  # warm-up (NCCL communicator set-up)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        (out,) = sender.push(weights, 2, list(manifest))
        torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        results.append({"gb": nbytes / 2**30, "seconds": dt, "gb_per_s": nbytes / 2**30 / dt,
                        "server_transfer_seconds": out["transfer_seconds"], "load_seconds": out["load_seconds"]})
        print(json.dumps(results[-1]), flush=True)
        proc.kill()
    print("RESULT " + json.dumps({"device": torch.cuda.get_device_name(0), "results": results}))


if __name__ == "__main__":
    main()
