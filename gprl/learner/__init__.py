"""Update backends: plain torch (default); DeepSpeed ZeRO (optional, multi-rank)."""

from gprl.learner.torch_learner import TorchLearner, sequence_logprobs

__all__ = ["TorchLearner", "sequence_logprobs"]
