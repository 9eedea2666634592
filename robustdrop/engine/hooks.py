"""The hook API: how diagnostics observe training without the training loop knowing them.

The :class:`~robustdrop.engine.trainer.Trainer` emits four events to every hook:

* ``on_run_start(run)`` — once, after the model, data and (on resume) the state are ready;
* ``on_train_step(run, batch, out)`` — after an optimisation step, with the batch, the
  :class:`~robustdrop.methods.StepOutput` (loss, logits, the training perturbation δ);
  only on steps the hook's cadence selects (``every_n_steps``);
* ``on_epoch_end(run, epoch)`` — after the epoch's evaluation, on the epochs the cadence selects;
* ``on_run_end(run)`` — once, when training ends (or stops early).

``run`` is the :class:`RunContext`: everything a hook may use of the run, declared in one place.
The trainer builds it and keeps ``epoch`` and ``step`` current; hooks read it and never reach
into the trainer or into other hooks. Hooks run inside :func:`robustdrop.engine.guarded`: the
model in eval mode, every global random state, each parameter's ``.grad`` (``None`` inside) and
every buffer restored afterwards, so a hook can not change the training; they must still take
their own randomness from :meth:`RunContext.generator` (reproducible numbers).

**Sharing values: ``run.metrics``.** The one channel between the trainer and hooks (and between
hooks) is ``run.metrics``, a ``{name: float}`` mapping of the current epoch's values, emptied at
the start of every epoch (the pattern of Lightning's ``trainer.callback_metrics``). Names are
``/``-separated paths that read as plot or TensorBoard tags:

* the trainer, after the epoch's training steps: ``train/loss``, ``train/acc``, ``train/lr``;
* the trainer's evaluation, before ``on_epoch_end``: ``{split}/acc/{attack}`` and
  ``{split}/loss/{attack}`` for each evaluated ``split`` (``probe``, ``val``, ``test``) and
  ``attack`` (``none``, ``fgsm``, ``pgd``; how each was obtained: ``run.eval_specs[attack]``),
  only on the epochs that split is evaluated — e.g. ``probe/acc/pgd``;
* a hook, under its name: ``{hook name}/{value}`` — e.g. ``strength/strength_ratio``,
  ``strength-ref/ref_acc_fgsm``, ``collapse/collapse_score`` (``Diagnostic.publish`` writes these).

A hook sees what the trainer and the hooks before it (in running order) wrote this epoch. The
metrics table (``run.log`` / ``run.store``) stays the record of every number and how it was
obtained; ``run.metrics`` only carries the epoch's values from one part to another.
"""

from __future__ import annotations

import contextlib
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from robustdrop.data import iterate_eval
from robustdrop.store import metric_row

if TYPE_CHECKING:
    from torch import nn

    from robustdrop.attacks import AttackSpec
    from robustdrop.data import Batch, ImageData
    from robustdrop.engine.config import TrackConfig
    from robustdrop.methods import StepOutput, TrainingMethod
    from robustdrop.store import RunStore


