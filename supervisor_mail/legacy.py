"""Migration from the old PHP engine: read its ``config.inc`` and print the equivalent INI.

The old engine was configured with lines such as ``define('BG_MAX_THREADS', 14);``.
Only literal values can be carried over; an expression (``__DIR__.'/pid'``) is
reported as such so that the administrator sets that key by hand.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from supervisor_mail.config import BY_PHP, SECTIONS, SETTINGS, Setting
from supervisor_mail.errors import ConfigError

_DEFINE = re.compile(
    r"""define\s*\(\s*(['"])(?P<name>[A-Za-z_][A-Za-z0-9_]*)\1\s*,\s*(?P<value>.*?)\s*\)\s*;""",
    re.DOTALL)
_STRING = re.compile(r"""'((?:[^'\\]|\\.)*)'|"((?:[^"\\$]|\\.)*)"$""", re.DOTALL)


@dataclass
class Imported:
    """What a config.inc yielded: settings carried over and lines that need a person."""

    values: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


class Expression(ValueError):
    """A PHP value that is not a literal (a constant, a concatenation, a call)."""


def php_literal(text: str) -> Any:
    """The Python value of a PHP literal: a quoted string, a boolean, null or a number."""
    text = text.strip()
    match = _STRING.fullmatch(text)
    if match:
        single, double = match.groups()
        if single is not None:
            return re.sub(r"\\([\\'])", r"\1", single)
        return re.sub(r"\\(.)", r"\1", double)
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered == "null":
        return None
    if re.fullmatch(r"[+-]?\d+", text):
        return int(text)
    if re.fullmatch(r"[+-]?\d+\.\d*", text):
        return float(text)
    raise Expression(text)


def _as_setting_text(setting: Setting, value: Any) -> str:
    """The INI text for an old value; the old engine wrote the daily start as an hour too."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if setting.name == "sync.lo_sync_start" and isinstance(value, int):
        return f"{value:02d}:00"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return "" if value is None else str(value)


def read_inc(text: str, source: str = "config.inc") -> Imported:
    """Parse the ``define()`` lines of a config.inc."""
    result = Imported()
    for match in _DEFINE.finditer(text):
        name, raw = match["name"], match["value"]
        line = text.count("\n", 0, match.start()) + 1
        setting = BY_PHP.get(name)
        if setting is None:
            result.notes.append(f"{source}:{line}: {name} is not used by supervisor_mail")
            continue
        try:
            value = php_literal(raw)
        except Expression:
            result.notes.append(f"{source}:{line}: {name} = {raw} is an expression that cannot "
                                f"be evaluated here; set [{setting.section}] {setting.key} by hand")
            continue
        converted = _as_setting_text(setting, value)
        try:
            setting.kind.parse(converted)
        except ValueError as exc:
            result.notes.append(f"{source}:{line}: {name} = {raw} does not fit "
                                f"[{setting.section}] {setting.key}, which must be {exc}")
            continue
        result.values[setting.name] = converted
    return result


def import_inc(path: str) -> str:
    """The INI equivalent of the config.inc at ``path`` (``config import-inc``)."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            text = f.read()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the old configuration: {exc.strerror}") from None
    imported = read_inc(text, path)
    if not imported.values and not imported.notes:
        raise ConfigError(f"{path}: no define('NAME', value); lines found: "
                          "is this the old engine's config.inc?")
    return render(imported, path)


def render(imported: Imported, source: str) -> str:
    out = [f"# Converted from {source} by `supervisor-mail config import-inc`."]
    out += [f"# NOTE {note}" for note in imported.notes]
    for section in SECTIONS:
        keys = [s for s in SETTINGS if s.section == section and s.name in imported.values]
        if not keys:
            continue
        out.append(f"\n[{section}]")
        for s in keys:
            out.append(f"# {s.php}")
            out.append(f"{s.key} = {imported.values[s.name]}")
    return "\n".join(out) + "\n"
