"""A sweep's grid: parsing ``key=v1,v2`` and ``key=a:b``, the TOML file, cell names, and the plan.

Grid words (``robustdrop sweep --grid ...``), one per key:

* ``key=v1,v2,...``: a list of values, each read as the ``robustdrop track`` flag of that key reads
  it (``epsilon=8/255,10/255``; ``method=fgsm,apart``; booleans ``true``/``false``; ``none`` for
  an unset optional value such as ``width``; a list-valued key joins its items with ``+``:
  ``diagnostics=none,default+landscape``);
* ``key=a:b``: the integers ``a, a+1, ..., b-1`` (Python's ``range``: ``seed=0:5`` is seeds 0..4);
  ranges and values mix: ``seed=0:3,10``.

Keys are :class:`~robustdrop.engine.TrackConfig` fields (``train-subset`` or ``train_subset``).

**Cell names** come from the varied values only, keys in alphabetical order, ``key=value`` joined by
``-``: ``epsilon=8_255-method=fgsm-seed=0``. A radius (ε, step sizes) is written in units of
1/255: ``8_255``, ``2.5_255`` (3 significant digits); other numbers as Python writes them;
characters other than letters, digits and ``._+`` become ``_``. Names are stable (independent of the order of the words) and safe
as folder names; two cells with the same name are an error.

The TOML file (``--file study.toml``) says the same::

    [sweep]
    name = "eps-study"          # optional (default: see default_sweep_name)
    preset = "quick"            # optional
    [sweep.grid]
    seed = "0:5"                # a string is read like a grid word's value; or a TOML list:
    epsilon = ["8/255", "10/255", "12/255"]
    [sweep.fixed]               # overrides for every cell, like track's flags
    epochs = 10

**Named cells** (a list of different runs, with or instead of a grid) come first, in the file's
order, then the grid's cells: a sweep starts its cells in this order, so put the most valuable
first. A named cell has its own values over ``preset`` and ``fixed``; ``after = ["name", ...]``
runs it once those cells finished; a string value ``"@name"`` is that cell's run directory (and
makes ``name`` a dependency), e.g. a referee trained by the sweep itself::

    [sweep.cells.referee]
    method = "pgd"
    pgd_steps = 3
    [sweep.cells.fgsm]
    reference = "@referee"      # runs after referee, with --reference <sweep>/referee
    [sweep.cells.fgsm-eval]     # not a training: evaluate a finished run (robustdrop evaluate)
    kind = "evaluate"
    run = "@fgsm"
    checkpoint = "best_model"   # checkpoints/<name>.pt (default: the run's result)
    attacks = ["pgd"]
    n = 500
    [sweep.cells.fgsm-wong]     # not a training: diagnostics replayed over a finished run's weights
    kind = "replay"
    run = "@fgsm"               # trained with save_weights_every = 1 (or checkpoint_every = 1)
    diagnostics = ["wong"]      # optional: --diagnostics words (default: the run's that need a reference)
    reference = "@referee"      # optional: the referee of strength-ref (a run, builtin:NAME, auto)

Grid cells may refer to named cells too (``reference = "@referee"`` in ``[sweep.fixed]``).
An evaluate cell writes ``<sweep>/<cell>/evaluation.csv`` (metric rows, ``source=evaluate``); a
replay cell appends its rows to the metrics of the run it replays
(:func:`robustdrop.diagnostics.replay.replay_run`: the rows the attached diagnostics log; reused
once finished, started over when stopped) and has no folder of its own. Its options:
:data:`REPLAY_OPTIONS` (``run`` required; ``device``, ``data_dir`` as ``track``'s).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from robustdrop.engine.config import PRESETS, TrackConfig, field_parser, make_config
from robustdrop.errors import RobustdropError
from robustdrop.formatting import eps_in_255ths

_FIELDS = {f.name: f for f in dataclasses.fields(TrackConfig)}
_RANGE = re.compile(r"^\s*(-?\d+)\s*:\s*(-?\d+)\s*$")
_TRUE, _FALSE = ("true", "yes", "1", "on"), ("false", "no", "0", "off")


CELL_KINDS = ("train", "evaluate", "replay")
# An evaluate cell's options (robustdrop.evaluation.evaluate_checkpoint's, plus where the model is).
EVALUATE_OPTIONS = {"run": str, "checkpoint": str, "attacks": list, "n": int, "epsilon": str, "pgd_steps": int,
                    "pgd_step_size": str, "restarts": int, "batch_size": int, "device": str}
# A replay cell's options (robustdrop.diagnostics.replay.replay_run's): diagnostics as a list of
# --diagnostics words or one string; run and reference may be "@cell".
REPLAY_OPTIONS = {"run": str, "reference": str, "diagnostics": list, "device": str, "data_dir": str}


@dataclass
class Cell:
    """One cell of the sweep: its name, the values that make it, its resolved config (a training;
    None for other kinds), its kind, the cells it runs after, and a non-training cell's options."""

    name: str
    values: dict[str, Any]
    config: TrackConfig | None
    kind: str = "train"
    after: list[str] = dataclasses.field(default_factory=list)
    action: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclass
class SweepPlan:
    """A validated sweep: every cell's config resolved (nothing created yet); ``cells`` in the
    order they start (named cells, then the grid's)."""

    name: str
    preset: str | None
    grid: dict[str, list[Any]]
    fixed: dict[str, Any]
    cells: list[Cell]
    named: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)

    def cell(self, name: str) -> Cell:
        return next(c for c in self.cells if c.name == name)


# --------------------------------------------------------------------------------------------
# Keys and values
# --------------------------------------------------------------------------------------------
def config_key(key: str) -> str:
    """``train-subset`` / ``train_subset`` -> ``train_subset``; an unknown key is a one-line error."""
    name = key.strip().lstrip("-").replace("-", "_")
    if name not in _FIELDS:
        raise RobustdropError(f"unknown sweep key {key.strip()!r}; valid keys (TrackConfig fields): "
                              f"{', '.join(_FIELDS)}")
    return name


def _default(f: dataclasses.Field) -> Any:
    return f.default if f.default is not dataclasses.MISSING else f.default_factory()


def parse_value(key: str, text: Any) -> Any:
    """One value of ``key`` from a grid word, a TOML string or a TOML value (as ``track``'s flag reads it)."""
    f = _FIELDS[config_key(key)]
    default = _default(f)
    if not isinstance(text, str):  # a TOML number, boolean or list: checked by the config's validation
        return list(text) if isinstance(text, (list, tuple)) else text
    word = text.strip()
    if not word:
        raise RobustdropError(f"empty value for sweep key {f.name}; write e.g. {f.name}=a,b")
    try:
        if isinstance(default, bool):
            if word.lower() in _TRUE:
                return True
            if word.lower() in _FALSE:
                return False
            raise ValueError
        if word.lower() == "none" and default is None:
            return None
        if "nargs" in f.metadata:
            return [f.metadata["item"](part) for part in word.split("+")]
        value = field_parser(f)(word)
    except (ValueError, TypeError):
        kind = "true or false" if isinstance(default, bool) else getattr(field_parser(f), "__name__", "a value")
        raise RobustdropError(f"sweep key {f.name}: cannot read {word!r} as {kind}") from None
    choices = f.metadata.get("choices")
    choices = choices() if callable(choices) else choices
    if choices and value not in choices:
        raise RobustdropError(f"sweep key {f.name}: {value!r} is not one of {', '.join(map(str, choices))}")
    return value


def parse_values(key: str, spec: Any) -> list[Any]:
    """The values of ``key``: a grid word's right-hand side (``8/255,10/255``, ``0:5``), or a TOML list."""
    name = config_key(key)
    if isinstance(spec, (list, tuple)):
        values = [parse_value(name, v) for v in spec]
    elif isinstance(spec, str):
        values = []
        for part in spec.split(","):
            m = _RANGE.match(part)
            if m and isinstance(_default(_FIELDS[name]), int) and not isinstance(_default(_FIELDS[name]), bool):
                start, stop = int(m.group(1)), int(m.group(2))
                if stop <= start:
                    raise RobustdropError(f"sweep range {name}={part.strip()} is empty; a:b means a, a+1, ..., b-1 "
                                          f"(e.g. {name}=0:5 for 0..4)")
                values.extend(range(start, stop))
            elif m:
                raise RobustdropError(f"sweep key {name} is not an integer; a:b ranges are for integer keys such as seed")
            else:
                values.append(parse_value(name, part))
    else:
        values = [parse_value(name, spec)]
    if not values:
        raise RobustdropError(f"sweep key {name} has no values; write e.g. {name}=a,b")
    seen: list[Any] = []
    for v in values:
        if v in seen:
            raise RobustdropError(f"sweep key {name} lists {v!r} twice; give each value once")
        seen.append(v)
    return values


