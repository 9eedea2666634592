"""Diagnostics: hooks that measure perturbation underfitting during training.

=============  =====================================================================  ==========
name           what                                                                   in
=============  =====================================================================  ==========
strength-ref   a frozen reference model's accuracy on FGSM / PGD δ of the current      default
               model and on random noise (the paper's Fig. 2); needs ``--reference``   (with ref)
strength       FGSM vs random-sign loss increase, FGSM–PGD agreement, gradient          default
               alignment, δ statistics (probe and training perturbations)
snapshots      FGSM δ of fixed probe images every epoch (the paper's Fig. 1)           default
collapse       online detector of the robustness collapse; acts on ``--on-collapse``   default
landscape      1-D / 2-D input-space loss landscapes, linearity error, curvature       all
=============  =====================================================================  ==========

:func:`build_hooks` turns ``config.diagnostics`` (see :mod:`robustdrop.diagnostics.selection`)
into hooks, in the order they run each epoch. ``docs/diagnostics.md`` describes each one.
"""

from __future__ import annotations

from typing import Any

from robustdrop.diagnostics.base import Diagnostic
from robustdrop.diagnostics.collapse import (
    INPUTS,
    SIGNALS,
    CollapseDetector,
    CollapseDiagnostic,
    CollapseRule,
    Signal,
    Verdict,
    detect_collapse,
    signals_from_metrics,
)
from robustdrop.diagnostics.landscape import LandscapeDiagnostic, compute_landscape
from robustdrop.diagnostics.measures import delta_autocorr, delta_stats, per_example_cos, sign_agreement
from robustdrop.diagnostics.reference import ReferenceStrengthDiagnostic, build_reference, find_reference
from robustdrop.diagnostics.selection import NAMES, OPTIONS, select
from robustdrop.diagnostics.snapshots import SnapshotDiagnostic, pick_snapshot_indices
from robustdrop.diagnostics.strength import StrengthDiagnostic
from robustdrop.engine import Hook

DIAGNOSTIC_CLASSES: dict[str, type[Diagnostic]] = {
    "strength-ref": ReferenceStrengthDiagnostic,
    "strength": StrengthDiagnostic,
    "snapshots": SnapshotDiagnostic,
    "collapse": CollapseDiagnostic,
    "landscape": LandscapeDiagnostic,
}


def create_diagnostic(name: str, config: Any = None, **options: Any) -> Diagnostic:
    """One diagnostic by name with ``options`` (``strength-ref`` takes ``config.reference``)."""
    if name == "strength-ref":
        return ReferenceStrengthDiagnostic(config.reference, **options)
    return DIAGNOSTIC_CLASSES[name](**options)


def build_hooks(config: Any) -> list[Hook]:
    """The hooks named by ``config.diagnostics`` (and ``config.reference``), in running order.

    Raises :class:`~robustdrop.errors.RobustdropError` on an unknown name or option, and on a
    reference that is missing or unreadable.
    """
    chosen = select(config.diagnostics, reference=getattr(config, "reference", None))
    return [create_diagnostic(name, config, **options) for name, options in chosen.items()]


__all__ = [
    "DIAGNOSTIC_CLASSES", "INPUTS", "NAMES", "OPTIONS", "SIGNALS", "CollapseDetector", "CollapseDiagnostic", "CollapseRule", "Diagnostic",
    "LandscapeDiagnostic", "ReferenceStrengthDiagnostic", "Signal", "SnapshotDiagnostic", "StrengthDiagnostic", "Verdict",
    "build_hooks", "build_reference", "compute_landscape", "create_diagnostic", "delta_autocorr", "delta_stats",
    "detect_collapse", "find_reference", "per_example_cos", "pick_snapshot_indices", "select", "sign_agreement",
    "signals_from_metrics",
]
