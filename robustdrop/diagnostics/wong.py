"""``wong``: the early-stop check of Wong et al. 2020 ("Fast is better than free", Sec. 5.2 and
their ``fast_adversarial`` code) as a measurement: the field's baseline detector of catastrophic
overfitting.

Every ``every`` epochs: PGD-``steps`` with ``restarts`` random start(s) (uniform in the ε-ball),
step ``step_size`` (their 2/255, whatever ε), on ONE fixed training minibatch of ``n`` examples
(their 128: the first, augmented batch of training), and the accuracy of the model on it. As in
their code the model runs in train mode (``bn=train``: batch-norm uses the minibatch's statistics);
unlike theirs, the running statistics are restored afterwards, so the check does not change
training. Their rule — stop when this accuracy falls by more than 0.2 from the previous epoch —
is the collapse detector's ``wong_fall`` signal (:mod:`robustdrop.diagnostics.collapse`), so
``detect_collapse`` replays it on recorded rows.

The minibatch: ``n`` training examples drawn without replacement, and their crop/flip (when the
run augments), from a generator seeded by the run's seed and this diagnostic's name: the same
batch every epoch, in a replay over saved weights, and for every run of one seed.

Rows (``source=wong``, ``split=train``): ``acc`` and ``loss`` under the PGD spec (``attack=pgd``,
its ε, steps, step size, restarts; ``n``), ``time_s``. Published: ``wong/acc``. One difference from
their attack: this PGD (the package's) keeps stepping examples already misclassified; theirs stops
updating them, which changes the accuracy little.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from robustdrop.attacks import PGD, model_mode
from robustdrop.data import TrainLoader
from robustdrop.diagnostics.base import Diagnostic, Options, option
from robustdrop.diagnostics.measures import losses
from robustdrop.errors import RobustdropError

if TYPE_CHECKING:
    from robustdrop.engine import RunContext

BN_MODES = ("train", "eval")


@dataclass(frozen=True)
class WongOptions(Options):
    every: int = option(1, "epochs between checks", minimum=1)
    n: int = option(128, "examples of the fixed training minibatch (Wong et al.: one batch of 128)", minimum=1)
    steps: int = option(5, "PGD steps (Wong et al.: 5)", minimum=1)
    step_size: float = option(2 / 255, "PGD step size in input units (Wong et al.: 2/255 at any ε)")
    restarts: int = option(1, "PGD random restarts (Wong et al.: 1)", minimum=1)
    bn: str = option("train", "batch-norm mode of the check: train (batch statistics, as Wong et al.; the "
                              "running statistics are restored) or eval")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.bn not in BN_MODES:
            raise RobustdropError(f"option wong:bn must be one of {', '.join(BN_MODES)}, got {self.bn!r}")
        if not self.step_size > 0:
            raise RobustdropError(f"option wong:step_size must be positive, got {self.step_size}")


@contextmanager
def restored_buffers(model: nn.Module) -> Iterator[None]:
    """Run the block, then put every buffer of ``model`` (batch-norm running statistics and
    counters) back as it was: a train-mode forward pass may not change training."""
    saved = [b.detach().clone() for b in model.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for buf, old in zip(model.buffers(), saved):
                buf.copy_(old)


def fixed_minibatch(run: RunContext, n: int, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x (n, C, H, W) float in [0, 1], y (n,))`` on the run's device: ``n`` training examples and
    their augmentation as training draws them (``TrainLoader``), from a CPU generator seeded by
    (run seed, ``name``). Raises ``RobustdropError`` when the context has no training labels."""
    images, labels = run.train_images, run.train_labels
    if labels is None or len(labels) != len(images) or len(images) == 0:
        raise RobustdropError(f"the {name} diagnostic needs the run's training images and labels, which this run "
                              "has not (a robustdrop.Monitor sees the probe only): leave it out of diagnostics")
    seed = run.generator(name, epoch=0).initial_seed()
    gen = torch.Generator().manual_seed(seed)
    pick = torch.randperm(len(images), generator=gen)[: min(n, len(images))]
    cfg = run.config
    loader = TrainLoader(images[pick], labels[pick], len(pick), device=run.device, augment=cfg.augment, pad=4,
                         pad_value=cfg.pad_value, channels_last=run.channels_last)
    batch = next(iter(loader.epoch(gen)))
    return batch.x, batch.y


class WongDiagnostic(Diagnostic):
    """See the module docstring; options: :class:`WongOptions`."""

    name = "wong"
    Options = WongOptions
    in_default = False
    in_all = False  # needs the training data, which a robustdrop.Monitor does not have

    def __init__(self, **options: Any):
        o = WongOptions(**options)
        super().__init__(o, every_n_epochs=o.every)
        self.batch: tuple[torch.Tensor, torch.Tensor] | None = None

    def on_run_start(self, run: RunContext) -> None:
        self.batch = fixed_minibatch(run, self.options.n, self.name)

    def on_epoch_end(self, run: RunContext, epoch: int) -> None:
        if self.batch is None:
            self.batch = fixed_minibatch(run, self.options.n, self.name)
        with self.timer(run, split="train"):
            acc, loss, spec = self.measure(run)
        n = len(self.batch[1])
        self.log(run, "acc", acc, split="train", spec=spec, n=n)
        self.log(run, "loss", loss, split="train", spec=spec, n=n)
        self.publish(run, acc=acc)

    def measure(self, run: RunContext) -> tuple[float, float, Any]:
        """``(robust accuracy, mean CE loss, attack spec)`` of the current model on the batch."""
        o, (x, y) = self.options, self.batch
        train = o.bn == "train"
        pgd = PGD(run.config.epsilon, steps=o.steps, step_size=o.step_size, restarts=o.restarts, train_mode=train)
        with restored_buffers(run.model):
            with run.autocast():
                delta = pgd(run.model, x, y, run.generator(self.name))
            with model_mode(run.model, train):
                loss, logits = losses(run.model, x + delta, y, run.autocast)
        acc = (logits.argmax(1) == y).float().mean().item()
        return acc, loss.float().mean().item(), pgd.spec()
