"""Operator scale benchmark: apply N GPRLRuns at once to a local control plane and measure

- time until every run has all its children and a reconciled status (observedGeneration, Ready=True);
- the operator's peak RSS (VmHWM of its process);
- API requests per run: counted in the operator (its own calls and kopf's, client side) and on the API server
  (`apiserver_request_total`, every client: includes the benchmark's own creates, its list + watch of the runs and
  the controller-manager).

The control plane is the tests' one (gprl.devcluster.ControlPlane: etcd + kube-apiserver + kube-controller-manager);
the operator runs as a process under the token of the Helm chart's ServiceAccount, exactly as in tests/cluster.

    python benchmarks/operator_scale.py --runs 100,200,500,1000 [--json out.json]

Each point of the curve gets a fresh control plane and a fresh operator. Goal (issue 10): all 1,000 runs reconciled
in under 120 s, operator API requests per run roughly flat across the curve and at most 20, operator peak RSS under
300 MB, every child present exactly once.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "operator"), str(ROOT / "tests" / "cluster")]

from gprl.devcluster import ControlPlane  # noqa: E402
from gprl_k8s_testlib import (  # noqa: E402
    OPERATOR_NS,
    OPERATOR_SA,
    RUNS,
    OperatorProcess,
    condition,
    create_run,
    find_tool,
    install_chart,
)


def apiserver_requests(cp) -> dict[str, float]:
    """Sum of apiserver_request_total by verb."""
    text = cp.request_raw("GET", "/metrics", token=cp.admin_token)[1]
    out: dict[str, float] = {}
    for line in text.splitlines() if isinstance(text, str) else []:
        if not line.startswith("apiserver_request_total{"):
            continue
        head, _, value = line.rpartition(" ")
        verb = head.split('verb="', 1)[1].split('"', 1)[0]
        out[verb] = out.get(verb, 0.0) + float(value)
    return out


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (its threads included)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def box_cpu_seconds() -> float:
    """Busy CPU seconds of the whole machine (every process, this benchmark's and everyone else's)."""
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in
                                                                Path("/proc/stat").read_text().split()[1:9])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def cpu_by_process(cp, op) -> dict[str, float]:
    """CPU seconds so far of each control-plane process, the operator, this benchmark and the machine."""
    out = {name: cpu_seconds(pid) for name, pid in cp.pids().items()}
    out["operator"] = cpu_seconds(op.proc.pid)
    out["benchmark"] = cpu_seconds(os.getpid())
    out["machine"] = box_cpu_seconds()
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", default="200", help="comma-separated numbers of runs: one point of the curve each")
    ap.add_argument("--namespace", default="bench")
    ap.add_argument("--timeout", type=float, default=300)
    ap.add_argument("--json", default=None, help="write the results here too")
    ap.add_argument("--create-threads", type=int, default=16)
    ap.add_argument("--operator-log", default=None, help="copy the operator's log here (one file per point)")
    ap.add_argument("--no-drift-loop", action="store_true",
                    help="run the operator with GPRL_OPERATOR_DRIFT_LOOP=0 (reconcile handlers only)")
    args = ap.parse_args(argv)
    points = [int(x) for x in str(args.runs).split(",") if x.strip()]
    results = []
    for n in points:
        res = measure(n, args)
        results.append(res)
        print(json.dumps(res, indent=2), flush=True)
    print("\n| runs | all reconciled (s) | p50 (s) | operator requests/run | kopf part | peak RSS (MB) | children once |")
    print("|---:|---:|---:|---:|---:|---:|:---:|")
    for r in results:
        print(f"| {r['runs']} | {r['all_reconciled_s']} | {r['p50_reconciled_s']} | {r['operator_requests_per_run']} "
              f"| {r['operator_requests_per_run_kopf']} | {r['operator_rss_peak_mb']} | "
              f"{'yes' if r['children_exactly_once'] else 'NO'} |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    big = results[-1]
    ok = all(r["children_exactly_once"] and r["operator_requests_per_run"] <= 20
             and r["operator_rss_peak_mb"] < 300 for r in results) and big["all_reconciled_s"] < 120
    print(f"goal (all {big['runs']} reconciled < 120 s, <= 20 operator requests/run, < 300 MB, every child once): "
          f"{'met' if ok else 'NOT met'}")
    return 0


def measure(n: int, args) -> dict:

    with tempfile.TemporaryDirectory(prefix="gprl-bench-") as tmp, \
            ControlPlane(controller_manager=True, scheduler=False) as cp:
        helm = find_tool(cp, "helm")
        if not helm:
            raise SystemExit("helm not found (scripts/install-k8s-tools.sh)")
        install_chart(cp, helm)
        cp.ensure_namespace(args.namespace)
        kc = cp.service_account_kubeconfig(OPERATOR_NS, OPERATOR_SA, create=False, expiration_seconds=7200)
        env = {"GPRL_OPERATOR_DRIFT_LOOP": "0"} if args.no_drift_loop else {}
        op = OperatorProcess(kc, Path(tmp), name="operator-bench", priority=1, extra_env=env).start()
        time.sleep(2)  # let the initial listings and peering settle
        rss_idle = op.rss_mb()
        api_before = apiserver_requests(cp)
        cpu_before = cpu_by_process(cp, op)
        ops_before = op.metric("gprl_operator_api_requests_total")
        kopf_before = op.metric("gprl_operator_api_requests_total", client="kopf")

        peak = {"rss": 0.0}
        stop = threading.Event()

        def sample():
            while not stop.is_set():
                try:
                    peak["rss"] = max(peak["rss"], op.rss_mb())
                except OSError:
                    pass
                time.sleep(0.2)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()

        names = [f"run-{i:04d}" for i in range(n)]
        spec = {"resources": {"learnerReplicas": 1, "gpus": 1}}
        t0 = time.monotonic()
        with ThreadPoolExecutor(args.create_threads) as pool:
            results = list(pool.map(lambda nm: create_run(cp, args.namespace, nm, spec), names))
        t_created = time.monotonic() - t0
        bad = [r for r in results if r[0] != 201]
        if bad:
            raise SystemExit(f"{len(bad)} creates failed, first: {bad[0]}")

        # Readiness from one watch of the runs (re-listed only if the stream ends): polling a list of n runs every
        # second made the benchmark itself one of the API server's heaviest clients at 1,000 runs
        ready_at: dict[str, float] = {}
        lists = 0

        def note(run: dict) -> None:
            nm = run["metadata"]["name"]
            st = run.get("status") or {}
            if nm not in ready_at and st.get("observedGeneration") == 1 and \
                    condition(run, "Ready").get("status") == "True":
                ready_at[nm] = time.monotonic() - t0

        while len(ready_at) < n and time.monotonic() - t0 < args.timeout:
            try:
                body = cp.request("GET", f"{RUNS}/namespaces/{args.namespace}/gprlruns")
            except OSError:  # no answer within the client's 30 s (a loaded machine): list again
                continue
            lists += 1
            for run in body["items"]:
                note(run)
            left = int(args.timeout - (time.monotonic() - t0)) + 1
            path = (f"{RUNS}/namespaces/{args.namespace}/gprlruns?watch=1&timeoutSeconds={left}"
                    f"&resourceVersion={body['metadata']['resourceVersion']}")
            try:
                for ev in cp.watch(path, timeout=left + 10):
                    if ev.get("type") == "ERROR":  # e.g. 410 Gone: list again
                        break
                    note(ev["object"])
                    if len(ready_at) == n:
                        break
            except (OSError, ValueError):
                continue
        t_status = max(ready_at.values()) if len(ready_at) == n else float("nan")
        cpu_after = cpu_by_process(cp, op)

        # every child present, exactly once
        want = {"configmaps": 1, "serviceaccounts": 1, "roles": 1, "rolebindings": 1,
                "persistentvolumeclaims": 1, "services": 2, "jobs": 1}
        from gprl_k8s_testlib import CHILD_KINDS

        totals = {}
        for plural, base in CHILD_KINDS.items():
            path = f"{base}/namespaces/{args.namespace}/{plural}?labelSelector=gprl.dev%2Frun"
            for attempt in range(3):  # a list of 1,000 objects may miss the client's 30 s on a loaded machine
                try:
                    totals[plural] = len(cp.request("GET", path)["items"])
                    break
                except OSError:
                    if attempt == 2:
                        raise
        children_ok = all(totals[k] == want[k] * n for k in want)
        t_children = time.monotonic() - t0

        time.sleep(3)  # let trailing Job events settle into the counters
        stop.set()
        sampler.join()
        api_after = apiserver_requests(cp)
        ops_after = op.metric("gprl_operator_api_requests_total")
        kopf_after = op.metric("gprl_operator_api_requests_total", client="kopf")
        hwm = op.peak_rss_mb()
        torch_loaded = "torch" in Path(f"/proc/{op.proc.pid}/maps").read_text()
        reconcile_p = sorted(ready_at.values())
        # the operator's refused requests by status code (429: API priority and fairness, 409: conflicts, ...)
        # and its status writes by trigger (reconcile, job, pod, repair, error, reassert): each is an update of the
        # run, one of the API server's costliest requests (BENCHMARKS.md)
        refused, status_writes = {}, {}
        for line in op.metrics_text().splitlines():
            if line.startswith("gprl_operator_api_requests_total{") and 'code="2' not in line:
                code = line.split('code="', 1)[1].split('"', 1)[0]
                refused[code] = refused.get(code, 0) + float(line.rpartition(" ")[2])
            if line.startswith("gprl_operator_status_writes_total{"):
                trigger = line.split('trigger="', 1)[1].split('"', 1)[0]
                status_writes[trigger] = round(float(line.rpartition(" ")[2]) / n, 2)
        op.stop()
        if args.operator_log:
            Path(f"{args.operator_log}.{n}").write_text(op.log.read_text(errors="replace"))

    api_delta = sum(api_after.values()) - sum(api_before.values())
    own = n + 2 * lists + len(totals)  # the benchmark's creates, its lists and watches, the final lists
    res = {
        "runs": n,
        "created_s": round(t_created, 2),
        "all_reconciled_s": round(t_status, 2),
        "p50_reconciled_s": round(reconcile_p[len(reconcile_p) // 2], 2) if reconcile_p else None,
        "p95_reconciled_s": round(reconcile_p[int(len(reconcile_p) * 0.95) - 1], 2) if reconcile_p else None,
        "children_exactly_once": children_ok,
        "children_checked_at_s": round(t_children, 2),
        "child_totals": totals,
        "operator_rss_idle_mb": round(rss_idle, 1),
        "operator_rss_peak_mb": round(max(hwm, peak["rss"]), 1),
        "operator_requests_per_run": round((ops_after - ops_before) / n, 2),
        "operator_requests_per_run_kopf": round((kopf_after - kopf_before) / n, 2),
        "operator_requests_refused_by_code": refused,
        "status_writes_per_run_by_trigger": status_writes,
        "apiserver_requests_per_run_all_clients": round(api_delta / n, 2),
        "apiserver_requests_per_run_excluding_benchmark": round((api_delta - own) / n, 2),
        "apiserver_requests_by_verb": {k: api_after.get(k, 0) - api_before.get(k, 0) for k in sorted(api_after)},
        # CPU seconds from the first create until every run was reconciled (or the timeout): the machine's total
        # includes other jobs sharing it; "others" is what none of the processes listed used
        "cpu_s": {**{k: round(cpu_after[k] - cpu_before[k], 1) for k in cpu_after},
                  "others": round(cpu_after["machine"] - cpu_before["machine"]
                                  - sum(cpu_after[k] - cpu_before[k] for k in cpu_after if k != "machine"), 1)},
        "load_average": os.getloadavg(),
        "drift_loop": not args.no_drift_loop,
        "torch_imported_by_operator": torch_loaded,
        "machine": f"{platform.machine()} {os.cpu_count()} CPUs, {platform.python_implementation()} "
                   f"{platform.python_version()}",
    }
    return res


if __name__ == "__main__":
    raise SystemExit(main())
