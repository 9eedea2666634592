"""robustdrop's Monitor as a PyTorch Lightning callback (the optional extra ``robustdrop[lightning]``).

>>> from robustdrop.lightning import RobustdropCallback
>>> monitor = RobustdropCallback(epsilon=8/255, probe=test_set, normalize=(mean, std),
...                              reference="builtin:quick", runs_dir="runs", name="my-fgsm")
>>> trainer = lightning.Trainer(max_epochs=30, callbacks=[monitor])
>>> trainer.fit(module, train_loader)

It does what :class:`robustdrop.Monitor` does in a plain loop (the probe evaluation, the default
diagnostics, the collapse detector; an ordinary run directory) from a ``LightningModule``'s training:

* **The model** is the LightningModule itself (its ``forward`` must return the logits), or the
  submodule named by ``model="net"`` (``pl_module.net``).
* **The training perturbation** (optional, for the ``train-perturbation`` rows and the early rule's
  signals): ``training_step`` returns a dict ``{"loss": loss, "delta": delta}``, ``delta`` the
  perturbation added to the batch's inputs ``batch[0]`` (labels ``batch[1]``), in the model's input
  space (normalized units with ``normalize``). When the step transforms the inputs first
  (augmentation, normalization), return what the model saw as ``"x"`` (the clean inputs) and
  ``"y"`` too; ``"logits"`` (on ``x + delta``) adds the training accuracy. A step that returns a
  bare loss is fine: the monitor then only evaluates.
* **At each training epoch's end** (``on_train_epoch_end``, robustdrop epoch = Lightning's
  ``current_epoch + 1``) the epoch's values are logged to Lightning's logger as well
  (``pl_module.log``, names prefixed ``robustdrop/``, e.g. ``robustdrop/probe/acc/pgd``,
  ``robustdrop/collapse_warning`` and ``robustdrop/collapse`` as 0 / 1), and the last
  :class:`~robustdrop.monitor.EpochReport` is ``callback.report``. With ``on_collapse="stop"`` the
  trainer stops after the epoch where the detector fires (``trainer.should_stop``).
* **Several processes** (DDP): the monitor lives in the process of global rank 0 and observes
  that process's batches; the others train only.
* **Checkpoints**: the monitor's state (run position, detector) is stored in every Lightning
  checkpoint (``Callback.state_dict``); ``trainer.fit(..., ckpt_path=...)`` resumes the same run
  directory with no epoch twice and none missing. A checkpoint written after the epoch's training
  but before this callback's epoch end (``ModelCheckpoint`` on a validation metric saves at the
  validation's end) holds the state of the epoch before; the resumed monitor then records that
  epoch first, from the restored weights, which are exactly the epoch's.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from robustdrop.errors import RobustdropError

try:
    from lightning.pytorch import Callback
except ImportError:  # pragma: no cover - the older package name
    try:
        from pytorch_lightning import Callback
    except ImportError:
        raise ImportError("robustdrop.lightning needs PyTorch Lightning: pip install 'robustdrop[lightning]'") from None

LOG_PREFIX = "robustdrop/"


class RobustdropCallback(Callback):
    """The :class:`robustdrop.Monitor` of a Lightning training (see the module docstring).

    Args:
        epsilon, probe, normalize, reference, runs_dir, name, overwrite, **options: as for
            :class:`robustdrop.Monitor` (``epochs`` defaults to the trainer's ``max_epochs``,
            ``steps_per_epoch`` to its training batches per epoch).
        model: the attribute of the LightningModule that maps inputs to logits (default: the
            module itself).
        log: also log the epoch's values with ``pl_module.log``.
        progress: print one line per epoch.
    """

    def __init__(self, *, epsilon: float, probe: Any, normalize: Any = None, reference: str | None = None,
                 runs_dir: str | Path = "runs", name: str | None = None, model: str | None = None,
                 log: bool = True, progress: bool = True, overwrite: bool = False, **options: Any):
        self.kwargs = dict(epsilon=epsilon, probe=probe, normalize=normalize, reference=reference,
                           runs_dir=runs_dir, name=name, overwrite=overwrite, progress=progress, **options)
        self.model_attr = model
        self._log = log
        self.monitor = None  # robustdrop.Monitor, made at the training's start
        self.report = None  # the last EpochReport
        self._pending: dict[str, Any] | None = None  # a checkpoint's state, until the monitor exists

    @property
    def state_key(self) -> str:
        return self._generate_state_key(name=self.kwargs["name"])

    # -- the monitor ---------------------------------------------------------------------------
    def _model(self, pl_module: nn.Module) -> nn.Module:
        if self.model_attr is None:
            return pl_module
        model = getattr(pl_module, self.model_attr, None)
        if not isinstance(model, nn.Module):
            raise RobustdropError(f"RobustdropCallback(model={self.model_attr!r}): the LightningModule has no submodule "
                                  f"{self.model_attr!r}; name the attribute that holds the network")
        return model

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        from robustdrop.monitor import Monitor  # api layer; imported when used

        if trainer.global_rank != 0:  # one writer per run directory: the other processes only train
            return

        options = dict(self.kwargs)
        if "epochs" not in options and trainer.max_epochs and trainer.max_epochs > 0:
            options["epochs"] = int(trainer.max_epochs)
        batches = trainer.num_training_batches
        if "steps_per_epoch" not in options and isinstance(batches, int) and batches > 0:
            options["steps_per_epoch"] = batches
        if self._pending is not None:  # resuming: the run directory is this one's, continued
            options["overwrite"] = False
        self.monitor = Monitor(self._model(pl_module), **options)
        if self._pending is not None:
            self.monitor.load_state_dict(self._pending)
            self._pending = None
            done = int(trainer.current_epoch)  # Lightning's finished epochs = robustdrop's last epoch
            if self.monitor.epoch == done - 1:  # the checkpoint was taken before our epoch end (see docstring)
                self.report = self.monitor.epoch_end(done, step=int(trainer.global_step))

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.monitor is None:
            return
        out = outputs if isinstance(outputs, dict) else {"loss": outputs}
        x = out.get("x", batch[0] if isinstance(batch, (tuple, list)) else None)
        y = out.get("y", batch[1] if isinstance(batch, (tuple, list)) and len(batch) > 1 else None)
        if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
            if "delta" in out:
                raise RobustdropError("RobustdropCallback: the batch is not (x, y); return the clean inputs and labels "
                                      "as training_step's 'x' and 'y' with its 'delta'")
            return
        loss = out.get("loss")
        self.monitor.observe(x, y, delta=out.get("delta"), loss=loss.detach() if isinstance(loss, torch.Tensor)
                             else loss, logits=out.get("logits"))

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        if self.monitor is None:
            return
        epoch = int(trainer.current_epoch) + 1
        if epoch <= self.monitor.epoch:  # already recorded (a resumed checkpoint's catch-up)
            return
        self.report = report = self.monitor.epoch_end(epoch, step=int(trainer.global_step))
        if self._log:
            values = {LOG_PREFIX + k: float(v) for k, v in report.values.items()
                      if isinstance(v, (int, float)) and math.isfinite(v)}
            values[LOG_PREFIX + "collapse_warning"] = float(report.warning)
            values[LOG_PREFIX + "collapse"] = float(report.collapse)
            pl_module.log_dict(values, on_step=False, on_epoch=True, logger=True, rank_zero_only=True)
        if report.stop:
            trainer.should_stop = True

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        if self.monitor is not None:
            self.monitor.close()

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        if self.monitor is not None:
            self.monitor.close()

    # -- Lightning checkpoints -------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        if self.monitor is not None and self.monitor.epoch:
            return self.monitor.state_dict()
        return dict(self._pending or {})

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending = dict(state_dict) if state_dict else None
