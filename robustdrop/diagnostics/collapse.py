"""``collapse``: an online detector of catastrophic overfitting (the robustness drop's onset).

Every epoch with a probe evaluation it reads its :data:`INPUTS` from ``run.metrics``: the probe
accuracies (clean, FGSM, PGD) the evaluation put there and the values the strength diagnostics
published in the same epoch (they run before it), and evaluates the :data:`SIGNALS` (each says
there what it means).

**Rule.** The detector fires once, at the first epoch where ``pgd_drop`` holds together with at
least one of the other signals, for ``patience`` consecutive epochs (default 1); the onset is the
first epoch of that streak. Signals whose diagnostic did not run are left out. ``collapse_score``
(logged every evaluated epoch, and published as ``collapse/collapse_score``) is the fraction of the
available signals that are on.

On firing it publishes ``collapse/onset`` (the onset epoch) for the hooks after it, records the
event ``collapse_onset`` (``signals``: every value and flag, ``action``, ``detected_epoch``) and
acts on ``config.on_collapse``: ``warn`` prints one line, ``stop`` ends the run after this epoch,
``rollback`` ends it and keeps the checkpoint of epoch onset−1 as ``checkpoints/result.pt``. The same rule runs offline on a recorded metrics table with
:func:`detect_collapse`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import pandas as pd

from robustdrop.diagnostics.base import Diagnostic, Options, option

if TYPE_CHECKING:
    from robustdrop.engine import RunContext


@dataclass(frozen=True)
class Input:
    """A value the detector reads: ``run.metrics[channel]`` in a live run; in a recorded run the
    ``split=probe`` row with this ``source``, ``metric`` and ``attack`` (``None``: any attack)."""

    key: str
    channel: str
    source: str
    metric: str
    attack: str | None = None


# The detector's inputs, in the order its verdicts list their values.
INPUTS = (
    Input("pgd_acc", "probe/acc/pgd", "eval", "acc", "pgd"),
    Input("fgsm_acc", "probe/acc/fgsm", "eval", "acc", "fgsm"),
    Input("clean_acc", "probe/acc/none", "eval", "acc", "none"),
    Input("ref_acc_fgsm", "strength-ref/ref_acc_fgsm", "strength-ref", "ref_acc", "fgsm"),
    Input("ref_acc_noise", "strength-ref/ref_acc_noise", "strength-ref", "ref_acc", "noise-sign"),
    Input("strength_ratio", "strength/strength_ratio", "strength", "strength_ratio"),
    Input("grad_alignment", "strength/grad_alignment", "strength", "grad_alignment"),
)
REQUIRED = INPUTS[0]  # pgd_acc: no verdict without it


@dataclass(frozen=True)
class CollapseRule(Options):
    """Thresholds of the detector (see the module docstring): the ``collapse`` diagnostic's options."""

    drop: float = option(0.5, "PGD acc below drop × best")
    floor: float = option(0.1, "best PGD acc needed before a drop counts")
    gap: float = option(0.15, "FGSM−PGD gap widening vs the best epoch")
    ratio: float = option(1.5, "strength_ratio at or below this is noise-like")
    align: float = option(0.5, "grad_alignment below this is misaligned")
    margin: float = option(0.02, "ref_acc(fgsm) within margin of ref_acc(noise-sign)")
    patience: int = option(1, "consecutive epochs the rule must hold", minimum=1)


@dataclass(frozen=True)
class Signal:
    """One flag of the detector. ``test(detector, values, gap)`` sees the epoch's input values (by
    :data:`INPUTS` key), the FGSM−PGD gap and the detector's state after its best-epoch update; it
    returns ``None`` when an input it needs was not measured (the signal is then left out)."""

    name: str
    meaning: str
    test: Callable[[CollapseDetector, dict[str, float], float], bool | None]
    required: bool = False  # the detector fires only with every required signal and one other on


def _pgd_drop(d: CollapseDetector, v: dict[str, float], gap: float) -> bool:
    return d.best_pgd >= d.rule.floor and v["pgd_acc"] < d.rule.drop * d.best_pgd


