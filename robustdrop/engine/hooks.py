"""The hook API: how diagnostics observe training without the training loop knowing them.

The :class:`~robustdrop.engine.trainer.Trainer` emits four events to every hook:

* ``on_run_start(run)`` — once, after the model, data and (on resume) the state are ready;
* ``on_train_step(run, batch, out)`` — after an optimisation step, with the batch, the
  :class:`~robustdrop.methods.StepOutput` (loss, logits, the training perturbation δ);
  only on steps the hook's cadence selects (``every_n_steps``);
* ``on_epoch_end(run, epoch)`` — after the epoch's evaluation, on the epochs the cadence selects;
* ``on_run_end(run)`` — once, when training ends (or stops early).

``run`` is the :class:`RunContext` (the trainer's public face): model, probe set, store, device,
the epoch's evaluation numbers, and ``request_stop``. Hooks run with the model in eval mode
and with every global random state saved and restored around them, so a hook can not change the
training; they must still take their own randomness from :meth:`RunContext.generator` and must
not touch parameter gradients.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from robustdrop.data import Batch
    from robustdrop.engine.trainer import RunContext
    from robustdrop.methods import StepOutput


class Hook:
    """Base class of a diagnostic.

    Args:
        every_n_steps: call ``on_train_step`` every N optimizer steps (0 = never).
        every_n_epochs: call ``on_epoch_end`` every N epochs (0 = only on ``at_epochs``).
        at_epochs: extra epochs on which ``on_epoch_end`` runs.
    """

    name = "hook"

    def __init__(self, *, every_n_steps: int = 0, every_n_epochs: int = 1, at_epochs: Iterable[int] = ()):
        self.every_n_steps = int(every_n_steps)
        self.every_n_epochs = int(every_n_epochs)
        self.at_epochs = {int(e) for e in at_epochs}

    # -- cadence ------------------------------------------------------------------------------
    def wants_step(self, step: int) -> bool:
        return self.every_n_steps > 0 and step % self.every_n_steps == 0

    def wants_epoch(self, epoch: int, *, last: bool = False) -> bool:
        if epoch in self.at_epochs:
            return True
        return self.every_n_epochs > 0 and (epoch % self.every_n_epochs == 0 or last)

    # -- events -------------------------------------------------------------------------------
    def on_run_start(self, run: RunContext) -> None:
        pass

    def on_train_step(self, run: RunContext, batch: Batch, out: StepOutput) -> None:
        pass

    def on_epoch_end(self, run: RunContext, epoch: int) -> None:
        pass

    def on_run_end(self, run: RunContext) -> None:
        pass

    # -- resume -------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def __repr__(self) -> str:
        return f"{type(self).__name__}(every_n_steps={self.every_n_steps}, every_n_epochs={self.every_n_epochs})"
