"""The HTTP stack both servers share: a FastAPI app served by uvicorn, with the limits a server facing a cluster needs.

* authentication: a bearer token (`Authorization: Bearer <token>`, compared in constant time) on every route but
  the probes and /metrics; the token comes from the file the operator mounts (gprl/serving/auth.py);
* bounded requests: a body over its route's limit is refused with 413 before it is read (Content-Length) or as
  soon as it passes the limit (chunked); headers are capped by h11 (`MAX_HEADER_BYTES`); a client that does not
  deliver its whole request within `request_timeout_s` of its first byte (slow-loris) is disconnected; idle
  keep-alive connections close after `keep_alive_s`; at most `max_connections` at once (503 beyond); the listen
  backlog is `backlog`;
* validation: request bodies are pydantic models (strict types, unknown fields refused); an invalid one gets 422
  naming the field, e.g. `{"error": "body.n: Input should be less than or equal to 64"}`;
* metrics: per-server prometheus-client registry served at GET /metrics (gprl/serving/metrics.py).

`Server` runs uvicorn on a socket it binds itself (so the port is known at once, port 0 included) and keeps the
`serve_forever / shutdown / server_close / server_address` surface of the standard library's servers.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from dataclasses import dataclass
from typing import Callable

from gprl.serving.auth import token_matches
from gprl.serving.metrics import ServerMetrics

MAX_HEADER_BYTES = 64 * 1024
PUBLIC_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})  # probes and Prometheus: no token (NetworkPolicy)


@dataclass(frozen=True)
class Limits:
    """Transport limits of one server (flags of `gprl serve-rollout` / `gprl serve-gpm`)."""

    max_body_bytes: int = 16 * 2**20  # JSON requests
    request_timeout_s: float = 30.0  # first byte of a request to its last (slow-loris)
    keep_alive_s: float = 5.0
    max_connections: int = 256
    backlog: int = 1024


class HTTPError(Exception):
    """Raised by a route: answered as {"error": message, **extra} with `status`."""

    def __init__(self, status: int, message: str, **extra):
        self.status, self.message, self.extra = status, message, extra
        super().__init__(message)


def _json_response(status: int, payload: dict) -> tuple[dict, bytes]:
    body = json.dumps(payload).encode()
    start = {"type": "http.response.start", "status": status,
             "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]}
    return start, body


class _Guard:
    """ASGI middleware in front of the routes: the token, the body limit and the request metrics.

    body_limits: path -> byte limit for that route's body (default `limits.max_body_bytes`)."""

    def __init__(self, app, token: str | None, limits: Limits, body_limits: dict[str, int], metrics: ServerMetrics,
                 routes: set[str]):
        self.app, self.token, self.limits, self.body_limits, self.metrics = app, token, limits, body_limits, metrics
        self.routes = routes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        route = path if path in self.routes else "other"
        t0, status = time.perf_counter(), {"code": 500}

        over = {"limit": 0}  # set when a chunked body passes the limit: the app's own answer is replaced by 413

        async def send_tracked(message):
            if over["limit"]:
                return
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        async def refuse(code: int, message: str, **headers):
            over["limit"] = 0
            start, body = _json_response(code, {"error": message})
            start["headers"] += [(k.encode(), v.encode()) for k, v in headers.items()]
            await send_tracked(start)
            await send_tracked({"type": "http.response.body", "body": body})

        self.metrics.in_flight.inc()
        try:
            if self.token is not None and path not in PUBLIC_PATHS and not self._authorized(scope):
                return await refuse(401, "missing or wrong bearer token (Authorization: Bearer <token>)",
                                    **{"www-authenticate": "Bearer"})
            limit = self.body_limits.get(path, self.limits.max_body_bytes)
            length = dict(scope["headers"]).get(b"content-length")
            if length is not None and int(length) > limit:  # h11 has already refused a negative or non-numeric one
                return await refuse(413, f"request body of {int(length)} bytes is over this route's limit of {limit}")
            seen = {"bytes": 0}

            async def receive_bounded():
                message = await receive()
                if message["type"] == "http.request":
                    seen["bytes"] += len(message.get("body", b""))
                    if seen["bytes"] > limit:
                        over["limit"] = limit
                        raise HTTPError(413, f"request body over this route's limit of {limit} bytes")
                return message

            try:
                await self.app(scope, receive_bounded, send_tracked)
            except HTTPError:
                if not over["limit"]:
                    raise
            if over["limit"]:  # whatever the app made of the cut-off body, the answer is 413
                await refuse(413, f"request body over this route's limit of {over['limit']} bytes")
        finally:
            self.metrics.in_flight.dec()
            self.metrics.requests.labels(route=route, code=str(status["code"])).inc()
            self.metrics.latency.labels(route=route).observe(time.perf_counter() - t0)

    def _authorized(self, scope) -> bool:
        for name, value in scope["headers"]:
            if name == b"authorization":
                scheme, _, given = value.decode("latin-1").partition(" ")
                return scheme.lower() == "bearer" and token_matches(given.strip(), self.token)
        return False


