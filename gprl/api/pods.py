"""The Kubernetes shapes a run may add to its pods: per-role pod overrides and the model cache.

Typed (pydantic, camelCase like the Kubernetes API), so that the CRD generated from `gprl.config.RunSpec` carries
them and the API server validates them: a subset of the core/v1 Pod fields, with the same names and shapes, minus
everything that would let a run get more than its creator may (hostPath volumes, Secret volumes, secretKeyRef env,
securityContext, host namespaces, `system-` priority classes, the operator's own labels, volumes, mounts and env).
The refused fields are kept in the schema on purpose, as opaque objects with a CEL rule, so the API server refuses
them with a message naming the field (instead of silently pruning them when a client does not ask for strict field
validation).

Model sources (`hf://` and `pvc://` in `model.policy`, `model.reference`, `gpm.path`, `data.prompts`) are parsed by
`parse_source`; the operator turns them into an init container and read-only mounts (gprl_operator.children).
"""

from __future__ import annotations

import posixpath
import re
from dataclasses import dataclass
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic.alias_generators import to_camel

__all__ = [
    "Affinity",
    "EnvVar",
    "ModelCacheSpec",
    "PodOverrides",
    "RolePods",
    "Source",
    "Toleration",
    "Volume",
    "VolumeMount",
    "parse_source",
    "RESERVED_MOUNT_PATHS",
    "RESERVED_VOLUME_NAMES",
    "MODELS_ROOT",
]

DNS_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
DNS_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
# a qualified name (label / annotation key): optional DNS-subdomain prefix, a name of <= 63 characters
QUALIFIED_NAME = r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$"
LABEL_VALUE = r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$"
ENV_NAME = r"^[-._a-zA-Z][-._a-zA-Z0-9]*$"

