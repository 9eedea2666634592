"""``snapshots``: the paper's Figure 1 — the FGSM perturbation of a few fixed probe images.

Every ``every`` epochs, the FGSM δ of the current model (eval mode) on ``k`` fixed probe images,
one per class in label order (the first probe example of classes 0, 1, ...; more images than
classes are filled with the next probe examples), is written to ``arrays/snapshots/epoch_XXXX.npz``
with exactly the keys ``images`` (uint8 K×C×H×W), ``labels`` (int64 K), ``delta`` (float16
K×C×H×W), ``epsilon`` (float) and ``classes`` (str, the dataset's class names). Metric
``delta_autocorr`` (mean over the K images): about 0 for noise-like δ, high for object-shaped δ.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from robustdrop.attacks import FGSM
from robustdrop.diagnostics.base import Diagnostic, Options, option
from robustdrop.diagnostics.measures import delta_autocorr

if TYPE_CHECKING:
    from robustdrop.engine import RunContext

KIND = "snapshots"


def pick_snapshot_indices(labels: torch.Tensor, k: int) -> list[int]:
    """``k`` probe positions: the first example of each class in label order, then the first
    examples not chosen yet (deterministic)."""
    labels = labels.detach().cpu().tolist()
    first: dict[int, int] = {}
    for i, c in enumerate(labels):
        first.setdefault(int(c), i)
    chosen = [first[c] for c in sorted(first)][:k]
    taken = set(chosen)
    chosen += [i for i in range(len(labels)) if i not in taken][: max(k - len(chosen), 0)]
    return chosen


@dataclass(frozen=True)
class SnapshotOptions(Options):
    every: int = option(1, "epochs between snapshots", minimum=1)
    k: int = option(8, "images (one per class first)", minimum=1)


class SnapshotDiagnostic(Diagnostic):
    """See the module docstring; options: :class:`SnapshotOptions`."""

    name = "snapshots"
    Options = SnapshotOptions

    def __init__(self, **options: Any):
        o = SnapshotOptions(**options)
        super().__init__(o, every_n_epochs=o.every)
        self.index: list[int] = []

    def on_run_start(self, run: RunContext) -> None:
        self.index = pick_snapshot_indices(run.probe[1], self.options.k)

    def on_epoch_end(self, run: RunContext, epoch: int) -> None:
        if not self.index:
            return
        with self.timer(run):
            images_u8, labels = run.probe
            idx = torch.tensor(self.index, device=images_u8.device)
            images, y = images_u8[idx], labels[idx]
            x = images.to(run.device, torch.float32) / 255.0
            eps = run.config.epsilon
            attack = FGSM(eps)
            with run.autocast():
                delta = attack(run.model, x, y)
            run.store.save_arrays(
                KIND, f"epoch_{epoch:04d}",
                images=images.cpu().numpy().astype(np.uint8),
                labels=y.cpu().numpy().astype(np.int64),
                delta=delta.float().cpu().numpy().astype(np.float16),
                epsilon=np.float64(eps),
                classes=np.asarray([str(c) for c in run.data.classes]),
            )
            self.log(run, "delta_autocorr", delta_autocorr(delta).mean().item(), spec=attack.spec(), n=len(self.index))