def _gap_widening(d: CollapseDetector, v: dict[str, float], gap: float) -> bool | None:
    if math.isnan(gap) or math.isnan(d.gap_at_best):
        return None
    return gap - d.gap_at_best >= d.rule.gap


def _weak_fgsm(d: CollapseDetector, v: dict[str, float], gap: float) -> bool | None:
    return v["strength_ratio"] <= d.rule.ratio if "strength_ratio" in v else None


def _ref_weak(d: CollapseDetector, v: dict[str, float], gap: float) -> bool | None:
    if "ref_acc_fgsm" not in v or "ref_acc_noise" not in v:
        return None
    return v["ref_acc_fgsm"] >= v["ref_acc_noise"] - d.rule.margin


def _misaligned(d: CollapseDetector, v: dict[str, float], gap: float) -> bool | None:
    return v["grad_alignment"] < d.rule.align if "grad_alignment" in v else None


# The detector's signals, in the order its verdicts list them.
SIGNALS = (
    Signal("pgd_drop", "probe PGD accuracy below `drop` × its running best, with the best at least `floor`",
           _pgd_drop, required=True),
    Signal("gap_widening", "the FGSM−PGD accuracy gap at least `gap` wider than at the best epoch (FGSM accuracy "
           "far above PGD accuracy is the classic signature of catastrophic overfitting)", _gap_widening),
    Signal("weak_fgsm", "`strength_ratio` ≤ `ratio`: FGSM raises the loss no more than random signs", _weak_fgsm),
    Signal("ref_weak", "the reference model's accuracy on FGSM δ within `margin` of (or above) its accuracy on "
           "random-sign noise (`strength-ref`; the paper's criterion)", _ref_weak),
    Signal("misaligned", "`grad_alignment` below `align`", _misaligned),
)


@dataclass
class Verdict:
    """The detector's reading of one epoch."""

    epoch: int
    score: float
    flags: dict[str, bool]
    values: dict[str, float]
    fired: bool = False          # True only on the epoch the detector fires
    onset: int | None = None     # the onset epoch (set from the firing epoch on)

    def signals(self) -> dict[str, Any]:
        return {**{k: _clean(v) for k, v in self.values.items()}, **self.flags}


def _clean(v: float) -> float | None:
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else round(float(v), 6)


@dataclass
class CollapseDetector:
    """The detector's state machine; :meth:`update` takes one epoch's values.

    ``values`` keys are the ``key`` of :data:`INPUTS` (missing = not measured); ``pgd_acc`` is
    required.
    """

    rule: CollapseRule = field(default_factory=CollapseRule)
    best_pgd: float = -1.0
    best_epoch: int = 0
    gap_at_best: float = math.nan
    streak: int = 0
    streak_start: int = 0
    onset: int | None = None

    @property
    def fired(self) -> bool:
        return self.onset is not None

    def update(self, epoch: int, values: dict[str, float]) -> Verdict:
        r = self.rule
        v = {k: float(x) for k, x in values.items() if x is not None and not math.isnan(float(x))}
        pgd = v["pgd_acc"]
        gap = v["fgsm_acc"] - pgd if "fgsm_acc" in v else math.nan
        if pgd > self.best_pgd:
            self.best_pgd, self.best_epoch, self.gap_at_best = pgd, epoch, gap
        flags = {}
        for signal in SIGNALS:
            flag = signal.test(self, v, gap)
            if flag is not None:
                flags[signal.name] = flag
        score = sum(flags.values()) / len(flags)
        required = {s.name for s in SIGNALS if s.required}
        on = all(flags[k] for k in required) and any(f for k, f in flags.items() if k not in required)
        if on:
            if self.streak == 0:
                self.streak_start = epoch
            self.streak += 1
        else:
            self.streak = 0
        values_out = {**v, "fgsm_pgd_gap": gap, "best_pgd_acc": self.best_pgd, "best_epoch": self.best_epoch,
                      "gap_at_best": self.gap_at_best}
        verdict = Verdict(epoch, score, flags, values_out, onset=self.onset)
        if not self.fired and on and self.streak >= r.patience:
            self.onset = self.streak_start
            verdict.fired, verdict.onset = True, self.onset
        return verdict

    def state_dict(self) -> dict[str, Any]:
        state = asdict(self)
        state["rule"] = asdict(self.rule)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for k, val in state.items():
            if k != "rule":
                setattr(self, k, val)


