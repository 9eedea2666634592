"""What the scripts write: captions that say the scale and setting, figures (PNG + PDF), text, and
tables (``.md``, ``.tex``, ``.csv``) — each file announced with a ``wrote <path>`` line.
Formatting itself lives in :mod:`robustdrop.formatting`."""

from __future__ import annotations

import shlex
import sys
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pandas as pd
from matplotlib.figure import Figure

from lib.catalog import SMOKE_FOLDER, preset_config
from lib.setting import Setting
from robustdrop.engine import TrackConfig
from robustdrop.environment import git_commit
from robustdrop.formatting import format_eps, latex_table, markdown_table
from robustdrop.plots import save_figure
from robustdrop.store import atomic_write_text


def dataset_text(cfg: TrackConfig | dict[str, Any]) -> str:
    name = cfg["dataset"] if isinstance(cfg, dict) else cfg.dataset
    if name.startswith("folder:") and name.rstrip("/").endswith(f"/{SMOKE_FOLDER}"):
        name = "synthetic"  # --smoke's data, written as an image folder for the cells
    return {"cifar10-jpeg": "CIFAR-10 (JPEG copy)", "cifar10": "CIFAR-10", "synthetic": "synthetic (smoke)"}.get(
        name, name)


def model_text(cfg: TrackConfig) -> str:
    if cfg.model == "cnn1":
        return f"cnn1 ({int(cfg.width or 4)} filters)"
    if cfg.model == "preactresnet18" and cfg.width not in (None, 1, 1.0):
        return f"PreActResNet18 (width ×{cfg.width:g})"
    return {"preactresnet18": "PreActResNet18"}.get(cfg.model, cfg.model)


def config_text(cfg: TrackConfig, *, epochs: bool = True) -> str:
    """Model, data, ε, optimizer, schedule, epochs and seed of a run config, in one line."""
    text = (f"{model_text(cfg)} on {dataset_text(cfg)}, ε={format_eps(cfg.epsilon)}, {cfg.optimizer.upper()} "
            f"{cfg.schedule} LR to {cfg.lr:g}")
    return text + (f", {cfg.epochs} epochs" if epochs else "") + f", seed {cfg.seed}"


def setting_caption(setting: Setting, cfg: TrackConfig | None = None, *, epochs: bool = True) -> str:
    """One line saying what scale the figure was made at (and that quick is not the paper's)."""
    what = config_text(cfg or preset_config(setting), epochs=epochs)
    if setting.smoke:
        return f"SMOKE TEST (not a result): {what}"
    if setting.scale == "quick":
        return f"quick scale — {what}; the paper: PreActResNet18 on CIFAR-10, ε=8/255"
    return f"paper scale — {what}"


def write_figure(fig: Figure, out: Path, stem: str) -> list[Path]:
    """Write ``<out>/<stem>.png`` and ``.pdf`` (:func:`robustdrop.plots.save_figure`) and say so."""
    paths = save_figure(fig, out, stem)
    for p in paths:
        print(f"wrote {p}", flush=True)
    return paths


def add_caption(fig: Figure, text: str) -> None:
    """A caption line above everything else in the figure."""
    fig.suptitle(text, fontsize="small", style="italic")


def provenance_line() -> str:
    """Which code made an output, when, by which command: a table is only as good as the record of
    where it came from (the commit of the imported robustdrop checkout; ``unknown`` outside git)."""
    command = " ".join(shlex.quote(a) for a in [f"analyses/{Path(sys.argv[0]).name}", *sys.argv[1:]])
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M")
    return f"Made by commit `{(git_commit() or 'unknown')[:10]}` on {when} UTC: `python {command}`."


def write_text(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, text)
    print(f"wrote {path}", flush=True)
    return path


def frame_markdown(df: pd.DataFrame) -> str:
    """A display frame (string cells) as a Markdown table."""
    return markdown_table(list(df.columns), df.itertuples(index=False))


def write_table(df: pd.DataFrame, raw: pd.DataFrame, out: Path, stem: str, title: str, notes: Sequence[str]) -> None:
    """``<stem>.md`` (title, table, notes), ``.tex`` (booktabs) from the display frame ``df``,
    and ``.csv`` from ``raw`` (unrounded numbers, accuracies as fractions)."""
    note = " ".join(notes)
    write_text(out / f"{stem}.md", f"# {title}\n\n{frame_markdown(df)}\n{note}\n\n{provenance_line()}\n")
    write_text(out / f"{stem}.tex", latex_table(list(df.columns), df.itertuples(index=False), f"{title}. {note}"))
    write_text(out / f"{stem}.csv", raw.to_csv(index=False))
