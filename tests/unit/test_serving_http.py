"""Both servers' HTTP stack on loopback, as a security reviewer and a load tester would try it: every route but the
probes refuses a missing or wrong token; oversize, malformed, negative-length and slow-loris requests get 4xx or are
cut off, and the server stays healthy with bounded memory; /metrics serves the documented names."""

import http.client
import json
import re
import socket
import threading
import time
from pathlib import Path

import pytest
import torch

TOKEN = "t" * 20 + "-secret-token"
ROOT = Path(__file__).resolve().parents[2]


class TinyEngine:
    version, model = 0, "tiny"

    def __init__(self, manifest):
        self.manifest = manifest

    def weight_manifest(self):
        return self.manifest

    def generate_ids(self, prompt_ids, n, **kw):
        return self.version, [[([1, 2], [-0.1, -0.2]) for _ in range(n)] for _ in prompt_ids]

    def load_weights(self, weights, version):
        list(weights)
        self.version = version


@pytest.fixture(scope="module")
def gpm(toy_backbone_config):
    from gprl.gpm import GeneralPreferenceModel, GPMConfig

    torch.manual_seed(0)
    return GeneralPreferenceModel.from_backbone_config(toy_backbone_config, GPMConfig(axes=3)).eval()


def _start(srv):
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv


@pytest.fixture(scope="module")
def servers(gpm, toy_tokenizer):
    """A rollout server (tiny engine) and a GPM server, both with a token and a 1 s request timeout."""
    from gprl.serving import gpm_server, rollout_server
    from gprl.serving.app import Limits
    from gprl.serving.weights import TensorSpec

    limits = Limits(max_body_bytes=64 * 1024, request_timeout_s=1.0, keep_alive_s=1.0)
    manifest = {"w": TensorSpec((4, 4), torch.float32)}
    roll = _start(rollout_server.build_server(TinyEngine(manifest), token=TOKEN, limits=limits, max_model_len=64,
                                              caps=rollout_server.GenerateLimits(max_n=8, max_tokens=16)))
    score = _start(gpm_server.build_server(gpm, toy_tokenizer, token=TOKEN, limits=limits, max_batch=8,
                                           window_s=0.02))
    yield {"rollout": roll, "gpm": score}
    for s in (roll, score):
        s.shutdown()
        s.server_close()


def call(srv, method, path, body=None, token=TOKEN, headers=None):
    conn = http.client.HTTPConnection("127.0.0.1", srv.server_address[1], timeout=10)
    h = dict(headers or {})
    if token is not None:
        h["Authorization"] = f"Bearer {token}"
    if isinstance(body, dict):
        body = json.dumps(body).encode()
        h.setdefault("Content-Type", "application/json")
    conn.request(method, path, body=body, headers=h)
    resp = conn.getresponse()
    data = resp.read()
    conn.close()
    try:
        return resp.status, json.loads(data)
    except ValueError:
        return resp.status, data


PROTECTED = {
    "rollout": [("GET", "/info", None), ("POST", "/generate", {"prompt_ids": [[4]], "max_tokens": 8}),
                ("POST", "/weights/begin?version=1", b""), ("POST", "/weights/bucket?session=x", b"x"),
                ("POST", "/weights/commit?session=x", b""), ("POST", "/weights/abort?session=x", b"")],
    "gpm": [("GET", "/info", None), ("POST", "/score", {"prompts": ["rock"], "responses": ["x"]})],
}


@pytest.mark.parametrize("kind", ["rollout", "gpm"])
def test_every_route_refuses_a_missing_or_wrong_token(servers, kind):
    srv = servers[kind]
    for method, path, body in PROTECTED[kind]:
        for token in (None, "wrong-token-of-some-length", TOKEN[:-1], TOKEN + "x", ""):
            status, out = call(srv, method, path, body, token=token)
            assert status == 401, (kind, path, token, status, out)
        assert call(srv, method, path, body)[0] != 401
    for probe in ("/healthz", "/readyz", "/metrics"):
        assert call(srv, "GET", probe, token=None)[0] == 200
    # a server that is not on loopback refuses to start without a token
    from gprl.serving.auth import TokenError, server_token

    with pytest.raises(TokenError, match="refusing to serve on 0.0.0.0 without a token"):
        server_token(None, "0.0.0.0")


