"""L∞ attacks in [0, 1] input space: one small base class, one file per attack."""

from robustdrop.attacks.base import (
    CLEAN,
    Attack,
    AttackSpec,
    input_gradient,
    model_mode,
    project,
    sign_noise,
    uniform_noise,
)
from robustdrop.attacks.fgsm import FGSM
from robustdrop.attacks.losses import cw_margin_loss as cw_margin_loss
from robustdrop.attacks.pgd import PGD
from robustdrop.attacks.rs_fgsm import RSFGSM

__all__ = [
    "CLEAN", "FGSM", "PGD", "RSFGSM", "Attack", "AttackSpec", "input_gradient", "model_mode",
    "project", "sign_noise", "uniform_noise",
]
