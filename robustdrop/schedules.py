"""Per-step learning-rate (and momentum) schedules with ``state_dict`` (for exact resume).

A schedule maps the global step to a value; :meth:`Schedule.step` advances it and
:meth:`Schedule.apply` writes the value into an optimizer's param groups. With ``momentum``
bounds, ``apply`` also cycles the optimizer's momentum inversely to the learning rate, as
PyTorch's ``CyclicLR(cycle_momentum=True)`` does (the model and ψ optimizers of the APART
authors' code, paper.md §4.2).
"""

from __future__ import annotations

from typing import Any

from robustdrop.errors import RobustdropError

SCHEDULES = ("cyclic", "cyclic-repeat", "piecewise", "constant")
CYCLIC = ("cyclic", "cyclic-repeat")


class Schedule:
    """Learning rate (and optionally momentum) as a function of the step.

    Kinds:
        ``cyclic``: one triangle over the whole run, 0 → ``peak`` at ``peak_at`` (fraction of the
            run) → 0 (the paper's and fast_adversarial's schedule).
        ``cyclic-repeat``: the same triangle repeated with a period of ``cycle_steps`` (the paper's
            200-epoch figure looks like 30-epoch cycles).
        ``piecewise``: ``peak`` until each milestone (fraction of the run), then times ``gamma``.
        ``constant``: ``peak`` throughout.

    Args:
        momentum: ``(base, max)`` to cycle the momentum (cyclic kinds only): ``max`` at LR 0,
            ``base`` at the LR peak, linear in the triangle's height in between. This is
            ``CyclicLR``'s formula ``max − (max − base)·scale`` with the same ``scale`` as the LR,
            so it holds at LR peak 0 too. ``None``: the optimizer's momentum is left alone.

    Examples:
        >>> s = Schedule("cyclic", 0.2, 4, momentum=(0.8, 0.9))
        >>> [(round(s.value(t), 3), round(s.momentum_at(t), 3)) for t in range(4)]
        [(0.0, 0.9), (0.1, 0.85), (0.2, 0.8), (0.1, 0.85)]
    """

    def __init__(self, kind: str, peak: float, total_steps: int, *, peak_at: float = 0.5,
                 cycle_steps: int | None = None, milestones: tuple[float, ...] = (0.5, 0.75), gamma: float = 0.1,
                 momentum: tuple[float, float] | None = None):
        if kind not in SCHEDULES:
            raise RobustdropError(f"unknown LR schedule {kind!r}; choose one of: {', '.join(SCHEDULES)}")
        if not 0 < peak_at <= 1:
            raise RobustdropError(f"--lr-peak-at must be in (0, 1], got {peak_at}")
        if momentum is not None:
            if kind not in CYCLIC:
                raise RobustdropError(f"momentum cycling follows a cyclic LR; --schedule {kind} has no cycle "
                                      "(use --schedule cyclic or drop --cycle-momentum)")
            base, top = (float(m) for m in momentum)
            if not 0 <= base <= top < 1:
                raise RobustdropError(f"cycled momentum needs 0 <= --base-momentum <= --max-momentum < 1, "
                                      f"got {base} and {top}")
            momentum = (base, top)
        self.kind, self.peak, self.total_steps = kind, float(peak), max(1, int(total_steps))
        self.peak_at, self.milestones, self.gamma = peak_at, tuple(milestones), gamma
        self.cycle_steps = max(1, int(cycle_steps or self.total_steps))
        self.momentum = momentum
        self.last_step = 0

    @classmethod
    def from_config(cls, config: Any, peak: float, total_steps: int, steps_per_epoch: int, *,
                    cycle_momentum: bool = False) -> Schedule:
        """The run's schedule shape (``schedule``, ``lr_peak_at``, ``cycle_epochs``,
        ``lr_milestones``, ``lr_gamma`` of a :class:`~robustdrop.engine.config.TrackConfig`) with
        peak ``peak``; with ``cycle_momentum``, momentum cycled between ``base_momentum`` and
        ``max_momentum``. The fractions refer to ``total_steps``, or to ``schedule_epochs`` epochs
        when the config sets it (an extended run keeps its piecewise milestones where they were)."""
        momentum = (config.base_momentum, config.max_momentum) if cycle_momentum else None
        if getattr(config, "schedule_epochs", None):
            total_steps = config.schedule_epochs * steps_per_epoch
        return cls(config.schedule, peak, total_steps, peak_at=config.lr_peak_at,
                   cycle_steps=config.cycle_epochs * steps_per_epoch, milestones=tuple(config.lr_milestones),
                   gamma=config.lr_gamma, momentum=momentum)

    def _shape(self, step: int) -> tuple[float, float]:
        """``(numerator, denominator)`` of the LR's fraction of ``peak`` at ``step`` (kept apart so
        that ``value`` rounds as ``peak · num / den``)."""
        if self.kind == "constant":
            return 1.0, 1.0
        if self.kind == "piecewise":
            drops = sum(step >= m * self.total_steps for m in self.milestones)
            return self.gamma**drops, 1.0
        length = self.total_steps if self.kind == "cyclic" else self.cycle_steps
        pos = (step % length) / length if self.kind == "cyclic-repeat" else min(step / length, 1.0)
        if pos <= self.peak_at:
            return pos, self.peak_at
        return (max(0.0, (1 - pos) / (1 - self.peak_at)), 1.0) if self.peak_at < 1 else (1.0, 1.0)

    def scale(self, step: int) -> float:
        """The LR as a fraction of ``peak`` at ``step`` (cyclic kinds: the triangle's height in [0, 1])."""
        num, den = self._shape(step)
        return num / den

    def value(self, step: int) -> float:
        num, den = self._shape(step)
        return self.peak * num / den

    def momentum_at(self, step: int) -> float | None:
        """The cycled momentum at ``step`` (None without momentum bounds)."""
        if self.momentum is None:
            return None
        base, top = self.momentum
        return top - (top - base) * self.scale(step)

    def current(self) -> float:
        return self.value(self.last_step)

    def apply(self, optimizer) -> float:
        """Write the current LR (and cycled momentum) into every param group of ``optimizer``."""
        lr = self.current()
        momentum = self.momentum_at(self.last_step)
        for group in optimizer.param_groups:
            group["lr"] = lr
            if momentum is not None:
                group["momentum"] = momentum
        return lr

    def step(self) -> None:
        self.last_step += 1

    def state_dict(self) -> dict:
        # The momentum is a function of the step: the position is the whole state.
        return {"last_step": self.last_step}

    def load_state_dict(self, state: dict) -> None:
        self.last_step = int(state["last_step"])