# Where the operator mounts model sources: PVC sources at /models/pvc/<claim>, the hub cache at /models/hub.
MODELS_ROOT = "/models"
# The operator's own volumes and mount points (gprl_operator.children); a run's extra volumes may not reuse them.
RESERVED_VOLUME_NAMES = ("config", "tmp", "home", "dshm", "checkpoints", "server-token")
RESERVED_VOLUME_PREFIX = "gprl-"
RESERVED_MOUNT_PATHS = ("/etc/gprl", "/etc/gprl-token", "/tmp", "/home/gprl", "/dev/shm", "/workspace", MODELS_ROOT)
# Env the operator sets (identity of the run and of the rank); a run's extra env may not override it.
RESERVED_ENV = ("HOME", "HF_HOME", "HF_HUB_OFFLINE", "TMPDIR", "POD_NAME", "RANK", "LOCAL_RANK", "WORLD_SIZE",
                "LOCAL_WORLD_SIZE", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT", "CUDA_VISIBLE_DEVICES")
RESERVED_ENV_PREFIXES = ("GPRL_", "PET_", "TORCHELASTIC_")
# Label keys of the operator (selectors and ownership); annotation prefixes that loosen the sandbox.
RESERVED_LABEL_PREFIXES = ("app.kubernetes.io/", "gprl.dev/")
REFUSED_ANNOTATION_PREFIXES = ("container.apparmor.security.beta.kubernetes.io/", "seccomp.security.alpha.kubernetes.io/",
                               "batch.kubernetes.io/")


def _cel_list(items: tuple[str, ...]) -> str:
    return "[" + ", ".join(f"'{i}'" for i in items) + "]"


def _rule(rule: str, message: str, field_path: str | None = None) -> dict[str, str]:
    out = {"rule": rule, "message": message}
    if field_path:
        out["fieldPath"] = field_path
    return out


def _cel(*rules: dict) -> ConfigDict:
    return ConfigDict(json_schema_extra={"x-kubernetes-validations": list(rules)})


def _opaque(schema: dict[str, Any]) -> None:
    """A refused field: any object is *stored* (so the CEL rule beside it can refuse it by name)."""
    schema.clear()
    schema.update({"type": "object", "x-kubernetes-preserve-unknown-fields": True})


def _refused(what: str) -> Any:
    return Field(None, description=f"Refused: {what}.", json_schema_extra=_opaque)


class _K8s(BaseModel):
    # strict and finite, like gprl.config._Spec: no "8" as a number, no booleans as counts, no NaN
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid", validate_assignment=True,
                              strict=True, allow_inf_nan=False)

    def manifest(self) -> dict[str, Any]:
        """The object as the Kubernetes API spells it (camelCase, unset fields left out)."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True, exclude_defaults=True)


def _no_refused(model: BaseModel, fields: dict[str, str]) -> None:
    for name, hint in fields.items():
        if getattr(model, name) is not None:
            raise ValueError(f"{to_camel(name)} is not allowed: {hint}")


# --------------------------------------------------------------------------------------
# scheduling


class Toleration(_K8s):
    key: Optional[str] = Field(None, max_length=316, pattern=QUALIFIED_NAME, description="Taint key (empty with "
                               "operator Exists: every taint).")
    operator: Optional[Literal["Exists", "Equal"]] = Field(None, description="Exists or Equal (default Equal).")
    value: Optional[str] = Field(None, max_length=63, description="Taint value (operator Equal).")
    effect: Optional[Literal["NoSchedule", "PreferNoSchedule", "NoExecute"]] = Field(None, description="Taint effect "
                                                                                     "to tolerate (empty: all).")
    toleration_seconds: Optional[int] = Field(None, ge=0, le=2**31 - 1, description="NoExecute: how long the pod "
                                              "stays bound after the taint appears.")


class LabelSelectorRequirement(_K8s):
    key: str = Field(..., min_length=1, max_length=316)
    operator: Literal["In", "NotIn", "Exists", "DoesNotExist"]
    values: list[str] = Field(default_factory=list, max_length=64)


class LabelSelector(_K8s):
    match_labels: dict[str, str] = Field(default_factory=dict, max_length=32)
    match_expressions: list[LabelSelectorRequirement] = Field(default_factory=list, max_length=16)


class NodeSelectorRequirement(_K8s):
    key: str = Field(..., min_length=1, max_length=316)
    operator: Literal["In", "NotIn", "Exists", "DoesNotExist", "Gt", "Lt"]
    values: list[str] = Field(default_factory=list, max_length=64)


class NodeSelectorTerm(_K8s):
    match_expressions: list[NodeSelectorRequirement] = Field(default_factory=list, max_length=16)
    match_fields: list[NodeSelectorRequirement] = Field(default_factory=list, max_length=16)


class NodeSelector(_K8s):
    node_selector_terms: list[NodeSelectorTerm] = Field(..., min_length=1, max_length=16)


class PreferredSchedulingTerm(_K8s):
    weight: int = Field(..., ge=1, le=100)
    preference: NodeSelectorTerm


class NodeAffinity(_K8s):
    required_during_scheduling_ignored_during_execution: Optional[NodeSelector] = None
    preferred_during_scheduling_ignored_during_execution: list[PreferredSchedulingTerm] = Field(
        default_factory=list, max_length=16)


class PodAffinityTerm(_K8s):
    label_selector: Optional[LabelSelector] = None
    namespaces: list[str] = Field(default_factory=list, max_length=16)
    namespace_selector: Optional[LabelSelector] = None
    topology_key: str = Field(..., min_length=1, max_length=316, description="Node label grouping the nodes, e.g. "
                              "kubernetes.io/hostname or topology.kubernetes.io/zone.")
    match_label_keys: list[str] = Field(default_factory=list, max_length=16)
    mismatch_label_keys: list[str] = Field(default_factory=list, max_length=16)


class WeightedPodAffinityTerm(_K8s):
    weight: int = Field(..., ge=1, le=100)
    pod_affinity_term: PodAffinityTerm


class PodAffinity(_K8s):
    required_during_scheduling_ignored_during_execution: list[PodAffinityTerm] = Field(default_factory=list,
                                                                                       max_length=16)
    preferred_during_scheduling_ignored_during_execution: list[WeightedPodAffinityTerm] = Field(
        default_factory=list, max_length=16)


class Affinity(_K8s):
    """core/v1 Affinity."""

    node_affinity: Optional[NodeAffinity] = None
    pod_affinity: Optional[PodAffinity] = None
    pod_anti_affinity: Optional[PodAffinity] = None


# --------------------------------------------------------------------------------------
# env, volumes, mounts


class ConfigMapKeySelector(_K8s):
    name: str = Field(..., min_length=1, max_length=253, pattern=DNS_SUBDOMAIN)
    key: str = Field(..., min_length=1, max_length=253)
    optional: Optional[bool] = None


class FieldSelector(_K8s):
    field_path: str = Field(..., min_length=1, max_length=256, description="e.g. metadata.name, status.podIP")
    api_version: Optional[str] = None


class ResourceFieldSelector(_K8s):
    resource: str = Field(..., min_length=1, max_length=64, description="e.g. limits.memory")
    container_name: Optional[str] = None
    divisor: Optional[str] = Field(None, max_length=32)


_SECRET_ENV_HINT = "a run reads Secrets only through resources.envFromSecrets (Secrets an admin marked usable by runs)"


class EnvVarSource(_K8s):
    model_config = _cel(_rule("!has(self.secretKeyRef)", f"secretKeyRef is not allowed: {_SECRET_ENV_HINT}"))

    config_map_key_ref: Optional[ConfigMapKeySelector] = None
    field_ref: Optional[FieldSelector] = None
    resource_field_ref: Optional[ResourceFieldSelector] = None
    secret_key_ref: Optional[Any] = _refused(_SECRET_ENV_HINT)

    @model_validator(mode="after")
    def _checks(self) -> "EnvVarSource":
        _no_refused(self, {"secret_key_ref": _SECRET_ENV_HINT})
        return self


_ENV_RESERVED_RULE = (f"!(self.name in {_cel_list(RESERVED_ENV)}) && "
                      + " && ".join(f"!self.name.startsWith('{p}')" for p in RESERVED_ENV_PREFIXES))
_ENV_RESERVED_MSG = ("env name is set by the operator (the run's identity and rank wiring): "
                     f"{', '.join(RESERVED_ENV)} and the prefixes {', '.join(RESERVED_ENV_PREFIXES)} are reserved")


class EnvVar(_K8s):
    model_config = _cel(_rule(_ENV_RESERVED_RULE, _ENV_RESERVED_MSG, ".name"),
                        _rule("!(has(self.value) && has(self.valueFrom))", "env: set value or valueFrom, not both"))

    name: str = Field(..., min_length=1, max_length=256, pattern=ENV_NAME)
    value: Optional[str] = Field(None, max_length=32768)
    value_from: Optional[EnvVarSource] = None

    @model_validator(mode="after")
    def _checks(self) -> "EnvVar":
        if self.name in RESERVED_ENV or self.name.startswith(RESERVED_ENV_PREFIXES):
            raise ValueError(f"{self.name}: {_ENV_RESERVED_MSG}")
        if self.value is not None and self.value_from is not None:
            raise ValueError("env: set value or valueFrom, not both")
        return self


class KeyToPath(_K8s):
    key: str = Field(..., min_length=1, max_length=253)
    path: str = Field(..., min_length=1, max_length=1024)
    mode: Optional[int] = Field(None, ge=0, le=0o777)


class ConfigMapVolumeSource(_K8s):
    name: str = Field(..., min_length=1, max_length=253, pattern=DNS_SUBDOMAIN)
    items: list[KeyToPath] = Field(default_factory=list, max_length=64)
    default_mode: Optional[int] = Field(None, ge=0, le=0o777)
    optional: Optional[bool] = None


class EmptyDirVolumeSource(_K8s):
    medium: Optional[Literal["", "Memory"]] = None
    size_limit: Optional[str] = Field(None, pattern=r"^[0-9]+(\.[0-9]+)?(Ki|Mi|Gi|Ti|K|M|G|T)?$")


class PVCVolumeSource(_K8s):
    claim_name: str = Field(..., min_length=1, max_length=253, pattern=DNS_SUBDOMAIN)
    read_only: Optional[bool] = None


_HOSTPATH_HINT = "it exposes the node's filesystem; use a PersistentVolumeClaim"
_SECRET_VOL_HINT = _SECRET_ENV_HINT
_VOLUME_SOURCES = ("emptyDir", "configMap", "persistentVolumeClaim")


class Volume(_K8s):
    """One extra volume: emptyDir, configMap or persistentVolumeClaim (hostPath and Secret volumes are refused)."""

    model_config = _cel(
        _rule("!has(self.hostPath)", f"hostPath volumes are not allowed: {_HOSTPATH_HINT}", ".hostPath"),
        _rule("!has(self.secret)", f"secret volumes are not allowed: {_SECRET_VOL_HINT}", ".secret"),
        _rule(" + ".join(f"(has(self.{s}) ? 1 : 0)" for s in _VOLUME_SOURCES) + " == 1",
              f"a volume needs exactly one of {', '.join(_VOLUME_SOURCES)}"),
        _rule(f"!(self.name in {_cel_list(RESERVED_VOLUME_NAMES)}) && !self.name.startsWith('{RESERVED_VOLUME_PREFIX}')",
              f"volume name is the operator's: {', '.join(RESERVED_VOLUME_NAMES)} and the prefix "
              f"{RESERVED_VOLUME_PREFIX} are reserved", ".name"),
    )

    name: str = Field(..., min_length=1, max_length=63, pattern=DNS_LABEL)
    empty_dir: Optional[EmptyDirVolumeSource] = None
    config_map: Optional[ConfigMapVolumeSource] = None
    persistent_volume_claim: Optional[PVCVolumeSource] = None
    host_path: Optional[Any] = _refused(_HOSTPATH_HINT)
    secret: Optional[Any] = _refused(_SECRET_VOL_HINT)

    @model_validator(mode="after")
    def _checks(self) -> "Volume":
        _no_refused(self, {"host_path": _HOSTPATH_HINT, "secret": _SECRET_VOL_HINT})
        if sum(x is not None for x in (self.empty_dir, self.config_map, self.persistent_volume_claim)) != 1:
            raise ValueError(f"volume {self.name}: needs exactly one of {', '.join(_VOLUME_SOURCES)}")
        if self.name in RESERVED_VOLUME_NAMES or self.name.startswith(RESERVED_VOLUME_PREFIX):
            raise ValueError(f"volume name {self.name!r} is the operator's; pick another")
        return self


_MOUNT_RULE = (f"!{_cel_list(RESERVED_MOUNT_PATHS)}.exists(p, self.mountPath == p || self.mountPath.startsWith(p + '/')"
               " || p.startsWith(self.mountPath + '/')) && self.mountPath != '/'")
_MOUNT_MSG = (f"mountPath collides with the operator's mounts ({', '.join(RESERVED_MOUNT_PATHS)}, their parents "
              "and children); mount elsewhere, e.g. under /data or /mnt")


class VolumeMount(_K8s):
    model_config = _cel(
        _rule(_MOUNT_RULE, _MOUNT_MSG, ".mountPath"),
        _rule("self.mountPath.startsWith('/') && !self.mountPath.contains('..')",
              "mountPath must be absolute and must not contain '..'", ".mountPath"),
        _rule("!has(self.subPath) || (!self.subPath.startsWith('/') && !self.subPath.contains('..'))",
              "subPath must be relative and must not contain '..'", ".subPath"),
    )

    name: str = Field(..., min_length=1, max_length=63, pattern=DNS_LABEL, description="One of the volumes' names.")
    mount_path: str = Field(..., min_length=1, max_length=1024)
    sub_path: Optional[str] = Field(None, max_length=1024)
    read_only: Optional[bool] = None

    @model_validator(mode="after")
    def _checks(self) -> "VolumeMount":
        p = self.mount_path
        if not p.startswith("/") or ".." in p:
            raise ValueError(f"mountPath {p!r} must be absolute and must not contain '..'")
        if p == "/" or any(p == r or p.startswith(r + "/") or r.startswith(p + "/") for r in RESERVED_MOUNT_PATHS):
            raise ValueError(f"mountPath {p!r}: {_MOUNT_MSG}")
        if self.sub_path is not None and (self.sub_path.startswith("/") or ".." in self.sub_path):
            raise ValueError(f"subPath {self.sub_path!r} must be relative and must not contain '..'")
        return self


# --------------------------------------------------------------------------------------
# pod overrides

_PRIV_HINT = "the operator sets the pod's security context (non-root, no privilege escalation, all capabilities " \
             "dropped); ask the cluster admin if a run needs more"
_HOST_HINT = "host namespaces are not available to runs"
_CPU = r"^[0-9]+(\.[0-9]+)?m?$"
_MEMORY = r"^[0-9]+(\.[0-9]+)?(Ki|Mi|Gi|Ti|Pi|K|M|G|T|P)?$"
_LABEL_KEYS_RULE = ("self.all(k, " + " && ".join(f"!k.startsWith('{p}')" for p in RESERVED_LABEL_PREFIXES) + ")")
_ANNOT_KEYS_RULE = ("self.all(k, " + " && ".join(f"!k.startsWith('{p}')" for p in REFUSED_ANNOTATION_PREFIXES) + ")")


class PodOverrides(_K8s):
    """What a run adds to a role's pods (core/v1 Pod field names). Lists are appended to the operator's, maps merged;
    a role's own block is applied after `all`."""

    model_config = _cel(
        _rule("!has(self.securityContext)", f"securityContext is not allowed: {_PRIV_HINT}", ".securityContext"),
        _rule("!has(self.privileged)", f"privileged is not allowed: {_PRIV_HINT}", ".privileged"),
        _rule("!has(self.hostNetwork) && !has(self.hostPID) && !has(self.hostIPC)",
              f"hostNetwork/hostPID/hostIPC are not allowed: {_HOST_HINT}"),
        _rule("!has(self.volumes) || self.volumes.all(v, self.volumes.exists_one(w, w.name == v.name))",
              "volume names must be unique", ".volumes"),
    )

    labels: dict[str, str] = Field(
        default_factory=dict, max_length=32,
        description="Extra pod labels (not app.kubernetes.io/* or gprl.dev/*, which the operator's selectors use).",
        json_schema_extra={"x-kubernetes-validations": [_rule(
            _LABEL_KEYS_RULE, f"label keys with the prefixes {', '.join(RESERVED_LABEL_PREFIXES)} are the operator's")]},
    )
    annotations: dict[str, str] = Field(
        default_factory=dict, max_length=64, description="Extra pod annotations (not AppArmor / seccomp ones).",
        json_schema_extra={"x-kubernetes-validations": [_rule(
            _ANNOT_KEYS_RULE, "annotations that loosen the pod's sandbox (AppArmor, seccomp) or the Job's bookkeeping "
            f"are not allowed: {', '.join(REFUSED_ANNOTATION_PREFIXES)}")]},
    )
    node_selector: dict[str, str] = Field(default_factory=dict, max_length=32, description="Node labels the pods "
                                          "must match (merged with resources.nodeSelector).")
    tolerations: list[Toleration] = Field(default_factory=list, max_length=32, description="Taints the pods "
                                          "tolerate (added to the operator's nvidia.com/gpu toleration).")
    affinity: Optional[Affinity] = Field(None, description="Node affinity and pod (anti-)affinity (core/v1 Affinity).")
    priority_class_name: Optional[str] = Field(
        None, max_length=253, pattern=DNS_SUBDOMAIN, description="PriorityClass of the pods (not system-*).",
        json_schema_extra={"x-kubernetes-validations": [_rule(
            "!self.startsWith('system-')", "system-* priority classes are reserved for the cluster's own components")]},
    )
    image_pull_secrets: list[str] = Field(default_factory=list, max_length=8, description="Names of Secrets "
                                          "(docker-registry) used to pull the image.")
    env: list[EnvVar] = Field(default_factory=list, max_length=128, description="Extra environment variables of "
                              "the main container.")
    volumes: list[Volume] = Field(default_factory=list, max_length=32, description="Extra volumes (emptyDir, "
                                  "configMap, persistentVolumeClaim).")
    volume_mounts: list[VolumeMount] = Field(default_factory=list, max_length=64, description="Mounts of the "
                                             "volumes in the main container.")
    gpus: Optional[int] = Field(None, ge=0, le=16, description="nvidia.com/gpu per pod of this role (default "
                                "resources.gpus), e.g. fewer for the GPM servers than for the learner.")
    cpu: Optional[str] = Field(None, max_length=32, pattern=_CPU, description="CPU request per pod of this role "
                               "(default resources.cpu).")
    memory: Optional[str] = Field(None, max_length=32, pattern=_MEMORY, description="Memory per pod of this role "
                                  "(default resources.memory).")
    security_context: Optional[Any] = _refused(_PRIV_HINT)
    privileged: Optional[Any] = _refused(_PRIV_HINT)
    host_network: Optional[Any] = _refused(_HOST_HINT)
    host_pid: Optional[Any] = Field(None, alias="hostPID", description=f"Refused: {_HOST_HINT}.",
                                    json_schema_extra=_opaque)
    host_ipc: Optional[Any] = Field(None, alias="hostIPC", description=f"Refused: {_HOST_HINT}.",
                                    json_schema_extra=_opaque)

    @field_validator("labels")
    @classmethod
    def _labels(cls, v: dict[str, str]) -> dict[str, str]:
        for k, val in v.items():
            if not re.match(QUALIFIED_NAME, k) or len(k) > 316:
                raise ValueError(f"label key {k!r} is not a valid qualified name")
            if k.startswith(RESERVED_LABEL_PREFIXES):
                raise ValueError(f"label key {k!r}: the prefixes {', '.join(RESERVED_LABEL_PREFIXES)} are the operator's")
            if len(val) > 63 or not re.match(LABEL_VALUE, val):
                raise ValueError(f"label {k}: value {val!r} is not a valid label value (<= 63 characters)")
        return v

    @field_validator("annotations")
    @classmethod
    def _annotations(cls, v: dict[str, str]) -> dict[str, str]:
        for k in v:
            if k.startswith(REFUSED_ANNOTATION_PREFIXES):
                raise ValueError(f"annotation {k!r} is not allowed (it loosens the pod's sandbox or the Job's bookkeeping)")
        return v

    @field_validator("priority_class_name")
    @classmethod
    def _priority(cls, v: Optional[str]) -> Optional[str]:
        if v is not None and v.startswith("system-"):
            raise ValueError("system-* priority classes are reserved for the cluster's own components")
        return v

    @field_validator("image_pull_secrets")
    @classmethod
    def _pull_secrets(cls, v: list[str]) -> list[str]:
        for s in v:
            if len(s) > 253 or not re.match(DNS_SUBDOMAIN, s):
                raise ValueError(f"image pull secret {s!r} is not a valid Secret name")
        return v

    @model_validator(mode="after")
    def _checks(self) -> "PodOverrides":
        _no_refused(self, {"security_context": _PRIV_HINT, "privileged": _PRIV_HINT, "host_network": _HOST_HINT,
                           "host_pid": _HOST_HINT, "host_ipc": _HOST_HINT})
        names = [v.name for v in self.volumes]
        if len(set(names)) != len(names):
            raise ValueError(f"volume names must be unique, got {names}")
        return self


