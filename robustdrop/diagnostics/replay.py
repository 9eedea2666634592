"""Diagnostics replayed over saved per-epoch weights: nothing is trained again.

A finished training that kept its weights epoch by epoch can be diagnosed after the fact: each
epoch's weights are loaded into the model and the epoch's end runs as it would have during
training (the same :class:`~robustdrop.engine.Observer`: evaluation, the due hooks under the
guard, the run's seeded generators — seeded by run seed, name and epoch — so a replayed row is
the row an in-training measurement logs, its ``time_s`` aside).

The weights are any iterable of ``(epoch, state_dict)`` pairs (or ``(epoch, state_dict, step)``
triples, ``step`` = the optimizer step at the end of that epoch for the ``step`` column; 0 when
not given), in increasing epoch order, e.g.::

    weights = ((epoch, torch.load(path, weights_only=True)["model"]) for epoch, path in files)
    replay(weights, model, lambda epoch, step: observer.end_epoch(epoch, step))

Users: ``robustdrop diagnose`` and :meth:`robustdrop.Monitor.replay` (the user's checkpoints),
and the analyses' deferred referee measurement (:func:`replay_hooks`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any, TypeVar

import torch
from torch import nn

from robustdrop.engine import EpochEnd, Observer
from robustdrop.errors import RobustdropError

R = TypeVar("R")
Weights = Iterable[tuple[int, Mapping[str, torch.Tensor]] | tuple[int, Mapping[str, torch.Tensor], int]]


def load_weights(model: nn.Module, state: Mapping[str, Any], *, what: str) -> None:
    """Load ``state`` (a model ``state_dict``) into ``model`` exactly: every key present, no
    extra key, every shape equal; else a one-line :class:`RobustdropError` naming ``what``
    (e.g. the checkpoint file) and the first difference. ``model`` is untouched on error."""
    if not isinstance(state, Mapping):
        raise RobustdropError(f"{what} is not a model state_dict (got {type(state).__name__}); give the weights "
                              "as {parameter name: tensor}")
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    extra = [k for k in state if k not in expected]
    if missing or extra:
        part = (f"lacks {missing[:3]}" if missing else "") + (" and " if missing and extra else "") + \
               (f"has {extra[:3]} that the model lacks" if extra else "")
        raise RobustdropError(f"{what} does not fit the model ({type(model).__name__}): it {part}; give the "
                              "model that saved these weights")
    for key, tensor in expected.items():
        got = state[key]
        if not isinstance(got, torch.Tensor) or tuple(got.shape) != tuple(tensor.shape):
            shape = tuple(got.shape) if isinstance(got, torch.Tensor) else type(got).__name__
            raise RobustdropError(f"{what} does not fit the model ({type(model).__name__}): its {key} is {shape}, "
                                  f"the model's is {tuple(tensor.shape)}; give the model that saved these weights")
    model.load_state_dict(state)


def replay(weights: Weights, model: nn.Module, end_epoch: Callable[[int, int], R], *,
           after_epoch: int = 0) -> list[R]:
    """For each ``(epoch, state_dict[, step])`` of ``weights``: load the weights into ``model``
    (:func:`load_weights`) and call ``end_epoch(epoch, step)``; returns what those calls returned.

    Epochs must be whole numbers >= 1, increasing, and after ``after_epoch`` (the epochs already
    recorded, e.g. a resumed replay); anything else is a :class:`RobustdropError` raised before
    that epoch's weights are used. The iterable is consumed lazily (one state in memory at a time).
    """
    out = []
    previous = after_epoch
    for item in weights:
        if not isinstance(item, tuple) or len(item) not in (2, 3):
            raise RobustdropError("replay takes (epoch, state_dict) pairs or (epoch, state_dict, step) triples, "
                                  f"got {type(item).__name__}")
        epoch, state = item[0], item[1]
        step = int(item[2]) if len(item) == 3 else 0
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 1:
            raise RobustdropError(f"replay: epoch {epoch!r} is not a whole number >= 1")
        if epoch <= previous:
            raise RobustdropError(f"replay: epoch {epoch} comes after epoch {previous}; give the weights once per "
                                  "epoch, in increasing order, after the epochs already recorded")
        load_weights(model, state, what=f"the weights of epoch {epoch}")
        out.append(end_epoch(epoch, step))
        previous = epoch
    return out


def replay_hooks(observer: Observer, weights: Weights, *, evaluate: bool = False,
                 on_epoch: Callable[[int, EpochEnd], None] | None = None) -> list[EpochEnd]:
    """:func:`replay` of ``observer``'s hooks (and, with ``evaluate``, its evaluation) over
    ``weights`` loaded into ``observer.run.model``; ``on_epoch(epoch, result)`` after each epoch.
    The caller emits ``on_run_start`` first (``observer.emit("on_run_start")``)."""

    def end(epoch: int, step: int) -> EpochEnd:
        result = observer.end_epoch(epoch, step, evaluate=evaluate)
        if on_epoch is not None:
            on_epoch(epoch, result)
        return result

    return replay(weights, observer.run.model, end)
