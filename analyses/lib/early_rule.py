"""The early rule calibrated, not tuned post hoc (issue 21, item 4).

The a-priori early rule (:data:`lib.prediction.APRIORI`, the detector's default before this
calibration) fires on ANY early signal (``votes=1``) with a-priori thresholds (``fall`` 0.2). Here a
rule is chosen on the calibration seeds (100-102) only, among rules restricted to the signals that
work at the quick scale (:data:`CANDIDATES`: in the committed study ``align_fall`` and ``cos_fall``
hit 12/12 with no false alarm, ``misaligned`` 10/12 with none; ``wong_fall`` is the field's
baseline), and then evaluated once on seeds 0-4 beside the a-priori rule. The default changes only
if the chosen rule wins there (:func:`wins`); it did: the detector's default is now ``align_fall``
alone with ``fall`` 0.15.

A candidate rule: a set S of candidate signals, ``votes`` k ≤ |S| (fires at the first epoch where
at least k of S hold) and the trend threshold ``fall`` (the same for ``align_fall`` and
``cos_fall``; :data:`lib.prediction.FALLS`). The choice on the calibration runs (:func:`choose`):
no false alarm on the non-collapsing runs, then the most hits (warning at or before the PGD drop),
then the longest median lead, then the simplest rule (fewest signals, fewest votes) and the least
sensitive threshold (largest ``fall``). A signal not measured in every calibration run is left out
of the pool (said in :func:`pool`); with no collapsing or no non-collapsing calibration run nothing
can be chosen.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from lib.prediction import APRIORI, FALLS, RunSummary, _verdicts
from robustdrop.diagnostics import CollapseRule, first_epochs

CANDIDATES = ("align_fall", "cos_fall", "misaligned", "wong_fall")
TRENDS = {"align_fall", "cos_fall"}  # the signals ``fall`` sets
DEFAULT_FALL = CollapseRule().fall


@dataclass(frozen=True)
class EarlyRule:
    signals: tuple[str, ...]
    votes: int = 1
    fall: float = DEFAULT_FALL

    def collapse_rule(self) -> CollapseRule:
        """The detector's rule with this early rule (the other thresholds at their defaults)."""
        return CollapseRule(signals="+".join(self.signals), votes=self.votes, fall=self.fall)

    def option(self) -> str:
        """How a user asks for it, whatever the defaults: ``collapse:signals=...[,votes=k][,fall=f]``."""
        parts = [f"signals={'+'.join(self.signals)}"] + ([f"votes={self.votes}"] if self.votes > 1 else []) \
            + ([f"fall={self.fall:g}"] if TRENDS & set(self.signals) else [])
        return "collapse:" + ",".join(parts)

    def text(self) -> str:
        which = " + ".join(f"`{s}`" for s in self.signals)
        votes = "" if len(self.signals) == 1 else (f"any of {which}" if self.votes == 1 else f"{self.votes} of {which}")
        fall = f", fall {self.fall:g}" if TRENDS & set(self.signals) else ""
        return (votes or which) + fall


def warning_epoch(run: RunSummary, rule: EarlyRule) -> int | None:
    """The first epoch where the detector with ``rule`` warns (at least ``rule.votes`` of
    ``rule.signals`` on; ``None``: never)."""
    return next((v.epoch for v in _verdicts(run.inputs, rule.collapse_rule()) if v.warned), None)


def score(runs: Sequence[RunSummary], warn) -> dict[str, float]:
    """Hits, late, missed warnings and lead times over the collapsing runs, false alarms over the
    non-collapsing runs, for ``warn(run) -> epoch | None``."""
    coll = [r for r in runs if r.outcome == "collapsing"]
    ctrl = [r for r in runs if r.outcome == "non-collapsing"]
    leads = [r.drop - w for r in coll if (w := warn(r)) is not None]
    hits = [x for x in leads if x >= 0]
    alarms = sum(warn(r) is not None for r in ctrl)
    return {"collapsing": len(coll), "hits": len(hits), "late": len(leads) - len(hits),
            "missed": len(coll) - len(leads), "lead_median": float(np.median(leads)) if leads else math.nan,
            "controls": len(ctrl), "false_alarms": alarms}


def pool(runs: Sequence[RunSummary]) -> tuple[str, ...]:
    """The candidate signals measured in every one of ``runs``."""
    return tuple(s for s in CANDIDATES if runs and all(s in r.evaluated for r in runs))


def candidates(signals: Sequence[str]) -> list[EarlyRule]:
    """Every rule over the non-empty subsets of ``signals``, every vote count and (when a trend
    signal is in the set) every ``fall`` of :data:`FALLS`."""
    out = []
    for k in range(1, len(signals) + 1):
        for subset in itertools.combinations(signals, k):
            falls = FALLS if TRENDS & set(subset) else (DEFAULT_FALL,)
            out += [EarlyRule(subset, votes, fall) for votes in range(1, k + 1) for fall in falls]
    return out


def choose(calibration: Sequence[RunSummary]) -> tuple[EarlyRule | None, dict[str, float], int]:
    """The rule chosen on the calibration runs (module docstring), its score there and how many
    rules were tried; ``(None, {}, n)`` when none can be chosen."""
    rules = candidates(pool(calibration))
    best, best_key, best_score = None, None, {}
    for rule in rules:
        s = score(calibration, lambda r, rule=rule: warning_epoch(r, rule))
        if s["collapsing"] == 0 or s["controls"] == 0 or s["false_alarms"] > 0:
            continue
        lead = -math.inf if math.isnan(s["lead_median"]) else s["lead_median"]
        key = (s["hits"], lead, -len(rule.signals), -rule.votes, rule.fall)
        if best_key is None or key > best_key:
            best, best_key, best_score = rule, key, s
    return best, best_score, len(rules)


def apriori_score(runs: Sequence[RunSummary]) -> dict[str, float]:
    """The a-priori early rule (:data:`~lib.prediction.APRIORI`: any early signal measured, ``fall``
    0.2) on ``runs``, replayed here so that it does not depend on the rule the runs were summarized with."""
    return score(runs, lambda r: first_epochs(_verdicts(r.inputs, APRIORI))["early"])


def wins(chosen: dict[str, float], default: dict[str, float]) -> bool:
    """Whether the chosen rule beats the ``default`` (the a-priori rule) on the evaluation runs: no
    fewer hits and no more false alarms, and strictly better in one of the two."""
    return (chosen["hits"] >= default["hits"] and chosen["false_alarms"] <= default["false_alarms"]
            and (chosen["hits"] > default["hits"] or chosen["false_alarms"] < default["false_alarms"]))
