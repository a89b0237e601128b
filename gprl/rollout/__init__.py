"""Generation backends behind one protocol: G samples per prompt with their log-probs."""

from gprl.rollout.base import RolloutBackend, RolloutBatch
from gprl.rollout.hf import HFRollout

__all__ = ["RolloutBackend", "RolloutBatch", "HFRollout"]
