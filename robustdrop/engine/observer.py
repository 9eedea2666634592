"""The end of an epoch for a model someone else trains: evaluate, run the hooks, record.

One home for what the :class:`~robustdrop.engine.Trainer`, the :class:`robustdrop.Monitor` (a
user's own training loop) and the replay over saved weights (:mod:`robustdrop.diagnostics.replay`)
share:

* :func:`make_context` — the :class:`RunContext` of a run, built from its config (evaluation
  attacks, autocast of evaluation and diagnostics) the same way for all three;
* :func:`guarded` — hooks and evaluation cannot change the training: every module's train/eval
  mode, every global random state (torch, CUDA, numpy, ``random``), every parameter's ``.grad``
  and every buffer (BatchNorm running statistics) are as before when the block ends;
* :class:`Observer` — which sets an epoch evaluates (probe / val / test as the config says),
  the evaluation itself (it fills the ``{split}/acc|loss/{attack}`` channel), emitting events to
  hooks, and the evaluation's metric rows (:func:`eval_rows`).
"""

from __future__ import annotations

import contextlib
import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from robustdrop.attacks import FGSM, PGD, Attack
from robustdrop.engine.evaluate import EvalResult, autocast_for, evaluate, spec_of
from robustdrop.engine.hooks import Hook, RunContext
from robustdrop.errors import RobustdropError
from robustdrop.store import metric_row

if TYPE_CHECKING:
    from robustdrop.data import ImageData
    from robustdrop.engine.config import TrackConfig
    from robustdrop.methods import TrainingMethod
    from robustdrop.store import RunStore

Sets = list[tuple[str, tuple[torch.Tensor, torch.Tensor], list[Attack | None]]]


