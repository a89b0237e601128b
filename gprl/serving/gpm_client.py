"""The trainer's client of a `gprl serve-gpm` server: a drop-in for GeneralPreferenceModel.score.

Connection errors, timeouts and 5xx answers are retried with exponential backoff; when the server stays gone the
step fails with GPMServerUnavailable naming the URL, the attempts and the last error.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Sequence

import torch

from gprl.gpm.model import GPMOutput
from gprl.serving.auth import auth_headers, load_token
from gprl.serving.http import ServerUnavailable, call_with_retries, json_body, request, wait_healthy


class GPMServerUnavailable(ServerUnavailable):
    pass


@dataclass
class RemoteGPMConfig:
    axes: int
    beta: float
    max_pairs: int | None = None  # the server's cap per request: larger calls are split


class GPMClient:
    def __init__(self, url: str, attempts: int | None = None, base_delay: float | None = None,
                 timeout: float = 300.0, log=None, token: str | None = None):
        self.url = url.rstrip("/")
        self.headers = auth_headers(token if token is not None else load_token())
        self.attempts = attempts or int(os.environ.get("GPRL_GPM_ATTEMPTS", "6"))
        self.base_delay = base_delay if base_delay is not None else float(os.environ.get("GPRL_GPM_BACKOFF_S", "0.5"))
        self.timeout = timeout
        self.log = log
        self._config: RemoteGPMConfig | None = None

    def _call(self, path: str, payload: dict | None = None) -> dict:
        what = f"GPM server {self.url}{path}"
        try:
            status, _, body = call_with_retries(
                lambda: request(self.url + path, payload, headers=self.headers, timeout=self.timeout), what=what,
                attempts=self.attempts, base_delay=self.base_delay, log=self.log,
            )
        except ServerUnavailable as exc:
            raise GPMServerUnavailable(str(exc)) from None
        return json_body(status, body, what)

    @property
    def config(self) -> RemoteGPMConfig:
        if self._config is None:
            # First contact: the server's pod may still be starting (GPRL_SERVER_WAIT_S, default 600 s).
            try:
                wait_healthy(self.url, f"GPM server {self.url}", log=self.log)
            except ServerUnavailable as exc:
                raise GPMServerUnavailable(str(exc)) from None
            self._load_info()
        return self._config

    def _load_info(self) -> RemoteGPMConfig:
        info = self._call("/info")
        self._config = RemoteGPMConfig(axes=int(info["axes"]), beta=float(info["beta"]),
                                       max_pairs=int(info.get("max_pairs") or 0) or None)
        return self._config

    def eval(self):
        return self

    def requires_grad_(self, _flag: bool = True):
        return self

    def score(self, tokenizer, prompts: Sequence[str], responses: Sequence[str], batch_size: int = 32,
              max_length: int = 1024) -> GPMOutput:
        """Same contract as GeneralPreferenceModel.score (the tokenizer is the server's; the argument is ignored)."""
        if any(not isinstance(x, str) for x in list(prompts) + list(responses)):
            raise TypeError("the GPM server scores text; got token ids")
        cfg = self._config or self._load_info()  # retried, without the first-contact wait of `config`
        k, step = 2 * cfg.axes, cfg.max_pairs or max(1, len(prompts))
        embs, eigs = [], []
        for i in range(0, len(prompts), step):
            out = self._call("/score", {"prompts": list(prompts[i : i + step]), "responses": list(responses[i : i + step])})
            embs.append(torch.tensor(out["embeddings"], dtype=torch.float32).reshape(-1, k))
            eigs.append(torch.tensor(out["eigenvalues"], dtype=torch.float32).reshape(-1, cfg.axes))
        if not embs:
            return GPMOutput(torch.zeros(0, k), torch.zeros(0, cfg.axes))
        return GPMOutput(torch.cat(embs), torch.cat(eigs))
