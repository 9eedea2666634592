"""The ``wong`` diagnostic (Wong et al. 2020's early-stop check) and its ``wong_fall`` signal: the
fixed minibatch, the attack it logs, that it leaves batch-norm statistics alone, and the rule
replayed on recorded rows."""

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch
from test_diagnostics import fake_run, mid_gray
from torch import nn

from robustdrop.attacks import PGD, model_mode
from robustdrop.diagnostics import (
    CollapseDetector,
    CollapseRule,
    WongDiagnostic,
    build_hooks,
    detect_collapse,
    first_epochs,
)
from robustdrop.engine import make_config
from robustdrop.errors import RobustdropError
from robustdrop.store import metric_row

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: small models are fastest on one thread


class BNNet(nn.Module):
    """A tiny conv net with batch norm: train and eval mode give different outputs."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.head = nn.Linear(4 * 8 * 8, 2)

    def forward(self, x):
        return self.head(torch.relu(self.bn(self.conv(x))).flatten(1))


def wong_run(tmp_path, n_images=40):
    images, labels = mid_gray(n_images)
    run = fake_run(tmp_path, BNNet(), images, labels)
    run.train_labels = labels
    return run


def test_check_is_pgd5_on_one_fixed_batch_in_train_bn_and_leaves_statistics_alone(tmp_path):
    run = wong_run(tmp_path)
    model = run.model
    model.bn.running_mean.fill_(0.3)  # a trained model's statistics, not the initial zeros
    before = {k: v.clone() for k, v in model.state_dict().items()}
    hook = WongDiagnostic(n=16)
    hook.on_run_start(run)
    x, y = hook.batch
    assert x.shape == (16, 3, 8, 8) and x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1
    again = WongDiagnostic(n=16)
    again.on_run_start(run)
    assert torch.equal(again.batch[0], x) and torch.equal(again.batch[1], y)  # seeded: the same batch
    for epoch in (1, 2):
        run.epoch = epoch
        hook.on_epoch_end(run, epoch)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # running stats and counters restored
    assert not model.training and not model.bn.training  # hooks see eval mode, and leave it so
    m = run.store.metrics()
    acc = m[(m["source"] == "wong") & (m["metric"] == "acc")]
    assert list(acc["epoch"]) == [1, 2] and set(acc["split"]) == {"train"}
    row = acc.iloc[0]
    assert (row["attack"], row["steps"], row["restarts"], row["n"]) == ("pgd", 5, 1, 16)
    assert math.isclose(row["step_size"], 2 / 255) and math.isclose(row["epsilon"], 8 / 255)
    assert set(m[m["source"] == "wong"]["metric"]) == {"acc", "loss", "time_s"}
    assert run.metrics["wong/acc"] == acc["value"].iloc[-1]
    # the value is PGD-5's accuracy with batch norm on the batch's statistics (their code's mode),
    # which differs from eval mode here
    gen = run.generator("wong", epoch=2)
    pgd = PGD(8 / 255, steps=5, step_size=2 / 255, train_mode=True)
    delta = pgd(model, x, y, gen)
    with torch.no_grad(), model_mode(model, True):
        expected = (model(x + delta).argmax(1) == y).float().mean().item()
    model.load_state_dict(before)
    assert acc["value"].iloc[-1] == pytest.approx(expected)


def test_options_and_missing_labels_are_one_line_errors(tmp_path):
    with pytest.raises(RobustdropError, match="wong:bn must be one of train, eval"):
        build_hooks(make_config(diagnostics=["wong:bn=batch"]))
    with pytest.raises(RobustdropError, match="step_size must be positive"):
        WongDiagnostic(step_size=0.0)
    run = wong_run(tmp_path)
    run.train_labels = None
    with pytest.raises(RobustdropError, match="needs the run's training images and labels.*leave it out"):
        WongDiagnostic().on_run_start(run)


def table(pgd, wong) -> pd.DataFrame:
    """Recorded rows: probe PGD accuracy and the wong check's accuracy, epochs 1, 2, ..."""
    out = []
    for e, (p, w) in enumerate(zip(pgd, wong), start=1):
        out.append(metric_row(e, 10 * e, "probe", "acc", p, attack="pgd", source="eval"))
        if w is not None:
            out.append(metric_row(e, 10 * e, "train", "acc", w, attack="pgd", source="wong", steps=5, n=128))
    return pd.DataFrame(out)


def test_wong_fall_is_their_rule_replayed_offline():
    pgd = [.10, .20, .25, .28, .27, .10, .05]
    # a rise never fires; a fall of 0.19 does not (their test is acc − previous < −0.2); 0.45 → 0.2 does
    wong = [.30, .50, .55, .36, .45, .20, .05]
    # the a-priori rule (any early signal, fall 0.2): wong_fall votes there, not in the default rule
    verdicts = detect_collapse(table(pgd, wong), CollapseRule(signals="all", fall=0.2))
    flags = [v.flags.get("wong_fall") for v in verdicts]
    assert flags == [False, False, False, False, False, True, False]
    first = first_epochs(verdicts)
    assert first["wong_fall"] == 6 and first["early"] == 6  # an early signal: it votes in the early rule
    default = first_epochs(detect_collapse(table(pgd, wong)))  # align_fall alone votes: no warning here
    assert default["wong_fall"] == 6 and default["early"] is None
    # without the diagnostic's rows the signal is left out, not counted as silent
    assert "wong_fall" not in detect_collapse(table(pgd, [None] * 7))[-1].flags
    # a detector resumed from a checkpointed state compares with the previous epoch it saw
    det = CollapseDetector()
    for e in range(1, 6):
        det.update(e, {"pgd_acc": pgd[e - 1], "wong_acc": wong[e - 1]})
    resumed = CollapseDetector()
    resumed.load_state_dict(det.state_dict())
    assert resumed.update(6, {"pgd_acc": .10, "wong_acc": .20}).flags["wong_fall"]
