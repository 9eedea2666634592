"""Run directory: config, manifest, tidy metrics, events, arrays and checkpoints; a sweep's record
(``sweep.json``); a run's results without checkpoints, packed to leave the machine (``export``)."""

from robustdrop._files import atomic_write_bytes, atomic_write_text
from robustdrop.store.checkpoints import (
    BEST,
    KEEP_ROLLING,
    LAST,
    RESULT,
    CheckpointSaver,
    epoch_checkpoint_name,
    epoch_files,
    epoch_weights,
    parse_epoch,
    result_checkpoint,
    weights_checkpoint_name,
)
from robustdrop.store.export import EXPORT_FILES, export_run, pack_folder
from robustdrop.store.lock import LOCK_NAME, RunLock
from robustdrop.store.run_store import METRIC_COLUMNS, RunStore, load_checkpoint_file, metric_row
from robustdrop.store.sweep_record import SWEEP_FILE, SweepRecord, is_sweep_dir

__all__ = [
    "BEST", "KEEP_ROLLING", "LAST", "LOCK_NAME", "METRIC_COLUMNS", "RESULT", "EXPORT_FILES", "CheckpointSaver", "RunLock", "RunStore", "atomic_write_bytes",
    "atomic_write_text", "epoch_checkpoint_name", "epoch_files", "epoch_weights", "export_run", "pack_folder", "load_checkpoint_file", "metric_row", "parse_epoch",
    "result_checkpoint", "weights_checkpoint_name", "SWEEP_FILE", "SweepRecord", "is_sweep_dir",
]