def test_requests_are_validated_naming_the_field(servers):
    roll, gpm = servers["rollout"], servers["gpm"]
    cases = [
        (roll, "/generate", {"prompt_ids": [[4]], "n": 100000}, "body.n"),
        (roll, "/generate", {"prompt_ids": [[4]], "max_tokens": 10**6}, "body.max_tokens"),
        (roll, "/generate", {"prompt_ids": [[4]], "max_tokens": -1}, "body.max_tokens"),
        (roll, "/generate", {"prompt_ids": [[-4]]}, "body.prompt_ids.0.0"),
        (roll, "/generate", {"prompt_ids": [[4]], "n": "2"}, "body.n"),
        (roll, "/generate", {"prompt_ids": [[4]], "temperature": True}, "body.temperature"),
        (roll, "/generate", {"prompt_ids": [[4]], "surprise": 1}, "body.surprise"),
        (roll, "/generate", {"prompt_ids": [[4] * 60], "max_tokens": 10}, "body.prompt_ids.0"),
        (roll, "/weights/begin?version=-3", b"", "query.version"),
        (gpm, "/score", {"prompts": ["a", 3], "responses": ["x", "y"]}, "body.prompts.1"),
        (gpm, "/score", {"prompts": ["a"], "responses": ["x", "y"]}, "body.responses"),
        (gpm, "/score", {"prompts": ["a"] * 9, "responses": ["x"] * 9}, "body.prompts"),  # over max_pairs (8)
        (gpm, "/score", {"prompts": "a", "responses": "x"}, "body.prompts"),
    ]
    for srv, path, body, field in cases:
        status, out = call(srv, "POST", path, body)
        assert status == 422 and out["error"].startswith(field), (path, body, status, out)
    status, out = call(roll, "POST", "/generate", b"{not json", headers={"Content-Type": "application/json"})
    assert status == 422, out


