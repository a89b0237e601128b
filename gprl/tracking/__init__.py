"""Experiment trackers named in `output.reportTo`: TensorBoard, Weights & Biases and MLflow, through their own
libraries. Each receives the step records (flattened to scalars) and the samples (prompt, response, per-axis
scores, advantage). A resumed run continues the same tracker run: the ids are kept in <output.dir>/tracking.json.

The libraries are optional (`pip install 'gprl[tracking]'`); a tracker named but not installed is a config error.
"""

from __future__ import annotations

import json
import math
import os
import secrets
import time
from pathlib import Path
from typing import Callable, Protocol

from gprl.config import RunSpec

IDS_FILE = "tracking.json"
SAMPLE_COLUMNS = ("step", "group", "prompt", "response", "scores", "advantage", "gpm_nonfinite")


class TrackerUnavailable(ValueError):
    pass


class Tracker(Protocol):
    def log_metrics(self, step: int, values: dict[str, float]) -> None: ...

    def log_samples(self, step: int, rows: list[dict]) -> None: ...

    def close(self, finished: bool) -> None: ...


def flatten(rec: dict, prefix: str) -> dict[str, float]:
    """Numbers of a step record as `prefix/name` (lists as `name/<i>`, dicts as `name/<key>`); the rest dropped."""
    out: dict[str, float] = {}

    def walk(key: str, x) -> None:
        if isinstance(x, bool):
            out[key] = float(x)
        elif isinstance(x, (int, float)):
            out[key] = float(x)
        elif isinstance(x, (list, tuple)):
            for i, v in enumerate(x):
                walk(f"{key}/{i}", v)
        elif isinstance(x, dict):
            for k, v in x.items():
                walk(f"{key}/{k}", v)

    for k, v in rec.items():
        if k != "step":
            walk(f"{prefix}/{k}", v)
    return out


def samples_markdown(rows: list[dict]) -> str:
    """Samples as markdown (TensorBoard's text panel renders it); responses in fenced blocks keep their newlines."""
    parts = []
    for r in rows:
        scores = ", ".join(f"{s:.3f}" for s in r["scores"])
        parts.append(f"**group {r['group']}** · advantage {r['advantage']:.3f} · scores [{scores}]"
                     + (" · GPM output non-finite" if r.get("gpm_nonfinite") else "")
                     + f"\n\nprompt:\n```\n{r['prompt']}\n```\nresponse:\n```\n{r['response']}\n```\n")
    return "\n".join(parts)


class TensorBoardTracker:
    def __init__(self, spec: RunSpec, out: Path, ids: dict, start_step: int):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:
            raise TrackerUnavailable(
                f"output.reportTo lists tensorboard but it cannot be imported ({exc}); pip install tensorboard"
            ) from None
        # purge_step: events of steps after the checkpoint we resumed from are dropped (they are re-run)
        self.writer = SummaryWriter(log_dir=str(out / "tensorboard"), purge_step=start_step + 1 if start_step else None)

    def log_metrics(self, step: int, values: dict[str, float]) -> None:
        for k, v in values.items():
            self.writer.add_scalar(k, v, step)
        self.writer.flush()

    def log_samples(self, step: int, rows: list[dict]) -> None:
        self.writer.add_text("samples", samples_markdown(rows), step)
        self.writer.flush()

    def close(self, finished: bool) -> None:
        self.writer.close()


class WandbTracker:
    def __init__(self, spec: RunSpec, out: Path, ids: dict, start_step: int):
        try:
            import wandb
        except ImportError:
            raise TrackerUnavailable("output.reportTo lists wandb but it is not installed; pip install wandb") from None
        self.wandb = wandb
        run_id = ids.get("wandb") or secrets.token_hex(4)
        ids["wandb"] = run_id
        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", "gprl"), name=_run_name(out), id=run_id, resume="allow",
            dir=str(out), config=spec.to_dict(), reinit="create_new",
        )

    def log_metrics(self, step: int, values: dict[str, float]) -> None:
        self.run.log(values, step=step)

    def log_samples(self, step: int, rows: list[dict]) -> None:
        table = self.wandb.Table(columns=list(SAMPLE_COLUMNS),
                                 data=[[json.dumps(r[c]) if c == "scores" else r[c] for c in SAMPLE_COLUMNS] for r in rows])
        self.run.log({"samples": table}, step=step)

    def close(self, finished: bool) -> None:
        self.run.finish(exit_code=0 if finished else 1)


