"""Run directory: config, manifest, tidy metrics, events, arrays and checkpoints."""

from robustdrop._files import atomic_write_bytes, atomic_write_text
from robustdrop.store.run_store import METRIC_COLUMNS, RunStore, load_checkpoint_file, metric_row

__all__ = [
    "METRIC_COLUMNS", "RunStore", "atomic_write_bytes", "atomic_write_text",
    "load_checkpoint_file", "metric_row",
]
