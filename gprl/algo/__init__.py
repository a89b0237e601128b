"""The GPRL maths: pure tensor functions and the drift monitor."""

from gprl.algo.advantages import (
    advantages,
    aggregate,
    axis_variance,
    group_axis_scores,
    normalize_global,
    normalize_per_axis,
    pairwise_axis_scores,
    pairwise_scores,
    preference_probabilities,
)
from gprl.algo.drift import Control, DriftMonitor, single_axis_exploitation
from gprl.algo.loss import kl_penalty, masked_aggregate, policy_loss

__all__ = [
    "advantages",
    "aggregate",
    "axis_variance",
    "group_axis_scores",
    "normalize_global",
    "normalize_per_axis",
    "pairwise_axis_scores",
    "pairwise_scores",
    "preference_probabilities",
    "Control",
    "DriftMonitor",
    "single_axis_exploitation",
    "kl_penalty",
    "masked_aggregate",
    "policy_loss",
]