class MlflowTracker:
    def __init__(self, spec: RunSpec, out: Path, ids: dict, start_step: int):
        try:
            import mlflow
        except ImportError:
            raise TrackerUnavailable(
                "output.reportTo lists mlflow but it is not installed; pip install mlflow-skinny"
            ) from None
        from mlflow.entities import Metric

        self.Metric = Metric
        uri = os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:
            # MLflow 3 keeps its file store behind an opt-in; a local run without a tracking server uses it
            uri = (out / "mlruns").resolve().as_uri()
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.client = mlflow.MlflowClient(tracking_uri=uri)
        self.run_id = ids.get("mlflow")
        if self.run_id is None:
            name = os.environ.get("MLFLOW_EXPERIMENT_NAME", "gprl")
            exp = self.client.get_experiment_by_name(name)
            exp_id = exp.experiment_id if exp else self.client.create_experiment(name)
            self.run_id = self.client.create_run(exp_id, run_name=_run_name(out)).info.run_id
            self.client.log_dict(self.run_id, spec.to_dict(), "config.json")
            ids["mlflow"] = self.run_id
        self.uri = uri

    def log_metrics(self, step: int, values: dict[str, float]) -> None:
        now = int(time.time() * 1000)
        metrics = [self.Metric(k, v, now, step) for k, v in values.items() if math.isfinite(v)]
        for i in range(0, len(metrics), 1000):  # MLflow takes at most 1000 metrics per batch
            self.client.log_batch(self.run_id, metrics=metrics[i : i + 1000])

    def log_samples(self, step: int, rows: list[dict]) -> None:
        data = {c: [json.dumps(r[c]) if c == "scores" else r[c] for r in rows] for c in SAMPLE_COLUMNS}
        self.client.log_table(self.run_id, data=data, artifact_file=f"samples/step-{step:08d}.json")

    def close(self, finished: bool) -> None:
        self.client.set_terminated(self.run_id, status="FINISHED" if finished else "KILLED")


TRACKERS: dict[str, Callable[..., Tracker]] = {
    "tensorboard": TensorBoardTracker, "wandb": WandbTracker, "mlflow": MlflowTracker,
}


def _run_name(out: Path) -> str:
    return os.environ.get("GPRL_RUN_NAME") or out.name


class Trackers:
    """Every tracker of output.reportTo behind one object (none: every call does nothing)."""

    def __init__(self, trackers: list[Tracker]):
        self.trackers = trackers

    def log_metrics(self, step: int, rec: dict, prefix: str = "train") -> None:
        if self.trackers:
            values = flatten(rec, prefix)
            for t in self.trackers:
                t.log_metrics(step, values)

    def log_samples(self, step: int, rows: list[dict]) -> None:
        for t in self.trackers:
            t.log_samples(step, rows)

    def close(self, finished: bool = True) -> None:
        for t in self.trackers:
            t.close(finished)
        self.trackers = []


def open_trackers(spec: RunSpec, out: Path, start_step: int = 0, log: Callable[[str], None] = print) -> Trackers:
    ids_path = out / IDS_FILE
    ids = json.loads(ids_path.read_text()) if ids_path.exists() else {}
    trackers = [TRACKERS[name](spec, out, ids, start_step) for name in dict.fromkeys(spec.output.report_to)]
    if trackers:
        ids_path.write_text(json.dumps(ids))
        log(f"reporting to {', '.join(spec.output.report_to)}")
    return Trackers(trackers)
