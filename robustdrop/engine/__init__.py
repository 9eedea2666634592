"""The training engine: config, evaluation, the hook API and the Trainer."""

from robustdrop.engine.config import PRESETS, TrackConfig, make_config, parse_fraction
from robustdrop.engine.evaluate import EvalResult, autocast_for, evaluate
from robustdrop.engine.hooks import Hook, RunContext
from robustdrop.engine.trainer import Trainer, default_run_name, resolve_device

__all__ = [
    "PRESETS", "EvalResult", "Hook", "RunContext", "TrackConfig", "Trainer", "autocast_for",
    "default_run_name", "evaluate", "make_config", "parse_fraction", "resolve_device",
]
