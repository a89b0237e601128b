"""The clipped policy update on plain torch: micro-batches, gradient accumulation, clipping, lr schedule."""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from gprl.algo import policy_loss
from gprl.algo.drift import Control
from gprl.config import RunSpec
from gprl.buckets import length_buckets
from gprl.prefix import cache_rows, distinct_prompts, positions_of, run_on_prefix, run_prefix
from gprl.rollout.base import RolloutBatch


def _bucket_logits(model, ids: Tensor, mask: Tensor, prompt_cols: int, buckets: list[Tensor], widths: list[int],
                   share_prompt: bool):
    """Per bucket of rows, the logits at its last prompt column and its response columns but the last (those
    predicting response tokens): (n_b, w_b, vocab), w_b its response width. With `share_prompt` each distinct
    prompt of the rows runs once (gprl.prefix), for every bucket: a micro-batch of whole groups computes its
    prompts 1/G as often."""
    P = prompt_cols
    if share_prompt:
        first, inverse = distinct_prompts(ids[:, :P], mask[:, :P])
        share_prompt = len(first) < len(inverse)
    if share_prompt:
        head, cache = run_prefix(model, ids[first, :P], mask[first, :P], logits_to_keep=1)
    for rows, w in zip(buckets, widths):
        if not share_prompt:
            m = mask[rows, : P + w]
            yield model(input_ids=ids[rows, : P + w], attention_mask=m, position_ids=positions_of(m),
                        logits_to_keep=w + 1).logits[:, :-1]
            continue
        logits = head.logits[inverse[rows]]
        if w > 1:  # the last response column predicts nothing: the rest runs up to the one before
            rest = run_on_prefix(model, ids[rows, : P + w - 1], mask[rows, : P + w - 1], P,
                                 cache_rows(cache, inverse[rows]), logits_to_keep=w - 1)
            logits = torch.cat([logits, rest.logits], dim=1)
        yield logits


def sequence_logprobs(model, batch: RolloutBatch, rows: slice | Tensor, temperature: float, with_entropy: bool = False,
                      share_prompt: bool = False, max_buckets: int = 1):
    """Per-token log-probs (and entropies) of the response tokens in rows of the batch. Returns (n, T) tensors.

    Only what the rows need is computed: leading columns that are padding in every row (left-padded prompts) are
    cut; the rows run in at most max_buckets passes of similar response length (gprl.buckets), each only
    as wide as its longest response; the logits are computed for the response positions only (`logits_to_keep`),
    not the prompt's; with `share_prompt` each distinct prompt of the rows runs once (see _bucket_logits). Causal
    attention makes the kept positions' outputs the same as on the full width; the cut response columns come back
    as zeros (the response mask is 0 there).

    log p(y) = logit_y - logsumexp(logits): no (n, T, vocab) log-softmax is kept for the backward pass, and the
    entropy (a statistic, no gradient) is computed in chunks of rows, so the vocabulary-sized temporaries stay
    small."""
    ids, mask = batch.sequences[rows], batch.attention_mask[rows]
    P, T = batch.prompt_width, batch.sequences.shape[1] - batch.prompt_width
    used = mask.any(dim=0).nonzero()
    first = int(used[0]) if used.numel() else 0
    first = min(first, P - 1)  # the last prompt column's logits predict the first response token: always kept
    ids, mask = ids[:, first:], mask[:, first:]
    lengths = batch.response_mask[rows].sum(dim=1).clamp_min(1).cpu()  # one device sync for the whole split
    buckets = length_buckets(lengths, max_buckets)
    widths = [int(lengths[b].max()) for b in buckets]
    buckets = [b.to(ids.device) for b in buckets]
    pad = lambda t, w: torch.nn.functional.pad(t, (0, T - w))  # noqa: E731
    taken, entropy = [], []
    for b, w, logits in zip(buckets, widths, _bucket_logits(model, ids, mask, P - first, buckets, widths, share_prompt)):
        logits = logits.float() / temperature  # position P-1+t predicts response token t
        response = ids[b, P - first : P - first + w]
        taken.append(pad(logits.gather(-1, response.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1), w))
        if with_entropy:
            with torch.no_grad():
                entropy.append(pad(torch.cat([
                    torch.logsumexp(chunk, dim=-1) - (torch.softmax(chunk, dim=-1) * chunk).sum(-1)
                    for chunk in logits.detach().split(8)
                ]), w))
    back = torch.argsort(torch.cat(buckets))  # bucket order → the rows' order
    return torch.cat(taken)[back], (torch.cat(entropy)[back] if with_entropy else None)


