"""Rules a GPRLRun must satisfy on Kubernetes beyond the run config itself, each declared once, in CEL for the API
server (`gprl.crd` puts them into the CRD) and in Python for `gprl config` on a manifest, with one message.

- the run's name: a DNS-1035 label short enough that every name derived from it stays a valid label (a Pod's
  hostname `<run>-<index>`; for `disaggregated`, the StatefulSet `<run>-rollout`, whose pods carry the label
  `controller-revision-hash: <run>-rollout-<10-character hash>`, at most 63 characters);
- `output.dir`: inside the pod's workspace (relative to it, or absolute under it), no `..`: the checkpoint volume
  is mounted there, and must not cover the image's or the operator's own folders (/etc/gprl, /tmp, ...);
- `output.metricsPort`, `rollout.weightSync.port`: distinct from the ports the run's pods already use and from each
  other, and not privileged (pods run as a non-root user).

`parse_manifest` is what `gprl config` runs on a file holding a GPRLRun: camelCase keys only (the API server
knows no snake_case), and every rule above, so both give the same verdict on the same manifest.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable

from pydantic import ValidationError

from gprl.api.quantity import DNS_LABEL
from gprl.config import ConfigError, RunSpec, validation_problems

__all__ = ["WORKDIR", "RESERVED_PORTS", "WEIGHT_SYNC_PORT", "MAX_NAME", "Rule", "RULES", "max_name", "parse_manifest"]

WORKDIR = "/workspace"  # the pods' working directory; output folders live under it
TRAINER_METRICS_PORT = 9400  # metricsPort 0 on Kubernetes
WEIGHT_SYNC_PORT = 29600  # rollout.weightSync.port 0 on Kubernetes
RESERVED_PORTS = {8000: "rollout server", 8001: "GPM server", 29500: "torch.distributed rendezvous"}
MAX_NAME = {"colocated": 47, "disaggregated": 44}


def max_name(topology: str) -> int:
    return MAX_NAME.get(topology, min(MAX_NAME.values()))


@dataclass(frozen=True)
class Rule:
    """One check: `cel` at `where` (a path of the CRD's schema: "" is the object, "spec.output.dir" a field),
    `check(name, spec) -> bool` the same in Python."""

    where: str
    field: str  # the field the message is about, as a user writes it
    cel: str
    message: str
    check: Callable[[str, RunSpec], bool]
    field_path: str | None = None


_DOTDOT = r"(^|/)\.\.(/|$)"
_ports = ", ".join(f"{p} ({what})" for p, what in RESERVED_PORTS.items())

RULES: tuple[Rule, ...] = (
    Rule(
        "", "metadata.name",
        f"self.metadata.name.matches(r'{DNS_LABEL}')",
        "metadata.name must be a DNS-1035 label: lower-case letters, digits and '-', starting with a letter "
        "(it names the run's Job, Services and pods)",
        lambda name, spec: re.match(DNS_LABEL, name) is not None,
    ),
    Rule(
        "", "metadata.name",
        f"!has(self.spec.resources) || !has(self.spec.resources.topology) || size(self.metadata.name) <= "
        f"(self.spec.resources.topology == 'disaggregated' ? {MAX_NAME['disaggregated']} : {MAX_NAME['colocated']})",
        f"metadata.name is too long: at most {MAX_NAME['colocated']} characters ({MAX_NAME['disaggregated']} with "
        "resources.topology: disaggregated), so that every name and label derived from it stays within 63",
        lambda name, spec: len(name) <= max_name(spec.resources.topology),
    ),
    Rule(
        "spec.output.dir", "spec.output.dir",
        f"!self.matches(r'{_DOTDOT}')",
        "spec.output.dir must not contain a '..' segment (the checkpoint volume is mounted there)",
        lambda name, spec: re.search(_DOTDOT, spec.output.dir) is None,
    ),
    Rule(
        "spec.output.dir", "spec.output.dir",
        f"!self.startsWith('/') || (self.startsWith('{WORKDIR}/') && size(self) > {len(WORKDIR) + 1})",
        f"spec.output.dir must be relative to {WORKDIR} or an absolute path under {WORKDIR}/ (the checkpoint "
        "volume must not cover the image's or the operator's folders such as /etc/gprl)",
        lambda name, spec: not spec.output.dir.startswith("/")
        or (spec.output.dir.startswith(f"{WORKDIR}/") and len(spec.output.dir) > len(WORKDIR) + 1),
    ),
    Rule(
        "spec.output.metricsPort", "spec.output.metricsPort",
        f"self == 0 || (self >= 1024 && !(self in [{', '.join(str(p) for p in RESERVED_PORTS)}]))",
        f"spec.output.metricsPort must be 0 (= {TRAINER_METRICS_PORT}) or a port >= 1024 (pods run as non-root) "
        f"other than those the run's pods use: {_ports}",
        lambda name, spec: spec.output.metrics_port == 0
        or (spec.output.metrics_port >= 1024 and spec.output.metrics_port not in RESERVED_PORTS),
    ),
    Rule(
        "spec.rollout.weightSync.port", "spec.rollout.weightSync.port",
        f"self == 0 || (self >= 1024 && !(self in [{', '.join(str(p) for p in [*RESERVED_PORTS, TRAINER_METRICS_PORT])}]))",
        f"spec.rollout.weightSync.port must be 0 (= {WEIGHT_SYNC_PORT}) or a port >= 1024 (pods run as non-root) "
        f"other than those the run's pods use: {_ports}, {TRAINER_METRICS_PORT} (metrics)",
        lambda name, spec: spec.rollout.weight_sync.port == 0
        or (spec.rollout.weight_sync.port >= 1024
            and spec.rollout.weight_sync.port not in (*RESERVED_PORTS, TRAINER_METRICS_PORT)),
    ),
    # Each port alone may be fine and the two still clash (the pod would listen twice on one port).
    Rule(
        "", "spec.output.metricsPort",
        "((has(self.spec.output) && has(self.spec.output.metricsPort) && self.spec.output.metricsPort != 0) ? "
        f"self.spec.output.metricsPort : {TRAINER_METRICS_PORT}) != "
        "((has(self.spec.rollout) && has(self.spec.rollout.weightSync) && has(self.spec.rollout.weightSync.port) && "
        f"self.spec.rollout.weightSync.port != 0) ? self.spec.rollout.weightSync.port : {WEIGHT_SYNC_PORT})",
        f"spec.output.metricsPort and spec.rollout.weightSync.port must differ (0 means {TRAINER_METRICS_PORT} and "
        f"{WEIGHT_SYNC_PORT}): the learner pod listens on both",
        lambda name, spec: (spec.output.metrics_port or TRAINER_METRICS_PORT)
        != (spec.rollout.weight_sync.port or WEIGHT_SYNC_PORT),
    ),
    # A run names its sources: nothing defaults to the synthetic world (gprl.sources.missing_sources, the same check
    # for `gprl train`).
    Rule(
        "", "spec.model.policy",
        "has(self.spec.model) && has(self.spec.model.policy)",
        "spec.model.policy is required: a model folder on the run's volume, a hub id (org/name), or world:policy",
        lambda name, spec: spec.model.policy is not None,
    ),
    Rule(
        "", "spec.gpm.path",
        "has(self.spec.gpm) && (has(self.spec.gpm.path) || has(self.spec.gpm.serverUrl))",
        "spec.gpm.path is required (or spec.gpm.serverUrl): a GPM folder, a hub id, or world:gpm",
        lambda name, spec: spec.gpm.path is not None or spec.gpm.server_url is not None,
    ),
    Rule(
        "", "spec.data.prompts",
        "has(self.spec.data) && has(self.spec.data.prompts)",
        "spec.data.prompts is required: a prompt file or folder, hf:<dataset>, or world:prompts",
        lambda name, spec: spec.data.prompts is not None,
    ),
)


def parse_manifest(doc: Any, source: str | None = None) -> RunSpec:
    """A GPRLRun manifest -> its RunSpec, with the verdict the API server gives (ConfigError naming each field)."""
    if not isinstance(doc, dict):
        raise ConfigError([f"<root>: expected a GPRLRun object, got {type(doc).__name__}"], source)
    problems: list[str] = []
    name = (doc.get("metadata") or {}).get("name")
    if not isinstance(name, str) or not name:
        problems.append("metadata.name: required (a DNS-1035 label)")
        name = ""
    raw = doc.get("spec")
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(problems + [f"spec: expected a mapping of sections, got {type(raw).__name__}"], source)
    suspend = raw.get("suspend", False)
    if not isinstance(suspend, bool):
        problems.append(f"spec.suspend: must be true or false, got {suspend!r}")
    raw = {k: v for k, v in raw.items() if k != "suspend"}
    try:
        # by_name=False: the API server knows the camelCase names only; a snake_case key is an unknown field there
        spec = RunSpec.model_validate(raw, by_alias=True, by_name=False)
    except ValidationError as exc:
        problems += ["spec." + p for p in validation_problems(exc, raw)]
        raise ConfigError(problems, source) from None
    for rule in RULES:
        if (name or rule.field != "metadata.name") and not rule.check(name, spec):
            problems.append(f"{rule.field}: {rule.message}")
    if problems:
        raise ConfigError(problems, source)
    return spec
