"""ONE catalog of runs: every run the analyses use, as named sweep cells over the scale's preset.

:func:`cells` is the table: cell name -> its config values over the preset and
:func:`base_values` (a ``"@<cell>"`` value is that cell's run directory, and makes it a
dependency), plus one ``kind="replay"`` cell per Figure 2 run measured on a catalog referee after
training (:func:`reference_deferred`). Every script runs the cells it needs with
:func:`run_cells`: one :func:`robustdrop.sweeps.run_sweep` whose sweep directory IS the runs dir,
so the layout stays ``runs/analyses/<scale>/<name>`` (plus ``sweep.json`` and
``logs/<cell>.log``), every figure and table reads the same run directories, and a run made before
is reused, resumed or retrained by the package's one rule (:mod:`robustdrop.reuse`).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lib.setting import QUICK_EVAL_BATCH, SMOKE_CONFIG, SMOKE_DATA, Setting
from robustdrop.data import ImageData, load_dataset, make_synthetic, write_image_folder
from robustdrop.engine import PRESETS, TrackConfig, make_config
from robustdrop.errors import RobustdropError
from robustdrop.evaluation import CachedEvaluation
from robustdrop.store import BEST, SweepRecord
from robustdrop.store.sweep_record import is_sweep_dir
from robustdrop.sweeps import SweepResult, plan_sweep, run_sweep

SMOKE_FOLDER = "smoke-data"  # --smoke: the tiny synthetic data as an image folder the cells load by name


def base_values(setting: Setting) -> dict[str, Any]:
    """Overrides every run of the setting gets on top of its preset."""
    # No referee unless the run is one of Figure 2's (config_for), whatever the preset ships.
    values: dict[str, Any] = {"threads": setting.threads, "device": setting.device, "seed": setting.seed,
                              "reference": None}
    if setting.scale == "quick":
        # Evaluation only: on a CPU, cnn1's attacks run 2-3x faster per example in batches of 128 than
        # in the default 500 (measured); training is unchanged.
        values["eval_batch_size"] = QUICK_EVAL_BATCH
    if setting.smoke:
        values.update(SMOKE_CONFIG[setting.scale], dataset=f"folder:{setting.runs_dir.resolve() / SMOKE_FOLDER}")
    elif setting.scale == "paper":
        values.update(dataset=setting.dataset or "cifar10", data_dir=setting.data_dir)
    elif setting.dataset:
        values.update(dataset=setting.dataset, data_dir=setting.data_dir)
    return values


def make_run_config(setting: Setting, **overrides: Any) -> TrackConfig:
    """``make_config(<scale>, **base_values, **overrides)`` — the preset is always read, never copied."""
    return make_config(setting.scale, **{**base_values(setting), **overrides})


def preset_config(setting: Setting) -> TrackConfig:
    return make_run_config(setting)


@dataclass(frozen=True)
class RunSpec:
    """One run of the catalog: overrides over the setting's preset config."""

    name: str
    overrides: dict[str, Any]
    uses_reference: bool = False  # strength-ref against Figure 2's referee (reference_for)
    what: str = ""  # one line for captions and READMEs


def ref_name(setting: Setting) -> str:
    return f"pgd{setting.knobs['ref_steps']}"


def reference_for(setting: Setting) -> str:
    """Figure 2's referee: at quick scale the one the quick preset ships (``builtin:quick``, what
    ``robustdrop track --preset quick`` uses; docs/referee.md); otherwise the catalog's PGD run
    (paper scale: PGD-10, as the paper; --smoke: the tiny PGD run, so the path is exercised)."""
    if setting.scale == "quick" and not setting.smoke:
        return "builtin:quick"
    return str(setting.runs_dir / ref_name(setting))


def reference_deferred(setting: Setting) -> bool:
    """The one referee rule of Figure 2's runs. A shipped referee (quick scale: ``builtin:quick``)
    is attached during training. A referee that is a catalog run (paper scale: PGD-10; --smoke) is
    not waited for: Figure 2's runs train without it, keep every epoch's weights, and are measured
    on it once both are finished (a ``kind="replay"`` cell each, :func:`cells`; the rows an attached referee logs).
    ``Setting.deferred_reference`` True/False forces one way (tests that compare the two)."""
    shipped = reference_for(setting).startswith("builtin:")
    if setting.deferred_reference is None:
        return not shipped
    return bool(setting.deferred_reference) and not shipped


def reference_run(setting: Setting) -> str | None:
    """The catalog run Figure 2's measurement needs (trained alongside them, :func:`reference_deferred`),
    or None when their referee is shipped."""
    return None if reference_for(setting).startswith("builtin:") else ref_name(setting)