_ROLES = ("learner", "rollout", "gpm")


def _mount_rule(role: str) -> str:
    return (f"!has(self.{role}) || !has(self.{role}.volumeMounts) || self.{role}.volumeMounts.all(m, "
            f"(has(self.{role}.volumes) && self.{role}.volumes.exists(v, v.name == m.name)) || "
            "(has(self.all) && has(self.all.volumes) && self.all.volumes.exists(v, v.name == m.name)))")


class RolePods(_K8s):
    """Pod overrides: `all` applies to every pod of the run, then `learner` (the learner Job), `rollout` (the rollout
    StatefulSet) and `gpm` (the GPM Deployment) to their own pods."""

    model_config = _cel(
        _rule("!has(self.all) || !has(self.all.volumeMounts) || self.all.volumeMounts.all(m, has(self.all.volumes) "
              "&& self.all.volumes.exists(v, v.name == m.name))",
              "pods.all.volumeMounts: every mount names a volume of pods.all.volumes", ".all.volumeMounts"),
        *(_rule(_mount_rule(r), f"pods.{r}.volumeMounts: every mount names a volume of pods.{r}.volumes or "
                "pods.all.volumes", f".{r}.volumeMounts") for r in _ROLES),
    )

    all: PodOverrides = Field(default_factory=PodOverrides, description="Every pod of the run.")
    learner: PodOverrides = Field(default_factory=PodOverrides, description="The learner Job's pods.")
    rollout: PodOverrides = Field(default_factory=PodOverrides, description="Disaggregated: the rollout servers' pods.")
    gpm: PodOverrides = Field(default_factory=PodOverrides, description="Disaggregated: the GPM servers' pods.")

    @model_validator(mode="after")
    def _mounts(self) -> "RolePods":
        common = {v.name for v in self.all.volumes}
        for role in ("all", *_ROLES):
            block: PodOverrides = getattr(self, role)
            known = {v.name for v in block.volumes} | (common if role != "all" else set())
            for m in block.volume_mounts:
                if m.name not in known:
                    raise ValueError(f"pods.{role}.volumeMounts: {m.name!r} names no volume of pods.{role}.volumes"
                                     + ("" if role == "all" else " or pods.all.volumes"))
        return self

    def for_role(self, role: str) -> PodOverrides:
        """`all` merged with the role's block (lists appended, maps merged, scalars: the role's wins)."""
        a, r = self.all, getattr(self, role)
        return PodOverrides(
            labels={**a.labels, **r.labels},
            annotations={**a.annotations, **r.annotations},
            node_selector={**a.node_selector, **r.node_selector},
            tolerations=[*a.tolerations, *r.tolerations],
            affinity=r.affinity or a.affinity,
            gpus=r.gpus if r.gpus is not None else a.gpus,
            cpu=r.cpu or a.cpu,
            memory=r.memory or a.memory,
            priority_class_name=r.priority_class_name or a.priority_class_name,
            image_pull_secrets=list(dict.fromkeys([*a.image_pull_secrets, *r.image_pull_secrets])),
            env=[*a.env, *r.env],
            volumes=[*a.volumes, *r.volumes],
            volume_mounts=[*a.volume_mounts, *r.volume_mounts],
        )


