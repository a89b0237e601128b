"""output.reportTo and the samples log: one tiny two-step run reports to every tracker installed here; each test
reads back what its tracker's own library stored (a tracker that is not installed is skipped, TensorBoard is
required: it is in the dev extra)."""

from __future__ import annotations

import importlib.util
import json

import pytest

from tests.unit.test_trainer import spec_for

INSTALLED = [name for name, mod in (("tensorboard", "tensorboard"), ("wandb", "wandb"), ("mlflow", "mlflow"))
             if importlib.util.find_spec(mod) is not None]


@pytest.fixture(scope="module")
def tracked_run(tiny_assets, tmp_path_factory):
    from gprl.trainer import Trainer

    run = tmp_path_factory.mktemp("tracked") / "run"
    mp = pytest.MonkeyPatch()
    mp.setenv("WANDB_MODE", "offline")
    mp.setenv("WANDB_SILENT", "true")
    mp.delenv("MLFLOW_TRACKING_URI", raising=False)
    try:
        spec = spec_for(tiny_assets, run, **{"output.report_to": INSTALLED, "output.samples_every": 1,
                                             "output.samples_groups": 1})
        records = Trainer(spec, log=lambda *_: None).train()
    finally:
        mp.undo()
    return run, records


def test_samples_log_has_prompt_response_scores_and_advantage(tracked_run):
    run, records = tracked_run
    rows = [json.loads(line) for line in (run / "samples.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1] * 4 + [2] * 4  # one group of G = 4 per step
    for r in rows:
        assert r["prompt"] and isinstance(r["response"], str) and len(r["scores"]) == 3
        assert isinstance(r["advantage"], float) and r["group"] == 0
    # the group's advantages are normalised within the group: they sum to ~0
    assert abs(sum(r["advantage"] for r in rows[:4])) < 1e-4
    summary = (run / "report" / "summary.md").read_text()
    drift_at = summary.index("![drift](drift.png)")
    assert summary.index("## Samples") > drift_at and rows[-1]["response"] in summary[drift_at:]


def test_tensorboard_gets_the_step_metrics_and_the_samples(tracked_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run, records = tracked_run
    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    tags = acc.Tags()
    assert "train/loss" in tags["scalars"] and "train/axis_variance/2" in tags["scalars"]
    assert [e.step for e in acc.Scalars("train/loss")] == [1, 2]
    assert acc.Scalars("train/loss")[1].value == pytest.approx(records[1]["loss"], rel=1e-5)
    assert "eval/gpm_win_rate" in tags["scalars"]
    texts = acc.Tensors("samples/text_summary")
    assert [t.step for t in texts] == [1, 2]
    first = texts[0].tensor_proto.string_val[0].decode()
    assert "advantage" in first and "response:" in first


def test_wandb_offline_run_is_written(tracked_run):
    pytest.importorskip("wandb")
    run, _ = tracked_run
    offline = list((run / "wandb").glob("offline-run-*"))
    assert offline and list(offline[0].glob("*.wandb"))
    assert json.loads((run / "tracking.json").read_text())["wandb"] in offline[0].name


def test_mlflow_local_file_store_has_metrics_and_sample_tables(tracked_run):
    mlflow = pytest.importorskip("mlflow")
    run, records = tracked_run
    client = mlflow.MlflowClient(tracking_uri=(run / "mlruns").resolve().as_uri())
    run_id = json.loads((run / "tracking.json").read_text())["mlflow"]
    history = client.get_metric_history(run_id, "train/kl")
    assert [m.step for m in history] == [1, 2]
    assert history[0].value == pytest.approx(records[0]["kl"], rel=1e-5)
    assert client.get_run(run_id).info.status == "FINISHED"
    tables = {a.path for a in client.list_artifacts(run_id, "samples")}
    assert tables == {"samples/step-00000001.json", "samples/step-00000002.json"}


def test_a_tracker_that_is_not_installed_is_a_clear_error(tiny_assets, tmp_path, monkeypatch):
    import builtins

    from gprl.tracking import TrackerUnavailable, open_trackers

    real_import = builtins.__import__

    def no_mlflow(name, *a, **kw):
        if name == "mlflow" or name.startswith("mlflow."):
            raise ImportError("No module named 'mlflow'")
        return real_import(name, *a, **kw)

    monkeypatch.setattr(builtins, "__import__", no_mlflow)
    spec = spec_for(tiny_assets, tmp_path / "run", **{"output.report_to": ["mlflow"]})
    with pytest.raises(TrackerUnavailable, match="output.reportTo lists mlflow but it is not installed"):
        open_trackers(spec, tmp_path)
