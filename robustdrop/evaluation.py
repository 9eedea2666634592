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

import dataclasses
import json
import os
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from robustdrop.attacks.autoattack import describe_standard, import_torchattacks
from robustdrop.attacks.registry import AttackSettings, build_attacks, check_attack_names
from robustdrop.data import ImageData, load_dataset, probe_indices
from robustdrop.diagnostics.reference import ReferenceSource, build_reference, find_reference
from robustdrop.engine.attack_eval import AttackResult, evaluate_attacks, format_results, subset
from robustdrop.engine.evaluate import autocast_for, evaluate
from robustdrop.engine.observer import check_logits
from robustdrop.engine.trainer import resolve_device
from robustdrop.errors import RobustdropError
from robustdrop.models.user import Normalized, build_user_model, checkpoint_epoch, load_user_weights, normalization
from robustdrop.store import METRIC_COLUMNS, RunStore, atomic_write_bytes, atomic_write_text, result_checkpoint

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


def run_attack_settings(cfg: dict[str, Any], num_classes: int, seed: int) -> AttackSettings:
    """The evaluation attack settings of a run's config dict (``--eval-epsilon``, else ``--epsilon``;
    ``--eval-pgd-steps``, ``--eval-pgd-step-size``, ``--eval-restarts``); ``num_classes`` and
    ``seed`` matter to AutoAttack only."""
    return AttackSettings(epsilon=float(cfg.get("eval_epsilon") or cfg["epsilon"]), num_classes=num_classes,
                          pgd_steps=int(cfg.get("eval_pgd_steps", 20)),
                          pgd_step_size=float(cfg.get("eval_pgd_step_size", 2 / 255)),
                          restarts=int(cfg.get("eval_restarts", 1)), seed=seed)


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
        attacks: names from :data:`~robustdrop.attacks.registry.EVAL_ATTACKS`; ``clean`` is
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
    settings = _settings(cfg, data.num_classes, seed, epsilon=epsilon, pgd_steps=pgd_steps,
                         pgd_step_size=pgd_step_size, restarts=restarts)
    bs = int(batch_size or cfg.get("eval_batch_size", 500))
    return _report(source, model, data, names, settings, n=n, seed=seed, batch_size=bs, device=dev,
                   progress=progress, run_dir=_run_dir_of(source))


def _settings(cfg: dict[str, Any], num_classes: int, seed: int, **given: float | int | None) -> AttackSettings:
    """The run's evaluation settings (:func:`run_attack_settings`) with the caller's values where given, checked."""
    settings = dataclasses.replace(run_attack_settings(cfg, num_classes, seed),
                                   **{k: v for k, v in given.items() if v is not None})  # the caller's win
    if not 0 < settings.epsilon <= 1 or settings.pgd_steps < 1 or settings.restarts < 1 or settings.pgd_step_size <= 0:
        raise RobustdropError("--epsilon must be in (0, 1], --pgd-steps and --restarts >= 1, --pgd-step-size > 0")
    return settings


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

    pair = normalization(normalize, data.image_shape[0], dev)
    net = build_user_model(spec, num_classes=data.num_classes)
    state = load_user_weights(net, path, spec)
    net.to(dev)
    if pair is not None:
        net = Normalized(net, *pair)
    net.eval()
    check_logits(net, data.test_x, data.test_y, dev)  # (N, classes) logits with a class for every label
    try:
        epoch = checkpoint_epoch(path, state)
    except RobustdropError:  # a single file need not be numbered
        epoch = None
    step = state.get("global_step", state.get("step")) if isinstance(state, dict) else None
    config = {"model": spec, "dataset": data.name, "epsilon": epsilon,
              "normalize": [t.tolist() for t in pair] if pair is not None else None}
    source = ReferenceSource(path, path, config, {}, epoch, int(step) if isinstance(step, int) else None)
    settings = _settings({"epsilon": epsilon}, data.num_classes, seed, pgd_steps=pgd_steps,
                         pgd_step_size=pgd_step_size, restarts=restarts)
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


# ---------------------------------------------------------------------------------------------
# The cached final evaluation (the method table's numbers): final / best checkpoint, AutoAttack
# ---------------------------------------------------------------------------------------------
# The cache file in each run directory; the name predates the move into the package, and the
# committed runs (figures/paper/runs/) carry their rows in it.
EVAL_CACHE = "analyses_eval.json"
# Registry names of the final / best rows, and the keys of their accuracies in a cached row.
CACHED_ATTACKS = ("clean", "pgd", "cw")


@dataclass(frozen=True)
class CachedEvaluation:
    """What :func:`evaluate_run_cached` measures.

    Attributes:
        n: test examples of the final / best rows: a seeded class-balanced subset (0 = all).
        seed: the attacks' generator; the subset is drawn with ``seed + 1`` (so it is not the
            run's probe set, which uses the run's seed).
        best: the file name (without ``.pt``) under ``checkpoints/`` of a ``best`` row, or
            ``None`` for the final row only.
        autoattack_n: images of the standard AutoAttack row on the final checkpoint (0 = all; the
            first of the rows' subset, same seed), ``None`` = no AutoAttack row.
        device: where to evaluate (``auto``, ``cpu``, ``cuda:N``).
    """

    n: int = 1000
    seed: int = 0
    best: str | None = None
    autoattack_n: int | None = None
    device: str = "auto"

    def rows(self) -> tuple[str, ...]:
        return ("final", "best") if self.best else ("final",)


