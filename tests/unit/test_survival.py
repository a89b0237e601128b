"""What production does to a run: SIGTERM, broken checkpoints, NaNs, two trainers on one folder, user errors.

Tiny locally built policy and GPM (tests/conftest.py); one subprocess run for the signal test, the rest in-process.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from tests.unit.test_trainer import spec_for

ROOT = Path(__file__).resolve().parents[2]
quiet = lambda *_: None  # noqa: E731


def _weights(folder: Path) -> dict:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def _steps(run: Path) -> list[dict]:
    p = run / "steps.jsonl"
    return [json.loads(line) for line in p.read_text().splitlines()] if p.exists() else []


def test_sigterm_checkpoints_the_current_step_exits_0_and_resume_is_exact(tiny_assets, tmp_path):
    from gprl.trainer import Trainer

    steps = 4
    cut = tmp_path / "cut"
    spec = spec_for(tiny_assets, cut, **{"algo.steps": steps, "checkpoint.every_steps": 100, "output.report": False})
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump(spec.to_dict()))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": f"{ROOT}:{ROOT / 'operator'}"}
    proc = subprocess.Popen(
        [sys.executable, "-c", "import sys, torch; torch.set_num_threads(1); from gprl.cli import main; "
         "sys.exit(main(sys.argv[1:]))", "train", "--config", str(cfg)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    deadline = time.monotonic() + 300
    while not _steps(cut) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()[0]
    proc.send_signal(signal.SIGTERM)
    t0 = time.monotonic()
    out, _ = proc.communicate(timeout=120)
    took = time.monotonic() - t0
    assert proc.returncode == 0, out
    assert took < 60, f"{took:.1f} s from SIGTERM to exit"  # far inside the operator's default 600 s grace period
    done = _steps(cut)
    assert 1 <= len(done) < steps, out
    ckpts = sorted(p.name for p in (cut / "checkpoints").glob("step-*"))
    assert ckpts == [f"step-{len(done):08d}"], (ckpts, out)  # the step it was in, no periodic one was due
    assert "stopped by SIGTERM" in out and "Rerun the same command to resume" in out

    Trainer(spec_for(tiny_assets, cut, **{"algo.steps": steps, "checkpoint.every_steps": 100,
                                           "output.report": False}), log=quiet).train()
    full = tmp_path / "full"
    Trainer(spec_for(tiny_assets, full, **{"algo.steps": steps, "checkpoint.every_steps": 100,
                                            "output.report": False}), log=quiet).train()
    a = _weights(full / "checkpoints" / f"step-{steps:08d}" / "policy")
    b = _weights(cut / "checkpoints" / f"step-{steps:08d}" / "policy")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k  # bitwise: same data order, RNG, optimizer state
    assert [r["step"] for r in _steps(cut)] == list(range(1, steps + 1))


def test_truncated_newest_checkpoint_is_skipped_with_a_message_and_temps_removed(tiny_assets, tmp_path):
    from gprl.trainer import Trainer

    run = tmp_path / "run"
    Trainer(spec_for(tiny_assets, run, **{"algo.steps": 2, "output.report": False}), log=quiet).train()
    newest = run / "checkpoints" / "step-00000002"
    f = newest / "policy" / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])  # a disk that lost the tail of the file
    stale = run / "checkpoints" / ".step-00000003.tmp-x1y2"
    stale.mkdir()
    (stale / "junk.bin").write_bytes(b"0" * 100)
    lines: list[str] = []
    t = Trainer(spec_for(tiny_assets, run, **{"algo.steps": 3, "output.report": False}), log=lines.append)
    t.train()
    text = "\n".join(lines)
    assert f"skipping checkpoint {newest}: policy/model.safetensors has" in text
    assert "resumed from" in text and "step-00000001 at step 1" in text
    assert f"removed {stale}" in text and not stale.exists()
    assert [r["step"] for r in _steps(run)] == [1, 2, 3]


def test_trainer_state_is_json_and_safetensors_not_a_pickle(tiny_assets, tmp_path):
    from gprl.trainer import Trainer

    run = tmp_path / "run"
    Trainer(spec_for(tiny_assets, run, **{"algo.steps": 1, "output.report": False}), log=quiet).train()
    ckpt = run / "checkpoints" / "step-00000001"
    names = {p.name for p in ckpt.iterdir()}
    assert {"trainer_state.json", "trainer_state.safetensors", "manifest.json"} <= names
    assert not list(ckpt.rglob("*.pt")) and not list(ckpt.rglob("*.pkl"))
    manifest = json.loads((ckpt / "manifest.json").read_text())["files"]
    assert "policy/model.safetensors" in manifest and "trainer_state.json" in manifest


def _nan_gpm(trainer, where):
    """Make the GPM return a NaN at `where` ("embedding" of the first response, or every "eigenvalue")."""
    score = trainer.gpm.score

    def patched(*a, **kw):
        out = score(*a, **kw)
        if where == "embedding":
            out.embeddings = out.embeddings.clone()
            out.embeddings[0, 0] = float("nan")
        else:
            out.eigenvalues = torch.full_like(out.eigenvalues, float("nan"))
        return out

    trainer.gpm.score = patched


def test_nan_in_gpm_output_is_counted_excluded_and_never_reaches_weights_or_checkpoints(tiny_assets, tmp_path):
    from gprl.trainer import Trainer

    run = tmp_path / "run"
    lines: list[str] = []
    t = Trainer(spec_for(tiny_assets, run, **{"algo.steps": 2, "output.samples_every": 1, "output.samples_groups": 2}),
                log=lines.append)
    _nan_gpm(t, "embedding")
    records = t.train()
    assert [r["gpm_nonfinite"] for r in records] == [1, 1]
    assert all(torch.isfinite(p).all() for p in t.policy.parameters())
    for ckpt in (run / "checkpoints").glob("step-*"):
        assert all(torch.isfinite(v).all() for v in _weights(ckpt / "policy").values()), ckpt
    assert all(x == x for r in records for x in r["axis_variance"] + r["spectrum"])  # no NaN reached the monitor
    assert sum("non-finite outputs for 1 responses" in line for line in lines) == 2
    samples = [json.loads(line) for line in (run / "samples.jsonl").read_text().splitlines()]
    group0 = [s for s in samples if s["step"] == 1 and s["group"] == 0]
    assert group0 and all(s["advantage"] == 0.0 for s in group0) and group0[0]["gpm_nonfinite"]
    assert any(s["advantage"] != 0.0 for s in samples if s["group"] == 1)  # the other group still learns
    assert [json.loads(line)["gpm_nonfinite"] for line in (run / "steps.jsonl").read_text().splitlines()] == [1, 1]
    body = t.metrics.registry.get_sample_value("gprl_gpm_nonfinite_responses_total", {"run": t.metrics.run})
    assert body == 2.0


def test_all_nan_eigenvalues_leave_the_drift_monitor_untouched(tiny_assets, tmp_path):
    from gprl.trainer import Trainer

    lines: list[str] = []
    t = Trainer(spec_for(tiny_assets, tmp_path / "run", **{"algo.steps": 1}), log=lines.append)
    before = t.monitor.state_dict()
    _nan_gpm(t, "eigenvalue")
    rec = t.train()[0]
    assert rec["gpm_nonfinite"] == 8 and rec["advantage_abs_mean"] == 0.0
    after = t.monitor.state_dict()
    assert after.pop("rejected") == before.pop("rejected") + 1  # the monitor counts what it refused
    assert after == before
    assert any("non-finite drift statistics; the drift monitor skips them" in line for line in lines)
    assert all(torch.isfinite(p).all() for p in t.policy.parameters())


def test_non_finite_loss_skips_the_update(tiny_assets, tmp_path):
    from gprl.trainer import Trainer

    run = tmp_path / "run"
    lines: list[str] = []
    t = Trainer(spec_for(tiny_assets, run, **{"algo.steps": 1, "output.report": False}), log=lines.append)
    before = {n: p.detach().clone() for n, p in t.policy.named_parameters()}
    loss_of = t.learner.micro_batch_loss

    def nan_loss(*a, **kw):
        loss, parts = loss_of(*a, **kw)
        return loss * float("nan"), parts

    t.learner.micro_batch_loss = nan_loss
    rec = t.train()[0]
    assert rec["update_skipped"] == 1 and rec["policy_version"] == 0
    assert any("update was skipped" in line for line in lines)
    for n, p in t.policy.named_parameters():
        assert torch.equal(p, before[n]), n
    saved = _weights(run / "checkpoints" / "step-00000001" / "policy")
    assert all(torch.isfinite(v).all() for v in saved.values())


def test_second_trainer_on_a_folder_is_refused_naming_the_holder(tiny_assets, tmp_path, capsys):
    from gprl.checkpoint import OutputLock
    from gprl.cli import main

    run = tmp_path / "run"
    run.mkdir()
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump(spec_for(tiny_assets, run, **{"algo.steps": 1}).to_dict()))
    held = OutputLock(run).acquire()  # the first trainer (an flock conflicts across open files, even in-process)
    try:
        assert main(["train", "--config", str(cfg)]) == 2
    finally:
        held.release()
    err = capsys.readouterr().err
    assert f"output.dir {run} is in use by another trainer (pid {os.getpid()} on host" in err
    assert not (run / "steps.jsonl").exists()


def test_resume_false_on_a_used_folder_is_refused_unless_overwrite(tiny_assets, tmp_path, capsys):
    from gprl.cli import main

    run = tmp_path / "run"
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump(spec_for(tiny_assets, run, **{"algo.steps": 1, "output.report": False}).to_dict()))
    assert main(["train", "--config", str(cfg)]) == 0
    first = (run / "steps.jsonl").read_text()
    assert main(["train", "--config", str(cfg), "--checkpoint.resume", "false"]) == 2
    err = capsys.readouterr().err
    assert f"output.dir {run} holds a run" in err and "output.overwrite: true" in err
    assert (run / "steps.jsonl").read_text() == first  # nothing lost
    assert main(["train", "--config", str(cfg), "--checkpoint.resume", "false", "--overwrite-output"]) == 0
    assert len(_steps(run)) == 1 and sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-00000001"]


@pytest.mark.parametrize("case", ["output_is_a_file", "prompts_is_a_folder", "policy_is_the_gpm", "disk_full"])
def test_user_errors_exit_2_naming_the_field(tiny_assets, tmp_path, capsys, monkeypatch, case):
    from gprl.cli import main

    over = {"algo.steps": 1, "output.report": False}
    expect = ""
    if case == "output_is_a_file":
        (tmp_path / "taken").write_text("x")
        over["output.dir"], expect = str(tmp_path / "taken"), f"output.dir {tmp_path / 'taken'} is not a folder"
    elif case == "prompts_is_a_folder":
        (tmp_path / "empty").mkdir()  # a folder of data files is a source; one without any is not
        over["data.prompts"], expect = str(tmp_path / "empty"), f"{tmp_path / 'empty'}: a folder with no .jsonl"
    elif case == "policy_is_the_gpm":
        over["model.policy"], expect = str(tiny_assets / "gpm"), f"model.policy {tiny_assets / 'gpm'} is a GPM folder"
    else:
        import errno

        import gprl.trainer

        def full(*a, **kw):
            raise OSError(errno.ENOSPC, "No space left on device", "trainer_state.safetensors")

        monkeypatch.setattr(gprl.trainer, "save_state", full)
        expect = "cannot write trainer_state.safetensors: No space left on device"
    spec = spec_for(tiny_assets, tmp_path / "run", **over)
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump(spec.to_dict()))
    assert main(["train", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert expect in err, err
    assert "Traceback" not in err
    if case == "disk_full":
        assert not [p for p in (tmp_path / "run" / "checkpoints").iterdir()]  # the temp folder went with it


def test_operator_gives_the_trainer_a_grace_period_and_ignores_a_clean_stop():
    sys.path.insert(0, str(ROOT / "operator"))
    from gprl_operator.children import STOPPED_EXIT_CODE, build_children

    run = {"apiVersion": "gprl.dev/v1alpha1", "kind": "GPRLRun",
           "metadata": {"name": "r", "namespace": "ml", "uid": "u", "generation": 1},
           "spec": {"resources": {"terminationGracePeriodSeconds": 900}}}
    job = next(c for c in build_children(run) if c["kind"] == "Job")
    pod = job["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] == 900
    cmd = pod["containers"][0]["command"]
    assert cmd[cmd.index("--exit-code-on-stop") + 1] == str(STOPPED_EXIT_CODE)
    rules = job["spec"]["podFailurePolicy"]["rules"]
    assert {"action": "Ignore", "onExitCodes": {"containerName": "trainer", "operator": "In",
                                                "values": [STOPPED_EXIT_CODE]}} in rules


def test_ctrl_c_stops_after_the_step_with_a_checkpoint_and_the_grace_period_warning(tiny_assets, tmp_path,
                                                                                     monkeypatch):
    from gprl.trainer import Trainer, finite_only

    lines: list[str] = []
    run = tmp_path / "run"
    t = Trainer(spec_for(tiny_assets, run, **{"algo.steps": 3, "checkpoint.every_steps": 100}), log=lines.append)
    step = t.train_step

    def step_then_ctrl_c():
        rec = step()
        os.kill(os.getpid(), signal.SIGINT)  # arrives mid-loop, as a Ctrl-C would
        return rec

    t.train_step = step_then_ctrl_c
    before = signal.getsignal(signal.SIGINT)
    records = t.train()
    assert [r["step"] for r in records] == [1] and t.stop_signal == "SIGINT"
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step-00000001"]
    assert not (run / "report").exists()  # the report waits for the end of the run
    assert signal.getsignal(signal.SIGINT) is before  # handlers restored

    monkeypatch.setenv("GPRL_RUN_NAME", "r")
    t._check_grace_period(step_seconds=400.0, save_seconds=100.0)  # 500 s > 0.8 x 600 s
    t._check_grace_period(step_seconds=400.0, save_seconds=100.0)
    assert sum("resources.terminationGracePeriodSeconds (600 s)" in line for line in lines) == 1
    assert finite_only({"loss": float("nan"), "axis_variance": [1.0, float("inf")], "step": 2, "kl": 0.1}) == \
        {"step": 2, "kl": 0.1}


def test_a_pickled_checkpoint_of_an_earlier_version_is_never_unpickled(tmp_path):
    from gprl.checkpoint import InvalidCheckpoint, verify_manifest

    old = tmp_path / "step-00000001"
    old.mkdir()

    class Boom:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    torch.save({"x": Boom()}, old / "trainer_state.pt")
    with pytest.raises(InvalidCheckpoint, match="earlier version, with a pickled trainer state"):
        verify_manifest(old)
    assert not (tmp_path / "pwned").exists()


def test_non_finite_weights_are_never_checkpointed(tiny_assets, tmp_path):
    from gprl.trainer import Trainer

    t = Trainer(spec_for(tiny_assets, tmp_path / "run"), log=quiet)
    with torch.no_grad():
        next(t.policy.parameters())[0] = float("nan")
    with pytest.raises(RuntimeError, match="non-finite policy weights at step 0"):
        t.save_checkpoint()
    assert not list((tmp_path / "run" / "checkpoints").glob("*"))  # not even a temp folder
