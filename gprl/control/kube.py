"""The job side of the closed drift loop: the GPRLRun's status subresource, over plain HTTPS.

`gprl/` never imports `kubernetes`; this module speaks to the API server with urllib, the pod's
ServiceAccount token and CA (`/var/run/secrets/kubernetes.io/serviceaccount`), which the operator's Role
lets read its own GPRLRun and patch its status, and nothing else.

- `report(record)`: merge-patches `status.step`, `status.policyVersion` and `status.training` (per-axis
  statistics: the drift monitor's inputs, plus KL, clip fraction, throughput, eigenvalues, ...), at most once
  per `drift.reportIntervalSeconds` (the last step of the run is always sent). Every step the operator has not
  fed to its monitor yet (`status.driftMonitor.lastStep`, read back at each poll) travels in `training.history`
  (at most 512), so the monitor sees every step, however its timer and the reports interleave. The shapes are
  `gprl.api.status`'s: `TrainingReport`, `StepStatistics`, `ControlAck`; this ServiceAccount may write
  `status.step`, `status.policyVersion` and `status.training` only (an admission policy refuses the rest).
- `poll()`: reads `status.control` at most once per `GPRL_CONTROL_POLL_SECONDS` (default 1 s); a new
  `generation` is validated (`gprl.control.validate_control`) and returned to the trainer, which applies it at
  this step boundary; the applied generation is acknowledged at once in `status.training.appliedControlGeneration`
  and `status.training.controlAck` (with the block's own `reportedAt` / `statisticsAt`). A malformed block is never
  applied: it is reported as `status.training.refusedControl` and logged.
- API server unreachable: the trainer keeps its last good control; the channel logs once per outage, retries at
  the next step, and sends the statistics it held back once the server answers again.

Environment (the operator's pod sets the run name/namespace; the rest has in-cluster defaults):
  GPRL_RUN_NAME, GPRL_RUN_NAMESPACE      the GPRLRun (namespace defaults to the ServiceAccount's)
  GPRL_KUBE_API                          API server URL (default https://$KUBERNETES_SERVICE_HOST:$KUBERNETES_SERVICE_PORT)
  GPRL_KUBE_TOKEN / GPRL_KUBE_TOKEN_FILE bearer token, or the file holding it (re-read: projected tokens rotate)
  GPRL_KUBE_CA                           CA bundle of the API server
  GPRL_CONTROL_POLL_SECONDS              least time between two reads of status.control (default 1)
  GPRL_CONTROL_HISTORY                   most steps held back for the operator (default 512)
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import ssl
import sys
import time
import urllib.error
import urllib.request
from collections import deque
from typing import Any, Callable

from gprl.algo.drift import Control
from gprl.api.status import ControlAck, RefusedControl, StepStatistics, TrainingReport
from gprl.config import RunSpec
from gprl.control import InvalidControl, validate_control

SA_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
GROUP, VERSION, PLURAL = "gprl.dev", "v1alpha1", "gprlruns"
HISTORY_MAX = 512  # steps held back while reports are rate-limited or the API server is down (GPRL_CONTROL_HISTORY)

# trainer record keys copied into status.training (TrainingReport's fields of the same snake_case name)
SCALARS = ("kl", "clip_fraction", "entropy", "loss", "policy_loss", "grad_norm", "learning_rate", "response_length",
           "tokens", "tokens_per_second", "advantage_abs_mean", "step_seconds", "kl_coef", "eps_low", "eps_high")
LISTS = ("axis_variance", "axis_win_rate", "eigenvalues", "weights")


def now_rfc3339() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")


def parse_rfc3339(text: str) -> float:
    return _dt.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def _log_default(msg: str) -> None:
    print(msg, file=sys.stdout, flush=True)


class ApiUnavailable(RuntimeError):
    pass


class KubeControlChannel:
    def __init__(
        self,
        spec: RunSpec,
        initial: Control,
        *,
        api: str,
        name: str,
        namespace: str,
        token: str | None = None,
        token_file: str | None = None,
        ca_file: str | None = None,
        log: Callable[[str], None] | None = None,
        poll_seconds: float = 1.0,
        timeout: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
        history_max: int = HISTORY_MAX,
    ):
        self.spec = spec
        self.axes = spec.gpm.axes
        self.api = api.rstrip("/")
        self.name, self.namespace = name, namespace
        self._token, self._token_file = token, token_file
        self.ssl = ssl.create_default_context(cafile=ca_file) if ca_file else ssl.create_default_context()
        self.log = log or _log_default
        self.poll_seconds = poll_seconds
        self.report_seconds = spec.drift.report_interval_seconds
        self.timeout = timeout
        self.clock = clock
        self.control = initial
        self.applied_generation: int | None = None  # generation of status.control in force here
        self.refused: dict | None = None  # {"generation", "reason"} of the last block refused
        self._seen_generation: int | None = None  # newest generation looked at (applied or refused)
        self._pending_ack: dict | None = None
        self.last_applied: dict | None = None  # the acknowledgement of the last generation applied
        # steps not yet fed to the operator's monitor (it publishes status.driftMonitor.lastStep): every report
        # carries all of them, so a tick that comes after several reports still sees every step
        self._history: deque = deque(maxlen=history_max)
        self._fed_step = 0
        self._dropped = 0
        self._last_report = -float("inf")
        self._last_poll = -float("inf")
        self._step = 0
        self._down_since: float | None = None  # monotonic time of the first failure of the current outage
        self.requests = 0
        self.failures = 0

    @classmethod
    def from_env(cls, spec: RunSpec, initial: Control, env: dict | None = None, log=None) -> "KubeControlChannel":
        env = os.environ if env is None else env
        api = env.get("GPRL_KUBE_API")
        if not api:
            host, port = env.get("KUBERNETES_SERVICE_HOST"), env.get("KUBERNETES_SERVICE_PORT", "443")
            if not host:
                raise ValueError("no API server: set GPRL_KUBE_API or run in a pod (KUBERNETES_SERVICE_HOST)")
            api = f"https://[{host}]:{port}" if ":" in host else f"https://{host}:{port}"
        token = env.get("GPRL_KUBE_TOKEN")
        token_file = env.get("GPRL_KUBE_TOKEN_FILE") or (None if token else f"{SA_DIR}/token")
        ca = env.get("GPRL_KUBE_CA") or (f"{SA_DIR}/ca.crt" if os.path.exists(f"{SA_DIR}/ca.crt") else None)
        namespace = env.get("GPRL_RUN_NAMESPACE")
        if not namespace and os.path.exists(f"{SA_DIR}/namespace"):
            namespace = open(f"{SA_DIR}/namespace").read().strip()
        name = env.get("GPRL_RUN_NAME")
        if not name or not namespace:
            raise ValueError("GPRL_RUN_NAME and GPRL_RUN_NAMESPACE must name the GPRLRun of this job")
        return cls(
            spec, initial, api=api, name=name, namespace=namespace, token=token, token_file=token_file, ca_file=ca,
            log=log, poll_seconds=float(env.get("GPRL_CONTROL_POLL_SECONDS", "1")),
            history_max=int(env.get("GPRL_CONTROL_HISTORY", str(HISTORY_MAX))),
        )

    # ------------------------------------------------------------------ HTTP

    @property
    def path(self) -> str:
        return f"/apis/{GROUP}/{VERSION}/namespaces/{self.namespace}/{PLURAL}/{self.name}"

    def _bearer(self) -> str | None:
        if self._token:
            return self._token
        if self._token_file:
            with open(self._token_file) as fh:  # re-read every time: projected tokens rotate
                return fh.read().strip()
        return None

    def _request(self, method: str, path: str, body: Any = None, content_type: str = "application/json") -> Any:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.api + path, data=data, method=method)
        token = self._bearer()
        if token:
            req.add_header("Authorization", f"Bearer {token}")
        req.add_header("Accept", "application/json")
        if data is not None:
            req.add_header("Content-Type", content_type)
        self.requests += 1
        try:
            with urllib.request.urlopen(req, context=self.ssl, timeout=self.timeout) as r:
                raw = r.read()
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode(errors="replace")[:300]
            if exc.code >= 500 or exc.code == 429:
                raise ApiUnavailable(f"{method} {path}: HTTP {exc.code}: {detail}") from None
            raise RuntimeError(f"{method} {path}: HTTP {exc.code}: {detail}") from None
        except (urllib.error.URLError, OSError, TimeoutError) as exc:
            raise ApiUnavailable(f"{method} {path}: {getattr(exc, 'reason', exc)}") from None
        return json.loads(raw) if raw else None

    def _patch_status(self, status: dict) -> None:
        self._request("PATCH", self.path + "/status", {"status": status}, "application/merge-patch+json")

    def _ok(self) -> None:
        if self._down_since is not None:
            self.log(f"control: API server reachable again after {self.clock() - self._down_since:.1f}s; "
                     f"control generation {self.applied_generation} still in force, catching up")
            self._down_since = None

    def _failed(self, what: str, exc: Exception) -> None:
        self.failures += 1
        if self._down_since is None:
            self._down_since = self.clock()
            self.log(f"control: {what} failed ({exc}); keeping control generation {self.applied_generation} "
                     f"(weights {[round(w, 4) for w in self.control.weights]}, klCoef {self.control.kl_coef:.4g}), "
                     "retrying at the next step")

    # ------------------------------------------------------------------ poll: status.control -> Control

    def poll(self) -> Control | None:
        now = self.clock()
        if now - self._last_poll < self.poll_seconds and self._pending_ack is None:
            return None
        self._last_poll = now
        try:
            run = self._request("GET", self.path)
        except Exception as exc:  # unreachable, 5xx, 403 ...: keep the last good control
            self._failed("reading status.control", exc)
            return None
        self._ok()
        status = (run or {}).get("status") or {}
        fed = (status.get("driftMonitor") or {}).get("lastStep")
        if isinstance(fed, int) and not isinstance(fed, bool):
            self._fed_step = fed  # the operator has these steps: stop resending them
        out = self._consider(status.get("control") or {})
        if self._pending_ack is not None:
            self._flush_ack()
        return out

    def _consider(self, block: dict) -> Control | None:
        gen = block.get("generation")
        if not isinstance(gen, int) or isinstance(gen, bool) or "weights" not in block:
            return None  # no decision yet
        if self._seen_generation is not None and gen <= self._seen_generation:
            return None
        self._seen_generation = gen
        step = self._step + 1  # the step about to run
        try:
            control = validate_control(block, self.axes, self.spec.drift)
        except InvalidControl as exc:
            self.refused = RefusedControl(generation=gen, reason=str(exc), refused_at=now_rfc3339(), step=step).wire()
            self.log(f"control: REFUSED generation {gen} at step {step}: {exc}; keeping generation "
                     f"{self.applied_generation}")
            self._pending_ack = {"refusedControl": dict(self.refused)}
            return None
        self.control, self.applied_generation = control, gen
        ack = ControlAck(generation=gen, applied_at=now_rfc3339(), applied_step=step,
                         reported_at=block.get("reportedAt"), statistics_at=block.get("statisticsAt"))
        self._pending_ack = self.last_applied = {"appliedControlGeneration": gen, "controlAck": ack.wire()}
        self.log(f"control: applied generation {gen} at step {step}: weights "
                 f"{[round(w, 4) for w in control.weights]}, klCoef {control.kl_coef:.4g}, "
                 f"eps [{control.eps_low:.4g}, {control.eps_high:.4g}]")
        return control

    def _flush_ack(self) -> None:
        status: dict[str, Any] = {"training": dict(self._pending_ack)}
        try:
            self._patch_status(status)
        except Exception as exc:
            self._failed("acknowledging control", exc)
            return
        self._ok()
        self._pending_ack = None

    # ------------------------------------------------------------------ report: record -> status.training

    def report(self, record: dict) -> None:
        self._step = int(record.get("step", self._step))
        axis_var = record.get("axis_variance")
        if axis_var is not None:
            if len(self._history) == self._history.maxlen:
                self._dropped += 1
                if self._dropped == 1:
                    self.log(f"control: more than {self._history.maxlen} steps not yet seen by the operator; dropping "
                             "the oldest (GPRL_CONTROL_HISTORY raises the limit)")
            win = record.get("axis_win_rate")  # a probe step: the monitor's second signal
            self._history.append(StepStatistics(
                step=self._step, axis_variance=[float(v) for v in axis_var], statistics_at=now_rfc3339(),
                axis_win_rate=None if win is None else [float(w) for w in win]).wire())
        now = self.clock()
        last = self._step >= self.spec.algo.steps
        if not last and now - self._last_report < self.report_seconds:
            return
        if self._down_since is not None and not last and now - self._last_poll < self.poll_seconds:
            return  # the server was down a moment ago: retry at the next step, not at every call
        while self._history and self._history[0]["step"] <= self._fed_step:
            self._history.popleft()
        report = TrainingReport(
            step=self._step, policy_version=int(record.get("policy_version", 0)), reported_at=now_rfc3339(),
            **{key: float(record[key]) for key in SCALARS if isinstance(record.get(key), (int, float))},
            **{key: [float(v) for v in record[key]] for key in LISTS if isinstance(record.get(key), list)},
        )
        training: dict[str, Any] = {**report.wire(), "history": list(self._history),
                                    "appliedControlGeneration": self.applied_generation}
        if self._pending_ack is not None:
            training.update(self._pending_ack)
        status: dict[str, Any] = {"step": self._step, "policyVersion": training["policyVersion"], "training": training}
        try:
            self._patch_status(status)
        except Exception as exc:
            self._last_poll = now
            self._failed(f"reporting step {self._step}", exc)
            return
        self._ok()
        self._last_report = now
        self._pending_ack = None
