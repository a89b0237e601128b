"""The `GPRLRun` CustomResourceDefinition, generated from `gprl.config.RunSpec`.

Never edit `crds/gprlrun.yaml` (or its copy in the Helm chart) by hand: run

    python -m gprl.crd --write          # crds/gprlrun.yaml, charts/gprl/crds/gprlrun.yaml, docs/crd-reference.md
    python -m gprl.crd                  # the CRD YAML on stdout
    python -m gprl.crd --markdown       # the reference page on stdout

A test fails when the committed files differ from what this module generates.
No Kubernetes import here: the CRD is plain data.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path
from typing import Any

import yaml

from gprl.config import RunSpec

__all__ = [
    "GROUP",
    "VERSION",
    "KIND",
    "PLURAL",
    "SHORT_NAME",
    "IMMUTABLE_FIELDS",
    "MUTABLE_SECTIONS",
    "build_crd",
    "spec_schema",
    "status_schema",
    "render_yaml",
    "render_markdown",
    "main",
]

GROUP = "gprl.dev"
VERSION = "v1alpha1"
KIND = "GPRLRun"
PLURAL = "gprlruns"
SINGULAR = "gprlrun"
SHORT_NAME = "gr"
CRD_NAME = f"{PLURAL}.{GROUP}"

# Spec paths that cannot change once a run exists (the Job's pod template and the run's identity depend on them).
IMMUTABLE_FIELDS = ("model", "data", "gpm", "resources", "output.dir")
# Sections whose changes the operator propagates into the running job's ConfigMap.
MUTABLE_SECTIONS = ("seed", "algo", "drift", "rollout", "learner", "checkpoint", "output")

# Longest run name: it prefixes Job, Service and pod names (a pod hostname `<run>-<index>` must stay a DNS label).
MAX_NAME = 47

_DROP = {"title"}
_KEEP = {
    "type",
    "description",
    "default",
    "minimum",
    "maximum",
    "exclusiveMinimum",
    "exclusiveMaximum",
    "minLength",
    "maxLength",
    "minItems",
    "maxItems",
    "pattern",
    "enum",
    "items",
    "properties",
    "required",
    "nullable",
    "format",
    "additionalProperties",
    "x-kubernetes-validations",
    "x-kubernetes-preserve-unknown-fields",
    "x-kubernetes-list-type",
    "x-kubernetes-list-map-keys",
}


# --------------------------------------------------------------------------------------
# JSON schema (pydantic) -> OpenAPI v3 structural schema (Kubernetes)


def _convert(node: Any, defs: dict[str, Any]) -> Any:
    if isinstance(node, list):
        return [_convert(n, defs) for n in node]
    if not isinstance(node, dict):
        return node
    node = dict(node)
    if "$ref" in node:
        target = defs[node.pop("$ref").rsplit("/", 1)[-1]]
        merged = {**copy.deepcopy(target), **node}  # the referencing field's description wins
        return _convert(merged, defs)
    if "anyOf" in node:
        variants = node.pop("anyOf")
        non_null = [v for v in variants if v.get("type") != "null"]
        if len(non_null) != 1 or len(non_null) == len(variants):
            raise ValueError(f"cannot express anyOf {variants!r} in a structural schema")
        inner = _convert(non_null[0], defs)
        node = {**inner, **{k: v for k, v in node.items()}}
        node["nullable"] = True
        if node.get("default", 0) is None:
            del node["default"]
    if "const" in node:
        node["enum"] = [node.pop("const")]
    if "enum" in node and "type" not in node:
        kinds = {type(v) for v in node["enum"]}
        node["type"] = "integer" if kinds == {int} else "string" if kinds == {str} else "number"
    for key in ("exclusiveMinimum", "exclusiveMaximum"):  # JSON Schema 2020-12 number -> OpenAPI v3 boolean
        if key in node and not isinstance(node[key], bool):
            node["minimum" if key == "exclusiveMinimum" else "maximum"] = node[key]
            node[key] = True
    out: dict[str, Any] = {}
    order = {k: i for i, k in enumerate(("type", "description", "default", "nullable"))}
    for key, value in sorted(node.items(), key=lambda kv: order.get(kv[0], len(order))):
        if key in _DROP:
            continue
        if key not in _KEEP:
            raise ValueError(f"unsupported JSON-schema keyword {key!r}")
        if key == "properties":
            out[key] = {k: _convert(v, defs) for k, v in value.items()}
        elif key in ("items", "additionalProperties") and isinstance(value, dict):
            out[key] = _convert(value, defs)
        else:
            out[key] = copy.deepcopy(value)
    if out.get("type") == "object" and "properties" in out:
        out.pop("additionalProperties", None)  # extra="forbid": Kubernetes prunes (or, strict, refuses) unknowns
    return out


def _at(schema: dict, path: str) -> dict:
    node = schema
    for part in path.split("."):
        node = node["properties"][part]
    return node


def _rule(node: dict, rule: str, message: str, field_path: str | None = None, reason: str | None = None) -> None:
    entry: dict[str, Any] = {"rule": rule, "message": message}
    if field_path:
        entry["fieldPath"] = field_path
    if reason:
        entry["reason"] = reason
    node.setdefault("x-kubernetes-validations", []).append(entry)


def spec_schema() -> dict[str, Any]:
    """`spec` of a GPRLRun: RunSpec (camelCase) plus `suspend`, with CEL rules for the cross-field checks."""
    raw = RunSpec.model_json_schema(by_alias=True)
    defs = raw.pop("$defs", {})
    schema = _convert(raw, defs)
    schema.pop("description", None)
    schema["description"] = (
        "The run configuration (the same fields as the YAML file of `gprl train`, camelCase), plus `suspend`."
    )
    # Every section defaults to {} so the API server fills in (and shows) the whole configuration.
    for name, prop in schema["properties"].items():
        if prop.get("type") == "object":
            prop["default"] = {}
    schema["properties"]["suspend"] = {
        "type": "boolean",
        "default": False,
        "description": "Pause the run: the operator suspends its Job (pods stop; checkpoints stay) until set back "
        "to false, when the Job resumes from the newest checkpoint.",
    }

    # cross-field checks, mirroring the model validators of gprl.config. The has() guards matter only when the
    # API server validates a section's `default: {}` itself (nested defaults are not applied there); stored objects
    # always carry every defaulted field.
    _rule(
        _at(schema, "algo"),
        "!has(self.epsHigh) || !has(self.epsLow) || self.epsHigh >= self.epsLow",
        "algo.epsHigh must be >= algo.epsLow (the clip range is [1 - epsLow, 1 + epsHigh])",
        field_path=".epsHigh",
    )
    pins = _at(schema, "drift.pinnedWeights")
    _rule(pins, "self.all(w, w > 0.0)", "drift.pinnedWeights must all be > 0")
    _rule(
        schema,
        "!has(self.drift) || !has(self.drift.pinnedWeights) || !has(self.gpm) || !has(self.gpm.axes) "
        "|| size(self.drift.pinnedWeights) == self.gpm.axes",
        "drift.pinnedWeights must have one entry per GPM axis (gpm.axes)",
        field_path=".drift.pinnedWeights",
    )
    _rule(
        schema,
        "!has(self.drift) || !has(self.algo) || !has(self.drift.klCoefMax) || !has(self.algo.klCoef) "
        "|| self.drift.klCoefMax >= self.algo.klCoef",
        "drift.klCoefMax must be >= algo.klCoef (the monitor only raises the KL weight)",
        field_path=".drift.klCoefMax",
    )
    # immutability after creation (transition rules: only checked on update)
    for path in IMMUTABLE_FIELDS:
        _rule(
            _at(schema, path),
            "self == oldSelf",
            f"spec.{path} is immutable: delete and re-create the GPRLRun to change it",
            reason="FieldValueForbidden",
        )
    return schema


def status_schema() -> dict[str, Any]:
    num = {"type": "number"}
    integer = {"type": "integer", "format": "int64", "minimum": 0}
    condition = {
        "type": "object",
        "required": ["type", "status"],
        "properties": {
            "type": {"type": "string", "description": "Ready, Running, Succeeded, Failed, Suspended, PodFailed, "
                     "DriftDetected."},
            "status": {"type": "string", "enum": ["True", "False", "Unknown"]},
            "reason": {"type": "string", "description": "CamelCase reason of the last transition."},
            "message": {"type": "string", "description": "Human-readable details."},
            "lastTransitionTime": {"type": "string", "format": "date-time"},
            "observedGeneration": {**integer},
        },
    }
    return {
        "type": "object",
        "description": "Observed state, written by the operator (phase, conditions, control) and by the job "
        "(step, policyVersion, training).",
        "properties": {
            "phase": {
                "type": "string",
                "enum": ["Pending", "Running", "Succeeded", "Failed", "Suspended"],
                "description": "Mirrors the run's Job.",
            },
            "observedGeneration": {**integer, "description": "metadata.generation the operator last reconciled."},
            "conditions": {
                "type": "array",
                "items": condition,
                "x-kubernetes-list-type": "map",
                "x-kubernetes-list-map-keys": ["type"],
                "description": "Standard conditions, one per type.",
            },
            "jobName": {"type": "string", "description": "The run's Job."},
            "startTime": {"type": "string", "format": "date-time"},
            "completionTime": {"type": "string", "format": "date-time"},
            "activePods": {**integer},
            "readyPods": {**integer},
            "failedPods": {**integer},
            "succeededPods": {**integer},
            "step": {**integer, "description": "Last completed training step (reported by the job)."},
            "policyVersion": {**integer, "description": "Version of the policy weights the rollouts use."},
            "drift": {**num, "description": "Current drift D(t) = KL(alpha(t) || alpha(0))."},
            "training": {
                "type": "object",
                "x-kubernetes-preserve-unknown-fields": True,
                "description": "Per-axis statistics and losses reported by the job (free-form).",
            },
            "control": {
                "type": "object",
                "description": "Control block of the drift loop; the job applies it at the next step boundary.",
                "properties": {
                    "generation": {**integer, "description": "Incremented on every new control decision."},
                    "acknowledgedGeneration": {**integer, "description": "Last generation the job applied."},
                    "weights": {"type": "array", "items": num, "description": "Axis weights m."},
                    "klCoef": {**num, "minimum": 0, "description": "beta_KL in force."},
                    "epsLow": {**num, "minimum": 0, "description": "epsilon_low in force."},
                    "epsHigh": {**num, "minimum": 0, "description": "epsilon_high in force."},
                    "triggered": {"type": "boolean", "description": "Drift monitor is in its triggered state."},
                    "updatedAt": {"type": "string", "format": "date-time"},
                    "sourceStep": {**integer, "description": "Last training step the decision is based on."},
                    "reportedAt": {"type": "string", "description": "status.training.reportedAt of the report "
                                   "the decision is based on (the job's clock; loop latency starts here)."},
                    "statisticsAt": {"type": "string", "description": "Job-clock time of the oldest step "
                                     "statistics this decision is the first to include (full loop latency starts here)."},
                    "reason": {"type": "string", "description": "Why this generation was written: Trigger, "
                               "Tighten, Release, Relax, Restore (a refused hand-written block), Override."},
                },
            },
            "driftMonitor": {
                "type": "object",
                "x-kubernetes-preserve-unknown-fields": True,
                "description": "State of the operator's drift monitor (spectrum, baseline, D(t), trigger state, last "
                "step fed); kept here so that it survives an operator restart. Written by the operator only.",
            },
            "message": {"type": "string", "description": "Last notable event, for humans."},
        },
    }


def build_crd() -> dict[str, Any]:
    name_rule = {
        "rule": f"self.metadata.name.matches('^[a-z]([-a-z0-9]*[a-z0-9])?$') && size(self.metadata.name) <= {MAX_NAME}",
        "message": f"metadata.name must be a DNS-1035 label of at most {MAX_NAME} characters "
        "(it names the run's Job, Services and pods)",
    }
    openapi = {
        "type": "object",
        "description": "A GPRL training run (General Preference RL) managed by the gprl operator.",
        "required": ["spec"],
        "properties": {
            "apiVersion": {"type": "string"},
            "kind": {"type": "string"},
            "metadata": {"type": "object"},
            "spec": spec_schema(),
            "status": status_schema(),
        },
        "x-kubernetes-validations": [name_rule],
    }
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": CRD_NAME,
            "labels": {"app.kubernetes.io/name": "gprl", "app.kubernetes.io/part-of": "gprl"},
            "annotations": {"gprl.dev/generated-by": "python -m gprl.crd --write (from gprl/config.py)"},
        },
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": KIND,
                "listKind": f"{KIND}List",
                "plural": PLURAL,
                "singular": SINGULAR,
                "shortNames": [SHORT_NAME],
                "categories": ["gprl"],
            },
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": [
                        {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
                        {"name": "Step", "type": "integer", "jsonPath": ".status.step"},
                        {"name": "Drift", "type": "number", "jsonPath": ".status.drift"},
                        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
                    ],
                    "schema": {"openAPIV3Schema": openapi},
                }
            ],
        },
    }


# --------------------------------------------------------------------------------------
# rendering

_HEADER = "# GENERATED by `python -m gprl.crd --write` from gprl/config.py. Do not edit by hand.\n"


class _Dumper(yaml.SafeDumper):
    pass


def _str_presenter(dumper: yaml.SafeDumper, data: str):
    style = "|" if "\n" in data else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", data, style=style)


_Dumper.add_representer(str, _str_presenter)


def render_yaml(crd: dict | None = None) -> str:
    crd = build_crd() if crd is None else crd
    return _HEADER + yaml.dump(crd, Dumper=_Dumper, sort_keys=False, width=120, allow_unicode=True)


def _type_of(node: dict) -> str:
    t = node.get("type", "any")
    if t == "array":
        t = f"[]{_type_of(node.get('items', {}))}"
    if node.get("x-kubernetes-preserve-unknown-fields"):
        t = "object (free-form)"
    return t


def _constraints(node: dict) -> str:
    bits = []
    if "enum" in node:
        bits.append("one of " + ", ".join(f"`{v}`" for v in node["enum"]))
    for key, excl in (("minimum", "exclusiveMinimum"), ("maximum", "exclusiveMaximum")):
        if key in node:
            op = (">" if key == "minimum" else "<") + ("" if node.get(excl) else "=")
            bits.append(f"{op} {node[key]}")
    if "minLength" in node:
        bits.append(f"length >= {node['minLength']}")
    if "minItems" in node:
        bits.append(f"items >= {node['minItems']}")
    if "pattern" in node:
        bits.append(f"pattern `{node['pattern']}`")
    if node.get("nullable"):
        bits.append("optional")
    return "; ".join(bits)


def _fmt_default(node: dict) -> str:
    if "default" not in node or node["default"] == {}:
        return ""
    return "`" + yaml.safe_dump(node["default"], default_flow_style=True, width=10_000).strip().removesuffix("...").strip() + "`"


def _rows(node: dict, prefix: str, out: list[str]) -> None:
    for name, prop in node.get("properties", {}).items():
        path = f"{prefix}{name}"
        desc = " ".join(str(prop.get("description", "")).split()).replace("|", "\\|")
        cons = _constraints(prop).replace("|", "\\|")
        out.append(f"| `{path}` | {_type_of(prop)} | {_fmt_default(prop)} | {cons} | {desc} |")
        if prop.get("type") == "object" and "properties" in prop:
            _rows(prop, f"{path}.", out)


def _rules(node: dict, prefix: str, out: list[str]) -> None:
    for entry in node.get("x-kubernetes-validations", []):
        out.append(f"| `{prefix or '.'}` | `{entry['rule']}` | {entry['message']} |")
    for name, prop in node.get("properties", {}).items():
        _rules(prop, f"{prefix}.{name}" if prefix else name, out)
    if isinstance(node.get("items"), dict):
        _rules(node["items"], f"{prefix}[]", out)


def render_markdown(crd: dict | None = None) -> str:
    crd = build_crd() if crd is None else crd
    version = crd["spec"]["versions"][0]
    schema = version["schema"]["openAPIV3Schema"]
    lines = [
        "<!-- GENERATED by `python -m gprl.crd --write` from gprl/config.py. Do not edit by hand. -->",
        f"# `{KIND}` reference ({GROUP}/{VERSION})",
        "",
        f"Namespaced custom resource; plural `{PLURAL}`, short name `{SHORT_NAME}` "
        f"(`kubectl get {SHORT_NAME}`). The spec holds the same fields as the YAML config of `gprl train` "
        "(camelCase here; the CLI also accepts snake_case). The API server fills in every default, refuses values out "
        "of bounds, unknown enum values and (with `kubectl`'s default strict field validation) unknown fields, and "
        "checks the cross-field rules below.",
        "",
        "Printer columns: " + ", ".join(c["name"] for c in version["additionalPrinterColumns"]) + ".",
        "",
        "## spec",
        "",
        "| field | type | default | constraints | description |",
        "|---|---|---|---|---|",
    ]
    _rows(schema["properties"]["spec"], "spec.", lines)
    lines += [
        "",
        "## Validation rules (CEL)",
        "",
        "Rules with `oldSelf` are checked on updates only: those fields are immutable once the run exists.",
        "",
        "| where | rule | message |",
        "|---|---|---|",
    ]
    _rules(schema, "", lines)
    lines += [
        "",
        "## status",
        "",
        "Written by the operator (`phase`, `conditions`, `observedGeneration`, `control`, pod counts) and by the "
        "job (`step`, `policyVersion`, `drift`, `training`, `control.acknowledgedGeneration`).",
        "",
        "| field | type | default | constraints | description |",
        "|---|---|---|---|---|",
    ]
    _rows(schema["properties"]["status"], "status.", lines)
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------
# files and command

REPO = Path(__file__).resolve().parent.parent
OUTPUTS = {
    "crds/gprlrun.yaml": render_yaml,
    "charts/gprl/crds/gprlrun.yaml": render_yaml,
    "docs/crd-reference.md": render_markdown,
}


def expected_files() -> dict[str, str]:
    crd = build_crd()
    return {path: fn(crd) for path, fn in OUTPUTS.items()}


def write_files(root: Path = REPO) -> list[Path]:
    written = []
    for rel, text in expected_files().items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists() or path.read_text() != text:
            path.write_text(text)
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gprl.crd", description=__doc__.split("\n\n")[0])
    parser.add_argument("--markdown", action="store_true", help="print the CRD reference page instead of the YAML")
    parser.add_argument(
        "--write",
        action="store_true",
        help="write crds/gprlrun.yaml, charts/gprl/crds/gprlrun.yaml and docs/crd-reference.md in the repository",
    )
    args = parser.parse_args(argv)
    if args.write:
        for path in write_files():
            print(path.relative_to(REPO))
        return 0
    sys.stdout.write(render_markdown() if args.markdown else render_yaml())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
