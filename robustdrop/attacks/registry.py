"""The evaluation attacks by name: the one list that ``robustdrop evaluate --attack``,
``track --final-eval`` and the cached final evaluation (:mod:`robustdrop.evaluation`) accept.

Names (:data:`EVAL_ATTACKS`): ``clean`` (no attack; metric rows say ``attack=none``), ``fgsm``,
``pgd`` (PGD-k with cross-entropy), ``cw`` (the same PGD-k maximising the Carlini–Wagner margin
loss; rows say ``attack=pgd-cw``) and ``autoattack`` (standard L∞ AutoAttack through torchattacks,
the optional extra ``robustdrop[eval]``). Each builds its attack from :class:`AttackSettings`
(by default a run's evaluation settings).

It lives with the attacks, below the engine, so the config can validate names without importing
the engine (the config used to import the evaluation hook's module late, which imports the engine).

Examples:
    >>> build_attacks(["clean", "pgd"], AttackSettings(8 / 255, num_classes=10))[1].spec().describe()
    'pgd-20 (ε=8/255, step 2/255, 1 restart(s))'
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from robustdrop.attacks.base import Attack
from robustdrop.attacks.fgsm import FGSM
from robustdrop.attacks.losses import cw_margin_loss
from robustdrop.attacks.pgd import PGD
from robustdrop.errors import RobustdropError
from robustdrop.registry import Registry


@dataclass(frozen=True)
class AttackSettings:
    """What the named attacks are built from (defaults: a run's evaluation settings)."""

    epsilon: float
    num_classes: int
    pgd_steps: int = 20
    pgd_step_size: float = 2 / 255
    restarts: int = 1
    seed: int = 0


# name -> builder(settings) (``None`` = clean)
EVAL_ATTACKS: Registry[Callable[[AttackSettings], Attack | None]] = Registry("attack")


@EVAL_ATTACKS.register("clean")
def _clean(s: AttackSettings) -> Attack | None:
    return None


@EVAL_ATTACKS.register("fgsm")
def _fgsm(s: AttackSettings) -> Attack:
    return FGSM(s.epsilon)


@EVAL_ATTACKS.register("pgd")
def _pgd(s: AttackSettings) -> Attack:
    return PGD(s.epsilon, steps=s.pgd_steps, step_size=s.pgd_step_size, restarts=s.restarts)


@EVAL_ATTACKS.register("cw")
def _cw(s: AttackSettings) -> Attack:
    return PGD(s.epsilon, steps=s.pgd_steps, step_size=s.pgd_step_size, restarts=s.restarts, loss_fn=cw_margin_loss)


@EVAL_ATTACKS.register("autoattack")
def _autoattack(s: AttackSettings) -> Attack:
    from robustdrop.attacks.autoattack import AutoAttack  # torchattacks is optional: only when asked for

    return AutoAttack(s.epsilon, num_classes=s.num_classes, seed=s.seed)


def check_attack_names(names: Sequence[str], flag: str) -> list[str]:
    """``names`` without duplicates, in order; :class:`RobustdropError` (naming ``flag``) on an
    unknown one, or on ``autoattack`` without torchattacks installed."""
    for name in names:
        try:
            EVAL_ATTACKS.check(name)
        except RobustdropError as exc:
            raise RobustdropError(f"{flag}: {exc}") from None
    if "autoattack" in names:
        from robustdrop.attacks.autoattack import import_torchattacks

        import_torchattacks()
    return list(dict.fromkeys(names))


def build_attacks(names: Sequence[str], settings: AttackSettings) -> list[Attack | None]:
    """The attacks named (duplicates dropped), in order; ``None`` for ``clean``."""
    return [EVAL_ATTACKS[n](settings) for n in check_attack_names(names, "attack")]