@dataclass(eq=False)
class RunContext:
    """What hooks see of a run. The trainer owns it; hooks treat every attribute as read-only.

    Attributes:
        config: the resolved :class:`~robustdrop.engine.TrackConfig`.
        store: the :class:`~robustdrop.store.RunStore` every hook writes through.
        model: the model being trained (hooks see it in eval mode).
        method: the :class:`~robustdrop.methods.TrainingMethod`.
        optimizer: the model's optimizer (hooks may read its state, e.g. the current momentum;
            they never step it).
        device: torch device of the model and of ``probe``.
        data: the :class:`~robustdrop.data.ImageData` (CPU).
        train_images: the uint8 ``(N, C, H, W)`` training tensor actually trained on (CPU).
        probe: ``(images uint8 (N, C, H, W), labels (N,))`` on ``device``: the fixed probe set.
        train_labels: the ``(N,)`` labels of ``train_images`` (CPU); ``None`` where a caller has none.
        steps_per_epoch: optimizer steps in one epoch.
        epoch: the current (1-based) epoch, 0 before training; ``step``: optimizer steps taken.
        eval_specs: the evaluation's attacks by name (``none``, ``fgsm``, ``pgd``), as in the
            ``{split}/acc/{attack}`` names of ``metrics``.
        metrics: the channel: this epoch's values by name (see the module docstring).
        autocast_factory: makes the autocast context of evaluation and diagnostics (use :meth:`autocast`).
        channels_last: whether batches are channels_last (use :meth:`probe_batches`).
        stop_request: ``(reason, rollback_to_epoch)`` once a hook called :meth:`request_stop`.
        switch_request: ``(reason, method)`` once a hook called :meth:`request_switch`.
    """

    config: TrackConfig
    store: RunStore
    model: nn.Module
    method: TrainingMethod
    optimizer: torch.optim.Optimizer
    device: torch.device
    data: ImageData
    train_images: torch.Tensor
    probe: tuple[torch.Tensor, torch.Tensor]
    train_labels: torch.Tensor | None = None
    steps_per_epoch: int = 0
    epoch: int = 0
    step: int = 0
    eval_specs: dict[str, AttackSpec] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    autocast_factory: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
    channels_last: bool = False
    stop_request: tuple[str, int | None] | None = None
    switch_request: tuple[str, str] | None = None

    def generator(self, name: str, epoch: int | None = None) -> torch.Generator:
        """A generator on ``device`` seeded by (run seed, ``name``, ``epoch``): reproducible and
        independent of the training's random state."""
        key = f"{self.config.seed}/{name}/{self.epoch if epoch is None else epoch}"
        return torch.Generator(device=self.device).manual_seed(zlib.crc32(key.encode()))

    def autocast(self) -> contextlib.AbstractContextManager:
        """The autocast context for evaluation attacks and diagnostics: a no-op (fp32) unless
        ``--eval-precision bf16`` on CUDA. Training's bf16 (``--amp``) never reaches hooks."""
        return self.autocast_factory()

    def probe_batches(self, batch_size: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The probe set as float batches in [0, 1], fixed order."""
        images, labels = self.probe
        yield from iterate_eval(images, labels, batch_size or self.config.eval_batch_size, self.device,
                                channels_last=self.channels_last)

    def log(self, source: str, split: str, metric: str, value: float, *, spec: AttackSpec | None = None, n: int = 0) -> None:
        """Append one metric row for the current epoch/step."""
        cols = spec.as_columns() if spec is not None else {}
        self.store.log_metrics([metric_row(self.epoch, self.step, split, metric, value, n=n, source=source, **cols)])

    def request_stop(self, reason: str, *, rollback_to_epoch: int | None = None) -> None:
        """Stop after this epoch; with ``rollback_to_epoch``, keep the newest checkpoint at or before
        that epoch as the run's result (``checkpoints/result.pt``)."""
        self.stop_request = (reason, rollback_to_epoch)

    def request_switch(self, reason: str, *, to: str) -> None:
        """Train with the method ``to`` (``METHOD[:key=value,...]``, as ``--switch-to``) from the next
        epoch on. The trainer records the event ``method_switch`` and keeps the switch in its
        checkpoints, so ``--resume`` continues with the same method."""
        self.switch_request = (reason, to)


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
    @property
    def state_key(self) -> str:
        """The key of this hook's state in checkpoints (Lightning's ``Callback.state_key``):
        ``name``, plus the :meth:`key_options` that tell two instances of one hook apart, e.g.
        ``collapse[patience=2]``. Hooks of one run must have different keys."""
        options = self.key_options()
        if not options:
            return self.name
        return f"{self.name}[{','.join(f'{k}={v}' for k, v in options.items())}]"

    def key_options(self) -> dict[str, Any]:
        """The options that distinguish this instance (none here; diagnostics: those not at their default)."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def __repr__(self) -> str:
        return f"{type(self).__name__}(every_n_steps={self.every_n_steps}, every_n_epochs={self.every_n_epochs})"
