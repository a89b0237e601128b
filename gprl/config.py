"""Typed configuration of a GPRL run.

`RunSpec` is the single source of truth: the YAML file of `gprl train`, the CLI's
`--section.field` flags and the `GPRLRun` CRD schema are all derived from it.
Field names are snake_case in Python and camelCase in YAML / Kubernetes; both are
accepted on input. Validation happens once, here, at the edge.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, WithJsonSchema, model_validator
from pydantic.alias_generators import to_camel

from gprl.api.marks import IMMUTABLE, RESTART, resume_fields
from gprl.api.quantity import (
    DNS_SUBDOMAIN,
    LABEL_KEY,
    LABEL_VALUE,
    check_label_key,
    parse_quantity,
)
from gprl.api.pods import ModelCacheSpec, RolePods, Toleration, parse_source

__all__ = [
    "ConfigError",
    "RunSpec",
    "load_config",
    "dump_config",
    "add_config_flags",
    "apply_config_flags",
]


class ConfigError(ValueError):
    """A configuration that failed validation; `problems` holds one line per bad field."""

    def __init__(self, problems: list[str], source: str | None = None):
        self.problems = problems
        head = f"invalid configuration{f' in {source}' if source else ''}:"
        super().__init__("\n".join([head, *("  " + p for p in problems)]))


class _Spec(BaseModel):
    # strict: no booleans as counts, no "8" as a number; allow_inf_nan: every number is finite (JSON, and so the
    # API server, has no NaN or infinity: both sides refuse them).
    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        validate_assignment=True,
        strict=True,
        allow_inf_nan=False,
    )


def _quantity(minimum: str, what: str):
    """A Kubernetes quantity (`4`, `500m`, `16Gi`), given as a YAML number or string, of at least `minimum`."""

    def check(value: Union[int, str]) -> str:
        text = str(value)
        amount = parse_quantity(text)
        if amount is None:
            raise ValueError(f"{text!r} is not a Kubernetes quantity (e.g. {what})")
        if amount < parse_quantity(minimum):
            raise ValueError(f"{text!r} is below the least usable amount, {minimum}")
        return text

    schema = {
        "x-kubernetes-int-or-string": True,
        "x-kubernetes-validations": [
            {"rule": "isQuantity(string(self))", "message": f"must be a Kubernetes quantity (e.g. {what})"},
            {"rule": f"!isQuantity(string(self)) || quantity(string(self)).compareTo(quantity('{minimum}')) >= 0",
             "message": f"must be at least {minimum}"},
        ],
    }
    return Annotated[Union[int, str], AfterValidator(check), WithJsonSchema(schema)]


# Bounded strings: a bounded input is cheap to validate, here and in the API server's CEL cost estimates.
Text = Annotated[str, Field(max_length=4096)]
Url = Annotated[str, Field(min_length=1, max_length=2048)]
ModuleName = Annotated[str, Field(min_length=1, max_length=256)]

# names of Kubernetes objects the run refers to (Secrets, claims, StorageClasses): DNS-1123 subdomains
K8sName = Annotated[str, Field(min_length=1, max_length=253, pattern=DNS_SUBDOMAIN)]


def _label_keys(value: dict[str, str]) -> dict[str, str]:
    if len(value) > 64:
        raise ValueError(f"at most 64 labels, got {len(value)}")
    for key in value:
        check_label_key(key)
    return value


NodeSelector = Annotated[
    dict[str, Annotated[str, Field(max_length=63, pattern=LABEL_VALUE)]],
    AfterValidator(_label_keys),
    Field(json_schema_extra={"maxProperties": 64, "x-kubernetes-validations": [{
        "rule": f"self.all(k, k.matches(r'{LABEL_KEY}'))",
        "message": "keys must be label keys: [prefix/]name, name at most 63 characters of [A-Za-z0-9-_.], "
                   "prefix a DNS subdomain",
    }]}),
]


# --------------------------------------------------------------------------------------
# model, data


class LoraSpec(_Spec):
    enabled: bool = Field(False, description="Train LoRA adapters (peft) instead of all policy weights.")
    r: int = Field(8, ge=1, le=1024, description="LoRA rank.")
    alpha: float = Field(16.0, gt=0, description="LoRA scaling numerator (effective scale alpha / r).")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the LoRA input.")
    target_modules: list[ModuleName] = Field(
        default_factory=lambda: ["q_proj", "v_proj"],
        min_length=1,
        max_length=64,
        description="Names of the linear modules that get adapters.",
    )


class ModelSpec(_Spec):
    policy: Optional[Text] = Field(
        None,
        min_length=1,
        description="Policy to train (required to run): a local Hugging Face model folder, a hub id `org/name` "
        "(`@revision` optional; resolved through the Hugging Face cache, honouring HF_HUB_OFFLINE), or "
        "`world:policy` for the synthetic world's SFT policy.",
    )
    reference: Optional[Text] = Field(
        None,
        description="Frozen reference policy for the KL term (a folder or hub id); defaults to the initial policy.",
    )
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="Parameter dtype of policy and reference (float32 on CPU)."
    )
    chat_template: bool = Field(
        True, description="Apply the policy tokenizer's chat template to prompts when it has one."
    )
    lora: LoraSpec = Field(default_factory=LoraSpec, description="Optional LoRA adapters.")
    share_prompt: bool = Field(
        True,
        description="Run each prompt once and hand its keys and values to the group's G responses, in HF "
        "generation's prefill and in the reference and policy passes, instead of running it G times (the same "
        "numbers up to float rounding; the update's micro-batches then hold whole groups). Off for a policy whose "
        "forward takes no KV cache. Not under DeepSpeed ZeRO-3 (the ranks' passes must match); the policy's update "
        "pass does not share under learner.gradientCheckpointing; a policy with dropout draws one dropout mask for a "
        "group's prompt, not G.",
    )


class DataSpec(_Spec):
    prompts: Optional[Text] = Field(
        None,
        min_length=1,
        description="Prompt source (required to run): a JSONL, JSON or parquet file or a folder of them (rows with "
        "`prompt` text, chat `messages`, or TRL's conversational `prompt` list), a `save_to_disk` folder, "
        "`hf:<hub dataset>`, or `world:prompts` for the synthetic world.",
        json_schema_extra=IMMUTABLE,
    )
    split: Text = Field("train", description="Dataset split, for `hf:` sources.", json_schema_extra=IMMUTABLE)
    prompt_field: Text = Field("prompt", description="Field holding the prompt text.", json_schema_extra=IMMUTABLE)
    messages_field: Text = Field("messages", description="Field holding chat messages (used when present).",
                                json_schema_extra=IMMUTABLE)
    max_prompt_tokens: int = Field(256, ge=1, le=131072, description="Prompts are left-truncated to this length.")
    shuffle: bool = Field(True, description="Shuffle prompts each epoch (seeded; resume keeps the order).",
                          json_schema_extra=IMMUTABLE)


# --------------------------------------------------------------------------------------
# GPM


class GPMSpec(_Spec):
    path: Optional[Text] = Field(
        None,
        min_length=1,
        description="Trained GPM (required to run unless gpm.serverUrl is set): a folder (`save_pretrained` layout "
        "or the GPM authors' layout), a hub id, or `world:gpm` / `world:bt` for the synthetic world's models.",
        json_schema_extra=IMMUTABLE,
    )
    axes: int = Field(
        3, ge=1, le=64, description="k, the number of skew-symmetric 2-D axes (embedding size 2k). k = 1 is Bradley-Terry.",
        json_schema_extra=IMMUTABLE,
    )
    beta: float = Field(0.1, gt=0, description="Temperature β of P(y_i ≻ y_j) = σ(s / β).")
    batch_size: int = Field(32, ge=1, le=4096, description="Responses per GPM scoring batch (with a causal "
                            "backbone, each distinct prompt of a batch runs once, its responses in up to four passes of "
                            "similar length).")
    server_url: Optional[Text] = Field(
        None, description="URL of a `gprl serve-gpm` scoring server; score in-process when unset."
    )


# --------------------------------------------------------------------------------------
# algorithm


class AlgoSpec(_Spec):
    group_size: int = Field(8, ge=2, le=1024, description="G, responses sampled per prompt.", json_schema_extra=IMMUTABLE)
    prompts_per_step: int = Field(8, ge=1, le=65536, description="Prompts per training step (batch = prompts × G).",
                                  json_schema_extra=IMMUTABLE)
    steps: int = Field(100, ge=1, le=100_000_000, description="Training steps (one rollout batch each).")
    epochs_per_batch: int = Field(1, ge=1, le=64, description="Optimizer passes over each rollout batch.")
    micro_batch_size: int = Field(
        64, ge=1, le=1_048_576, description="Responses per forward/backward; gradients are accumulated over the batch."
    )
    learning_rate: float = Field(1e-5, gt=0, lt=1, description="Peak learning rate of AdamW.")
    lr_schedule: Literal["constant", "linear", "cosine"] = Field("constant", description="Learning-rate decay.")
    warmup_ratio: float = Field(0.0, ge=0, le=1, description="Fraction of steps with linear warm-up.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient-norm clip.")
    eps_low: float = Field(0.2, gt=0, lt=1, description="ε_low: the ratio is clipped below at 1 − ε_low.")
    eps_high: float = Field(0.2, gt=0, le=10, description="ε_high: the ratio is clipped above at 1 + ε_high (>= ε_low).")
    kl_coef: float = Field(0.04, ge=0, le=10, description="β_KL, weight of KL(π_θ ‖ π_ref) in the loss.")
    kl_estimator: Literal["k1", "k2", "k3"] = Field("k3", description="Per-token KL estimator (Schulman's k1/k2/k3).")
    loss_aggregation: Literal["token_mean", "sequence_mean"] = Field(
        "token_mean", description="Mean over all tokens of the batch, or mean per sequence then over sequences."
    )
    normalization: Literal["per_axis", "global", "scalar"] = Field(
        "per_axis",
        description="per_axis: each axis normalised on its own scale (GPRL); global: one scale shared by all axes "
        "(ablation); scalar: aggregate raw scores first, then normalise once (GRPO with a preference model).",
        json_schema_extra=IMMUTABLE,
    )
    std_eps: float = Field(1e-6, gt=0, description="ε added to the group std in normalisation.")
    # 0 keeps the method's per-axis step as published. A GPM with an axis that carries next to no spread (the world's
    # per-aspect GPM: 0.2 % of the variance on axis 2) has that axis's noise lifted to the weight of the others by
    # per-axis normalisation; the floor is relative to the group's largest axis so that it needs no unit and no state.
    axis_spread_floor: float = Field(
        0.0, ge=0, le=1,
        description="ρ, per_axis only: an axis whose group std is below ρ × the group's largest axis std is divided by "
        "that floor, not its own std, so it is lifted at most 1/ρ times as much as the largest axis (an axis of noise "
        "keeps ~0 weight). 0: every axis on its own scale (GPRL as published); 1: every axis on the largest one's scale.",
    )

    @model_validator(mode="after")
    def _clip_range(self) -> "AlgoSpec":
        if self.eps_high < self.eps_low:
            raise ValueError(f"eps_high ({self.eps_high}) must be >= eps_low ({self.eps_low})")
        if self.axis_spread_floor > 0 and self.normalization != "per_axis":
            raise ValueError(f"axis_spread_floor ({self.axis_spread_floor}) applies to normalization: per_axis only, "
                             f"not {self.normalization}")
        return self


# --------------------------------------------------------------------------------------
# drift monitor


class DriftSpec(_Spec):
    mode: Literal["in_process", "operator", "off"] = Field(
        "in_process",
        description="Where the drift monitor runs: in the trainer, in the Kubernetes operator, or not at all.",
    )
    tau: float = Field(0.05, gt=0, description="Trigger threshold τ on D(t) = KL(α(t) ‖ α(t − N)), N = referenceLag.")
    release_ratio: float = Field(0.5, gt=0, lt=1, description="Release when D(t) < release_ratio · τ (hysteresis).")
    eta: float = Field(0.5, gt=0, le=10, description="η, step size of the multiplicative axis-weight update.")
    kappa: float = Field(1.5, ge=1, le=10, description="κ, factor by which β_KL grows (and ε shrinks) per triggered step.")
    weight_min: float = Field(0.25, gt=0, le=1, description="Lower clamp of the axis weights m.")
    weight_max: float = Field(4.0, ge=1, description="Upper clamp of the axis weights m.")
    kl_coef_max: float = Field(0.5, ge=0, description="Largest β_KL the monitor may set.")
    eps_min: float = Field(0.05, gt=0, lt=1, description="Smallest ε the monitor may set.")
    tighten_eps: bool = Field(True, description="Also shrink ε_low/ε_high while triggered.")
    relax_time: float = Field(10.0, gt=0, description="Time constant T (steps) of the decay back to baseline.")
    warmup_steps: int = Field(5, ge=1, le=1_000_000, description="Steps averaged into the first reference spectrum; the monitor "
                                                   "decides nothing before.")
    reference_lag: int = Field(
        20, ge=1, le=1000,
        description="N: both signals judge the run against where it was N steps ago (the spectrum α(t − N), the "
                    "probe's samples of the policy N steps ago), not against step 0, so ordinary progress does not "
                    "accumulate and the monitor releases once the surge has stopped.",
    )
    ema: float = Field(0.3, gt=0, le=1, description="EMA factor of the spectrum (1 = no smoothing).")
    lead_tau: float = Field(
        0.1, ge=0, lt=0.5,
        description="Trigger threshold τ_L on the win-rate lead L = w_top − max(0.5, w_second) of the per-axis win "
                    "rates against samples of the policy referenceLag steps ago (the probe); 0 for k = 1; 0 turns "
                    "this signal off.",
    )
    probe_every: int = Field(
        5, ge=0, le=100_000_000, description="Steps between probe steps, on which some of the step's prompts are probe prompts whose "
                             "rollouts (sampled, scored and trained on as any) are compared per axis with theirs "
                             "referenceLag steps earlier: the win rates of the lead L, at no extra sampling or "
                             "scoring; 0 = no probe.",
    )
    probe_prompts: int = Field(
        16, ge=1, le=65536, description="Probe prompts, taken in turn on probe steps (about probePrompts · probeEvery / "
                             "referenceLag of them per probe step): training prompts after the first "
                             "output.evalPrompts, never evaluation prompts.",
    )
    pinned_weights: Optional[list[float]] = Field(
        None, max_length=64, description="Axis weights fixed by hand (length k, mean 1 after renormalisation); the monitor keeps them."
    )
    report_interval_seconds: float = Field(
        5.0, gt=0, description="Operator mode: least time between statistics reports to the GPRLRun status."
    )

    @model_validator(mode="after")
    def _pins_positive(self) -> "DriftSpec":
        if self.pinned_weights is not None and any(w <= 0 for w in self.pinned_weights):
            raise ValueError("pinned_weights must all be > 0")
        return self


# --------------------------------------------------------------------------------------
# rollout, learner


class WeightSyncSpec(_Spec):
    """How the learner sends new weights to `rollout.serverUrls` after each update."""

    # restart-required (the section's mark): the learner chooses the transport when it starts
    transport: Literal["http", "collective"] = Field(
        "http",
        description="http: safetensors buckets over each server's HTTP API; collective: the learner's rank 0 and the "
        "servers join a torch.distributed group of their own and each tensor is broadcast to all servers at once "
        "(begin and commit stay on HTTP, under the same checks). A server that cannot join is pushed over HTTP.",
    )
    backend: Literal["auto", "gloo", "nccl"] = Field(
        "auto", description="collective: the process group's backend; auto = nccl when the learner trains on a GPU, "
        "else gloo.",
    )
    # immutable: the port is in the learner Job's pod template (containerPort), which Kubernetes cannot change
    port: int = Field(
        0, ge=0, le=65535, json_schema_extra=IMMUTABLE,
        description="collective: the learner's rank 0 listens here for the servers to join (its TCPStore); 0 = a free "
        "port (local runs), on Kubernetes 0 means 29600.",
    )
    stream_load: bool = Field(
        False,
        description="collective: each server loads every tensor into its engine as it arrives, so the transfer "
        "overlaps the engine's reload; a server then keeps the last committed weights in host memory (one more copy "
        "of the model) and reloads them if a push fails part-way, and receives each push into the buffers of the "
        "commit before last (between pushes two copies; the peak during one stays two). false: a server stages the "
        "whole push, then loads.",
    )
    timeout_seconds: float = Field(
        60.0, gt=0, le=3600,
        description="collective: how long the group may take to form (past it, this learner process pushes over "
        "HTTP), one tensor's broadcast (past it, that push goes over HTTP and the group re-forms), and a streamed "
        "load's wait for the commit after its last tensor (past it, the server reloads its previous weights).",
    )


class RolloutSpec(_Spec):
    backend: Literal["hf", "vllm"] = Field("hf", description="Generation backend.")
    max_new_tokens: int = Field(32, ge=1, le=131072, description="Completion length limit.")
    temperature: float = Field(1.0, gt=0, le=10, description="Sampling temperature.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling mass.")
    top_k: int = Field(0, ge=0, le=1_000_000, description="Top-k sampling (0 = off).")
    server_urls: list[Url] = Field(
        default_factory=list, max_length=256, description="`gprl serve-rollout` servers to use; generate in-process when empty."
    )
    gpu_memory_utilization: float = Field(0.3, gt=0, le=1, description="vLLM: share of GPU memory for the engine.")
    tensor_parallel_size: int = Field(
        1, ge=1, le=16, description="vLLM: GPUs one engine shards the policy across (a rollout server pod uses this "
        "many of its resources.gpus)."
    )
    # default {} in the CRD too: the API server then stores the port, so that its immutable rule (on this object)
    # also sees a change from the default
    weight_sync: WeightSyncSpec = Field(
        default_factory=WeightSyncSpec, description="How new weights reach `serverUrls` after each update.",
        json_schema_extra={"default": {}},
    )


class LearnerSpec(_Spec):
    backend: Literal["torch", "deepspeed"] = Field("torch", description="Update backend.", json_schema_extra=IMMUTABLE)
    zero_stage: Literal[0, 1, 2, 3] = Field(2, description="DeepSpeed ZeRO stage.")
    offload_optimizer: bool = Field(False, description="DeepSpeed: keep optimizer state on the CPU.")
    gradient_checkpointing: bool = Field(False, description="Recompute activations in the backward pass.")
    length_buckets: int = Field(
        4, ge=1, le=64,
        description="Run each micro-batch's reference and policy passes as at most this many passes over rows of "
        "similar response length, each only as wide as its own longest response (1 = one pass as wide as the "
        "micro-batch's longest): a padding column costs what a token costs. A split is made only where it saves "
        "more padded tokens than one row of the longest width. The same numbers up to float rounding. Not under "
        "DeepSpeed ZeRO-3 (the ranks' passes must match).",
    )


# --------------------------------------------------------------------------------------
# output, checkpoints, resources


class CheckpointSpec(_Spec):
    every_steps: int = Field(25, ge=1, le=100_000_000, description="Write a checkpoint every this many steps (and at the end).")
    keep_last: int = Field(2, ge=1, le=10_000, description="Checkpoints kept on disk; older ones are deleted.")
    resume: bool = Field(True, description="Resume from the newest checkpoint in the output folder when one exists.")


class OutputSpec(_Spec):
    dir: str = Field("runs/gprl", min_length=1, max_length=4096, description="Run folder: checkpoints, step log, "
                     "report. On Kubernetes: relative to /workspace, or an absolute path under it.",
                     json_schema_extra=IMMUTABLE)
    metrics_port: int = Field(0, ge=0, le=65535, description="Serve Prometheus metrics on this port (0 = off; on "
                              "Kubernetes 0 means 9400).", json_schema_extra=IMMUTABLE)
    progress: bool = Field(True, description="Show a progress bar.")
    report: bool = Field(True, description="Write plots and a markdown summary at the end.")
    eval_every: int = Field(
        0, ge=0, le=100_000_000, description="Every this many steps, win rate against the reference policy on held-out prompts (0 = at the end only)."
    )
    eval_prompts: int = Field(64, ge=1, le=1_000_000, description="Held-out prompts per evaluation.")
    eval_samples: int = Field(2, ge=1, le=64, description="Sampled responses per prompt and policy in an evaluation.")
    overwrite: bool = Field(
        False,
        description="With checkpoint.resume: false, delete the run already in output.dir (its checkpoints and logs) "
        "and start afresh; without it such a start is refused.",
    )
    report_to: list[Literal["tensorboard", "wandb", "mlflow"]] = Field(
        default_factory=list,
        description="Experiment trackers that receive the step metrics and the samples (TensorBoard event files in "
        "<output.dir>/tensorboard; W&B honours WANDB_MODE=offline; MLflow uses MLFLOW_TRACKING_URI, else a local "
        "file store in <output.dir>/mlruns).",
    )
    samples_every: int = Field(
        10, ge=0, description="Every this many steps, log generated samples to samples.jsonl and the trackers (0 = off)."
    )
    samples_groups: int = Field(
        2, ge=1, le=1024, description="Prompt groups logged per sample step (every response of a group, with its "
        "per-axis scores and advantage).",
    )


class ResourcesSpec(_Spec):
    """Used by the operator only; a local run ignores it."""

    topology: Literal["colocated", "disaggregated"] = Field(
        "colocated", description="One Job doing everything per pod, or rollout / GPM servers plus a learner Job."
    )
    image: str = Field("ghcr.io/gprl/trainer:0.1.0", min_length=1, max_length=1024, pattern=r"^[^\s]+$",
                       description="Trainer container image.")
    learner_replicas: int = Field(1, ge=1, le=1024, description="Learner pods (DeepSpeed ranks across nodes).")
    rollout_replicas: int = Field(1, ge=1, le=256, description="Disaggregated: rollout server replicas.",
                                  json_schema_extra=RESTART)
    gpm_replicas: int = Field(1, ge=1, le=256, description="Disaggregated: GPM scoring server replicas.",
                              json_schema_extra=RESTART)
    gpus: int = Field(1, ge=0, le=16, description="nvidia.com/gpu per pod.")
    cpu: _quantity("1m", "4, 500m") = Field("4", description="CPU request per pod (Kubernetes quantity).")
    memory: _quantity("1Mi", "16Gi") = Field("16Gi", description="Memory request per pod (Kubernetes quantity).")
    checkpoint_claim: Optional[K8sName] = Field(
        None, description="Existing PersistentVolumeClaim for checkpoints; one is created for the run when unset."
    )
    checkpoint_size: _quantity("1Mi", "50Gi") = Field("50Gi", description="Size of a created checkpoint claim.")
    storage_class: Optional[K8sName] = Field(None, description="StorageClass of a created checkpoint claim.")
    env_from_secrets: list[K8sName] = Field(
        default_factory=list, max_length=64,
        description="Secrets (e.g. a model-hub token) exposed to the pods as environment.",
    )
    backoff_limit: int = Field(
        3, ge=0, le=1000, json_schema_extra=RESTART,
        description="Pod failures the run's Job tolerates before the run fails; each replacement pod resumes from "
        "the newest checkpoint.",
    )
    node_selector: NodeSelector = Field(
        default_factory=dict, description="Node labels the pods must match (e.g. a GPU product)."
    )
    # immutable (the section's mark): it is in the Job's pod template, which Kubernetes refuses to change even on a
    # suspended Job; a restart-required mark would let the API server accept a change the operator cannot apply
    termination_grace_period_seconds: int = Field(
        600, ge=30, le=86400,
        description="Time a trainer pod gets between SIGTERM (eviction, preemption) and SIGKILL: it must cover the "
        "rest of a step plus one checkpoint write, after which the trainer exits.",
    )
    tolerations: list[Toleration] = Field(
        default_factory=list, max_length=32,
        description="Taints every pod of the run tolerates (short for pods.all.tolerations; the operator adds the "
        "nvidia.com/gpu toleration itself when gpus > 0).",
    )
    learner_processes_per_pod: int = Field(
        0, ge=0, le=64,
        description="Learner ranks per pod (torchrun's nproc_per_node); 0 = one per GPU (one on a CPU-only pod). "
        "The learner's world size is learnerReplicas x this.",
    )
    pods: RolePods = Field(
        default_factory=RolePods,
        description="Pod overrides (core/v1 field names) for every pod (`all`) and per role (`learner`, `rollout`, "
        "`gpm`): labels, annotations, nodeSelector, tolerations, affinity, priorityClassName, imagePullSecrets, env, "
        "volumes, volumeMounts. hostPath/Secret volumes, secretKeyRef env, securityContext and host namespaces are "
        "refused.",
    )
    model_cache: ModelCacheSpec = Field(
        default_factory=ModelCacheSpec,
        description="Volume that `hf://` model and data sources are downloaded into, once, by an init container.",
    )


# --------------------------------------------------------------------------------------
# the run


class RunSpec(_Spec):
    """Everything a GPRL run needs."""

    # Change marks (gprl.api.marks): a section's mark holds for each of its fields that has none of its own.
    seed: int = Field(0, ge=0, le=2**32 - 1, description="Seed of data order, sampling and initialisation.",
                      json_schema_extra=IMMUTABLE)
    model: ModelSpec = Field(default_factory=ModelSpec, description="Policy and reference models.",
                             json_schema_extra=IMMUTABLE)
    data: DataSpec = Field(default_factory=DataSpec, description="Prompt data.", json_schema_extra=RESTART)
    gpm: GPMSpec = Field(default_factory=GPMSpec, description="The General Preference Model that scores responses.",
                         json_schema_extra=RESTART)
    algo: AlgoSpec = Field(default_factory=AlgoSpec, description="Advantages and policy update.",
                           json_schema_extra=RESTART)
    drift: DriftSpec = Field(default_factory=DriftSpec, description="The closed-loop drift monitor.",
                             json_schema_extra=RESTART)
    rollout: RolloutSpec = Field(default_factory=RolloutSpec, description="Generation.", json_schema_extra=RESTART)
    learner: LearnerSpec = Field(default_factory=LearnerSpec, description="Optimisation backend.",
                                 json_schema_extra=RESTART)
    checkpoint: CheckpointSpec = Field(default_factory=CheckpointSpec, description="Checkpointing and resume.",
                                       json_schema_extra=RESTART)
    output: OutputSpec = Field(default_factory=OutputSpec, description="Outputs of a run.", json_schema_extra=RESTART)
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec, description="Kubernetes resources (operator only).",
                                     json_schema_extra=IMMUTABLE)

    @model_validator(mode="after")
    def _cross(self) -> "RunSpec":
        pins = self.drift.pinned_weights
        if pins is not None and len(pins) != self.gpm.axes:
            raise ValueError(f"drift.pinned_weights has {len(pins)} entries but gpm.axes is {self.gpm.axes}")
        if self.drift.kl_coef_max < self.algo.kl_coef:
            raise ValueError(
                f"drift.kl_coef_max ({self.drift.kl_coef_max}) must be >= algo.kl_coef ({self.algo.kl_coef})"
            )
        for path, value in self.source_fields().items():
            parse_source(value, path)  # hf:// and pvc:// sources are well formed (raises naming the field)
        r = self.resources
        rollout_gpus = r.pods.for_role("rollout").gpus
        rollout_gpus = r.gpus if rollout_gpus is None else rollout_gpus
        if r.topology == "disaggregated" and rollout_gpus and self.rollout.tensor_parallel_size > rollout_gpus:
            raise ValueError(f"rollout.tensor_parallel_size ({self.rollout.tensor_parallel_size}) must be <= the "
                             f"rollout pods' GPUs ({rollout_gpus}): a rollout server shards the policy across its own "
                             "pod's GPUs")
        return self

    def source_fields(self) -> dict[str, str]:
        """The fields that name a model or data source (local, `world:`, `hf://` or `pvc://`), by dotted path."""
        out = {"model.policy": self.model.policy, "model.reference": self.model.reference, "gpm.path": self.gpm.path,
               "data.prompts": self.data.prompts}
        return {k: v for k, v in out.items() if v is not None}

    def to_dict(self, camel: bool = True) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=camel)

    def changed_fields(self, other: "RunSpec", fields: tuple[str, ...] | None = None) -> list[str]:
        """Dotted paths among `fields` (default: the resume check's, from the change marks) whose values differ
        between self and other, as `path: other -> self`."""
        fields = resume_fields(RunSpec) if fields is None else fields
        a, b = self.to_dict(camel=False), other.to_dict(camel=False)
        out = []
        for path in fields:
            va, vb = a, b
            for part in path.split("."):
                va, vb = va[part], vb[part]
            if va != vb:
                out.append(f"{path}: {vb!r} -> {va!r}")
        return out


# --------------------------------------------------------------------------------------
# errors, YAML, CLI


def _user_path(raw: Any, loc: tuple) -> str:
    """Render a pydantic error location in the spelling the user wrote (snake or camel)."""
    parts, node = [], raw
    for key in loc:
        if isinstance(key, int):
            parts[-1:] = [f"{parts[-1]}[{key}]"] if parts else [f"[{key}]"]
            node = node[key] if isinstance(node, list) and key < len(node) else None
            continue
        name = key
        if isinstance(node, dict):
            camel = to_camel(key)
            snake = "".join("_" + c.lower() if c.isupper() else c for c in key)
            for cand in (key, camel, snake):
                if cand in node:
                    name = cand
                    break
            node = node.get(name)
        else:
            node = None
        parts.append(name)
    return ".".join(parts) or "<root>"


def _fix_hint(err: dict) -> str:
    kind = err["type"]
    ctx = err.get("ctx") or {}
    if kind == "extra_forbidden":
        return "unknown field; remove it or check its spelling (see `gprl config --schema`)"
    if kind == "literal_error":
        if isinstance(err.get("input"), bool):
            # YAML 1.1 (PyYAML, kubectl) reads a bare off/on/yes/no as a boolean
            return (f"must be one of {ctx.get('expected')}; a bare `off`/`on`/`yes`/`no` is a boolean in YAML: "
                    "quote it (mode: \"off\")")
        return f"must be one of {ctx.get('expected')}"
    if kind in ("greater_than_equal", "greater_than", "less_than_equal", "less_than"):
        op = {"greater_than_equal": ">=", "greater_than": ">", "less_than_equal": "<=", "less_than": "<"}[kind]
        bound = next(iter(ctx.values()))
        return f"must be {op} {bound:g}" if isinstance(bound, float) else f"must be {op} {bound}"
    return err["msg"].removeprefix("Value error, ")


def validation_problems(exc: ValidationError, raw: Any) -> list[str]:
    problems = []
    for err in exc.errors(include_url=False):
        path = _user_path(raw, err["loc"])
        line = f"{path}: {_fix_hint(err)}"
        if err["type"] not in ("extra_forbidden", "missing", "model_type") and "input" in err:
            if not isinstance(err["input"], dict):
                line += f", got {err['input']!r}"
        problems.append(line)
    return problems


def parse_config(raw: Any, source: str | None = None) -> RunSpec:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError([f"<root>: expected a mapping of sections, got {type(raw).__name__}"], source)
    try:
        return RunSpec.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(validation_problems(exc, raw), source) from None


def load_config(path: str | os.PathLike) -> RunSpec:
    """Read a run config from YAML. A file that holds a whole GPRLRun manifest is read from its `spec`."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError([f"cannot read the file: {exc.strerror}"], str(path)) from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError([f"not valid YAML: {exc}"], str(path)) from None
    if isinstance(raw, dict) and raw.get("kind") == "GPRLRun":
        from gprl.api.manifest import parse_manifest  # the API server's verdict on a manifest

        return parse_manifest(raw, str(path))
    return parse_config(raw, str(path))


def dump_config(spec: RunSpec, path: str | os.PathLike | None = None) -> str:
    text = yaml.safe_dump(spec.to_dict(), sort_keys=False)
    if path is not None:
        atomic_write_text(Path(path), text)
    return text


def atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _leaf_fields(model: type[BaseModel], prefix: str = ""):
    for name, field in model.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            yield from _leaf_fields(ann, f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}", field


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One `--section.field VALUE` flag per leaf of RunSpec, documented by its description."""
    group = parser.add_argument_group("run configuration (override the config file)")
    for path, field in _leaf_fields(RunSpec):
        group.add_argument(
            f"--{path}", dest=f"cfg:{path}", metavar="V", default=argparse.SUPPRESS, help=field.description
        )


def apply_config_flags(raw: dict, args: argparse.Namespace, camel: bool = False) -> dict:
    """Merge the flags given on the command line into a raw config mapping (values parsed as YAML scalars);
    `camel`: write the keys camelCase (a manifest's spec), else snake_case."""
    raw = dict(raw or {})
    for key, value in vars(args).items():
        if not key.startswith("cfg:"):
            continue
        parts = key[4:].split(".")
        node = raw
        for part in parts[:-1]:
            cur = node.get(part, node.get(to_camel(part)))
            cur = dict(cur) if isinstance(cur, dict) else {}
            node.pop(to_camel(part), None)
            node.pop(part, None)
            node[to_camel(part) if camel else part] = cur
            node = cur
        node.pop(to_camel(parts[-1]), None)
        node.pop(parts[-1], None)
        try:
            parsed = yaml.safe_load(value)
        except yaml.YAMLError:
            parsed = value
        if isinstance(parsed, bool) and value.strip().lower() not in ("true", "false"):
            parsed = value  # `--drift.mode off` means the word; YAML 1.1 would read a boolean
        node[to_camel(parts[-1]) if camel else parts[-1]] = parsed
    return raw
