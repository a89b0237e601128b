"""The GPRL Kubernetes operator (kopf): GPRLRun -> ConfigMap, RBAC, PVC, Services and an indexed Job.

`gprl_operator.children` holds the pure spec -> manifests functions; `gprl_operator.handlers` the kopf handlers;
`python -m gprl_operator` runs it.
"""

__version__ = "0.1.0"
