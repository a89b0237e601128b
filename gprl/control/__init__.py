"""Where control comes from when the drift monitor runs outside the trainer (drift.mode: operator).

A channel reports each step's statistics and returns, at step boundaries, a new control to apply.
The only channel is `gprl.control.kube.KubeControlChannel`: the GPRLRun's status subresource, over plain
HTTPS (no `kubernetes` import in `gprl/`). `validate_control` is shared by the trainer (which never applies
a malformed block) and the operator (which refuses one written by hand, with an Event).
"""

from __future__ import annotations

import math
import os
from typing import Any, Callable, Protocol

from gprl.algo.drift import Control
from gprl.config import DriftSpec, RunSpec

# Hard bounds of a control block, beyond which it is refused whatever the run's drift settings say.
MAX_WEIGHT = 100.0


class ControlChannel(Protocol):
    def report(self, record: dict) -> None:
        """Hand over one step's record (rate-limiting is the channel's business)."""

    def poll(self) -> Control | None:
        """A control to apply from this step on, or None to keep the current one."""


class InvalidControl(ValueError):
    """A control block that must not be applied (wrong number of weights, out of bounds, wrong types)."""


def _number(block: dict, key: str) -> float:
    value = block.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InvalidControl(f"control.{key} must be a finite number, got {value!r}")
    return float(value)


def validate_control(block: Any, axes: int, drift: DriftSpec | None = None) -> Control:
    """A GPRLRun `status.control` block (camelCase) -> Control, or InvalidControl naming what is wrong.

    Checks: `weights` has one finite entry per axis, each in (0, MAX_WEIGHT]; `klCoef` in [0, 10] (and at most
    drift.klCoefMax when the run's drift settings are given); 0 < `epsLow` < 1; `epsLow` <= `epsHigh` <= 10.
    """
    if not isinstance(block, dict):
        raise InvalidControl(f"control must be an object, got {type(block).__name__}")
    weights = block.get("weights")
    if not isinstance(weights, list):
        raise InvalidControl(f"control.weights must be a list of {axes} numbers, got {weights!r}")
    if len(weights) != axes:
        raise InvalidControl(f"control.weights has {len(weights)} entries; the run's GPM has {axes} axes")
    out = []
    for i, w in enumerate(weights):
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w):
            raise InvalidControl(f"control.weights[{i}] must be a finite number, got {w!r}")
        if not 0 < w <= MAX_WEIGHT:
            raise InvalidControl(f"control.weights[{i}] = {w} is outside (0, {MAX_WEIGHT:g}]")
        out.append(float(w))
    kl = _number(block, "klCoef")
    kl_max = 10.0 if drift is None else max(drift.kl_coef_max, 0.0)
    if not 0 <= kl <= max(kl_max, 0.0) + 1e-12:
        raise InvalidControl(f"control.klCoef = {kl} is outside [0, {kl_max:g}] (drift.klCoefMax)")
    lo, hi = _number(block, "epsLow"), _number(block, "epsHigh")
    if not 0 < lo < 1:
        raise InvalidControl(f"control.epsLow = {lo} is outside (0, 1)")
    if not lo <= hi <= 10:
        raise InvalidControl(f"control.epsHigh = {hi} must be in [epsLow, 10] (epsLow = {lo})")
    return Control(out, kl, lo, hi)


def control_block(control: Control) -> dict:
    """Control -> the camelCase fields of `status.control`."""
    return {
        "weights": [float(w) for w in control.weights],
        "klCoef": float(control.kl_coef),
        "epsLow": float(control.eps_low),
        "epsHigh": float(control.eps_high),
    }


def in_cluster_env(env: dict | None = None) -> bool:
    """True when this process runs where the operator put it: a run name, and an API server to talk to."""
    env = os.environ if env is None else env
    return bool(env.get("GPRL_RUN_NAME")) and bool(env.get("GPRL_KUBE_API") or env.get("KUBERNETES_SERVICE_HOST"))


def open_channel(spec: RunSpec, initial: Control, log: Callable[[str], None] | None = None) -> ControlChannel:
    if in_cluster_env():
        from gprl.control.kube import KubeControlChannel

        return KubeControlChannel.from_env(spec, initial, log=log)
    raise ValueError(
        "drift.mode: operator needs the Kubernetes control channel, which runs only in a pod started by the "
        "GPRL operator (GPRL_RUN_NAME and the in-cluster API server, or GPRL_KUBE_API, must be set); "
        "use drift.mode: in_process for a local run"
    )
