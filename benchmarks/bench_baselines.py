"""Cost per training step of the fast-AT baselines relative to FGSM, on the same batches.

Each method's ``train_step`` (the registered method, as ``robustdrop track`` runs it) is timed on
batches prepared beforehand, round-robin over the methods for several rounds so that a change in
machine load hits all of them alike; the report is the median seconds per step and the ratio to
FGSM. Use it for relative costs on a shared CPU, where per-epoch times of whole runs are not
comparable.

    python benchmarks/bench_baselines.py                                    # quick setting: cnn1 (4 filters)
    python benchmarks/bench_baselines.py --model preactresnet18 --width 0.25 --steps 5
    python benchmarks/bench_baselines.py --methods fgsm n-fgsm gradalign pgd --device cuda
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

from robustdrop.data import TrainLoader, load_dataset
from robustdrop.engine import autocast_for, make_config, resolve_device
from robustdrop.methods import MethodContext, create_method
from robustdrop.models import create_model


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="cifar10-jpeg")
    parser.add_argument("--model", default="cnn1")
    parser.add_argument("--width", type=float, default=4)
    parser.add_argument("--methods", nargs="+", default=["fgsm", "n-fgsm", "gradalign", "rs-fgsm", "pgd"])
    parser.add_argument("--pgd-steps", type=int, default=10)
    parser.add_argument("--epsilon", type=float, default=10 / 255)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20, help="training steps per method per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    data = load_dataset(args.dataset)
    loader = TrainLoader(data.train_x[:args.batch_size * args.steps], data.train_y[:args.batch_size * args.steps],
                         args.batch_size, device=device)
    batches = list(loader.epoch(torch.Generator().manual_seed(0)))
    autocast = autocast_for(device, True)

    setups = {}
    for name in args.methods:
        cfg = make_config(method=name, model=args.model, width=args.width, epsilon=args.epsilon,
                          pgd_steps=args.pgd_steps, device=args.device)
        torch.manual_seed(0)
        model = create_model(args.model, width=args.width).to(device).train()
        method = create_method(cfg)
        method.setup(model, MethodContext(len(batches) * args.batch_size, tuple(data.train_x.shape[1:]),
                                          args.rounds * len(batches) + len(batches), len(batches), device))
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
        setups[name] = (model, method, optimizer)

    def one_round(name: str) -> float:
        model, method, optimizer = setups[name]
        sync(device)
        start = time.perf_counter()
        for batch in batches:
            with autocast():
                method.train_step(model, batch, optimizer)
        sync(device)
        return (time.perf_counter() - start) / len(batches)

    for name in args.methods:  # warm-up
        one_round(name)
    times: dict[str, list[float]] = {name: [] for name in args.methods}
    for _ in range(args.rounds):
        for name in args.methods:
            times[name].append(one_round(name))

    where = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"{platform.processor() or 'cpu'}, {torch.get_num_threads()} thread(s)"
    print(f"device: {device} ({where}); torch {torch.__version__}; {args.model} (width {args.width:g}), batch "
          f"{args.batch_size}, ε={args.epsilon * 255:.3g}/255; median of {args.rounds} rounds x {len(batches)} steps")
    fgsm = statistics.median(times["fgsm"]) if "fgsm" in times else None
    print(f"{'method':<12} {'passes f/b':>10} {'ms/step':>9} {'vs FGSM':>8}")
    for name in args.methods:
        median = statistics.median(times[name])
        method = setups[name][1]
        label = f"pgd-{args.pgd_steps}" if name == "pgd" else name
        ratio = f"{median / fgsm:.2f}x" if fgsm else "-"
        print(f"{label:<12} {f'{method.forward_passes}/{method.backward_passes}':>10} {1000 * median:>9.1f} {ratio:>8}")


if __name__ == "__main__":
    main()
