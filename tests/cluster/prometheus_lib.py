"""A real Prometheus server (Debian's `prometheus`, the package that ships our promtool) on loopback for the e2e tests:
the chart's alert rules loaded, scrape targets given as they appear (file service discovery), the alerts read back
through its HTTP API while a run goes on.

Targets mirror what the chart's monitors produce on a cluster: the trainer with the pod's `namespace`/`pod` target
labels (the PodMonitor), the operator with `honor_labels: true` and its own namespace as target label (the
ServiceMonitor), so an alert built from the operator's per-run series must carry the run's namespace, not the
operator's.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import threading
import time
import urllib.request
from pathlib import Path
from typing import Optional

import yaml

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "charts" / "gprl" / "rules" / "gprl-alerts.yaml"


def find_prometheus() -> Optional[str]:
    return shutil.which("prometheus") or (str(Path("/usr/bin/prometheus")) if Path("/usr/bin/prometheus").exists()
                                          else None)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rule_expr(alertname: str) -> str:
    """The shipped expression of one of the chart's alerts."""
    rules = yaml.safe_load(RULES.read_text())
    (expr,) = [r["expr"] for g in rules["groups"] for r in g["rules"] if r.get("alert") == alertname]
    return expr


def chart_rules(hold: str) -> dict:
    """The chart's rule file with every alert's `for:` set to ``hold`` (the expressions untouched): the chart's holds
    are 5-30 minutes, longer than a test run."""
    rules = yaml.safe_load(RULES.read_text())
    for group in rules["groups"]:
        group["interval"] = "1s"
        for rule in group["rules"]:
            if "alert" in rule:
                rule["for"] = hold
    return rules


class PrometheusServer:
    def __init__(self, workdir: Path, hold: str = "2s", interval: str = "1s"):
        self.workdir = Path(workdir)
        self.hold, self.interval = hold, interval
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.targets: list[dict] = []
        self.seen: list[dict] = []  # every alert the poller saw firing: {"alertname", "labels", "at"}
        self.proc: Optional[subprocess.Popen] = None
        self._stop = threading.Event()
        self._poller: Optional[threading.Thread] = None

    def start(self, operator_target: str, operator_namespace: str) -> "PrometheusServer":
        binary = find_prometheus()
        if not binary:
            raise FileNotFoundError("prometheus not found: apt-get install prometheus (Debian; ships promtool too)")
        self.workdir.mkdir(parents=True, exist_ok=True)
        (self.workdir / "rules.yaml").write_text(yaml.safe_dump(chart_rules(self.hold), sort_keys=False))
        self._write_targets()
        config = {
            "global": {"scrape_interval": self.interval, "evaluation_interval": self.interval},
            "rule_files": [str(self.workdir / "rules.yaml")],
            "scrape_configs": [
                {"job_name": "gprl-operator", "honor_labels": True,
                 "static_configs": [{"targets": [operator_target], "labels": {"namespace": operator_namespace}}]},
                {"job_name": "gprl-runs", "file_sd_configs": [{"files": [str(self.workdir / "runs.json")],
                                                                "refresh_interval": "1s"}]},
            ],
        }
        (self.workdir / "prometheus.yml").write_text(yaml.safe_dump(config, sort_keys=False))
        self._log = open(self.workdir / "prometheus.log", "ab")
        self.proc = subprocess.Popen(
            [binary, f"--config.file={self.workdir / 'prometheus.yml'}",
             f"--storage.tsdb.path={self.workdir / 'data'}", f"--web.listen-address=127.0.0.1:{self.port}",
             "--storage.tsdb.retention.time=1h"],
            stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 60
        while not self._ready():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"prometheus did not start:\n{self.log_tail()}")
            time.sleep(0.3)
        self._poller = threading.Thread(target=self._poll, daemon=True, name="prometheus-alerts")
        self._poller.start()
        return self

    def add_run_target(self, address: str, namespace: str, pod: str) -> None:
        """A trainer pod's metrics endpoint, labelled as the PodMonitor labels it."""
        self.targets.append({"targets": [address], "labels": {"namespace": namespace, "pod": pod}})
        self._write_targets()

    def _write_targets(self) -> None:
        tmp = self.workdir / "runs.json.tmp"
        tmp.write_text(json.dumps(self.targets))
        tmp.replace(self.workdir / "runs.json")  # atomic: file SD never reads half a file

    def _ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def api(self, path: str, **params: str) -> dict:
        from urllib.parse import urlencode

        q = f"?{urlencode(params)}" if params else ""
        with urllib.request.urlopen(f"{self.url}/api/v1/{path}{q}", timeout=10) as r:
            body = json.loads(r.read())
        assert body["status"] == "success", body
        return body["data"]

    def _poll(self) -> None:
        while not self._stop.is_set():
            try:
                for a in self.api("alerts")["alerts"]:
                    if a["state"] == "firing":
                        self.seen.append({"alertname": a["labels"]["alertname"], "labels": a["labels"],
                                          "at": time.time()})
            except (OSError, AssertionError, ValueError):
                pass
            self._stop.wait(1.0)

    def fired(self, alertname: str) -> list[dict]:
        return [s["labels"] for s in self.seen if s["alertname"] == alertname]

    def alerts(self, alertname: str, **labels: str) -> list[dict]:
        """The alert's instances Prometheus holds now (pending or firing) whose labels include ``labels``."""
        return [a for a in self.api("alerts")["alerts"] if a["labels"].get("alertname") == alertname
                and all(a["labels"].get(k) == v for k, v in labels.items())]

    def query(self, expr: str, **labels: str) -> list[dict]:
        """An instant query; the result's series whose labels include ``labels``."""
        return [r for r in self.api("query", query=expr)["result"]
                if all(r["metric"].get(k) == v for k, v in labels.items())]

    def samples(self, metric: str, window: str = "15m", **labels: str) -> dict[str, list[tuple[float, float]]]:
        """Every stored sample of ``metric``'s series with ``labels`` over ``window``, as (time, value) where the
        value changed (for failure messages: what Prometheus actually scraped)."""
        sel = ",".join(f'{k}="{v}"' for k, v in labels.items())
        out = {}
        for r in self.api("query", query=f"{metric}{{{sel}}}[{window}]")["result"]:
            changes: list[tuple[float, float]] = []
            for t, v in r["values"]:
                if not changes or changes[-1][1] != float(v):
                    changes.append((round(float(t), 1), float(v)))
            out[json.dumps({k: v for k, v in r["metric"].items() if k not in labels}, sort_keys=True)] = changes
        return out

    def up(self) -> dict[str, float]:
        """job -> value of `up` (1 = the last scrape worked)."""
        return {r["metric"]["job"]: float(r["value"][1]) for r in self.api("query", query="up")["result"]}

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join((self.workdir / "prometheus.log").read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def stop(self) -> None:
        self._stop.set()
        if self._poller:
            self._poller.join(5)
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if getattr(self, "_log", None):
            self._log.close()
