"""`python -m gprl_operator`: run the GPRL operator (kopf) with its settings, health endpoint and metrics.

Environment (the Helm chart sets these; flags override):
  GPRL_WATCH_NAMESPACES   comma-separated namespaces to watch; empty = the whole cluster
  GPRL_METRICS_PORT       port of /metrics (default 8000; 0 = off)
  GPRL_HEALTH_PORT        port of kopf's liveness endpoint /healthz (default 8080; 0 = off)
  GPRL_OPERATOR_PEERING   name of the ClusterKopfPeering shared by the replicas (default gprl-operator)
  GPRL_OPERATOR_STANDALONE=1  run without peering (a single replica, or tests)
  GPRL_OPERATOR_PRIORITY  peering priority (default: random per process, so replicas never tie)
"""

from __future__ import annotations

import argparse
import logging
import os


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m gprl_operator", description="The GPRL operator (kopf).")
    p.add_argument("-n", "--namespace", action="append", default=None,
                   help="namespace to watch (repeatable); default: $GPRL_WATCH_NAMESPACES, else the whole cluster")
    p.add_argument("--metrics-port", type=int, default=int(os.environ.get("GPRL_METRICS_PORT", "8000")))
    p.add_argument("--health-port", type=int, default=int(os.environ.get("GPRL_HEALTH_PORT", "8080")))
    p.add_argument("--bind", default=os.environ.get("GPRL_BIND_ADDRESS", "0.0.0.0"))
    p.add_argument("--standalone", action="store_true", default=os.environ.get("GPRL_OPERATOR_STANDALONE") == "1",
                   help="no peering (a single replica)")
    p.add_argument("--priority", type=int, default=None, help="peering priority (default: random)")
    p.add_argument("-v", "--verbose", action="store_true", default=os.environ.get("GPRL_OPERATOR_VERBOSE") == "1")
    args = p.parse_args(argv)

    namespaces = args.namespace
    if namespaces is None:
        namespaces = [n.strip() for n in os.environ.get("GPRL_WATCH_NAMESPACES", "").split(",") if n.strip()]

    import kopf

    from gprl_operator import handlers, metrics  # noqa: F401  (registers the handlers)

    handlers.WATCH_NAMESPACES = list(namespaces)  # read by handlers.configure (namespace scanning off)

    kopf.configure(verbose=args.verbose)
    if not args.verbose:
        # kopf logs every handled watch event ("Handler ... succeeded") at INFO: keep warnings and our own lines
        logging.getLogger("kopf.objects").setLevel(logging.WARNING)
    logging.getLogger("gprl_operator").setLevel(logging.DEBUG if args.verbose else logging.INFO)
    metrics.instrument_kopf_http()
    metrics.serve(args.metrics_port, args.bind)
    liveness = f"http://{args.bind}:{args.health_port}/healthz" if args.health_port else None
    kopf.run(
        clusterwide=not namespaces,
        namespaces=namespaces,
        liveness_endpoint=liveness,
        standalone=True if args.standalone else None,
        priority=args.priority if args.priority is not None else handlers.default_priority(),
        peering_name=None if args.standalone else handlers.PEERING_NAME,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
