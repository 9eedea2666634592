"""Diagnostics: hooks that measure perturbation underfitting during training.

=============  =====================================================================  ==========
name           what                                                                   in
=============  =====================================================================  ==========
strength-ref   a frozen reference model's accuracy on FGSM / PGD δ of the current      default
               model and on random noise (the paper's Fig. 2); needs ``--reference``   (with ref)
               (``builtin:quick`` in the quick preset; ``auto``: see ``referees``)
strength       FGSM vs random-sign loss increase, FGSM–PGD agreement, gradient          default
               alignment, δ statistics (probe and training perturbations)
snapshots      FGSM δ of fixed probe images every epoch (the paper's Fig. 1)           default
wong           Wong et al. 2020's early-stop check: PGD-5 accuracy on one fixed         by name
               training minibatch (the collapse detector's ``wong_fall`` signal)
collapse       online detector of the robustness collapse; acts on ``--on-collapse``   default
landscape      1-D / 2-D input-space loss landscapes, linearity error, curvature       all
=============  =====================================================================  ==========

The names, classes and running order are :data:`DIAGNOSTICS` (:mod:`robustdrop.diagnostics.registry`);
each class declares its options once (``Options``). :func:`build_hooks` turns ``config.diagnostics``
(see :mod:`robustdrop.diagnostics.selection`) into hooks, in running order.
``docs/diagnostics.md`` describes each one.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from robustdrop.diagnostics.base import Diagnostic, Options, option
from robustdrop.diagnostics.collapse import (
    INPUTS,
    SIGNALS,
    CollapseDetector,
    CollapseDiagnostic,
    CollapseRule,
    Signal,
    Verdict,
    detect_collapse,
    first_epochs,
    signals_from_metrics,
)
from robustdrop.diagnostics.landscape import LandscapeDiagnostic, LandscapeOptions, compute_landscape
from robustdrop.diagnostics.measures import delta_autocorr, delta_stats, per_example_cos, sign_agreement
from robustdrop.diagnostics.referees import (
    AUTO,
    ReferenceSource,
    auto_referee,
    builtin_names,
    find_reference,
    load_builtin,
    referee_config,
    verify_builtin,
)
from robustdrop.diagnostics.reference import ReferenceOptions, ReferenceStrengthDiagnostic, build_reference
from robustdrop.diagnostics.registry import DIAGNOSTICS, create_diagnostic, register_diagnostic
from robustdrop.diagnostics.selection import schema, select
from robustdrop.diagnostics.snapshots import SnapshotDiagnostic, SnapshotOptions, pick_snapshot_indices
from robustdrop.diagnostics.strength import StrengthDiagnostic, StrengthOptions
from robustdrop.diagnostics.wong import WongDiagnostic, WongOptions, fixed_minibatch
from robustdrop.engine import Hook


def build_hooks(config: Any, *, data: Any = None, progress: bool = True) -> list[Hook]:
    """The hooks named by ``config.diagnostics`` (and ``config.reference``), in running order.

    ``--reference auto`` is resolved here, before the run starts: the cached referee of this
    data / model / ε, trained first if there is none (``data``: the run's
    :class:`~robustdrop.data.ImageData`, else the config's dataset is loaded; ``progress``: show
    that training's progress bars). Raises :class:`~robustdrop.errors.RobustdropError` on an
    unknown name or option, and on a reference that is missing or unreadable.
    """
    chosen = select(config.diagnostics, reference=config.reference)
    if config.reference == AUTO and any(DIAGNOSTICS[name].needs_reference for name in chosen):
        config = dataclasses.replace(config, reference=str(auto_referee(config, data, progress=progress)))
    return [create_diagnostic(name, config, **options) for name, options in chosen.items()]


__all__ = [
    "AUTO", "DIAGNOSTICS", "INPUTS", "SIGNALS", "CollapseDetector", "CollapseDiagnostic", "CollapseRule", "Diagnostic",
    "LandscapeDiagnostic", "LandscapeOptions", "Options", "ReferenceOptions", "ReferenceSource",
    "ReferenceStrengthDiagnostic", "Signal", "SnapshotDiagnostic", "SnapshotOptions", "StrengthDiagnostic",
    "StrengthOptions", "Verdict", "WongDiagnostic", "WongOptions", "auto_referee", "build_hooks", "build_reference", "builtin_names",
    "compute_landscape", "create_diagnostic", "delta_autocorr", "delta_stats", "detect_collapse", "find_reference",
    "first_epochs", "fixed_minibatch", "load_builtin", "option", "per_example_cos", "pick_snapshot_indices", "referee_config",
    "register_diagnostic", "schema", "select", "sign_agreement", "signals_from_metrics", "verify_builtin",
]
