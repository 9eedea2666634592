"""The step-size frontier (issue 21, analyses/frontier.py): does APART beat the best fixed FGSM step?

Reads finished run directories (any sweep layout; every run's ``config.json`` says its method, ε,
α and seed) and never writes into them. Definitions (the figures/README.md section repeats them):

* **Group**: (ε, method, α) — α only for FGSM (``FGSM α=5/255``); the other methods' steps are
  their own (APART learns it; N-FGSM, GradAlign, FGSM+, RS-FGSM, PGD-k use their defaults).
* **Collapsed** run: it has a PGD drop — at some epoch its probe PGD-20 accuracy (1000 test
  images) is below half its running best, with that best ≥ 0.05 (``lib.prediction``'s outcome
  ``collapsing``, the collapse detector's ``pgd_drop`` signal with the floor of the
  collapse-prediction study). The detector's own onset events (``collapse_onset``, which also need
  a second signal) are counted apart.
* **Final** test accuracy: the run's own evaluation at its last epoch on the full test set
  (``split=test``, 10 000 images at the quick preset: clean and PGD-20, step 2.5ε/20, 1 restart).
* **Best-by-validation**: the epoch with the highest validation PGD-20 accuracy (``val/acc/pgd``,
  1000 held-out training images; first such epoch on ties); that epoch's checkpoint
  (``weights_epoch_XXXX.pt`` or ``epoch_XXXX.pt``) evaluated on the full test set by
  :func:`robustdrop.evaluation.evaluate_checkpoint` (the run's evaluation attack, seeded by the run's
  seed); the last epoch reuses the final row. Cached in a JSON file outside the runs.
* **Cost**: median ``time_train_s`` per epoch (the training steps only; the runs shared two CPU
  cores with other processes, so only ratios between runs of the same sweep mean much).
* **Best fixed α** per ε: the FGSM α with the highest mean final test PGD-20 among the α whose runs
  collapsed in none of their seeds (and have at least :data:`MIN_SEEDS` seeds).
* **Paired comparison**: method − best fixed α over the seeds both have: mean difference, its
  standard error, paired t-test and Wilcoxon signed-rank test (two-sided; with 5 pairs the smallest
  Wilcoxon p is 0.0625).
* **Recorded** rows: a run's row taken from an earlier analysis's ``frontier_runs.csv``
  (:func:`read_recorded`) when its run directory is not read now (another machine); it keeps its
  recorded numbers, AutoAttack included (``source`` says which file it came from).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from scipy import stats

from lib.prediction import summarize  # the collapse-prediction study's PGD drop: one definition
from robustdrop.data import ImageData, load_dataset
from robustdrop.errors import RobustdropError, first_line
from robustdrop.evaluation import evaluate_checkpoint
from robustdrop.formatting import format_eps
from robustdrop.plots.runs import eval_curve, open_run, train_seconds_per_epoch
from robustdrop.plots.sweeps import std_error
from robustdrop.store import RunStore, atomic_write_text, epoch_weights

MIN_SEEDS = 2   # an α needs at least this many finished seeds to be the "best fixed α"
LABELS = {"apart": "APART", "n-fgsm": "N-FGSM", "gradalign": "GradAlign", "fgsm+": "FGSM+", "rs-fgsm": "RS-FGSM"}
# the methods the figure draws as horizontal bands and the answer compares with the best α, in order
BASELINES = ("apart", "n-fgsm", "gradalign", "fgsm+", "rs-fgsm", "pgd")
COMPARED = ("apart", "n-fgsm", "gradalign")
MEASURED = "measured"  # a row read from its run directory by this analysis (FrontierRun.source)


def group_label(cfg: dict[str, Any]) -> str:
    """``FGSM α=5/255``, ``APART``, ``N-FGSM``, ``PGD-3``, ..."""
    method = cfg["method"]
    if method == "fgsm":
        return f"FGSM α={format_eps(float(cfg['alpha']))}"
    if method == "pgd":
        return f"PGD-{cfg['pgd_steps']}"
    return LABELS.get(method, method)


def is_finished(path: Path) -> bool:
    """Whether the run's ``checkpoints/last.pt`` says its training finished."""
    last = path / "checkpoints" / "last.pt"
    if not last.is_file():
        return False
    try:
        return bool(torch.load(last, map_location="cpu", weights_only=True, mmap=True).get("finished"))
    except (RuntimeError, OSError, EOFError):  # being written by the training that owns it
        return False


