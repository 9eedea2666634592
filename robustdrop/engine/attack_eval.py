"""Evaluation under named attacks with progress, as metric rows: the core of ``robustdrop evaluate``
and of ``track --final-eval``.

The attacks come by name from :data:`robustdrop.attacks.registry.EVAL_ATTACKS` (``clean``,
``fgsm``, ``pgd`` — the run's evaluation PGD unless told otherwise —, ``cw``, ``autoattack``).
Every attack sees the same images; numbers come out as
tidy metric rows (``acc``, ``loss`` and ``time_s`` with the attack's spec, the split and ``n``).
Attacks run in fp32: robustness is measured without autocast.
"""

from __future__ import annotations

import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from robustdrop._progress import progress_bar
from robustdrop.attacks import CLEAN, Attack, AttackSpec
from robustdrop.attacks.registry import AttackSettings, build_attacks, check_attack_names
from robustdrop.data import probe_indices
from robustdrop.engine.evaluate import evaluate
from robustdrop.engine.hooks import Hook
from robustdrop.store import metric_row

if TYPE_CHECKING:
    from robustdrop.engine.hooks import RunContext


@dataclass
class AttackResult:
    """Accuracy and mean loss of one attack on ``n`` examples, and its wall-clock seconds."""

    spec: AttackSpec
    acc: float
    loss: float
    n: int
    seconds: float

    def rows(self, *, epoch: int, step: int, split: str, source: str) -> list[dict[str, Any]]:
        cols = self.spec.as_columns()
        return [metric_row(epoch, step, split, metric, value, n=self.n, source=source, **cols)
                for metric, value in (("acc", self.acc), ("loss", self.loss), ("time_s", self.seconds))]


def subset(labels: torch.Tensor, n: int, seed: int) -> torch.Tensor | None:
    """Indices of the seeded class-balanced subset of ``n`` examples (as the run's probe set with
    the run's seed), or ``None`` for all (``n <= 0`` or ``n >= len(labels)``)."""
    if n <= 0 or n >= len(labels):
        return None
    return probe_indices(labels, n, seed)


def evaluate_attacks(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    attacks: Sequence[Attack | None],
    *,
    device: torch.device,
    batch_size: int,
    seed: int = 0,
    split: str = "test",
    progress: bool = True,
    desc: str = "evaluate",
) -> list[AttackResult]:
    """Each attack on every batch of ``images`` (N, C, H, W) uint8 / ``labels`` (N,), in fp32, with a
    progress bar over (attack, batch). Random starts come from a generator seeded by ``seed``
    (one per attack, so adding an attack does not change another's numbers)."""
    results = []
    n_total = len(labels)
    starts = list(range(0, n_total, batch_size))
    bar = progress_bar(total=len(starts) * len(attacks), desc=desc, enabled=progress, leave=False)
    for attack in attacks:
        spec = CLEAN if attack is None else attack.spec()
        bar.set_postfix_str(spec.describe())
        key = f"{seed}/evaluate/{spec.attack}"
        generator = torch.Generator(device=device).manual_seed(zlib.crc32(key.encode()))
        correct = loss = 0.0
        start_time = time.perf_counter()
        for start in starts:
            x, y = images[start:start + batch_size], labels[start:start + batch_size]
            (r,) = evaluate(model, x, y, [attack], split=split, batch_size=batch_size, device=device,
                            generator=generator)
            correct += r.acc * r.n
            loss += r.loss * r.n
            bar.update(1)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start_time
        results.append(AttackResult(spec, correct / max(n_total, 1), loss / max(n_total, 1), n_total, seconds))
    bar.close()
    return results


def format_results(results: Sequence[AttackResult], *, split: str) -> str:
    """A small plain-text table: attack (spec), n, accuracy %, loss, seconds."""
    lines = [f"{'attack':<48} {'split':<6} {'n':>6} {'acc %':>7} {'loss':>7} {'seconds':>8}"]
    for r in results:
        lines.append(f"{r.spec.describe():<48} {split:<6} {r.n:>6} {100 * r.acc:>7.2f} {r.loss:>7.3f} {r.seconds:>8.1f}")
    return "\n".join(lines)


class FinalEvalHook(Hook):
    """``track --final-eval ATTACK ...``: when the run ends, evaluate the final model clean and under
    the named attacks on the seeded class-balanced test subset of ``--final-eval-size`` examples
    (the whole test set with 0), and log ``acc`` / ``loss`` / ``time_s`` rows with
    ``source=final-eval``, ``split=test``, the attack's spec and ``n``."""

    name = "final-eval"

    def __init__(self, attacks: Sequence[str], *, size: int = 1000):
        super().__init__(every_n_epochs=0)
        self.names = check_attack_names(["clean", *attacks], "--final-eval")
        self.size = int(size)

    def on_run_end(self, run: RunContext) -> None:
        cfg = run.config
        images, labels = run.data.test_x, run.data.test_y
        pick = subset(labels, self.size, cfg.seed)
        if pick is not None:
            images, labels = images[pick], labels[pick]
        eps = cfg.epsilon if getattr(cfg, "eval_epsilon", None) is None else cfg.eval_epsilon  # the run's eval radius
        settings = AttackSettings(eps, run.data.num_classes, cfg.eval_pgd_steps, cfg.eval_pgd_step_size,
                                  cfg.eval_restarts, cfg.seed)
        attacks = build_attacks(self.names, settings)
        results = evaluate_attacks(run.model, images, labels, attacks, device=run.device,
                                   batch_size=cfg.eval_batch_size, seed=cfg.seed, progress=False,
                                   desc="final evaluation")
        rows = [row for r in results for row in r.rows(epoch=run.epoch, step=run.step, split="test", source=self.name)]
        run.store.log_metrics(rows)
        print("final evaluation (model of epoch {}):\n{}".format(run.epoch, format_results(results, split="test")),
              flush=True)
