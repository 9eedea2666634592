"""The same FGSM training as a PyTorch Lightning module, watched by robustdrop's Lightning callback.

The model, data, FGSM step and schedule are examples/fgsm_own_loop.py's (robustdrop's ``quick``
setting written as the field's reference scripts write it: normalized inputs, per-channel ε, a
cyclic LR). What Lightning adds: ``training_step`` returns ``{"loss", "delta", "x", "y"}`` so the
callback sees the training perturbation (``x``: the augmented, normalized inputs the model saw
``delta`` added to), the callback logs the epoch's values to Lightning's logger (CSV here) and
keeps its state in Lightning's checkpoints (one per epoch, ``epoch=N-step=M.ckpt``), so
``trainer.fit(..., ckpt_path=...)`` resumes the same run directory. Needs ``robustdrop[lightning]``.

    python examples/fgsm_lightning.py                       # 15 epochs, ~2.5 min on 2 cores
    python examples/fgsm_lightning.py --epochs 2 --train-subset 2000 --probe-size 200   # seconds
"""

from __future__ import annotations

import time
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from fgsm_own_loop import CIFAR_MEAN, CIFAR_STD, Net, crop_flip, parse_args, train_loader  # the same model, data, flags


class FGSMModule(L.LightningModule):
    """FGSM adversarial training (zero init, step ε) of :class:`Net` on normalized inputs."""

    def __init__(self, epochs: int, steps_per_epoch: int, epsilon: float = 10 / 255, lr: float = 0.003):
        super().__init__()
        self.net = Net()
        self.epochs, self.steps_per_epoch, self.lr = epochs, steps_per_epoch, lr
        mean, std = torch.tensor(CIFAR_MEAN).view(1, 3, 1, 1), torch.tensor(CIFAR_STD).view(1, 3, 1, 1)
        self.register_buffer("mean", mean, persistent=False)
        self.register_buffer("std", std, persistent=False)
        self.epsilon = epsilon / std  # per channel, normalized units

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # normalized inputs -> logits
        return self.net(x)

    def training_step(self, batch, batch_idx):
        xb, yb = batch
        x = (crop_flip(xb.float() / 255) - self.mean) / self.std
        lower, upper = (0 - self.mean) / self.std, (1 - self.mean) / self.std
        with torch.enable_grad():
            delta = torch.zeros_like(x, requires_grad=True)
            grad, = torch.autograd.grad(F.cross_entropy(self.net(x + delta), yb), delta)
        delta = (self.epsilon.to(x) * grad.sign()).clamp(lower - x, upper - x).detach()
        logits = self.net(x + delta)
        loss = F.cross_entropy(logits, yb)
        self.log("train_loss", loss, on_step=False, on_epoch=True)
        return {"loss": loss, "delta": delta, "x": x, "y": yb, "logits": logits.detach()}  # for robustdrop

    def configure_optimizers(self):
        opt = torch.optim.Adam(self.parameters(), lr=self.lr, weight_decay=5e-4)
        total = self.epochs * self.steps_per_epoch
        up = max(1, int(0.4 * total))
        cyclic = torch.optim.lr_scheduler.CyclicLR(opt, base_lr=0.0, max_lr=self.lr, step_size_up=up,
                                                   step_size_down=max(1, total - up), cycle_momentum=False)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": cyclic, "interval": "step"}}


def main() -> None:
    args = parse_args(__doc__.splitlines()[0], "fgsm-lightning", "folder of Lightning's per-epoch checkpoints")
    torch.set_num_threads(args.threads)
    L.seed_everything(args.seed, verbose=False)

    from robustdrop.lightning import RobustdropCallback

    loader = train_loader(args.train_subset)
    monitor = RobustdropCallback(epsilon=10 / 255, probe="cifar10-jpeg", probe_size=args.probe_size,
                                 normalize=(CIFAR_MEAN, CIFAR_STD), reference="builtin:quick", runs_dir=args.runs_dir,
                                 name=args.name, model="net", method="fgsm")
    checkpoints = L.pytorch.callbacks.ModelCheckpoint(dirpath=args.checkpoints, save_top_k=-1, every_n_epochs=1)
    trainer = L.Trainer(max_epochs=args.epochs, accelerator="cpu", devices=1, callbacks=[monitor, checkpoints],
                        logger=L.pytorch.loggers.CSVLogger(args.runs_dir, name=f"{args.name}-lightning-logs"),
                        enable_progress_bar=False, enable_model_summary=False, deterministic=True)
    start = time.time()
    trainer.fit(FGSMModule(args.epochs, len(loader)), loader)
    run = Path(args.runs_dir) / args.name
    print(f"\n{time.time() - start:.0f}s; run directory: {run}; Lightning's log: {trainer.logger.log_dir}")
    print(f"draw the figure:  robustdrop plot collapse {run}")


if __name__ == "__main__":
    main()
