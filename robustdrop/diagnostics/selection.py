"""Which diagnostics a run gets: parsing ``config.diagnostics``.

Words: ``default``, ``all``, ``none``, or a diagnostic's name, each name optionally with options
``name:key=value,key=value`` (e.g. ``landscape:every=2,points=11``). Names add to ``default`` /
``all``; options replace that diagnostic's defaults. ``config.reference`` turns ``strength-ref``
on (it may not be combined with ``none``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import Field, fields
from typing import Any

from robustdrop.diagnostics.registry import DIAGNOSTICS
from robustdrop.errors import RobustdropError


def _bool(text: str) -> bool:
    low = text.strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise ValueError(text)


def schema(name: str) -> dict[str, Field]:
    """The options of diagnostic ``name``: its ``Options`` fields by option name."""
    return {f.name: f for f in fields(DIAGNOSTICS[name].Options)}


def _usage() -> str:
    names = "; ".join(f"{name}[:{','.join(f'{k}=' for k in schema(name))}]" for name in DIAGNOSTICS)
    return f"use default, all, none or names with options: {names}"


def _parse_word(word: str) -> tuple[str, dict[str, Any]]:
    name, _, rest = word.partition(":")
    name = name.strip().lower()
    if name not in DIAGNOSTICS:
        raise RobustdropError(f"unknown diagnostic {name!r} in --diagnostics; {_usage()}")
    opts = schema(name)
    options: dict[str, Any] = {}
    for item in filter(None, (p.strip() for p in rest.split(","))):
        key, eq, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if key not in opts or not eq:
            valid = ", ".join(f"{k} ({f.metadata['help']}; default {f.default})" for k, f in opts.items())
            raise RobustdropError(f"bad option {item!r} for diagnostic {name}; write {name}:key=value with key one "
                                  f"of: {valid}")
        kind = type(opts[key].default)
        try:
            options[key] = (_bool if kind is bool else kind)(value.strip())
        except ValueError:
            text = {int: "a whole number", float: "a number"}.get(kind, "yes or no")
            raise RobustdropError(f"option {name}:{key} needs {text}, got {value!r}") from None
        minimum = opts[key].metadata["minimum"]
        if minimum is not None and options[key] < minimum:
            raise RobustdropError(f"option {name}:{key} must be at least {minimum}, got {options[key]}")
    return name, options


def select(words: Sequence[str], *, reference: str | None = None) -> dict[str, dict[str, Any]]:
    """``{name: options}`` in running order for the words of ``config.diagnostics``."""
    if isinstance(words, str):
        words = [words]
    words = [w.strip() for w in words if w and w.strip()]
    chosen: dict[str, dict[str, Any]] = {}
    keywords = [w.lower() for w in words if w.lower() in ("default", "all", "none")]
    if "none" in keywords and len(words) > 1:
        raise RobustdropError(f"--diagnostics none cannot be combined with other words ({' '.join(words)})")
    for word in words:
        low = word.lower()
        if low == "none":
            continue
        if low in ("default", "all"):
            for name, cls in DIAGNOSTICS.items():
                if (low == "all" and cls.in_all) or cls.in_default:
                    chosen.setdefault(name, {})
            continue
        name, options = _parse_word(word)
        chosen.setdefault(name, {}).update(options)
    named = {w.lower().partition(":")[0].strip() for w in words}
    for name in [n for n, cls in DIAGNOSTICS.items() if cls.needs_reference]:
        if reference:
            if "none" in keywords:
                raise RobustdropError(f"--reference needs the {name} diagnostic, but --diagnostics is none; "
                                      "drop one of them")
            chosen.setdefault(name, {})
        elif name in chosen:
            if name in named:
                raise RobustdropError(f"the {name} diagnostic needs a reference model: pass --reference auto "
                                      "(trains one for this setting once and caches it), builtin:quick or RUN_DIR")
            del chosen[name]
    return {name: chosen[name] for name in DIAGNOSTICS if name in chosen}
