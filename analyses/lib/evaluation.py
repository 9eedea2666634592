"""The tables' test-set evaluation of a run's final and best checkpoints: clean, PGD-k and
CW-loss PGD-k accuracy, and standard AutoAttack on the final checkpoint, cached in
``<run>/analyses_eval.json``."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

from lib.catalog import load_data, run_dir
from lib.setting import Setting
from lib.training import BEST_CHECKPOINT
from robustdrop.attacks import PGD, cw_margin_loss
from robustdrop.attacks.autoattack import (
    STANDARD_ITERATIONS,
    STANDARD_SQUARE_P_INIT,
    STANDARD_SQUARE_QUERIES,
    STANDARD_TARGETS,
    import_torchattacks,
)
from robustdrop.data import ImageData, probe_indices
from robustdrop.diagnostics import build_reference, find_reference
from robustdrop.engine import autocast_for, evaluate, resolve_device
from robustdrop.errors import RobustdropError
from robustdrop.evaluation import evaluate_checkpoint
from robustdrop.formatting import format_eps
from robustdrop.store import RunStore, atomic_write_text, result_checkpoint

EVAL_CACHE = "analyses_eval.json"


def checkpoint_file(path: Path, which: str) -> Path:
    """The checkpoint of run ``path`` that the ``final`` row (``result.pt``, else ``last.pt``) or
    the ``best`` row (:class:`~lib.training.KeepBest`'s ``best_model.pt``) evaluates."""
    if which == "best":
        return path / "checkpoints" / f"{BEST_CHECKPOINT}.pt"
    found = result_checkpoint(path)
    # none: ``result.pt``, which does not exist; the callers read a metrics-only copy's cached rows
    # or say the run must finish first
    return found if found is not None else path / "checkpoints" / "result.pt"


def eval_attacks(cfg: dict[str, Any]) -> dict[str, PGD | None]:
    eps = float(cfg["epsilon"])
    kw = dict(steps=int(cfg["eval_pgd_steps"]), step_size=float(cfg["eval_pgd_step_size"]),
              restarts=int(cfg["eval_restarts"]))
    return {"clean": None, "pgd": PGD(eps, **kw), "cw": PGD(eps, loss_fn=cw_margin_loss, **kw)}


def _cached(path: Path, which: str, cache: dict[str, Any], setting: Setting, spec: str) -> tuple[str, Any]:
    """``(key, cached row or None)`` of the ``which`` checkpoint. The key names the checkpoint file
    (and its mtime and size, so a retrained run is evaluated again). A metrics-only copy of a run
    (no checkpoints, e.g. the GPU plan's figures/paper/runs/) reads the row cached for the same
    ``eval_n``, seed and attack."""
    ckpt = checkpoint_file(path, which)
    tail = f"n={setting.eval_n}|seed={setting.seed}|{spec}"
    if not ckpt.is_file():
        rows = [v for k, v in cache.items() if k.startswith(f"{which}|") and k.endswith(f"|{tail}")]
        return "", rows[-1] if rows else None
    stat = ckpt.stat()
    key = f"{which}|{ckpt.name}|{stat.st_mtime_ns}|{stat.st_size}|{tail}"
    return key, cache.get(key)


def _read_cache(path: Path) -> dict[str, Any]:
    cache_file = path / EVAL_CACHE
    return json.loads(cache_file.read_text()) if cache_file.is_file() else {}


def evaluation_cached(setting: Setting, name: str) -> bool:
    """Whether both rows of :func:`evaluate_run` are in the run's cache (nothing to compute)."""
    path = run_dir(setting, name)
    if not (path / RunStore.CONFIG).is_file():
        return False
    cache = _read_cache(path)
    spec = eval_attacks(RunStore.open(path).read_json(RunStore.CONFIG))["pgd"].spec().describe()
    return all(_cached(path, which, cache, setting, spec)[1] is not None for which in ("final", "best"))


def evaluate_run(setting: Setting, name: str) -> dict[str, dict[str, Any]]:
    """Clean / PGD-k / CW-loss PGD-k accuracy of the run's final and best checkpoints on ``eval_n``
    test examples (seeded, class-balanced; all when 0), cached in ``<run>/analyses_eval.json``."""
    path = run_dir(setting, name)
    cache_file = path / EVAL_CACHE
    cache = _read_cache(path)
    cfg = RunStore.open(path).read_json(RunStore.CONFIG)
    out: dict[str, dict[str, Any]] = {}
    data: ImageData | None = None
    for which in ("final", "best"):
        ckpt = checkpoint_file(path, which)
        attacks = eval_attacks(cfg)
        spec = attacks["pgd"].spec().describe()
        key, row = _cached(path, which, cache, setting, spec)
        if row is not None:
            out[which] = row
            continue
        if not key:
            raise RobustdropError(f"run {path} has no {ckpt.relative_to(path)} and no cached {which} evaluation for "
                                  f"eval_n={setting.eval_n}, seed {setting.seed}; let it finish first, or evaluate "
                                  "it where it was trained")
        source = find_reference(ckpt)
        if which == "best" and "final" in out and out["final"]["epoch"] == source.epoch:
            # the best epoch is the last one: the same weights, evaluated once
            row = {**out["final"], "checkpoint": ckpt.name, "same_as": "final"}
            cache[key] = out[which] = row
            atomic_write_text(cache_file, json.dumps(cache, indent=2, sort_keys=True) + "\n")
            continue
        if data is None:
            data = load_data(setting, cfg)
        device = resolve_device(setting.device)
        model = build_reference(source, num_classes=data.num_classes, image_shape=data.image_shape, device=device)
        n_all = len(data.test_y)
        n = n_all if setting.eval_n <= 0 else min(setting.eval_n, n_all)
        idx = probe_indices(data.test_y, n, setting.seed + 1) if n < n_all else torch.arange(n_all)
        start = time.perf_counter()
        results = evaluate(model, data.test_x[idx], data.test_y[idx], list(attacks.values()), split="test",
                           batch_size=int(cfg.get("eval_batch_size", 500)), device=device,
                           generator=torch.Generator(device=device).manual_seed(setting.seed),
                           autocast=autocast_for(device, bool(cfg.get("amp", True))))
        secs = time.perf_counter() - start
        row = {"epoch": source.epoch, "n": n, "checkpoint": ckpt.name, "seconds": secs,
               "pgd_attack": spec, "cw_attack": spec.replace("pgd", "CW-loss pgd", 1)}
        row.update({k: r.acc for k, r in zip(attacks, results)})
        print(f"{name} {which} (epoch {source.epoch}, n={n}): clean {row['clean']:.4f} "
              f"PGD {row['pgd']:.4f} CW {row['cw']:.4f} ({secs:.0f}s)", flush=True)
        cache[key] = row
        out[which] = row
        atomic_write_text(cache_file, json.dumps(cache, indent=2, sort_keys=True) + "\n")
    if setting.autoattack:
        out["autoattack"] = autoattack_final(setting, name, cfg, cache, data)
    return out


def autoattack_text(epsilon: float, num_classes: int) -> str:
    """What the AutoAttack column measured: the standard L∞ cascade with its values
    (:mod:`robustdrop.attacks.autoattack`)."""
    it, targets = STANDARD_ITERATIONS, min(STANDARD_TARGETS, num_classes - 1)
    return (f"standard L∞ AutoAttack (ε={format_eps(epsilon)}): APGD-CE ({it} iterations), APGD-T ({it} iterations, "
            f"{targets} target classes), FAB-T ({it} iterations, {targets} target classes), Square "
            f"({STANDARD_SQUARE_QUERIES} queries, p_init {STANDARD_SQUARE_P_INIT:g}), each on the images the previous "
            "ones left correct")


def autoattack_final(setting: Setting, name: str, cfg: dict[str, Any], cache: dict[str, Any],
                     data: ImageData | None) -> dict[str, Any]:
    """Clean, PGD-k and standard AutoAttack accuracy of the run's final checkpoint on the seeded
    class-balanced subset of ``aa_n`` test images (all when 0; the first ``aa_n`` of the table's
    ``eval_n`` images, same seed), through :func:`robustdrop.evaluation.evaluate_checkpoint`;
    cached in ``cache`` (the run's ``analyses_eval.json``). Not cached and without torchattacks:
    ``{"missing": why}``."""
    path = run_dir(setting, name)
    ckpt = checkpoint_file(path, "final")
    seed = setting.seed + 1  # the subset seed of the PGD rows, so the images are among theirs
    tail = f"n={setting.aa_n}|seed={seed}|standard"
    if not ckpt.is_file():  # a metrics-only copy of the run: its cached row, if any
        rows = [v for k, v in cache.items() if k.startswith("autoattack|") and k.endswith(f"|{tail}")]
        return rows[-1] if rows else {"missing": f"{path} has no checkpoint and no cached AutoAttack row for {tail}"}
    stat = ckpt.stat()
    key = f"autoattack|{ckpt.name}|{stat.st_mtime_ns}|{stat.st_size}|{tail}"
    if key in cache:
        return cache[key]
    try:
        ta = import_torchattacks()
    except RobustdropError as exc:
        return {"missing": str(exc)}
    if data is None:
        data = load_data(setting, cfg)
    n = len(data.test_y) if setting.aa_n <= 0 else min(setting.aa_n, len(data.test_y))
    print(f"{name} final: standard AutoAttack on n={n} test images ...", flush=True)
    report = evaluate_checkpoint(ckpt, attacks=["pgd", "autoattack"], n=n, seed=seed, device=setting.device,
                                 batch_size=int(cfg.get("eval_batch_size", 500)), data=data, progress=False)
    res = {r.spec.attack: r for r in report.results}
    aa = res["autoattack"]
    row = {"epoch": report.epoch, "n": aa.n, "checkpoint": ckpt.name, "seed": seed, "clean": res["none"].acc,
           "pgd": res["pgd"].acc, "autoattack": aa.acc, "seconds": aa.seconds, "pgd_seconds": res["pgd"].seconds,
           "attack": autoattack_text(aa.spec.epsilon, data.num_classes), "pgd_attack": res["pgd"].spec.describe(),
           "torchattacks": getattr(ta, "__version__", "unknown")}
    print(f"{name} final (epoch {row['epoch']}, n={aa.n}): clean {row['clean']:.4f} PGD {row['pgd']:.4f} "
          f"AutoAttack {row['autoattack']:.4f} ({aa.seconds:.0f}s; PGD {row['pgd_seconds']:.0f}s)", flush=True)
    cache[key] = row
    atomic_write_text(path / EVAL_CACHE, json.dumps(cache, indent=2, sort_keys=True) + "\n")
    return row
