"""`status` of a GPRLRun, typed: what the trainer reports, what the operator decides, and who writes what.

Each top-level field is marked with its writer (`x-gprl-writer`): `trainer` fields are the only ones the run's own
ServiceAccount may change (an admission policy generated from these marks enforces it at the API server, see
`gprl.crd.trainer_status_policy`); everything else is the operator's. Wire names are camelCase.

One name per fact round the loop: the job stamps each step's statistics with `statisticsAt` and each report with
`reportedAt`; the control block built from them carries the same two names, and so does the job's
acknowledgement of it (`training.controlAck`).
"""

from __future__ import annotations

from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema
from pydantic.alias_generators import to_camel
from typing_extensions import Annotated

__all__ = [
    "WRITER_KEY",
    "Condition",
    "StepStatistics",
    "ControlAck",
    "RefusedControl",
    "TrainingReport",
    "ControlBlock",
    "DriftMonitorState",
    "RunStatus",
    "trainer_fields",
    "operator_fields",
]

WRITER_KEY = "x-gprl-writer"
TRAINER = {WRITER_KEY: "trainer"}
OPERATOR = {WRITER_KEY: "operator"}

Phase = Literal["Pending", "Queued", "Running", "Succeeded", "Failed", "Suspended"]
Timestamp = Annotated[str, WithJsonSchema({"type": "string", "format": "date-time"})]
Count = Annotated[int, Field(ge=0)]
FreeForm = Annotated[dict[str, Any], WithJsonSchema({"type": "object", "x-kubernetes-preserve-unknown-fields": True})]


class _Status(BaseModel):
    # A tolerant reader: the status comes from the API server, written by another process (maybe another version).
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore")

    def wire(self) -> dict[str, Any]:
        """camelCase, without unset optional fields or empty mappings (what goes into a patch: server-side apply
        turns an empty mapping into null, which a typed object field refuses)."""
        return _drop_empty_maps(self.model_dump(mode="json", by_alias=True, exclude_none=True))


def _drop_empty_maps(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: _drop_empty_maps(v) for k, v in node.items() if not (isinstance(v, dict) and not v)}
    if isinstance(node, list):
        return [_drop_empty_maps(v) for v in node]
    return node


class Condition(_Status):
    type: str = Field(description="Ready, Running, Succeeded, Failed, Suspended, PodFailed, DriftDetected.")
    status: Literal["True", "False", "Unknown"]
    reason: Optional[str] = Field(None, description="CamelCase reason of the last transition.")
    message: Optional[str] = Field(None, description="Human-readable details.")
    last_transition_time: Optional[Timestamp] = None
    observed_generation: Optional[Count] = None


# -------------------------------------------------------------------------------- written by the trainer


class StepStatistics(_Status):
    """One training step's input to the drift monitor."""

    step: Count
    axis_variance: list[float] = Field(description="E_batch[var_i s_l(i)] per axis l.")
    axis_win_rate: Optional[list[float]] = Field(None, description="Probe steps: per-axis win rate against the "
                                                 "probe's rollouts of referenceLag steps earlier.")
    statistics_at: Optional[str] = Field(None, description="When the job recorded the statistics (job clock).")


class ControlAck(_Status):
    """The job applied a control generation at a step boundary."""

    generation: Count
    applied_at: Optional[str] = Field(None, description="When (job clock).")
    applied_step: Optional[Count] = Field(None, description="First step that ran with it.")
    reported_at: Optional[str] = Field(None, description="control.reportedAt of the generation applied.")
    statistics_at: Optional[str] = Field(None, description="control.statisticsAt of the generation applied "
                                         "(full loop latency: statisticsAt -> appliedAt).")


class RefusedControl(_Status):
    generation: Count
    reason: str
    refused_at: Optional[str] = None
    step: Optional[Count] = None


class TrainingReport(_Status):
    """`status.training`: the job's latest step report (rate-limited to drift.reportIntervalSeconds)."""

    step: Count = 0
    policy_version: Count = 0
    reported_at: Optional[str] = Field(None, description="When the job sent this report (job clock).")
    kl: Optional[float] = None
    clip_fraction: Optional[float] = None
    entropy: Optional[float] = None
    loss: Optional[float] = None
    policy_loss: Optional[float] = None
    grad_norm: Optional[float] = None
    learning_rate: Optional[float] = None
    response_length: Optional[float] = None
    tokens: Optional[float] = None
    tokens_per_second: Optional[float] = None
    advantage_abs_mean: Optional[float] = None
    step_seconds: Optional[float] = None
    kl_coef: Optional[float] = None
    eps_low: Optional[float] = None
    eps_high: Optional[float] = None
    exploit: Optional[float] = None
    axis_variance: Optional[list[float]] = None
    axis_win_rate: Optional[list[float]] = None
    eigenvalues: Optional[list[float]] = None
    weights: Optional[list[float]] = None
    oracle_axes: Optional[list[float]] = None
    history: list[StepStatistics] = Field(default_factory=list, description="Every step the operator's monitor has "
                                          "not fed yet (driftMonitor.lastStep), oldest first.")
    applied_control_generation: Optional[Count] = Field(None, description="status.control generation in force.")
    control_ack: Optional[ControlAck] = Field(None, description="The last control generation applied.")
    refused_control: Optional[RefusedControl] = Field(None, description="The last control block refused as "
                                                      "malformed (never applied).")


