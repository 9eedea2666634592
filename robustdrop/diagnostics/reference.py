"""``strength-ref``: the paper's perturbation-strength measure (paper.md §3, Fig. 2).

A frozen, independently trained (robust) reference model — the paper's PGD-10 "referee" — is
evaluated every ``every`` epochs on the probe set under perturbations crafted against the CURRENT
model with FGSM (``attack=fgsm``), on random noise of the same L∞ size: uniform random signs ±ε
(``noise-sign``) and U(−ε, ε) (``noise-uniform``), and clean (``none``) — these three do not depend
on the current model, so every ``noise_every`` epochs and at the first and last; every
``pgd_every`` epochs and at the last one also under the run's evaluation PGD of the current model
(``attack=pgd``, the ceiling: as expensive as the probe evaluation's PGD, hence its own cadence).
Metric ``ref_acc``; lower = stronger.
When FGSM's ``ref_acc`` climbs to the noise level, FGSM perturbations have become random noise.

``--reference`` takes ``builtin:quick`` (shipped; the quick preset's default), ``auto`` (trained
once for the run's data, model and ε and cached), a run directory (its ``config.json`` and
``checkpoints/result.pt`` if present, else ``checkpoints/last.pt``) or a checkpoint file written by
robustdrop; :mod:`robustdrop.diagnostics.referees` finds it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from robustdrop.attacks import CLEAN, FGSM, PGD, AttackSpec, project, sign_noise, uniform_noise
from robustdrop.diagnostics.base import Diagnostic, Options, option
from robustdrop.diagnostics.measures import Mean, losses, take
from robustdrop.diagnostics.referees import ReferenceSource, find_reference
from robustdrop.errors import RobustdropError
from robustdrop.models import create_model

if TYPE_CHECKING:
    from robustdrop.engine import RunContext


def build_reference(source: ReferenceSource, *, num_classes: int, image_shape: tuple[int, int, int],
                    device: torch.device | str = "cpu", role: str = "reference") -> nn.Module:
    """The reference model for inputs of ``image_shape`` and ``num_classes`` classes, frozen, in eval
    mode; :class:`RobustdropError` if its weights do not fit that shape."""
    channels, height, _ = image_shape
    cfg = source.config
    try:
        model = create_model(cfg["model"], num_classes=num_classes, in_channels=channels, image_size=height,
                             width=cfg.get("width"), depth=cfg.get("depth"))
    except RobustdropError as exc:
        raise RobustdropError(f"{role} {source.path}: {exc}") from None
    expected = model.state_dict()
    for key, tensor in expected.items():
        got = source.weights.get(key)
        if got is None:
            raise RobustdropError(f"{role} {source.checkpoint} lacks weight {key!r} of a {cfg['model']}; "
                                  "it is not a checkpoint of that model")
        if tuple(got.shape) != tuple(tensor.shape):
            raise RobustdropError(
                f"{role} {source.checkpoint} does not fit this run: its {key} has shape {tuple(got.shape)}, this "
                f"run needs {tuple(tensor.shape)} ({num_classes} classes, input {channels}x{height}x{image_shape[2]}); "
                + ("use --reference auto (trains one on this data) or a reference trained on the same dataset"
                   if role == "reference" else f"use a {role} trained on the same dataset")
            )
    extra = sorted(set(source.weights) - set(expected))
    if extra:
        raise RobustdropError(f"{role} {source.checkpoint} has weights {extra[:3]} that a {cfg['model']} lacks; "
                              "it is not a checkpoint of that model")
    model.load_state_dict(source.weights)
    model.to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


@dataclass(frozen=True)
class ReferenceOptions(Options):
    every: int = option(1, "epochs between measurements", minimum=1)
    n: int = option(0, "probe examples used (0 = all)")
    pgd_every: int = option(5, "epochs between PGD ceilings, also at the last epoch (0 = never)")
    noise_every: int = option(5, "epochs between the referee's clean and random-noise accuracies (constant for a "
                                 "frozen referee), also at the first and last epoch", minimum=1)


class ReferenceStrengthDiagnostic(Diagnostic):
    """See the module docstring; options: :class:`ReferenceOptions`. ``n <= 0`` uses the whole
    probe set; ``pgd_every = 0`` skips the PGD ceiling (the most expensive part: the run's
    evaluation PGD once more). The referee's clean and random-noise accuracies do not depend on
    the current model, so they are measured every ``noise_every`` epochs (and at the first and
    last) and the latest values are published in between; each epoch's own cost is then one FGSM
    of the current model and one referee forward pass per probe batch."""

    name = "strength-ref"
    Options = ReferenceOptions
    needs_reference = True

    def __init__(self, reference: str | Path | ReferenceSource, **options: Any):
        o = ReferenceOptions(**options)
        super().__init__(o, every_n_epochs=o.every)
        self.source = reference if isinstance(reference, ReferenceSource) else find_reference(reference)
        self.reference: nn.Module | None = None
        self.fixed: dict[str, float] = {}  # the latest clean / noise accuracies of the referee

    @classmethod
    def from_config(cls, config: Any, **options: Any) -> ReferenceStrengthDiagnostic:
        return cls(config.reference, **options)

    def state_dict(self) -> dict[str, Any]:
        return {"fixed": dict(self.fixed)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.fixed = {k: float(v) for k, v in state.get("fixed", {}).items()}

    def on_run_start(self, run: RunContext) -> None:
        data = run.data
        self.reference = build_reference(self.source, num_classes=data.num_classes,
                                         image_shape=data.image_shape, device=run.device)
        if run.device.type == "cuda" and run.config.channels_last:
            self.reference = self.reference.to(memory_format=torch.channels_last)
        cfg = self.source.config
        same_data = cfg.get("dataset") == run.config.dataset
        if not same_data or cfg.get("epsilon") != run.config.epsilon:
            print(f"strength-ref: the reference ({self.source.describe()}) was trained on {cfg.get('dataset')} "
                  f"ε={cfg.get('epsilon')}; this run uses {run.config.dataset} ε={run.config.epsilon}", flush=True)
        if run.epoch == 0:
            run.store.log_event("reference", epoch=0, step=0, path=str(self.source.path),
                                checkpoint=str(self.source.checkpoint), model=cfg.get("model"),
                                method=cfg.get("method"), epsilon=cfg.get("epsilon"), dataset=cfg.get("dataset"),
                                reference_epoch=self.source.epoch, sha256=self.source.sha256)

    def on_epoch_end(self, run: RunContext, epoch: int) -> None:
        with self.timer(run):
            self._measure(run, epoch)

    def _measure(self, run: RunContext, epoch: int) -> None:
        ref, model, autocast = self.reference, run.model, run.autocast
        cfg = run.config
        eps = cfg.epsilon
        gen = run.generator(self.name)
        o, last = self.options, epoch == cfg.epochs
        with_pgd = o.pgd_every > 0 and (epoch % o.pgd_every == 0 or last)
        with_fixed = not self.fixed or epoch % o.noise_every == 0 or last
        fgsm = FGSM(eps)
        pgd = PGD(eps, steps=cfg.eval_pgd_steps, step_size=cfg.eval_pgd_step_size, restarts=cfg.eval_restarts)
        specs = {"fgsm": fgsm.spec()}
        if with_fixed:
            specs.update({"none": CLEAN, "noise-sign": AttackSpec("noise-sign", eps, 0, eps, 0),
                          "noise-uniform": AttackSpec("noise-uniform", eps, 0, eps, 0)})
        if with_pgd:
            specs["pgd"] = pgd.spec()
        correct = Mean()
        for x, y in take(run.probe_batches(), o.n):
            deltas = {}
            with autocast():
                deltas["fgsm"] = fgsm(model, x, y)
                if with_pgd:
                    deltas["pgd"] = pgd(model, x, y, gen)
            if with_fixed:
                deltas["none"] = torch.zeros_like(x)
                deltas["noise-sign"] = project(x, sign_noise(x, eps, gen), eps)
                deltas["noise-uniform"] = project(x, uniform_noise(x, eps, gen), eps)
            hits = {}
            for name, d in deltas.items():
                _, logits = losses(ref, x + d, y, autocast)
                hits[name.replace("-", "_")] = (logits.argmax(1) == y).float()
            correct.add(**hits)
        if not correct:
            return
        acc = correct.means()
        for name, spec in specs.items():
            self.log(run, "ref_acc", acc[name.replace("-", "_")], spec=spec, n=correct.count)
        if with_fixed:
            self.fixed = {"clean": acc["none"], "noise": acc["noise_sign"]}
        self.publish(run, ref_acc_fgsm=acc["fgsm"], ref_acc_noise=self.fixed["noise"], ref_acc_clean=self.fixed["clean"])
