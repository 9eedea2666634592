"""FGSM-AT epoch time of the engine against the bare compute of the same work.

The bare loop runs, on the same model, batches and batch size, exactly the passes FGSM training
needs (forward+backward for the input gradient, forward+backward+step for the update) on batches
prepared beforehand; everything else the engine does (batching, crop/flip, attack bookkeeping,
logging, progress) is overhead. Goal: engine / bare <= 1.10.

Both wall seconds and process CPU seconds are reported. On a machine shared with other jobs the
wall time of each side depends on the others' load; the CPU time of a one-thread run
(``OMP_NUM_THREADS=1``) does not, so compare CPU ratios there.

    python benchmarks/bench_train.py                      # cnn1 + preactresnet18 (width 0.25) on CPU
    python benchmarks/bench_train.py --model preactresnet18 --width 1 --train-subset 50000  # on a GPU
    OMP_NUM_THREADS=1 python benchmarks/bench_train.py    # a shared CPU: read the CPU-time ratio
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import statistics
import tempfile
import time
from collections.abc import Iterator

import torch
import torch.nn.functional as F

from robustdrop.api import track
from robustdrop.data import TrainLoader, load_dataset
from robustdrop.engine import Trainer, autocast_for, make_config, resolve_device
from robustdrop.environment import device_name
from robustdrop.models import create_model


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


@contextlib.contextmanager
def engine_cpu_seconds(out: list[float]) -> Iterator[None]:
    """Append the process CPU seconds of every training epoch the engine runs in the block."""
    original = Trainer._train_epoch

    def timed(self):
        start = time.process_time()
        result = original(self)
        out.append(time.process_time() - start)
        return result

    Trainer._train_epoch = timed
    try:
        yield
    finally:
        Trainer._train_epoch = original


def bare_epoch(model, optimizer, batches, epsilon, autocast, device) -> tuple[float, float]:
    """(wall, CPU) seconds of one bare epoch."""
    sync(device)
    cpu = time.process_time()
    start = time.perf_counter()
    for x, y in batches:
        with autocast():
            x_req = x.detach().requires_grad_(True)
            loss = F.cross_entropy(model(x_req).float(), y)
            (grad,) = torch.autograd.grad(loss, x_req)
            x_adv = (x + epsilon * grad.sign()).clamp(0, 1)
            loss = F.cross_entropy(model(x_adv).float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    sync(device)
    return time.perf_counter() - start, time.process_time() - cpu


def measure(args, model_name: str, width: float, data=None) -> dict:
    """Engine and bare seconds per epoch and their ratio; ``data`` replaces ``--dataset`` (an ImageData)."""
    device = resolve_device(args.device)
    full = data if data is not None else load_dataset(args.dataset)
    # Evaluation is not what is measured: keep the test set small so the final full-test pass is short.
    data = dataclasses.replace(full, test_x=full.test_x[:200], test_y=full.test_y[:200])
    epochs = args.repeats + 1  # the first epoch warms up
    config = make_config(
        dataset=args.dataset, model=model_name, width=width, method="fgsm", epochs=epochs,
        train_subset=args.train_subset, val_size=0, probe_size=100, eval_every=1000, test_every=0,
        eval_pgd_steps=1, diagnostics=["none"], batch_size=args.batch_size, device=args.device,
    )
    engine_cpu: list[float] = []
    with tempfile.TemporaryDirectory() as runs, engine_cpu_seconds(engine_cpu):
        store = track(config, runs_dir=runs, name="bench", progress=False, data=data)
        frame = store.metrics()
    engine_times = frame[frame.metric == "time_train_s"].value.tolist()[1:]
    engine_cpu = engine_cpu[1:]

    channels_last = device.type == "cuda"
    model = create_model(model_name, width=width).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    subset = torch.randperm(len(data.train_y), generator=torch.Generator().manual_seed(0))[: args.train_subset]
    loader = TrainLoader(data.train_x[subset], data.train_y[subset], args.batch_size, device=device,
                         channels_last=channels_last)
    batches = [(b.x, b.y) for b in loader.epoch(torch.Generator().manual_seed(0))]
    autocast = autocast_for(device, True)
    bare_epoch(model, optimizer, batches, 8 / 255, autocast, device)  # warm-up
    bare = [bare_epoch(model, optimizer, batches, 8 / 255, autocast, device) for _ in range(args.repeats)]
    # Engine epochs again after the bare ones, so a change in machine load hits both sides.
    second: list[float] = []
    with tempfile.TemporaryDirectory() as runs, engine_cpu_seconds(second):
        frame = track(config, runs_dir=runs, name="bench", progress=False, data=data).metrics()
    engine_times += frame[frame.metric == "time_train_s"].value.tolist()[1:]
    engine_cpu += second[1:]
    engine, bare_s = statistics.median(engine_times), statistics.median(w for w, _ in bare)
    cpu, bare_cpu = statistics.median(engine_cpu), statistics.median(c for _, c in bare)
    return {"model": f"{model_name} (width {width})", "engine_s": engine, "bare_s": bare_s, "ratio": engine / bare_s,
            "engine_cpu_s": cpu, "bare_cpu_s": bare_cpu, "cpu_ratio": cpu / bare_cpu}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="cifar10-jpeg")
    parser.add_argument("--model", nargs="+", default=["cnn1", "preactresnet18"])
    parser.add_argument("--width", nargs="+", type=float, default=[4, 0.25])
    parser.add_argument("--train-subset", type=int, default=5000)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    device = resolve_device(args.device)
    name = device_name(device) + ("" if device.type == "cuda" else f", {torch.get_num_threads()} threads")
    print(f"device: {device} ({name}); torch {torch.__version__}; {args.train_subset} examples/epoch, "
          f"batch {args.batch_size}, median of {args.repeats} epochs")
    print(f"{'model':<28} {'engine s/epoch':>15} {'bare s/epoch':>13} {'ratio':>7} {'engine CPU s':>13} "
          f"{'bare CPU s':>11} {'CPU ratio':>9}")
    for model_name, width in zip(args.model, args.width, strict=True):
        r = measure(args, model_name, width)
        print(f"{r['model']:<28} {r['engine_s']:>15.3f} {r['bare_s']:>13.3f} {r['ratio']:>7.3f} "
              f"{r['engine_cpu_s']:>13.3f} {r['bare_cpu_s']:>11.3f} {r['cpu_ratio']:>9.3f}", flush=True)


if __name__ == "__main__":
    main()
