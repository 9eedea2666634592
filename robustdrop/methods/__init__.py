"""Training methods: one optimisation step on a batch each (FGSM, RS-FGSM, PGD-k, APART, FGSM+, N-FGSM,
GradAlign)."""

from robustdrop.methods import apart as _apart  # noqa: F401  (registers apart and fgsm+)
from robustdrop.methods import gradalign as _gradalign  # noqa: F401  (registers gradalign)
from robustdrop.methods import n_fgsm as _n_fgsm  # noqa: F401  (registers n-fgsm)
from robustdrop.methods.base import AttackTraining, MethodContext, StepOutput, TrainingMethod, descend
from robustdrop.methods.registry import available_methods, check_method, create_method, register_method

__all__ = [
    "AttackTraining", "MethodContext", "StepOutput", "TrainingMethod", "available_methods",
    "check_method", "create_method", "descend", "register_method",
]