def lr_factor(step: int, total: int, warmup: int, schedule: str) -> float:
    if warmup and step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    if schedule == "linear":
        return max(0.0, 1.0 - progress)
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return 1.0


@dataclass
class UpdateStats:
    loss: float
    policy_loss: float
    kl: float
    clip_fraction: float
    entropy: float
    grad_norm: float
    learning_rate: float
    skipped: bool = False  # a non-finite loss or gradient: no optimizer step was taken


class FrozenPasses:
    """Micro-batched passes shared by the learners: the no-grad ones (reference, old log-probs) and the loss of
    one micro-batch. `forward_model` runs the policy (the module itself, or a DeepSpeed engine wrapping it); with
    LoRA and no separate reference, the reference is the policy with its adapters switched off."""

    spec: RunSpec
    policy: object
    reference: object
    # a plain torch learner holds every parameter whole, and its checkpoint is the policy folder + trainer state
    collective_gather = False
    sharded_checkpoint = False

    def gathered_parameters(self, params=None):
        return contextlib.nullcontext()

    @property
    def forward_model(self):
        return self.policy

    def _share_prompt(self, grad: bool) -> bool:
        """Run each prompt once per micro-batch? Not in a checkpointed backward: recomputing a layer would append to
        the shared cache a second time. Not under ZeRO-3: every rank must run the same modules in the same order,
        and whether a micro-batch has a prompt to share (an extra pass) depends on each rank's rows."""
        return (self.spec.model.share_prompt and not self.collective_gather
                and not (grad and self.spec.learner.gradient_checkpointing))

    def _max_buckets(self) -> int:
        """Passes per micro-batch over rows of similar length (gprl.buckets). One under ZeRO-3: how many
        passes a micro-batch needs depends on each rank's rows."""
        return 1 if self.collective_gather else self.spec.learner.length_buckets

    def _micro_batches(self, batch: RolloutBatch) -> list[Tensor]:
        """Row indices of each micro-batch. Rows of similar length go together, so that sequence_logprobs cuts the
        padding the others would bring: sorted by length, or, when prompts are shared, whole groups sorted by their
        longest row (a micro-batch of whole groups runs each prompt once). The micro-batches' gradients still sum
        to the batch's (the loss weights each by its share)."""
        n, size = batch.sequences.shape[0], self.spec.algo.micro_batch_size
        length = batch.attention_mask.sum(dim=1)
        if self._share_prompt(grad=False) and n % batch.group_size == 0:
            longest = length.view(-1, batch.group_size).amax(dim=1).repeat_interleave(batch.group_size)
            # ties broken by the group's index, so that a group's rows stay together
            length = longest * (n + 1) + torch.arange(n, device=length.device) // batch.group_size
        order = torch.argsort(length, stable=True)  # on the batch's device
        return [order[i : i + size] for i in range(0, n, size)]

    @torch.no_grad()
    def _frozen_logprobs(self, model_or_none, batch: RolloutBatch) -> Tensor:
        temp, share = self.spec.rollout.temperature, self._share_prompt(grad=False)
        out = torch.zeros(batch.response_mask.shape, dtype=torch.float32, device=batch.sequences.device)
        for rows in self._micro_batches(batch):
            if model_or_none is None:
                with self.policy.disable_adapter():
                    out[rows] = sequence_logprobs(self.forward_model, batch, rows, temp, share_prompt=share,
                                                  max_buckets=self._max_buckets())[0]
            else:
                out[rows] = sequence_logprobs(model_or_none, batch, rows, temp, share_prompt=share,
                                              max_buckets=self._max_buckets())[0]
        return out

    @property
    def runs_reference_pass(self) -> bool:
        """False when nothing can turn the KL term on: no reference log-probs are computed."""
        return not (self.spec.algo.kl_coef == 0 and self.spec.drift.mode == "off")

    def reference_logprobs(self, batch: RolloutBatch) -> Tensor | None:
        return self._frozen_logprobs(self.reference, batch) if self.runs_reference_pass else None

    def micro_batch_loss(self, batch: RolloutBatch, rows: Tensor, advantages: Tensor, mask: Tensor,
                         ref_logp: Tensor | None, old_logp: Tensor | None, control: Control, total_tokens: float,
                         total_sequences: float) -> tuple[Tensor, list[float]]:
        """The clipped-surrogate loss of one micro-batch, weighted by its share of the batch (tokens for token_mean,
        sequences for sequence_mean; the totals may be those of every rank's batch), so that the gradients of the
        micro-batches sum to the batch's. Returns (weighted loss, [loss, policy_loss, kl, clip_fraction] times the
        share + [entropy summed over the micro-batch's tokens / total_tokens])."""
        algo = self.spec.algo
        logp, entropy = sequence_logprobs(self.forward_model, batch, rows, self.spec.rollout.temperature,
                                          with_entropy=True, share_prompt=self._share_prompt(grad=True),
                                          max_buckets=self._max_buckets())
        device = logp.device
        m = mask[rows].to(device)
        stats = policy_loss(
            logp,
            logp.detach() if old_logp is None else old_logp[rows].to(device),  # one pass: the ratio is exactly 1
            None if ref_logp is None else ref_logp[rows].to(device),
            advantages[rows].to(device),
            m,
            eps_low=control.eps_low,
            eps_high=control.eps_high,
            kl_coef=control.kl_coef,
            kl_estimator=algo.kl_estimator,
            aggregation=algo.loss_aggregation,
        )
        share = (float(m.sum()) / total_tokens if algo.loss_aggregation == "token_mean"
                 else len(rows) / total_sequences)
        parts = [stats.loss.item() * share, float(stats.policy_loss) * share, float(stats.kl) * share,
                 float(stats.clip_fraction) * share, float((entropy.float() * m).sum()) / total_tokens]
        return stats.loss * share, parts