def make_app(*, title: str, token: str | None, limits: Limits, metrics: ServerMetrics,
             body_limits: dict[str, int] | None = None, ready: Callable[[], str | None] = lambda: None):
    """A FastAPI app with the probes, /metrics, JSON errors and the guard; the caller adds its routes to
    `app.router` and wraps with `guard(app)`. ready(): None when ready, else why not (503 on /readyz)."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response

    app = FastAPI(title=title, docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(RequestValidationError)
    async def invalid(_req: Request, exc: RequestValidationError):
        errors = exc.errors()
        first = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in errors[:3])
        return JSONResponse({"error": first, "detail": [{"loc": e["loc"], "msg": e["msg"]} for e in errors[:20]]},
                            status_code=422)

    @app.exception_handler(HTTPError)
    async def http_error(_req: Request, exc: HTTPError):
        return JSONResponse({"error": exc.message, **exc.extra}, status_code=exc.status)

    @app.get("/healthz")
    def healthz():
        return {"ok": True}

    @app.get("/readyz")
    def readyz():
        why = ready()
        if why is not None:
            raise HTTPError(503, why)
        return {"ok": True}

    @app.get("/metrics")
    def prometheus():
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    app.state.guard_args = (token, limits, dict(body_limits or {}), metrics)
    return app


def guard(app):
    token, limits, body_limits, metrics = app.state.guard_args
    routes = {getattr(r, "path", "") for r in app.router.routes}
    return _Guard(app, token, limits, body_limits, metrics, routes)


def _protocol_with_deadline(request_timeout_s: float):
    """uvicorn's h11 protocol, plus a deadline from a request's first byte to its last: uvicorn itself only times
    out idle keep-alive connections, so a client trickling its headers or body would hold a connection forever."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class DeadlineH11Protocol(H11Protocol):
        _deadline: asyncio.TimerHandle | None = None

        def _reading(self) -> bool:
            return self.cycle is None or self.cycle.response_complete or self.cycle.more_body

        def _arm(self) -> None:
            if self._deadline is None:
                self._deadline = self.loop.call_later(request_timeout_s, self._expire)

        def _disarm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

        def _expire(self) -> None:
            self._deadline = None
            if self._reading() and not self.transport.is_closing():
                self.transport.close()

        def connection_made(self, transport):
            super().connection_made(transport)
            self._arm()

        def data_received(self, data: bytes) -> None:
            if self._reading():
                self._arm()
            super().data_received(data)
            if not self._reading():
                self._disarm()  # the whole request is in: the route may take as long as it needs

        def connection_lost(self, exc):
            self._disarm()
            super().connection_lost(exc)

    return DeadlineH11Protocol


class Server:
    """uvicorn serving `app` on host:port (port 0: any free one), in the caller's thread (`serve_forever`)."""

    def __init__(self, app, host: str, port: int, limits: Limits):
        import uvicorn

        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.socket = socket.socket(family, socket.SOCK_STREAM)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.socket.bind((host, port))
        self.socket.listen(limits.backlog)
        self.server_address = self.socket.getsockname()[:2]
        self.app = app
        config = uvicorn.Config(
            app, http=_protocol_with_deadline(limits.request_timeout_s), lifespan="off", log_level="warning",
            access_log=False, timeout_keep_alive=limits.keep_alive_s, limit_concurrency=limits.max_connections,
            backlog=limits.backlog, h11_max_incomplete_event_size=MAX_HEADER_BYTES, timeout_graceful_shutdown=5,
            server_header=False,
        )
        self._uvicorn = uvicorn.Server(config)
        self._stopped = threading.Event()
        self._running = False

    def serve_forever(self) -> None:
        self._running = True
        try:
            self._uvicorn.run(sockets=[self.socket])
        finally:
            self._stopped.set()

    def shutdown(self) -> None:
        self._uvicorn.should_exit = True
        if self._running:
            self._stopped.wait(30)

    def server_close(self) -> None:
        self.socket.close()


def serve(server: Server, banner: str) -> int:
    """Print the banner (the tests and the pod logs wait for it) and serve until SIGINT/SIGTERM; the exit status."""
    print(banner, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    return 0
