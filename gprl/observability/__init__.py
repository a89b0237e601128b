"""The observability pack as code: Grafana dashboards (grafana-foundation-sdk) and Prometheus alert rules.

    python -m gprl.observability --write    # charts/gprl/dashboards/*.json and charts/gprl/rules/gprl-alerts.yaml
    python -m gprl.observability --check    # exit 1 when the committed files are stale

The chart template `charts/gprl/templates/observability.yaml` turns them into ConfigMaps (label
`grafana_dashboard: "1"`, the Grafana sidecar's) and a PrometheusRule. The metric names are the catalogue of
docs/operations.md; tests/observability checks every name used here is exported by the trainer or the operator.
"""
