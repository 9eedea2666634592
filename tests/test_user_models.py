"""A user's own model and checkpoints (robustdrop.models.user) and ``robustdrop evaluate --model``."""

from __future__ import annotations

import re
import sys
import textwrap

import pandas as pd
import pytest
import torch

from robustdrop.cli import main
from robustdrop.errors import RobustdropError
from robustdrop.models.user import (
    build_user_model,
    checkpoint_epoch,
    epoch_from_name,
    find_checkpoints,
    fit_weights,
    load_user_weights,
    parse_normalize,
)

pytestmark = pytest.mark.usefixtures("one_thread")

USER_MODULE = textwrap.dedent("""
    import torch
    from torch import nn

    class Net(nn.Module):
        def __init__(self, num_classes=10, width=4):
            super().__init__()
            self.conv = nn.Conv2d(3, width, 3, padding=1)
            self.bn = nn.BatchNorm2d(width)
            self.fc = nn.Linear(width, num_classes)

        def forward(self, x):
            return self.fc(torch.relu(self.bn(self.conv(x))).mean((2, 3)))

    def make():
        return Net(width=4)

    def wide(num_classes):
        return Net(num_classes=num_classes, width=8)

    def needs(depth):
        return Net()

    def not_a_model():
        return 3

    def feature_map():  # not logits: (N, 4, H, W)
        return nn.Conv2d(3, 4, 3, padding=1)

    CONSTANT = 3
""")


@pytest.fixture
def user_module(importable):
    """``usernets`` importable from the current directory, as a user's package would be."""
    return importable("usernets", USER_MODULE)


def test_factories_are_called_with_nothing_or_num_classes(user_module, tmp_path):
    assert build_user_model("usernets:make", num_classes=7).fc.out_features == 10  # no num_classes parameter
    assert build_user_model("usernets:wide", num_classes=7).fc.out_features == 7
    assert build_user_model("usernets:Net", num_classes=4).fc.out_features == 4  # a class is a factory too
    assert build_user_model(f"{tmp_path / 'usernets.py'}:make", num_classes=10).conv.out_channels == 4


@pytest.mark.parametrize(("spec", "says"), [
    ("usernets", "package.module:factory"),
    ("nosuchpackage.nets:make", "cannot import nosuchpackage.nets"),
    ("usernets:missing", "has no 'missing'"),
    ("usernets:CONSTANT", "not a function or class"),
    ("usernets:needs", "needs arguments depth"),
    ("usernets:not_a_model", "not a torch.nn.Module"),
    ("nofile.py:make", "does not exist"),
])
def test_bad_factories_are_one_line_errors(user_module, spec, says):
    with pytest.raises(RobustdropError, match=says) as info:
        build_user_model(spec, num_classes=10)
    assert "\n" not in str(info.value)