@dataclass
class FrontierRun:
    """One finished run's numbers (accuracies as fractions)."""

    path: str
    method: str
    label: str
    epsilon: float
    alpha: float          # FGSM's step; NaN for the other methods
    seed: int
    epochs: int
    collapsed: bool       # a PGD drop (module docstring)
    drop: float           # its epoch (NaN: none)
    onset: float          # the detector's collapse_onset epoch during training (NaN: none)
    best_probe_pgd: float
    final_probe_pgd: float
    final_test_pgd: float
    final_test_clean: float
    test_n: int
    best_val_epoch: int
    best_val_pgd: float
    best_test_pgd: float = math.nan
    best_test_clean: float = math.nan
    best_test_n: int = 0
    train_s_per_epoch: float = math.nan
    aa: float = math.nan  # standard AutoAttack on the final model (NaN: not measured)
    aa_clean: float = math.nan
    aa_n: int = 0
    source: str = MEASURED  # or "recorded: <csv>" (read_recorded): where the row's numbers come from


def read_run(path: Path) -> FrontierRun:
    """The run's numbers from its own files (no evaluation; ``best_test_*`` come from :func:`evaluate_best`)."""
    run = open_run(path)
    cfg, df = run.config, run.metrics
    summary = summarize(path)
    val = eval_curve(df, split="val")
    test = df[(df["source"] == "eval") & (df["split"] == "test")]
    last_test = test[test["epoch"] == test["epoch"].max()] if len(test) else test
    method = cfg["method"]
    onset = run.onset_epoch()
    return FrontierRun(
        path=str(path), method=method, label=group_label(cfg), epsilon=float(cfg["epsilon"]),
        alpha=float(cfg["alpha"]) if method == "fgsm" else math.nan, seed=int(cfg["seed"]),
        epochs=summary.epochs, collapsed=summary.outcome == "collapsing",
        drop=float(summary.drop) if summary.drop is not None else math.nan,
        onset=float(onset) if onset is not None else math.nan,
        best_probe_pgd=summary.best_pgd, final_probe_pgd=summary.final_pgd,
        final_test_pgd=_acc(last_test, "pgd"), final_test_clean=_acc(last_test, "none"),
        test_n=int(last_test["n"].max()) if len(last_test) else 0,
        best_val_epoch=int(val.idxmax()) if len(val) else 0, best_val_pgd=float(val.max()) if len(val) else math.nan,
        train_s_per_epoch=train_seconds_per_epoch(df))


def _acc(rows: pd.DataFrame, attack: str) -> float:
    r = rows[(rows["metric"] == "acc") & (rows["attack"] == attack)]
    return float(r["value"].iloc[-1]) if len(r) else math.nan


# --------------------------------------------------------------------------------------------
# Rows recorded by an earlier analysis (its frontier_runs.csv)
# --------------------------------------------------------------------------------------------
_KINDS = {"bool": "True or False", "int": "an integer", "float": "a number (empty: none)"}


def _parse(text: str, kind: str) -> Any:
    """One ``frontier_runs.csv`` cell as the FrontierRun field type ``kind`` (what ``to_csv``
    wrote: ``''`` is NaN, floats in Python's round-trip form); ``ValueError`` if it is not one."""
    if kind == "str":
        return text
    if kind == "bool":
        if text not in ("True", "False"):
            raise ValueError
        return text == "True"
    x = float(text) if text != "" else math.nan
    if kind == "int":
        if not x.is_integer():
            raise ValueError
        return int(x)
    return x


