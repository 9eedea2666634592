"""``robustdrop diagnose``: the diagnostics of a finished training, from its per-epoch checkpoints.

>>> from robustdrop.diagnose import diagnose_checkpoints
>>> run = diagnose_checkpoints("ckpts/epoch_*.pt", model="mynets:make_model", epsilon=8/255,
...                            normalize=((0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616)),
...                            reference="builtin:quick", name="my-fgsm-offline")

Nothing is trained again: each checkpoint's weights (any code's, in the usual formats; see
:mod:`robustdrop.models.user`) are loaded into the user's architecture and the epoch's end runs
as it would have during training, through the Monitor's replay
(:meth:`robustdrop.Monitor.replay`): the probe evaluation (clean, FGSM, PGD-20 on the seeded
class-balanced ``probe_size`` test subset), the default diagnostics (strength vs noise, gradient
alignment, cos(δ_FGSM, δ_PGD), snapshots, the referee's ``strength-ref``) and the collapse
detector. The result is an ordinary run directory: ``plot collapse``, ``plot curves``,
``compare``, ``export`` read it. What the checkpoints cannot tell (the training perturbations,
the training loss) is absent from it.

Everything is checked before the run directory exists: the factory, the data, the normalization,
ε, the referee, the model's output, and that every checkpoint loads and fits the model (each
file is read memory-mapped for this, so the check is cheap). Epoch numbers come from the files
(:func:`robustdrop.models.user.checkpoint_epoch`).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch

from robustdrop.data import load_dataset
from robustdrop.engine.trainer import resolve_device
from robustdrop.errors import RobustdropError
from robustdrop.models.user import (
    build_user_model,
    expand_checkpoints,
    find_checkpoints,
    fit_weights,
    is_lightning,
    load_user_checkpoint,
    read_user_weights,
)

DEFAULT_DATASET = "cifar10-jpeg"  # the embedded copy: works without downloads


def plan_checkpoints(pattern: str, model: torch.nn.Module, spec: str) -> list[tuple[int, Path, int]]:
    """:func:`~robustdrop.models.user.find_checkpoints` of ``pattern``, each file checked to load
    into ``model`` (read memory-mapped: cheap); a one-line error names the first that does not."""
    plan = find_checkpoints(pattern)
    for _, path, _ in plan:
        fit_weights(model, read_user_weights(load_user_checkpoint(path, mmap=True), path), path, spec)
    return plan


def diagnose_checkpoints(
    checkpoints: str,
    *,
    model: str,
    epsilon: float,
    normalize: tuple | None = None,
    dataset: str = DEFAULT_DATASET,
    data_dir: str | None = None,
    probe_size: int = 1000,
    reference: str | None = "builtin:quick",
    diagnostics: list[str] | None = None,
    seed: int = 0,
    runs_dir: str | os.PathLike = "runs",
    name: str | None = None,
    overwrite: bool = False,
    device: str = "auto",
    progress: bool = True,
) -> Path:
    """Replay the diagnostics over the checkpoints ``checkpoints`` (a glob) matches; returns the
    run directory ``runs_dir/name``. See the module docstring; ``model``: ``package.module:factory``;
    ``epsilon`` in [0, 1] pixel units; ``normalize``: ``(mean, std)`` per channel when the model
    takes normalized inputs; ``reference``: the referee (``None``: no ``strength-ref``)."""
    from robustdrop.monitor import Monitor  # the api layer, above this module's other imports

    if not isinstance(epsilon, (int, float)) or not 0 < float(epsilon) <= 1:
        raise RobustdropError(f"--epsilon must be in (0, 1], in pixel units (e.g. 8/255), got {epsilon}")
    expand_checkpoints(checkpoints)  # a glob matching nothing fails before the data is read
    data = load_dataset(dataset, data_dir=data_dir)
    dev = resolve_device(device)
    net = build_user_model(model, num_classes=data.num_classes)
    plan = plan_checkpoints(checkpoints, net, model)
    net.to(dev)
    name = name or f"diagnose-{plan[0][1].parent.name or 'checkpoints'}"
    monitor = Monitor(net, epsilon=float(epsilon), probe=(data.test_x, data.test_y), normalize=normalize,
                      reference=reference, runs_dir=runs_dir, name=name, overwrite=overwrite, progress=False,
                      classes=data.classes, dataset=data.name, epochs=plan[-1][0],
                      probe_size=probe_size, seed=seed, diagnostics=diagnostics or ["default"])
    start = time.perf_counter()
    try:
        for i, (epoch, path, step) in enumerate(plan, 1):
            state = load_user_checkpoint(path)
            weights = fit_weights(net, read_user_weights(state, path), path, model)
            (report,) = monitor.replay([(epoch, weights, step)])
            if i == 1:  # the run directory exists from the first epoch's end on
                monitor.store.log_event("diagnose", epoch=0, step=0, checkpoints=checkpoints, model=model,
                                        normalize=[list(v) for v in normalize] if normalize else None,
                                        files=[str(p) for _, p, _ in plan])
            monitor.store.log_event("checkpoint", epoch=epoch, step=step, path=str(path),
                                    lightning=is_lightning(state))
            if progress:
                print(f"[{i}/{len(plan)} {time.perf_counter() - start:5.0f}s] {path.name}: {report.line()}", flush=True)
            del state, weights
    finally:
        monitor.close()
    return monitor.path