def parse_grid(words: Iterable[str]) -> dict[str, list[Any]]:
    """``["seed=0:5", "epsilon=8/255,10/255"]`` -> ``{"seed": [0..4], "epsilon": [...]}``."""
    grid: dict[str, list[Any]] = {}
    for word in words:
        key, sep, spec = str(word).partition("=")
        if not sep or not key.strip():
            raise RobustdropError(f"grid word {word!r} is not key=values; write e.g. seed=0:5 or epsilon=8/255,10/255")
        name = config_key(key)
        if name in grid:
            raise RobustdropError(f"sweep key {name} given twice in the grid; list all its values once: {name}=a,b")
        grid[name] = parse_values(name, spec)
    return grid


def read_toml(path: str | os.PathLike) -> dict[str, Any]:
    """The ``[sweep]`` table of a TOML file: ``name``, ``preset``, ``grid`` and ``fixed`` (typed values)."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        try:
            import tomli as tomllib  # type: ignore[no-redef]
        except ModuleNotFoundError:
            raise RobustdropError("reading a sweep file needs Python 3.11 (tomllib) or `pip install tomli`") from None
    path = Path(path)
    try:
        doc = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise RobustdropError(f"sweep file {path} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise RobustdropError(f"sweep file {path} is not valid TOML ({exc})") from None
    table = doc.get("sweep")
    if not isinstance(table, dict):
        raise RobustdropError(f"sweep file {path} has no [sweep] table; see `robustdrop sweep --help`")
    unknown = sorted(set(table) - {"name", "preset", "grid", "fixed", "cells"})
    if unknown:
        raise RobustdropError(f"sweep file {path}: unknown entries {unknown} in [sweep]; use name, preset, grid, "
                              "fixed, cells")
    grid_table = table.get("grid") or {}
    cells_table = table.get("cells") or {}
    if not isinstance(grid_table, dict) or not isinstance(cells_table, dict) or not (grid_table or cells_table):
        raise RobustdropError(f"sweep file {path} has neither [sweep.grid] values nor [sweep.cells.NAME] tables; "
                              "add e.g. seed = \"0:5\" under [sweep.grid]")
    for name, spec in cells_table.items():
        nested = [k for k, v in spec.items() if isinstance(v, dict)] if isinstance(spec, dict) else []
        if nested:  # no cell value is a table: a dot in a bare key (fgsm-a2.5-s0) made one
            raise RobustdropError(f"sweep file {path}: cell {name}.{nested[0]}: a dot in a bare TOML key nests tables; "
                                  f"quote the cell's name (\"{name}.{nested[0]}\" = {{...}}) or write it without a dot")
    return {
        "name": table.get("name"),
        "preset": table.get("preset"),
        "grid": {config_key(k): parse_values(k, v) for k, v in grid_table.items()},
        "fixed": {config_key(k): _fixed_value(k, v) for k, v in (table.get("fixed") or {}).items()},
        "cells": {str(n): dict(v) if isinstance(v, dict) else v for n, v in cells_table.items()},
    }


def _fixed_value(key: str, value: Any) -> Any:
    """A fixed or named-cell value: ``"@cell"`` stays as it is (resolved when the cell runs)."""
    return value if is_cell_ref(value) else parse_value(key, value)


def is_cell_ref(value: Any) -> bool:
    """Whether ``value`` is ``"@name"``: the run directory of the sweep's cell ``name``."""
    return isinstance(value, str) and value.startswith("@") and len(value) > 1


def toml_text(spec: Mapping[str, Any], comments: Sequence[str] = ()) -> str:
    """A sweep file's text from :func:`read_toml`'s fields (``name``, ``preset``, ``grid``,
    ``fixed``, ``cells``; empty or missing ones left out), values as written by the user (strings,
    numbers, booleans, lists of them), each named cell an inline table; ``comments`` head the file."""
    def pairs(values: Mapping[str, Any]) -> list[str]:
        return [f"{k} = {json.dumps(v)}" for k, v in values.items()]

    lines = [f"# {c}" for c in comments] + ["[sweep]"]
    lines += pairs({k: spec[k] for k in ("name", "preset") if spec.get(k) is not None})
    for part in ("grid", "fixed"):
        if spec.get(part):
            lines += [f"[sweep.{part}]", *pairs(spec[part])]
    if spec.get("cells"):
        lines += ["[sweep.cells]", *(f"{json.dumps(n)} = {{{', '.join(pairs(v))}}}" for n, v in spec["cells"].items())]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------