def read_recorded(csv: Path) -> list[FrontierRun]:
    """The rows of an earlier analysis's ``frontier_runs.csv``, each with ``source = "recorded:
    <csv>"``, exactly as written (floats parsed by Python: they round-trip). A row that file itself
    recorded from an older one names this file now (the file read is the provenance one can open; its
    own ``source`` column names the one before). Raises a one-line :class:`RobustdropError` when the
    file is missing or is not such a table."""
    hint = "give a frontier_runs.csv written by analyses/frontier.py"
    if not csv.is_file():
        raise RobustdropError(f"--previous {csv}: no such file; {hint}")
    try:  # every cell as its text: no guessed types, no NaN spellings but the empty cell
        table = pd.read_csv(csv, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise RobustdropError(f"--previous {csv}: not a CSV table ({first_line(exc)}); {hint}") from None
    wanted = [f for f in fields(FrontierRun) if f.name != "source"]  # a table of its own measurements may lack it
    missing = [f.name for f in wanted if f.name not in table.columns]
    if missing or table.empty:
        raise RobustdropError(f"--previous {csv}: " + (f"no column {', '.join(missing)}" if missing else "no rows")
                              + f"; {hint}")
    twice = table["path"][table["path"].duplicated()]
    if len(twice):
        raise RobustdropError(f"--previous {csv}: run {twice.iloc[0]} has two rows; keep one of them")
    runs = []
    for i, row in table.iterrows():
        values = {}
        for f in wanted:
            try:
                values[f.name] = _parse(row[f.name], f.type)
            except ValueError:
                raise RobustdropError(f"--previous {csv} line {i + 2}: {f.name} = {row[f.name]!r} is not "
                                      f"{_KINDS[f.type]}; {hint}") from None
        if not values["path"]:
            raise RobustdropError(f"--previous {csv} line {i + 2}: the path is empty; {hint}")
        runs.append(FrontierRun(**values, source=f"recorded: {csv}"))
    return runs


def with_recorded(runs: Sequence[FrontierRun], recorded: Sequence[FrontierRun]) -> list[FrontierRun]:
    """``runs`` and the ``recorded`` rows of the runs not among them (the same path once both are
    made absolute: a run read now always wins), sorted by path (a stable table: the means over seeds
    add in the same order whichever way a row arrived)."""
    here = {Path(r.path).resolve() for r in runs}
    return sorted([*runs, *(r for r in recorded if Path(r.path).resolve() not in here)], key=lambda r: r.path)


def check_one_per_seed(runs: Iterable[FrontierRun]) -> None:
    """Raise a one-line :class:`RobustdropError` when two rows are the same cell (ε, group, seed):
    the groups would count that seed twice and the paired comparison could not pair it."""
    seen: dict[tuple[float, str, int], FrontierRun] = {}
    for r in runs:
        first = seen.setdefault((r.epsilon, r.label, r.seed), r)
        if first is not r:
            raise RobustdropError(f"two runs of ε = {format_eps(r.epsilon)} {r.label} seed {r.seed}: {first.path} "
                                  f"({first.source}) and {r.path} ({r.source}); leave one of them out (--runs, --previous)")


# --------------------------------------------------------------------------------------------
# Evaluations of checkpoints, cached outside the runs
# --------------------------------------------------------------------------------------------
class EvalCache:
    """``{key: row}`` in a JSON file; the key names the checkpoint (path, size, mtime), the attack
    and the number of images, so a retrained run is evaluated again."""

    def __init__(self, path: Path):
        self.path = path
        self.rows: dict[str, Any] = json.loads(path.read_text()) if path.is_file() else {}

    @staticmethod
    def key(ckpt: Path, what: str, n: int) -> str:
        stat = ckpt.stat()
        return f"{ckpt.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{what}|n={n}"

    def save(self) -> None:
        """Write the rows, merged with what another process wrote to the file since it was read."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.is_file():
            self.rows = {**json.loads(self.path.read_text()), **self.rows}
        atomic_write_text(self.path, json.dumps(self.rows, indent=1, sort_keys=True) + "\n")


class DataCache:
    """Each dataset loaded once (``given``: the --smoke data)."""

    def __init__(self, given: ImageData | None = None):
        self.given, self.loaded = given, {}

    def __call__(self, cfg: dict[str, Any]) -> ImageData:
        if self.given is not None:
            return self.given
        name = cfg["dataset"]
        if name not in self.loaded:
            self.loaded[name] = load_dataset(name, data_dir=cfg.get("data_dir"))
        return self.loaded[name]


def evaluate_best(run: FrontierRun, cache: EvalCache, data: DataCache, *, n: int = 0, device: str = "cpu") -> None:
    """Fill ``run.best_test_*``: the best-by-validation epoch's checkpoint on ``n`` test images (0 =
    all), clean and the run's PGD; the last epoch reuses the final row."""
    path = Path(run.path)
    if run.best_val_epoch == run.epochs and (n == 0 or n == run.test_n):
        run.best_test_pgd, run.best_test_clean, run.best_test_n = run.final_test_pgd, run.final_test_clean, run.test_n
        return
    ckpt = epoch_weights(path).get(run.best_val_epoch)
    if ckpt is None:
        return  # a run without per-epoch weights: the best row stays empty (the table says so)
    key = EvalCache.key(ckpt, "clean+pgd", n)
    if key not in cache.rows:
        cfg = RunStore.open(path).read_json(RunStore.CONFIG)
        start = time.perf_counter()
        report = evaluate_checkpoint(ckpt, attacks=["pgd"], n=n, device=device, data=data(cfg), progress=False)
        res = {r.spec.attack: r for r in report.results}
        cache.rows[key] = {"epoch": report.epoch, "n": res["pgd"].n, "clean": res["none"].acc, "pgd": res["pgd"].acc,
                           "attack": res["pgd"].spec.describe(), "seconds": time.perf_counter() - start}
        cache.save()
        print(f"{path.name}: best-by-validation epoch {report.epoch}: test clean {res['none'].acc:.4f} "
              f"PGD {res['pgd'].acc:.4f} (n={res['pgd'].n}, {cache.rows[key]['seconds']:.0f}s)", flush=True)
    row = cache.rows[key]
    run.best_test_pgd, run.best_test_clean, run.best_test_n = row["pgd"], row["clean"], int(row["n"])


