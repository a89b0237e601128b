"""The GPRL maths: pure tensor functions and the drift monitor.

The drift monitor is torch-free and imported eagerly; the tensor functions load on first use, so the operator
(which runs the same DriftMonitor in an image without torch) can import `gprl.algo`.
"""

from gprl.algo.drift import Control, DriftMonitor, win_rate_lead

_LAZY = {
    **dict.fromkeys(
        ["advantages", "aggregate", "axis_variance", "group_axis_scores", "normalize_global", "normalize_per_axis",
         "pairwise_axis_scores", "pairwise_scores", "preference_probabilities"],
        "gprl.algo.per_axis",
    ),
    **dict.fromkeys(["kl_penalty", "masked_aggregate", "policy_loss"], "gprl.algo.loss"),
    **dict.fromkeys(["axis_pair_scores", "axis_win_rates", "pooled_win_rates", "probe_width"], "gprl.algo.probe"),
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'gprl.algo' has no attribute {name!r}")


__all__ = ["Control", "DriftMonitor", "win_rate_lead", *_LAZY]
