"""Prometheus metrics of `gprl serve-rollout` and `gprl serve-gpm` (GET /metrics), one registry per server.

The catalogue is docs/operations.md ("Servers"); tests/unit/test_serving_http.py checks that it names every family.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class ServerMetrics:
    """What every server exports (each server its own registry; Prometheus's job/pod labels tell them apart)."""

    def __init__(self):
        self.registry = r = CollectorRegistry()
        self.requests = Counter("gprl_server_requests", "HTTP requests by route and status code", ["route", "code"],
                                registry=r)
        self.latency = Histogram("gprl_server_request_seconds", "wall time of a request by route", ["route"],
                                 registry=r, buckets=LATENCY_BUCKETS)
        self.in_flight = Gauge("gprl_server_requests_in_flight", "requests being served", registry=r)


class RolloutMetrics(ServerMetrics):
    def __init__(self):
        super().__init__()
        r = self.registry
        self.weight_version = Gauge("gprl_rollout_weight_version", "policy version of the engine's weights",
                                    registry=r)
        self.weight_commits = Counter("gprl_rollout_weight_commits", "weight commits by transport and result "
                                      "(ok, rejected: the push failed a check, failed: the engine's load raised)",
                                      ["transport", "result"], registry=r)
        self.weight_sync = Histogram("gprl_rollout_weight_sync_seconds", "a weight push by phase: transfer (begin "
                                     "to the last tensor received) and load (the engine's reload)",
                                     ["transport", "phase"], registry=r, buckets=LATENCY_BUCKETS)
        self.weight_sessions = Gauge("gprl_rollout_weight_sessions", "weight push sessions open", registry=r)
        self.weight_staged_bytes = Gauge("gprl_rollout_weight_staged_bytes", "bytes held by open push sessions",
                                         registry=r)
        self.weight_kept_bytes = Gauge("gprl_rollout_weight_kept_bytes", "bytes of the last committed weights kept "
                                       "in host memory to roll a failed streamed push back, and of the commit before "
                                       "last's, the next push's receive buffers (streamLoad)",
                                       registry=r)
        self.weight_sessions_expired = Counter("gprl_rollout_weight_sessions_expired",
                                               "push sessions dropped unfinished (idle past their TTL, or evicted)",
                                               registry=r)
        self.generated_tokens = Counter("gprl_rollout_generated_tokens", "tokens generated", registry=r)


class GPMMetrics(ServerMetrics):
    def __init__(self):
        super().__init__()
        r = self.registry
        self.batch_size = Histogram("gprl_gpm_batch_size", "responses scored per forward pass of the batcher",
                                    registry=r, buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024))
        self.batch_requests = Histogram("gprl_gpm_batch_requests", "requests sharing one forward pass",
                                        registry=r, buckets=(1, 2, 4, 8, 16, 32, 64))
        self.scored = Counter("gprl_gpm_scored_responses", "responses scored", registry=r)