def catalog(setting: Setting) -> dict[str, RunSpec]:
    """Every run the analyses use, by name."""
    k = setting.knobs
    preset = preset_config(setting)
    eps = preset.epsilon
    steps = int(k["ref_steps"])
    ref = dict(method="pgd", pgd_steps=steps, alpha=2.5 * eps / steps)
    if int(k["ref_eval_every"]) != 1:
        ref["eval_every"] = int(k["ref_eval_every"])
    if setting.ref_epochs:
        ref["epochs"] = int(setting.ref_epochs)
    specs = [
        RunSpec(ref_name(setting), ref, what=f"PGD-{steps} (step 2.5ε/{steps}; also the reference model)"),
        # Figure 2's runs measure their strength on the referee (reference_for; during training or
        # after it, reference_deferred). The table-only runs do not: a diagnostic never changes the
        # training, and without it they need not wait for a reference.
        RunSpec("fgsm", dict(method="fgsm"), True, "FGSM adversarial training"),
        RunSpec("rs-fgsm", dict(method="rs-fgsm"), False, "RS-FGSM (Wong et al. 2020; step 1.25ε)"),
        RunSpec("fgsm+", dict(method="fgsm+"), True, "FGSM+ (our reading, a hypothesis: APART without layer-wise perturbations)"),
        RunSpec("apart", dict(method="apart"), True, "APART"),
        RunSpec("apart-no-init", dict(method="apart", learned_init=False), False, "APART without learned init"),
        RunSpec("apart-no-step", dict(method="apart", learned_step=False), False, "APART without learned step"),
        # The field's single-step baselines (docs/baselines.md), with robustdrop's defaults.
        RunSpec("n-fgsm", dict(method="n-fgsm"), False,
                f"N-FGSM (de Jorge et al. 2022; noise {preset.nfgsm_noise:g}ε, step ε, no projection)"),
        RunSpec("gradalign", dict(method="gradalign"), False,
                f"GradAlign (Andriushchenko & Flammarion 2020; FGSM + alignment term, λ={preset.gradalign_lambda:g})"),
    ]
    ls = int(k["long_steps"])
    long_common = dict(schedule="cyclic-repeat", cycle_epochs=int(k["long_cycle"]), epochs=int(k["long_epochs"]),
                       train_subset=int(k["long_subset"]), eval_every=int(k["long_eval_every"]))
    if k["long_test_every"] is not None:  # paper: the full test set every 2 epochs, as the paper's curve
        long_common["test_every"] = int(k["long_test_every"])
    specs += [
        RunSpec(f"long-pgd{ls}", dict(method="pgd", pgd_steps=ls, alpha=2.5 * eps / ls, **long_common),
                what=f"PGD-{ls}, repeating cyclic schedule"),
        RunSpec("long-apart", dict(method="apart", **long_common), what="APART, repeating cyclic schedule"),
    ]
    # The GPU plan's bf16-vs-fp32 training pair (FGSM, a few epochs; amp is the only difference)
    # and APART with every value of the authors' released code (preset apart-authors).
    prec = dict(method="fgsm", epochs=int(k["prec_epochs"]), train_subset=int(k["prec_subset"]),
                diagnostics=["none"])
    specs += [
        RunSpec("prec-bf16", dict(prec, amp=True), what="FGSM, bf16 autocast (the precision comparison)"),
        RunSpec("prec-fp32", dict(prec, amp=False), what="FGSM, fp32 (the precision comparison)"),
        RunSpec("apart-authors", authors_overrides(setting), what="APART, the authors' released recipe"),
    ]
    # Timing runs (table_cost): same subset and epochs, no diagnostics, a cheap final evaluation.
    cost_common = dict(train_subset=int(k["cost_subset"]), epochs=int(k["cost_epochs"]), diagnostics=["none"],
                       eval_every=int(k["cost_epochs"]), probe_size=min(100, preset.probe_size),
                       eval_pgd_steps=1)
    for name, (method, extra) in zip(cost_run_names(), COST_METHODS):
        specs.append(RunSpec(name, dict(method=method, **_cost_extra(extra, eps), **cost_common),
                             what=f"timing run ({name[5:]})"))
    return {s.name: s for s in specs}


def authors_overrides(setting: Setting) -> dict[str, Any]:
    """The ``apart-authors`` preset's values as overrides over the scale's preset (the setting's
    dataset kept; the full test set only at the end instead of every 2 epochs, which changes no
    training; with --smoke, the smoke sizes and epochs kept)."""
    keep = {"dataset", "data_dir", "test_every"} | (set(SMOKE_CONFIG[setting.scale]) if setting.smoke else set())
    values = {k: v for k, v in PRESETS["apart-authors"].items() if k not in keep}
    if not setting.smoke:
        values["test_every"] = 0
    return values


