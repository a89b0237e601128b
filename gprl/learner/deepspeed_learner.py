"""The clipped policy update on DeepSpeed ZeRO (stage 0-3, optional optimizer offload), one process per rank.

Same maths as `TorchLearner`, on each rank's share of the batch (whole groups per rank):
  * every micro-batch's loss is weighted by its share of the GLOBAL batch (tokens for token_mean, sequences for
    sequence_mean) times the world size, because DeepSpeed averages gradients over data-parallel ranks — so the
    reduced gradient is exactly the full-batch gradient of the single-process learner;
  * gradients are accumulated over the micro-batches (accumulation boundary set by hand on the last one) and
    DeepSpeed clips them on the global norm (`gradient_clipping` = algo.max_grad_norm) before one optimizer step;
  * reported statistics are all-reduced, so every rank returns the statistics of the whole batch.

Optimizer: torch's AdamW (no compiled op) unless `learner.offload_optimizer`, which uses DeepSpeedCPUAdam
(`cpu_adam`, JIT-built once, see scripts/warm-deepspeed.sh). The learning-rate schedule is the torch learner's,
applied to the optimizer's param groups before each step.

Checkpoints: `save(dir)` / `load(dir)` are DeepSpeed checkpoints (model + partitioned optimizer states; collective:
all ranks call them); `export_pretrained(dir)` writes a plain Hugging Face folder from rank 0 (under ZeRO-3 the
parameters are gathered first).

The frozen reference model stays a plain module replicated on every rank (it is small next to policy + Adam state;
for a large model shard it with ZeRO-3 inference, as TRL does).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch
from torch import Tensor

from gprl import distributed as gdist
from gprl.algo.drift import Control
from gprl.config import RunSpec
from gprl.learner.torch_learner import FrozenPasses, UpdateStats, lr_factor
from gprl.rollout.base import RolloutBatch

CHECKPOINT_TAG = "learner"


def deepspeed_config(spec: RunSpec, world: int) -> dict:
    """The DeepSpeed config a run's spec means (batch sizes are per-rank micro-batches; accumulation is ours)."""
    learner, algo = spec.learner, spec.algo
    zero: dict = {
        "stage": learner.zero_stage,
        "overlap_comm": False,
        "contiguous_gradients": True,
        "reduce_bucket_size": 5e7,
        "allgather_bucket_size": 5e7,
    }
    if learner.zero_stage == 3:
        zero.update(
            stage3_gather_16bit_weights_on_model_save=True,
            stage3_prefetch_bucket_size=5e7,
            stage3_param_persistence_threshold=1e4,
        )
    if learner.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    return {
        "train_micro_batch_size_per_gpu": algo.micro_batch_size,
        "gradient_accumulation_steps": 1,
        "train_batch_size": algo.micro_batch_size * world,
        "gradient_clipping": algo.max_grad_norm,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": spec.model.dtype == "bfloat16"},
        "fp16": {"enabled": spec.model.dtype == "float16", "initial_scale_power": 16},
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }


def init_distributed() -> None:
    import deepspeed

    gdist.ensure_env_for_single_process()
    os.environ.setdefault("LOCAL_RANK", "0")  # one rank per pod (an indexed Job sets RANK, not LOCAL_RANK)
    if not gdist.is_distributed():
        deepspeed.init_distributed(verbose=False)  # gloo on CPUs, NCCL on GPUs: DeepSpeed's accelerator decides


