"""What a training run tells its user while it runs: the cost estimate and the progress text.

* the cost estimate (:class:`~robustdrop.engine.estimate.Estimate`): the run's own steps timed after
  a warm-up (:class:`~robustdrop.engine.estimate.StepTimer`) plus each evaluation attack timed on a
  probe slice, scaled to what the run will still evaluate; printed once (one line) and recorded as
  an ``estimate`` event, or returned by a dry run (:func:`dry_run_estimate`, which writes nothing);
* run-level progress: epochs done, wall time elapsed across resumes and the time left (measured
  from the epochs done once there is one, else from the estimate), in the progress bar's
  description and at the end of each epoch's summary line (:func:`print_summary`).

Functions take the :class:`~robustdrop.engine.Trainer` whose run they describe; they read it and
change nothing but ``trainer.estimate``.
"""

from __future__ import annotations

import sys
import time
from typing import TYPE_CHECKING

import torch
from tqdm.auto import tqdm

from robustdrop.engine.estimate import Estimate, StepTimer, describe_device, time_evaluation
from robustdrop.engine.evaluate import spec_of
from robustdrop.engine.hooks import Hook
from robustdrop.formatting import format_duration

if TYPE_CHECKING:
    from robustdrop.engine.checkpoint import EpochProgress
    from robustdrop.engine.trainer import Trainer

ESTIMATE_EXAMPLES_CPU = 32  # probe examples the cost estimate times the evaluation on (CPU; a batch on CUDA)


def estimate_cost(trainer: Trainer, timer: StepTimer, *, epoch: int, steps_done: int) -> Estimate:
    """The cost of the run from step ``steps_done`` of ``epoch`` on (see engine/estimate.py)."""
    t = trainer
    cfg, n = t.config, len(t.loader)
    timed_on = next((s for s in (t.probe, t.val, t.test) if len(s[1])), t.probe)
    slice_n = ESTIMATE_EXAMPLES_CPU if t.device.type == "cpu" else cfg.eval_batch_size
    per_example = time_evaluation(t.model, *timed_on, t.eval_attacks, device=t.device,
                                  autocast=t._autocast, channels_last=t._channels_last, n=slice_n)
    eval_s = sum(len(labels) * sum(per_example[spec_of(a).attack] for a in attacks)
                 for e in range(epoch, cfg.epochs + 1) for _, (_, labels), attacks in t.observer.eval_sets(e))
    steps_left = (cfg.epochs - epoch + 1) * n - steps_done
    return Estimate(device=describe_device(t.device), on_cpu=t.device.type == "cpu",
                    seconds_per_step=timer.seconds_per_step, steps_timed=timer.timed, steps_per_epoch=n,
                    epochs=cfg.epochs, epochs_left=steps_left / n, train_s=steps_left * timer.seconds_per_step,
                    eval_s=eval_s, eval_examples_timed=min(slice_n, len(timed_on[1])),
                    diagnostics=any(type(h).on_epoch_end is not Hook.on_epoch_end for h in t.hooks))


def report_estimate(trainer: Trainer, timer: StepTimer) -> float:
    """Print the cost estimate (one line), record it as an event and keep it as ``trainer.estimate``;
    returns the seconds it took."""
    t = trainer
    start = time.perf_counter()
    p = t._progress
    steps_before = p.steps_done - timer.steps  # the estimate starts where this process started
    t.estimate = estimate_cost(t, timer, epoch=t.epoch, steps_done=max(steps_before, 0))
    t.store.log_event("estimate", epoch=t.epoch, step=t.step, **t.estimate.as_event())
    tqdm.write(t.estimate.line(), file=sys.stdout)
    sys.stdout.flush()
    return time.perf_counter() - start


def dry_run_estimate(trainer: Trainer) -> Estimate:
    """The cost estimate of the whole run from a few training steps of ``trainer``'s model (prepared,
    never fitted), and the evaluation timed on a probe slice. Writes nothing."""
    trainer.model.train()
    timer = StepTimer(trainer.device)
    timer.begin()
    for batch in trainer.loader.epoch(torch.Generator().manual_seed(trainer.config.seed)):
        trainer._step(batch)
        if timer.tick():
            break
    timer.finish()
    return estimate_cost(trainer, timer, epoch=1, steps_done=0)


def remaining(trainer: Trainer, done: float) -> float | None:
    """Estimated wall time left when ``done`` epochs (a fraction mid-epoch) are behind us."""
    left = trainer.config.epochs - done
    if done >= 1 and trainer._elapsed() > 0:  # measured: training, evaluation and diagnostics
        return trainer._elapsed() / done * left
    if trainer.estimate is not None:
        return trainer.estimate.total_s * left / max(trainer.estimate.epochs_left, 1e-9)
    return None


def run_progress(trainer: Trainer, done: float) -> str:
    """Run-level progress: epochs done (whole, else the run's percentage), wall time elapsed
    (across resumes) and estimated time left."""
    epochs = trainer.config.epochs
    left = remaining(trainer, done)
    rest = f", ~{format_duration(left)} left" if left is not None else ""
    where = f"{int(done)}/{epochs} epochs" if done == int(done) else f"{100 * done / epochs:.0f}% of {epochs} epochs"
    return f"{where}, {format_duration(trainer._elapsed())} elapsed{rest}"


def bar_text(trainer: Trainer, p: EpochProgress) -> str:
    """The progress bar's description: the epoch and the run's progress (``p``: the epoch in progress)."""
    done = trainer.epoch - 1 + p.steps_done / max(len(trainer.loader), 1)
    return f"epoch {trainer.epoch}/{trainer.config.epochs} (run {run_progress(trainer, done)})"


def print_summary(trainer: Trainer, times: dict[str, float]) -> None:
    """The epoch's summary line: training loss, accuracy and LR, each split's accuracies, the
    epoch's wall time (train / eval / diag) and the run's progress; then the stop reason, if any."""
    t = trainer
    loss, acc, _, lr = t._train_stats
    parts = [f"epoch {t.epoch:>3}/{t.config.epochs}", f"train loss {loss:.3f} acc {acc:.3f} lr {lr:.3g}"]
    for split in ("probe", "val", "test"):
        here = [r for r in t._eval if r.split == split]
        if here:
            accs = " ".join(f"{'clean' if r.spec.attack == 'none' else r.spec.attack}"
                            f"{'' if r.spec.steps <= 1 else f'-{r.spec.steps}'} {r.acc:.3f}" for r in here)
            parts.append(f"{split}(n={here[0].n}) {accs}")
    parts.append(f"{sum(times.values()):.1f}s (train {times['train']:.1f}, eval {times['eval']:.1f}, "
                 f"diag {times['diag']:.1f})")
    parts.append(f"run {run_progress(t, t.epoch)}")
    print(" | ".join(parts), flush=True)
    if t._stop is not None:
        print(f"stopped: {t._stop[0]}", flush=True)