# (method, extra overrides) of the timing runs; PGD-10 is the cost unit.
COST_METHODS: list[tuple[str, dict[str, Any]]] = [
    ("fgsm", {}), ("rs-fgsm", {}), ("pgd", {"pgd_steps": 10}), ("fgsm+", {}), ("apart", {}), ("n-fgsm", {}),
    ("gradalign", {}),
]


def _cost_extra(extra: dict[str, Any], eps: float) -> dict[str, Any]:
    out = dict(extra)
    if "pgd_steps" in out:
        out["alpha"] = 2.5 * eps / out["pgd_steps"]
    return out


def cost_run_names() -> list[str]:
    return [f"cost-{m}" + (f"{x['pgd_steps']}" if "pgd_steps" in x else "") for m, x in COST_METHODS]


def long_run_names(setting: Setting) -> list[str]:
    return [f"long-pgd{setting.knobs['long_steps']}", "long-apart"]


def replay_name(name: str) -> str:
    """The replay cell that measures Figure 2's run ``name`` on the catalog referee after training."""
    return f"{name}-referee"


def cell_values(setting: Setting, spec: RunSpec) -> dict[str, Any]:
    """A training cell: the run's overrides, Figure 2's referee (attached, or every epoch's weights
    kept for the replay cell), and the best validation PGD epoch's model kept for the tables (probe
    PGD when the run has no validation split)."""
    values = dict(spec.overrides)
    if spec.uses_reference and not reference_deferred(setting):
        ref = reference_run(setting)
        values.setdefault("reference", f"@{ref}" if ref else reference_for(setting))
    elif spec.uses_reference:
        values.setdefault("save_weights_every", 1)
    val_size = make_run_config(setting, **{k: v for k, v in values.items() if k != "reference"}).val_size
    values["keep_best"] = f"{'val' if val_size else 'probe'}/acc/pgd"
    return values


def cells(setting: Setting) -> dict[str, dict[str, Any]]:
    """Every cell of the catalog, by name, in the catalog's order (the sweep's cells)."""
    out: dict[str, dict[str, Any]] = {}
    for spec in catalog(setting).values():
        out[spec.name] = cell_values(setting, spec)
        if spec.uses_reference and reference_deferred(setting):
            out[replay_name(spec.name)] = {"kind": "replay", "run": f"@{spec.name}",
                                           "reference": f"@{ref_name(setting)}"}
    return out


def measured(setting: Setting, names: Sequence[str]) -> list[str]:
    """``names`` and, where the referee is measured after training, their replay cells."""
    table = cells(setting)
    return [*names, *(replay_name(n) for n in names if replay_name(n) in table)]


def config_for(setting: Setting, spec: RunSpec) -> TrackConfig:
    """The resolved config of training cell ``spec`` (``"@cell"`` values as run directories)."""
    values = {k: str(run_dir(setting, v[1:])) if isinstance(v, str) and v.startswith("@") else v
              for k, v in cell_values(setting, spec).items()}
    return make_run_config(setting, **values)


def table_evaluation(setting: Setting) -> CachedEvaluation:
    """The tables' evaluation (:func:`robustdrop.evaluation.evaluate_run_cached`): ``eval_n``
    images, the setting's seed, the ``best`` row from the keep-best checkpoint, AutoAttack on
    ``aa_n`` unless turned off."""
    return CachedEvaluation(n=setting.eval_n, seed=setting.seed, best=BEST,
                            autoattack_n=setting.aa_n if setting.autoattack else None, device=setting.device)


def sweep_fixed(setting: Setting) -> dict[str, Any]:
    """What every cell shares (:func:`base_values`), without the runtime values the sweep passes
    itself (threads: ``cpus_per_cell``; device when ``auto``) so changing them does not change the
    sweep's record."""
    fixed = {k: v for k, v in base_values(setting).items() if k != "threads"}
    if fixed.get("device") == "auto":
        del fixed["device"]
    return fixed


def _with_dependencies(table: dict[str, dict[str, Any]], names: Sequence[str]) -> list[str]:
    """``names`` in order, each preceded by the cells it needs (``"@cell"`` values, ``after``)."""
    order: list[str] = []

    def add(name: str) -> None:
        if name in order:
            return
        values = table[name]
        for dep in [*values.get("after", []), *(v[1:] for v in values.values() if isinstance(v, str)
                                                 and v.startswith("@"))]:
            add(dep)
        order.append(name)

    for n in names:
        add(n)
    return order