def cached_checkpoint(run: Path, which: str, how: CachedEvaluation) -> Path:
    """The checkpoint the ``final`` row (``result.pt``, else ``last.pt``) or the ``best`` row
    (``checkpoints/<how.best>.pt``) of run directory ``run`` evaluates (it may not exist)."""
    if which == "best":
        return run / "checkpoints" / f"{how.best}.pt"
    found = result_checkpoint(run)
    # none: ``result.pt``, which does not exist; a metrics-only copy's cached rows are read instead
    return found if found is not None else run / "checkpoints" / "result.pt"


def _pgd_description(cfg: dict[str, Any]) -> str:
    # the PGD's spec names a cached row (num_classes only matters to AutoAttack)
    return build_attacks(["pgd"], run_attack_settings(cfg, 0, 0))[0].spec().describe()


def _cache_key(run: Path, which: str, how: CachedEvaluation, tail: str) -> tuple[str, Path]:
    """``which|file|mtime|size|tail``: a retrained run (another file) is evaluated again; ``""``
    when the checkpoint is missing."""
    ckpt = cached_checkpoint(run, which if which != "autoattack" else "final", how)
    if not ckpt.is_file():
        return "", ckpt
    stat = ckpt.stat()
    return f"{which}|{ckpt.name}|{stat.st_mtime_ns}|{stat.st_size}|{tail}", ckpt


def _cached_row(run: Path, which: str, how: CachedEvaluation, cache: dict[str, Any], tail: str) -> tuple[str, Any]:
    """``(key, cached row or None)``. A metrics-only copy of a run (no checkpoints) reads the row
    cached for the same ``tail`` (n, seed and attack)."""
    key, _ = _cache_key(run, which, how, tail)
    if not key:
        rows = [v for k, v in cache.items() if k.startswith(f"{which}|") and k.endswith(f"|{tail}")]
        return "", rows[-1] if rows else None
    return key, cache.get(key)


def _read_cache(run: Path) -> dict[str, Any]:
    cache_file = run / EVAL_CACHE
    return json.loads(cache_file.read_text()) if cache_file.is_file() else {}


def _write_cache(run: Path, cache: dict[str, Any]) -> None:
    atomic_write_text(run / EVAL_CACHE, json.dumps(cache, indent=2, sort_keys=True) + "\n")


def _tail(how: CachedEvaluation, spec: str) -> str:
    return f"n={how.n}|seed={how.seed}|{spec}"


def evaluation_is_cached(run: str | os.PathLike, how: CachedEvaluation) -> bool:
    """Whether the final (and best) rows of :func:`evaluate_run_cached` are cached (nothing to compute)."""
    run = Path(run)
    if not (run / RunStore.CONFIG).is_file():
        return False
    cache, spec = _read_cache(run), _pgd_description(RunStore.open(run).read_json(RunStore.CONFIG))
    return all(_cached_row(run, which, how, cache, _tail(how, spec))[1] is not None for which in how.rows())


DataSource = ImageData | Callable[[], ImageData] | None


def _data(cfg: dict[str, Any], data: DataSource) -> ImageData:
    if isinstance(data, ImageData):
        return data
    return data() if data is not None else load_dataset(cfg["dataset"], data_dir=cfg.get("data_dir"))


def evaluate_run_cached(run: str | os.PathLike, how: CachedEvaluation, *, data: DataSource = None,
                        ) -> dict[str, dict[str, Any]]:
    """Clean, PGD-k and CW-loss PGD-k accuracy (the run's evaluation attacks, registry names
    :data:`CACHED_ATTACKS`) of the final (and best) checkpoint of run directory ``run`` on
    ``how.n`` test examples, and standard AutoAttack on the final one (``how.autoattack_n``), each
    row cached in ``<run>/analyses_eval.json``.

    Returns ``{"final": row, "best": row, "autoattack": row}`` (the rows asked for). A row has
    ``epoch``, ``n``, ``checkpoint``, ``seconds``, the accuracies by attack name and the attacks'
    descriptions (``pgd_attack``, ``cw_attack``; AutoAttack's ``attack``). Without torchattacks
    the AutoAttack row is ``{"missing": why}``. ``data``: the test set, or a function loading it
    (called only when something is computed; default: the run's dataset).
    """
    run = Path(run)
    cache = _read_cache(run)
    cfg = RunStore.open(run).read_json(RunStore.CONFIG)
    spec = _pgd_description(cfg)
    out: dict[str, dict[str, Any]] = {}
    for which in how.rows():
        key, row = _cached_row(run, which, how, cache, _tail(how, spec))
        ckpt = cached_checkpoint(run, which, how)
        if row is None and not key:
            raise RobustdropError(f"run {run} has no {ckpt.relative_to(run)} and no cached {which} evaluation for "
                                  f"n={how.n}, seed {how.seed}; let it finish first, or evaluate it where it was "
                                  "trained")
        if row is None:
            source = find_reference(ckpt)
            if which == "best" and "final" in out and out["final"]["epoch"] == source.epoch:
                # the best epoch is the last one: the same weights, evaluated once
                row = {**out["final"], "checkpoint": ckpt.name, "same_as": "final"}
            else:
                data = _data(cfg, data)
                row = _evaluate_cached_row(run.name, which, source, cfg, how, data, spec)
            cache[key] = row
            _write_cache(run, cache)
        out[which] = row
    if how.autoattack_n is not None:
        out["autoattack"] = _autoattack_row(run, cfg, how, cache, data)
    return out