def evaluate_autoattack(run: FrontierRun, cache: EvalCache, data: DataCache, *, n: int, device: str = "cpu",
                        measure: bool = True) -> None:
    """Fill ``run.aa*``: standard AutoAttack on the final model (``last.pt``), on the seeded
    class-balanced subset of ``n`` test images of the run's seed (the same images for every method
    of one seed: the comparison is paired). ``measure=False``: only what the cache holds."""
    path = Path(run.path)
    ckpt = path / "checkpoints" / "last.pt"
    key = EvalCache.key(ckpt, "autoattack", n)
    if key not in cache.rows and not measure:
        return
    if key not in cache.rows:
        cfg = RunStore.open(path).read_json(RunStore.CONFIG)
        print(f"{path.name}: standard AutoAttack on n={n} test images ...", flush=True)
        report = evaluate_checkpoint(ckpt, attacks=["autoattack"], n=n, device=device, data=data(cfg), progress=False)
        res = {r.spec.attack: r for r in report.results}
        aa = res["autoattack"]
        cache.rows[key] = {"epoch": report.epoch, "n": aa.n, "clean": res["none"].acc, "autoattack": aa.acc,
                           "seconds": aa.seconds}
        cache.save()
    row = cache.rows[key]
    run.aa, run.aa_clean, run.aa_n = row["autoattack"], row["clean"], int(row["n"])


# --------------------------------------------------------------------------------------------
# Tables and the answer
# --------------------------------------------------------------------------------------------
def runs_frame(runs: Iterable[FrontierRun]) -> pd.DataFrame:
    return pd.DataFrame([asdict(r) for r in runs])


