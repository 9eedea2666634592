"""AutoAttack (Croce & Hein 2020, ICML; arXiv 2003.01690), standard L∞ version, run through
torchattacks (optional extra ``pip install 'robustdrop[eval]'``).

The standard version is four attacks in a cascade, each on the examples the previous ones left
correctly classified: APGD-CE (100 iterations, 1 restart), APGD-T (targeted DLR loss, 100
iterations, 9 target classes), FAB-T (100 iterations, 9 target classes) and Square (5000
queries, p_init 0.8). These are the values of the authors' ``AutoAttack(version='standard')``
(github.com/fra31/auto-attack, ``autoattack.py``, ``set_version``).

``torchattacks.AutoAttack(version='standard')`` builds its APGD, APGD-T and FAB with their
default 10 iterations and ``n_classes − 1`` target classes, which is weaker than the standard
version; this module therefore composes the cascade from torchattacks' attacks with the standard
values (:func:`standard_components`).
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from robustdrop.attacks.base import Attack, AttackSpec, project
from robustdrop.errors import RobustdropError
from robustdrop.formatting import format_eps

STANDARD_ITERATIONS = 100
STANDARD_TARGETS = 9
STANDARD_SQUARE_QUERIES = 5000
STANDARD_SQUARE_P_INIT = 0.8


def import_torchattacks():
    """The torchattacks module, or a one-line :class:`RobustdropError` saying how to install it."""
    try:
        import torchattacks
    except ImportError:
        raise RobustdropError("AutoAttack needs the optional package torchattacks; install it with "
                              "`pip install 'robustdrop[eval]'`") from None
    return torchattacks


def describe_standard(epsilon: float, num_classes: int) -> str:
    """What a standard AutoAttack number measured, in words, with the values of the cascade."""
    it, targets = STANDARD_ITERATIONS, min(STANDARD_TARGETS, num_classes - 1)
    return (f"standard L∞ AutoAttack (ε={format_eps(epsilon)}): APGD-CE ({it} iterations), APGD-T ({it} iterations, "
            f"{targets} target classes), FAB-T ({it} iterations, {targets} target classes), Square "
            f"({STANDARD_SQUARE_QUERIES} queries, p_init {STANDARD_SQUARE_P_INIT:g}), each on the images the previous "
            "ones left correct")


def standard_components(model: nn.Module, epsilon: float, num_classes: int, seed: int) -> list:
    """torchattacks' APGD-CE, APGD-T, FAB-T and Square with the standard AutoAttack values."""
    ta = import_torchattacks()
    targets = min(STANDARD_TARGETS, num_classes - 1)
    apgd = ta.APGD(model, norm="Linf", eps=epsilon, steps=STANDARD_ITERATIONS, n_restarts=1, seed=seed, loss="ce",
                   eot_iter=1, rho=0.75)
    apgdt = ta.APGDT(model, norm="Linf", eps=epsilon, steps=STANDARD_ITERATIONS, n_restarts=1, seed=seed, eot_iter=1,
                     rho=0.75, n_classes=num_classes)
    fab = ta.FAB(model, norm="Linf", eps=epsilon, steps=STANDARD_ITERATIONS, n_restarts=1, seed=seed,
                 multi_targeted=True, n_classes=num_classes)
    square = ta.Square(model, norm="Linf", eps=epsilon, n_queries=STANDARD_SQUARE_QUERIES, n_restarts=1,
                       p_init=STANDARD_SQUARE_P_INIT, loss="margin", resc_schedule=False, seed=seed)
    apgdt.n_target_classes = fab.n_target_classes = targets  # torchattacks sets n_classes − 1
    return [apgd, apgdt, fab, square]


class AutoAttack(Attack):
    """Standard L∞ AutoAttack through torchattacks (see the module docstring).

    Args:
        epsilon: L∞ radius.
        num_classes: number of classes of the model (at least 4: the targeted DLR loss needs them).
        seed: seed of the random starts and Square's sampling; a ``generator`` passed at call
            time replaces it with a number drawn from that generator (seeded evaluations).

    Runs in fp32 (autocast off) and leaves the caller's global random state untouched
    (torchattacks seeds the global RNG).

    Shape: as :class:`Attack`: ``x`` (B, C, H, W) in [0, 1], ``y`` (B,) → δ, ``|δ| <= ε``.

    Examples:
        >>> aa = AutoAttack(8 / 255, num_classes=10)
        >>> delta = aa(model, x, y)
        >>> robust = (model(x + delta).argmax(1) == y).float().mean()
    """

    name = "autoattack"

    def __init__(self, epsilon: float, *, num_classes: int, seed: int = 0, **kwargs):
        super().__init__(epsilon, **kwargs)
        if num_classes < 4:
            raise RobustdropError(f"AutoAttack's targeted DLR loss needs at least 4 classes, the model has {num_classes}")
        self.num_classes = int(num_classes)
        self.seed = int(seed)
        import_torchattacks()  # fail early, with the install hint

    def perturb(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        seed = self.seed if generator is None else int(torch.randint(
            0, 2**31 - 1, (1,), generator=generator, device=generator.device).item())
        ta = import_torchattacks()
        devices = [x.device] if x.device.type == "cuda" else []
        no_autocast = torch.autocast(x.device.type, enabled=False) if x.device.type in ("cuda", "cpu") \
            else contextlib.nullcontext()
        with torch.random.fork_rng(devices=devices), no_autocast:
            cascade = ta.MultiAttack(standard_components(model, self.epsilon, self.num_classes, seed))
            x_adv = cascade(x.float(), y)
        return project(x, x_adv.to(x.dtype) - x, self.epsilon)

    def spec(self) -> AttackSpec:
        # Parameter-free: the name stands for the standard version (no steps / step size to report).
        return AttackSpec("autoattack", self.epsilon, 0, float("nan"), 0)
