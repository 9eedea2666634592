"""What the Monitor costs per epoch on a user's loop, against the same diagnostics inside ``track``.

Both sides train the quick preset's setting (cnn1 width 4, ε = 10/255, Adam, cyclic LR, FGSM) on a
seeded subset of the embedded CIFAR-10 JPEG copy, with the default diagnostics and the shipped
referee (``builtin:quick``) on the same 1000-image probe, at the default cadence (everything every
epoch; the referee's PGD ceiling every 5):

* ``track``: ``time_eval_s`` + ``time_diag_s`` of each epoch (the evaluation and the hooks);
* ``monitor``: a plain loop (the FGSM step of ``robustdrop.methods``) with ``Monitor.observe``
  after every step and ``Monitor.epoch_end`` after every epoch: the wall seconds of
  ``epoch_end`` and of all ``observe`` calls of the epoch (timed around the calls).

The ratio to one training epoch uses the quick setting's full epoch (49000 examples, 383 steps
of 128) at the seconds per step ``track`` measured here (``time_train_s`` / steps). The first
epoch (warm-up) and the last (``track`` also evaluates the test set there) are left out of the
means, so use at least 3 epochs. On a shared CPU, ``--threads 1`` gives the steadiest numbers::

    python benchmarks/bench_monitor.py --threads 1                 # 5000 training examples, 4 epochs
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import tempfile
import time

import torch
from bench_diagnostics import subset  # the same seeded subsets (this script's folder is on sys.path)

from robustdrop import Monitor, make_config
from robustdrop.api import track
from robustdrop.data import ImageData, TrainLoader, load_dataset
from robustdrop.environment import device_name, versions
from robustdrop.methods import create_method
from robustdrop.models import create_model
from robustdrop.schedules import Schedule

QUICK_TRAIN = 49000  # the quick preset's training examples (50000 - the 1000 validation images)


def tracked(cfg, data: ImageData, runs: str) -> dict[str, list[float]]:
    """Per-epoch seconds of ``track``: train, eval + diagnostics, and the steps of an epoch."""
    store = track(cfg, runs_dir=runs, name="track", data=data, progress=False)
    df = store.metrics()
    rows = df[df.split == "train"].pivot_table(index="epoch", columns="metric", values="value")
    steps = math.ceil((len(data.train_y) - cfg.val_size) / cfg.batch_size)
    return {"train_step": list(rows["time_train_s"] / steps),
            "observer": list(rows["time_eval_s"] + rows["time_diag_s"])}


def monitored(cfg, data: ImageData, runs: str) -> dict[str, list[float]]:
    """Per-epoch seconds of the Monitor on a plain loop: epoch_end, and all observe calls."""
    torch.manual_seed(cfg.seed)
    model = create_model(cfg.model, num_classes=10, in_channels=3, image_size=32, width=cfg.width)
    loader = TrainLoader(data.train_x[cfg.val_size:], data.train_y[cfg.val_size:], cfg.batch_size, device="cpu")
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    schedule = Schedule.from_config(cfg, cfg.lr, len(loader) * cfg.epochs, len(loader))
    method = create_method(cfg)
    monitor = Monitor(model, epsilon=cfg.epsilon, probe=(data.test_x, data.test_y), reference=cfg.reference,
                      runs_dir=runs, name="monitor", steps_per_epoch=len(loader), method=cfg.method,
                      epochs=cfg.epochs, probe_size=cfg.probe_size, eval_pgd_step_size=cfg.eval_pgd_step_size,
                      progress=False)
    generator = torch.Generator().manual_seed(cfg.seed)
    out: dict[str, list[float]] = {"epoch_end": [], "observe": []}
    for epoch in range(1, cfg.epochs + 1):
        model.train()
        observe = 0.0
        for batch in loader.epoch(generator):
            schedule.apply(optimizer)
            step = method.train_step(model, batch, optimizer)
            schedule.step()
            start = time.perf_counter()
            monitor.observe(batch.x, batch.y, delta=step.delta, loss=step.loss, logits=step.logits)
            observe += time.perf_counter() - start
        start = time.perf_counter()
        monitor.epoch_end(epoch)
        out["epoch_end"].append(time.perf_counter() - start)
        out["observe"].append(observe)
    monitor.close()
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--train", type=int, default=5000, help="training examples (seeded subset, incl. validation)")
    p.add_argument("--test", type=int, default=2000, help="test examples (the probe is drawn from them)")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.epochs < 3:
        p.error("--epochs must be at least 3 (the first and last epochs are left out)")
    if args.threads:
        torch.set_num_threads(args.threads)
    data = subset(load_dataset("cifar10-jpeg"), args.train, args.test, args.seed)
    cfg = make_config("quick", epochs=args.epochs, val_size=1000, test_every=0, device="cpu", seed=args.seed,
                      threads=args.threads)
    with tempfile.TemporaryDirectory() as runs:
        t = tracked(cfg, data, runs)
        m = monitored(cfg, data, runs)
    mid = slice(1, args.epochs - 1)
    inside = statistics.mean(t["observer"][mid])
    end, obs = statistics.mean(m["epoch_end"][mid]), statistics.mean(m["observe"][mid])
    epoch_s = statistics.median(t["train_step"][mid]) * math.ceil(QUICK_TRAIN / cfg.batch_size)
    print(f"# bench_monitor: {versions()} on {device_name('cpu')}, {torch.get_num_threads()} thread(s); "
          f"{' '.join(sys.argv[1:]) or 'defaults'}")
    print(f"# quick setting, probe {cfg.probe_size}, default diagnostics + builtin:quick referee; means over epochs "
          f"2..{args.epochs - 1} (of {args.epochs}); {len(data.train_y) - cfg.val_size} training examples")
    print(f"{'':36}{'s/epoch':>10}")
    print(f"{'track: evaluation + diagnostics':36}{inside:>10.2f}")
    print(f"{'monitor: epoch_end':36}{end:>10.2f}")
    print(f"{'monitor: observe (all steps)':36}{obs:>10.2f}")
    print(f"{'monitor / track':36}{(end + obs) / inside:>10.2f}")
    print(f"{'quick training epoch (383 steps)':36}{epoch_s:>10.2f}")
    print(f"{'monitor / quick training epoch':36}{(end + obs) / epoch_s:>10.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
