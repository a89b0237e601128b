"""Helpers of the closed drift loop's cluster tests and benchmark (tests/cluster/test_drift_loop_e2e.py,
benchmarks/drift_loop.py): tiny local assets, a real `gprl train` process started the way the operator's pod
starts it, a status-history watcher, an API server restart, per-axis GPM scores against the reference."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Optional

import yaml

from gprl_k8s_testlib import RUNS, free_port, wait_for

TOY_WORDS = ["<pad>", "<eos>", "<bos>", "<unk>", "rock", "paper", "scissors", "good", "the", "a", "of", "and",
             "x", "y", "z", "w", "which", "wins"]
PROMPTS = ["rock", "paper", "scissors", "good the", "a of x", "which wins y"]


# --------------------------------------------------------------------------------------
# assets: a tiny policy and a k=3 GPM built locally in seconds (the approach of tests/unit/test_trainer.py)


def build_assets(root: Path) -> Path:
    """Policy (tiny Llama, seed 0) + GPM (k = 3, random eigenvalue gate) + prompts. In the toy, the variance
    spectrum drifts towards axis 0 as the policy trains (the exploited axis), and the policy's axis-0 score
    against the reference keeps growing when nothing holds it."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from gprl.gpm import GeneralPreferenceModel, GPMConfig

    root = Path(root)
    if (root / "done").exists():
        return root
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(TOY_WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tt = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>",
                                 unk_token="<unk>")
    cfg = LlamaConfig(vocab_size=len(TOY_WORDS), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)
    state = torch.get_rng_state()
    torch.manual_seed(0)
    policy = LlamaForCausalLM(cfg)
    policy.generation_config.pad_token_id = tt.pad_token_id
    policy.save_pretrained(root / "policy")
    tt.save_pretrained(root / "policy")
    gpm = GeneralPreferenceModel.from_backbone_config(cfg, GPMConfig(axes=3))
    torch.nn.init.normal_(gpm.eigenvalue_gate.weight, std=1.0)
    gpm.save_pretrained(root / "gpm")
    torch.set_rng_state(state)
    (root / "prompts.jsonl").write_text("".join(json.dumps({"prompt": w}) + "\n" for w in PROMPTS))
    (root / "done").write_text("ok")
    return root


def run_spec(assets: Path, mode: str = "operator", steps: int = 80, **drift: Any) -> dict:
    """A GPRLRun spec (camelCase) of the toy run."""
    return {
        "seed": 3,
        "model": {"policy": str(assets / "policy")},
        "gpm": {"path": str(assets / "gpm"), "axes": 3},
        "data": {"prompts": str(assets / "prompts.jsonl")},
        "algo": {"steps": steps, "promptsPerStep": 2, "groupSize": 4, "microBatchSize": 8, "learningRate": 3e-3},
        "rollout": {"maxNewTokens": 6},
        "drift": {"mode": mode, "warmupSteps": 3, "tau": 0.05, "reportIntervalSeconds": 0.2, **drift},
        "checkpoint": {"everySteps": 100000, "keepLast": 1},
        "output": {"evalEvery": 0, "evalPrompts": 2, "report": False, "progress": False},  # the rest feed the probe
        "resources": {"gpus": 0, "cpu": "1", "memory": "2Gi"},
    }


# --------------------------------------------------------------------------------------
# the trainer, started as the operator's pod would start it


def _env_value(item: dict, namespace: str, pod: str) -> Optional[str]:
    if "value" in item:
        return item["value"]
    ref = (item.get("valueFrom") or {}).get("fieldRef", {}).get("fieldPath", "")
    if ref == "metadata.namespace":
        return namespace
    if ref == "metadata.name":
        return pod
    if "job-completion-index" in ref:
        return "0"
    return None


class PodTrainer:
    """`gprl train` with the Job's container command and environment (read back from the API server), the
    ConfigMap's config.yaml, and a TokenRequest token of the run's own ServiceAccount: the identity, RBAC and
    configuration of the operator's pod. Only paths change: the config file, output.dir and HOME live in a temp
    folder, and the metrics port is a free one."""

    def __init__(self, cp, namespace: str, run: str, workdir: Path, extra_env: Optional[dict] = None):
        self.cp, self.ns, self.run, self.workdir = cp, namespace, run, Path(workdir)
        self.extra_env = extra_env or {}
        self.proc: Optional[subprocess.Popen] = None
        self.log = self.workdir / "trainer.log"

    def start(self) -> "PodTrainer":
        cp, ns, run = self.cp, self.ns, self.run
        self.workdir.mkdir(parents=True, exist_ok=True)
        job = wait_for(lambda: cp.request_raw("GET", f"/apis/batch/v1/namespaces/{ns}/jobs/{run}",
                                              token=cp.admin_token)[1] if cp.request_raw(
            "GET", f"/apis/batch/v1/namespaces/{ns}/jobs/{run}", token=cp.admin_token)[0] == 200 else None,
            90, what=f"Job {ns}/{run}")
        pod = job["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        cm = cp.request("GET", f"/api/v1/namespaces/{ns}/configmaps/{run}-config")
        cfg = yaml.safe_load(cm["data"]["config.yaml"])
        self.out = self.workdir / "out"
        cfg["output"]["dir"] = str(self.out)
        self.metrics_port = cfg["output"]["metricsPort"] = free_port()
        self.config = self.workdir / "config.yaml"
        self.config.write_text(yaml.safe_dump(cfg, sort_keys=False))
        # the pod's ServiceAccount, and a token of it (what the kubelet projects into the pod)
        account = pod["serviceAccountName"]
        token = cp.request("POST", f"/api/v1/namespaces/{ns}/serviceaccounts/{account}/token",
                           {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
                            "spec": {"expirationSeconds": 3600}})["status"]["token"]
        token_file = self.workdir / "token"
        token_file.write_text(token)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("KUBERNETES_", "GPRL_"))}
        for item in container["env"]:
            value = _env_value(item, ns, f"{run}-0-abcde")
            if value is None:
                continue
            if value.startswith("/home/gprl"):
                value = str(self.workdir / "home") + value[len("/home/gprl"):]
            env[item["name"]] = value
        env.update({
            "GPRL_KUBE_API": cp.server, "GPRL_KUBE_CA": cp.ca_file, "GPRL_KUBE_TOKEN_FILE": str(token_file),
            "GPRL_CONTROL_POLL_SECONDS": "0.2", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
            "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1",
            **self.extra_env,
        })
        argv = list(container["command"])
        assert argv[:2] == ["gprl", "train"], argv
        argv[0] = str(Path(sys.executable).parent / "gprl")
        argv[argv.index("--config") + 1] = str(self.config)
        (self.workdir / "home").mkdir(parents=True, exist_ok=True)
        self._fh = open(self.log, "ab")
        self.proc = subprocess.Popen(argv, env=env, stdout=self._fh, stderr=subprocess.STDOUT, cwd=self.workdir,
                                     start_new_session=True)
        self.argv, self.env = argv, env
        return self

    def wait(self, timeout: float = 600) -> int:
        try:
            rc = self.proc.wait(timeout)
        finally:
            self._fh.close()
        return rc

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def records(self) -> list[dict]:
        path = self.out / "steps.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


