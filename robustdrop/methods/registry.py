"""The method registry: the one list of training-method names; builds a method from the run's config."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from robustdrop.attacks import FGSM, PGD, RSFGSM
from robustdrop.errors import RobustdropError
from robustdrop.methods.base import AttackTraining, TrainingMethod
from robustdrop.registry import Registry

METHODS: Registry[Callable[[Any], TrainingMethod]] = Registry("method")  # name -> builder(config)


def register_method(name: str) -> Callable[[Callable[[Any], TrainingMethod]], Callable[[Any], TrainingMethod]]:
    """Register ``builder(config) -> TrainingMethod`` as ``--method name`` (config validation and the
    CLI's choices read this registry)."""
    return METHODS.register(name)


def available_methods() -> list[str]:
    """Registered method names, in registration order."""
    return METHODS.names()


def check_method(name: str) -> None:
    """Raise :class:`RobustdropError` unless ``name`` is a registered method."""
    METHODS.check(name)


def create_method(config: Any) -> TrainingMethod:
    """``config`` is a :class:`robustdrop.engine.config.TrackConfig` (duck-typed to keep imports one-way)."""
    check_method(config.method)
    return METHODS[config.method](config)


@register_method("fgsm")
def _fgsm(config) -> TrainingMethod:
    # A step α < ε from zero init is the matched-strength control of APART (docs/collapse-prediction.md);
    # a larger one would be clipped back to ε.
    if config.alpha is not None and config.alpha > config.epsilon * (1 + 1e-9):
        raise RobustdropError(f"--method fgsm steps at most ε (got --alpha {config.alpha:.6g} > --epsilon "
                              f"{config.epsilon:.6g}); for a larger step from a random start use --method rs-fgsm")
    return AttackTraining("fgsm", FGSM(config.epsilon, step_size=config.alpha, train_mode=config.attack_bn == "train"))


@register_method("rs-fgsm")
def _rs_fgsm(config) -> TrainingMethod:
    attack = RSFGSM(config.epsilon, step_size=config.alpha, train_mode=config.attack_bn == "train")
    return AttackTraining("rs-fgsm", attack)


@register_method("pgd")
def _pgd(config) -> TrainingMethod:
    attack = PGD(config.epsilon, steps=config.pgd_steps, step_size=config.alpha, random_start=True,
                 train_mode=config.attack_bn == "train")
    return AttackTraining("pgd", attack)
