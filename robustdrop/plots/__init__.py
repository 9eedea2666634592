"""Figures and tables from run directories.

Reads run directories only (through :class:`robustdrop.store.RunStore`); never imports training
code. Figures are drawn on pyplot-free ``Figure`` objects with the non-interactive Agg canvas, in
seaborn's ``whitegrid`` style, and written as PNG and PDF. Each ``plot_*`` function returns the
paths it wrote; each ``*_figure`` function builds the same figure without writing it.
"""

from robustdrop.plots._common import save_figure
from robustdrop.plots.collapse import collapse_figure, plot_collapse
from robustdrop.plots.curves import apart_figure, curves_figure, plot_apart, plot_curves
from robustdrop.plots.landscape import landscape_figure, plot_landscape
from robustdrop.plots.perturbations import perturbations_figure, plot_perturbations
from robustdrop.plots.tables import (
    COLUMNS,
    FORMATS,
    compare,
    format_table,
    robustbench_json,
    write_robustbench_json,
)

__all__ = [
    "COLUMNS", "FORMATS",
    "apart_figure", "collapse_figure", "compare", "curves_figure", "format_table",
    "landscape_figure", "perturbations_figure", "plot_apart", "plot_collapse", "plot_curves",
    "plot_landscape", "plot_perturbations", "robustbench_json", "save_figure", "write_robustbench_json",
]
