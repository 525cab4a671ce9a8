"""The one "same settings or refuse" check: a resumed or repeated run must be the run that wrote what it continues."""
from __future__ import annotations

import dataclasses
import json
from typing import Any

from tokenizer.common.errors import ConfigError, UserError

MISSING = "<missing>"


class SettingsMismatchError(UserError, ValueError):
    """Something on disk was made with other settings than the ones asked for now."""


def known_fields(cls: type, d: dict, what: str | None = None) -> dict:
    """`d` unchanged when every key is a field of the dataclass `cls`; else a ValueError naming the unknown ones."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ConfigError(f"unknown {what or cls.__name__} fields {unknown}; expected {sorted(names)}")
    return d


def preset_fields(presets: dict, name: str, what: str) -> dict:
    """The fields of preset `name`, or a ValueError listing the presets there are."""
    if name not in presets:
        raise ConfigError(f"unknown {what} preset {name!r}; expected one of {sorted(presets)}")
    return presets[name]


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
