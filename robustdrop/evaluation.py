"""``robustdrop evaluate``: clean / FGSM / PGD-k / AutoAttack accuracy of any saved checkpoint.

>>> from robustdrop.evaluation import evaluate_checkpoint
>>> report = evaluate_checkpoint("runs/fgsm-quick", attacks=["pgd", "autoattack"], n=1000)
>>> print(report.table())

A run directory is evaluated at ``checkpoints/result.pt`` (a rollback's result) or else
``checkpoints/last.pt``; a checkpoint file at that file. Checkpoints are loaded with
``weights_only=True``. The images are the seeded class-balanced subset of ``n`` test examples
(with the run's seed and ``n`` = its ``--probe-size``, exactly its probe set), or the whole test
set with ``n = 0``. Results are metric rows with ``source=evaluate``, ``split=test``, the attack's
spec, ``n`` and the checkpoint's epoch and step: appended to the run's metrics for a checkpoint
of a run directory, else written (appended) to ``<checkpoint>.evaluate.csv`` or ``--out``.

A checkpoint that other code saved is evaluated with ``model="package.module:factory"`` (the user's
architecture, :mod:`robustdrop.models.user`), ``normalize=(mean, std)`` when the model expects
normalized inputs (the attacks stay in [0, 1] pixel space, ε in pixel units) and an explicit
``epsilon``; the test set is then ``dataset`` (default ``cifar10-jpeg``, the embedded copy), the
seed 0 and the attacks' settings robustdrop's defaults (PGD-20, step 2/255, 1 restart).
"""

from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from robustdrop.data import ImageData, load_dataset
from robustdrop.diagnostics.reference import ReferenceSource, build_reference, find_reference
from robustdrop.engine.attack_eval import (
    AttackResult,
    AttackSettings,
    build_attacks,
    check_attack_names,
    evaluate_attacks,
    format_results,
    subset,
)
from robustdrop.engine.trainer import resolve_device
from robustdrop.errors import RobustdropError
from robustdrop.models.user import build_user_model, checkpoint_epoch, load_user_weights
from robustdrop.store import METRIC_COLUMNS, RunStore, atomic_write_bytes, atomic_write_text

SOURCE = "evaluate"
DEFAULT_ATTACKS = ("clean", "fgsm", "pgd")
USER_DEFAULTS = {"dataset": "cifar10-jpeg", "seed": 0}  # a user checkpoint has no run config to take these from


@dataclass
class EvaluationReport:
    """What :func:`evaluate_checkpoint` measured and where the model came from."""

    source: ReferenceSource
    run_dir: Path | None
    results: list[AttackResult]
    epoch: int
    step: int
    split: str = "test"
    rows: list[dict[str, Any]] = field(default_factory=list)

    def table(self) -> str:
        where = f"{self.source.checkpoint} (epoch {self.epoch})"
        return f"{where}\n{format_results(self.results, split=self.split)}"


def _run_dir_of(source: ReferenceSource) -> Path | None:
    """The run directory a checkpoint belongs to (``<run>/checkpoints/x.pt``), if any."""
    if source.path.is_dir():
        return source.path
    run = source.checkpoint.parent.parent
    if source.checkpoint.parent.name == "checkpoints" and (run / RunStore.CONFIG).is_file():
        return run
    return None