# --------------------------------------------------------------------------------------
# the run's status history (a watch on one object: every version the API server stores)


class StatusHistory:
    def __init__(self, cp, namespace: str, name: str):
        self.cp, self.ns, self.name = cp, namespace, name
        self.versions: list[dict] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def start(self) -> "StatusHistory":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _loop(self) -> None:
        rv = None
        path = f"{RUNS}/namespaces/{self.ns}/gprlruns"
        while not self._stop.is_set():
            q = f"?watch=1&fieldSelector=metadata.name%3D{self.name}&timeoutSeconds=30&allowWatchBookmarks=false"
            if rv:
                q += f"&resourceVersion={rv}"
            try:
                with self.cp._open("GET", path + q, token=self.cp.admin_token, timeout=40) as r:
                    for line in r:
                        if self._stop.is_set():
                            return
                        ev = json.loads(line)
                        obj = ev.get("object") or {}
                        if ev.get("type") == "ERROR":
                            rv = None
                            break
                        rv = obj.get("metadata", {}).get("resourceVersion", rv)
                        if ev.get("type") in ("ADDED", "MODIFIED"):
                            self.versions.append({"at": time.time(), "status": obj.get("status") or {}})
            except Exception:  # noqa: BLE001 - the API server may be down (fault test): retry
                time.sleep(0.3)

    def controls(self) -> list[dict]:
        """Distinct control blocks by generation, in order."""
        out: dict[int, dict] = {}
        for v in self.versions:
            c = v["status"].get("control") or {}
            if isinstance(c.get("generation"), int) and c["generation"] not in out:
                out[c["generation"]] = c
        return [out[g] for g in sorted(out)]

    def acked(self) -> list[int]:
        seen = []
        for v in self.versions:
            g = (v["status"].get("training") or {}).get("appliedControlGeneration")
            if g is not None and (not seen or seen[-1] != g):
                seen.append(g)
        return seen

    def conditions(self, ctype: str) -> list[dict]:
        out = []
        for v in self.versions:
            for c in v["status"].get("conditions") or []:
                if c.get("type") == ctype and (not out or (out[-1]["status"], out[-1]["reason"]) != (c["status"], c["reason"])):
                    out.append(c)
        return out


# --------------------------------------------------------------------------------------
# an API server restart (same flags, same PKI and tokens, same port and etcd: a real restart, not a new cluster)


RESTARTS: list[tuple[float, float]] = []  # (stopped, ready) wall-clock times of the restarts of this process


def stop_apiserver(cp) -> list[str]:
    """Stop the API server (SIGTERM, then SIGKILL); returns its argv for start_apiserver."""
    from gprl.devcluster.controlplane import ControlPlane

    RESTARTS.append((time.time(), float("inf")))
    (old,) = [p for p in cp.procs if p.name == "kube-apiserver"]
    argv = list(old.popen.args)
    ControlPlane._terminate(old)
    cp.procs.remove(old)
    return argv


def start_apiserver(cp, argv: list[str]) -> None:
    new = cp._spawn("kube-apiserver", argv)
    cp._wait(new, lambda: cp._get_status("/readyz") == 200, "/readyz after restart")
    RESTARTS[-1] = (RESTARTS[-1][0], time.time())


def restart_apiserver(cp, down_seconds: float = 3.0) -> None:
    argv = stop_apiserver(cp)
    time.sleep(down_seconds)
    start_apiserver(cp, argv)


def outside_restarts(lines: list[str], grace: float = 20.0) -> list[str]:
    """Log lines not written while the API server restarted (or in the seconds after /readyz, while its RBAC
    authorizer still fills its caches and answers 403 to everyone but system:masters)."""
    import datetime as dt

    out = []
    for ln in lines:
        try:
            t = dt.datetime.strptime(ln[1:20], "%Y-%m-%d %H:%M:%S").timestamp()
        except ValueError:
            out.append(ln)
            continue
        if not any(a - 1 <= t <= b + grace for a, b in RESTARTS):
            out.append(ln)
    return out


def events(cp, namespace: str, name: str) -> list[dict]:
    body = cp.request("GET", f"/api/v1/namespaces/{namespace}/events?fieldSelector=involvedObject.name%3D{name}")
    return body["items"]
