"""Which diagnostics a run gets: parsing ``config.diagnostics``.

Words: ``default``, ``all``, ``none``, or a diagnostic's name, each name optionally with options
``name:key=value,key=value`` (e.g. ``landscape:every=2,points=11``). Names add to ``default`` /
``all``; options replace that diagnostic's defaults. ``config.reference`` turns ``strength-ref``
on (it may not be combined with ``none``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from robustdrop.errors import RobustdropError


@dataclass(frozen=True)
class Option:
    type: Callable[[str], Any]
    default: Any
    help: str


def _bool(text: str) -> bool:
    low = text.strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise ValueError(text)


# Order = the order hooks run in each epoch: strength measures first (the collapse detector reads
# them), the detector before landscape (which reacts to a fresh onset).
OPTIONS: dict[str, dict[str, Option]] = {
    "strength-ref": {
        "every": Option(int, 1, "epochs between measurements"),
        "n": Option(int, 0, "probe examples used (0 = all)"),
        "pgd_every": Option(int, 5, "epochs between PGD ceilings, also at the last epoch (0 = never)"),
    },
    "strength": {
        "every": Option(int, 1, "epochs between measurements"),
        "n": Option(int, 500, "probe examples used (0 = all)"),
        "pgd_steps": Option(int, 5, "steps of the PGD compared with FGSM (step 2.5ε/steps)"),
        "train_every": Option(int, 10, "optimizer steps between training-perturbation samples (0 = off)"),
        "train_n": Option(int, 32, "examples of each sampled training batch (0 = all)"),
    },
    "snapshots": {
        "every": Option(int, 1, "epochs between snapshots"),
        "k": Option(int, 8, "images (one per class first)"),
    },
    "collapse": {
        "drop": Option(float, 0.5, "PGD acc below drop × best"),
        "floor": Option(float, 0.1, "best PGD acc needed before a drop counts"),
        "gap": Option(float, 0.15, "FGSM−PGD gap widening vs the best epoch"),
        "ratio": Option(float, 1.5, "strength_ratio at or below this is noise-like"),
        "align": Option(float, 0.5, "grad_alignment below this is misaligned"),
        "margin": Option(float, 0.02, "ref_acc(fgsm) within margin of ref_acc(noise-sign)"),
        "patience": Option(int, 1, "consecutive epochs the rule must hold"),
    },
    "landscape": {
        "every": Option(int, 5, "epochs between landscapes"),
        "n": Option(int, 128, "probe examples"),
        "points": Option(int, 21, "points of the 1-D profiles"),
        "grid": Option(int, 11, "points per axis of the 2-D grid"),
        "span": Option(float, 2.0, "range of t in units of ε (t ∈ [−span·ε, span·ε])"),
        "around_collapse": Option(_bool, True, "also at a detected onset and the epoch after"),
    },
}

NAMES = tuple(OPTIONS)
DEFAULT = ("strength-ref", "strength", "snapshots", "collapse")   # strength-ref only with a reference
ALL = NAMES
_POSITIVE = {"every", "k", "points", "grid", "patience", "pgd_steps"}


def _usage() -> str:
    names = "; ".join(f"{name}[:{','.join(f'{k}=' for k in opts)}]" for name, opts in OPTIONS.items())
    return f"use default, all, none or names with options: {names}"


def _parse_word(word: str) -> tuple[str, dict[str, Any]]:
    name, _, rest = word.partition(":")
    name = name.strip().lower()
    if name not in OPTIONS:
        raise RobustdropError(f"unknown diagnostic {name!r} in --diagnostics; {_usage()}")
    schema = OPTIONS[name]
    options: dict[str, Any] = {}
    for item in filter(None, (p.strip() for p in rest.split(","))):
        key, eq, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if key not in schema or not eq:
            valid = ", ".join(f"{k} ({o.help}; default {o.default})" for k, o in schema.items())
            raise RobustdropError(f"bad option {item!r} for diagnostic {name}; write {name}:key=value with key one "
                                  f"of: {valid}")
        try:
            options[key] = schema[key].type(value.strip())
        except ValueError:
            kind = {int: "a whole number", float: "a number"}.get(schema[key].type, "yes or no")
            raise RobustdropError(f"option {name}:{key} needs {kind}, got {value!r}") from None
        if key in _POSITIVE and options[key] < 1:
            raise RobustdropError(f"option {name}:{key} must be at least 1, got {options[key]}")
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
            for name in (DEFAULT if low == "default" else ALL):
                chosen.setdefault(name, {})
            continue
        name, options = _parse_word(word)
        chosen.setdefault(name, {}).update(options)
    if reference:
        if "none" in keywords:
            raise RobustdropError("--reference needs the strength-ref diagnostic, but --diagnostics is none; "
                                  "drop one of them")
        chosen.setdefault("strength-ref", {})
    elif "strength-ref" in chosen:
        if any(w.lower().partition(":")[0].strip() == "strength-ref" for w in words):
            raise RobustdropError("the strength-ref diagnostic needs a reference model: pass --reference RUN_DIR "
                                  "(train one with `robustdrop track --preset quick --method pgd --pgd-steps 5 "
                                  "--name ref-quick`)")
        del chosen["strength-ref"]
    return {name: chosen[name] for name in NAMES if name in chosen}
