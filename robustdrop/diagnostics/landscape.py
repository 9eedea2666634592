"""``landscape``: the input-space loss around the probe inputs, along FGSM and random directions.

For the first ``n`` probe examples, with d_f = sign(∇ₓL(x)) (the FGSM direction, per example) and
d_n a fixed random-sign direction (the same draw every epoch), every ``every`` epochs:

* 1-D profiles ``loss_fgsm[i]`` = mean L(x + t_i d_f) and ``loss_noise[i]`` = mean L(x + t_i d_n)
  for ``points`` values t ∈ [−span·ε, span·ε] (``t``);
* a 2-D grid ``loss_2d[i, j]`` = mean L(x + u_i d_f + v_j d_n) over ``grid``×``grid`` points
  (``grid_u``, ``grid_v`` in the same range);
* ``linearity_error`` = mean over examples of |L(x + ε d_f) − L(x) − ε ∇ₓL(x)·d_f|, the error of
  the first-order Taylor model along the FGSM step (0 for a loss that is linear in x; grows as the
  loss surface bends — the local-linearity measure of Andriushchenko & Flammarion / ELLE);
* ``curvature`` = (L̄(x + ε d_f) − 2 L̄(x) + L̄(x − ε d_f)), the second difference of the mean
  FGSM profile at 0 with step ε: ε²·∂²L̄/∂t², i.e. the curvature with t measured in units of ε.

The points are not clipped to [0, 1] (the loss surface of the model itself). Arrays go to
``arrays/landscape/epoch_XXXX.npz`` (keys ``t``, ``loss_fgsm``, ``loss_noise``, ``grid_u``,
``grid_v``, ``loss_2d``, ``epsilon``). With ``around_collapse=1`` a landscape is also taken at the
epoch the collapse detector fires (it publishes ``collapse/onset`` in ``run.metrics``; it runs
before this hook) and at the next one, whatever the cadence.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from robustdrop.attacks import AttackSpec, sign_noise
from robustdrop.diagnostics.base import Diagnostic, Options, option
from robustdrop.diagnostics.measures import Autocast, loss_and_grad, take

if TYPE_CHECKING:
    from robustdrop.engine import RunContext

KIND = "landscape"


def _mean_losses(model: nn.Module, x: torch.Tensor, y: torch.Tensor, directions: list[torch.Tensor],
                 autocast: Autocast, batch_size: int) -> torch.Tensor:
    """Mean CE over the batch at ``x + d`` for each direction-offset ``d`` (list of B×C×H×W)."""
    out = []
    per_chunk = max(1, batch_size // len(y))
    with torch.no_grad():
        for start in range(0, len(directions), per_chunk):
            chunk = directions[start:start + per_chunk]
            xs = torch.cat([x + d for d in chunk])
            with autocast():
                logits = model(xs).float()
            loss = F.cross_entropy(logits, y.repeat(len(chunk)), reduction="none").view(len(chunk), len(y))
            out.append(loss.mean(1))
    return torch.cat(out)


def compute_landscape(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epsilon: float, *,
                      noise_direction: torch.Tensor, points: int = 21, grid: int = 11, span: float = 2.0,
                      autocast: Autocast = contextlib.nullcontext, batch_size: int = 512) -> dict[str, np.ndarray | float]:
    """Profiles, 2-D grid and the two scalars (see the module docstring) for one batch."""
    loss0, grad, _ = loss_and_grad(model, x, y, autocast)
    d_f = grad.sign()
    d_n = noise_direction
    with torch.no_grad(), autocast():
        loss_plus = F.cross_entropy(model(x + epsilon * d_f).float(), y, reduction="none")
        loss_minus = F.cross_entropy(model(x - epsilon * d_f).float(), y, reduction="none")
    taylor = epsilon * (grad * d_f).flatten(1).sum(1)
    linearity = (loss_plus - loss0 - taylor).abs().mean().item()
    curvature = (loss_plus.mean() - 2 * loss0.mean() + loss_minus.mean()).item()

    t = torch.linspace(-span * epsilon, span * epsilon, points).tolist()
    profile = _mean_losses(model, x, y, [ti * d_f for ti in t] + [ti * d_n for ti in t], autocast, batch_size)
    g = torch.linspace(-span * epsilon, span * epsilon, grid).tolist()
    surface = _mean_losses(model, x, y, [u * d_f + v * d_n for u in g for v in g], autocast, batch_size)
    return {
        "t": np.asarray(t, dtype=np.float32),
        "loss_fgsm": profile[:points].cpu().numpy().astype(np.float32),
        "loss_noise": profile[points:].cpu().numpy().astype(np.float32),
        "grid_u": np.asarray(g, dtype=np.float32),
        "grid_v": np.asarray(g, dtype=np.float32),
        "loss_2d": surface.view(grid, grid).cpu().numpy().astype(np.float32),
        "epsilon": np.float64(epsilon),
        "linearity_error": linearity,
        "curvature": curvature,
    }


@dataclass(frozen=True)
class LandscapeOptions(Options):
    every: int = option(5, "epochs between landscapes", minimum=1)
    n: int = option(128, "probe examples")
    points: int = option(21, "points of the 1-D profiles", minimum=1)
    grid: int = option(11, "points per axis of the 2-D grid", minimum=1)
    span: float = option(2.0, "range of t in units of ε (t ∈ [−span·ε, span·ε])")
    around_collapse: bool = option(True, "also at a detected onset and the epoch after")


class LandscapeDiagnostic(Diagnostic):
    """See the module docstring; options: :class:`LandscapeOptions`."""

    name = "landscape"
    Options = LandscapeOptions
    in_default = False  # the most expensive diagnostic: only with --diagnostics all or by name

    def __init__(self, **options: Any):
        o = LandscapeOptions(**options)
        super().__init__(o, every_n_epochs=o.every)
        self.collapse_epoch: int | None = None  # the epoch the collapse detector fired at

    def wants_epoch(self, epoch: int, *, last: bool = False) -> bool:
        # Called every epoch: whether a collapse onset was just detected is only known once the
        # collapse detector (which runs before this hook) has seen the epoch; see on_epoch_end.
        return True

    def _due(self, run: RunContext, epoch: int) -> bool:
        around = self.options.around_collapse
        if around and "collapse/onset" in run.metrics:  # the detector fired this epoch
            self.collapse_epoch = epoch
        if super().wants_epoch(epoch, last=epoch == run.config.epochs):
            return True
        return around and self.collapse_epoch in (epoch, epoch - 1)

    def on_epoch_end(self, run: RunContext, epoch: int) -> None:
        if not self._due(run, epoch):
            return
        with self.timer(run):
            o = self.options
            batches = list(take(run.probe_batches(), o.n))
            if not batches:
                return
            x, y = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
            eps = run.config.epsilon
            noise = sign_noise(x, 1.0, run.generator(self.name, epoch=0))
            result = compute_landscape(run.model, x, y, eps, noise_direction=noise, points=o.points,
                                       grid=o.grid, span=o.span, autocast=run.autocast,
                                       batch_size=run.config.eval_batch_size)
            linearity, curvature = result.pop("linearity_error"), result.pop("curvature")
            run.store.save_arrays(KIND, f"epoch_{epoch:04d}", **result)
            spec = AttackSpec("fgsm", eps, 1, eps, 0)
            self.log(run, "linearity_error", linearity, spec=spec, n=len(y))
            self.log(run, "curvature", curvature, spec=spec, n=len(y))
        self.publish(run, linearity_error=linearity, curvature=curvature)

    def state_dict(self) -> dict[str, Any]:
        return {"collapse_epoch": self.collapse_epoch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.collapse_epoch = state.get("collapse_epoch")  # absent in checkpoints written before it was kept
