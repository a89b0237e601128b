"""Drift-loop benchmark (issue 5) on the local control plane (etcd + kube-apiserver, gprl.devcluster).

A. Loop latency against the operator's timer interval (`GPRL_DRIFT_INTERVAL`), median and 95th percentile, both
   ends on the job's clock: from the oldest step statistics a control decision includes (`statisticsAt`: the
   statistics wait for the next report, then for the next tick) to that control applied by the job at a step
   boundary; and, shorter, from the newest report the decision read (`reportedAt`) to applied.
B. The operator's cost per monitored run with N runs (default 50) monitored at once: CPU (utime + stime of its
   process), memory (RSS), API requests per minute (counted in the operator: its own calls and kopf's), with the
   drift loop on, and the same load with the drift loop off (GPRL_OPERATOR_DRIFT_LOOP=0) for the difference.

The jobs are simulated: each is a thread running the real job-side channel (`gprl.control.kube.KubeControlChannel`,
with a TokenRequest token of the run's own ServiceAccount, created by the operator) around a fake training step
(fixed step time; per-axis variances in which axis 0 gains share unless the applied weights hold it back). No model
runs, so the numbers are the loop's, not the model's. The operator runs as a process under the Helm chart's
ServiceAccount, exactly as in tests/cluster.

    python benchmarks/drift_loop.py [--intervals 0.5 1 2 5] [--runs 50] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "operator"), str(ROOT / "tests" / "cluster")]

from gprl.config import parse_config  # noqa: E402
from gprl.control.kube import KubeControlChannel, parse_rfc3339  # noqa: E402
from gprl.devcluster import ControlPlane  # noqa: E402
from gprl_k8s_testlib import OPERATOR_NS, OPERATOR_SA, OperatorProcess, create_run, find_tool, install_chart  # noqa: E402

CLK_TCK = os.sysconf("SC_CLK_TCK")


def spec_for(report_interval: float, mode: str = "operator") -> dict:
    return {
        "model": {"policy": "/models/policy"},
        "gpm": {"path": "/models/gpm", "axes": 3},
        "data": {"prompts": "/data/prompts.jsonl"},
        "algo": {"steps": 1_000_000},
        "drift": {"mode": mode, "warmupSteps": 3, "tau": 0.02, "reportIntervalSeconds": report_interval},
        "resources": {"gpus": 0},
    }


class SimJob(threading.Thread):
    """One run's job side: poll at the step boundary, a fake step, report."""

    def __init__(self, cp, ns: str, name: str, spec: dict, step_seconds: float, poll_seconds: float):
        super().__init__(daemon=True)
        self.cp, self.ns, self.name, self.step_seconds = cp, ns, name, step_seconds
        self.poll_seconds = poll_seconds
        self.spec = parse_config(spec)
        self.stop = threading.Event()
        self.latencies: list[float] = []  # oldest statistics in the decision -> applied (the loop latency)
        self.fresh: list[float] = []  # newest report the decision read -> applied
        self.errors = 0
        self.steps = 0

    def _token(self) -> str:
        path = f"/api/v1/namespaces/{self.ns}/serviceaccounts/{self.name}-trainer/token"
        for _ in range(600):
            status, body = self.cp.request_raw("POST", path, {"apiVersion": "authentication.k8s.io/v1",
                                                              "kind": "TokenRequest", "spec": {}},
                                               token=self.cp.admin_token)
            if status == 201:
                return body["status"]["token"]
            time.sleep(0.2)
        raise RuntimeError(f"no ServiceAccount for {self.name}")

    def run(self) -> None:
        from gprl.algo.drift import Control

        ch = KubeControlChannel(self.spec, Control([1.0] * 3, 0.04, 0.2, 0.2), api=self.cp.server, name=self.name,
                                namespace=self.ns, token=self._token(), ca_file=self.cp.ca_file, log=lambda _: None,
                                poll_seconds=self.poll_seconds)
        control, step = ch.control, 0
        while not self.stop.is_set():
            new = ch.poll()
            if new is not None:
                control = new
                ack = (ch.last_applied or {}).get("controlAck") or {}
                if ack.get("reportedAt") and ack.get("statisticsAt"):
                    applied = parse_rfc3339(ack["appliedAt"])
                    self.latencies.append(applied - parse_rfc3339(ack["statisticsAt"]))
                    self.fresh.append(applied - parse_rfc3339(ack["reportedAt"]))
            step += 1
            w0 = control.weights[0]
            var = [1.0 + 0.03 * step * w0 * (1.0 + 0.1 * (step % 3)), 1.0, 1.0 + 0.05 * (step % 2)]
            time.sleep(self.step_seconds)
            ch.report({"step": step, "policy_version": step, "axis_variance": var, "kl": 0.01, "weights":
                       control.weights, "kl_coef": control.kl_coef, "eps_low": control.eps_low,
                       "eps_high": control.eps_high, "tokens_per_second": 1000.0})
            self.steps = step
        self.errors = ch.failures


def cpu_seconds(pid: int) -> float:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def start_operator(cp, tmp: Path, tag: str, env: dict) -> OperatorProcess:
    kc = cp.service_account_kubeconfig(OPERATOR_NS, OPERATOR_SA, create=False, expiration_seconds=7200)
    return OperatorProcess(kc, tmp, name=f"operator-{tag}", standalone=True, extra_env=env).start()


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))] if xs else float("nan")


