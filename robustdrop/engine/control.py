"""What the trainer does with a hook's requests at the end of an epoch: stop (with an optional
rollback) and switch the training method.

A hook asks through its :class:`~robustdrop.engine.RunContext` (``request_stop``,
``request_switch``); the trainer answers after the epoch's evaluation, diagnostics and metric rows
and before the epoch's checkpoint, so the checkpoint holds the answer:

* stop: a ``stop`` event, and the run ends after this epoch. With a rollback epoch (e.g. ``--on-collapse
  rollback``) the newest kept checkpoint at or before it becomes ``checkpoints/result.pt``, the
  run's result (a ``rollback`` event; ``rollback_failed`` when none is kept);
* switch (e.g. ``--on-collapse switch``): from the next epoch the
  run trains with the method of the ``--switch-to`` spec, same model and optimizer; the switch is a
  ``method_switch`` event and is checkpointed (``switches``), so a resume trains on as switched.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from robustdrop.engine.config import switched_config
from robustdrop.methods import create_method
from robustdrop.store import load_checkpoint_file

if TYPE_CHECKING:
    from robustdrop.engine.trainer import Trainer


def handle_stop(trainer: Trainer) -> None:
    """Record the stop request; with a rollback epoch, keep the checkpoint to roll back to as the result."""
    t = trainer
    reason, rollback = t._stop
    t.store.log_event("stop", epoch=t.epoch, step=t.step, reason=reason)
    if rollback is None:
        return
    # last.pt still holds the previous epoch (or, after a mid-epoch resume, part of this one):
    # this epoch is saved after the stop is handled.
    saver = t.saver
    source = saver.rollback_source(rollback, last_epoch=t.epoch - 1 if t._last_is_epoch_end else None)
    if source is None:
        t.store.log_event("rollback_failed", epoch=t.epoch, step=t.step, to_epoch=rollback)
        return
    result = saver.keep_as_result(source)
    to_epoch = int(load_checkpoint_file(result)["epoch"])
    t.store.log_event("rollback", epoch=t.epoch, step=t.step, to_epoch=to_epoch,
                      checkpoint=f"checkpoints/{result.name}")


def switch_method(trainer: Trainer, to: str) -> None:
    """Train with the method of ``to`` (a ``--switch-to`` spec) from now on, same model and optimizer."""
    method = create_method(switched_config(trainer.config, to))
    method.setup(trainer.model, trainer._method_context)
    trainer.method = trainer.run.method = method


def handle_switch(trainer: Trainer) -> None:
    """Answer the switch request: switch the method, remember it for the checkpoint, record and print it."""
    t = trainer
    reason, to = t.run.switch_request
    t.run.switch_request = None
    before = t.method.name
    switch_method(t, to)
    t._switches.append({"epoch": t.epoch, "to": to})
    t.store.log_event("method_switch", epoch=t.epoch, step=t.step, to=to, method=t.method.name,
                      previous=before, spec=t.method.perturbation_spec().as_columns(), reason=reason)
    print(f"switched training from {before} to {to} after epoch {t.epoch}: {reason}", flush=True)