def group_table(df: pd.DataFrame) -> pd.DataFrame:
    """One row per (ε, method, α): seeds, collapses, final / best-by-validation test PGD-20 and clean
    accuracy (mean and standard error over seeds), AutoAttack where measured, training seconds per epoch."""
    out = []
    for (eps, method, label), g in df.groupby(["epsilon", "method", "label"], sort=True):
        row = {"epsilon": eps, "method": method, "label": label, "alpha": g["alpha"].mean(),
               "alpha_over_eps": g["alpha"].mean() / eps, "seeds": ",".join(map(str, sorted(g["seed"]))),
               "runs": len(g), "collapsed": int(g["collapsed"].sum()), "onsets": int(g["onset"].notna().sum())}
        for col in ("final_test_pgd", "final_test_clean", "best_test_pgd", "best_test_clean", "aa"):
            row[col] = g[col].mean()
            row[f"{col}_se"] = std_error(g[col])
        row.update(test_n=int(g["test_n"].min()), best_test_n=int(g["best_test_n"].min()),
                   aa_n=int(g["aa_n"].max()), aa_runs=int(g["aa"].notna().sum()),
                   train_s_per_epoch=g["train_s_per_epoch"].mean(), best_val_epoch=g["best_val_epoch"].mean())
        out.append(row)
    return pd.DataFrame(out)


def best_alpha(groups: pd.DataFrame, eps: float) -> pd.Series | None:
    """The FGSM group at ``eps`` with the highest mean final test PGD-20 among those with no
    collapsed seed and at least :data:`MIN_SEEDS` seeds (``None``: none qualifies)."""
    g = groups[(groups["epsilon"] == eps) & (groups["method"] == "fgsm") & (groups["collapsed"] == 0)
               & (groups["runs"] >= MIN_SEEDS)]
    return None if g.empty else g.loc[g["final_test_pgd"].idxmax()]


def paired(df: pd.DataFrame, eps: float, label_a: str, label_b: str, column: str = "final_test_pgd") -> dict[str, Any]:
    """``label_a`` − ``label_b`` on ``column`` over the seeds both have at ``eps``: mean difference,
    its standard error, paired t-test and Wilcoxon signed-rank p-values (two-sided)."""
    a = df[(df["epsilon"] == eps) & (df["label"] == label_a)].set_index("seed")[column]
    b = df[(df["epsilon"] == eps) & (df["label"] == label_b)].set_index("seed")[column]
    seeds = sorted(set(a.dropna().index) & set(b.dropna().index))
    d = (a.loc[seeds] - b.loc[seeds]).astype(float)
    out = {"epsilon": eps, "a": label_a, "b": label_b, "column": column, "pairs": len(seeds),
           "seeds": ",".join(map(str, seeds)), "mean_a": float(a.loc[seeds].mean()) if seeds else math.nan,
           "mean_b": float(b.loc[seeds].mean()) if seeds else math.nan,
           "diff": float(d.mean()) if seeds else math.nan, "diff_se": std_error(d), "t": math.nan, "p_t": math.nan,
           "p_wilcoxon": math.nan, "wins_a": int((d > 0).sum())}
    if len(seeds) >= 2 and float(d.std(ddof=1)) > 0:
        t = stats.ttest_rel(a.loc[seeds], b.loc[seeds])
        out.update(t=float(t.statistic), p_t=float(t.pvalue))
        if (d != 0).any():
            out["p_wilcoxon"] = float(stats.wilcoxon(d).pvalue)
    return out


def answer_rows(df: pd.DataFrame, groups: pd.DataFrame) -> pd.DataFrame:
    """Per ε: the best fixed α against APART, N-FGSM and GradAlign (where their runs exist), on
    final test PGD-20, best-by-validation test PGD-20 and (where measured) AutoAttack."""
    out = []
    for eps in sorted(groups["epsilon"].unique()):
        best = best_alpha(groups, eps)
        if best is None:
            continue
        for method in COMPARED:
            here = groups[(groups["epsilon"] == eps) & (groups["method"] == method)]
            if here.empty:
                continue
            for column in ("final_test_pgd", "best_test_pgd", "aa"):
                row = paired(df, eps, here["label"].iloc[0], best["label"], column)
                if row["pairs"]:
                    out.append(row)
    return pd.DataFrame(out)


def pct(x: float, se: float | None = None, digits: int = 1) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    text = f"{100 * x:.{digits}f}"
    return text if se is None or math.isnan(se) else f"{text} ± {100 * se:.{digits}f}"
