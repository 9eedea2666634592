"""What the diagnostics cost: the same short training with ``--diagnostics none``, ``default``, ``all``.

Runs the quick preset's values (cnn1 width 4, ε = 10/255, Adam, cyclic LR) on a seeded, class-
balanced subset of the embedded CIFAR-10 JPEG copy, once per diagnostics setting, in this one
process, and prints a table of seconds per epoch (train, eval, diagnostics) and the overhead of
the diagnostics in two ways:

* ``diag/epoch`` — the diagnostics' own seconds (``time_diag_s``, measured inside each epoch)
  over the rest of the epoch (train + eval): immune to other load on the machine;
* ``wall ratio`` — the whole epoch's wall time relative to the ``none`` run (noisier).

Then the per-diagnostic ``time_s`` rows (seconds per call). Usage::

    python benchmarks/bench_diagnostics.py                     # 10000 examples, 3 epochs
    python benchmarks/bench_diagnostics.py --train 50000 --epochs 3 --threads 1   # the quick preset's data
    python benchmarks/bench_diagnostics.py --reference runs/ref-quick   # adds strength-ref

The first epoch (warm-up) and the last (it also evaluates the test set) are left out of the
means; use at least 3 epochs. On a shared CPU, ``--threads 1`` gives the steadiest numbers.
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time

import torch

from robustdrop.api import track
from robustdrop.data import ImageData, load_dataset
from robustdrop.engine import make_config, resolve_device
from robustdrop.environment import device_name, versions


def subset(data: ImageData, n_train: int, n_test: int, seed: int) -> ImageData:
    """Seeded random subsets of the training and test sets (the files are sorted by class)."""
    g = torch.Generator().manual_seed(seed)
    train = torch.randperm(len(data.train_y), generator=g)[:n_train]
    test = torch.randperm(len(data.test_y), generator=g)[:n_test]
    return ImageData(data.name, data.train_x[train], data.train_y[train], data.test_x[test], data.test_y[test],
                     data.classes)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--train", type=int, default=10000, help="training examples (seeded subset, incl. validation)")
    p.add_argument("--test", type=int, default=2000, help="test examples (seeded subset; the probe is drawn from them)")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--probe-size", type=int, default=1000)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    p.add_argument("--device", default="auto")
    p.add_argument("--settings", nargs="+", default=["none", "default", "all", "all landscape:every=1"],
                   help="diagnostics settings to compare, e.g. none default all 'landscape:every=1'")
    p.add_argument("--reference", default=None, help="reference run for strength-ref (added to every setting but none)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    data = subset(load_dataset("cifar10-jpeg"), args.train, args.test, args.seed)
    base = dict(epochs=args.epochs, probe_size=args.probe_size, test_every=0, seed=args.seed, device=args.device,
                threads=args.threads)
    device = resolve_device(args.device)
    v = versions()
    print(f"robustdrop {v['robustdrop']}, torch {v['torch']}, python {v['python']}, "
          f"{platform.system()} {platform.machine()}")
    print(f"device: {device} ({device_name(device)}), torch threads: {torch.get_num_threads()}")
    print(f"settings: quick preset values (val 1000 held out of training), {len(data.train_y)} training examples, "
          f"{args.epochs} epochs, probe {args.probe_size}, test {len(data.test_y)}, seed {args.seed}, "
          f"reference: {args.reference or 'none'}")
    print("the first epoch (warm-up) and the last (it also evaluates the test set) are left out of the means",
          flush=True)

    rows, per_diag = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for setting in args.settings:
            words = setting.split()
            reference = args.reference if setting != "none" else None
            cfg = make_config("quick", diagnostics=words, reference=reference, **base)
            start = time.perf_counter()
            store = track(cfg, runs_dir=tmp, name=setting.replace(":", "_").replace(",", "_").replace(" ", "_"),
                          progress=False, data=data)
            total = time.perf_counter() - start
            m = store.metrics()
            epochs = sorted(m["epoch"].unique())
            keep = [e for e in epochs if e != epochs[-1]]  # the last epoch also runs the full test set
            keep = keep[1:] if len(keep) > 1 else keep     # warm-up
            t = m[(m["split"] == "train") & (m["source"] == "train") & m["epoch"].isin(keep)]
            means = {k: t[t["metric"] == f"time_{k}_s"]["value"].mean() for k in ("train", "eval", "diag")}
            rows.append((setting, means, total))
            d = m[(m["metric"] == "time_s") & m["epoch"].isin(keep)]
            for (source, split), g in d.groupby(["source", "split"]):
                per_diag[(setting, source, split)] = (g["value"].mean(), len(g))

    print()
    none = next((r for r in rows if r[0] == "none"), None)
    w = max(len("diagnostics"), *(len(r[0]) for r in rows)) + 2
    head = f"{'diagnostics':<{w}}{'train s':>9}{'eval s':>9}{'diag s':>9}{'epoch s':>9}{'diag/epoch':>12}{'wall ratio':>12}"
    print(head)
    print("-" * len(head))
    for setting, t, _ in rows:
        epoch = t["train"] + t["eval"] + t["diag"]
        frac = t["diag"] / (t["train"] + t["eval"])
        ratio = epoch / sum(none[1].values()) if none else float("nan")
        print(f"{setting:<{w}}{t['train']:>9.2f}{t['eval']:>9.2f}{t['diag']:>9.2f}{epoch:>9.2f}{frac:>11.1%}{ratio:>12.2f}")
    print()
    print(f"{'diagnostics':<{w}}{'source':<14}{'split':<7}{'s per call':>11}{'calls':>7}")
    for (setting, source, split), (sec, calls) in per_diag.items():
        print(f"{setting:<{w}}{source:<14}{split:<7}{sec:>11.3f}{calls:>7}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
