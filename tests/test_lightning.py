"""robustdrop.lightning.RobustdropCallback with a real lightning.Trainer on the CPU (tiny model, tiny data)."""

from __future__ import annotations

import warnings

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from torch import nn

L = pytest.importorskip("lightning")

from robustdrop.data import make_synthetic  # noqa: E402
from robustdrop.errors import RobustdropError  # noqa: E402
from robustdrop.lightning import RobustdropCallback  # noqa: E402
from robustdrop.store import RunStore  # noqa: E402

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")]
EPS = 8 / 255
MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


@pytest.fixture(scope="module")
def data():
    return make_synthetic(n_train=96, n_test=64, num_classes=4, size=8, seed=0)


class Tiny(L.LightningModule):
    """FGSM training of a linear model on normalized inputs; returns delta for the callback."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 4))
        self.register_buffer("mean", torch.tensor(MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        xb, y = batch
        x = (xb.float() / 255 - self.mean) / self.std
        delta = torch.zeros_like(x, requires_grad=True)
        grad, = torch.autograd.grad(F.cross_entropy(self.net(x + delta), y), delta)
        delta = (EPS / self.std * grad.sign()).detach()
        logits = self.net(x + delta)
        loss = F.cross_entropy(logits, y)
        return {"loss": loss, "delta": delta, "x": x, "y": y, "logits": logits.detach()}

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _callback(data, tmp_path, **kw):
    return RobustdropCallback(epsilon=EPS, probe=(data.test_x, data.test_y), normalize=(MEAN, STD),
                              runs_dir=tmp_path / "runs", name="tiny", progress=False, probe_size=32,
                              eval_pgd_steps=2, **kw)


def _fit(data, tmp_path, callback, epochs, ckpt_path=None):
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(data.train_x, data.train_y), batch_size=32)
    checkpoints = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpts", save_top_k=-1, every_n_epochs=1)
    trainer = L.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, callbacks=[callback, checkpoints],
                        logger=L.pytorch.loggers.CSVLogger(tmp_path / "logs", name="tiny"), enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=True)
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(Tiny(), loader, ckpt_path=ckpt_path)
    return trainer


def _probe_pgd(run):
    m = RunStore.open(run).metrics()
    return m[(m.split == "probe") & (m.metric == "acc") & (m.attack == "pgd") & (m.source == "eval")]


def test_the_callback_monitors_a_lightning_training(data, tmp_path):
    callback = _callback(data, tmp_path, model="net")
    trainer = _fit(data, tmp_path, callback, epochs=2)
    run = tmp_path / "runs" / "tiny"
    assert sorted(_probe_pgd(run).epoch) == [1, 2]
    m = RunStore.open(run).metrics()
    assert ((m.split == "train") & (m.attack == "train-perturbation")).any()  # the step's delta reached it
    assert set(m[(m.split == "train") & (m.metric == "acc")].epoch) == {1, 2}  # from the returned logits
    # ... and Lightning's logger has the same epoch values
    logged = pd.read_csv(f"{trainer.logger.log_dir}/metrics.csv")
    column = logged["robustdrop/probe/acc/pgd"].dropna().tolist()
    assert column == pytest.approx(_probe_pgd(run).sort_values("epoch").value.tolist())
    assert "robustdrop/collapse" in logged
    # ... and every Lightning checkpoint holds the monitor's state
    state = torch.load(tmp_path / "ckpts" / "epoch=1-step=6.ckpt", weights_only=True)
    assert state["callbacks"][callback.state_key]["epoch"] == 2


def test_a_resumed_lightning_training_continues_the_run(data, tmp_path):
    _fit(data, tmp_path, _callback(data, tmp_path), epochs=2)
    _fit(data, tmp_path, _callback(data, tmp_path), epochs=3, ckpt_path=tmp_path / "ckpts" / "epoch=1-step=6.ckpt")
    assert sorted(_probe_pgd(tmp_path / "runs" / "tiny").epoch) == [1, 2, 3]  # none twice, none missing


def test_a_checkpoint_taken_before_the_epoch_end_is_caught_up(data, tmp_path):
    """ModelCheckpoint on a validation metric saves before on_train_epoch_end: the state is one epoch behind."""
    first = _callback(data, tmp_path)
    _fit(data, tmp_path, first, epochs=1)
    behind = first.monitor.state_dict()  # after epoch 1 ...
    _fit(data, tmp_path / "b", _callback(data, tmp_path / "b"), epochs=2)  # (a checkpoint of epoch 2, no run here)
    ckpt = torch.load(tmp_path / "b" / "ckpts" / "epoch=1-step=6.ckpt", weights_only=True)
    key = next(iter(ckpt["callbacks"]))
    ckpt["callbacks"] = {k: v for k, v in ckpt["callbacks"].items() if k != key}
    ckpt["callbacks"][first.state_key] = behind  # ... in a checkpoint of epoch 2
    torch.save(ckpt, tmp_path / "behind.ckpt")
    _fit(data, tmp_path, _callback(data, tmp_path), epochs=3, ckpt_path=tmp_path / "behind.ckpt")
    assert sorted(_probe_pgd(tmp_path / "runs" / "tiny").epoch) == [1, 2, 3]


def test_a_missing_submodule_is_a_one_line_error(data, tmp_path):
    with pytest.raises(RobustdropError, match="no submodule 'backbone'"):
        _fit(data, tmp_path, _callback(data, tmp_path, model="backbone"), epochs=1)
    assert not (tmp_path / "runs" / "tiny").exists()
