"""How long the GPU plan's parts take: work from FLOP counts, time from an assumed (then measured) rate.

**Work.** A part's work is counted in forward-pass equivalents (FE: one forward pass of one image)
and turned into FLOPs with the model's counted forward FLOPs (``robustdrop.models.forward_flops``:
1.11 GFLOP for PreActResNet18 on 32×32). The FE of each piece were measured on this project's CPU
(``benchmarks/bench_costs.py --device cpu --batch-size 32 --threads 1``, PreActResNet18, fp32):

=====================  =====  ==================================================================
piece                  FE     note
=====================  =====  ==================================================================
forward                1      by definition
attack gradient step   1.82   forward + backward to the input (no weight gradients)
PGD step (training)    1.87   the same plus projection; PGD-10 training step = 10 × 1.87 + 2.99
model update           2.99   forward + full backward + SGD step (FGSM step = 1.82 + 2.99 = 4.81)
APART / FGSM+ step     4.92 / 4.96   FGSM's plus layer-wise noise, Ω gather/scatter, ψ step
=====================  =====  ==================================================================

A run's work: every epoch's training steps (training examples × step FE), its evaluation (probe:
clean + FGSM + PGD-20; validation: clean + PGD-20; on the epochs the config evaluates them; the
test set every ``test_every`` epochs and at the last) and its diagnostics (``strength``: n × 14.7
FE; the referee measurement: probe × (FGSM + 4 forwards), plus the PGD ceiling every 5 epochs).

**Time.** :class:`Assumptions`: one training process on an H100 sustains ``one_process_tflops``
= 40 TFLOP/s in bf16 at batch 128, about 4% of the H100's dense bf16 peak (989 TFLOP/s; 798
measured on a large matrix product on this workplace's H100). The anchor: Wong et al.'s
fast_adversarial trains the same model with FGSM for 15 epochs in 6-12 minutes with mixed
precision on a 2019 GPU (README), 5.6-11 TFLOP/s by this FLOP count; an H100 has 9-18× that GPU's
tensor throughput and 5× its memory bandwidth, but batch-128 kernels on 32×32 images use little of
it, so 4-7× is assumed. The CPU here reaches 85 GFLOP/s per core, about 80% of its peak: it fixes
the FE, not the GPU's efficiency. Several processes share the GPU and together reach
``share_gain[k-1]`` times one process's rate (they fill each other's launch gaps; a guess: 1.45
for 2, 1.65 for 3, 1.75 for 4). fp32 work (evaluation attacks, the fp32 runs; TF32 convolutions)
costs ``fp32_slowdown`` = 1.5 times bf16 work. Uncertainty: a factor of 2 either way on the rate;
the FE on a GPU may differ by 10-20% from the CPU's. The plan measures the real rate while it
runs (FLOPs done / wall time) and re-plans with it.

The numbers and the formula are also in ``docs/gpu-plan.md``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass
from typing import Any

from robustdrop.diagnostics import ReferenceOptions, StrengthOptions
from robustdrop.engine import TrackConfig
from robustdrop.models import create_model, forward_flops

# Forward-pass equivalents per image, measured on the CPU (see the module docstring).
FE = {"attack_step": 1.82, "pgd_step": 1.87, "update": 2.99, "apart_extra": 0.11, "fgsm+_extra": 0.15}
# Images per split of the datasets the plan uses: (train incl. validation, test).
SIZES = {"cifar10": (50000, 10000), "cifar10-jpeg": (50000, 10000)}


@dataclass(frozen=True)
class Assumptions:
    """Rates of the GPU the plan runs on (see the module docstring for where they come from)."""

    device: str = "one NVIDIA H100 (assumed)"
    one_process_tflops: float = 40.0
    share_gain: tuple[float, ...] = (1.0, 1.45, 1.65, 1.75)
    fp32_slowdown: float = 1.5
    eval_fp32: bool = True  # evaluation attacks in fp32 on CUDA (issue 8's default)
    machine_start_min: float = 1.5  # a fresh machine's start, counted in the session's device time
    command_overhead_min: float = 0.5  # per command: transfers, processes, data, CUDA and cuDNN start
    boundary_loss_epochs: float = 0.5  # work lost per command boundary by a training in flight (epoch resume)
    source: str = "assumed"

    def aggregate(self, k: int) -> float:
        """FLOP/s of ``k`` processes sharing the GPU, together."""
        if k <= 0:
            return 0.0
        return self.one_process_tflops * 1e12 * self.share_gain[min(k, len(self.share_gain)) - 1]

    def with_rate(self, tflops: float, source: str) -> Assumptions:
        return dataclasses.replace(self, one_process_tflops=float(tflops), source=source)


# A CPU "plan" (--smoke on the CPU): one process ≈ the measured per-core rate; no sharing gain.
CPU = Assumptions(device="this CPU", one_process_tflops=0.08, share_gain=(1.0, 1.0, 1.0, 1.0), fp32_slowdown=1.0,
                  machine_start_min=0.0, command_overhead_min=0.05, boundary_loss_epochs=0.5)


@functools.lru_cache(maxsize=16)
def gflop(model: str, width: float | None, image_shape: tuple[int, int, int] = (3, 32, 32)) -> float:
    """Counted GFLOP of one forward pass of one image."""
    return forward_flops(create_model(model, image_size=image_shape[1], in_channels=image_shape[0], width=width),
                         image_shape) / 1e9


def train_fe(cfg: TrackConfig) -> float:
    """FE of one training example of one step of ``cfg.method``."""
    fgsm = FE["attack_step"] + FE["update"]
    if cfg.method == "pgd":
        return cfg.pgd_steps * FE["pgd_step"] + FE["update"]
    if cfg.method in ("apart", "fgsm+"):
        return fgsm + FE[f"{cfg.method}_extra" if cfg.method == "fgsm+" else "apart_extra"]
    return fgsm  # fgsm, rs-fgsm and other one-step methods


def pgd_fe(steps: int, restarts: int = 1) -> float:
    """FE of an evaluation PGD on one image, its final forward included."""
    return restarts * steps * FE["pgd_step"] + 1 + (restarts - 1) * 2


def eval_fe(cfg: TrackConfig) -> dict[str, float]:
    """FE per image of the evaluation sets: probe (clean, FGSM, PGD), validation (clean, PGD), test."""
    pgd = pgd_fe(cfg.eval_pgd_steps, cfg.eval_restarts)
    probe = 1 + (FE["attack_step"] + 1) + pgd
    return {"probe": probe, "val": 1 + pgd, "test": probe}


def epochs_evaluated(cfg: TrackConfig) -> tuple[int, int]:
    """(epochs with the probe/validation evaluation, epochs with the test evaluation)."""
    e = cfg.epochs
    probe = sum(1 for i in range(1, e + 1) if i % cfg.eval_every == 0 or i == e)
    test = sum(1 for i in range(1, e + 1) if (cfg.test_every and i % cfg.test_every == 0) or i == e)
    return probe, test


def _diag_words(cfg: TrackConfig) -> set[str]:
    return {w.split(":")[0].strip().lower() for w in cfg.diagnostics}


def strength_fe(cfg: TrackConfig, n_probe: int) -> float:
    """FE per epoch of the ``strength`` diagnostic (default options; 0 with --diagnostics none)."""
    if "none" in _diag_words(cfg):
        return 0.0
    o = StrengthOptions()
    n = min(o.n or n_probe, n_probe)
    return n * (2 * FE["attack_step"] + 2 + o.pgd_steps * FE["pgd_step"])


def referee_fe(cfg: TrackConfig, n_probe: int) -> float:
    """FE of the referee measurement (``strength-ref``) over the whole run: FGSM on the current
    model and four referee forwards every epoch, the PGD ceiling every ``pgd_every`` epochs and at
    the last."""
    o = ReferenceOptions()
    ceilings = sum(1 for i in range(1, cfg.epochs + 1) if (o.pgd_every and i % o.pgd_every == 0) or i == cfg.epochs)
    return n_probe * (cfg.epochs * (FE["attack_step"] + 4) + ceilings * (pgd_fe(cfg.eval_pgd_steps) + 1))


@dataclass(frozen=True)
class Work:
    """FLOPs of a run (or a task), by component; fp32 components already count ``fp32_slowdown``."""

    train: float = 0.0
    evaluation: float = 0.0
    diagnostics: float = 0.0
    epochs: int = 0

    @property
    def total(self) -> float:
        return self.train + self.evaluation + self.diagnostics

    @property
    def per_epoch(self) -> float:
        return self.total / self.epochs if self.epochs else self.total


def data_counts(cfg: TrackConfig, sizes: tuple[int, int]) -> dict[str, int]:
    """Images per split of a run: training examples, validation, probe, test."""
    n_all, n_test = sizes
    n_train = n_all - cfg.val_size
    if cfg.train_subset:
        n_train = min(n_train, cfg.train_subset)
    return {"train": n_train, "val": cfg.val_size, "probe": min(cfg.probe_size, n_test), "test": n_test}


def run_work(cfg: TrackConfig, sizes: tuple[int, int], a: Assumptions) -> Work:
    """The FLOPs of training run ``cfg`` (its in-training evaluation and diagnostics included)."""
    g = gflop(cfg.model, cfg.width) * 1e9
    n = data_counts(cfg, sizes)
    fp32_train = not cfg.amp
    slow = a.fp32_slowdown
    train = cfg.epochs * n["train"] * train_fe(cfg) * g * (slow if fp32_train else 1.0)
    fe = eval_fe(cfg)
    probe_epochs, test_epochs = epochs_evaluated(cfg)
    ev = probe_epochs * (n["probe"] * fe["probe"] + n["val"] * fe["val"]) + test_epochs * n["test"] * fe["test"]
    diag = cfg.epochs * strength_fe(cfg, n["probe"])
    eval_slow = slow if (a.eval_fp32 or fp32_train) else 1.0
    return Work(train=train, evaluation=ev * g * eval_slow, diagnostics=diag * g * eval_slow, epochs=cfg.epochs)


def measure_work(cfg: TrackConfig, sizes: tuple[int, int], a: Assumptions) -> Work:
    """The FLOPs of the deferred referee measurement of run ``cfg`` (lib.deferred)."""
    g = gflop(cfg.model, cfg.width) * 1e9
    n = data_counts(cfg, sizes)
    slow = a.fp32_slowdown if (a.eval_fp32 or not cfg.amp) else 1.0
    return Work(diagnostics=referee_fe(cfg, n["probe"]) * g * slow)


def table_eval_work(cfg: TrackConfig, sizes: tuple[int, int], eval_n: int, a: Assumptions) -> Work:
    """The FLOPs of the tables' evaluation (lib.evaluation): the final checkpoint, and the best one
    when it is another (assumed for FGSM only, which collapses), clean + PGD + CW-loss PGD on
    ``eval_n`` test images (all when 0)."""
    g = gflop(cfg.model, cfg.width) * 1e9
    n_test = sizes[1] if eval_n <= 0 else min(eval_n, sizes[1])
    per_image = 1 + 2 * pgd_fe(cfg.eval_pgd_steps, cfg.eval_restarts)
    slow = a.fp32_slowdown if (a.eval_fp32 or not cfg.amp) else 1.0
    checkpoints = 2 if cfg.method in ("fgsm", "rs-fgsm") else 1
    return Work(evaluation=checkpoints * n_test * per_image * g * slow)


def precision_work(ref: TrackConfig, pair: list[TrackConfig], sizes: tuple[int, int], eval_n: int,
                   a: Assumptions) -> Work:
    """The FLOPs of lib.precision: two checkpoints in fp32 and bf16, the pair's final models in fp32
    (clean + FGSM + PGD on ``eval_n`` test images)."""
    g = gflop(ref.model, ref.width) * 1e9
    n_test = sizes[1] if eval_n <= 0 else min(eval_n, sizes[1])
    per_image = eval_fe(ref)["test"]
    models = 2 * (1 + a.fp32_slowdown) + len(pair) * a.fp32_slowdown
    return Work(evaluation=models * n_test * per_image * g)


def bench_work(width: float, train_subset: int, apart_n: int, repeats: int, cost_batch: int, cost_repeats: int,
               a: Assumptions) -> Work:
    """The FLOPs of lib.benchmarks: bench_train's engine (2 × (repeats + 1) epochs) and bare
    (repeats + 1) FGSM epochs, bench_apart's (repeats + 1) epochs of four methods, bench_costs'
    batches in bf16 and fp32."""
    g = gflop("preactresnet18", width) * 1e9
    fgsm = FE["attack_step"] + FE["update"]
    pgd10 = 10 * FE["pgd_step"] + FE["update"]
    methods = 2 * fgsm + pgd10 + FE["apart_extra"] + FE["fgsm+_extra"] + fgsm
    train = (3 * (repeats + 1) * train_subset * fgsm + (repeats + 1) * apart_n * methods) * g
    pieces = 1 + FE["attack_step"] + pgd_fe(20) + 2 * fgsm + pgd10 + fgsm
    costs = (cost_repeats + 1) * cost_batch * pieces * g * (1 + a.fp32_slowdown)
    return Work(train=train + costs)


def minutes(flops: float, a: Assumptions, k: int = 1) -> float:
    """Wall minutes of ``flops`` for one of ``k`` processes sharing the GPU."""
    rate = a.aggregate(k) / max(k, 1)
    return flops / rate / 60 if rate > 0 else math.inf


def describe(a: Assumptions) -> str:
    gains = ", ".join(f"{g:g}" for g in a.share_gain)
    return (f"{a.device}: one training process {a.one_process_tflops:g} TFLOP/s sustained ({a.source}); "
            f"1..{len(a.share_gain)} processes together × {gains}; fp32 × {a.fp32_slowdown:g} the bf16 time"
            + ("; evaluation in fp32" if a.eval_fp32 else ""))


def as_dict(a: Assumptions) -> dict[str, Any]:
    return dataclasses.asdict(a)