def _evaluate_cached_row(name: str, which: str, source: ReferenceSource, cfg: dict[str, Any],
                         how: CachedEvaluation, data: ImageData, spec: str) -> dict[str, Any]:
    """One final / best row: the attacks on one generator seeded with ``how.seed``, in the
    attacks' order, under the run's evaluation autocast (bf16 on CUDA with ``amp``)."""
    device = resolve_device(how.device)
    model = build_reference(source, num_classes=data.num_classes, image_shape=data.image_shape, device=device)
    n_all = len(data.test_y)
    n = n_all if how.n <= 0 else min(how.n, n_all)
    idx = probe_indices(data.test_y, n, how.seed + 1) if n < n_all else torch.arange(n_all)
    attacks = build_attacks(CACHED_ATTACKS, run_attack_settings(cfg, data.num_classes, how.seed))
    start = time.perf_counter()
    results = evaluate(model, data.test_x[idx], data.test_y[idx], attacks, split="test",
                       batch_size=int(cfg.get("eval_batch_size", 500)), device=device,
                       generator=torch.Generator(device=device).manual_seed(how.seed),
                       autocast=autocast_for(device, bool(cfg.get("amp", True))))
    secs = time.perf_counter() - start
    row = {"epoch": source.epoch, "n": n, "checkpoint": source.checkpoint.name, "seconds": secs,
           "pgd_attack": spec, "cw_attack": spec.replace("pgd", "CW-loss pgd", 1)}
    row.update({k: r.acc for k, r in zip(CACHED_ATTACKS, results)})
    print(f"{name} {which} (epoch {source.epoch}, n={n}): clean {row['clean']:.4f} "
          f"PGD {row['pgd']:.4f} CW {row['cw']:.4f} ({secs:.0f}s)", flush=True)
    return row


def _autoattack_row(run: Path, cfg: dict[str, Any], how: CachedEvaluation, cache: dict[str, Any],
                    data: DataSource) -> dict[str, Any]:
    """Clean, PGD-k and standard AutoAttack accuracy of the final checkpoint on the seeded
    class-balanced subset of ``how.autoattack_n`` test images (subset seed ``how.seed + 1``, so
    they are among the final row's), through :func:`evaluate_checkpoint`; cached. Not cached and
    without torchattacks: ``{"missing": why}``."""
    seed = how.seed + 1
    tail = f"n={how.autoattack_n}|seed={seed}|standard"
    key, ckpt = _cache_key(run, "autoattack", how, tail)
    if not key:  # a metrics-only copy of the run: its cached row, if any
        rows = [v for k, v in cache.items() if k.startswith("autoattack|") and k.endswith(f"|{tail}")]
        return rows[-1] if rows else {"missing": f"{run} has no checkpoint and no cached AutoAttack row for {tail}"}
    if key in cache:
        return cache[key]
    try:
        ta = import_torchattacks()
    except RobustdropError as exc:
        return {"missing": str(exc)}
    data = _data(cfg, data)
    n = len(data.test_y) if how.autoattack_n <= 0 else min(how.autoattack_n, len(data.test_y))
    print(f"{run.name} final: standard AutoAttack on n={n} test images ...", flush=True)
    report = evaluate_checkpoint(ckpt, attacks=["pgd", "autoattack"], n=n, seed=seed, device=how.device,
                                 batch_size=int(cfg.get("eval_batch_size", 500)), data=data, progress=False)
    res = {r.spec.attack: r for r in report.results}
    aa = res["autoattack"]
    row = {"epoch": report.epoch, "n": aa.n, "checkpoint": ckpt.name, "seed": seed, "clean": res["none"].acc,
           "pgd": res["pgd"].acc, "autoattack": aa.acc, "seconds": aa.seconds, "pgd_seconds": res["pgd"].seconds,
           "attack": describe_standard(aa.spec.epsilon, data.num_classes), "pgd_attack": res["pgd"].spec.describe(),
           "torchattacks": getattr(ta, "__version__", "unknown")}
    print(f"{run.name} final (epoch {row['epoch']}, n={aa.n}): clean {row['clean']:.4f} PGD {row['pgd']:.4f} "
          f"AutoAttack {row['autoattack']:.4f} ({aa.seconds:.0f}s; PGD {row['pgd_seconds']:.0f}s)", flush=True)
    cache[key] = row
    _write_cache(run, cache)
    return row
