"""robustdrop's version: the one place it is written (pyproject's dynamic version reads it; manifests,
sweep records and ``robustdrop.environment`` import it from here, not from the package itself)."""

__version__ = "0.1.0"
