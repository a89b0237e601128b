"""Update backends: plain torch (default); DeepSpeed ZeRO (optional, multi-rank)."""

from gprl.learner.torch_learner import TorchLearner, UpdateStats, sequence_logprobs

__all__ = ["TorchLearner", "UpdateStats", "sequence_logprobs", "make_learner"]


def make_learner(policy, reference, spec):
    """The learner `spec.learner.backend` names. DeepSpeed is imported only when asked for."""
    if spec.learner.backend == "deepspeed":
        from gprl.learner.deepspeed_learner import DeepSpeedLearner

        return DeepSpeedLearner(policy, reference, spec)
    return TorchLearner(policy, reference, spec)
