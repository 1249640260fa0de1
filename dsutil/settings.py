"""Typed, checked settings: every value converted to its field's type and range-checked before work starts.

YAML, ``--set key=value`` and the command line all pass through here, so ``1e-3`` (a string to YAML 1.1)
becomes a float, ``"10"`` an int, and a bad value stops the run with its name, the value and what was
expected, before any stage has spent compute.
"""
from __future__ import annotations

import math
import types
import typing
from dataclasses import fields


class SettingError(ValueError):
    """A setting of the wrong type or outside its range; the message names it."""


def require(ok: bool, name: str, value, expected: str) -> None:
    if not ok:
        raise SettingError(f"{name}={value!r}: expected {expected}")


def convert(value, hint, name: str):
    """``value`` as the annotated type ``hint`` (bool, int, float, str, list/tuple/dict of them, or X | None)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (types.UnionType, typing.Union):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        require(len(inner) == 1, name, value, " or ".join(getattr(a, "__name__", str(a)) for a in args))
        return convert(value, inner[0], name)
    if origin in (list, tuple):
        require(isinstance(value, (list, tuple)), name, value, "a list")
        if origin is tuple and args and args[-1] is not Ellipsis:
            require(len(value) == len(args), name, value, f"{len(args)} values")
            return tuple(convert(v, a, f"{name}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        return origin(convert(v, args[0], f"{name}[{i}]") for i, v in enumerate(value)) if args else origin(value)
    if origin is dict or hint is dict:
        require(isinstance(value, dict), name, value, "a mapping")
        return dict(value)
    if hint is bool:
        require(isinstance(value, bool), name, value, "true or false")
        return value
    if hint in (int, float):
        if isinstance(value, str):
            try:
                value = hint(value)
            except ValueError:
                pass
        ok = isinstance(value, (int, float) if hint is float else int) and not isinstance(value, bool)
        require(ok, name, value, "a number" if hint is float else "an integer")
        require(math.isfinite(value), name, value, "a finite number")
        return hint(value)
    if hint is str:
        require(isinstance(value, str), name, value, "a string")
        return value
    return value


def build(cls, values: dict | None, where: str):
    """``cls(**values)`` with every value converted to its field's type; errors say ``where`` and the field."""
    values = values or {}
    require(isinstance(values, dict), where, values, "a mapping of settings")
    known = {f.name for f in fields(cls)}
    unknown = set(values) - known
    if unknown:
        raise SettingError(f"{where}: unknown keys {sorted(unknown)}; expected some of {sorted(known)}")
    hints = typing.get_type_hints(cls)
    try:
        return cls(**{k: convert(v, hints[k], k) for k, v in values.items()})
    except ValueError as e:  # the field checks of the config's own __post_init__ too
        raise SettingError(f"{where}: {e}") from None


def positive(name: str, value) -> None:
    require(math.isfinite(value) and value > 0, name, value, "a positive finite number")


def non_negative(name: str, value) -> None:
    require(math.isfinite(value) and value >= 0, name, value, "0 or more, finite")


def check_crop_scale(scale) -> None:
    require(len(scale) == 2 and 0 < scale[0] <= scale[1] <= 1, "crop_scale", scale,
            "two fractions of the image area, 0 < min <= max <= 1")


def one_of(name: str, value, choices) -> None:
    require(value in choices, name, value, "one of " + ", ".join(map(str, choices)))


def _optional(hint) -> tuple[object, bool]:
    """``X | None`` -> (X, True); X -> (X, False)."""
    if typing.get_origin(hint) in (types.UnionType, typing.Union):
        inner = [a for a in typing.get_args(hint) if a is not type(None)]
        return inner[0], len(inner) < len(typing.get_args(hint))
    return hint, False


def check_choices(cfg) -> None:
    """Each field named in the class's ``CHOICES`` holds one of its values (or None, where its type allows it):
    the one list of a setting's values, which its command-line flag offers too."""
    hints = typing.get_type_hints(type(cfg))
    for name, choices in type(cfg).CHOICES.items():
        value = getattr(cfg, name)
        if value is None and _optional(hints[name])[1]:
            continue
        require(value in choices, name, value, "one of " + ", ".join(map(str, choices))
                + (" (or null)" if _optional(hints[name])[1] else ""))


def add_flags(parser, cls, flags: dict[str, str | tuple[str, ...]] | None = None, dest_prefix: str = "") -> None:
    """A command-line flag for every field of the settings dataclass ``cls``, made from the class alone: the type,
    the default, the choices (``cls.CHOICES``) and the help (the field's trailing comment). ``--name-with-dashes``
    unless ``flags`` renames it; a field that is true by default is turned off by ``--no-name``. The values land
    in ``dest_prefix + field``; :func:`from_flags` builds the dataclass back from them."""
    hints, notes, default = typing.get_type_hints(cls), field_notes(cls), cls()
    for f in fields(cls):
        names = (flags or {}).get(f.name, "--" + f.name.replace("_", "-"))
        names = (names,) if isinstance(names, str) else names
        value, (hint, _) = getattr(default, f.name), _optional(hints[f.name])
        note = notes.get(f.name)
        kw = {"dest": dest_prefix + f.name, "help": note and note.replace("%", "%%")}  # argparse formats help with %
        if hint is bool:
            names = tuple("--no-" + n[2:] for n in names) if value else names
            parser.add_argument(*names, action="store_false" if value else "store_true", **kw)
            continue
        choices = getattr(cls, "CHOICES", {}).get(f.name)
        kw["metavar"] = None if choices else f.name.upper()
        if typing.get_origin(hint) is tuple:
            items = typing.get_args(hint)
            kw.update(nargs=len(items), metavar=("MIN", "MAX") if len(items) == 2 else None)
            hint = items[0]
        parser.add_argument(*names, type=hint, default=value, choices=choices, **kw)


def from_flags(args, cls, dest_prefix: str = ""):
    """The settings dataclass ``cls`` from the parsed flags that :func:`add_flags` made."""
    return cls(**{f.name: getattr(args, dest_prefix + f.name) for f in fields(cls)})


def field_notes(cls) -> dict[str, str]:
    """Each field's trailing ``# comment`` in the class source: the one place a setting is explained."""
    import inspect
    import re

    notes = {}
    for line in inspect.getsource(cls).splitlines():
        m = re.match(r"\s{4}(\w+): [^#]+?#\s*(.+)$", line)
        if m:
            notes[m.group(1)] = m.group(2).strip()
    return notes


def reference_rows(cls, prefix: str = "") -> list[str]:
    """Markdown rows ``| key | type | default | note |`` for every field of a settings dataclass."""
    import dataclasses
    import re

    notes, hints, rows = field_notes(cls), typing.get_type_hints(cls), []
    for f in fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else "required")
        if dataclasses.is_dataclass(default):
            continue  # a section: listed under its own heading
        kind = re.sub(r"<class '(\w+)'>|[\w.]+\.(\w+)", lambda m: m.group(1) or m.group(2), str(hints[f.name]))
        kind = kind.replace(" | ", " or ")
        rows.append(f"| `{prefix}{f.name}` | {kind} | `{default!r}` | {notes.get(f.name, '').replace('|', '/')} |")
    return rows
