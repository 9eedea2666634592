"""The diagnostics registry: the one list of diagnostic names, name → class, in running order.

The order is the order hooks run each epoch: the strength measures and ``wong`` first (the collapse
detector reads what they publish in ``run.metrics``), the detector before ``landscape`` (which reacts to a
fresh onset). Each class declares its options (``Options``), whether ``--diagnostics default``
includes it (``in_default``) and whether it needs ``--reference`` (``needs_reference``).
"""

from __future__ import annotations

from typing import Any

from robustdrop.diagnostics.base import Diagnostic
from robustdrop.diagnostics.collapse import CollapseDiagnostic
from robustdrop.diagnostics.landscape import LandscapeDiagnostic
from robustdrop.diagnostics.reference import ReferenceStrengthDiagnostic
from robustdrop.diagnostics.snapshots import SnapshotDiagnostic
from robustdrop.diagnostics.strength import StrengthDiagnostic
from robustdrop.diagnostics.wong import WongDiagnostic
from robustdrop.registry import Registry

DIAGNOSTICS: Registry[type[Diagnostic]] = Registry("diagnostic")


def register_diagnostic(cls: type[Diagnostic]) -> type[Diagnostic]:
    """Add a :class:`Diagnostic` subclass under its ``name``; it runs after those registered before it."""
    return DIAGNOSTICS.register(cls.name)(cls)


for _cls in (ReferenceStrengthDiagnostic, StrengthDiagnostic, SnapshotDiagnostic, WongDiagnostic, CollapseDiagnostic,
             LandscapeDiagnostic):
    register_diagnostic(_cls)


def create_diagnostic(name: str, config: Any = None, **options: Any) -> Diagnostic:
    """One diagnostic by name with ``options``, for a run of ``config`` (``strength-ref`` reads
    ``config.reference``)."""
    return DIAGNOSTICS[name].from_config(config, **options)
