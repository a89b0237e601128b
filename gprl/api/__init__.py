"""The GPRLRun API in one place: the run config (`gprl.config.RunSpec`, marked field by field with what may change:
`gprl.api.marks`), the status both sides of the operator <-> trainer loop read and write (`gprl.api.status`:
the trainer's step report, the operator's control block and drift-monitor state, conditions), the rules a run
manifest must satisfy on Kubernetes (`gprl.api.manifest`), the value formats they use (`gprl.api.quantity`),
and the Pod shapes a run may add to its pods and its model sources (`gprl.api.pods`).

`gprl.crd` generates the CRD, the trainer's status admission policy and docs/crd-reference.md from these types;
the operator and the trainer's control channel read and write the status through them.
"""