def evaluate_checkpoint(
    path: str | os.PathLike,
    *,
    attacks: list[str] | tuple[str, ...] = DEFAULT_ATTACKS,
    n: int = 1000,
    seed: int | None = None,
    epsilon: float | None = None,
    pgd_steps: int | None = None,
    pgd_step_size: float | None = None,
    restarts: int | None = None,
    batch_size: int | None = None,
    device: str = "auto",
    dataset: str | None = None,
    data_dir: str | None = None,
    data: ImageData | None = None,
    progress: bool = True,
    model: str | None = None,
    normalize: tuple[tuple[float, ...], tuple[float, ...]] | None = None,
) -> EvaluationReport:
    """Evaluate the model of ``path`` (run directory or checkpoint file) under ``attacks``.

    Args:
        attacks: names from :data:`~robustdrop.engine.attack_eval.EVAL_ATTACKS`; ``clean`` is
            always measured too (first).
        n: size of the seeded class-balanced test subset (0 = the whole test set).
        seed: the subset's seed and the attacks' (default: the run's seed).
        epsilon, pgd_steps, pgd_step_size, restarts, batch_size: default to the run's evaluation
            settings (``--eval-epsilon``, else ``--epsilon``; ``--eval-pgd-steps``,
            ``--eval-pgd-step-size``, ``--eval-restarts``, ``--eval-batch-size``).
        dataset, data_dir, data: the test set (default: the run's dataset).
        model: ``package.module:factory`` building the architecture of a checkpoint file that
            other code saved (then ``epsilon`` is required); ``normalize``: its input
            normalization ``(mean, std)`` per channel.
    """
    names = check_attack_names(["clean", *attacks], "--attack")
    if n < 0:
        raise RobustdropError(f"--n must be >= 0 (0 = the whole test set), got {n}")
    if model is not None:
        return _evaluate_user(path, model, normalize, names=names, n=n, seed=seed, epsilon=epsilon,
                              pgd_steps=pgd_steps, pgd_step_size=pgd_step_size, restarts=restarts,
                              batch_size=batch_size, device=device, dataset=dataset, data_dir=data_dir, data=data,
                              progress=progress)
    if normalize is not None:
        raise RobustdropError("--normalize applies to a user's model; give --model package.module:factory with it")
    if Path(path).is_file() and not zipfile.is_zipfile(path):  # torch.save writes zip archives
        raise RobustdropError(f"{path} is not a checkpoint (robustdrop writes checkpoints/*.pt with torch.save); "
                              "give a run directory or one of its checkpoints/*.pt files")
    source = find_reference(path, role="checkpoint")
    cfg = source.config
    seed = int(cfg.get("seed", 0) if seed is None else seed)
    dev = resolve_device(device)
    if data is None:
        data = load_dataset(dataset or cfg["dataset"], data_dir=data_dir if data_dir is not None else cfg.get("data_dir"))
    model = build_reference(source, num_classes=data.num_classes, image_shape=data.image_shape, device=dev,
                            role="checkpoint")
    settings = AttackSettings(
        epsilon=float(epsilon if epsilon is not None else cfg.get("eval_epsilon") or cfg["epsilon"]),
        num_classes=data.num_classes,
        pgd_steps=int(cfg.get("eval_pgd_steps", 20) if pgd_steps is None else pgd_steps),
        pgd_step_size=float(cfg.get("eval_pgd_step_size", 2 / 255) if pgd_step_size is None else pgd_step_size),
        restarts=int(cfg.get("eval_restarts", 1) if restarts is None else restarts),
        seed=seed,
    )
    _check_settings(settings)
    bs = int(batch_size or cfg.get("eval_batch_size", 500))
    return _report(source, model, data, names, settings, n=n, seed=seed, batch_size=bs, device=dev,
                   progress=progress, run_dir=_run_dir_of(source))


def _check_settings(settings: AttackSettings) -> None:
    if not 0 < settings.epsilon <= 1 or settings.pgd_steps < 1 or settings.restarts < 1 or settings.pgd_step_size <= 0:
        raise RobustdropError("--epsilon must be in (0, 1], --pgd-steps and --restarts >= 1, --pgd-step-size > 0")


def _report(source: ReferenceSource, model: torch.nn.Module, data: ImageData, names: list[str],
            settings: AttackSettings, *, n: int, seed: int, batch_size: int, device: torch.device, progress: bool,
            run_dir: Path | None) -> EvaluationReport:
    """Evaluate ``model`` on the seeded subset of ``n`` test images (0 = all) under ``names``."""
    images, labels = data.test_x, data.test_y
    pick = subset(labels, n, seed)
    if pick is not None:
        images, labels = images[pick], labels[pick]
    results = evaluate_attacks(model, images, labels, build_attacks(names, settings), device=device,
                               batch_size=batch_size, seed=seed, progress=progress)
    state_epoch = source.epoch if source.epoch is not None else 0
    step = source.step if source.step is not None else 0
    rows = [row for r in results for row in r.rows(epoch=state_epoch, step=step, split="test", source=SOURCE)]
    return EvaluationReport(source, run_dir, results, state_epoch, step, rows=rows)