# --------------------------------------------------------------------------------------
# model sources and the hub cache


class SecretKeyRef(_K8s):
    name: str = Field(..., min_length=1, max_length=253, pattern=DNS_SUBDOMAIN, description="Secret name.")
    key: str = Field("token", min_length=1, max_length=253, description="Key inside the Secret.")


class ModelCacheSpec(_K8s):
    """Where `hf://` sources are downloaded (once, by an init container) before the trainer and servers start."""

    claim: Optional[str] = Field(
        None, max_length=253, pattern=DNS_SUBDOMAIN,
        description="Existing PersistentVolumeClaim to download into (shared by runs: a model is downloaded once "
        "per cluster); a claim `<run>-models` is created for the run when unset.")
    size: str = Field("200Gi", pattern=r"^[0-9]+(Ki|Mi|Gi|Ti)$", description="Size of a created cache claim.")
    storage_class: Optional[str] = Field(None, max_length=253, pattern=DNS_SUBDOMAIN,
                                         description="StorageClass of a created cache claim.")
    hub_token_secret: Optional[SecretKeyRef] = Field(
        None, description="Secret key holding a model-hub token (gated models); only the download container sees it.")
    hub_endpoint: Optional[str] = Field(None, max_length=1024, pattern=r"^https?://[^\s]+$",
                                        description="Model-hub endpoint (a mirror); the library's default when unset.")


