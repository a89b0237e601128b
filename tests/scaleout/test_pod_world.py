"""The learner Job's launch, run the way the drift-loop e2e runs pods: two "pods" as two process groups started with
the container command and environment the operator writes into the Job (torchrun, PET_* settings, node rank from
the completion index), two CPU ranks each (gloo), one DeepSpeed world of 4. It trains; pod 1 is killed (SIGKILL
of its whole process group, as when a node dies); both pods are started again — what the Job controller does
with the failed indices — and the world resumes from the newest checkpoint and finishes.

Only what a cluster would provide differs: the rendezvous address (pod 0's name in the headless Service) is
loopback, the config file, output folder (the shared checkpoint claim) and HOME are temp folders, and
`gprl` / `torchrun` are this interpreter's."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

pytestmark = [pytest.mark.deepspeed, pytest.mark.slow]
pytest.importorskip("deepspeed")

REPO = Path(__file__).resolve().parents[2]
if str(REPO / "operator") not in sys.path:
    sys.path.insert(0, str(REPO / "operator"))

PODS, RANKS_PER_POD, STEPS = 2, 2, 24  # enough steps that the kill lands mid-run


def run_object(assets: Path) -> dict:
    spec = {
        "seed": 3,
        "model": {"policy": str(assets / "policy")},
        "gpm": {"path": str(assets / "gpm"), "axes": 3},
        "data": {"prompts": str(assets / "prompts.jsonl")},
        "algo": {"steps": STEPS, "promptsPerStep": 4, "groupSize": 2, "microBatchSize": 4, "learningRate": 1e-3},
        "rollout": {"maxNewTokens": 4},
        "drift": {"warmupSteps": 1, "probeEvery": 0},
        "learner": {"backend": "deepspeed", "zeroStage": 2},
        "checkpoint": {"everySteps": 1, "keepLast": 2},
        "output": {"report": False, "evalPrompts": 4, "evalSamples": 1},
        "resources": {"learnerReplicas": PODS, "gpus": 0, "learnerProcessesPerPod": RANKS_PER_POD},
    }
    return {"apiVersion": "gprl.dev/v1alpha1", "kind": "GPRLRun",
            "metadata": {"name": "world", "namespace": "ml", "uid": "u-world", "generation": 1}, "spec": spec}


def _extensions_dir() -> str:
    """torch's JIT-extension folder for this interpreter (the HOME of the "pods" is elsewhere)."""
    from torch.utils.cpp_extension import _get_build_directory

    return str(Path(_get_build_directory("cpu_adam", verbose=False)).parent)


def pod_env(container: dict, index: int, home: Path, port: int) -> dict[str, str]:
    """The container's env as the kubelet would resolve it for pod `index` of the indexed Job."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KUBERNETES_", "GPRL_", "PET_"))}
    for item in container["env"]:
        ref = ((item.get("valueFrom") or {}).get("fieldRef") or {}).get("fieldPath", "")
        value = item.get("value")
        if "job-completion-index" in ref:
            value = str(index)
        elif ref == "metadata.namespace":
            value = "ml"
        elif ref == "metadata.name":
            value = f"world-{index}-abcde"
        if value is None:
            continue
        if value.startswith("/home/gprl"):
            value = str(home) + value[len("/home/gprl"):]
        env[item["name"]] = value
    # DeepSpeed's CPU ops as scripts/warm-deepspeed.sh built them (in the image they are built in)
    env.setdefault("TORCH_EXTENSIONS_DIR", _extensions_dir())
    env.update(PET_MASTER_ADDR="127.0.0.1", PET_MASTER_PORT=str(port), TMPDIR=str(home / "tmp"),
               OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    return env


def argv_of(container: dict, config: Path) -> list[str]:
    argv = list(container["command"])
    assert argv[0] == "torchrun" and "--no-python" in argv, argv
    argv[argv.index("--config") + 1] = str(config)
    gprl = argv.index("gprl")
    argv[gprl] = str(Path(sys.executable).parent / "gprl")
    return [sys.executable, "-m", "torch.distributed.run", *argv[1:]]


def _tree(pid: int) -> list[int]:
    """pid and all its descendants (torchrun starts each rank in a session of its own, so a process group is not
    the whole "pod")."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children.get(p, [])
    return out


def kill_pod(proc: subprocess.Popen) -> None:
    """SIGKILL the pod's agent and every rank, as when its container dies."""
    for pid in _tree(proc.pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


class Pods:
    def __init__(self, container: dict, config: Path, tmp: Path, tag: str):
        from gprl.distributed import free_port

        port = free_port()
        self.procs, self.logs = [], []
        for i in range(PODS):
            home = tmp / f"pod-{i}-{tag}"
            (home / "tmp").mkdir(parents=True, exist_ok=True)
            log = tmp / f"pod-{i}-{tag}.log"
            self.logs.append(log)
            self.procs.append(subprocess.Popen(argv_of(container, config), env=pod_env(container, i, home, port),
                                               stdout=open(log, "w"), stderr=subprocess.STDOUT, cwd=home,
                                               start_new_session=True))

    def text(self) -> str:
        return "\n".join(f"--- pod {i}\n" + p.read_text(errors="replace")[-3000:] for i, p in enumerate(self.logs))

    def wait(self, timeout: float) -> list[int]:
        deadline = time.time() + timeout
        for p in self.procs:
            p.wait(max(1.0, deadline - time.time()))
        return [p.returncode for p in self.procs]

    def kill(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                kill_pod(p)
                p.wait(10)


def test_two_pods_of_two_ranks_train_are_killed_and_resume(tiny_assets, warm_deepspeed, tmp_path):
    from gprl_operator.children import build_children, rendered_config

    run = run_object(tiny_assets)
    job = next(c for c in build_children(run) if c["kind"] == "Job")
    (container,) = job["spec"]["template"]["spec"]["containers"]
    cfg = rendered_config(run)  # the ConfigMap's config.yaml
    out = tmp_path / "checkpoints"  # the shared checkpoint claim
    cfg["output"].update(dir=str(out), metricsPort=0)
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(cfg, sort_keys=False))

    first = Pods(container, config, tmp_path, "a")
    try:
        deadline = time.time() + 240
        while not list((out / "checkpoints").glob("step-*/manifest.json")):  # a complete checkpoint
            assert all(p.poll() is None for p in first.procs), first.text()
            assert time.time() < deadline, first.text()
            time.sleep(0.2)
        kill_pod(first.procs[1])  # pod 1 dies with its agent and both its ranks
        rcs = first.wait(180)
    finally:
        first.kill()
    assert rcs[0] != 0, "pod 0's ranks should fail when pod 1's ranks are gone\n" + first.text()
    done = [json.loads(ln)["step"] for ln in (out / "steps.jsonl").read_text().splitlines()]
    assert 1 <= len(done) < STEPS, first.text()  # killed mid-run, after a checkpoint

    second = Pods(container, config, tmp_path, "b")
    try:
        rcs = second.wait(300)
    finally:
        second.kill()
    text = second.text()
    assert rcs == [0, 0], text
    assert "resumed from" in text, text
    recs = [json.loads(ln) for ln in (out / "steps.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == list(range(1, STEPS + 1))
    assert all(r["world_size"] == PODS * RANKS_PER_POD for r in recs)  # 2 pods x 2 ranks, one world
    assert (out / "checkpoints" / f"step-{STEPS:08d}" / "policy" / "config.json").exists()
