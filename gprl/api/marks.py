"""What may change on a run, declared once on each field of the run config.

Every leaf of `gprl.config.RunSpec` carries one mark (on itself, or inherited from its section):

- `immutable`: fixed for the life of a run. What its checkpoints contain depends on it (seed, model, data, GPM,
  group size, ...), or Kubernetes cannot change it in place (a Job's pod template: image, resources, the
  checkpoint volume, the output folder, the metrics port). The API server refuses any change (CEL `oldSelf`
  rule); the trainer refuses to resume a checkpoint written with another value (outside `resources` and
  `output`, which describe where a run lives, not what its checkpoints hold).
- `restart-required`: read when the trainer starts (steps, learning rate, drift thresholds, ...). A resume may
  change it. On Kubernetes a change is accepted only while the run is suspended, so that the pods started on
  resume all read the new value: never half-applied.
- `mutable`: takes effect on a live run without new pods (`suspend`).

From these marks: the CRD's transition rules (`gprl.crd`), the trainer's resume check (`resume_fields`) and
the table in docs/crd-reference.md. Nothing else lists fields.
"""

from __future__ import annotations

from enum import Enum
from typing import Any, Iterator

from pydantic import BaseModel
from pydantic.fields import FieldInfo

__all__ = [
    "Change",
    "CHANGE_KEY",
    "IMMUTABLE",
    "RESTART",
    "MUTABLE",
    "RESUME_EXEMPT",
    "resume_exempt",
    "change_of",
    "leaf_changes",
    "resume_fields",
    "unmarked",
]

CHANGE_KEY = "x-gprl-change"


class Change(str, Enum):
    IMMUTABLE = "immutable"
    RESTART = "restart-required"
    MUTABLE = "mutable"


# json_schema_extra values: `Field(..., json_schema_extra=IMMUTABLE)`
IMMUTABLE = {CHANGE_KEY: Change.IMMUTABLE.value}
RESTART = {CHANGE_KEY: Change.RESTART.value}
MUTABLE = {CHANGE_KEY: Change.MUTABLE.value}

# Sections the resume check leaves out: they say where a run lives (pods, volumes, folders, ports) or how its
# weights travel, not what its checkpoints contain; a local resume has no pods, a moved output folder is still the
# same run, and the weight-sync port a cluster renders (0 -> 29600) is no reason to refuse a checkpoint.
RESUME_EXEMPT = ("resources", "output", "rollout.weight_sync")


def resume_exempt(path: str) -> bool:
    """Whether a dotted field path (snake_case or camelCase) is outside the resume check."""
    snake = "".join("_" + c.lower() if c.isupper() else c for c in path)
    return any(snake == s or snake.startswith(s + ".") for s in RESUME_EXEMPT)


def change_of(field: FieldInfo) -> Change | None:
    extra = field.json_schema_extra
    if isinstance(extra, dict) and CHANGE_KEY in extra:
        return Change(extra[CHANGE_KEY])
    return None


def _section(annotation: Any) -> type[BaseModel] | None:
    return annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None


def leaf_changes(model: type[BaseModel], prefix: str = "", inherited: Change | None = None,
                 camel: bool = False) -> Iterator[tuple[str, Change]]:
    """(dotted path, mark) of every leaf field; a leaf without its own mark takes its section's.

    A leaf with no mark at all counts as immutable (the safe reading: the API server refuses its changes);
    `unmarked` lists them, and a unit test keeps that list empty.
    """
    for name, field in model.model_fields.items():
        key = (field.alias or name) if camel else name
        mark = change_of(field) or inherited
        sub = _section(field.annotation)
        if sub is not None:
            yield from leaf_changes(sub, f"{prefix}{key}.", mark, camel)
        else:
            yield f"{prefix}{key}", mark or Change.IMMUTABLE


def unmarked(model: type[BaseModel], prefix: str = "", inherited: Change | None = None) -> list[str]:
    """Leaves with no mark of their own or from a section (programming errors: every field must say)."""
    out = []
    for name, field in model.model_fields.items():
        mark = change_of(field) or inherited
        sub = _section(field.annotation)
        if sub is not None:
            out += unmarked(sub, f"{prefix}{name}.", mark)
        elif mark is None:
            out.append(f"{prefix}{name}")
    return out


def resume_fields(model: type[BaseModel]) -> tuple[str, ...]:
    """The fields a checkpoint must agree on with the config that resumes it (snake_case dotted paths)."""
    return tuple(path for path, mark in leaf_changes(model)
                 if mark is Change.IMMUTABLE and not resume_exempt(path))
