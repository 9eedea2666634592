"""What a run will cost, measured after a short warm-up: seconds per step, per epoch, whole run.

Training: the wall time of :data:`WARMUP_STEPS` steps after the first (the first carries one-off
costs: allocation, cuDNN autotuning, lazy initialisation), on the run's own model and data.
Evaluation: each evaluation attack timed on a slice of the probe set (:func:`time_evaluation`, on
a copy of the model) and scaled by the number of examples the run will evaluate under it, epoch by
epoch, at the run's cadence (probe and validation every ``--eval-every`` epochs, the full test set
every ``--test-every`` epochs and at the end). Diagnostics are not in the first estimate (they run
at the end of an epoch); the trainer's run-level progress uses the measured epochs from then on.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch
from torch import nn

from robustdrop.attacks import FGSM, Attack
from robustdrop.engine.evaluate import evaluate, spec_of
from robustdrop.environment import device_name
from robustdrop.formatting import format_duration

WARMUP_STEPS = 5  # timed steps after the first
LONG_ON_CPU_S = 2 * 3600  # beyond this a CPU run gets advice
LONG_ON_GPU_S = 24 * 3600


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on the CPU), so wall time measures it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StepTimer:
    """Wall time of the steps after the first: :meth:`begin` before the first step, :meth:`tick`
    after each; ``tick`` returns True once, when ``warmup`` steps after the first are timed."""

    def __init__(self, device: torch.device, warmup: int = WARMUP_STEPS):
        self.device, self.warmup = device, int(warmup)
        self.steps = 0
        self.first_s: float | None = None
        self.seconds_per_step: float | None = None
        self.timed = 0
        self._t0 = 0.0

    def begin(self) -> None:
        synchronize(self.device)
        self._t0 = time.perf_counter()

    def tick(self) -> bool:
        self.steps += 1
        if self.steps == 1 or self.steps == 1 + self.warmup:
            synchronize(self.device)
            now = time.perf_counter()
            if self.steps == 1:
                self.first_s, self._t0 = now - self._t0, now
                return False
            self.seconds_per_step, self.timed = (now - self._t0) / self.warmup, self.warmup
            return True
        return False

    def finish(self) -> bool:
        """At an epoch end before the warm-up completed: use the steps timed so far (or the first
        step alone). Returns True when this produced the measurement."""
        if self.seconds_per_step is not None or self.steps == 0:
            return False
        synchronize(self.device)
        if self.steps > 1:
            self.timed = self.steps - 1
            self.seconds_per_step = (time.perf_counter() - self._t0) / self.timed
        else:
            self.timed, self.seconds_per_step = 1, self.first_s
        return True


def time_evaluation(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, attacks: Sequence[Attack | None], *,
                    device: torch.device, autocast: Callable, channels_last: bool, n: int) -> dict[str, float]:
    """Seconds per example of evaluating under each attack (by ``AttackSpec.attack``), timed on the
    first ``n`` of ``images`` with a copy of ``model`` (the run's model and random state are untouched)."""
    model = copy.deepcopy(model)
    x, y = images[:n], labels[:n]
    n = len(y)
    if n == 0:
        return {spec_of(a).attack: 0.0 for a in attacks}
    gen = torch.Generator(device=device).manual_seed(0)
    kwargs = dict(split="estimate", batch_size=n, device=device, generator=gen, autocast=autocast,
                  channels_last=channels_last)
    if device.type == "cuda":  # cuDNN autotunes a new shape once: not part of the steady cost
        evaluate(model, x, y, [FGSM(0.01)], **kwargs)
    out = {}
    for attack in attacks:
        synchronize(device)
        start = time.perf_counter()
        evaluate(model, x, y, [attack], **kwargs)
        synchronize(device)
        out[spec_of(attack).attack] = (time.perf_counter() - start) / n
    return out


@dataclass
class Estimate:
    """The cost of (the rest of) a run. Times in seconds; ``*_epoch_s`` are per epoch."""

    device: str
    on_cpu: bool
    seconds_per_step: float
    steps_timed: int
    steps_per_epoch: int
    epochs: int  # the run's planned epochs
    epochs_left: float  # from where the estimate starts (a fraction for a partly done epoch)
    train_s: float  # training still to do
    eval_s: float  # evaluation still to do
    eval_examples_timed: int
    diagnostics: bool  # whether diagnostics run at epoch ends (not included above)

    @property
    def train_epoch_s(self) -> float:
        return self.seconds_per_step * self.steps_per_epoch

    @property
    def eval_epoch_s(self) -> float:
        return self.eval_s / max(self.epochs_left, 1e-9)

    @property
    def epoch_s(self) -> float:
        return self.train_epoch_s + self.eval_epoch_s

    @property
    def total_s(self) -> float:
        return self.train_s + self.eval_s

    def advice(self) -> str | None:
        """What to do instead when the run is long for the device; None otherwise."""
        if self.on_cpu and self.total_s > LONG_ON_CPU_S:
            return ("that is long for a CPU: `--preset quick` is the CPU demonstration (minutes); paper scale needs a "
                    "GPU (--device cuda); or shrink this run with --train-subset N or a smaller --width")
        if not self.on_cpu and self.total_s > LONG_ON_GPU_S:
            return "that is long: shrink it with --train-subset N, fewer --epochs or a smaller --width"
        return None

    def line(self) -> str:
        """The one line printed after the warm-up."""
        diag = "; diagnostics come on top (measured after the first epoch)" if self.diagnostics else ""
        text = (f"cost estimate on {self.device}: {self.seconds_per_step:.3g} s/step ({self.steps_timed} steps timed) x "
                f"{self.steps_per_epoch} steps = {format_duration(self.train_epoch_s)} training + "
                f"{format_duration(self.eval_epoch_s)} evaluation per epoch (evaluation timed on "
                f"{self.eval_examples_timed} probe examples{diag}); "
                f"{self._span()}: about {format_duration(self.total_s)}")
        advice = self.advice()
        return f"{text}; {advice}" if advice else text

    def _span(self) -> str:
        if self.epochs_left >= self.epochs:
            return f"whole run ({self.epochs} epochs)"
        return f"the remaining {self.epochs_left:.3g} of {self.epochs} epochs"

    def as_event(self) -> dict:
        """The numbers for ``events.jsonl`` (kind ``estimate``), with the derived per-epoch values."""
        values = asdict(self)
        values.update(train_epoch_s=self.train_epoch_s, eval_epoch_s=self.eval_epoch_s, epoch_s=self.epoch_s,
                      total_s=self.total_s)
        return values


def describe_device(device: torch.device) -> str:
    """``cpu (x86_64, 1 thread)`` or ``cuda:0 (NVIDIA H100 80GB HBM3)``."""
    if device.type == "cpu":
        threads = torch.get_num_threads()
        return f"cpu ({device_name(device)}, {threads} thread{'s' if threads != 1 else ''})"
    return f"{device} ({device_name(device)})"
