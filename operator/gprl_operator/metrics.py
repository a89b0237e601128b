"""Prometheus metrics of the operator (kopf has none of its own), served on /metrics."""

from __future__ import annotations

import functools
import inspect
import time
from typing import Optional

from prometheus_client import Counter, Gauge, Histogram, start_http_server

RECONCILES = Counter(
    "gprl_operator_reconcile_total", "Handler invocations by handler and result.", ["handler", "result"]
)
RECONCILE_ERRORS = Counter(
    "gprl_operator_reconcile_errors_total", "Handler failures by handler and error kind.", ["handler", "kind"]
)
RECONCILE_SECONDS = Histogram(
    "gprl_operator_reconcile_duration_seconds",
    "Wall time of one handler invocation.",
    ["handler"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
API_REQUESTS = Counter(
    "gprl_operator_api_requests_total",
    "Requests to the Kubernetes API by client (operator: our own calls; kopf: watches, annotations, peering).",
    ["client", "verb", "resource", "code"],
)
API_LATENCY = Histogram(
    "gprl_operator_api_request_duration_seconds", "Latency of the operator's own API requests.", ["verb"],
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10),
)
STATUS_WRITES = Counter("gprl_operator_status_writes_total", "Status applies to GPRLRuns by trigger.", ["trigger"])
RUNS = Gauge("gprl_operator_runs", "GPRLRuns known to this operator, by phase.", ["phase"])

def resource_of(path: str) -> str:
    """`/api/v1/namespaces/ns/pods/x/status` -> `pods/status`; discovery and other paths -> `other`."""
    parts = [p for p in path.split("?", 1)[0].split("/") if p]
    if parts[:1] == ["api"]:
        parts = parts[2:]
    elif parts[:1] == ["apis"]:
        parts = parts[3:]
    else:
        return "other"
    if len(parts) >= 2 and parts[0] == "namespaces":
        parts = parts[2:] if len(parts) > 2 else ["namespaces"]
    if not parts:
        return "other"
    return parts[0] + (f"/{parts[2]}" if len(parts) > 2 else "")


def timed(handler: str):
    """Count and time a handler (sync or async: kopf runs the first in a thread, awaits the second in its loop);
    errors are counted by exception type and re-raised."""

    def done(t0: float, exc: Optional[BaseException]) -> None:
        RECONCILE_SECONDS.labels(handler).observe(time.perf_counter() - t0)
        if exc is None:
            RECONCILES.labels(handler, "ok").inc()
        else:
            RECONCILES.labels(handler, "error").inc()
            RECONCILE_ERRORS.labels(handler, type(exc).__name__).inc()

    def wrap(fn):
        if inspect.iscoroutinefunction(fn):
            @functools.wraps(fn)
            async def ainner(*args, **kwargs):
                t0 = time.perf_counter()
                try:
                    out = await fn(*args, **kwargs)
                except Exception as exc:
                    done(t0, exc)
                    raise
                done(t0, None)
                return out

            return ainner

        @functools.wraps(fn)
        def inner(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                out = fn(*args, **kwargs)
            except Exception as exc:
                done(t0, exc)
                raise
            done(t0, None)
            return out

        return inner

    return wrap


_instrumented = False


def instrument_kopf_http() -> None:
    """Count kopf's own requests (aiohttp): watch streams, list calls, annotation patches, peering, events."""
    global _instrumented
    if _instrumented:
        return
    try:
        import aiohttp
    except ImportError:  # pragma: no cover
        return
    orig = aiohttp.ClientSession._request

    @functools.wraps(orig)
    async def _request(self, method, str_or_url, *args, **kwargs):
        url = str(str_or_url)
        path = "/" + url.split("://", 1)[-1].split("/", 1)[-1] if "://" in url else url
        resource = resource_of(path)
        code = "error"
        try:
            resp = await orig(self, method, str_or_url, *args, **kwargs)
            code = str(resp.status)
            return resp
        finally:
            verb = method.upper()
            if verb == "GET" and "watch=" in url:
                verb = "WATCH"
            API_REQUESTS.labels(client="kopf", verb=verb, resource=resource, code=code).inc()

    aiohttp.ClientSession._request = _request
    _instrumented = True


def serve(port: int, addr: str = "0.0.0.0") -> None:
    if port:
        start_http_server(port, addr=addr)