def _evaluate_user(path: str | os.PathLike, spec: str, normalize: tuple | None, *, names: list[str], n: int,
                   seed: int | None, epsilon: float | None, pgd_steps: int | None, pgd_step_size: float | None,
                   restarts: int | None, batch_size: int | None, device: str, dataset: str | None,
                   data_dir: str | None, data: ImageData | None, progress: bool) -> EvaluationReport:
    """:func:`evaluate_checkpoint` of a checkpoint file that other code saved, built by ``spec``."""
    path = Path(path)
    if not path.is_file():
        raise RobustdropError(f"--model evaluates a checkpoint file; {path} is not a file")
    if epsilon is None:
        raise RobustdropError("--model: give --epsilon, the L-inf radius in pixel units (e.g. 8/255); a user "
                              "checkpoint does not record it")
    seed = USER_DEFAULTS["seed"] if seed is None else int(seed)
    dev = resolve_device(device)
    if data is None:
        data = load_dataset(dataset or USER_DEFAULTS["dataset"], data_dir=data_dir)
    from robustdrop.monitor import Normalized, _check_output, _normalization  # one home of the pixel-space view

    pair = _normalization(normalize, data.image_shape[0], dev)
    net = build_user_model(spec, num_classes=data.num_classes)
    state = load_user_weights(net, path, spec)
    net.to(dev)
    if pair is not None:
        net = Normalized(net, *pair)
    net.eval()
    _check_output(net, data.test_x, data.test_y, dev)  # (N, classes) logits with a class for every label
    try:
        epoch = checkpoint_epoch(path, state)
    except RobustdropError:  # a single file need not be numbered
        epoch = None
    step = state.get("global_step", state.get("step")) if isinstance(state, dict) else None
    config = {"model": spec, "dataset": data.name, "epsilon": epsilon,
              "normalize": [t.tolist() for t in pair] if pair is not None else None}
    source = ReferenceSource(path, path, config, {}, epoch, int(step) if isinstance(step, int) else None)
    settings = AttackSettings(epsilon=float(epsilon), num_classes=data.num_classes,
                              pgd_steps=20 if pgd_steps is None else int(pgd_steps),
                              pgd_step_size=2 / 255 if pgd_step_size is None else float(pgd_step_size),
                              restarts=1 if restarts is None else int(restarts), seed=seed)
    _check_settings(settings)
    return _report(source, net, data, names, settings, n=n, seed=seed, batch_size=int(batch_size or 500), device=dev,
                   progress=progress, run_dir=None)


def write_report(report: EvaluationReport, out: str | os.PathLike | None = None) -> Path:
    """Store the report's rows: ``out`` (``.csv`` or ``.parquet``; appended if it exists), else the
    run's metrics (for a checkpoint of a run directory), else ``<checkpoint>.evaluate.csv``.
    Returns where they went."""
    if out is None and report.run_dir is not None:
        store = RunStore.open(report.run_dir)
        if not _finished(store):
            # Resuming restores the metrics of the last checkpoint, dropping rows appended since:
            # keep a copy beside them.
            print(f"note: {store.path} has not finished; resuming it drops these rows from its metrics, "
                  f"so they are also kept in {write_report(report, store.path / 'evaluate.csv')}")
        store.log_metrics(report.rows)
        store.log_event("evaluate", epoch=report.epoch, step=report.step, checkpoint=str(report.source.checkpoint),
                        attacks=[r.spec.attack for r in report.results], n=report.results[0].n if report.results else 0)
        store.flush()
        return store.path / RunStore.METRICS_PARQUET
    target = Path(out) if out is not None else report.source.checkpoint.with_suffix(".evaluate.csv")
    if target.is_dir():
        raise RobustdropError(f"--out {target} is a folder; give a file name such as {target / 'evaluate.csv'}")
    suffix = target.suffix.lower()
    if suffix not in (".csv", ".parquet"):
        raise RobustdropError(f"--out {target}: write a .csv or .parquet file")
    frame = pd.DataFrame(report.rows, columns=METRIC_COLUMNS)
    if target.is_file():
        try:
            old = pd.read_parquet(target) if suffix == ".parquet" else pd.read_csv(target)
        except Exception as exc:  # pandas raises many types for foreign files
            raise RobustdropError(f"cannot append to {target} ({type(exc).__name__}); give another --out") from None
        if list(old.columns) != METRIC_COLUMNS:
            raise RobustdropError(f"{target} is not a robustdrop metrics table; give another --out")
        frame = pd.concat([old, frame], ignore_index=True)
    if suffix == ".parquet":
        import io

        buf = io.BytesIO()
        frame.to_parquet(buf, index=False)
        atomic_write_bytes(target, buf.getvalue())
    else:
        atomic_write_text(target, frame.to_csv(index=False))
    return target


def _finished(store: RunStore) -> bool:
    """Whether the run trained all its epochs or stopped for good (its metrics are final)."""
    epochs = store.read_json(RunStore.CONFIG).get("epochs")
    m = store.metrics()
    done = int(m["epoch"].max()) if len(m) else 0
    return bool(store.events("stop")) or (isinstance(epochs, int) and done >= epochs)


def set_threads(threads: int) -> None:
    if threads:
        torch.set_num_threads(threads)
