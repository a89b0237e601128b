"""The job side of the drift loop (gprl.control.kube) against a small fake of the GPRLRun status endpoint:
rate-limited reports carrying every step, validation and acknowledgement of control blocks, the API server going
away and coming back. The same channel against the real API server: tests/cluster/test_drift_loop_e2e.py."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from gprl.algo.drift import Control
from gprl.config import parse_config
from gprl.control import open_channel
from gprl.control.kube import KubeControlChannel

PATH = "/apis/gprl.dev/v1alpha1/namespaces/ns/gprlruns/run"


def merge(dst: dict, patch: dict) -> None:
    for k, v in patch.items():
        if v is None:
            dst.pop(k, None)
        elif isinstance(v, dict) and isinstance(dst.get(k), dict):
            merge(dst[k], v)
        else:
            dst[k] = v


class FakeApi:
    def __init__(self):
        self.obj = {"status": {}}
        self.patches: list[dict] = []
        self.down = False
        api = self

        class H(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def _send(self, code, body):
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                if api.down:
                    return self._send(503, {"message": "down"})
                assert self.headers["Authorization"] == "Bearer tok"
                self._send(200 if self.path == PATH else 404, api.obj)

            def do_PATCH(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if api.down:
                    return self._send(503, {"message": "down"})
                assert self.path == PATH + "/status"
                assert self.headers["Content-Type"] == "application/merge-patch+json"
                api.patches.append(body)
                merge(api.obj, body)
                self._send(200, api.obj)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), H)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def close(self):
        self.server.shutdown()


@pytest.fixture
def api():
    a = FakeApi()
    yield a
    a.close()


class Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


def channel(api, clock, steps=10, interval=10.0, logs=None):
    spec = parse_config({"gpm": {"axes": 3}, "algo": {"steps": steps},
                         "drift": {"mode": "operator", "reportIntervalSeconds": interval}})
    return KubeControlChannel(spec, Control([1.0] * 3, 0.04, 0.2, 0.2), api=api.url, name="run", namespace="ns",
                              token="tok", log=(logs.append if logs is not None else lambda _: None),
                              poll_seconds=0.0, clock=clock)


def rec(step):
    return {"step": step, "policy_version": step, "axis_variance": [1.0, 2.0, float(step)], "kl": 0.1,
            "weights": [1.0, 1.0, 1.0], "eigenvalues": [1.0, 1.0, 1.0], "tokens_per_second": 5.0}


def test_open_channel_needs_the_pod_environment(monkeypatch):
    spec = parse_config({"drift": {"mode": "operator"}})
    for k in ("GPRL_RUN_NAME", "GPRL_KUBE_API", "KUBERNETES_SERVICE_HOST"):
        monkeypatch.delenv(k, raising=False)
    with pytest.raises(ValueError, match="in_process"):
        open_channel(spec, Control([1.0], 0.04, 0.2, 0.2))
    monkeypatch.setenv("GPRL_RUN_NAME", "run")
    monkeypatch.setenv("GPRL_RUN_NAMESPACE", "ns")
    monkeypatch.setenv("GPRL_KUBE_API", "https://127.0.0.1:1")
    monkeypatch.setenv("GPRL_KUBE_TOKEN", "tok")
    ch = open_channel(spec, Control([1.0], 0.04, 0.2, 0.2))
    assert isinstance(ch, KubeControlChannel) and ch.path.endswith("/namespaces/ns/gprlruns/run")


def test_reports_are_rate_limited_but_carry_every_step(api):
    clock = Clock()
    ch = channel(api, clock, steps=5)
    ch.report(rec(1))  # first report goes at once
    for s in (2, 3, 4):
        clock.t += 1
        ch.report(rec(s))
    assert len(api.patches) == 1
    clock.t += 1
    ch.report(rec(5))  # the last step is always sent
    assert len(api.patches) == 2
    tr = api.obj["status"]["training"]
    assert api.obj["status"]["step"] == 5 and tr["step"] == 5 and tr["axisVariance"] == [1.0, 2.0, 5.0]
    assert [h["step"] for h in tr["history"]] == [1, 2, 3, 4, 5]  # nothing fed by the operator yet
    assert tr["kl"] == 0.1 and tr["tokensPerSecond"] == 5.0 and "reportedAt" in tr
    # the operator says it fed steps 1..4: the next report carries only what it has not seen
    api.obj["status"]["driftMonitor"] = {"lastStep": 4}
    ch.poll()
    ch.spec.algo.steps = 6
    clock.t += 20
    ch.report(rec(6))
    assert [h["step"] for h in api.obj["status"]["training"]["history"]] == [5, 6]


def test_new_generation_is_validated_applied_once_and_acknowledged(api):
    logs: list[str] = []
    ch = channel(api, Clock(), logs=logs)
    assert ch.poll() is None  # no control block yet
    api.obj["status"]["control"] = {"generation": 3, "weights": [0.5, 1.25, 1.25], "klCoef": 0.06, "epsLow": 0.15,
                                    "epsHigh": 0.15, "reportedAt": "2026-01-01T00:00:00Z"}
    c = ch.poll()
    assert c == Control([0.5, 1.25, 1.25], 0.06, 0.15, 0.15)
    assert "acknowledgedGeneration" not in api.obj["status"]["control"]  # status.control is the operator's
    assert api.obj["status"]["training"]["appliedControlGeneration"] == 3
    ack = api.obj["status"]["training"]["controlAck"]
    assert ack["generation"] == 3 and ack["reportedAt"] == "2026-01-01T00:00:00Z" and "appliedAt" in ack
    assert ch.poll() is None  # same generation: nothing new
    api.obj["status"]["control"].update({"generation": 4, "weights": [1.0, 1.0]})
    assert ch.poll() is None
    assert "REFUSED generation 4" in logs[-1] and "2 entries" in logs[-1]
    assert api.obj["status"]["training"]["refusedControl"]["generation"] == 4
    assert api.obj["status"]["training"]["appliedControlGeneration"] == 3
    assert ch.control.weights == [0.5, 1.25, 1.25]  # the last good control stays


def test_api_down_keeps_the_last_control_and_catches_up(api):
    logs: list[str] = []
    clock = Clock()
    ch = channel(api, clock, steps=50, interval=0.5, logs=logs)
    api.obj["status"]["control"] = {"generation": 1, "weights": [1.0, 1.0, 1.0], "klCoef": 0.04, "epsLow": 0.2,
                                    "epsHigh": 0.2}
    assert ch.poll() is not None
    ch.report(rec(1))
    api.down = True
    for s in range(2, 7):
        clock.t += 1
        assert ch.poll() is None
        ch.report(rec(s))
    assert sum("keeping control generation 1" in ln for ln in logs) == 1  # once per outage
    api.down = False
    clock.t += 1
    api.obj["status"]["control"] = {"generation": 2, "weights": [0.5, 1.25, 1.25], "klCoef": 0.08, "epsLow": 0.1,
                                    "epsHigh": 0.1}
    assert ch.poll().weights == [0.5, 1.25, 1.25]
    assert any("reachable again" in ln for ln in logs)
    ch.report(rec(7))
    tr = api.obj["status"]["training"]
    assert [h["step"] for h in tr["history"]] == [1, 2, 3, 4, 5, 6, 7]
    assert api.obj["status"]["training"]["appliedControlGeneration"] == 2