# Names
# --------------------------------------------------------------------------------------------
def value_text(key: str, value: Any) -> str:
    """A value as it appears in a cell name (see the module docstring)."""
    f = _FIELDS[key]
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "+".join(value_text(key, v) for v in value)
    if isinstance(value, float) and f.metadata.get("fraction") and value > 0:
        return f"{eps_in_255ths(value)}_255"
    if isinstance(value, float):
        text = repr(value)
    else:
        text = str(value)
    return re.sub(r"[^A-Za-z0-9.+]", "_", text)


def cell_name(values: Mapping[str, Any]) -> str:
    """``{"seed": 0, "epsilon": 8/255}`` -> ``epsilon=8_255-seed=0``."""
    return "-".join(f"{k}={value_text(k, values[k])}" for k in sorted(values))


def default_sweep_name(preset: str | None, grid: Mapping[str, Any]) -> str:
    """``<preset>-<keys>``, e.g. ``quick-epsilon-seed``: the same for every run of the same command
    (so a rerun resumes) and for ``--extend`` with more values of the same keys."""
    return "-".join([preset or "sweep", *sorted(grid)])


# --------------------------------------------------------------------------------------------
# The plan
# --------------------------------------------------------------------------------------------
def plan_sweep(grid: Mapping[str, Sequence[Any]], *, preset: str | None = None, fixed: Mapping[str, Any] | None = None,
               name: str | None = None, cells: Mapping[str, Mapping[str, Any]] | None = None) -> SweepPlan:
    """Every cell: the named ``cells`` (module docstring) in their order, then the product of
    ``grid``'s values, with ``preset`` and ``fixed`` resolved and validated through
    :func:`~robustdrop.engine.make_config` and the diagnostics selection, and the dependencies
    checked (known cells, no cycle), before anything is created. Raises :class:`RobustdropError`
    on the first bad cell."""
    fixed = {config_key(k): v for k, v in (fixed or {}).items()}
    grid = {config_key(k): list(v) for k, v in grid.items()}
    named = {str(k): dict(v) for k, v in (cells or {}).items()}
    if not grid and not named:
        raise RobustdropError("a sweep needs a grid or named cells: e.g. --grid seed=0:5 epsilon=8/255,10/255")
    if preset is not None and preset not in PRESETS:
        raise RobustdropError(f"unknown preset {preset!r}; choose one of: {', '.join(PRESETS)}")
    both = sorted(set(grid) & set(fixed))
    if both:
        raise RobustdropError(f"{', '.join(both)} is both varied (grid) and fixed; give it in one place")
    name = name or (default_sweep_name(preset, grid) if grid else f"{preset or 'sweep'}-cells")
    _check_name(name, "sweep name")
    planned = [_named_cell(cname, spec, preset, fixed) for cname, spec in named.items()]
    if grid:
        keys = sorted(grid)
        for combo in itertools.product(*(grid[k] for k in keys)):
            values = dict(zip(keys, combo))
            planned.append(_train_cell(cell_name(values), values, preset, fixed))
    names = [c.name for c in planned]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise RobustdropError(f"two cells would share the name {twice[0]}; give values that differ in their first "
                              "3 significant digits, or another cell name")
    _check_dependencies(planned)
    return SweepPlan(name, preset, grid, fixed, planned, named)


def _check_name(name: str, what: str) -> None:
    if not re.fullmatch(r"[A-Za-z0-9._+=-]+", name) or name in (".", "..") or name == "logs":
        raise RobustdropError(f"{what} {name!r} is not a safe folder name; use letters, digits and ._+=-")


def _refs(values: Mapping[str, Any]) -> list[str]:
    return [v[1:] for v in values.values() if is_cell_ref(v)]


def _train_cell(cname: str, values: dict[str, Any], preset: str | None, fixed: dict[str, Any],
                after: Sequence[str] = ()) -> Cell:
    """A training cell: its config resolved and validated (``"@cell"`` values stay, checked as strings)."""
    from robustdrop.diagnostics import select

    try:
        config = make_config(preset, **{**fixed, **values})
        select(config.diagnostics, reference=config.reference)
    except RobustdropError as exc:
        raise RobustdropError(f"cell {cname}: {exc}") from None
    except TypeError as exc:  # a TOML value of the wrong type, e.g. a list for a number
        raise RobustdropError(f"cell {cname}: {exc}") from None
    deps = list(dict.fromkeys([*after, *_refs(fixed), *_refs(values)]))
    return Cell(cname, values, config, "train", deps)