def run_cells(setting: Setting, names: Sequence[str], *, jobs: int | None = None) -> SweepResult:
    """Run (or reuse) the catalog cells ``names`` and the cells they need as one sweep over the
    runs dir (:func:`sweep_cells`; ``--jobs`` local processes or ``--backend ray``, ``--max-minutes``)."""
    with cell_environment(setting):
        return sweep_cells(setting.runs_dir, cells(setting), names, preset=setting.scale,
                           fixed=sweep_fixed(setting), jobs=jobs or setting.jobs, threads=setting.threads,
                           backend=setting.backend, max_minutes=setting.max_minutes)


def sweep_cells(runs_dir: Path, table: dict[str, dict[str, Any]], names: Sequence[str], *, preset: str | None,
                fixed: dict[str, Any], jobs: int = 1, threads: int = 0, backend: str = "local",
                max_minutes: float | None = None) -> SweepResult:
    """Cells ``names`` of ``table`` and the cells they need, in that order, as one sweep whose
    directory is ``runs_dir`` (:func:`robustdrop.sweeps.run_sweep`: an existing folder of runs is
    adopted, its runs reused by the one rule). Cells the sweep already records are planned too (a
    sweep only grows); those not finished run as well. ``threads``: each cell's (0: the default)."""
    path = Path(runs_dir).resolve()
    recorded = SweepRecord.open(path).cells if is_sweep_dir(path) else {}
    order = _with_dependencies(table, [*names, *(n for n in table if n in recorded)])
    plan = plan_sweep({}, preset=preset, fixed=fixed, name=path.name, cells={n: table[n] for n in order})
    return run_sweep(plan, runs_dir=path.parent, backend=backend, jobs=jobs, cpus_per_cell=threads or None,
                     extend=True, progress=False, command=[sys.executable, *sys.argv], max_minutes=max_minutes,
                     adopt=True)


def ensure_cells(setting: Setting, names: Sequence[str], *, jobs: int | None = None) -> None:
    """:func:`run_cells`, then a one-line error unless every cell of ``names`` finished."""
    record = run_cells(setting, names, jobs=jobs).record
    missing = [n for n in names if record.status(n) != "finished"]
    if missing:
        raise RobustdropError(f"runs not finished: {', '.join(missing)} (sweep.json and logs/ in {record.path}); "
                              "rerun the same command to continue them")


def write_smoke_data(setting: Setting) -> Path:
    """--smoke: the synthetic data as an image folder, which the cells (own processes) load by name."""
    folder = setting.runs_dir.resolve() / SMOKE_FOLDER
    if not folder.is_dir():  # written whole, then renamed: processes that start together never read half
        folder.parent.mkdir(parents=True, exist_ok=True)
        partial = Path(tempfile.mkdtemp(prefix=f".{SMOKE_FOLDER}-", dir=folder.parent))
        write_image_folder(make_synthetic(**SMOKE_DATA), partial)
        try:
            partial.rename(folder)
        except OSError:  # another process was first: the same data
            shutil.rmtree(partial)
    return folder


@contextlib.contextmanager
def cell_environment(setting: Setting) -> Iterator[None]:
    """Within the block, --smoke's cells (processes that inherit this one's environment) read the
    smoke data's cache in the runs dir; the environment is restored after."""
    old = os.environ.get("ROBUSTDROP_CACHE")
    if setting.smoke:
        write_smoke_data(setting)
        os.environ["ROBUSTDROP_CACHE"] = str(smoke_cache(setting))
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("ROBUSTDROP_CACHE", None)
        else:
            os.environ["ROBUSTDROP_CACHE"] = old


def smoke_cache(setting: Setting) -> Path:
    """--smoke: the dataset cache of its image folder, in the runs dir (never the user's)."""
    return setting.runs_dir.resolve() / "cache"


def smoke_data(setting: Setting) -> ImageData:
    """--smoke: the data every run of the setting trains on, loaded as the cells load it."""
    return load_dataset(f"folder:{write_smoke_data(setting)}", cache_dir=str(smoke_cache(setting)))


def run_dir(setting: Setting, name: str) -> Path:
    return setting.runs_dir / name


def data_for(setting: Setting) -> ImageData | None:
    """The in-memory data of --smoke (``None``: the run loads its config's dataset)."""
    return smoke_data(setting) if setting.smoke else None


def load_data(setting: Setting, cfg: dict[str, Any]) -> ImageData:
    return smoke_data(setting) if setting.smoke else load_dataset(cfg["dataset"], data_dir=cfg.get("data_dir"))