# ----------------------------------------------------------------------------------------------
# Global random states
# ----------------------------------------------------------------------------------------------
def rng_state() -> dict[str, Any]:
    """Every global random state (Python, numpy, torch CPU, CUDA when present), picklable with
    ``weights_only`` checkpoints (numpy's as a list)."""
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    random.setstate(_as_tuple(state["python"]))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuple(x: Any) -> Any:
    return tuple(_as_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


# ----------------------------------------------------------------------------------------------
# The guard
# ----------------------------------------------------------------------------------------------
@contextlib.contextmanager
def guarded(model: nn.Module) -> Iterator[None]:
    """Run the block with ``model`` in eval mode and leave the training exactly as it was.

    Restored on exit: each module's ``training`` flag, every global random state, each
    parameter's ``.grad`` (the same tensor object, untouched: inside the block parameters have
    no ``.grad``, so a backward pass there writes new tensors that are dropped) and each buffer's
    values (BatchNorm running statistics, ``num_batches_tracked``). Attacks and diagnostics
    already take input gradients only and run in eval mode; the guard makes that a guarantee for
    any hook. No copy of the parameters or their gradients is made (buffers are copied: small).
    """
    rng = rng_state()
    modes = [m.training for m in model.modules()]
    params = list(model.parameters())
    grads = [p.grad for p in params]
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    for p in params:
        p.grad = None
    model.eval()
    try:
        yield
    finally:
        for module, mode in zip(model.modules(), modes):
            module.training = mode
        for p, grad in zip(params, grads):
            p.grad = grad
        with torch.no_grad():
            for b, values in buffers:
                b.copy_(values)
        set_rng_state(rng)


# ----------------------------------------------------------------------------------------------
# The context
# ----------------------------------------------------------------------------------------------
def eval_attacks(config: TrackConfig) -> list[Attack | None]:
    """The evaluation attacks of a run: clean (``None``), FGSM and PGD at ``--eval-epsilon``
    (else ``--epsilon``) with ``--eval-pgd-steps`` / ``--eval-pgd-step-size`` / ``--eval-restarts``."""
    eps = config.epsilon if config.eval_epsilon is None else config.eval_epsilon
    return [None, FGSM(eps), PGD(eps, steps=config.eval_pgd_steps, step_size=config.eval_pgd_step_size,
                                 restarts=config.eval_restarts)]


def make_context(config: TrackConfig, store: RunStore, model: nn.Module, *, device: torch.device, data: ImageData,
                 probe: tuple[torch.Tensor, torch.Tensor], method: TrainingMethod | None = None,
                 optimizer: torch.optim.Optimizer | None = None, train_images: torch.Tensor | None = None,
                 train_labels: torch.Tensor | None = None, steps_per_epoch: int = 0,
                 channels_last: bool = False) -> RunContext:
    """The :class:`RunContext` hooks see, built from ``config`` the one way: evaluation specs
    from :func:`eval_attacks`, the evaluation / diagnostics autocast from ``--eval-precision``
    (bf16 gradients can make an attack look weaker than it is; training's ``--amp`` never reaches
    hooks). ``probe``: uint8 ``(N, C, H, W)`` images and
    ``(N,)`` labels on ``device``; ``train_images`` defaults to none (an empty tensor), ``train_labels``
    (their labels, needed by the ``wong`` diagnostic) to ``None``."""
    return RunContext(config=config, store=store, model=model, method=method, optimizer=optimizer, device=device,
                      data=data, train_images=data.train_x[:0] if train_images is None else train_images,
                      probe=probe, train_labels=train_labels, steps_per_epoch=steps_per_epoch,
                      autocast_factory=autocast_for(device, config.eval_precision == "bf16"),
                      eval_specs={s.attack: s for s in map(spec_of, eval_attacks(config))},
                      channels_last=channels_last)


def eval_rows(epoch: int, step: int, results: Sequence[EvalResult]) -> list[dict[str, Any]]:
    """The metric rows of an evaluation: ``acc`` and ``loss`` per split and attack (``source=eval``)."""
    rows = []
    for r in results:
        cols = r.spec.as_columns()
        rows.append(metric_row(epoch, step, r.split, "acc", r.acc, n=r.n, source="eval", **cols))
        rows.append(metric_row(epoch, step, r.split, "loss", r.loss, n=r.n, source="eval", **cols))
    return rows


@dataclass
class EpochEnd:
    """What :meth:`Observer.end_epoch` did: the evaluation's results and wall seconds of each part."""

    results: list[EvalResult] = field(default_factory=list)
    eval_s: float = 0.0
    diag_s: float = 0.0


class Observer:
    """Evaluation and hook events of a run whose training happens elsewhere.

    Args:
        run: the context (:func:`make_context`); ``run.epoch`` / ``run.step`` are the caller's to keep.
        hooks: the hooks, in running order.
        val, test: ``(images uint8, labels)`` on the device, or ``None`` (not evaluated).
    """

    def __init__(self, run: RunContext, hooks: Sequence[Hook], *, val: tuple[torch.Tensor, torch.Tensor] | None = None,
                 test: tuple[torch.Tensor, torch.Tensor] | None = None):
        self.run = run
        self.hooks = hooks
        self.attacks = eval_attacks(run.config)
        self.val = val
        self.test = test

    def guard(self) -> contextlib.AbstractContextManager:
        """:func:`guarded` of the run's model."""
        return guarded(self.run.model)

    def emit(self, event: str, *args: Any, hooks: Sequence[Hook] | None = None) -> float:
        """Call ``hook.<event>(run, *args)`` for ``hooks`` (default: all) under the guard; returns
        the wall seconds (0 without hooks)."""
        hooks = self.hooks if hooks is None else hooks
        if not hooks:
            return 0.0
        start = time.perf_counter()
        with self.guard():
            for hook in hooks:
                getattr(hook, event)(self.run, *args)
        return time.perf_counter() - start

    def due(self, epoch: int) -> list[Hook]:
        """The hooks whose cadence selects ``epoch`` (``last``: ``epoch == config.epochs``)."""
        return [h for h in self.hooks if h.wants_epoch(epoch, last=epoch == self.run.config.epochs)]

    def eval_sets(self, epoch: int) -> Sets:
        """What the run evaluates at the end of ``epoch``: ``(split, (images, labels), attacks)``:
        the probe (clean, FGSM, PGD) and the validation split (clean, PGD) every ``eval_every``
        epochs and at the last; the test set every ``test_every`` epochs and at the last."""
        cfg = self.run.config
        last = epoch == cfg.epochs
        sets: Sets = []
        if epoch % cfg.eval_every == 0 or last:
            sets.append(("probe", self.run.probe, self.attacks))
            if self.val is not None and len(self.val[1]):
                sets.append(("val", self.val, [self.attacks[0], self.attacks[2]]))
        if self.test is not None and (last or (cfg.test_every and epoch % cfg.test_every == 0)):
            sets.append(("test", self.test, self.attacks))
        return sets

    def evaluate(self, epoch: int) -> list[EvalResult]:
        """Evaluate the sets of ``epoch`` (random starts from ``run.generator("eval/<split>")``) and
        put ``{split}/acc/{attack}``, ``{split}/loss/{attack}`` in the channel."""
        run = self.run
        results = []
        for split, (images, labels), attacks in self.eval_sets(epoch):
            here = evaluate(run.model, images, labels, attacks, split=split, batch_size=run.config.eval_batch_size,
                            device=run.device, generator=run.generator(f"eval/{split}"),
                            autocast=run.autocast_factory, channels_last=run.channels_last)
            for r in here:
                results.append(r)
                run.metrics[f"{split}/acc/{r.spec.attack}"] = r.acc
                run.metrics[f"{split}/loss/{r.spec.attack}"] = r.loss
        return results

    def end_epoch(self, epoch: int, step: int, *, evaluate: bool = True,
                  before_hooks: Callable[[list[EvalResult]], None] | None = None) -> EpochEnd:
        """The whole end of ``epoch`` (at optimizer step ``step``) for a model trained elsewhere,
        under the guard: the channel emptied, the evaluation (its rows logged), then
        ``on_epoch_end`` of the due hooks. ``before_hooks(results)`` runs between the two (e.g. to
        log rows the hooks should follow)."""
        run = self.run
        run.epoch, run.step = epoch, step
        run.metrics.clear()
        out = EpochEnd()
        with self.guard():
            start = time.perf_counter()
            if evaluate:
                out.results = self.evaluate(epoch)
                run.store.log_metrics(eval_rows(epoch, step, out.results))
            if before_hooks is not None:
                before_hooks(out.results)
            out.eval_s = time.perf_counter() - start
            start = time.perf_counter()
            for hook in self.due(epoch):
                hook.on_epoch_end(run, epoch)
            out.diag_s = time.perf_counter() - start
        return out


def check_logits(view: nn.Module, images: torch.Tensor, labels: torch.Tensor, device: torch.device) -> int:
    """The number of classes the model outputs; a one-line error unless its output is ``(N, classes)``
    logits with a class for every probe label. Runs the model on two probe images, guarded."""
    x = images[:2].to(device, torch.float32) / 255
    with guarded(view), torch.no_grad():
        try:
            out = view(x)
        except Exception as exc:  # the user's model may raise anything on a wrong input shape
            line = str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
            raise RobustdropError(f"the model fails on probe images of shape {tuple(x.shape)} ({line}); give a probe "
                                  "of the images the model is trained on") from None
    if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[0] != len(x):
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise RobustdropError(f"the model's output must be logits of shape (N, classes), got {got} for N={len(x)}; "
                              "wrap the model so that it returns the logits tensor")
    classes = int(out.shape[1])
    if int(labels.max()) >= classes:
        raise RobustdropError(f"the probe has label {int(labels.max())} but the model outputs {classes} classes")
    return classes
