"""What the Monitor costs per epoch on a user's loop, against the same diagnostics inside ``track``.

Both sides train the quick preset's setting (cnn1 width 4, ε = 10/255, Adam, cyclic LR, FGSM) on a
seeded subset of the embedded CIFAR-10 JPEG copy, with the default diagnostics and the shipped
referee (``builtin:quick``) on the same 1000-image probe, at the default cadence (everything every
epoch; the referee's PGD ceiling every 5):

* ``track``: ``time_eval_s`` + ``time_diag_s`` of each epoch (the evaluation and the hooks), with
  no validation split (the quick preset's 1000 validation images add a clean + PGD-20 evaluation
  the monitor does not make);
* ``monitor``: a plain loop (the FGSM step of ``robustdrop.methods``) with ``Monitor.observe``
  after every step and ``Monitor.epoch_end`` after every epoch: its own ``time_eval_s`` +
  ``time_diag_s`` rows (the same parts as track's), and the wall seconds of the whole
  ``epoch_end`` (which also writes the run's files, as track does after its timed parts) and of
  all ``observe`` calls of the epoch (timed around the calls).

The ratio to one training epoch uses the quick setting's full epoch (49000 examples, 383 steps
of 128) at the seconds per step ``track`` measured here (``time_train_s`` / steps). The first
epoch (warm-up) and the last (``track`` also evaluates the test set there) are left out of the
means, so use at least 3 epochs. The pair runs ``--repeats`` times, alternating which side goes
first, and each number is the fastest repeat's (the least disturbed by other work on the machine).
On a shared CPU, ``--threads 1`` gives the steadiest numbers::

    python benchmarks/bench_monitor.py --threads 1          # 5000 training examples, 4 epochs, 2 repeats
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


def epoch_seconds(store) -> dict[str, list[float]]:
    """A run's per-epoch ``time_train_s``, ``time_eval_s``, ``time_diag_s`` rows (``train``, ``eval``, ``diag``)."""
    df = store.metrics()
    rows = df[df.split == "train"].pivot_table(index="epoch", columns="metric", values="value")
    return {k: list(rows[f"time_{k}_s"]) for k in ("train", "eval", "diag")}


def tracked(cfg, data: ImageData, runs: str, name: str) -> dict[str, list[float]]:
    """Per-epoch seconds of ``track``: eval, diag, and train per step."""
    out = epoch_seconds(track(cfg, runs_dir=runs, name=name, data=data, progress=False))
    steps = math.ceil((len(data.train_y) - cfg.val_size) / cfg.batch_size)
    out["train_step"] = [s / steps for s in out["train"]]
    return out


def monitored(cfg, data: ImageData, runs: str, name: str) -> dict[str, list[float]]:
    """Per-epoch seconds of the Monitor on a plain loop: epoch_end, and all observe calls."""
    torch.manual_seed(cfg.seed)
    model = create_model(cfg.model, num_classes=10, in_channels=3, image_size=32, width=cfg.width)
    loader = TrainLoader(data.train_x[cfg.val_size:], data.train_y[cfg.val_size:], cfg.batch_size, device="cpu")
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    schedule = Schedule.from_config(cfg, cfg.lr, len(loader) * cfg.epochs, len(loader))
    method = create_method(cfg)
    monitor = Monitor(model, epsilon=cfg.epsilon, probe=(data.test_x, data.test_y), reference=cfg.reference,
                      dataset=cfg.dataset,
                      runs_dir=runs, name=name, steps_per_epoch=len(loader), method=cfg.method,
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
    return {**out, **epoch_seconds(monitor.store)}  # eval, diag: as track's rows measure them


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--train", type=int, default=5000, help="training examples (seeded subset, incl. validation)")
    p.add_argument("--test", type=int, default=2000, help="test examples (the probe is drawn from them)")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=2, help="track / monitor pairs, alternating which goes first; "
                                                          "each number is the fastest repeat's (least disturbed)")
    args = p.parse_args(argv)
    if args.epochs < 3:
        p.error("--epochs must be at least 3 (the first and last epochs are left out)")
    if args.threads:
        torch.set_num_threads(args.threads)
    data = subset(load_dataset("cifar10-jpeg"), args.train, args.test, args.seed)
    # No validation split: track evaluates the probe only, as the monitor does (same work at the epoch's end).
    cfg = make_config("quick", epochs=args.epochs, val_size=0, test_every=0, device="cpu", seed=args.seed,
                      threads=args.threads)
    mid = slice(1, args.epochs - 1)
    sides: dict[str, list[dict[str, float]]] = {"track": [], "monitor": []}
    with tempfile.TemporaryDirectory() as runs:
        for r in range(args.repeats):
            for side in (("track", "monitor") if r % 2 == 0 else ("monitor", "track")):
                run = (tracked if side == "track" else monitored)(cfg, data, runs, f"{side}{r}")
                sides[side].append({k: statistics.mean(v[mid]) for k, v in run.items()})
    t, m = ({k: min(rep[k] for rep in reps) for k in reps[0]} for reps in (sides["track"], sides["monitor"]))
    inside, same = t["eval"] + t["diag"], m["eval"] + m["diag"]
    end, obs = m["epoch_end"], m["observe"]
    epoch_s = t["train_step"] * math.ceil(QUICK_TRAIN / cfg.batch_size)
    print(f"# bench_monitor: {versions()} on {device_name('cpu')}, {torch.get_num_threads()} thread(s); "
          f"{' '.join(sys.argv[1:]) or 'defaults'}")
    print(f"# quick setting, probe {cfg.probe_size}, default diagnostics + builtin:quick referee; means over epochs "
          f"2..{args.epochs - 1} (of {args.epochs}), fastest of {args.repeats} repeats; "
          f"{len(data.train_y) - cfg.val_size} training examples")
    print(f"{'s/epoch':38}{'eval':>8}{'diag':>8}{'total':>8}")
    print(f"{'track: evaluation + diagnostics':38}{t['eval']:>8.2f}{t['diag']:>8.2f}{inside:>8.2f}")
    print(f"{'monitor: evaluation + diagnostics':38}{m['eval']:>8.2f}{m['diag']:>8.2f}{same:>8.2f}")
    print(f"{'monitor: epoch_end (+ writing files)':38}{'':>16}{end:>8.2f}")
    print(f"{'monitor: observe (all steps)':38}{'':>16}{obs:>8.2f}")
    print(f"{'monitor / track (same parts)':38}{'':>16}{same / inside:>8.2f}")
    print(f"{'monitor / track (epoch_end + observe)':38}{'':>16}{(end + obs) / inside:>8.2f}")
    print(f"{'quick training epoch (383 steps)':38}{'':>16}{epoch_s:>8.2f}")
    print(f"{'monitor / quick training epoch':38}{'':>16}{(end + obs) / epoch_s:>8.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
