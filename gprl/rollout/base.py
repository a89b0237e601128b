from __future__ import annotations

from dataclasses import dataclass
from typing import ContextManager, Protocol, Sequence

from torch import Tensor


@dataclass
class RolloutBatch:
    """B prompts × G responses, laid out prompt-major (responses of prompt b at rows b·G … b·G+G−1).

    sequences: (N, P+T) left-padded prompt then right-padded response ids; attention_mask: (N, P+T);
    response_mask: (N, T) 1 on generated tokens up to and including eos; prompt_width: P.
    """

    prompts: list[str]
    responses: list[str]
    sequences: Tensor
    attention_mask: Tensor
    response_mask: Tensor
    prompt_width: int
    group_size: int
    policy_version: int
    old_logp: Tensor | None = None  # (N, T), when the backend computes them
    # (N, T) log-probs of the sampled tokens as the sampler (e.g. vLLM) computed them, after temperature; kept
    # apart from old_logp so that sampler/learner numerical differences never move the clipped ratio.
    sampler_logp: Tensor | None = None

    @property
    def response_ids(self) -> Tensor:
        return self.sequences[:, self.prompt_width :]

    @property
    def num_tokens(self) -> int:
        return int(self.response_mask.sum())

    def to(self, device) -> "RolloutBatch":
        """The same batch with its tensors on `device` (a server's rollout arrives on the CPU)."""
        from dataclasses import replace

        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return replace(self, sequences=move(self.sequences), attention_mask=move(self.attention_mask),
                       response_mask=move(self.response_mask), old_logp=move(self.old_logp),
                       sampler_logp=move(self.sampler_logp))


class WeightSource(Protocol):
    """What a rollout backend needs of the learner to read the policy's weights (both learners provide it)."""

    # whole parameters exist only inside a gather that every rank enters together (DeepSpeed ZeRO-3)
    collective_gather: bool

    def gathered_parameters(self, params=None) -> ContextManager:
        """`params` (default: all of the policy's) whole on this rank for the duration."""
        ...


class RolloutBackend(Protocol):
    def generate(self, prompts: Sequence[str], group_size: int) -> RolloutBatch: ...

    def sync_weights(self, policy, version: int) -> None: ...


class StaleRollout(RuntimeError):
    """A rollout came from weights older than the learner's current policy version."""

    def __init__(self, have: int, want: int, where: str = ""):
        self.have, self.want = have, want
        super().__init__(f"stale rollout{f' from {where}' if where else ''}: weights version {have}, learner at {want}")