# -------------------------------------------------------------------------------- written by the operator


class ControlBlock(_Status):
    """`status.control`: the drift loop's decision; the job applies it at its next step boundary."""

    generation: Count = Field(0, description="Incremented on every new control decision.")
    weights: list[float] = Field(default_factory=list, description="Axis weights m.")
    kl_coef: float = Field(0.0, ge=0, description="beta_KL in force.")
    eps_low: float = Field(0.0, ge=0, description="epsilon_low in force.")
    eps_high: float = Field(0.0, ge=0, description="epsilon_high in force.")
    triggered: Optional[bool] = Field(None, description="Drift monitor is in its triggered state.")
    updated_at: Optional[Timestamp] = None
    source_step: Optional[Count] = Field(None, description="Last training step the decision is based on.")
    reported_at: Optional[str] = Field(None, description="training.reportedAt of the report the decision is "
                                       "based on (job clock).")
    statistics_at: Optional[str] = Field(None, description="statisticsAt of the oldest step this decision is the "
                                         "first to include (job clock; full loop latency starts here).")
    reason: Optional[Literal["Trigger", "Tighten", "Release", "Relax", "Restore", "Override"]] = Field(
        None, description="Why this generation was written (Restore: a refused hand-written block).")


class DriftMonitorState(_Status):
    """`status.driftMonitor`: the operator's drift monitor, kept in the resource so a restart loses nothing."""

    axes: Optional[Count] = None
    last_step: Count = Field(0, description="Last training step fed to the monitor.")
    generation: Count = Field(0, description="Last control generation decided (or adopted, or refused).")
    control: Optional[ControlBlock] = Field(None, description="The last block this loop wrote or adopted.")
    refused_generation: Optional[Count] = Field(None, description="Last hand-written generation refused.")
    adopted_generation: Optional[Count] = Field(None, description="Last hand-written generation adopted.")
    triggered: bool = False
    decided_at: dict[str, float] = Field(default_factory=dict, description="Generation -> unix time it was "
                                         "decided, for generations not yet acknowledged.")
    monitor: Optional[FreeForm] = Field(None, description="gprl.algo.DriftMonitor.state_dict().")


class RunStatus(_Status):
    phase: Optional[Phase] = Field(None, description="Mirrors the run's Job; Queued: a Kueue run waiting for admission.", json_schema_extra=OPERATOR)
    observed_generation: Optional[Count] = Field(None, description="metadata.generation the operator last "
                                                 "reconciled.", json_schema_extra=OPERATOR)
    conditions: list[Condition] = Field(default_factory=list, description="Standard conditions, one per type.",
                                        json_schema_extra={**OPERATOR, "x-kubernetes-list-type": "map",
                                                           "x-kubernetes-list-map-keys": ["type"]})
    job_name: Optional[str] = Field(None, description="The run's Job.", json_schema_extra=OPERATOR)
    start_time: Optional[Timestamp] = Field(None, json_schema_extra=OPERATOR)
    completion_time: Optional[Timestamp] = Field(None, json_schema_extra=OPERATOR)
    active_pods: Optional[Count] = Field(None, json_schema_extra=OPERATOR)
    ready_pods: Optional[Count] = Field(None, json_schema_extra=OPERATOR)
    failed_pods: Optional[Count] = Field(None, json_schema_extra=OPERATOR)
    succeeded_pods: Optional[Count] = Field(None, json_schema_extra=OPERATOR)
    step: Optional[Count] = Field(None, description="Last completed training step (reported by the job).",
                                  json_schema_extra=TRAINER)
    policy_version: Optional[Count] = Field(None, description="Version of the policy weights the rollouts use.",
                                            json_schema_extra=TRAINER)
    training: Optional[TrainingReport] = Field(None, description="The job's latest step report.",
                                               json_schema_extra=TRAINER)
    drift: Optional[float] = Field(None, description="Current drift D(t) = KL(alpha(t) || alpha(t - N)), N = spec.drift.referenceLag.",
                                   json_schema_extra=OPERATOR)
    control: Optional[ControlBlock] = Field(None, description="Control block of the drift loop; the job applies "
                                            "it at the next step boundary.", json_schema_extra=OPERATOR)
    drift_monitor: Optional[DriftMonitorState] = Field(None, description="State of the operator's drift monitor.",
                                                       json_schema_extra=OPERATOR)
    message: Optional[str] = Field(None, description="Last notable event, for humans.", json_schema_extra=OPERATOR)


def _by_writer(writer: str) -> tuple[str, ...]:
    return tuple(f.alias or n for n, f in RunStatus.model_fields.items()
                 if isinstance(f.json_schema_extra, dict) and f.json_schema_extra.get(WRITER_KEY) == writer)


def trainer_fields() -> tuple[str, ...]:
    """Top-level status fields the run's own ServiceAccount may write (camelCase)."""
    return _by_writer("trainer")


def operator_fields() -> tuple[str, ...]:
    return _by_writer("operator")
