"""The referee measurement of Figure 2 made after training, from per-epoch weights.

Where Figure 2's referee is a catalog run (paper scale, --smoke: ``lib.catalog.reference_deferred``,
the GPU plan, run_all and fig2_strength alike), Figure 2's runs train WITHOUT the referee, so
they run at the same time as the referee's own training instead of after it, and keep each epoch's
weights (``save_weights_every=1``). Once both are finished, :func:`measure_run` replays every
diagnostic that needs the reference (``strength-ref``) over those weights: the package's
:func:`robustdrop.diagnostics.replay.replay_run` (the rows an in-training measurement logs, its
``time_s`` aside; reused once made, started over when interrupted). What differs: the collapse
detector ran without the ``ref_weak`` signal during training (it fires on the other signals).
"""

from __future__ import annotations

from pathlib import Path

from lib.catalog import load_data, ref_name, run_dir
from lib.setting import Setting
from robustdrop.diagnostics.replay import REPLAYED_EVENT, is_replayed, replay_run
from robustdrop.store import RunStore, epoch_files


def weights_files(path: Path) -> dict[int, Path]:
    """``{epoch: checkpoints/weights_epoch_XXXX.pt}`` of a run."""
    return epoch_files(path, weights_only=True)


def is_measured(path: Path, reference: Path | None = None) -> bool:
    """Whether the run's log holds a finished referee measurement (against ``reference``, the
    catalog's referee run, when given; else against any referee)."""
    if not (path / RunStore.CONFIG).is_file():
        return False
    if reference is not None:
        return is_replayed(path, reference=reference)
    return any("strength-ref" in e.get("sources", []) for e in RunStore.open(path).events(REPLAYED_EVENT))


def measure_run(setting: Setting, name: str) -> Path:
    """Measure run ``name`` on the referee (the catalog's reference run) after the fact; returns
    the run directory. Every epoch's weights must be there."""
    path, reference = run_dir(setting, name), run_dir(setting, ref_name(setting))
    if is_measured(path, reference):  # before loading the data (replay_run would reuse it too)
        print(f"reusing the referee measurement of {path}", flush=True)
        return path
    cfg = RunStore.open(path).read_json(RunStore.CONFIG)
    return replay_run(path, reference=reference, device=setting.device, data=load_data(setting, cfg))
