"""robustdrop.Monitor on a user's own training loop (issue 19): it leaves the training bit-identical,
writes an ordinary run directory the commands read, resumes without a duplicated or missing epoch,
replays saved weights to the live numbers, refuses bad input before writing, and logs the numbers
`robustdrop track` logs for the same training."""

from __future__ import annotations

import random

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import robustdrop
from robustdrop.cli import main
from robustdrop.errors import RobustdropError
from robustdrop.store import RunStore

MEAN, STD = torch.tensor([0.49, 0.48, 0.45]), torch.tensor([0.25, 0.24, 0.26])
EPS = 8 / 255
STEPS, BATCH = 4, 32


class Net(nn.Module):
    """A small model with what a monitor could disturb: BatchNorm statistics, dropout (global RNG)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.drop = nn.Dropout(0.2)
        self.fc = nn.Linear(8 * 4 * 4, 10)

    def forward(self, x):
        h = F.adaptive_avg_pool2d(F.relu(self.bn(self.conv(x))), 4).flatten(1)
        return self.fc(self.drop(h))


def normalized(data):
    return (data.train_x[: STEPS * BATCH].float() / 255 - MEAN.view(1, 3, 1, 1)) / STD.view(1, 3, 1, 1)


def fgsm_loop(model, optimizer, data, epochs, monitor=None, first=1):
    """A reference-script style FGSM loop on normalized inputs (per-channel ε), which also draws from
    every global RNG the way user code does; ``monitor`` observes every step and ends every epoch."""
    x_all, y_all = normalized(data), data.train_y[: STEPS * BATCH]
    eps = (EPS / STD).view(1, 3, 1, 1)
    reports = []
    for epoch in range(first, first + epochs):
        model.train()
        order = torch.randperm(len(y_all))
        random.random(), np.random.rand()
        for i in range(STEPS):
            idx = order[i * BATCH:(i + 1) * BATCH]
            x, y = x_all[idx], y_all[idx]
            delta = (torch.rand_like(x) * 2 - 1) * eps
            delta.requires_grad_(True)
            loss = F.cross_entropy(model(x + delta), y)
            grad, = torch.autograd.grad(loss, delta)
            delta = (delta + 1.25 * eps * grad.sign()).clamp(-eps, eps).detach()
            out = model(x + delta)
            loss = F.cross_entropy(out, y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if monitor is not None:
                monitor.observe(x, y, delta=delta, loss=loss, logits=out)
        if monitor is not None:
            reports.append(monitor.epoch_end(epoch))
    return reports


def fresh(seed=0):
    torch.manual_seed(seed)
    model = Net()
    return model, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)


def make_monitor(model, data, tmp_path, name="m", **kw):
    options = dict(epsilon=EPS, probe=(data.test_x, data.test_y), normalize=(MEAN, STD), runs_dir=tmp_path,
                   name=name, probe_size=40, eval_pgd_steps=2, steps_per_epoch=STEPS, progress=False,
                   diagnostics=["default", "snapshots:k=4"], method="rs-fgsm")
    options.update(kw)
    return robustdrop.Monitor(model, **options)


def without_time(df: pd.DataFrame) -> pd.DataFrame:
    df = df[~df["metric"].str.startswith("time")]
    return df.sort_values(["epoch", "split", "source", "metric", "attack"]).reset_index(drop=True)


# ----------------------------------------------------------------------------------------------
# The user's training stays exactly as it was
# ----------------------------------------------------------------------------------------------
def test_a_monitored_loop_trains_bit_identical_weights(synthetic_data, tmp_path, one_thread):
    model, opt = fresh()
    random.seed(1), np.random.seed(1)
    fgsm_loop(model, opt, synthetic_data, 3)
    plain = (model.state_dict(), opt.state_dict(), torch.get_rng_state(), np.random.rand(), random.random())

    model, opt = fresh()
    random.seed(1), np.random.seed(1)
    monitor = make_monitor(model, synthetic_data, tmp_path, reference="builtin:quick",
                           diagnostics=["all", "landscape:n=16,points=5,grid=3"])
    reports = fgsm_loop(model, opt, synthetic_data, 3, monitor)
    monitor.close()
    watched = (model.state_dict(), opt.state_dict(), torch.get_rng_state(), np.random.rand(), random.random())

    for key, value in plain[0].items():  # weights and BatchNorm running statistics
        assert torch.equal(value, watched[0][key]), key
    for a, b in zip(plain[1]["state"].values(), watched[1]["state"].values()):  # momentum buffers
        assert torch.equal(a["momentum_buffer"], b["momentum_buffer"])
    assert torch.equal(plain[2], watched[2]) and plain[3:] == watched[3:]
    assert [r.epoch for r in reports] == [1, 2, 3]
    assert model.training  # the mode the loop left it in


def test_epoch_end_leaves_mode_gradients_and_buffers_as_they_were(synthetic_data, tmp_path, one_thread):
    model, opt = fresh()
    monitor = make_monitor(model, synthetic_data, tmp_path)
    fgsm_loop(model, opt, synthetic_data, 1)
    model.bn.eval()  # a mixed mode, as a loop with frozen BatchNorm has
    grads = [p.grad for p in model.parameters()]
    values = [g.clone() for g in grads]
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    monitor.epoch_end(1)
    assert model.training and not model.bn.training and model.conv.training
    assert all(p.grad is g and torch.equal(g, v) for p, g, v in zip(model.parameters(), grads, values))
    assert all(torch.equal(v, dict(model.named_buffers())[k]) for k, v in buffers.items())
    monitor.close()


# ----------------------------------------------------------------------------------------------
# An ordinary run directory
# ----------------------------------------------------------------------------------------------
def test_the_run_directory_is_ordinary_and_the_commands_read_it(synthetic_data, tmp_path, one_thread, capsys):
    model, opt = fresh()
    called = []
    monitor = make_monitor(model, synthetic_data, tmp_path, epochs=3, reference="builtin:quick",
                           diagnostics=["all", "snapshots:k=4", "landscape:n=16,points=5,grid=3"],
                           callback=called.append)
    reports = fgsm_loop(model, opt, synthetic_data, 3, monitor)
    monitor.close()
    assert called == reports and reports[-1].values["probe/acc/pgd"] == reports[-1].pgd_acc
    path = tmp_path / "m"
    config = robustdrop.TrackConfig.from_dict(RunStore(path).read_json(RunStore.CONFIG))
    assert config.epsilon == EPS and config.method == "rs-fgsm" and config.model == "Net" and config.epochs == 3
    manifest = RunStore(path).read_json(RunStore.MANIFEST)
    assert manifest["monitor"]["normalize"][1] == pytest.approx(STD.tolist())
    df = RunStore.open(path).metrics()
    probe = df[(df.split == "probe") & (df.source == "eval") & (df.metric == "acc")]
    assert sorted(probe.attack.unique()) == ["fgsm", "none", "pgd"] and sorted(probe.epoch.unique()) == [1, 2, 3]
    assert set(probe.n) == {40} and (probe[probe.attack == "fgsm"].epsilon == EPS).all()  # ε in pixels
    sources = set(df.source)
    assert {"strength", "strength-ref", "snapshots", "collapse", "landscape", "train"} <= sources
    train = df[(df.split == "train") & (df.attack == "train-perturbation")]
    assert set(train.metric) >= {"delta_abs_mean", "delta_frac_at_eps"}
    # the training perturbation in pixels: |δ| <= ε (it was given in normalized units)
    assert train[train.metric == "delta_abs_mean"].value.max() <= EPS + 1e-6
    assert train[train.metric == "delta_frac_at_eps"].value.min() > 0.5
    assert len(df[(df.metric == "acc") & (df.split == "train")]) == 3
    assert main(["compare", str(path)]) == 0
    assert "m" in capsys.readouterr().out
    for figure in ("collapse", "landscape"):  # (the snapshots are track's own: see the equivalence test)
        assert main(["plot", figure, str(path), "--out", str(tmp_path / "figs")]) == 0, figure
    assert len(list((tmp_path / "figs").glob("*.png"))) == 2


# ----------------------------------------------------------------------------------------------
# Resume through the user's own checkpoint
# ----------------------------------------------------------------------------------------------
def test_model_names_the_architecture_in_the_config(synthetic_data, tmp_path):
    # the model is positional-only, so model= is the label config.json keeps (default: the class name)
    model, _ = fresh()
    monitor = robustdrop.Monitor(model, epsilon=EPS, probe=(synthetic_data.test_x, synthetic_data.test_y),
                                 runs_dir=tmp_path, name="m", probe_size=40, progress=False, model="preact-resnet18-mine")
    assert monitor.config.model == "preact-resnet18-mine" and monitor.model is model
    assert not (tmp_path / "m").exists()  # nothing written before the first epoch


def test_a_resumed_monitor_appends_without_duplicated_or_missing_epochs(synthetic_data, tmp_path, one_thread):
    model, opt = fresh()
    monitor = make_monitor(model, synthetic_data, tmp_path, name="straight", epochs=3)
    fgsm_loop(model, opt, synthetic_data, 3, monitor)
    monitor.close()

    model, opt = fresh()
    monitor = make_monitor(model, synthetic_data, tmp_path, name="resumed", epochs=3)
    fgsm_loop(model, opt, synthetic_data, 1, monitor)
    checkpoint = {"model": model.state_dict(), "opt": opt.state_dict(), "rng": torch.get_rng_state(),
                  "monitor": monitor.state_dict()}
    torch.save(checkpoint, tmp_path / "ckpt.pt")
    fgsm_loop(model, opt, synthetic_data, 1, monitor, first=2)  # epoch 2 is recorded, then the process stops
    monitor.close()

    checkpoint = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    model, opt = fresh(seed=5)
    model.load_state_dict(checkpoint["model"]), opt.load_state_dict(checkpoint["opt"])
    torch.set_rng_state(checkpoint["rng"])
    monitor = make_monitor(model, synthetic_data, tmp_path, name="resumed", epochs=3)
    monitor.load_state_dict(checkpoint["monitor"])
    reports = fgsm_loop(model, opt, synthetic_data, 2, monitor, first=2)
    monitor.close()

    straight, resumed = RunStore.open(tmp_path / "straight"), RunStore.open(tmp_path / "resumed")
    pd.testing.assert_frame_equal(without_time(straight.metrics()), without_time(resumed.metrics()))
    kinds = [e["kind"] for e in resumed.events()]
    assert kinds.count("resume") == 1
    assert [k for k in kinds if k != "resume"] == [e["kind"] for e in straight.events()]
    assert [r.epoch for r in reports] == [2, 3]


# ----------------------------------------------------------------------------------------------
# Replay over saved weights
# ----------------------------------------------------------------------------------------------
def test_replaying_saved_weights_logs_the_live_numbers(synthetic_data, tmp_path, one_thread):
    model, opt = fresh()
    monitor = make_monitor(model, synthetic_data, tmp_path, name="live", epochs=2)
    saved = []
    for epoch in (1, 2):
        fgsm_loop(model, opt, synthetic_data, 1, first=epoch)
        monitor.epoch_end(epoch)
        saved.append((epoch, {k: v.clone() for k, v in model.state_dict().items()}))
    monitor.close()

    other, _ = fresh(seed=3)
    replayed = make_monitor(other, synthetic_data, tmp_path, name="replayed", epochs=2)
    reports = replayed.replay(iter(saved))
    replayed.close()
    assert [r.epoch for r in reports] == [1, 2]
    live, again = RunStore.open(tmp_path / "live").metrics(), RunStore.open(tmp_path / "replayed").metrics()
    pd.testing.assert_frame_equal(without_time(live), without_time(again))

    late = make_monitor(fresh()[0], synthetic_data, tmp_path, name="bad", epochs=2)
    with pytest.raises(RobustdropError, match="does not fit the model.*fc.weight"):
        late.replay([(1, {**saved[0][1], "fc.weight": torch.zeros(3, 3)})])
    with pytest.raises(RobustdropError, match="increasing order"):
        late.replay([(2, saved[1][1]), (1, saved[0][1])])


# ----------------------------------------------------------------------------------------------
# The probe: a Dataset, a DataLoader or tensors, uint8 or float; track's subset of a larger set
# ----------------------------------------------------------------------------------------------
class Images(torch.utils.data.Dataset):
    """A torchvision-style dataset: float (C, H, W) images in [0, 1], ``targets``, ``classes``."""

    def __init__(self, data, with_targets=True):
        self.x, self.y, self.classes = data.test_x, data.test_y, data.classes
        if with_targets:
            self.targets = self.y.tolist()
        self.read = 0

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        self.read += 1
        return self.x[i].float() / 255, int(self.y[i])


def test_every_kind_of_probe_gives_tracks_probe_subset(synthetic_data, tmp_path):
    from robustdrop.data import probe_indices

    keep = probe_indices(synthetic_data.test_y, 40, 0)
    expected = (synthetic_data.test_x[keep], synthetic_data.test_y[keep])
    dataset = Images(synthetic_data)
    probes = {
        "uint8 tensors": (synthetic_data.test_x, synthetic_data.test_y),
        "float tensors": (synthetic_data.test_x.float() / 255, synthetic_data.test_y),
        "dataset with targets": dataset,
        "dataset": Images(synthetic_data, with_targets=False),
        "loader": torch.utils.data.DataLoader(Images(synthetic_data), batch_size=50),
    }
    for kind, probe in probes.items():
        monitor = make_monitor(fresh()[0], synthetic_data, tmp_path, probe=probe)
        images, labels = monitor.run.probe
        assert torch.equal(images, expected[0]) and torch.equal(labels, expected[1]), kind
    assert dataset.read == 40  # only the chosen items were read
    assert monitor.run.data.classes == synthetic_data.classes
    assert not tmp_path.joinpath("m").exists()  # nothing is written before the first epoch


# ----------------------------------------------------------------------------------------------
# Bad input: one line, nothing written
# ----------------------------------------------------------------------------------------------
class Pair(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3 * 32 * 32, 10)

    def forward(self, x):
        return self.fc(x.flatten(1)), x


@pytest.mark.parametrize("change, message", [
    (dict(epsilon=0.0), "epsilon must be a finite number in \\(0, 1\\]"),
    (dict(epsilon=float("nan")), "epsilon must be a finite number"),
    (dict(epsilon=8.0), "pixel units"),
    (dict(reference="no/such/run"), "reference"),
    (dict(reference="builtin:nope"), "nope"),
    (dict(normalized_probe=True), "look normalized already.*normalize=\\(mean, std\\)"),
    (dict(probe_dtype=torch.int32), "uint8 or float in \\[0, 1\\]"),
    (dict(model=Pair()), "logits of shape \\(N, classes\\)"),
    (dict(model=nn.Sequential(nn.Flatten(), nn.Linear(3072, 10), nn.Flatten(0))), "got \\(20,\\) for N=2"),
    (dict(model=nn.Sequential(nn.Flatten(), nn.Linear(3072, 3))), "outputs 3 classes"),
    (dict(normalize=((0.5, 0.5), (0.2, 0.2))), "3 channels"),
    (dict(on_collapse="rollback"), "cannot roll back"),
    (dict(diagnostics=["nope"]), "unknown diagnostic"),
])
def test_bad_input_is_one_line_before_anything_is_written(change, message, synthetic_data, tmp_path):
    images = synthetic_data.test_x
    if change.pop("normalized_probe", False):
        images = (images.float() / 255 - 0.5) / 0.25
    if "probe_dtype" in change:
        images = images.to(change.pop("probe_dtype"))
    model = change.pop("model", None) or fresh()[0]
    with pytest.raises(RobustdropError, match=message) as err:
        make_monitor(model, synthetic_data, tmp_path / "runs", probe=(images, synthetic_data.test_y), **change)
    assert len(str(err.value).splitlines()) == 1
    assert not (tmp_path / "runs").exists()


def test_an_existing_run_directory_is_refused_unless_continued(synthetic_data, tmp_path, one_thread):
    model, _ = fresh()
    monitor = make_monitor(model, synthetic_data, tmp_path)
    monitor.epoch_end(1)
    state = monitor.state_dict()
    monitor.close()
    before = RunStore.open(tmp_path / "m").metrics()
    again = make_monitor(model, synthetic_data, tmp_path)  # a resuming script makes it before reading its state
    with pytest.raises(RobustdropError, match="already exists; continue it with monitor.load_state_dict"):
        again.epoch_end(1)
    pd.testing.assert_frame_equal(RunStore.open(tmp_path / "m").metrics(), before)
    again = make_monitor(model, synthetic_data, tmp_path)
    again.load_state_dict(state)
    with pytest.raises(RobustdropError, match="epoch 1 is already recorded"):
        again.epoch_end(1)
    again.close()


# ----------------------------------------------------------------------------------------------
# The same numbers as `robustdrop track` (issue 19, item 2)
# ----------------------------------------------------------------------------------------------
def quick_loop(cfg, data, monitor):
    """What `robustdrop track --preset quick` does, as a plain loop: the trainer's seeding, training
    subset, data order (TrainLoader and its seeded generator), model, Adam with the cyclic LR, and
    FGSM written inline (batch-norm in train mode while crafting, as --attack-bn train)."""
    from robustdrop.data import TrainLoader, split_validation
    from robustdrop.models import create_model
    from robustdrop.schedules import Schedule

    random.seed(cfg.seed), np.random.seed(cfg.seed), torch.manual_seed(cfg.seed)
    train_idx, _ = split_validation(len(data.train_y), cfg.val_size, cfg.seed)
    pick = torch.randperm(len(train_idx), generator=torch.Generator().manual_seed(cfg.seed))
    train_idx = train_idx[pick[: cfg.train_subset].sort().values]
    loader = TrainLoader(data.train_x[train_idx], data.train_y[train_idx], cfg.batch_size, device="cpu")
    generator = torch.Generator().manual_seed(cfg.seed)
    model = create_model(cfg.model, num_classes=10, in_channels=3, image_size=32, width=cfg.width)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    schedule = Schedule.from_config(cfg, cfg.lr, len(loader) * cfg.epochs, len(loader))
    watch = monitor(model, len(loader))
    for epoch in range(1, cfg.epochs + 1):
        model.train()
        for batch in loader.epoch(generator):
            schedule.apply(optimizer)
            x, y = batch.x, batch.y
            x_ = x.detach().requires_grad_(True)
            grad, = torch.autograd.grad(F.cross_entropy(model(x_).float(), y, reduction="sum"), x_)
            delta = ((x + (cfg.epsilon * grad.sign()).clamp(-cfg.epsilon, cfg.epsilon)).clamp(0, 1) - x).detach()
            logits = model(x + delta)
            loss = F.cross_entropy(logits.float(), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            watch.observe(x, y, delta=delta, loss=loss.detach(), logits=logits.detach())
        watch.epoch_end(epoch)
    watch.close()
    return watch


def test_a_monitored_plain_loop_logs_what_track_logs(tmp_path, one_thread):
    from robustdrop.api import track
    from robustdrop.data import make_synthetic

    synthetic_data = make_synthetic(n_train=288, n_test=80, num_classes=10, size=32, channels=3, seed=0)
    cfg = robustdrop.make_config("quick", epochs=3, train_subset=256, val_size=32, probe_size=60, threads=1,
                                 device="cpu")
    store = track(cfg, runs_dir=tmp_path, name="track", data=synthetic_data, progress=False)
    monitor = quick_loop(cfg, synthetic_data, lambda model, steps: robustdrop.Monitor(
        model, epsilon=cfg.epsilon, probe=(synthetic_data.test_x, synthetic_data.test_y), reference=cfg.reference,
        runs_dir=tmp_path, name="monitored", steps_per_epoch=steps, method="fgsm", epochs=cfg.epochs,
        classes=synthetic_data.classes,
        probe_size=cfg.probe_size, seed=cfg.seed, eval_pgd_step_size=cfg.eval_pgd_step_size, progress=False))

    def comparable(df):  # what both record: the probe's evaluation, every diagnostic, training loss / accuracy
        keep = (df.split == "probe") | (df.attack == "train-perturbation") | df.metric.isin(["loss", "acc"])
        return without_time(df[keep & (df.split != "val") & (df.split != "test")])

    tracked, monitored = comparable(store.metrics()), comparable(RunStore.open(monitor.path).metrics())
    assert set(tracked.source) == {"eval", "train", "strength", "strength-ref", "snapshots", "collapse"}
    assert len(tracked) > 60 and sorted(tracked.epoch.unique()) == [1, 2, 3]
    pd.testing.assert_frame_equal(tracked, monitored, check_exact=True)
    kinds = ("reference", "collapse_warning", "collapse_onset")
    assert [e for e in store.events() if e["kind"] in kinds] == \
        [e for e in RunStore.open(monitor.path).events() if e["kind"] in kinds]
    for epoch in (1, 3):  # the snapshots (Fig. 1) too
        a, b = store.load_arrays("snapshots", f"epoch_{epoch:04d}"), monitor.store.load_arrays(
            "snapshots", f"epoch_{epoch:04d}")
        assert all(np.array_equal(a[k], b[k]) for k in a)
