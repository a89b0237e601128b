from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence

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

    @property
    def response_ids(self) -> Tensor:
        return self.sequences[:, self.prompt_width :]

    @property
    def num_tokens(self) -> int:
        return int(self.response_mask.sum())


class RolloutBackend(Protocol):
    def generate(self, prompts: Sequence[str], group_size: int) -> RolloutBatch: ...

    def sync_weights(self, policy, version: int) -> None: ...
