"""Per-step learning-rate schedules with ``state_dict`` (for exact resume).

A schedule maps the global step to a value; :meth:`Schedule.step` advances it and writes the
value into an optimizer's param groups.
"""

from __future__ import annotations

from robustdrop.errors import RobustdropError

SCHEDULES = ("cyclic", "cyclic-repeat", "piecewise", "constant")


class Schedule:
    """Learning rate as a function of the step.

    Kinds:
        ``cyclic``: one triangle over the whole run, 0 → ``peak`` at ``peak_at`` (fraction of the
            run) → 0 (the paper's and fast_adversarial's schedule).
        ``cyclic-repeat``: the same triangle repeated with a period of ``cycle_steps`` (the paper's
            200-epoch figure looks like 30-epoch cycles).
        ``piecewise``: ``peak`` until each milestone (fraction of the run), then times ``gamma``.
        ``constant``: ``peak`` throughout.
    """

    def __init__(self, kind: str, peak: float, total_steps: int, *, peak_at: float = 0.5,
                 cycle_steps: int | None = None, milestones: tuple[float, ...] = (0.5, 0.75), gamma: float = 0.1):
        if kind not in SCHEDULES:
            raise RobustdropError(f"unknown LR schedule {kind!r}; choose one of: {', '.join(SCHEDULES)}")
        if not 0 < peak_at <= 1:
            raise RobustdropError(f"--lr-peak-at must be in (0, 1], got {peak_at}")
        self.kind, self.peak, self.total_steps = kind, float(peak), max(1, int(total_steps))
        self.peak_at, self.milestones, self.gamma = peak_at, tuple(milestones), gamma
        self.cycle_steps = max(1, int(cycle_steps or self.total_steps))
        self.last_step = 0

    def value(self, step: int) -> float:
        if self.kind == "constant":
            return self.peak
        if self.kind == "piecewise":
            drops = sum(step >= m * self.total_steps for m in self.milestones)
            return self.peak * self.gamma**drops
        length = self.total_steps if self.kind == "cyclic" else self.cycle_steps
        pos = (step % length) / length if self.kind == "cyclic-repeat" else min(step / length, 1.0)
        if pos <= self.peak_at:
            return self.peak * pos / self.peak_at
        return self.peak * max(0.0, (1 - pos) / (1 - self.peak_at)) if self.peak_at < 1 else self.peak

    def current(self) -> float:
        return self.value(self.last_step)

    def apply(self, optimizer) -> float:
        """Write the current value into every param group of ``optimizer``."""
        lr = self.current()
        for group in optimizer.param_groups:
            group["lr"] = lr
        return lr

    def step(self) -> None:
        self.last_step += 1

    def state_dict(self) -> dict:
        return {"last_step": self.last_step}

    def load_state_dict(self, state: dict) -> None:
        self.last_step = int(state["last_step"])
