"""watchNamespaces mode, run (not only rendered): the chart installed with `watchNamespaces` grants the operator a
Role in each listed namespace and nothing namespaced elsewhere; the operator, under that ServiceAccount's token,
reconciles its first run within 10 s of starting, hits no 403, and leaves runs in other namespaces alone."""

from __future__ import annotations

import re
import subprocess
import time
import uuid

import pytest
import yaml

from gprl_k8s_testlib import (
    CHART,
    CLUSTER_SCOPED,
    OperatorProcess,
    apply_docs,
    condition,
    create_run,
    find_tool,
    get_run,
    wait_for,
)

pytestmark = pytest.mark.cluster

RELEASE, NS = "gprlns", "gprlns-system"
SA = "gprlns-operator"  # the chart's fullname for a release whose name contains "gprl"


def test_watch_namespaces_mode_reconciles_from_the_first_second(control_plane, tmp_path):
    cp = control_plane
    helm = find_tool(cp, "helm")
    if not helm:
        pytest.fail("helm not found (scripts/install-k8s-tools.sh)", pytrace=False)
    watched, other = f"w-{uuid.uuid4().hex[:6]}", f"o-{uuid.uuid4().hex[:6]}"
    for ns in (NS, watched, other):
        cp.ensure_namespace(ns)
    out = subprocess.run([helm, "template", RELEASE, str(CHART), "--namespace", NS, "--include-crds",
                          "--set", f"watchNamespaces={{{watched}}}", "--set", "peering.name=gprlns"],
                         check=True, capture_output=True, text=True, timeout=120).stdout
    docs = [d for d in yaml.safe_load_all(out) if d and d["kind"] != "Deployment"]
    for d in docs:
        if d["kind"] not in CLUSTER_SCOPED:
            d.setdefault("metadata", {}).setdefault("namespace", NS)
    apply_docs(cp, docs)
    token = cp.service_account_token(NS, SA, create=False)
    # the mode's promise: no namespaced rights outside the watched namespaces
    assert cp.request_raw("GET", f"/apis/batch/v1/namespaces/{other}/jobs", token=token)[0] == 403
    assert cp.request_raw("GET", f"/apis/batch/v1/namespaces/{watched}/jobs", token=token)[0] == 200

    assert create_run(cp, watched, "first", {})[0] == 201
    assert create_run(cp, other, "elsewhere", {})[0] == 201
    kc = cp.service_account_kubeconfig(NS, SA, create=False, expiration_seconds=3600)
    op = OperatorProcess(kc, tmp_path, name="operator-namespaced", priority=10, namespaces=[watched],
                         extra_env={"GPRL_OPERATOR_PEERING": "gprlns", "GPRL_OPERATOR_DRIFT_LOOP": "0"})
    t0 = time.monotonic()
    op.start()
    try:
        # reconciled = Ready and the spec generation recorded: a Job-status event can mark the run Ready (its children
        # exist) a moment before the reconcile's own status write records observedGeneration
        run = wait_for(lambda: (lambda r: r if condition(r, "Ready").get("status") == "True"
                                and (r.get("status") or {}).get("observedGeneration") else None)(
            get_run(cp, watched, "first")), 30, interval=0.1, what=f"first run reconciled\n{op.tail()}")
        took = time.monotonic() - t0
        print(f"watchNamespaces: first run Ready {took:.1f}s after the operator was started")
        assert took <= 10, f"first run reconciled only after {took:.1f}s\n{op.tail()}"
        assert run["status"]["observedGeneration"] == 1
        time.sleep(2)
        assert not (get_run(cp, other, "elsewhere") or {}).get("status"), "a run outside watchNamespaces was touched"
        log = op.log.read_text(errors="replace")
        assert not re.search(r"403|[Ff]orbidden|Not enough permissions", log), log[-3000:]
    finally:
        op.stop()
