"""How numbers, ε and tables are written as text — the one home for attack descriptions, plots,
tables and the analyses scripts.

Imports nothing from robustdrop (and nothing heavy), so every layer may use it.

Examples:
    >>> format_eps(8 / 255), format_eps(2.5 / 255), format_eps(0.0)
    ('8/255', '2.5/255', '0')
    >>> format_pct(0.4567, 2), format_pct(float("nan"))
    ('45.67', '')
    >>> format_pct_se(0.4567, 0.012), format_pct_se(0.4567, float("nan"))
    ('45.7 ± 1.2', '45.7')
    >>> format_duration(1023)
    '17m03s'
    >>> print(markdown_table(["run", "PGD %"], [["fgsm", "0.00"]]), end="")
    | run | PGD % |
    |---|---|
    | fgsm | 0.00 |
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

# ε·255 closer than this to an integer k is written k/255. Loose enough for ε stored in float32
# (8/255 in float32 is 8.0000005/255), tight enough to keep 2.5/255 apart from 2/255 and 3/255.
EPS_TOLERANCE = 1e-3


def is_missing(value: Any) -> bool:
    """``None``, a NaN (Python, NumPy) or ``pandas.NA``."""
    if value is None:
        return True
    try:
        return bool(value != value)  # only NaN differs from itself
    except TypeError:  # pandas.NA: comparing gives NA, whose truth value raises
        return True


def eps_in_255ths(x: float) -> str:
    """ε in units of 1/255 without the unit: ``'8'`` for 8/255, ``'2.5'``, ``'8.33'`` (3 significant
    digits where ε is not a whole multiple of 1/255). Safe in file names."""
    k = float(x) * 255.0
    if round(k) > 0 and abs(k - round(k)) < EPS_TOLERANCE:
        return str(round(k))
    return f"{k:.3g}"


def format_eps(x: float | None) -> str:
    """An L∞ radius or step size as ``k/255`` (``8/255``, ``2.5/255``); ``0`` for zero, ``?`` when missing."""
    if is_missing(x):
        return "?"
    if float(x) == 0:
        return "0"
    return f"{eps_in_255ths(x)}/255"


def fixed(x: float | None, digits: int = 2) -> str:
    """``x`` with ``digits`` decimals; ``''`` when missing (an empty table cell)."""
    return "" if is_missing(x) else f"{float(x):.{digits}f}"


def format_pct(x: float | None, digits: int = 1) -> str:
    """A fraction in [0, 1] as a percentage without the sign (``0.4567`` → ``45.7``); ``''`` when missing."""
    return "" if is_missing(x) else f"{100.0 * float(x):.{digits}f}"


def format_pct_se(mean: float | None, se: float | None, digits: int = 1) -> str:
    """A mean fraction and its standard error as percentages, ``45.7 ± 1.2``; no ``±`` part when
    ``se`` is missing; ``''`` when ``mean`` is."""
    if is_missing(mean):
        return ""
    return format_pct(mean, digits) + ("" if is_missing(se) else f" ± {format_pct(se, digits)}")


def format_ratio(x: float | None, digits: int = 2) -> str:
    """A cost ratio as ``0.25×``; ``''`` when missing."""
    return "" if is_missing(x) else f"{float(x):.{digits}f}×"


def format_duration(seconds: float | None) -> str:
    """A wall time as ``42s``, ``17m03s``, ``2h05m`` or ``58h``; ``?`` when missing or negative.

    >>> format_duration(42.4), format_duration(1023), format_duration(7500), format_duration(208800)
    ('42s', '17m03s', '2h05m', '58h')
    """
    if is_missing(seconds) or float(seconds) < 0:
        return "?"
    s = round(float(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 48 * 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{round(s / 3600)}h"


def is_number(text: str) -> bool:
    """Whether a table cell reads as a number (a trailing ``×`` of a ratio allowed)."""
    try:
        float(str(text).rstrip("×"))
    except ValueError:
        return False
    return True


def cell_text(value: Any) -> str:
    """What a table cell shows: ``str(value)``, empty when missing."""
    return "" if is_missing(value) else str(value)


# --------------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------------
def _cells(headers: Sequence[Any], rows: Iterable[Sequence[Any]]) -> tuple[list[str], list[list[str]]]:
    return [cell_text(h) for h in headers], [[cell_text(v) for v in row] for row in rows]


def markdown_table(headers: Sequence[Any], rows: Iterable[Sequence[Any]]) -> str:
    """A GitHub Markdown table; ``|`` is escaped in headers and cells alike."""
    heads, cells = _cells(headers, rows)

    def line(values: Sequence[str]) -> str:
        return "| " + " | ".join(v.replace("|", "\\|") for v in values) + " |"

    return "\n".join([line(heads), "|" + "|".join("---" for _ in heads) + "|", *map(line, cells)]) + "\n"


LATEX_ESCAPES = {
    "\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
    "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
    "ε": r"$\varepsilon$", "×": r"$\times$", "−": "-", "≤": r"$\le$", "≈": r"$\approx$",
}


def latex_escape(text: Any) -> str:
    """Text safe in (pdf)LaTeX: special characters escaped, the few non-ASCII symbols we print set in math."""
    return "".join(LATEX_ESCAPES.get(ch, ch) for ch in cell_text(text))


def latex_table(headers: Sequence[Any], rows: Iterable[Sequence[Any]], note: str = "") -> str:
    """A booktabs ``tabular``: numeric columns right-aligned, ``note`` as a last full-width row that
    wraps at 0.95 of the line width (a long note never runs off the page)."""
    heads, cells = _cells(headers, rows)
    numeric = [any(r[j] for r in cells) and all(is_number(r[j]) for r in cells if r[j]) for j in range(len(heads))]
    lines = ["% requires \\usepackage{booktabs}", f"\\begin{{tabular}}{{{''.join('r' if n else 'l' for n in numeric)}}}",
             r"\toprule", " & ".join(map(latex_escape, heads)) + r" \\", r"\midrule"]
    lines += [" & ".join(map(latex_escape, row)) + r" \\" for row in cells]
    lines.append(r"\bottomrule")
    if note:
        lines.append(f"\\multicolumn{{{len(heads)}}}{{p{{0.95\\linewidth}}}}{{\\footnotesize {latex_escape(note)}}} \\\\")
    lines.append(r"\end{tabular}")
    return "\n".join(lines) + "\n"


def text_table(headers: Sequence[Any], rows: Iterable[Sequence[Any]]) -> str:
    """A plain-text table for a terminal: columns aligned (numbers right, text left), a rule under the header."""
    heads, cells = _cells(headers, rows)
    widths = [max([len(h)] + [len(r[j]) for r in cells]) for j, h in enumerate(heads)]
    numeric = [bool(cells) and all(is_number(r[j].split(" ")[0]) for r in cells if r[j]) for j in range(len(heads))]

    def line(values: Sequence[str]) -> str:
        return "  ".join(v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric)).rstrip()

    return "\n".join([line(heads), "  ".join("-" * w for w in widths), *map(line, cells)]) + "\n"