@dataclass(frozen=True)
class Source:
    """A parsed model / data source. kind: `hf` (hub id, downloaded by the init container), `pvc` (a path on a
    claim, mounted read-only), `local` (anything else: a path inside the image or a `world:` artefact)."""

    kind: Literal["hf", "pvc", "local"]
    raw: str
    repo: str = ""  # hf: org/name; pvc: claim name
    revision: Optional[str] = None  # hf only
    repo_type: Literal["model", "dataset"] = "model"
    path: str = ""  # pvc: path inside the claim

    def local_path(self) -> str:
        """Where the pods find it."""
        if self.kind == "hf":
            sub = "datasets" if self.repo_type == "dataset" else "models"
            return posixpath.join(MODELS_ROOT, "hub", sub, self.repo, self.revision or "main")
        if self.kind == "pvc":
            return posixpath.join(MODELS_ROOT, "pvc", self.repo, self.path) if self.path else \
                posixpath.join(MODELS_ROOT, "pvc", self.repo)
        return self.raw


_HF = re.compile(r"^hf://(?P<type>datasets/)?(?P<repo>[A-Za-z0-9][-A-Za-z0-9_.]*(/[A-Za-z0-9][-A-Za-z0-9_.]*)?)"
                 r"(@(?P<rev>[-A-Za-z0-9_.]+))?$")
