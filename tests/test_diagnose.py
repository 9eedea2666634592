"""``robustdrop diagnose``: the diagnostics replayed over per-epoch checkpoints that other code saved."""

from __future__ import annotations

import re
import textwrap

import pytest
import torch

from robustdrop.cli import main
from robustdrop.data import load_dataset, probe_indices
from robustdrop.store import RunStore

pytestmark = pytest.mark.usefixtures("one_thread")

NETS = textwrap.dedent("""
    import torch
    from torch import nn

    class Net(nn.Module):  # takes normalized inputs
        def __init__(self, num_classes=4, width=4):
            super().__init__()
            self.conv = nn.Conv2d(3, width, 3, padding=1)
            self.fc = nn.Linear(width * 16 * 16, num_classes)

        def forward(self, x):
            return self.fc(torch.relu(self.conv(x)).flatten(1))

    def make(num_classes):
        return Net(num_classes=num_classes)

    def wide():
        return Net(width=8)

    def pooled():  # not logits: (N, width, H, W)
        return nn.Conv2d(3, 4, 3, padding=1)
""")
MEAN, STD = 0.5, 0.25


@pytest.fixture
def nets(importable):
    return importable("offnets", NETS)


def _save_series(folder, epochs=(1, 2, 3), name="epoch_{:02d}.pt", seed=0, wrap=lambda sd: {"model": sd}):
    """Checkpoints of a drifting Net(4 classes), as a training script would save them; returns the weights."""
    import offnets

    torch.manual_seed(seed)
    net, saved = offnets.Net(), {}
    folder.mkdir(parents=True, exist_ok=True)
    for e in epochs:
        with torch.no_grad():
            for p in net.parameters():
                p.add_(0.5 * torch.randn_like(p))
        saved[e] = {k: v.clone() for k, v in net.state_dict().items()}
        torch.save(wrap(net.state_dict()), folder / name.format(e))
    return saved


def _args(tmp_path, image_folder, *extra, pattern="ckpts/epoch_*.pt", **flags):
    """The command line; ``flags`` (``epsilon="0"``, ``normalize=["1", "2"]``) replace the defaults."""
    options = {"checkpoints": str(tmp_path / pattern), "model": "offnets:make", "dataset": f"folder:{image_folder}",
               "normalize": [str(MEAN), str(STD)], "epsilon": "8/255", "probe_size": "32", "reference": "none",
               "runs_dir": str(tmp_path / "runs"), "name": "off", **flags}
    args = ["diagnose", "--no-progress", *extra]
    for key, value in options.items():
        args += ["--" + key.replace("_", "-"), *([value] if isinstance(value, str) else value)]
    return args


def test_diagnose_writes_a_run_directory_of_every_epoch(nets, tmp_path, image_folder, folder_cache, capsys):
    saved = _save_series(tmp_path / "ckpts")
    assert main(_args(tmp_path, image_folder)) == 0
    assert "robustdrop plot collapse" in capsys.readouterr().out
    store = RunStore.open(tmp_path / "runs" / "off")
    m = store.metrics()
    clean = m[(m.split == "probe") & (m.metric == "acc") & (m.attack == "none") & (m.source == "eval")]
    assert sorted(clean.epoch) == [1, 2, 3] and (clean.n == 32).all()
    assert {"strength", "collapse"} <= set(m.source)
    # each epoch's numbers are its own checkpoint's: the clean probe accuracy recomputed here
    import offnets

    data = load_dataset(f"folder:{image_folder}")
    pick = probe_indices(data.test_y, 32, 0)
    x, y = data.test_x[pick].float() / 255, data.test_y[pick]
    for epoch, weights in saved.items():
        net = offnets.Net()
        net.load_state_dict(weights)
        expected = (net((x - MEAN) / STD).argmax(1) == y).float().mean().item()
        assert clean[clean.epoch == epoch].value.item() == pytest.approx(expected), epoch
    kinds = [e["kind"] for e in store.events()]
    assert kinds.count("checkpoint") == 3 and "diagnose" in kinds
    # every existing reader works on it
    assert main(["compare", str(store.path)]) == 0


def test_lightning_checkpoints_are_numbered_from_their_epoch(nets, tmp_path, image_folder, folder_cache):
    _save_series(tmp_path / "lt", epochs=(0, 1), name="epoch={}-step=10.ckpt",
                 wrap=lambda sd: {"state_dict": {f"model.{k}": v for k, v in sd.items()}, "epoch": 0,
                                  "pytorch-lightning_version": "2.6.0", "global_step": 10})
    # both files record epoch 0: two checkpoints of one epoch
    assert main(_args(tmp_path, image_folder, pattern="lt/*.ckpt")) == 2
    for e, f in enumerate(sorted((tmp_path / "lt").glob("*.ckpt"))):
        state = torch.load(f, weights_only=True)
        state["epoch"], state["global_step"] = e, 10 * (e + 1)
        torch.save(state, f)
    assert main(_args(tmp_path, image_folder, pattern="lt/*.ckpt")) == 0
    m = RunStore.open(tmp_path / "runs" / "off").metrics()
    probe = m[(m.split == "probe") & (m.source == "eval")]
    assert sorted(set(probe.epoch)) == [1, 2] and sorted(set(probe.step)) == [10, 20]


def _bad_second(folder):
    import offnets

    torch.save({"model": offnets.Net(width=8).state_dict()}, folder / "epoch_02.pt")


@pytest.mark.parametrize(("setup", "flags", "says"), [
    (None, {"checkpoints": "nowhere/epoch_*.pt"}, "matches no file"),
    (_bad_second, {}, r"epoch_02.pt does not fit offnets:make: its conv.weight has shape \(8, 3, 3, 3\)"),
    (None, {"epsilon": "0"}, "--epsilon must be in"),
    (None, {"reference": "builtin:nosuch"}, "no shipped referee builtin:nosuch"),
    (None, {"model": "offnets:pooled"}, r"shape \(N, classes\)"),
    (None, {"model": "offnets:wide"}, "does not fit offnets:wide"),
    (None, {"model": "offnets:nothing"}, "has no 'nothing'"),
    (lambda f: (f / "epoch_02.pt").rename(f / "weights-a2-b3.pt"), {"checkpoints": "ckpts/*.pt"},
     "cannot tell the epoch"),
    (None, {"normalize": ["0.5,0.5", "0.25,0.25"]}, "2 values.*3 channels"),
])
def test_bad_input_is_one_line_and_writes_nothing(nets, tmp_path, image_folder, folder_cache, capsys, setup, flags,
                                                  says):
    _save_series(tmp_path / "ckpts")
    if setup is not None:
        setup(tmp_path / "ckpts")
    if "checkpoints" in flags:
        flags = {**flags, "checkpoints": str(tmp_path / flags["checkpoints"])}
    assert main(_args(tmp_path, image_folder, **flags)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and re.search(says, err), err
    assert not (tmp_path / "runs" / "off").exists()


def test_an_existing_run_is_not_overwritten(nets, tmp_path, image_folder, folder_cache, capsys):
    _save_series(tmp_path / "ckpts", epochs=(1,))
    assert main(_args(tmp_path, image_folder)) == 0
    before = (tmp_path / "runs" / "off" / "metrics.csv").read_bytes()
    assert main(_args(tmp_path, image_folder)) == 2
    assert "already exists" in capsys.readouterr().err
    assert (tmp_path / "runs" / "off" / "metrics.csv").read_bytes() == before
    assert main(_args(tmp_path, image_folder, "--overwrite")) == 0