def test_a_module_that_fails_to_import_names_the_error(tmp_path, monkeypatch):
    (tmp_path / "broken.py").write_text("import nosuchdependency\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(RobustdropError, match="importing broken failed: .*nosuchdependency"):
        build_user_model("broken:make", num_classes=10)
    sys.modules.pop("broken", None)


def _net(user_module):
    return build_user_model("usernets:make", num_classes=10)


@pytest.mark.parametrize("wrap", [
    lambda sd: sd,
    lambda sd: {"model": sd, "epoch": 3},
    lambda sd: {"model_state_dict": sd, "optimizer_state_dict": {}},
    lambda sd: {"state_dict": {f"model.{k}": v for k, v in sd.items()}, "pytorch-lightning_version": "2.6"},
    lambda sd: {f"module.{k}": v for k, v in sd.items()},  # DataParallel
    lambda sd: {"state_dict": {f"net._orig_mod.{k}": v for k, v in sd.items()} | {"loss.weight": torch.ones(3)}},
], ids=["raw", "model", "model_state_dict", "lightning", "dataparallel", "compiled-attribute"])
def test_checkpoint_formats_load_into_the_model(user_module, tmp_path, wrap):
    trained = _net(user_module)
    with torch.no_grad():
        for p in trained.parameters():
            p.normal_()
    trained.bn.running_mean.fill_(0.5)
    path = tmp_path / "epoch_3.pt"
    torch.save(wrap(trained.state_dict()), path)
    fresh = _net(user_module)
    load_user_weights(fresh, path, "usernets:make")
    for key, value in trained.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key


def test_a_checkpoint_that_does_not_fit_names_the_key_and_shapes(user_module, tmp_path):
    model = _net(user_module)
    wide = build_user_model("usernets:wide", num_classes=10)
    path = tmp_path / "wide.pt"
    torch.save({"model": wide.state_dict()}, path)
    with pytest.raises(RobustdropError, match=r"conv.weight has shape \(8, 3, 3, 3\), the model's is \(4, 3, 3, 3\)"):
        load_user_weights(model, path, "usernets:make")
    sd = model.state_dict()
    torch.save({k: v for k, v in sd.items() if k != "fc.bias"}, path)
    with pytest.raises(RobustdropError, match="lacks 'fc.bias'"):
        load_user_weights(model, path, "usernets:make")
    torch.save(sd | {"head.weight": torch.ones(2)}, path)
    with pytest.raises(RobustdropError, match="has 'head.weight'"):
        load_user_weights(model, path, "usernets:make")
    torch.save({"optimizer": {"lr": 0.1}}, path)
    with pytest.raises(RobustdropError, match="holds no model weights"):
        load_user_weights(model, path, "usernets:make")


def test_a_pickled_model_object_is_refused_without_running_its_code(user_module, tmp_path):
    path = tmp_path / "whole.pt"
    torch.save(_net(user_module), path)  # the whole object: weights_only=True cannot (and must not) unpickle it
    with pytest.raises(RobustdropError, match="weights_only=True.*save model.state_dict"):
        load_user_weights(_net(user_module), path)


@pytest.mark.parametrize(("name", "epoch"), [
    ("epoch_12.pt", 12), ("ckpt-epoch=03.ckpt", 3), ("model_epoch7.pth", 7), ("Epoch-5.pt", 5),
    ("epoch=4-step=1000.ckpt", 4), ("12.pt", 12), ("ckpt_0012.pth", 12),
])
def test_epochs_come_from_file_names(name, epoch):
    assert epoch_from_name(name) == epoch


def test_a_name_without_an_epoch_is_an_error():
    with pytest.raises(RobustdropError, match="cannot tell the epoch of run3_step5.pt"):
        epoch_from_name("run3_step5.pt")


def test_lightning_checkpoints_count_from_zero(tmp_path):
    assert checkpoint_epoch(tmp_path / "epoch=0-step=97.ckpt", {"pytorch-lightning_version": "2.6", "epoch": 0}) == 1


def test_a_series_of_checkpoints_by_epoch(tmp_path):
    sd = {"w": torch.zeros(2)}
    for e in (10, 2, 1):
        torch.save(sd, tmp_path / f"epoch_{e}.pt")
    assert [e for e, _, _ in find_checkpoints(str(tmp_path / "epoch_*.pt"))] == [1, 2, 10]  # by number, not text
    with pytest.raises(RobustdropError, match="matches no file"):
        find_checkpoints(str(tmp_path / "nothing_*.pt"))
    torch.save(sd, tmp_path / "epoch_01.pt")
    with pytest.raises(RobustdropError, match="two checkpoints of epoch 1"):
        find_checkpoints(str(tmp_path / "epoch_*.pt"))
    torch.save({"model": sd, "step": 7}, tmp_path / "only_0.pt")
    with pytest.raises(RobustdropError, match="epochs count from 1"):
        find_checkpoints(str(tmp_path / "only_*.pt"))
    torch.save({"model": sd, "step": 7}, tmp_path / "only_3.pt")
    assert find_checkpoints(str(tmp_path / "only_3.pt")) == [(3, tmp_path / "only_3.pt", 7)]


def test_normalize_flags():
    assert parse_normalize(None) is None
    assert parse_normalize(["cifar10"]) == ((0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616))
    assert parse_normalize(["0.5", "0.1,0.2,0.3"]) == ((0.5,), (0.1, 0.2, 0.3))
    for bad in (["a", "b"], ["1", "2", "3"], ["imagenet"]):
        with pytest.raises(RobustdropError, match="MEAN STD"):
            parse_normalize(bad)


def test_fit_prefers_the_exact_match(user_module):
    model = _net(user_module)
    sd = model.state_dict()
    both = {f"student.{k}": v for k, v in sd.items()} | {f"teacher.{k}": v + 1 for k, v in sd.items()}
    with pytest.raises(RobustdropError, match="lacks"):  # nothing of the model's in it
        fit_weights(model, {"x.y": torch.ones(1)}, "f.pt")
    fitted = fit_weights(model, both, "f.pt")  # two exact matches: the first in name order (student)
    assert torch.equal(fitted["conv.weight"], sd["conv.weight"])


# ---------------------------------------------------------------------------------------------
# robustdrop evaluate --model
# ---------------------------------------------------------------------------------------------
def test_evaluate_a_user_checkpoint_from_the_command_line(user_module, tmp_path, image_folder, folder_cache, capsys):
    net = build_user_model("usernets:wide", num_classes=4)
    torch.save({"model_state_dict": net.state_dict(), "epoch": 5}, tmp_path / "epoch_5.pt")
    args = ["evaluate", str(tmp_path / "epoch_5.pt"), "--model", "usernets:wide", "--dataset", f"folder:{image_folder}",
            "--epsilon", "8/255", "--attack", "fgsm", "--n", "40", "--pgd-steps", "2", "--no-progress",
            "--normalize", "0.5", "0.25"]
    assert main(args) == 0
    rows = pd.read_csv(tmp_path / "epoch_5.evaluate.csv")
    assert set(rows.attack) == {"none", "fgsm"} and (rows.n == 40).all() and (rows.epoch == 5).all()
    assert (rows.source == "evaluate").all() and rows.epsilon.dropna().round(6).eq(round(8 / 255, 6)).all()
    # clean accuracy is the wrapped model's on normalized inputs
    from robustdrop.data import load_dataset
    from robustdrop.engine.attack_eval import subset

    data = load_dataset(f"folder:{image_folder}")
    pick = subset(data.test_y, 40, 0)
    x, y = data.test_x[pick].float() / 255, data.test_y[pick]
    expected = (net.eval()((x - 0.5) / 0.25).argmax(1) == y).float().mean().item()
    clean = rows[(rows.attack == "none") & (rows.metric == "acc")].value.item()
    assert clean == pytest.approx(expected)


@pytest.mark.parametrize(("factory", "extra", "says"), [
    ("usernets:wide", [], "give --epsilon"),
    ("usernets:feature_map", ["--epsilon", "8/255"], "logits of shape \\(N, classes\\)"),
    ("usernets:wide", ["--epsilon", "8/255", "--normalize", "0.5,0.5", "0.2,0.2"], "has 2 values.*3 channels"),
    ("usernets:wide", ["--epsilon", "8/255", "--normalize", "0.5", "0"], "std .* must be positive"),
    ("usernets:wide", ["--epsilon", "0"], "--epsilon must be in"),
])
def test_evaluate_model_bad_input_is_one_line(user_module, tmp_path, image_folder, folder_cache, capsys, factory, extra,
                                              says):
    torch.save(build_user_model(factory, num_classes=4).state_dict(), tmp_path / "w.pt")
    args = ["evaluate", str(tmp_path / "w.pt"), "--model", factory, "--dataset", f"folder:{image_folder}",
            "--no-progress", *extra]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and re.search(says, err), err
    assert not (tmp_path / "w.evaluate.csv").exists()
