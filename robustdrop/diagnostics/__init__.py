"""Diagnostics: hooks that measure perturbation underfitting (filled in by the diagnostics work)."""

from __future__ import annotations

from robustdrop.engine import Hook


def build_hooks(config) -> list[Hook]:
    return []
