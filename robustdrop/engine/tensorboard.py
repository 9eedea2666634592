"""``track --tensorboard``: the run's metric rows as TensorBoard scalars, live, in ``<run>/tensorboard/``.

A hook that subscribes a :class:`~robustdrop.store.tensorboard.TensorBoardWriter` to the run's
store: every row is written (and flushed) the moment it is logged, with the tags described in
:mod:`robustdrop.store.tensorboard`. On resume, events an interrupted process wrote after the
checkpoint are purged. Watch with ``tensorboard --logdir runs/``.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from robustdrop.engine.hooks import Hook
from robustdrop.store.tensorboard import TensorBoardWriter, import_summary_writer

if TYPE_CHECKING:
    from robustdrop.engine.hooks import RunContext

FOLDER = "tensorboard"


class TensorBoardHook(Hook):
    """Args: log_dir: the event folder (default ``<run>/tensorboard``)."""

    name = "tensorboard"

    def __init__(self, log_dir: str | Path | None = None):
        super().__init__(every_n_epochs=0)
        import_summary_writer()  # fail before training, with the install hint
        self.log_dir = None if log_dir is None else Path(log_dir)
        self.writer: TensorBoardWriter | None = None

    def on_run_start(self, run: RunContext) -> None:
        log_dir = self.log_dir or run.store.path / FOLDER
        resumed = run.step > 0
        self.writer = TensorBoardWriter(log_dir, run_epsilon=run.config.epsilon,
                                        purge_step=run.step + 1 if resumed else None)
        if not resumed:  # rows logged before this hook started (e.g. epoch 0 of earlier hooks)
            self.writer.write(run.store.metrics().to_dict("records"))
        run.store.add_sink(self.writer.write)

    def on_run_end(self, run: RunContext) -> None:
        if self.writer is not None:
            run.store.remove_sink(self.writer.write)
            self.writer.close()
            self.writer = None
