"""The one "same settings or refuse" check: a resumed or repeated run must be the run that wrote what it continues."""
from __future__ import annotations

import json
from typing import Any

MISSING = "<missing>"


class SettingsMismatchError(ValueError):
    """Something on disk was made with other settings than the ones asked for now."""


def json_ready(obj: Any) -> Any:
    """`obj` as it reads back from JSON (tuples become lists), so a saved state compares equal to a fresh one."""
    return json.loads(json.dumps(obj))


def flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts -> {"a.b.c": value}."""
    if not isinstance(d, dict):
        return {prefix: d}
    out = {}
    for k, v in d.items():
        out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def differences(have: dict, want: dict) -> list[str]:
    """'key: X on disk, Y now' for every (nested, dotted) key whose value differs."""
    a, b = flatten(json_ready(have)), flatten(json_ready(want))
    return [f"{key}: {a.get(key, MISSING)!r} on disk, {b.get(key, MISSING)!r} now"
            for key in sorted(set(a) | set(b)) if a.get(key, MISSING) != b.get(key, MISSING)]


def refuse_mismatch(have: dict, want: dict, what: str, hint: str = "") -> None:
    """Raise SettingsMismatchError naming every differing key, when `have` (on disk) differs from `want` (now).

    what: the thing on disk, e.g. "code store runs/codes"; hint: what the user can do about it.
    """
    diffs = differences(have, want)
    if diffs:
        raise SettingsMismatchError(f"{what} was made with other settings{': ' + hint if hint else ''}. "
                                    f"Differences:\n  " + "\n  ".join(diffs))
