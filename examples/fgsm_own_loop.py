"""Your own FGSM training loop, watched by robustdrop's Monitor: it collapses in a few CPU minutes.

A plain PyTorch loop in the style of the field's reference scripts (Wong et al. 2020,
fast_adversarial): the CIFAR-10 mean / std normalization lives in the data pipeline, so the model
sees normalized inputs and ε is per channel, ``(10/255) / std``; FGSM is written inline; the LR
follows a cyclic schedule. The setting is robustdrop's ``quick`` preset (docs/quick-preset.md): a
one-layer CNN with 4 filters, ε = 10/255, FGSM from zero with step ε, Adam with a cyclic LR to
0.003 peaking at 2/5 of the run (15 epochs by default; the preset trains 30), weight decay 5e-4, crop + flip, batch 128, on the embedded
JPEG copy of CIFAR-10. Measured at seed 0 (probe of 1000 test images, PGD-20 at 10/255), 15 epochs:
PGD accuracy rises to 0.123 (epoch 3) and collapses to 0.018 at epoch 5 (onset; 0.000 from epoch 6)
while FGSM accuracy climbs to 0.92; with --epochs 30: PGD accuracy rises to 0.132 (epoch 3), falls to
0.070 (epoch 7) and collapses to 0.001 at epoch 8,
where the detector sets the onset, while FGSM accuracy climbs to 1.000 (above the clean 0.14-0.22):
catastrophic overfitting. (Earlier than robustdrop's pixel-space quick preset, epoch 15-18: the
model here sees normalized inputs, which changes the optimization; not investigated further.)

The three lines that involve robustdrop are marked ``# robustdrop``; the rest is your training.
Every epoch's weights are saved to ``--checkpoints`` (``epoch_XX.pt``), so the same training can
also be diagnosed after the fact (examples/diagnose_checkpoints.py).

    python examples/fgsm_own_loop.py                      # 15 epochs, ~2.5 min on 2 cores
    python examples/fgsm_own_loop.py --epochs 2 --train-subset 2000 --probe-size 200   # seconds
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2471, 0.2435, 0.2616)


class Net(nn.Module):
    """conv3x3(width) -> ReLU -> linear, on normalized inputs (Andriushchenko & Flammarion 2020, Fig. 11)."""

    def __init__(self, num_classes: int = 10, width: int = 4, image_size: int = 32):
        super().__init__()
        self.conv = nn.Conv2d(3, width, 3, padding=1)
        self.linear = nn.Linear(width * image_size * image_size, num_classes)
        for layer in (self.conv, self.linear):
            nn.init.kaiming_normal_(layer.weight, nonlinearity="relu")
            nn.init.zeros_(layer.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(F.relu(self.conv(x)).flatten(1))


def crop_flip(x: torch.Tensor, pad: int = 4) -> torch.Tensor:
    """Random crop (zero padding ``pad``) and horizontal flip of a float batch ``(B, C, H, W)``."""
    b, c, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad))
    rows = torch.randint(0, 2 * pad + 1, (b, 1)) + torch.arange(h)
    cols = torch.randint(0, 2 * pad + 1, (b, 1)) + torch.arange(w)
    cols = torch.where(torch.rand(b, 1) < 0.5, cols.flip(1), cols)
    return padded[torch.arange(b)[:, None, None, None], torch.arange(c)[None, :, None, None],
                  rows[:, None, :, None], cols[:, None, None, :]]


def parse_args(description: str, name: str, checkpoints_help: str) -> argparse.Namespace:
    """The command line of this example and of fgsm_lightning.py (run ``name``, checkpoints in ckpts/``name``)."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--epochs", type=int, default=15)  # collapses at epoch 5 of 15 (seed 0)
    p.add_argument("--train-subset", type=int, default=0, help="train on the first N images (0 = all 50,000)")
    p.add_argument("--probe-size", type=int, default=1000, help="test images the monitor evaluates every epoch")
    p.add_argument("--checkpoints", default=f"ckpts/{name}", help=checkpoints_help)
    p.add_argument("--runs-dir", default="runs")
    p.add_argument("--name", default=name)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    return p.parse_args()


def train_loader(train_subset: int = 0) -> torch.utils.data.DataLoader:
    """Shuffled batches of 128 uint8 ``(B, 3, 32, 32)`` CIFAR-10 images (the embedded copy) and labels;
    ``train_subset``: the first N training images only (0: all)."""
    from robustdrop.data import load_dataset

    data = load_dataset("cifar10-jpeg")
    train_x, train_y = data.train_x, data.train_y
    if train_subset:
        train_x, train_y = train_x[:train_subset], train_y[:train_subset]
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(train_x, train_y), batch_size=128,
                                       shuffle=True, drop_last=True)


def main() -> None:
    args = parse_args(__doc__.splitlines()[0], "fgsm-own-loop", "folder of the per-epoch weights")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    import robustdrop  # robustdrop

    loader = train_loader(args.train_subset)
    mean = torch.tensor(CIFAR_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR_STD).view(1, 3, 1, 1)
    epsilon = (10 / 255) / std  # per channel, in normalized units
    lower, upper = (0 - mean) / std, (1 - mean) / std  # the pixel range [0, 1], normalized

    model = Net()
    opt = torch.optim.Adam(model.parameters(), lr=0.003, weight_decay=5e-4)
    total = args.epochs * len(loader)
    up = max(1, int(0.4 * total))
    scheduler = torch.optim.lr_scheduler.CyclicLR(opt, base_lr=0.0, max_lr=0.003, step_size_up=up,
                                                  step_size_down=max(1, total - up), cycle_momentum=False)
    monitor = robustdrop.Monitor(  # robustdrop
        model, epsilon=10 / 255, probe="cifar10-jpeg", probe_size=args.probe_size, epochs=args.epochs,
        steps_per_epoch=len(loader), method="fgsm",
        normalize=(CIFAR_MEAN, CIFAR_STD), reference="builtin:quick", runs_dir=args.runs_dir, name=args.name)
    ckpt_dir = Path(args.checkpoints)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    start = time.time()
    for epoch in range(1, args.epochs + 1):
        model.train()
        for xb, yb in loader:
            x = (crop_flip(xb.float() / 255) - mean) / std
            # FGSM from zero, step ε, kept inside the image's pixel range
            delta = torch.zeros_like(x, requires_grad=True)
            F.cross_entropy(model(x + delta), yb).backward()
            delta = (epsilon * delta.grad.sign()).clamp(lower - x, upper - x).detach()
            loss = F.cross_entropy(model(x + delta), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
            scheduler.step()
            monitor.observe(x, yb, delta=delta)  # robustdrop: the training perturbation (optional)
        report = monitor.epoch_end(epoch)  # robustdrop: probe evaluation, diagnostics, collapse detector (prints a line)
        torch.save({"model": model.state_dict(), "epoch": epoch}, ckpt_dir / f"epoch_{epoch:02d}.pt")
        if report.collapse and epoch == report.onset_epoch:  # your decision: stop, roll back, switch; here: go on
            print(f"robustdrop: collapse detected (onset epoch {report.onset_epoch}); training continues", flush=True)
    monitor.close()
    run = Path(args.runs_dir) / args.name
    print(f"\n{time.time() - start:.0f}s; run directory: {run}; checkpoints: {ckpt_dir}/epoch_*.pt")
    print(f"draw the figure:  robustdrop plot collapse {run}")


if __name__ == "__main__":
    main()
