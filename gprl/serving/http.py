"""The clients' side of HTTP: one request, retries with backoff, waiting for a server to be healthy (standard
library only; the servers' side is gprl/serving/app.py)."""

from __future__ import annotations

import json
import random
import time
import urllib.error
import urllib.request
from typing import Callable


class ServerUnavailable(RuntimeError):
    """A server could not be reached (or kept failing) for the whole retry budget."""


class ServerError(RuntimeError):
    """A server answered with an error that retrying will not fix (4xx)."""

    def __init__(self, status: int, message: str):
        self.status = status
        super().__init__(f"HTTP {status}: {message}")


def request(url: str, payload: bytes | dict | None = None, *, method: str | None = None, headers: dict | None = None,
            timeout: float = 60.0) -> tuple[int, dict, bytes]:
    """One HTTP request. Returns (status, headers, body); raises URLError / OSError when the server is not there."""
    data = None
    hdrs = dict(headers or {})
    if isinstance(payload, dict):
        data = json.dumps(payload).encode()
        hdrs.setdefault("Content-Type", "application/json")
    elif payload is not None:
        data = payload
        hdrs.setdefault("Content-Type", "application/octet-stream")
    req = urllib.request.Request(url, data=data, headers=hdrs, method=method or ("POST" if data is not None else "GET"))
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers or {}), exc.read()


def call_with_retries(fn: Callable[[], tuple[int, dict, bytes]], *, what: str, attempts: int = 6, base_delay: float = 0.2,
                      max_delay: float = 5.0, log: Callable[[str], None] | None = None,
                      retry_5xx: bool = True) -> tuple[int, dict, bytes]:
    """fn() with exponential backoff (and jitter) on connection errors, timeouts and 5xx answers.

    4xx answers are returned to the caller (they are not transient); so are 5xx ones with retry_5xx=False (a call
    that must not be repeated, such as a weight commit). After `attempts` failures raises
    ServerUnavailable naming `what`, the attempts and the last error.
    """
    last = ""
    t0 = time.monotonic()
    for attempt in range(attempts):
        try:
            status, headers, body = fn()
            if status < 500 or not retry_5xx:
                return status, headers, body
            last = f"HTTP {status}: {body[:200].decode(errors='replace')}"
        except (OSError, TimeoutError) as exc:  # URLError, ConnectionRefusedError, socket.timeout are OSErrors
            last = f"{type(exc).__name__}: {getattr(exc, 'reason', exc)}"
        if attempt + 1 < attempts:
            delay = min(max_delay, base_delay * 2**attempt) * (0.5 + random.random() / 2)
            if log is not None:
                log(f"{what}: attempt {attempt + 1}/{attempts} failed ({last}); retrying in {delay:.2f}s")
            time.sleep(delay)
    raise ServerUnavailable(
        f"{what}: no answer after {attempts} attempts over {time.monotonic() - t0:.1f}s (last error: {last})"
    )


def wait_healthy(url: str, what: str, timeout: float | None = None, log: Callable[[str], None] | None = None) -> None:
    """Poll URL/healthz until it answers 200 (a server pod still starting: vLLM on a GPU takes minutes).
    timeout: seconds, default GPRL_SERVER_WAIT_S (600). Raises ServerUnavailable when it never comes up."""
    import os

    timeout = float(os.environ.get("GPRL_SERVER_WAIT_S", "600")) if timeout is None else timeout
    t0 = time.monotonic()
    delay, last, said = 0.2, "", False
    while True:
        try:
            status, _, body = request(url.rstrip("/") + "/healthz", timeout=10)
            if status == 200:
                return
            last = f"HTTP {status}"
        except OSError as exc:
            last = f"{type(exc).__name__}: {getattr(exc, 'reason', exc)}"
        if time.monotonic() - t0 > timeout:
            raise ServerUnavailable(f"{what}: not healthy after {timeout:.0f}s (last error: {last})")
        if log is not None and not said and time.monotonic() - t0 > 5:
            log(f"waiting for {what} at {url} ({last})")
            said = True
        time.sleep(delay)
        delay = min(5.0, delay * 1.5)


def json_body(status: int, body: bytes, what: str) -> dict:
    if status >= 400:
        try:
            msg = json.loads(body).get("error", body.decode(errors="replace"))
        except ValueError:
            msg = body[:500].decode(errors="replace")
        raise ServerError(status, f"{what}: {msg}")
    return json.loads(body)
