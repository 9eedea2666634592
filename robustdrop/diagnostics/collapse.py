"""``collapse``: an online detector of catastrophic overfitting (the robustness drop), with an
early-warning rule.

Every epoch with a probe evaluation it reads its :data:`INPUTS` from ``run.metrics``: the probe
accuracies (clean, FGSM, PGD) the evaluation put there and the values the strength diagnostics
published in the same epoch (they run before it), and evaluates the :data:`SIGNALS` (each says
there what it means). Two rules read them:

**Confirmatory rule (the onset).** Fires once, at the first epoch where ``pgd_drop`` holds together
with at least one of the other ``confirm`` signals, for ``patience`` consecutive epochs (default 1);
the onset is the first epoch of that streak. It needs the probe PGD evaluation of the current model.

**Early rule (the warning).** Fires once, at the first epoch where at least ``votes`` (default 1;
at most the number measured) of the ``early`` signals named by ``signals`` hold, for ``patience``
consecutive epochs; the warning is the first epoch of that streak. By default only ``align_fall``
votes, with ``fall`` 0.15: the rule calibrated on separate seeds (docs/collapse-prediction.md, "The
early rule calibrated"); ``signals=all, fall=0.2`` is the a-priori rule (any early signal). Every
early signal is evaluated and recorded either way. No early signal reads the probe PGD
evaluation: they are the gradient alignment, cos(δ_FGSM, δ_PGD) of the strength diagnostic (a PGD-5 attack on its 500
probe examples, cheaper than the probe's PGD-20 evaluation and not an accuracy), the FGSM-vs-noise
loss increase, the referee's FGSM-vs-noise gap, the falls of these from their running maxima
(counted from epoch ``start``), and — with ``--diagnostics wong`` — the field's baseline, Wong et
al. 2020's early stop (``wong_fall``: PGD-5 accuracy on a fixed training minibatch down by more
than ``wong_fall`` from the previous epoch). The other thresholds are fixed a priori from what the
signals mean (docs/diagnostics.md, "The early warning").

Signals whose diagnostic did not run are left out. ``collapse_score`` (logged every evaluated
epoch, and published as ``collapse/collapse_score``) is the fraction of the available ``confirm``
signals that are on.

Both rules are evaluated and recorded in every run; ``mode`` (``confirm``, the default, or
``early``) says which one acts on ``config.on_collapse``. The warning publishes
``collapse/warning`` and records the event ``collapse_warning``; the onset publishes
``collapse/onset`` (for the hooks after it) and records ``collapse_onset``. Each event has
``signals`` (every value and flag), ``detected_epoch``, ``mode`` and ``action`` (what was done;
``none`` for the rule that does not act; in ``early`` mode an onset that came without a warning
acts). Actions: ``warn`` prints one line, ``stop`` ends the run
after this epoch, ``rollback`` ends it and keeps the checkpoint of the epoch before the onset (or the
warning) as ``checkpoints/result.pt``, ``switch`` continues training with ``config.switch_to`` from
the next epoch on (the trainer records the event ``method_switch``). The same rules run offline on
a recorded metrics table with :func:`detect_collapse`; :func:`first_epochs` gives each signal's
first epoch.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import pandas as pd

from robustdrop.diagnostics.base import Diagnostic, Options, option
from robustdrop.errors import RobustdropError

if TYPE_CHECKING:
    from robustdrop.engine import RunContext


@dataclass(frozen=True)
class Input:
    """A value the detector reads: ``run.metrics[channel]`` in a live run; in a recorded run the
    row of this ``split`` with this ``source``, ``metric`` and ``attack`` (``None``: any attack)."""

    key: str
    channel: str
    source: str
    metric: str
    attack: str | None = None
    split: str = "probe"


# The detector's inputs, in the order its verdicts list their values.
INPUTS = (
    Input("pgd_acc", "probe/acc/pgd", "eval", "acc", "pgd"),
    Input("fgsm_acc", "probe/acc/fgsm", "eval", "acc", "fgsm"),
    Input("clean_acc", "probe/acc/none", "eval", "acc", "none"),
    Input("ref_acc_fgsm", "strength-ref/ref_acc_fgsm", "strength-ref", "ref_acc", "fgsm"),
    Input("ref_acc_noise", "strength-ref/ref_acc_noise", "strength-ref", "ref_acc", "noise-sign"),
    Input("strength_ratio", "strength/strength_ratio", "strength", "strength_ratio"),
    Input("grad_alignment", "strength/grad_alignment", "strength", "grad_alignment"),
    Input("cos_fgsm_pgd", "strength/cos_fgsm_pgd", "strength", "cos_fgsm_pgd"),
    Input("wong_acc", "wong/acc", "wong", "acc", "pgd", split="train"),
)
REQUIRED = INPUTS[0]  # pgd_acc: no verdict without it
MODES = ("confirm", "early")


@dataclass(frozen=True)
class CollapseRule(Options):
    """Thresholds of the detector (see the module docstring): the ``collapse`` diagnostic's options."""

    drop: float = option(0.5, "PGD acc below drop × best")
    floor: float = option(0.1, "best PGD acc needed before a drop counts")
    gap: float = option(0.15, "FGSM−PGD gap widening vs the best epoch")
    ratio: float = option(1.5, "strength_ratio at or below this is noise-like")
    align: float = option(0.5, "grad_alignment below this is misaligned")
    margin: float = option(0.02, "ref_acc(fgsm) within margin of ref_acc(noise-sign)")
    patience: int = option(1, "consecutive epochs a rule must hold", minimum=1)
    mode: str = option("confirm", "which rule acts on --on-collapse: confirm (after the PGD drop) or early "
                                  "(the early warning)")
    fall: float = option(0.15, "early: a cosine (grad_alignment, cos_fgsm_pgd) this far below its running max")
    ref_fall: float = option(0.5, "early: the referee's noise−FGSM gap at most ref_fall × its running max")
    start: int = option(2, "early: first epoch that counts in the running maxima", minimum=1)
    votes: int = option(1, "early: early signals that must hold at once", minimum=1)
    wong_fall: float = option(0.2, "early: the wong minibatch's PGD accuracy more than this below the previous "
                                   "epoch's (Wong et al. 2020's early stop)")
    signals: str = option("align_fall", "early: the early signals that vote, +-joined (e.g. align_fall+cos_fall), or all")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.mode not in MODES:
            raise RobustdropError(f"option collapse:mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        early = [s.name for s in SIGNALS if s.early]
        unknown = [name for name in self.voters() or () if name not in early]
        if unknown:
            raise RobustdropError(f"option collapse:signals: {unknown[0]!r} is not an early signal; use all or "
                                  f"+-joined names of: {', '.join(early)}")

    def voters(self) -> tuple[str, ...] | None:
        """The early signals that vote (``signals``), or None for every early signal."""
        return None if self.signals.strip() == "all" else tuple(n.strip() for n in self.signals.split("+"))


@dataclass(frozen=True)
class Signal:
    """One flag of the detector. ``test(detector, values, gap)`` sees the epoch's input values (by
    :data:`INPUTS` key), the FGSM−PGD gap and the detector's state after its running-best update; it
    returns ``None`` when an input it needs was not measured (the signal is then left out).
    ``confirm``: part of the confirmatory rule (``required``: that rule needs it); ``early``: votes in
    the early rule (never a signal that reads the probe PGD evaluation)."""

    name: str
    meaning: str
    test: Callable[[CollapseDetector, dict[str, float], float], bool | None]
    required: bool = False
    confirm: bool = True
    early: bool = False


def _pgd_drop(d: CollapseDetector, v: dict[str, float], gap: float) -> bool:
    return d.best_pgd >= d.rule.floor and v["pgd_acc"] < d.rule.drop * d.best_pgd


def _gap_widening(d: CollapseDetector, v: dict[str, float], gap: float) -> bool | None:
    if math.isnan(gap) or math.isnan(d.gap_at_best):
        return None
    return gap - d.gap_at_best >= d.rule.gap


def _weak_fgsm(d: CollapseDetector, v: dict[str, float], gap: float) -> bool | None:
    return v["strength_ratio"] <= d.rule.ratio if "strength_ratio" in v else None


def _ref_gap(v: dict[str, float]) -> float | None:
    """The referee's accuracy on noise minus its accuracy on FGSM δ: how much stronger than noise FGSM is."""
    if "ref_acc_fgsm" not in v or "ref_acc_noise" not in v:
        return None
    return v["ref_acc_noise"] - v["ref_acc_fgsm"]


def _ref_weak(d: CollapseDetector, v: dict[str, float], gap: float) -> bool | None:
    ref_gap = _ref_gap(v)
    return None if ref_gap is None else ref_gap <= d.rule.margin


def _misaligned(d: CollapseDetector, v: dict[str, float], gap: float) -> bool | None:
    return v["grad_alignment"] < d.rule.align if "grad_alignment" in v else None


def _fallen(d: CollapseDetector, key: str, v: dict[str, float]) -> bool | None:
    """``v[key]`` at least ``fall`` below its running max (``None`` before epoch ``start``)."""
    peak = d.peaks.get(key)
    if key not in v or peak is None:
        return None
    return v[key] <= peak - d.rule.fall


def _align_fall(d: CollapseDetector, v: dict[str, float], gap: float) -> bool | None:
    return _fallen(d, "grad_alignment", v)


def _cos_fall(d: CollapseDetector, v: dict[str, float], gap: float) -> bool | None:
    return _fallen(d, "cos_fgsm_pgd", v)


def _wong_fall(d: CollapseDetector, v: dict[str, float], gap: float) -> bool | None:
    # Wong et al. stop when acc − previous acc < −0.2; their previous starts at 0, so epoch 1 never fires.
    if "wong_acc" not in v:
        return None
    previous = d.previous.get("wong_acc")
    return previous is not None and v["wong_acc"] - previous < -d.rule.wong_fall


def _ref_fall(d: CollapseDetector, v: dict[str, float], gap: float) -> bool | None:
    ref_gap, peak = _ref_gap(v), d.peaks.get("ref_gap")
    if ref_gap is None or peak is None or peak <= d.rule.margin:  # never separated: ref_weak's case
        return None
    return ref_gap <= d.rule.ref_fall * peak


# The detector's signals, in the order its verdicts list them.
SIGNALS = (
    Signal("pgd_drop", "probe PGD accuracy below `drop` × its running best, with the best at least `floor`",
           _pgd_drop, required=True),
    Signal("gap_widening", "the FGSM−PGD accuracy gap at least `gap` wider than at the best epoch (FGSM accuracy "
           "far above PGD accuracy is the classic signature of catastrophic overfitting)", _gap_widening),
    Signal("weak_fgsm", "`strength_ratio` ≤ `ratio`: FGSM raises the loss no more than random signs", _weak_fgsm,
           early=True),
    Signal("ref_weak", "the reference model's accuracy on FGSM δ within `margin` of (or above) its accuracy on "
           "random-sign noise (`strength-ref`; the paper's criterion)", _ref_weak, early=True),
    Signal("misaligned", "`grad_alignment` below `align`", _misaligned, early=True),
    Signal("align_fall", "`grad_alignment` at least `fall` below its running max (from epoch `start`)",
           _align_fall, confirm=False, early=True),
    Signal("cos_fall", "`cos_fgsm_pgd` at least `fall` below its running max (from epoch `start`)",
           _cos_fall, confirm=False, early=True),
    Signal("ref_fall", "the referee's gap ref_acc(noise-sign) − ref_acc(fgsm) at most `ref_fall` × its running "
           "max (from epoch `start`; left out while that max is ≤ `margin`)", _ref_fall, confirm=False, early=True),
    Signal("wong_fall", "the `wong` diagnostic's PGD-5 accuracy on its fixed training minibatch more than `wong_fall` "
           "below the previous epoch's (Wong et al. 2020's early stop; needs `--diagnostics wong`)", _wong_fall,
           confirm=False, early=True),
)
# The values whose running maxima (from epoch ``start``) the trend signals compare with.
_PEAKS: dict[str, Callable[[dict[str, float]], float | None]] = {
    "grad_alignment": lambda v: v.get("grad_alignment"),
    "cos_fgsm_pgd": lambda v: v.get("cos_fgsm_pgd"),
    "ref_gap": _ref_gap,
}


@dataclass
class Verdict:
    """The detector's reading of one epoch."""

    epoch: int
    score: float
    flags: dict[str, bool]
    values: dict[str, float]
    fired: bool = False          # True only on the epoch the confirmatory rule fires
    onset: int | None = None     # the onset epoch (set from the firing epoch on)
    warned: bool = False         # True only on the epoch the early rule fires
    warning: int | None = None   # the warning epoch (set from that epoch on)

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
    peaks: dict[str, float] = field(default_factory=dict)  # running maxima of the trend signals' values
    previous: dict[str, float] = field(default_factory=dict)  # the last epoch's values (wong_fall's baseline)
    early_streak: int = 0
    early_streak_start: int = 0
    warning: int | None = None

    @property
    def fired(self) -> bool:
        return self.onset is not None

    @property
    def warned(self) -> bool:
        return self.warning is not None

    def update(self, epoch: int, values: dict[str, float]) -> Verdict:
        r = self.rule
        v = {k: float(x) for k, x in values.items() if x is not None and not math.isnan(float(x))}
        pgd = v["pgd_acc"]
        gap = v["fgsm_acc"] - pgd if "fgsm_acc" in v else math.nan
        if pgd > self.best_pgd:
            self.best_pgd, self.best_epoch, self.gap_at_best = pgd, epoch, gap
        if epoch >= r.start:
            for key, read in _PEAKS.items():
                x = read(v)
                if x is not None:
                    self.peaks[key] = max(self.peaks.get(key, -math.inf), x)
        flags = {}
        for signal in SIGNALS:
            flag = signal.test(self, v, gap)
            if flag is not None:
                flags[signal.name] = flag
        confirm = {s.name: flags[s.name] for s in SIGNALS if s.confirm and s.name in flags}
        score = sum(confirm.values()) / len(confirm)
        required = {s.name for s in SIGNALS if s.required}
        on = all(confirm[k] for k in required) and any(f for k, f in confirm.items() if k not in required)
        self.streak, self.streak_start = _advance(self.streak, self.streak_start, on, epoch)
        voters = r.voters()
        early = [flags[s.name] for s in SIGNALS if s.early and s.name in flags and (voters is None or s.name in voters)]
        votes = sum(early)
        early_on = bool(early) and votes >= min(r.votes, len(early))
        self.early_streak, self.early_streak_start = _advance(self.early_streak, self.early_streak_start,
                                                              early_on, epoch)
        values_out = {**v, "fgsm_pgd_gap": gap, "best_pgd_acc": self.best_pgd, "best_epoch": self.best_epoch,
                      "gap_at_best": self.gap_at_best, "early_votes": votes,
                      **{f"peak_{k}": x for k, x in self.peaks.items()}}
        verdict = Verdict(epoch, score, flags, values_out, onset=self.onset, warning=self.warning)
        self.previous = v
        if not self.fired and on and self.streak >= r.patience:
            self.onset = self.streak_start
            verdict.fired, verdict.onset = True, self.onset
        if not self.warned and early_on and self.early_streak >= r.patience:
            self.warning = self.early_streak_start
            verdict.warned, verdict.warning = True, self.warning
        return verdict

    def state_dict(self) -> dict[str, Any]:
        state = asdict(self)
        state["rule"] = asdict(self.rule)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for k, val in state.items():  # a state saved before the early rule lacks its keys: their defaults stay
            if k != "rule":
                setattr(self, k, dict(val) if k in ("peaks", "previous") else val)


def _advance(streak: int, start: int, on: bool, epoch: int) -> tuple[int, int]:
    """A rule's run of consecutive epochs and its first epoch, after this epoch."""
    if not on:
        return 0, start
    return streak + 1, (epoch if streak == 0 else start)


# ---------------------------------------------------------------------------------------------
# Offline: the same rules on a recorded metrics table
# ---------------------------------------------------------------------------------------------
def signals_from_metrics(metrics: pd.DataFrame) -> dict[int, dict[str, float]]:
    """Per-epoch detector inputs (:data:`INPUTS`) from a tidy metrics table (``RunStore.metrics()``):
    probe accuracies (``source=eval``), the strength diagnostics' rows and ``wong``'s (``split=train``).
    Epochs without a probe PGD accuracy are left out."""
    out: dict[int, dict[str, float]] = {}
    for inp in INPUTS:
        df = metrics[metrics["split"] == inp.split]
        rows = df[(df["source"] == inp.source) & (df["metric"] == inp.metric)]
        if inp.attack is not None:
            rows = rows[rows["attack"] == inp.attack]
        for epoch, value in rows.groupby("epoch")["value"].last().items():
            out.setdefault(int(epoch), {})[inp.key] = float(value)
    return {e: v for e, v in sorted(out.items()) if REQUIRED.key in v}


def detect_collapse(metrics: pd.DataFrame, rule: CollapseRule | None = None) -> list[Verdict]:
    """Run the detector (both rules) over a recorded metrics table; one :class:`Verdict` per
    evaluated epoch. The onset (if any) is ``next(v.onset for v in verdicts if v.fired)``, the
    early warning ``next(v.warning for v in verdicts if v.warned)``."""
    detector = CollapseDetector(rule or CollapseRule())
    return [detector.update(epoch, values) for epoch, values in signals_from_metrics(metrics).items()]


def first_epochs(verdicts: list[Verdict]) -> dict[str, int | None]:
    """The first epoch each of :data:`SIGNALS` was on (``None``: never, or never measured), and the
    epochs at which the rules fired, when a user could act: ``early`` and ``confirm`` (with
    ``patience`` > 1 these are later than the warning / onset epochs, the first of the streak)."""
    out: dict[str, int | None] = {s.name: next((v.epoch for v in verdicts if v.flags.get(s.name)), None)
                                  for s in SIGNALS}
    out["early"] = next((v.epoch for v in verdicts if v.warned), None)
    out["confirm"] = next((v.epoch for v in verdicts if v.fired), None)
    return out


# ---------------------------------------------------------------------------------------------
# Online: the hook
# ---------------------------------------------------------------------------------------------
class CollapseDiagnostic(Diagnostic):
    """See the module docstring; options are the fields of :class:`CollapseRule`."""

    name = "collapse"
    Options = CollapseRule
    replayable = False  # it reads the epoch's evaluation and the strength values from the channel

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
        if verdict.warned:
            self.publish(run, warning=verdict.warning)
            self._record(run, verdict, "early")
        if verdict.fired:
            self.publish(run, onset=verdict.onset)
            self._record(run, verdict, "confirm")

    def _record(self, run: RunContext, verdict: Verdict, rule: str) -> None:
        """Log the rule's event, and act on ``--on-collapse`` if it is the ``mode``'s rule (in
        ``early`` mode also on an onset that came without a warning: the early rule missed it)."""
        mode = self.options.mode
        acts = rule == mode or (mode == "early" and not self.detector.warned)
        action = run.config.on_collapse if acts else "none"
        on = ", ".join(k for k, f in verdict.flags.items() if f)
        best = f"best {self.detector.best_pgd:.3f} at epoch {self.detector.best_epoch}"
        if rule == "early":
            epoch, kind = verdict.warning, "collapse_warning"
            text = (f"early warning of a collapse at epoch {epoch} (signals: {on}; probe PGD acc "
                    f"{verdict.values['pgd_acc']:.3f}, {best})")
        else:
            epoch, kind = verdict.onset, "collapse_onset"
            text = (f"collapse detected: onset at epoch {epoch} (probe PGD acc {verdict.values['pgd_acc']:.3f}, "
                    f"{best}; signals: {on})")
        run.store.log_event(kind, epoch=epoch, step=run.step, detected_epoch=verdict.epoch, mode=self.options.mode,
                            signals=verdict.signals(), score=verdict.score, action=action)
        if not acts:
            if mode == "early":  # say that the warning came true
                print(f"note: {text}; the early warning was at epoch {self.detector.warning}", flush=True)
            return
        if action == "warn":
            print(f"warning: {text}", flush=True)
        elif action == "stop":
            run.request_stop(text)
        elif action == "rollback":
            run.request_stop(text, rollback_to_epoch=epoch - 1)
        elif action == "switch":
            run.request_switch(text, to=run.config.switch_to)

    def state_dict(self) -> dict[str, Any]:
        return self.detector.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.detector.load_state_dict(state)
