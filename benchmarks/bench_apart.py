"""Cost of an APART epoch against a PGD-10 epoch (and FGSM, FGSM+), in one process.

Same model initialization, same data, same batches (the data generator is re-seeded for every
epoch), the same per-step work the trainer does (schedule.apply, autocast on CUDA, channels_last
on CUDA); only the training method differs. Methods are interleaved and each is timed
``--repeats`` times; the table reports the fastest epoch of each (the least disturbed by other
work on the machine) and the median.

    python benchmarks/bench_apart.py                       # CPU (+ CUDA when present)
    python benchmarks/bench_apart.py --device cpu --width 0.25 --n 512
    python benchmarks/bench_apart.py --device cuda --width 1 --n 10240

The pass-count bound is 2/11 ≈ 0.18 (APART: 2 forward + 2 backward; PGD-10: 11 + 11). APART's
first backward only needs input (and activation) gradients, not weight gradients, so it can
come in a little under the bound on compute-bound hardware; fixed costs (Ω gather/scatter,
crop/flip, optimizer steps) push it up on small models.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from robustdrop import make_config
from robustdrop.data import TrainLoader, make_synthetic
from robustdrop.engine import autocast_for
from robustdrop.environment import device_name
from robustdrop.methods import MethodContext, create_method
from robustdrop.models import create_model
from robustdrop.schedules import Schedule

DEFAULTS = {  # per device: model width, training examples
    "cpu": dict(width=0.25, n=512),
    "cuda": dict(width=1.0, n=10240),
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_epoch(method_name: str, args: argparse.Namespace, device: torch.device, data, width: float,
              warmup: int = 0) -> tuple[float, float]:
    """``(wall s, process CPU s)`` of one training epoch of ``method_name`` (after ``warmup`` untimed steps)."""
    cfg = make_config(model=args.model, width=width, method=method_name, epsilon=8 / 255, epochs=1,
                      batch_size=args.batch_size, device=str(device), pgd_steps=10)
    on_cuda = device.type == "cuda"
    torch.manual_seed(0)
    model = create_model(args.model, width=width).to(device)
    if on_cuda:
        model = model.to(memory_format=torch.channels_last)
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    loader = TrainLoader(data.train_x, data.train_y, args.batch_size, device=device, augment=True, pad=4,
                         channels_last=on_cuda)
    steps = len(loader)
    schedule = Schedule("cyclic", 0.01, steps * 2)
    method = create_method(cfg)
    method.setup(model, MethodContext(len(data.train_y), tuple(data.train_x.shape[1:]), steps * 2, steps, device))
    autocast = autocast_for(device, True)
    generator = torch.Generator().manual_seed(0)
    if warmup:
        for i, batch in enumerate(loader.epoch(generator)):
            if i >= warmup:
                break
            schedule.apply(optimizer)
            with autocast():
                method.train_step(model, batch, optimizer)
            schedule.step()
        generator.manual_seed(0)
    _sync(device)
    start, cpu_start = time.perf_counter(), time.process_time()
    for batch in loader.epoch(generator):
        schedule.apply(optimizer)
        with autocast():
            out = method.train_step(model, batch, optimizer)
        schedule.step()
    out.loss.item()
    _sync(device)
    return time.perf_counter() - start, time.process_time() - cpu_start


def bench(device: torch.device, args: argparse.Namespace) -> dict[str, list[float]]:
    defaults = DEFAULTS[device.type]
    width = args.width if args.width is not None else defaults["width"]
    n = args.n if args.n is not None else defaults["n"]
    data = make_synthetic(n_train=n, n_test=1, seed=0)
    print(f"\n== {device} ({device_name(device)}, "
          f"{torch.get_num_threads()} threads): {args.model} width {width}, {n} examples, batch {args.batch_size}, "
          f"{-(-n // args.batch_size)} steps/epoch, repeats {args.repeats}", flush=True)
    times: dict[str, list[float]] = {m: [] for m in args.methods}
    cpu: dict[str, list[float]] = {m: [] for m in args.methods}
    if device.type == "cuda":  # warm-up epochs (allocator, cuDNN autotuning)
        for m in args.methods:
            run_epoch(m, args, device, data, width, warmup=2)
    for r in range(args.repeats):
        for m in args.methods:
            wall, proc = run_epoch(m, args, device, data, width, warmup=2)
            times[m].append(wall)
            cpu[m].append(proc)
            print(f"  repeat {r + 1}: {m:>6} {wall:8.2f} s wall, {proc:8.2f} s CPU", flush=True)
    tables = [("wall", times)] + ([("CPU", cpu)] if device.type == "cpu" else [])
    for kind, ts_by in tables:
        ref = min(ts_by["pgd"]) if "pgd" in ts_by else None
        print(f"  [{kind} time] {'method':>6} {'passes':>7} {'best s':>8} {'median s':>9} {'best / PGD-10':>14}")
        for m, ts in ts_by.items():
            passes = create_method(make_config(method=m, pgd_steps=10)).forward_passes
            ratio = f"{min(ts) / ref:14.3f}" if ref else ""
            print(f"  {'':>12}{m:>6} {passes:>7} {min(ts):8.2f} {statistics.median(ts):9.2f} {ratio}")
        if ref and "apart" in ts_by:
            med = statistics.median(ts_by["apart"]) / statistics.median(ts_by["pgd"])
            print(f"  [{kind} time] APART / PGD-10 = {min(ts_by['apart']) / ref:.3f} (medians: {med:.3f}); "
                  f"pass-count bound 2/11 = {2 / 11:.3f}; goal <= 0.22", flush=True)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="all", help="cpu | cuda | all (cpu, and cuda when present)")
    parser.add_argument("--model", default="preactresnet18")
    parser.add_argument("--width", type=float, default=None, help="model width (default: 0.25 on CPU, 1 on CUDA)")
    parser.add_argument("--n", type=int, default=None, help="training examples (default: 512 on CPU, 10240 on CUDA)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0 = torch's default)")
    parser.add_argument("--methods", nargs="+", default=["fgsm", "pgd", "fgsm+", "apart"])
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "all":
        devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    else:
        devices = [torch.device(args.device)]
    if any(d.type == "cuda" for d in devices):
        torch.backends.cudnn.benchmark = True
    for device in devices:
        bench(device, args)


if __name__ == "__main__":
    main()
