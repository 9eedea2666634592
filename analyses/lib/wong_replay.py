"""Wong et al. 2020's early-stop check (the ``wong`` diagnostic) measured AFTER training, from a
finished run's per-epoch checkpoints (``checkpoints/epoch_XXXX.pt``, ``--checkpoint-every 1``),
for runs that trained without it (issue 21: the frontier sweeps).

Each epoch's weights are loaded and the diagnostic's epoch end runs as it would have during
training (:func:`robustdrop.diagnostics.replay.replay_hooks` over the context the trainer builds,
:func:`robustdrop.engine.make_context`): the same options, fixed training minibatch (seeded by the run's seed), generators
(seeded by run seed, name and epoch) and epoch/step numbers, so the rows are the ones an attached
``--diagnostics wong`` logs (``time_s`` aside; ``tests/test_wong_replay.py`` checks this).

The run directories are never written: the rows go to a separate table (a CSV, default
``figures/frontier_wong.csv``), one block per run keyed by the run's path and its last
checkpoint's size and mtime (a retrained run is measured again). :func:`with_wong` adds a run's
block to its metrics, where ``detect_collapse`` reads ``wong_fall``.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

import pandas as pd

from robustdrop.data import ImageData, probe_indices, train_indices
from robustdrop.diagnostics import WongDiagnostic
from robustdrop.diagnostics.replay import epoch_weights_files, replay_hooks
from robustdrop.engine import Observer, TrackConfig, make_context, resolve_device
from robustdrop.methods import create_method
from robustdrop.models import create_model
from robustdrop.store import RunStore, atomic_write_text, load_checkpoint_file

KEY_COLUMNS = ("run", "run_key")


def run_key(path: Path) -> str:
    """Identifies one training of a run: its last checkpoint's size and mtime."""
    stat = (path / "checkpoints" / "last.pt").stat()
    return f"{stat.st_size}|{stat.st_mtime_ns}"


def replay_wong(path: Path, data: ImageData, *, device: str = "cpu", **options) -> pd.DataFrame:
    """The ``wong`` diagnostic's rows for every epoch of run ``path`` (with ``options``), measured
    on its per-epoch weights; the run is only read. Raises ``RobustdropError`` when an epoch's
    weights are missing (:func:`robustdrop.diagnostics.replay.epoch_weights_files`, the package
    replay's check)."""
    store_in = RunStore.open(path)
    cfg = TrackConfig.from_dict(store_in.read_json(RunStore.CONFIG))
    files = epoch_weights_files(path, cfg.epochs)
    dev = resolve_device(device)
    model = create_model(cfg.model, num_classes=data.num_classes, in_channels=data.image_shape[0],
                         image_size=data.image_shape[1], width=cfg.width, depth=cfg.depth).to(dev).eval()
    train_idx, _ = train_indices(len(data.train_y), cfg.val_size, cfg.seed, cfg.train_subset)
    probe = probe_indices(data.test_y, min(cfg.probe_size, len(data.test_y)), cfg.seed)
    with tempfile.TemporaryDirectory(prefix="wong-replay-") as scratch:
        store = RunStore.create(scratch, "rows")  # receives the rows; thrown away after reading
        run = make_context(cfg, store, model, device=dev, data=data, method=create_method(cfg),
                           probe=(data.test_x[probe].to(dev), data.test_y[probe].to(dev)),
                           train_images=data.train_x[train_idx], train_labels=data.train_y[train_idx])
        observer = Observer(run, [WongDiagnostic(**options)])
        observer.emit("on_run_start")

        def weights():
            for epoch, file in files.items():
                state = load_checkpoint_file(file, map_location=dev)
                yield epoch, state["model"], int(state["step"])

        replay_hooks(observer, weights())
        store.flush()
        return store.metrics()


def wong_table(paths: Iterable[Path], table: Path, data_for: Callable[[dict], ImageData], *,
               device: str = "cpu") -> pd.DataFrame:
    """The table of ``wong`` rows of the finished runs ``paths``, measuring (and appending, one run
    at a time, atomically) those not in ``table`` yet for their current training."""
    rows = pd.read_csv(table) if table.is_file() else pd.DataFrame()
    for path in paths:
        name, key = str(path), run_key(path)
        if len(rows) and ((rows["run"] == name) & (rows["run_key"] == key)).any():
            continue
        cfg = RunStore.open(path).read_json(RunStore.CONFIG)
        got = replay_wong(path, data_for(cfg), device=device)
        got.insert(0, "run_key", key)
        got.insert(0, "run", name)
        keep = rows[rows["run"] != name] if len(rows) else rows
        rows = pd.concat([keep, got], ignore_index=True)
        table.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(table, rows.to_csv(index=False))
        acc = got[got["metric"] == "acc"]["value"]
        print(f"{path.parent.name}/{path.name}: wong check replayed over {len(acc)} epochs "
              f"(acc {acc.iloc[0]:.3f} → {acc.iloc[-1]:.3f})", flush=True)
    return rows


def with_wong(metrics: pd.DataFrame, table: pd.DataFrame | None, path: Path) -> pd.DataFrame:
    """The run's metrics plus its ``wong`` rows from ``table`` (unchanged when it has none, or
    when the run logged the diagnostic itself)."""
    if table is None or not len(table) or (metrics["source"] == "wong").any():
        return metrics
    mine = table[table["run"] == str(path)].drop(columns=list(KEY_COLUMNS))
    return pd.concat([metrics, mine[metrics.columns.intersection(mine.columns)]], ignore_index=True) \
        if len(mine) else metrics

