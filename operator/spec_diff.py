"""Which spec field changed since the last applied spec: what a refused update's condition names."""

from __future__ import annotations

import json
from typing import Any

from .api import SpecError


def applied_spec(status: dict[str, Any]) -> Any:
    """``status.appliedSpec`` (a JSON string written by compute_status), or None."""
    try:
        return json.loads(status.get("appliedSpec") or "null")
    except (TypeError, ValueError):
        return None


def _leaves(value: Any, path: str) -> dict[str, Any]:
    if isinstance(value, dict) and value:
        out: dict[str, Any] = {}
        for key, sub in value.items():
            out |= _leaves(sub, f"{path}.{key}")
        return out
    return {path: value}


def spec_change_note(applied: Any, new: Any, exc: SpecError) -> tuple[str, str] | None:
    """(field, message) naming what changed since the last applied spec, when the error's own field did not.

    ``applied`` is ``status.appliedSpec``; None when nothing was applied yet
    (then the validator's field is the answer). A planner error names the
    constraint it tripped on (``spec.parallelism.expertEP``) even when the
    user changed another field (``spec.workload.contextLength``): the
    condition then names the changed fields first.
    """
    if not isinstance(applied, dict) or not isinstance(new, dict):
        return None
    before, after = _leaves(applied, "spec"), _leaves(new, "spec")
    changed = sorted(k for k in set(before) | set(after) if before.get(k, _MISSING) != after.get(k, _MISSING))
    if not changed or any(k == exc.field or k.startswith(exc.field + ".") for k in changed):
        return None
    detail = ", ".join(f"{k} ({before.get(k, '(unset)')!r} -> {after.get(k, '(unset)')!r})" for k in changed[:3])
    return changed[0], f"changed since the applied spec ({detail}); the new spec is refused: {exc}"


_MISSING = object()