def _named_cell(cname: str, spec: Mapping[str, Any], preset: str | None, fixed: dict[str, Any]) -> Cell:
    _check_name(cname, "cell name")
    if not isinstance(spec, Mapping):
        raise RobustdropError(f"cell {cname}: write its values as a table, [sweep.cells.{cname}]")
    spec = dict(spec)
    kind = str(spec.pop("kind", "train"))
    after = spec.pop("after", [])
    if isinstance(after, str):
        after = [after]
    if kind not in CELL_KINDS:
        raise RobustdropError(f"cell {cname}: kind {kind!r} is not one of {', '.join(CELL_KINDS)}")
    if kind == "train":
        values = {config_key(k): _fixed_value(k, v) for k, v in spec.items()}
        return _train_cell(cname, values, preset, fixed, after)
    options = REPLAY_OPTIONS if kind == "replay" else EVALUATE_OPTIONS
    unknown = sorted(set(spec) - set(options))
    if unknown or "run" not in spec:
        raise RobustdropError(f"{kind} cell {cname}: give run = \"@cell\" (or a run directory) and any of "
                              f"{', '.join(k for k in options if k != 'run')}"
                              + (f"; unknown: {', '.join(unknown)}" if unknown else ""))
    action = _replay_action(cname, spec) if kind == "replay" else _evaluate_action(cname, spec)
    return Cell(cname, {}, None, kind, list(dict.fromkeys([*after, *_refs(action)])), action)


def _replay_action(cname: str, spec: dict[str, Any]) -> dict[str, Any]:
    """A replay cell's options, checked: strings where strings go, diagnostics that exist and can
    be replayed (their options too), and something to replay."""
    from robustdrop.diagnostics.replay import check_replay_words

    action = dict(spec)
    for key, value in action.items():
        if key != "diagnostics" and not isinstance(value, str):
            raise RobustdropError(f"replay cell {cname}: {key} must be a string, got {value!r}")
    words = action.get("diagnostics")
    if isinstance(words, str):
        words = action["diagnostics"] = [words]
    if words is not None and not (isinstance(words, list) and all(isinstance(w, str) for w in words)):
        raise RobustdropError(f"replay cell {cname}: diagnostics must be a list of names, e.g. [\"wong\"]")
    try:
        check_replay_words(words, action.get("reference"))
    except RobustdropError as exc:
        raise RobustdropError(f"cell {cname}: {exc}") from None
    return action


def _evaluate_action(cname: str, spec: dict[str, Any]) -> dict[str, Any]:
    """An evaluate cell's options, read and checked (ε and step sizes as track reads them, attack names)."""
    from robustdrop.engine.attack_eval import check_attack_names

    action = dict(spec)
    for key in ("epsilon", "pgd_step_size"):
        if key in action:
            action[key] = parse_value(key.replace("pgd_step_size", "eval_pgd_step_size"), str(action[key]))
    attacks = action.get("attacks", ["fgsm", "pgd"])
    try:
        action["attacks"] = check_attack_names([attacks] if isinstance(attacks, str) else list(attacks), "attacks")
    except RobustdropError as exc:
        raise RobustdropError(f"cell {cname}: {exc}") from None
    return action


def _check_dependencies(cells: Sequence[Cell]) -> None:
    """Every dependency is a cell of the sweep, and none depends on itself through others."""
    after = {c.name: c.after for c in cells}
    for cell in cells:
        for dep in cell.after:
            if dep not in after:
                raise RobustdropError(f"cell {cell.name} needs cell {dep!r}, which the sweep does not have; "
                                      f"cells: {', '.join(after)}")
    state: dict[str, int] = {}  # 1: on the current path, 2: checked

    def visit(name: str, path: list[str]) -> None:
        if state.get(name) == 2:
            return
        if state.get(name) == 1:
            raise RobustdropError(f"the cells' dependencies form a cycle: {' -> '.join([*path, name])}")
        state[name] = 1
        for dep in after[name]:
            visit(dep, [*path, name])
        state[name] = 2

    for cell in cells:
        visit(cell.name, [])


def resolve_refs(values: Mapping[str, Any], sweep_dir: str | os.PathLike) -> dict[str, Any]:
    """``values`` with every ``"@cell"`` replaced by that cell's run directory (absolute)."""
    return {k: str((Path(sweep_dir) / v[1:]).resolve()) if is_cell_ref(v) else v for k, v in values.items()}


def json_value(value: Any) -> Any:
    """A grid or fixed value as it is kept in sweep.json (NaN is not JSON)."""
    if isinstance(value, float) and math.isnan(value):
        return None
    return value
