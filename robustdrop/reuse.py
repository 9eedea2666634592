"""The one rule for an existing run directory: reuse it, resume it, or train it again.

``track``'s callers that may meet a run already on disk (:func:`robustdrop.api.ensure`, every
sweep cell, the analyses) ask :func:`decide` and do what it says:

* ``start``: no run there yet;
* ``reuse``: a finished run made with the wanted config (compared field by field, below);
* ``resume``: the same config, stopped before its end (``checkpoints/last.pt`` not finished);
* ``retrain``: anything else (another config, no or an unreadable checkpoint, a shipped referee
  that changed, an output the wanted run keeps but this one did not); the directory is replaced.

**The comparison.** Both configs are resolved (:meth:`TrackConfig.from_dict`: fields added to
robustdrop since the run was made take their defaults) and compared field by field, except:

* :data:`NEUTRAL_FIELDS`, which cannot change a number the run records: where and how fast the
  same computation runs (``device``, ``threads``, ``channels_last``: these change floating-point
  rounding, never what is computed, and ``resume`` may already change device and threads), where
  the named dataset's files are (``data_dir``), how evaluation batches (``eval_batch_size``:
  evaluation is per example, batch norm in eval mode), and the live TensorBoard copy of the rows;
* :data:`OUTPUT_FIELDS`, the checkpoint policy (which files are kept, never what is computed):
  the existing run must keep at least what the wanted one asks for (same value, or the wanted one
  off), or, when finished, have the files on disk (runs made before the field existed);
* ``reference`` as a run directory or checkpoint path is compared by its last path component
  (a run moved with its referee stays the same run); a ``builtin:NAME`` referee must also be the
  file shipped now (its SHA-256 in the run's ``reference`` event).

``epochs`` is compared like any field: a longer run is ``robustdrop track --resume RUN --epochs N``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from robustdrop.engine.config import TrackConfig
from robustdrop.errors import RobustdropError
from robustdrop.store import LAST, RunStore, epoch_checkpoint_name
from robustdrop.store.checkpoints import BEST, weights_checkpoint_name

# Fields that cannot change a recorded number (why: see the module docstring).
NEUTRAL_FIELDS = ("device", "threads", "channels_last", "data_dir", "eval_batch_size", "tensorboard")
# The checkpoint policy: which files are kept (see :class:`robustdrop.store.CheckpointSaver`).
OUTPUT_FIELDS = ("checkpoint_every", "keep_best", "save_weights_every")
ACTIONS = ("start", "reuse", "resume", "retrain")


@dataclass(frozen=True)
class Decision:
    """What to do with a run directory: ``action`` (one of :data:`ACTIONS`) and ``why`` (one line);
    ``differing``: the compared fields whose values differ."""

    action: str
    why: str
    differing: tuple[str, ...] = field(default=())


def _reference_key(value: Any) -> Any:
    """``reference`` as compared: a path by its last component, anything else as it is."""
    if not isinstance(value, str) or value in ("auto",) or value.startswith("builtin:"):
        return value
    return Path(value).name


def config_difference(stored: dict[str, Any] | TrackConfig, wanted: TrackConfig) -> list[str]:
    """The fields (other than :data:`NEUTRAL_FIELDS` and :data:`OUTPUT_FIELDS`) in which a run's
    stored config differs from ``wanted``. Raises :class:`RobustdropError` on keys this robustdrop
    does not know."""
    have = (stored if isinstance(stored, TrackConfig) else TrackConfig.from_dict(dict(stored))).to_dict()
    want = wanted.to_dict()
    skip = set(NEUTRAL_FIELDS) | set(OUTPUT_FIELDS)
    diff = []
    for key in sorted(set(have) | set(want)):
        if key in skip:
            continue
        a, b = have.get(key), want.get(key)
        if key == "reference":
            a, b = _reference_key(a), _reference_key(b)
        if a != b:
            diff.append(key)
    return diff


def _off(value: Any) -> bool:
    return value in (None, 0, "", False)


def _outputs_missing(path: Path, stored: TrackConfig, wanted: TrackConfig, finished: bool, epochs: int) -> list[str]:
    """The output fields the wanted run asks for that the existing one does not keep."""
    missing = []
    for key in OUTPUT_FIELDS:
        want, have = getattr(wanted, key), getattr(stored, key)
        if _off(want) or want == have:
            continue
        if finished and _files_present(path, key, want, epochs):
            continue  # a run made before the field existed, or by an equivalent hook
        missing.append(key)
    return missing


def _files_present(path: Path, key: str, value: Any, epochs: int) -> bool:
    folder = path / "checkpoints"
    if key == "keep_best":
        return (folder / f"{BEST}.pt").is_file()
    name = epoch_checkpoint_name if key == "checkpoint_every" else weights_checkpoint_name
    return all((folder / f"{name(e)}.pt").is_file() for e in range(int(value), epochs + 1, int(value)))


def _builtin_changed(path: Path, reference: str) -> bool:
    """Whether the run's ``reference`` event names another SHA-256 than the shipped ``builtin:NAME``."""
    from robustdrop.diagnostics import verify_builtin

    try:
        shipped = verify_builtin(reference.split(":", 1)[1])[1].get("sha256")
        events = RunStore.open(path).events("reference")
    except Exception:  # an unreadable run or referee: not the same run
        return True
    return not events or events[0].get("sha256") != shipped


def _checkpoint_state(path: Path) -> dict[str, Any] | None:
    """``last.pt``'s small entries (None if absent or unreadable); memory-mapped, the weights stay on disk."""
    import torch

    last = RunStore(path).checkpoint_path(LAST)
    if not last.is_file():
        return None
    try:
        state = torch.load(last, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # a torn or foreign file
        return None
    return state if isinstance(state, dict) else None


def decide(run_dir: str | os.PathLike, wanted: TrackConfig) -> Decision:
    """Reuse, resume or retrain the run in ``run_dir`` for the config ``wanted`` (module docstring)."""
    path = Path(run_dir)
    config_file = path / RunStore.CONFIG
    if not path.exists() or (path.is_dir() and not any(path.iterdir())):
        return Decision("start", "no run yet")
    if not config_file.is_file():
        return Decision("retrain", "no config.json")
    try:
        stored = TrackConfig.from_dict(json.loads(config_file.read_text()))
    except (OSError, json.JSONDecodeError, TypeError, AttributeError):
        return Decision("retrain", "unreadable config.json")
    except RobustdropError as exc:  # keys this robustdrop does not know
        return Decision("retrain", str(exc))
    diff = config_difference(stored, wanted)
    if diff:
        shown = ", ".join(f"{k}: {getattr(stored, k)!r} -> {getattr(wanted, k)!r}" for k in diff[:3])
        return Decision("retrain", f"config differs ({shown}{', ...' if len(diff) > 3 else ''})", tuple(diff))
    if str(wanted.reference or "").startswith("builtin:") and _builtin_changed(path, wanted.reference):
        return Decision("retrain", f"made with another {wanted.reference} than the one shipped now", ("reference",))
    state = _checkpoint_state(path)
    if state is None:
        return Decision("retrain", "no readable checkpoints/last.pt")
    finished = bool(state.get("finished"))
    missing = _outputs_missing(path, stored, wanted, finished, int(stored.epochs))
    if missing:
        return Decision("retrain", f"made without {', '.join(f'{k}={getattr(wanted, k)!r}' for k in missing)}",
                        tuple(missing))
    if finished:
        return Decision("reuse", f"finished at epoch {state.get('epoch')}")
    return Decision("resume", f"stopped after epoch {state.get('epoch')}")