class TorchLearner(FrozenPasses):
    def __init__(self, policy, reference, spec: RunSpec):
        self.policy = policy
        self.reference = reference  # None with LoRA: the base model with adapters off is the reference
        self.spec = spec
        algo = spec.algo
        params = [p for p in policy.parameters() if p.requires_grad]
        # The fused kernel updates each parameter in one pass instead of a dozen elementwise ops per tensor: on a
        # CPU it was ~5x faster than the default per-tensor loop (the same maths; TRL's Trainer uses it too).
        fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
        self.optimizer = torch.optim.AdamW(params, lr=algo.learning_rate, weight_decay=algo.weight_decay, fused=fused)
        warmup = int(algo.warmup_ratio * algo.steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda t: lr_factor(t, algo.steps, warmup, algo.lr_schedule)
        )

    def update(self, batch: RolloutBatch, advantages: Tensor, control: Control,
               ref_logp: Tensor | None = None) -> UpdateStats:
        """epochs_per_batch optimizer steps over the batch, each accumulated over micro-batches. ref_logp: the
        batch's reference_logprobs when the caller already has them (the trainer runs that pass beside the GPM's
        scoring); computed here when None."""
        algo = self.spec.algo
        if ref_logp is None:
            ref_logp = self.reference_logprobs(batch)
        self.policy.train()
        # With one pass the sampling policy is the current one: the ratio is exactly 1 and the old
        # log-probs are the current ones, detached — no extra forward pass (as TRL does).
        old_logp = batch.old_logp
        if old_logp is None and algo.epochs_per_batch > 1:
            old_logp = self._frozen_logprobs(self.policy, batch)
        mask = batch.response_mask.float()
        total_tokens, n = max(1.0, float(mask.sum())), float(mask.shape[0])
        sums = [0.0] * 5  # loss, policy_loss, kl, clip_fraction, entropy
        grad_norm, skipped = 0.0, False
        for _ in range(algo.epochs_per_batch):
            self.optimizer.zero_grad(set_to_none=True)
            for rows in self._micro_batches(batch):
                loss, parts = self.micro_batch_loss(batch, rows, advantages, mask, ref_logp, old_logp, control,
                                                    total_tokens, n)
                loss.backward()
                sums = [a + b / algo.epochs_per_batch for a, b in zip(sums, parts)]
            grad_norm = float(torch.nn.utils.clip_grad_norm_(self.policy.parameters(), algo.max_grad_norm))
            if not (math.isfinite(grad_norm) and all(math.isfinite(x) for x in sums)):
                # AdamW would write the NaN into every weight (and its moments): drop this batch instead
                self.optimizer.zero_grad(set_to_none=True)
                skipped = True
                break
            self.optimizer.step()
        lr = self.scheduler.get_last_lr()[0]
        self.scheduler.step()
        self.policy.eval()
        return UpdateStats(*sums, grad_norm=grad_norm, learning_rate=lr, skipped=skipped)

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