def latency_phase(cp, tmp: Path, interval: float, args) -> dict:
    ns = f"lat-{str(interval).replace('.', '-')}"
    cp.ensure_namespace(ns)
    op = start_operator(cp, tmp, ns, {"GPRL_DRIFT_INTERVAL": str(interval)})
    try:
        jobs = []
        for i in range(args.latency_runs):
            name = f"r{i}"
            assert create_run(cp, ns, name, spec_for(args.report_interval))[0] == 201
            jobs.append(SimJob(cp, ns, name, spec_for(args.report_interval), args.step_seconds, args.poll_seconds))
        for j in jobs:
            j.start()
        time.sleep(args.latency_seconds)
        for j in jobs:
            j.stop.set()
        for j in jobs:
            j.join(30)
    finally:
        op.stop()
    lat = [x for j in jobs for x in j.latencies]
    fresh = [x for j in jobs for x in j.fresh]
    return {"interval_s": interval, "samples": len(lat), "median_s": round(statistics.median(lat), 3) if lat else None,
            "p95_s": round(pct(lat, 0.95), 3), "max_s": round(max(lat), 3) if lat else None,
            "report_to_applied_median_s": round(statistics.median(fresh), 3) if fresh else None,
            "report_to_applied_p95_s": round(pct(fresh, 0.95), 3), "steps": sum(j.steps for j in jobs)}


def cost_phase(cp, tmp: Path, args, drift_loop: bool) -> dict:
    ns = "cost-on" if drift_loop else "cost-off"
    cp.ensure_namespace(ns)
    env = {"GPRL_DRIFT_INTERVAL": str(args.cost_interval)}
    if not drift_loop:
        env["GPRL_OPERATOR_DRIFT_LOOP"] = "0"
    op = start_operator(cp, tmp, ns, env)
    jobs = []
    try:
        for i in range(args.runs):
            name = f"c{i:03d}"
            spec = spec_for(args.cost_report_interval, "operator")
            assert create_run(cp, ns, name, spec)[0] == 201
            jobs.append(SimJob(cp, ns, name, spec, args.cost_step_seconds, args.cost_poll_seconds))
        for j in jobs:
            j.start()
        time.sleep(args.warmup)
        c0, t0 = cpu_seconds(op.proc.pid), time.monotonic()
        r0 = {c: op.metric("gprl_operator_api_requests_total", client=c) for c in ("operator", "kopf")}
        rss = []
        while time.monotonic() - t0 < args.cost_seconds:
            rss.append(op.rss_mb())
            time.sleep(1)
        dt = time.monotonic() - t0
        c1 = cpu_seconds(op.proc.pid)
        r1 = {c: op.metric("gprl_operator_api_requests_total", client=c) for c in ("operator", "kopf")}
        ticks = op.metric("gprl_operator_drift_tick_duration_seconds_count")
        peak = op.peak_rss_mb()
    finally:
        for j in jobs:
            j.stop.set()
        for j in jobs:
            j.join(30)
        op.stop()
    n = args.runs
    per_min = {c: (r1[c] - r0[c]) / dt * 60 for c in r0}
    return {
        "drift_loop": drift_loop, "runs": n, "window_s": round(dt, 1),
        "cpu_cores": round((c1 - c0) / dt, 4), "cpu_ms_per_run_per_s": round((c1 - c0) / dt / n * 1000, 3),
        "rss_mb_mean": round(statistics.mean(rss), 1), "rss_mb_peak": round(peak, 1),
        "api_per_min": {c: round(v, 1) for c, v in per_min.items()},
        "api_per_min_per_run": {c: round(v / n, 2) for c, v in per_min.items()},
        "ticks_total": ticks, "job_steps": sum(j.steps for j in jobs), "job_failures": sum(j.errors for j in jobs),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--intervals", type=float, nargs="*", default=[0.5, 1, 2, 5])
    ap.add_argument("--latency-runs", type=int, default=3)
    ap.add_argument("--latency-seconds", type=float, default=40)
    ap.add_argument("--report-interval", type=float, default=1.0, help="drift.reportIntervalSeconds (phase A)")
    ap.add_argument("--poll-seconds", type=float, default=1.0, help="GPRL_CONTROL_POLL_SECONDS of the jobs (phase A)")
    ap.add_argument("--step-seconds", type=float, default=0.25, help="fake step time (phase A)")
    ap.add_argument("--runs", type=int, default=50, help="runs monitored at once (phase B)")
    ap.add_argument("--cost-interval", type=float, default=5.0, help="GPRL_DRIFT_INTERVAL (phase B; the default)")
    ap.add_argument("--cost-report-interval", type=float, default=5.0, help="phase B (the default)")
    ap.add_argument("--cost-poll-seconds", type=float, default=5.0, help="phase B")
    ap.add_argument("--cost-step-seconds", type=float, default=2.0, help="phase B")
    ap.add_argument("--warmup", type=float, default=20)
    ap.add_argument("--cost-seconds", type=float, default=60)
    ap.add_argument("--skip-latency", action="store_true")
    ap.add_argument("--skip-cost", action="store_true")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    out = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
           "args": vars(args)}
    with tempfile.TemporaryDirectory(prefix="gprl-drift-bench-") as tmp, ControlPlane() as cp:
        helm = find_tool(cp, "helm")
        if not helm:
            raise SystemExit("helm not found (scripts/install-k8s-tools.sh)")
        install_chart(cp, helm)
        if not args.skip_latency:
            out["latency"] = []
            for interval in args.intervals:
                res = latency_phase(cp, Path(tmp), interval, args)
                print(json.dumps(res), flush=True)
                out["latency"].append(res)
        if not args.skip_cost:
            out["cost"] = []
            for on in (True, False):
                res = cost_phase(cp, Path(tmp), args, on)
                print(json.dumps(res), flush=True)
                out["cost"].append(res)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
