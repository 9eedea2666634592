"""What each piece of a paper-scale run costs, in FLOPs and in forward-pass equivalents (FE).

Counts the FLOPs of one forward pass of the model (2 per multiply-add of every convolution and
linear layer; batch norm, activations and additions are left out, they are < 1% of the work),
then times on one device, at one batch size, the pieces of a run (the GPU plan's ``bench`` step
runs it on the GPU, ``analyses/gpu_plan.py``): a forward pass, one attack gradient step (forward + backward to the
input, no weight gradients), and one training step of each method; each as a multiple of the
forward pass (FE). The FE counts carry from one device to another far better than seconds do; the
seconds per FE (the achieved FLOP rate) is the device's own.

    python benchmarks/bench_costs.py --device cpu --batch-size 32 --threads 1   # this CPU (minutes)
    python benchmarks/bench_costs.py --device cuda --batch-size 128             # a GPU
    python benchmarks/bench_costs.py --json costs.json                          # also write the numbers

Timings: median of ``--repeats`` after one untimed warm-up (wall seconds on CUDA, process CPU
seconds on a CPU); bf16 autocast and channels_last on CUDA (as the engine trains), fp32 on CPU.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import torch

from robustdrop import make_config
from robustdrop.attacks import PGD, input_gradient
from robustdrop.data import TrainLoader, make_synthetic
from robustdrop.engine import autocast_for, resolve_device
from robustdrop.environment import device_name, environment
from robustdrop.methods import MethodContext, create_method
from robustdrop.models import create_model, forward_flops


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    """Median seconds of ``fn()`` over ``repeats`` runs after one warm-up: wall seconds on CUDA,
    this process's CPU seconds on a CPU (other jobs on a shared machine then do not count; use
    ``--threads 1``, where CPU seconds are the compute's own)."""
    clock = time.perf_counter if device.type == "cuda" else time.process_time
    fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        start = clock()
        fn()
        _sync(device)
        times.append(clock() - start)
    return statistics.median(times)


def measure(args: argparse.Namespace) -> dict:
    device = resolve_device(args.device)
    on_cuda = device.type == "cuda"
    if on_cuda:
        torch.backends.cudnn.benchmark = True
    data = make_synthetic(n_train=args.batch_size * (args.repeats + 2), n_test=1, seed=0)
    torch.manual_seed(0)
    model = create_model(args.model, width=args.width).to(device)
    if on_cuda:
        model = model.to(memory_format=torch.channels_last)
    flops = forward_flops(model, tuple(data.train_x.shape[1:]))
    autocast = autocast_for(device, not args.fp32)
    loader = TrainLoader(data.train_x, data.train_y, args.batch_size, device=device, channels_last=on_cuda)
    batches = list(loader.epoch(torch.Generator().manual_seed(0)))
    batch = batches[0]
    x, y = batch.x, batch.y

    def forward() -> None:
        with torch.no_grad(), autocast():
            model(x)

    def attack_step() -> None:
        with autocast():
            input_gradient(model, x, y)

    def eval_pgd() -> None:
        with autocast():
            delta = PGD(8 / 255, steps=args.eval_pgd_steps, step_size=2 / 255)(model, x, y)
            with torch.no_grad():
                model(x + delta)

    model.eval()
    seconds = {"forward": timed(forward, device, args.repeats), "attack_step": timed(attack_step, device, args.repeats),
               f"eval_pgd{args.eval_pgd_steps}": timed(eval_pgd, device, max(1, args.repeats // 2))}
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9, weight_decay=5e-4)
    for name in args.methods:
        cfg = make_config(model=args.model, width=args.width, method=name, epsilon=8 / 255, epochs=1,
                          batch_size=args.batch_size, pgd_steps=10, device=str(device))
        method = create_method(cfg)
        method.setup(model, MethodContext(len(data.train_y), tuple(data.train_x.shape[1:]), 100, 10, device))

        def step(method=method) -> None:
            with autocast():
                method.train_step(model, batch, optimizer)

        key = "pgd10" if name == "pgd" else name
        seconds[f"train_{key}"] = timed(step, device, max(1, args.repeats // (3 if name == "pgd" else 1)))
    fe = {k: v / seconds["forward"] for k, v in seconds.items()}
    per_image = seconds["forward"] / args.batch_size
    name = device_name(device) + ("" if on_cuda else f", {torch.get_num_threads()} thread(s)")
    return {
        "device": name, "model": args.model, "width": args.width, "batch_size": args.batch_size,
        "precision": "fp32" if (args.fp32 or not on_cuda) else "bf16 autocast", "repeats": args.repeats,
        "forward_gflop_per_image": flops / 1e9, "seconds_per_batch": seconds, "fe": fe,
        "forward_tflops_achieved": flops / per_image / 1e12, "environment": environment(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--model", default="preactresnet18")
    parser.add_argument("--width", type=float, default=1.0)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--eval-pgd-steps", type=int, default=20)
    parser.add_argument("--methods", nargs="+", default=["fgsm", "pgd", "fgsm+", "apart"])
    parser.add_argument("--fp32", action="store_true", help="no bf16 autocast on CUDA")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0 = torch's default)")
    parser.add_argument("--json", default=None, help="also write the numbers to this file")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    r = measure(args)
    print(f"{r['model']} width {r['width']}: {r['forward_gflop_per_image']:.3f} GFLOP per forward (one image); "
          f"{r['device']}, batch {r['batch_size']}, {r['precision']}")
    print(f"{'piece':<16} {'s/batch':>9} {'FE':>7}")
    for k, v in r["seconds_per_batch"].items():
        print(f"{k:<16} {v:>9.4f} {r['fe'][k]:>7.2f}")
    print(f"achieved forward rate: {r['forward_tflops_achieved'] * 1e3:.1f} GFLOP/s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(r, f, indent=2)


if __name__ == "__main__":
    main()