_PVC = re.compile(r"^pvc://(?P<claim>[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?)(/(?P<path>.*))?$")
# The same grammar for the CRD (CEL `matches`, RE2).
SOURCE_CEL = (r"!self.startsWith('hf://') || self.matches('^hf://(datasets/)?[A-Za-z0-9][-A-Za-z0-9_.]*"
              r"(/[A-Za-z0-9][-A-Za-z0-9_.]*)?(@[-A-Za-z0-9_.]+)?$')")
PVC_CEL = (r"!self.startsWith('pvc://') || (self.matches('^pvc://[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?(/.*)?$') && "
           r"!self.contains('..'))")


def parse_source(value: str, field: str = "source") -> Source:
    """`hf://[datasets/]<org>/<name>[@<revision>]`, `pvc://<claim>[/<path>]`, or a local value. ValueError names
    the field and the expected form."""
    if value.startswith("hf://"):
        m = _HF.match(value)
        if not m:
            raise ValueError(f"{field}: {value!r} is not a hub source; expected hf://<org>/<name>[@<revision>] "
                             "(hf://datasets/<org>/<name> for a dataset)")
        return Source("hf", value, m["repo"], m["rev"], "dataset" if m["type"] else "model")
    if value.startswith("pvc://"):
        m = _PVC.match(value)
        path = (m["path"] or "").strip("/") if m else ""
        if not m or ".." in value:
            raise ValueError(f"{field}: {value!r} is not a volume source; expected pvc://<claim>/<path inside the "
                             "claim> (a PersistentVolumeClaim name, a relative path without '..')")
        return Source("pvc", value, m["claim"], path=path)
    return Source("local", value)
