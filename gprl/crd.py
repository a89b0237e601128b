"""The `GPRLRun` CustomResourceDefinition, generated from `gprl.config.RunSpec`.

Never edit `crds/gprlrun.yaml` (or its copy in the Helm chart) by hand: run

    python -m gprl.crd --write          # crds/gprlrun.yaml, charts/gprl/crds/gprlrun.yaml, docs/crd-reference.md,
                                        # charts/gprl/templates/trainer-status-policy.yaml
    python -m gprl.crd                  # the CRD YAML on stdout
    python -m gprl.crd --markdown       # the reference page on stdout

A test fails when the committed files differ from what this module generates.
No Kubernetes import here: the CRD is plain data. Its sources, all in `gprl.api` and `gprl.config`: the run
config's fields and their change marks (-> schema, transition rules, the resume check), the cluster rules of a
manifest (`gprl.api.manifest.RULES`), the typed status and who writes each of its fields (`gprl.api.status`).
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path
from typing import Any

import yaml

from gprl.api.manifest import RULES
from gprl.api.marks import CHANGE_KEY, Change, leaf_changes
from gprl.api.status import WRITER_KEY, RunStatus, operator_fields, trainer_fields
from gprl.config import RunSpec
from gprl.api.pods import PVC_CEL, SOURCE_CEL

__all__ = [
    "GROUP",
    "VERSION",
    "KIND",
    "PLURAL",
    "SHORT_NAME",
    "TRAINER_SUFFIX",
    "build_crd",
    "trainer_status_policy",
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

# The run's ServiceAccount is `<run>-trainer` (gprl_operator.children.names); the status policy keys on it.
TRAINER_SUFFIX = "-trainer"
# The chart names it per release (two releases, e.g. one per team namespace, must not share cluster-scoped names):
# the generated template carries the Helm expression, the docs the pattern it renders to.
POLICY_NAME = "<release>-operator-<namespace>-trainer-status"
POLICY_TEMPLATE_NAME = '{{ include "gprl.clusterName" . }}-trainer-status'

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
    "maxProperties",
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
    "x-kubernetes-int-or-string",
}
_FACTS = {CHANGE_KEY, WRITER_KEY}  # facts about a field that live on the pydantic field, not in the CRD


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
        if key in _DROP or key in _FACTS:
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
    if out.get("additionalProperties") is True:  # a free-form mapping
        del out["additionalProperties"]
        out["x-kubernetes-preserve-unknown-fields"] = True
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
    _rule(
        _at(schema, "algo"),
        "!has(self.axisSpreadFloor) || self.axisSpreadFloor == 0.0 || !has(self.normalization) "
        "|| self.normalization == 'per_axis'",
        "algo.axisSpreadFloor applies to normalization: per_axis only",
        field_path=".axisSpreadFloor",
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
    _transition_rules(schema)
    for rule in RULES:
        if rule.where.startswith("spec."):
            _rule(_at(schema, rule.where.removeprefix("spec.")), rule.cel, rule.message, rule.field_path)
    # model / data sources: hf://<org>/<name>[@rev] (downloaded by an init container) or pvc://<claim>/<path>
    for path in ("model.policy", "model.reference", "gpm.path", "data.prompts"):
        node = _at(schema, path)
        node.setdefault("maxLength", 1024)
        _rule(node, SOURCE_CEL, f"spec.{path}: a hub source is hf://<org>/<name>[@<revision>] "
              "(hf://datasets/<org>/<name> for a dataset)")
        _rule(node, PVC_CEL, f"spec.{path}: a volume source is pvc://<claim>/<path inside the claim> (a "
              "PersistentVolumeClaim name of at most 63 characters; no '..')")
    return schema


def _unchanged(path: str) -> str:
    """CEL: the field at `path` (dotted, from the object the rule sits on) is set in both or neither, and equal."""
    new, old = f"self.{path}", f"oldSelf.{path}"
    return f"(has({new}) == has({old}) && (!has({new}) || {new} == {old}))"


def _prefixes(parent: str) -> list[str]:
    parts = parent.split(".") if parent else []
    return [".".join(parts[: i + 1]) for i in range(len(parts))]


IMMUTABLE = "is immutable"
IMMUTABLE_WHY = "delete and re-create the GPRLRun to change it (a run resumes from its checkpoints only with the same value)"
RESTART = "is read when the trainer starts"
RESTART_WHY = "set spec.suspend: true first, then change it; the pods started on resume use the new value"
IMMUTABLE_MESSAGE = f"{{field}} {IMMUTABLE}: {IMMUTABLE_WHY}"
RESTART_MESSAGE = f"{{field}} {RESTART}: {RESTART_WHY}"


def _transition_rules(schema: dict) -> None:
    """The change marks (gprl.api.marks) as ONE CEL transition rule on spec (checked on updates only).

    immutable: the field may never change; setting an unset optional field counts as a change.
    restart-required: a change passes only when the stored run is suspended, so that every pod started on resume
    reads the new value.

    One rule, not one per field, because the API server evaluates every transition rule on every update of a run,
    its status writes included (rules with oldSelf are never ratcheted), and each field access copies the schema
    node's property table: 181 per-field rules cost ~20 ms of API-server CPU per status write, 2/3 of the write
    (BENCHMARKS.md, "Operator at scale"). `self == oldSelf` first: a status write or a metadata patch leaves the
    spec as it was and skips the rest. The message names every field that may not change (messageExpression).
    """
    checks: list[tuple[str, str]] = []  # (CEL: the field's change is allowed, message if not)
    restart: list[tuple[str, str]] = []
    for path, mark in leaf_changes(RunSpec, camel=True):
        parent = path.rpartition(".")[0]
        # a field is compared where its parent exists in both objects (as a rule placed on the parent would be)
        guards = [f"has(self.{p}) && has(oldSelf.{p})" for p in _prefixes(parent)]
        cond = f"(!({' && '.join(guards)}) || {_unchanged(path)})" if guards else _unchanged(path)
        if mark is Change.IMMUTABLE:
            checks.append((cond, f"spec.{path} {IMMUTABLE}"))
        elif mark is Change.RESTART:
            restart.append((cond, f"spec.{path} {RESTART}"))
    suspended = "(has(oldSelf.suspend) && oldSelf.suspend)"
    allowed = " && ".join(c for c, _ in checks) + f" && ({suspended} || ({' && '.join(c for c, _ in restart)}))"
    # one sentence per refused field, concatenated (a list joined would be estimated at too high a cost)
    refusals = [f"({c} ? '' : '{m}: {IMMUTABLE_WHY}. ')" for c, m in checks]
    refusals += [f"({suspended} || {c} ? '' : '{m}: {RESTART_WHY}. ')" for c, m in restart]
    schema.setdefault("x-kubernetes-validations", []).append({
        "rule": f"self == oldSelf || ({allowed})",
        "message": "a field of spec changed that may not change now: see the change marks in docs/crd-reference.md",
        "messageExpression": " + ".join(refusals),
        "reason": "FieldValueForbidden",
    })


def _strip_defaults(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: _strip_defaults(v) for k, v in node.items() if k != "default"}
    if isinstance(node, list):
        return [_strip_defaults(v) for v in node]
    return node


def status_schema() -> dict[str, Any]:
    """`status`, from gprl.api.status.RunStatus. No defaults: the API server would show them as if written."""
    raw = RunStatus.model_json_schema(by_alias=True)
    defs = raw.pop("$defs", {})
    schema = _strip_defaults(_convert(raw, defs))
    schema["description"] = (
        f"Observed state. The run's own ServiceAccount may write only {', '.join(trainer_fields())} (the admission "
        f"policy {POLICY_NAME} enforces it); every other field is the operator's."
    )
    return schema


def trainer_status_policy(name: str = POLICY_TEMPLATE_NAME) -> list[dict[str, Any]]:
    """A ValidatingAdmissionPolicy (evaluated by the API server itself, no webhook) and its binding: a run's own
    ServiceAccount (`<run>-trainer`) may change only the status fields marked `trainer` in gprl.api.status.
    `name` is the chart's per-release template by default; a concrete name applies the pair as they are.

    RBAC cannot grant single fields of a subresource; this policy narrows the Role's `patch gprlruns/status`
    to the trainer's fields. (A separate object for the trainer's reports would cost a second watch per run.)
    """
    checks = []
    for f in operator_fields():
        new, old = f"object.status.{f}", f"oldObject.status.{f}"
        has_new, has_old = f"(has(object.status) && has({new}))", f"(has(oldObject.status) && has({old}))"
        checks.append({
            "expression": f"{has_new} == {has_old} && (!{has_new} || {new} == {old})",
            "message": f"status.{f} is written by the gprl operator only; a run's ServiceAccount may write "
                       f"status.{{{','.join(trainer_fields())}}}",
            "reason": "Forbidden",
        })
    labels = {"app.kubernetes.io/name": "gprl", "app.kubernetes.io/part-of": "gprl"}
    policy = {
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "ValidatingAdmissionPolicy",
        "metadata": {"name": name, "labels": labels},
        "spec": {
            "failurePolicy": "Fail",
            "matchConstraints": {"resourceRules": [{
                "apiGroups": [GROUP], "apiVersions": ["*"], "operations": ["UPDATE"], "resources": [f"{PLURAL}/status"],
            }]},
            "matchConditions": [{
                "name": "run-service-account",
                "expression": "request.userInfo.username == 'system:serviceaccount:' + object.metadata.namespace "
                              f"+ ':' + object.metadata.name + '{TRAINER_SUFFIX}'",
            }],
            "validations": checks,
        },
    }
    binding = {
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "ValidatingAdmissionPolicyBinding",
        "metadata": {"name": name, "labels": labels},
        "spec": {"policyName": name, "validationActions": ["Deny"]},
    }
    return [policy, binding]


def build_crd() -> dict[str, Any]:
    root_rules = [{"rule": r.cel, "message": r.message, **({"fieldPath": r.field_path} if r.field_path else {})}
                  for r in RULES if r.where == ""]
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
        "x-kubernetes-validations": root_rules,
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
                        # a broken run and a waiting one both say Pending: Ready and its reason tell them apart
                        {"name": "Ready", "type": "string",
                         "jsonPath": '.status.conditions[?(@.type=="Ready")].status'},
                        {"name": "Reason", "type": "string",
                         "jsonPath": '.status.conditions[?(@.type=="Ready")].reason'},
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


def _rows(node: dict, prefix: str, out: list[str], facts: dict[str, str]) -> None:
    """One table row per field; `facts` (dotted path -> text) fills the extra column: change mark or writer."""
    for name, prop in node.get("properties", {}).items():
        path = f"{prefix}{name}"
        desc = " ".join(str(prop.get("description", "")).split()).replace("|", "\\|")
        cons = _constraints(prop).replace("|", "\\|")
        nested = prop.get("type") == "object" and "properties" in prop
        fact = "" if nested and path not in facts else facts.get(path, "")
        out.append(f"| `{path}` | {_type_of(prop)} | {_fmt_default(prop)} | {fact} | {cons} | {desc} |")
        if nested:
            _rows(prop, f"{path}.", out, facts)


def _writers(model: Any, prefix: str, writer: str | None, out: dict[str, str]) -> dict[str, str]:
    from pydantic import BaseModel

    for name, field in model.model_fields.items():
        extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
        who = extra.get(WRITER_KEY, writer)
        path = f"{prefix}{field.alias or name}"
        out[path] = who or ""
        ann = field.annotation
        inner = [a for a in getattr(ann, "__args__", ()) if isinstance(a, type) and issubclass(a, BaseModel)]
        sub = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else (inner[0] if inner else None)
        if sub is not None:
            _writers(sub, f"{path}.", who, out)
    return out


def _rules(node: dict, prefix: str, out: list[str]) -> None:
    for entry in node.get("x-kubernetes-validations", []):
        if "messageExpression" in entry:  # the change marks' one rule: a field by field summary reads better
            out.append(f"| `{prefix or '.'}` | `self == oldSelf \\|\\| (…)`: every field's change mark above, in one "
                       f"rule | {IMMUTABLE_MESSAGE.format(field='spec.<field>')} / "
                       f"{RESTART_MESSAGE.format(field='spec.<field>')} |")
            continue
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
        "(camelCase here; a local config file may also use snake_case, a manifest may not: the API server knows only the camelCase names). The API server fills in every default, refuses values out "
        "of bounds, unknown enum values and (with `kubectl`'s default strict field validation) unknown fields, and "
        "checks the cross-field rules below.",
        "",
        "Printer columns: " + ", ".join(c["name"] for c in version["additionalPrinterColumns"]) + ".",
        "",
        "## What may change on a live run",
        "",
        "Each field is marked once, in gprl/config.py, and the marks make the CEL transition rules below and the "
        "trainer's resume check:",
        "",
        "- **immutable**: fixed for the run's life; the API server refuses a change. Outside `resources` and "
        "`output`, a checkpoint is resumed only with the same value (`gprl train` refuses otherwise).",
        "- **restart-required**: read when the trainer starts. The API server accepts a change only while the run "
        "is suspended (`spec.suspend: true` stored first); the pods started on resume all use the new value. A "
        "local resume may change it.",
        "- **mutable**: takes effect on a live run (`suspend`).",
        "",
        "Resume check (fields a checkpoint must agree on): "
        + ", ".join(f"`{p}`" for p in _resume_camel()) + ".",
        "",
        "## spec",
        "",
        "| field | type | default | change | constraints | description |",
        "|---|---|---|---|---|---|",
    ]
    marks = {f"spec.{p}": m.value for p, m in leaf_changes(RunSpec, camel=True)}
    marks["spec.suspend"] = Change.MUTABLE.value
    _rows(schema["properties"]["spec"], "spec.", lines, marks)
    lines += [
        "",
        "## Validation rules (CEL)",
        "",
        "Rules with `oldSelf` are checked on updates only (the change marks above). The rules on the whole object "
        "and on `output` hold on Kubernetes only; `gprl config` checks them too when given a GPRLRun manifest.",
        "",
        "| where | rule | message |",
        "|---|---|---|",
    ]
    _rules(schema, "", lines)
    lines += [
        "",
        "## status",
        "",
        f"The writer column says who may write each field. The run's own ServiceAccount may write only "
        f"{', '.join(f'`{f}`' for f in trainer_fields())}: the ValidatingAdmissionPolicy `{POLICY_NAME}` (in the "
        "Helm chart, generated with this page) refuses its changes to any other field.",
        "",
        "| field | type | default | writer | constraints | description |",
        "|---|---|---|---|---|---|",
    ]
    _rows(schema["properties"]["status"], "status.", lines, _writers(RunStatus, "status.", None, {}))
    return "\n".join(lines) + "\n"


def _resume_camel() -> list[str]:
    from gprl.api.marks import resume_exempt

    return [p for p, m in leaf_changes(RunSpec, camel=True) if m is Change.IMMUTABLE and not resume_exempt(p)]


# watchNamespaces mode: the binding covers the release's namespaces only (another release serves the others)
_BINDING_SCOPE = """\
  {{- with .Values.watchNamespaces }}
  matchResources:
    namespaceSelector:
      matchExpressions:
        - key: kubernetes.io/metadata.name
          operator: In
          values: {{ toJson . }}
  {{- end }}
"""


def render_policy(crd: dict | None = None) -> str:
    header = "# GENERATED by `python -m gprl.crd --write` from gprl/api/status.py. Do not edit by hand.\n"
    policy, binding = trainer_status_policy()
    dump = lambda d: yaml.dump(d, Dumper=_Dumper, sort_keys=False, width=120)  # noqa: E731
    binding_text = dump(binding)
    assert binding_text.rstrip().endswith("- Deny"), "the binding's spec must come last for the scope lines"
    return header + dump(policy) + "---\n" + binding_text + _BINDING_SCOPE


# --------------------------------------------------------------------------------------
# files and command

REPO = Path(__file__).resolve().parent.parent
OUTPUTS = {
    "crds/gprlrun.yaml": render_yaml,
    "charts/gprl/crds/gprlrun.yaml": render_yaml,
    "docs/crd-reference.md": render_markdown,
    "charts/gprl/templates/trainer-status-policy.yaml": render_policy,
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
        help="write crds/gprlrun.yaml, charts/gprl/crds/gprlrun.yaml, docs/crd-reference.md and "
        "charts/gprl/templates/trainer-status-policy.yaml in the repository",
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