class DeepSpeedLearner(FrozenPasses):
    sharded_checkpoint = True  # DeepSpeed writes the model and optimizer shards itself (save / load)

    def __init__(self, policy, reference, spec: RunSpec):
        import logging

        import deepspeed

        logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
        init_distributed()
        self.spec = spec
        self.reference = reference
        self.world, self.rank = gdist.world_size(), gdist.rank()
        self.stage = spec.learner.zero_stage
        algo = spec.algo
        params = [p for p in policy.parameters() if p.requires_grad]
        if spec.learner.offload_optimizer:
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            optimizer = DeepSpeedCPUAdam(params, lr=algo.learning_rate, weight_decay=algo.weight_decay, adamw_mode=True)
        else:
            optimizer = torch.optim.AdamW(params, lr=algo.learning_rate, weight_decay=algo.weight_decay)
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=policy, optimizer=optimizer, config=deepspeed_config(spec, self.world)
        )
        self.policy = self.engine.module
        self.warmup = int(algo.warmup_ratio * algo.steps)
        self.updates = 0  # optimizer steps taken (the lr schedule's clock)

    @property
    def forward_model(self):
        return self.engine

    def _set_lr(self) -> float:
        algo = self.spec.algo
        lr = algo.learning_rate * lr_factor(self.updates, algo.steps, self.warmup, algo.lr_schedule)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return lr

    # ------------------------------------------------------------------ the update

    def update(self, batch: RolloutBatch, advantages: Tensor, control: Control,
               ref_logp: Tensor | None = None) -> UpdateStats:
        """epochs_per_batch optimizer steps over this rank's share; statistics are those of the global batch.
        ref_logp: this rank's reference_logprobs when the caller already has them; computed here when None."""
        algo, engine = self.spec.algo, self.engine
        device = engine.device
        batch = _to(batch, device)
        ref_logp = self.reference_logprobs(batch) if ref_logp is None else ref_logp.to(device)
        engine.train()
        old_logp = batch.old_logp
        if old_logp is None and algo.epochs_per_batch > 1:
            old_logp = self._frozen_logprobs(self.engine, batch)
        mask = batch.response_mask.float()
        counts = gdist.all_reduce_sum(torch.tensor([float(mask.sum()), float(mask.shape[0])]))
        total_tokens, n_total = max(1.0, float(counts[0])), float(counts[1])
        # loss, policy_loss, kl, clip_fraction, entropy: shares of the global batch, summed over ranks at the end
        sums = torch.zeros(5, dtype=torch.float64)
        grad_norm, skipped = 0.0, False
        lr = self._set_lr()
        micro = self._micro_batches(batch)
        for _ in range(algo.epochs_per_batch):
            for i, rows in enumerate(micro):
                engine.set_gradient_accumulation_boundary(i == len(micro) - 1)
                loss, parts = self.micro_batch_loss(batch, rows, advantages, mask, ref_logp, old_logp, control,
                                                    total_tokens, n_total)
                # x world: DeepSpeed averages the gradients of the ranks; we want their sum.
                engine.backward(loss * self.world, scale_wrt_gas=False)
                sums += torch.tensor(parts, dtype=torch.float64) / algo.epochs_per_batch
            engine.step()
            norm = engine.get_global_grad_norm()
            grad_norm = float(norm) if norm is not None else 0.0
            if not engine.was_step_applied():
                # ZeRO-1/2 check the gradient themselves (fp16/bf16 overflow, an invalid norm in fp32) and drop
                # the step: the weights and the optimizer moments stay as they were, as in the torch learner.
                skipped = True
                break
            if not math.isfinite(grad_norm):
                # ZeRO-0/3 have no such check outside fp16: the step is taken and the weights are lost. Stop before
                # a checkpoint is written from them; the last checkpoint is intact.
                raise FloatingPointError(
                    f"non-finite gradient norm ({grad_norm}) under DeepSpeed ZeRO-{self.stage} in {self.spec.model.dtype}: "
                    "the optimizer step has already written it into the weights, so the run stops here without a "
                    "checkpoint. Resume from the last checkpoint with a lower algo.learningRate or algo.maxGradNorm, or "
                    "use learner.zeroStage 1 or 2 (they skip such a step)"
                )
        self.updates += 1
        engine.eval()
        sums = gdist.all_reduce_sum(sums)
        return UpdateStats(*(float(x) for x in sums), grad_norm=grad_norm, learning_rate=lr, skipped=skipped)

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict:
        """The small part of the state (the rest is in the DeepSpeed checkpoint written by `save`)."""
        return {"updates": self.updates, "backend": "deepspeed", "zero_stage": self.stage, "world_size": self.world}

    def load_state_dict(self, state: dict) -> None:
        self.updates = int(state["updates"])

    def save(self, folder: str | Path) -> None:
        """DeepSpeed checkpoint of model and optimizer (collective: every rank calls it, same folder)."""
        self.engine.save_checkpoint(str(folder), tag=CHECKPOINT_TAG, client_state={"updates": self.updates})

    def load(self, folder: str | Path) -> None:
        path, client = self.engine.load_checkpoint(
            str(folder), tag=CHECKPOINT_TAG, load_optimizer_states=True, load_lr_scheduler_states=False
        )
        if path is None:
            raise FileNotFoundError(f"no DeepSpeed checkpoint under {folder}")
        self.updates = int((client or {}).get("updates", self.updates))

    def full_state_dict(self) -> dict | None:
        """The policy's full state dict on rank 0 (gathered under ZeRO-3; collective), None on other ranks."""
        if self.stage == 3:
            state = self.engine._zero3_consolidated_16bit_state_dict()
        else:
            state = {k: v.detach().clone() for k, v in self.policy.state_dict().items()} if self.rank == 0 else None
        return state if self.rank == 0 else None

    def export_pretrained(self, folder: str | Path) -> None:
        """A plain Hugging Face checkpoint of the policy, written by rank 0 (collective under ZeRO-3)."""
        state = self.full_state_dict()
        if self.rank == 0:
            # With LoRA (a peft model) this saves the adapters, as the torch path does.
            self.policy.save_pretrained(str(folder), state_dict=state)
        gdist.barrier()

    @property
    def collective_gather(self) -> bool:
        return self.stage == 3

    def gathered_parameters(self, params=None):
        """Context in which `params` (default: all of the policy's) are whole on every rank (for weight sync /
        generation). Under ZeRO-3 entering it is a collective (an all-gather): every rank must enter it, in the
        same order."""
        if self.stage == 3:
            import deepspeed

            return deepspeed.zero.GatheredParameters(list(self.policy.parameters() if params is None else params),
                                                     modifier_rank=None)
        return super().gathered_parameters(params)


def _to(batch: RolloutBatch, device) -> RolloutBatch:
    return batch if batch.sequences.device == torch.device(device) else batch.to(device)
