"""robustdrop.formatting: the one way ε, percentages and tables are written."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from robustdrop.attacks.base import AttackSpec
from robustdrop.formatting import (
    eps_in_255ths,
    format_eps,
    format_pct,
    format_pct_se,
    format_ratio,
    is_missing,
    latex_escape,
    latex_table,
    markdown_table,
)


@pytest.mark.parametrize(("eps", "text"), [
    (8 / 255, "8/255"), (float(np.float32(8 / 255)), "8/255"), (10 / 255, "10/255"), (2.5 / 255, "2.5/255"),
    (2.5 * 10 / 255 / 3, "8.33/255"), (0.0, "0"), (None, "?"), (math.nan, "?"),
])
def test_format_eps(eps, text):
    assert format_eps(eps) == text


def test_format_pct_se_leaves_out_what_is_missing():
    assert format_pct_se(0.4567, 0.0123) == "45.7 ± 1.2" and format_pct_se(0.4567, math.nan, 2) == "45.67"
    assert format_pct_se(math.nan, 0.01) == "" and format_pct_se(None, None) == ""


def test_eps_in_255ths_is_a_file_name_part_and_attack_specs_use_the_same_rule():
    assert eps_in_255ths(8 / 255) == "8" and "/" not in eps_in_255ths(2.5 / 255)
    spec = AttackSpec("pgd", 10 / 255, 20, 2.5 / 255, 1)
    assert spec.describe() == "pgd-20 (ε=10/255, step 2.5/255, 1 restart(s))"


def test_missing_values_give_empty_cells():
    for value in (None, math.nan, np.float64("nan"), pd.NA):
        assert is_missing(value) and format_pct(value) == "" and format_ratio(value) == ""
    assert not is_missing(0.0) and not is_missing("x")
    assert format_pct(0.4567, 2) == "45.67" and format_pct(0.4567) == "45.7" and format_ratio(0.25) == "0.25×"


def test_markdown_escapes_pipes_in_headers_and_cells():
    text = markdown_table(["a|b", "n"], [["x|y", None], ["z", 3]])
    assert text.splitlines() == ["| a\\|b | n |", "|---|---|", "| x\\|y |  |", "| z | 3 |"]


def test_latex_escapes_and_aligns_numbers_right():
    text = latex_table(["run", "PGD %", "cost"], [["fgsm_1", "45.67", "0.25×"], ["pgd", "", "1.00×"]],
                       "ε ≤ 8/255 & n ≈ 100")
    assert "\\begin{tabular}{lrr}" in text and "fgsm\\_1 & 45.67 & 0.25$\\times$" in text
    assert "PGD \\%" in text and "$\\varepsilon$ $\\le$ 8/255 \\& n $\\approx$ 100" in text
    assert latex_escape("a_b{c}") == "a\\_b\\{c\\}"
