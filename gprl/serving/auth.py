"""The per-run bearer token shared by the learner and the servers of one run.

The operator generates it once per run (a Secret owned by the GPRLRun, operator/gprl_operator/children.py) and
mounts it into the learner and server pods; `GPRL_SERVER_TOKEN_FILE` names the mounted file. Servers require it on
every route but the probes and /metrics; clients send it as `Authorization: Bearer <token>`.
"""

from __future__ import annotations

import hmac
import os
from pathlib import Path

TOKEN_FILE_ENV = "GPRL_SERVER_TOKEN_FILE"
MIN_TOKEN_CHARS = 16
LOOPBACK = frozenset({"127.0.0.1", "::1", "localhost"})


class TokenError(ValueError):
    pass


def load_token(path: str | os.PathLike | None = None) -> str | None:
    """The token in `path`, else in the file named by $GPRL_SERVER_TOKEN_FILE, else None (no token configured)."""
    path = path or os.environ.get(TOKEN_FILE_ENV) or None
    if path is None:
        return None
    try:
        token = Path(path).read_text().strip()
    except OSError as exc:
        raise TokenError(f"cannot read the server token file {path} ({TOKEN_FILE_ENV}): {exc.strerror}") from None
    if len(token) < MIN_TOKEN_CHARS:
        raise TokenError(f"the server token in {path} has {len(token)} characters; at least {MIN_TOKEN_CHARS} "
                         "(the operator's Secret holds 64)")
    return token


def token_matches(given: str, want: str) -> bool:
    """Constant-time comparison (a timing side channel must not reveal the token's prefix)."""
    return hmac.compare_digest(given.encode(), want.encode())


def auth_headers(token: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"} if token else {}


def server_token(path: str | None, host: str) -> str | None:
    """A server's token: required unless it binds to loopback only (a local run, a test)."""
    token = load_token(path)
    if token is None and host not in LOOPBACK:
        raise TokenError(f"refusing to serve on {host} without a token: give --token-file (or {TOKEN_FILE_ENV}); "
                         "only a server bound to 127.0.0.1 may run without one")
    return token
