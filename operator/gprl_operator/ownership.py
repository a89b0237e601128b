"""Pure rules of what the operator may touch and how it reports failures. No API calls here.

- `controller_uid(obj)`: the UID of the object's controller owner (None when nothing controls it). A child belongs
  to a run only when its controller is that run's UID: names alone prove nothing, anyone can create `web-config`.
- `drifted(desired, actual)`: whether an existing child no longer has what the operator applied (a hand edit, a
  `kubectl scale`). Fields the API server or other controllers add (defaults, status, extra labels) do not count.
- `classify(status)`: a refused request is *permanent* (the same request will be refused again: wait for the next
  spec change) or *temporary* (retry with exponential backoff).
- `bounded(text)`: status messages and Events stay short whatever the API server answered.
"""

from __future__ import annotations

import hashlib
from typing import Any, Optional

MESSAGE_LIMIT = 300  # characters of a condition / status message
BACKOFF_BASE_S = 2.0
BACKOFF_MAX_S = 300.0


# maps whose every key matters: an extra label in a selector selects other pods
EXACT_MAPS = frozenset({"selector", "matchLabels"})


class NameConflict(RuntimeError):
    """A child's name is taken by an object this run does not control."""

    def __init__(self, kind: str, name: str, owner: Optional[str]):
        self.kind, self.name, self.owner = kind, name, owner
        whose = f"controlled by {owner}" if owner else "not created by this run"
        super().__init__(f"{kind} {name} already exists and is {whose}; it is left untouched. "
                         f"Rename the run or remove that object.")


def controller_uid(obj: dict) -> Optional[str]:
    meta = obj.get("metadata", obj) or {}
    for ref in meta.get("ownerReferences") or []:
        if ref.get("controller"):
            return ref.get("uid")
    return None


def controller_name(obj: dict) -> Optional[str]:
    meta = obj.get("metadata", obj) or {}
    for ref in meta.get("ownerReferences") or []:
        if ref.get("controller"):
            return f"{ref.get('kind')}/{ref.get('name')}"
    return None


def drifted(desired: Any, actual: Any) -> bool:
    """True when `actual` lacks something of `desired`: a missing or different value, a list of another length.

    Maps are compared key by key on the desired keys only (the server adds defaults), except selectors, which
    must match exactly; lists element by element (Kubernetes keeps their order), so an added rule or container
    counts as drift.
    """
    if isinstance(desired, dict):
        if not isinstance(actual, dict):
            return True
        return any((v != actual.get(k)) if k in EXACT_MAPS else drifted(v, actual.get(k)) for k, v in desired.items())
    if isinstance(desired, list):
        if not isinstance(actual, list) or len(actual) != len(desired):
            return True
        return any(drifted(d, a) for d, a in zip(desired, actual))
    return desired != actual


def child_view(child: dict) -> dict:
    """What of a desired child `drifted` compares: everything but the apply-only envelope."""
    return {k: v for k, v in child.items() if k not in ("apiVersion", "kind")}


def classify(status: int) -> str:
    """'permanent' or 'temporary' for an HTTP status the API server answered."""
    if status in (408, 409, 429) or status >= 500 or status == 0:
        return "temporary"
    return "permanent" if 400 <= status < 500 else "temporary"


def backoff(retry: int) -> float:
    """Seconds before retry number `retry` (0-based) of a temporary failure: 2, 4, 8, ... capped at 5 minutes."""
    return min(BACKOFF_BASE_S * (2 ** max(retry, 0)), BACKOFF_MAX_S)


def bounded(text: str, limit: int = MESSAGE_LIMIT) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def event_name(run_name: str, run_uid: str, reason: str, message: str) -> str:
    """Repeats of one Event for one run share a name, so they count up instead of piling up."""
    digest = hashlib.sha256(f"{run_uid}\0{reason}\0{message}".encode()).hexdigest()[:12]
    return f"{run_name[:200]}.{digest}"
