"""``strength-ref``: the paper's perturbation-strength measure (paper.md §3, Fig. 2).

A frozen, independently trained (robust) reference model — the paper's PGD-10 "referee" — is
evaluated every ``every`` epochs on the probe set under perturbations crafted against the CURRENT
model with FGSM (``attack=fgsm``), on random noise of the same L∞ size: uniform random signs ±ε
(``noise-sign``) and U(−ε, ε) (``noise-uniform``), and clean (``none``); every ``pgd_every``
epochs and at the last one also under the run's evaluation PGD of the current model
(``attack=pgd``, the ceiling: as expensive as the probe evaluation's PGD, hence its own cadence).
Metric ``ref_acc``; lower = stronger.
When FGSM's ``ref_acc`` climbs to the noise level, FGSM perturbations have become random noise.

Train a reference once, e.g. on the quick preset::

    robustdrop track --preset quick --method pgd --pgd-steps 5 --name ref-quick
    robustdrop track --preset quick --reference runs/ref-quick

``--reference`` takes a run directory (its ``config.json`` and ``checkpoints/result.pt`` if
present, else ``checkpoints/last.pt``) or a checkpoint file written by robustdrop.
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
from robustdrop.errors import RobustdropError
from robustdrop.formatting import format_eps
from robustdrop.models import create_model
from robustdrop.store import RunStore, load_checkpoint_file, result_checkpoint

if TYPE_CHECKING:
    from robustdrop.engine import RunContext


@dataclass
class ReferenceSource:
    """A reference model as found on disk (weights on the CPU, not yet built)."""

    path: Path
    checkpoint: Path
    config: dict[str, Any]
    weights: dict[str, torch.Tensor]
    epoch: int | None
    step: int | None = None

    def describe(self) -> str:
        c = self.config
        eps = c.get("epsilon")
        eps_text = f" ε={format_eps(eps)}" if isinstance(eps, (int, float)) else ""
        at = f" epoch {self.epoch}" if self.epoch is not None else ""
        return f"{c.get('model')} ({c.get('method')}{eps_text}) from {self.checkpoint}{at}"


def find_reference(path: str | Path, *, role: str = "reference") -> ReferenceSource:
    """Read a model (run directory or checkpoint file); :class:`RobustdropError` if unusable.

    ``role`` names the model in error messages (``reference``; ``robustdrop evaluate`` says ``checkpoint``).
    """
    path = Path(path).expanduser()
    if path.is_dir():
        store = RunStore.open(path)  # raises if there is no config.json
        config = store.read_json(RunStore.CONFIG)
        checkpoint = result_checkpoint(path)
        if checkpoint is None:
            raise RobustdropError(f"{role} run {path} has no checkpoints/result.pt or checkpoints/last.pt; "
                                  "let it finish at least one epoch or give a checkpoint file")
        state = load_checkpoint_file(checkpoint)
    elif path.is_file():
        checkpoint = path
        state = load_checkpoint_file(path)
        config = state.get("config")
        if not isinstance(config, dict):
            run_config = path.parent.parent / RunStore.CONFIG
            if not run_config.is_file():
                raise RobustdropError(f"{role} checkpoint {path} carries no config and has no run directory "
                                      "around it; give the run directory instead")
            config = RunStore.open(path.parent.parent).read_json(RunStore.CONFIG)
    elif role == "reference":
        raise RobustdropError(f"reference {path} does not exist; train one first, e.g. `robustdrop track --preset quick "
                              "--method pgd --pgd-steps 5 --name ref-quick`, then pass --reference runs/ref-quick")
    else:
        raise RobustdropError(f"{role} {path} does not exist; give a run directory or a checkpoints/*.pt file")
    weights = state.get("model")
    if not isinstance(weights, dict) or "model" not in config:
        raise RobustdropError(f"{checkpoint} is not a robustdrop checkpoint with model weights; "
                              "give a run directory or a checkpoints/*.pt file written by robustdrop")
    epoch, step = state.get("epoch"), state.get("step")
    return ReferenceSource(path, checkpoint, config, weights, int(epoch) if isinstance(epoch, int) else None,
                           int(step) if isinstance(step, int) else None)


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
                f"use a {role} trained on the same dataset"
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


class ReferenceStrengthDiagnostic(Diagnostic):
    """See the module docstring; options: :class:`ReferenceOptions`. ``n <= 0`` uses the whole
    probe set; ``pgd_every = 0`` skips the PGD ceiling (the most expensive part: the run's
    evaluation PGD once more)."""

    name = "strength-ref"
    Options = ReferenceOptions
    needs_reference = True

    def __init__(self, reference: str | Path | ReferenceSource, **options: Any):
        o = ReferenceOptions(**options)
        super().__init__(o, every_n_epochs=o.every)
        self.source = reference if isinstance(reference, ReferenceSource) else find_reference(reference)
        self.reference: nn.Module | None = None

    @classmethod
    def from_config(cls, config: Any, **options: Any) -> ReferenceStrengthDiagnostic:
        return cls(config.reference, **options)

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
                                reference_epoch=self.source.epoch)

    def on_epoch_end(self, run: RunContext, epoch: int) -> None:
        with self.timer(run):
            self._measure(run, epoch)

    def _measure(self, run: RunContext, epoch: int) -> None:
        ref, model, autocast = self.reference, run.model, run.autocast
        cfg = run.config
        eps = cfg.epsilon
        gen = run.generator(self.name)
        every = self.options.pgd_every
        with_pgd = every > 0 and (epoch % every == 0 or epoch == cfg.epochs)
        fgsm = FGSM(eps)
        pgd = PGD(eps, steps=cfg.eval_pgd_steps, step_size=cfg.eval_pgd_step_size, restarts=cfg.eval_restarts)
        specs = {"none": CLEAN, "fgsm": fgsm.spec(), "noise-sign": AttackSpec("noise-sign", eps, 0, eps, 0),
                 "noise-uniform": AttackSpec("noise-uniform", eps, 0, eps, 0)}
        if with_pgd:
            specs["pgd"] = pgd.spec()
        correct = Mean()
        for x, y in take(run.probe_batches(), self.options.n):
            deltas = {"none": torch.zeros_like(x)}
            with autocast():
                deltas["fgsm"] = fgsm(model, x, y)
                if with_pgd:
                    deltas["pgd"] = pgd(model, x, y, gen)
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
        self.publish(run, ref_acc_fgsm=acc["fgsm"], ref_acc_noise=acc["noise_sign"], ref_acc_clean=acc["none"])