# ---------------------------------------------------------------------------------------------
# Offline: the same rule on a recorded metrics table
# ---------------------------------------------------------------------------------------------
def signals_from_metrics(metrics: pd.DataFrame) -> dict[int, dict[str, float]]:
    """Per-epoch detector inputs (:data:`INPUTS`) from a tidy metrics table (``RunStore.metrics()``):
    probe accuracies (``source=eval``) and the strength diagnostics' rows. Epochs without a probe
    PGD accuracy are left out."""
    df = metrics[metrics["split"] == "probe"]
    out: dict[int, dict[str, float]] = {}
    for inp in INPUTS:
        rows = df[(df["source"] == inp.source) & (df["metric"] == inp.metric)]
        if inp.attack is not None:
            rows = rows[rows["attack"] == inp.attack]
        for epoch, value in rows.groupby("epoch")["value"].last().items():
            out.setdefault(int(epoch), {})[inp.key] = float(value)
    return {e: v for e, v in sorted(out.items()) if REQUIRED.key in v}


def detect_collapse(metrics: pd.DataFrame, rule: CollapseRule | None = None) -> list[Verdict]:
    """Run the detector over a recorded metrics table; one :class:`Verdict` per evaluated epoch.
    The onset (if any) is ``next(v.onset for v in verdicts if v.fired)``."""
    detector = CollapseDetector(rule or CollapseRule())
    return [detector.update(epoch, values) for epoch, values in signals_from_metrics(metrics).items()]


# ---------------------------------------------------------------------------------------------
# Online: the hook
# ---------------------------------------------------------------------------------------------
class CollapseDiagnostic(Diagnostic):
    """See the module docstring; options are the fields of :class:`CollapseRule`."""

    name = "collapse"
    Options = CollapseRule

    def __init__(self, **rule: Any):
        super().__init__(CollapseRule(**rule), every_n_epochs=1)
        self.detector = CollapseDetector(self.options)

    def on_epoch_end(self, run: RunContext, epoch: int) -> None:
        if REQUIRED.channel not in run.metrics:  # no probe evaluation this epoch
            return
        with self.timer(run):
            self._check(run, epoch)

    def _check(self, run: RunContext, epoch: int) -> None:
        values = {inp.key: run.metrics[inp.channel] for inp in INPUTS if inp.channel in run.metrics}
        verdict = self.detector.update(epoch, values)
        self.log(run, "collapse_score", verdict.score, n=len(run.probe[1]))
        self.publish(run, collapse_score=verdict.score)
        if verdict.fired:
            self.publish(run, onset=verdict.onset)
            self._act(run, verdict)

    def _act(self, run: RunContext, verdict: Verdict) -> None:
        action = run.config.on_collapse
        onset = verdict.onset
        on = ", ".join(k for k, f in verdict.flags.items() if f)
        text = (f"collapse detected: onset at epoch {onset} (probe PGD acc {verdict.values['pgd_acc']:.3f}, best "
                f"{self.detector.best_pgd:.3f} at epoch {self.detector.best_epoch}; signals: {on})")
        run.store.log_event("collapse_onset", epoch=onset, step=run.step, detected_epoch=verdict.epoch,
                            signals=verdict.signals(), score=verdict.score, action=action)
        if action == "warn":
            print(f"warning: {text}", flush=True)
        elif action == "stop":
            run.request_stop(text)
        elif action == "rollback":
            run.request_stop(text, rollback_to_epoch=onset - 1)

    def state_dict(self) -> dict[str, Any]:
        return self.detector.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.detector.load_state_dict(state)
