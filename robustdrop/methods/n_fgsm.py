"""N-FGSM (de Jorge et al. 2022, "Make Some Noise: Reliable and Efficient Single-Step Adversarial
Training", NeurIPS; arXiv 2202.01181): a stronger noise, one FGSM step, and no projection.

One step::

    η ~ U(−kε, kε)^d;   η ← clip(x + η, 0, 1) − x            # noise, kept in the image box
    g = ∇ₓ CE(f(x + η), y)                                    # model in train mode (BN batch stats)
    δ = η + α·sign(g);  δ ← clip(x + δ, 0, 1) − x            # NO projection to the ε-ball
    θ ← θ − lr·∇θ CE(f(x + δ), y)                             # the noise is part of the training input

So ``|δ| <= (k + 1)·ε`` (3ε with the defaults) and ``x + δ`` stays in [0, 1]. Conventions from
the authors' code (github.com/pdejorge/N-FGSM, ``train.py`` at commit 0a9e4f0):

* noise law and magnitude: per-pixel uniform ``U(−kε, kε)``, ``k = --unif`` = 2 by default
  (train.py:51-56, drawn at train.py:218-220);
* the noisy input is clipped to the image box before the gradient (train.py:221);
* step ``α = --alpha`` = 8/255 = ε by default, and every command in ``experiments.sh`` sets
  ``--alpha`` equal to ``--epsilon`` (train.py:50);
* gradient of the batch-mean cross-entropy at ``x + η`` with the model in train mode
  (train.py:173, 224-226);
* ``δ = η + α·sign(g)`` clipped to the image box only: ``--clip`` defaults to −1 = no projection
  to an ε-ball (train.py:57-62, 229-233);
* the model is trained on ``x + δ``, noise included (train.py:237-243).

robustdrop's defaults: ``--nfgsm-noise 2`` (k), ``--alpha`` = ε. The batch-norm mode of the
gradient pass follows ``--attack-bn`` (default ``train``, as the authors).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from robustdrop.attacks import AttackSpec, input_gradient, model_mode, uniform_noise
from robustdrop.data import Batch
from robustdrop.errors import RobustdropError
from robustdrop.methods.base import StepOutput, TrainingMethod, descend
from robustdrop.methods.registry import register_method


class NFGSM(TrainingMethod):
    """N-FGSM training (``name="n-fgsm"``).

    Args:
        epsilon: the nominal L∞ radius ε (the noise is ``k·ε`` wide, the step ``α``).
        noise: ``k``, the noise magnitude relative to ε (default 2, the authors').
        step_size: ``α`` (default ε, the authors').
        train_mode: craft the step with batch-norm in train mode (the authors' setting).

    Shape:
        ``batch.x`` (B, C, H, W) in [0, 1] → ``StepOutput.delta`` (B, C, H, W) with
        ``|δ| <= k·ε + α`` and ``x + δ`` in [0, 1].

    Examples:
        >>> method = NFGSM(8 / 255)                     # k = 2, α = ε: |δ| <= 24/255
        >>> out = method.train_step(model, batch, optimizer)
    """

    name = "n-fgsm"
    forward_passes = 2
    backward_passes = 2

    def __init__(self, epsilon: float, *, noise: float = 2.0, step_size: float | None = None, train_mode: bool = True):
        if not 0 < epsilon <= 1:
            raise RobustdropError(f"--epsilon must be in (0, 1], got {epsilon}")
        if not noise >= 0 or math.isinf(noise):
            raise RobustdropError(f"--nfgsm-noise must be a finite number >= 0 (k of the noise U(−kε, kε)), got {noise}")
        self.epsilon = float(epsilon)
        self.noise = float(noise)
        self.step_size = self.epsilon if step_size is None else float(step_size)
        self.train_mode = train_mode

    def perturb(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The training perturbation δ of the batch (detached); uses the global RNG for the noise."""
        eta = (x + uniform_noise(x, self.noise * self.epsilon)).clamp(0.0, 1.0) - x if self.noise > 0 \
            else torch.zeros_like(x)
        with model_mode(model, self.train_mode), torch.enable_grad():
            grad, _ = input_gradient(model, x + eta, y)
        return ((x + eta + self.step_size * grad.sign()).clamp(0.0, 1.0) - x).detach()

    def train_step(self, model: nn.Module, batch: Batch, optimizer: torch.optim.Optimizer) -> StepOutput:
        delta = self.perturb(model, batch.x, batch.y)
        loss, logits = descend(model, optimizer, batch.x + delta, batch.y)
        return StepOutput(loss, logits, delta)

    def perturbation_spec(self) -> AttackSpec:
        # ε is the nominal radius; the training δ reaches (k + 1)·ε (see the module docstring).
        return AttackSpec(self.name, self.epsilon, 1, self.step_size, 1 if self.noise > 0 else 0)


@register_method("n-fgsm")
def _n_fgsm(config: Any) -> TrainingMethod:
    return NFGSM(config.epsilon, noise=config.nfgsm_noise, step_size=config.alpha, train_mode=config.attack_bn == "train")