def _raw(srv, data: bytes, read_timeout=5.0) -> bytes:
    """Send raw bytes, return the answer: one whole response, or what came before the server closed (or
    read_timeout)."""
    s = socket.create_connection(("127.0.0.1", srv.server_address[1]), timeout=read_timeout)
    out = b""
    try:
        s.sendall(data)
        while True:
            chunk = s.recv(65536)
            if not chunk:
                return out
            out += chunk
            head, sep, body = out.partition(b"\r\n\r\n")
            length = re.search(rb"(?i)content-length: *(\d+)", head)
            if sep and length and len(body) >= int(length.group(1)):
                return out
    except socket.timeout:
        return out + b"<timeout>"
    except (ConnectionResetError, BrokenPipeError):  # the server closed on us mid-send: what it said, if anything
        return out
    finally:
        s.close()


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def test_oversize_negative_length_slowloris_and_memory(servers):
    roll, gpm = servers["rollout"], servers["gpm"]
    auth = f"Authorization: Bearer {TOKEN}\r\n".encode()
    # a body over the limit: refused from its Content-Length, before it is read
    head = b"POST /score HTTP/1.1\r\nHost: x\r\n" + auth + b"Content-Type: application/json\r\nContent-Length: 999999999\r\n\r\n"
    assert _raw(gpm, head).startswith(b"HTTP/1.1 413")
    # the same, chunked (no Content-Length): refused once it passes the limit
    chunk = b"x" * 70000
    chunked = (b"POST /score HTTP/1.1\r\nHost: x\r\n" + auth + b"Transfer-Encoding: chunked\r\n\r\n"
               + f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n0\r\n\r\n")
    assert _raw(gpm, chunked).startswith(b"HTTP/1.1 413")
    # negative and non-numeric lengths: 400 from the HTTP parser
    for bad in (b"-5", b"abc"):
        out = _raw(roll, b"POST /generate HTTP/1.1\r\nHost: x\r\n" + auth + b"Content-Length: " + bad + b"\r\n\r\n{}")
        assert out.startswith(b"HTTP/1.1 400"), out[:80]
    # headers over the cap: 4xx (431/400) or cut off
    out = _raw(roll, b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 200_000 + b"\r\n\r\n")
    assert out == b"" or out[9:10] == b"4", out[:80]
    # slow-loris: a request trickled byte by byte is cut off at the request timeout (1 s here), not held forever
    s = socket.create_connection(("127.0.0.1", roll.server_address[1]), timeout=5)
    t0, closed = time.monotonic(), False
    try:
        for b in b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 100:
            s.sendall(bytes([b]))
            time.sleep(0.1)
    except (BrokenPipeError, ConnectionResetError):
        closed = True
    if not closed:
        closed = s.recv(1) == b""
    s.close()
    assert closed and time.monotonic() - t0 < 4
    # a body that never finishes: cut off too
    out = _raw(gpm, b"POST /score HTTP/1.1\r\nHost: x\r\n" + auth + b"Content-Length: 100\r\n\r\n{", read_timeout=5)
    assert not out.endswith(b"<timeout>")

    # 1,000 bad requests of these kinds: the servers stay healthy and memory stays bounded
    bad = [head, b"POST /generate HTTP/1.1\r\nHost: x\r\n" + auth + b"Content-Length: -1\r\n\r\n",
           b"POST /generate HTTP/1.1\r\nHost: x\r\n" + auth + b"Content-Type: application/json\r\nContent-Length: 5"
           b"\r\n\r\n{oops",
           b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}",
           b"POST /generate HTTP/1.1\r\nHost: x\r\n" + auth + b"Content-Type: application/json\r\nContent-Length: 8"
           b"\r\n\r\n{\"n\":-1}"]
    for i in range(100):  # warm-up: allocator arenas, thread pools
        _raw(roll if i % 2 else gpm, bad[i % len(bad)])
    before = _rss_mb()
    for i in range(1000):
        assert _raw(roll if i % 2 else gpm, bad[i % len(bad)])[9:10] == b"4"
    after = _rss_mb()
    assert after - before < 30, (before, after)
    for srv in (roll, gpm):
        assert call(srv, "GET", "/healthz", token=None)[0] == 200
    assert call(roll, "POST", "/generate", {"prompt_ids": [[4]], "n": 2, "max_tokens": 8})[0] == 200


def test_a_backlog_of_parallel_connections_is_served(servers):
    """50 connections at once: none reset (the standard library server's backlog of 5 dropped some)."""
    roll = servers["rollout"]
    results = []

    def one():
        try:
            results.append(call(roll, "POST", "/generate", {"prompt_ids": [[4]], "n": 1, "max_tokens": 8})[0])
        except OSError as exc:
            results.append(repr(exc))

    threads = [threading.Thread(target=one) for _ in range(50)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [200] * 50


def test_metrics_serve_the_documented_names(servers):
    from gprl.serving.metrics import GPMMetrics, RolloutMetrics

    doc = (ROOT / "docs" / "operations.md").read_text()
    families = {m.name for reg in (RolloutMetrics().registry, GPMMetrics().registry) for m in reg.collect()}
    missing = sorted(n for n in families if f"`{n}" not in doc)
    assert not missing, f"docs/operations.md lacks: {missing}"
    call(servers["gpm"], "POST", "/score", {"prompts": ["rock"], "responses": ["x"]})
    call(servers["rollout"], "POST", "/generate", {"prompt_ids": [[4]], "max_tokens": 8})
    for kind, names in (("rollout", ["gprl_server_requests_total", "gprl_server_request_seconds_bucket",
                                     "gprl_rollout_weight_version", "gprl_rollout_generated_tokens_total"]),
                        ("gpm", ["gprl_server_requests_total", "gprl_gpm_batch_size_bucket",
                                 "gprl_gpm_scored_responses_total"])):
        status, text = call(servers[kind], "GET", "/metrics", token=None)
        assert status == 200
        text = text.decode()
        for name in names:
            assert re.search(rf"^{name}[{{ ]", text, re.M), (kind, name)
    assert 'code="200",route="/generate"' in call(servers["rollout"], "GET", "/metrics", token=None)[1].decode()
