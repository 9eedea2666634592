"""The training engine: config, evaluation, the hook API and the Trainer."""

from robustdrop.engine.config import PRESETS, TrackConfig, make_config, parse_fraction
from robustdrop.engine.evaluate import EvalResult, autocast_for, evaluate
from robustdrop.engine.hooks import Hook, RunContext
from robustdrop.engine.observer import EpochEnd, Observer, check_logits, eval_rows, guarded, make_context
from robustdrop.engine.trainer import Trainer, default_run_name, resolve_device

__all__ = [
    "PRESETS", "EpochEnd", "EvalResult", "Hook", "Observer", "RunContext", "TrackConfig", "Trainer", "autocast_for",
    "check_logits",
    "default_run_name", "eval_rows", "evaluate", "guarded", "make_config", "make_context", "parse_fraction",
    "resolve_device",
]
