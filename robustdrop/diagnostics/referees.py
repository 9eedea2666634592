"""Where a run's referee comes from: the ``--reference`` value (the paper's frozen robust model, §3, Fig. 2).

* a run directory or a checkpoint file written by robustdrop (:func:`find_reference`);
* ``builtin:NAME``: a referee shipped in the package, ``referees/NAME.pt`` (the weights and the
  config they were trained with, nothing else) with ``referees/NAME.json`` beside it, its provenance:
  config, seed, data checksum, final clean / PGD accuracy, the file's SHA-256 and the command that
  made it. The file is checked against its provenance every time it is loaded. ``builtin:quick``
  is the quick preset's (``python analyses/make_reference.py --preset quick``, docs/referee.md);
* ``auto``: a referee trained once for the run's data, model and ε (:func:`referee_config`: PGD-5,
  step 2.5ε/5, the run's optimizer, schedule and seed, at most 30 epochs) and cached as a run
  directory ``<cache>/referees/<model>-<key>/`` (``$ROBUSTDROP_CACHE``, else ``~/.cache/robustdrop``),
  keyed by everything that determines it (:func:`auto_key`); later runs reuse it.

Everything is read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from robustdrop._files import atomic_write, sha256_file
from robustdrop.data import default_cache_dir, load_dataset
from robustdrop.engine import TrackConfig, Trainer
from robustdrop.errors import RobustdropError
from robustdrop.formatting import format_eps
from robustdrop.store import RunLock, RunStore, atomic_write_text, load_checkpoint_file, result_checkpoint

if TYPE_CHECKING:
    from robustdrop.data import ImageData

BUILTIN_PREFIX = "builtin:"
AUTO = "auto"
REFEREE_FORMAT = "robustdrop-referee-1"  # the shipped weights file
BUILTIN_DIR = Path(__file__).with_name("referees")

# The auto referee's recipe. Bump AUTO_RECIPE_VERSION whenever what it trains changes: older cache
# entries are then ignored (their key differs).
AUTO_RECIPE_VERSION = 1
AUTO_PGD_STEPS = 5
AUTO_MAX_EPOCHS = 30
AUTO_MARKER = "referee.json"  # written into the cached run directory once the referee is complete
AUTO_RECIPE = (f"PGD-{AUTO_PGD_STEPS} (step 2.5ε/{AUTO_PGD_STEPS}) on the run's data, model and ε, with its optimizer, "
               f"schedule, augmentation and seed, for min(epochs, {AUTO_MAX_EPOCHS}) epochs")
# What a run's config passes on to its auto referee; every other field takes TrackConfig's default.
_INHERITED = (
    "dataset", "data_dir", "train_subset", "val_size", "augment", "pad_value", "model", "width", "depth", "epsilon",
    "attack_bn", "batch_size", "optimizer", "lr", "momentum", "cycle_momentum", "base_momentum", "max_momentum",
    "weight_decay", "schedule", "lr_peak_at", "cycle_epochs", "lr_milestones", "lr_gamma", "seed", "amp",
    "probe_size", "eval_epsilon", "eval_pgd_steps", "eval_pgd_step_size", "eval_restarts", "eval_batch_size",
    "eval_precision", "device", "channels_last", "threads",
)
# Fields that do not change the referee's weights: left out of the cache key (the data is keyed by
# its content, not by where it was read from).
_NOT_IN_KEY = (
    "dataset", "data_dir", "device", "threads", "channels_last", "probe_size", "eval_every", "test_every",
    "eval_epsilon", "eval_pgd_steps", "eval_pgd_step_size", "eval_restarts", "eval_batch_size", "eval_precision",
)


@dataclass
class ReferenceSource:
    """A reference model as found on disk (weights on the CPU, not yet built)."""

    path: Path
    checkpoint: Path
    config: dict[str, Any]
    weights: dict[str, torch.Tensor]
    epoch: int | None
    step: int | None = None
    sha256: str | None = None  # of the weights file, where it is recorded (shipped and cached referees)

    def describe(self) -> str:
        c = self.config
        eps = c.get("epsilon")
        eps_text = f" ε={format_eps(eps)}" if isinstance(eps, (int, float)) else ""
        width = f" width {c['width']:g}" if isinstance(c.get("width"), (int, float)) else ""
        at = f" epoch {self.epoch}" if self.epoch is not None else ""
        return f"{c.get('model')}{width} ({c.get('method')}{eps_text}) from {self.checkpoint}{at}"


# ---------------------------------------------------------------------------------------------
# run directories and checkpoint files
# ---------------------------------------------------------------------------------------------
def find_reference(path: str | Path, *, role: str = "reference") -> ReferenceSource:
    """Read a model: ``builtin:NAME``, a run directory or a checkpoint file; :class:`RobustdropError`
    if it is unusable. (``auto`` is resolved by :func:`auto_referee`, which needs the run's data.)

    ``role`` names the model in error messages (``reference``; ``robustdrop evaluate`` says ``checkpoint``).
    """
    if str(path).startswith(BUILTIN_PREFIX):
        return load_builtin(str(path)[len(BUILTIN_PREFIX):])
    if str(path) == AUTO:
        raise RobustdropError("--reference auto is resolved with the run's data; use build_hooks(config) or "
                              "auto_referee(config, data)")
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
        state = load_checkpoint_file(path, todo="give a run directory or one of its checkpoints/*.pt files" + (
            " (or --reference auto, builtin:quick)" if role == "reference" else ""))
        config = state.get("config")
        if not isinstance(config, dict):
            run_config = path.parent.parent / RunStore.CONFIG
            if not run_config.is_file():
                raise RobustdropError(f"{role} checkpoint {path} carries no config and has no run directory "
                                      "around it; give the run directory instead")
            config = RunStore.open(path.parent.parent).read_json(RunStore.CONFIG)
    elif role == "reference":
        raise RobustdropError(f"reference {path} does not exist; use --reference auto (trains one for this setting "
                              "once and caches it), builtin:quick, or a run directory of a PGD-trained run")
    else:
        raise RobustdropError(f"{role} {path} does not exist; give a run directory or a checkpoints/*.pt file")
    weights = state.get("model")
    if not isinstance(weights, dict) or "model" not in config:
        raise RobustdropError(f"{checkpoint} is not a robustdrop checkpoint with model weights; "
                              "give a run directory or a checkpoints/*.pt file written by robustdrop")
    epoch, step = state.get("epoch"), state.get("step")
    return ReferenceSource(path, checkpoint, config, weights, int(epoch) if isinstance(epoch, int) else None,
                           int(step) if isinstance(step, int) else None)


# ---------------------------------------------------------------------------------------------
# shipped referees: builtin:NAME
# ---------------------------------------------------------------------------------------------
def builtin_names(directory: Path = BUILTIN_DIR) -> list[str]:
    """The shipped referees (``builtin:NAME``)."""
    return sorted(p.stem for p in directory.glob("*.json"))


def builtin_files(name: str, directory: Path = BUILTIN_DIR) -> tuple[Path, Path]:
    """``(weights .pt, provenance .json)`` of shipped referee ``name``; error if it is not shipped."""
    weights, provenance = directory / f"{name}.pt", directory / f"{name}.json"
    if not provenance.is_file() or not weights.is_file():
        names = ", ".join(f"builtin:{n}" for n in builtin_names(directory)) or "none"
        raise RobustdropError(f"no shipped referee builtin:{name} (shipped: {names}); use --reference auto to train "
                              "one for your setting, or a run directory")
    return weights, provenance


def verify_builtin(name: str, directory: Path = BUILTIN_DIR) -> tuple[dict[str, Any], dict[str, Any]]:
    """Check shipped referee ``name`` against its provenance and return ``(state, provenance)``.

    Raises :class:`RobustdropError` naming the file when the weights' SHA-256, format or config
    differ from what ``NAME.json`` records.
    """
    weights, provenance_path = builtin_files(name, directory)
    try:
        provenance = json.loads(provenance_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise RobustdropError(f"cannot read the referee provenance {provenance_path} ({exc}); reinstall robustdrop") from None
    digest = sha256_file(weights)
    if digest != provenance.get("sha256"):
        raise RobustdropError(f"shipped referee {weights} does not match its provenance {provenance_path.name} "
                              f"(SHA-256 {digest[:12]}… ≠ {str(provenance.get('sha256'))[:12]}…); reinstall robustdrop "
                              "or rerun analyses/make_reference.py")
    state = load_checkpoint_file(weights)
    if state.get("format") != REFEREE_FORMAT or not isinstance(state.get("model"), dict):
        raise RobustdropError(f"shipped referee {weights} is not a {REFEREE_FORMAT} file")
    if state.get("config") != provenance.get("config"):
        raise RobustdropError(f"shipped referee {weights} was trained with another config than its provenance "
                              f"{provenance_path.name} records; rerun analyses/make_reference.py")
    return state, provenance


def load_builtin(name: str, directory: Path = BUILTIN_DIR) -> ReferenceSource:
    """Shipped referee ``name``, verified (:func:`verify_builtin`)."""
    state, provenance = verify_builtin(name, directory)
    weights_path, _ = builtin_files(name, directory)
    return ReferenceSource(Path(f"{BUILTIN_PREFIX}{name}"), weights_path, state["config"], state["model"],
                           provenance.get("epoch"), sha256=provenance["sha256"])


def write_builtin(name: str, model_state: dict[str, torch.Tensor], config: dict[str, Any], provenance: dict[str, Any],
                  directory: Path = BUILTIN_DIR) -> tuple[Path, Path]:
    """Write shipped referee ``name``: the weights (CPU, fp32) and ``config`` into ``NAME.pt``, and
    ``provenance`` plus the config and the file's SHA-256 into ``NAME.json``."""
    weights, provenance_path = directory / f"{name}.pt", directory / f"{name}.json"
    state = {"format": REFEREE_FORMAT, "config": config,
             "model": {k: v.detach().to("cpu", torch.float32 if v.is_floating_point() else v.dtype).clone()
                       for k, v in model_state.items()}}
    atomic_write(weights, lambda f: torch.save(state, f))
    record = {**provenance, "config": config, "file": weights.name, "sha256": sha256_file(weights)}
    atomic_write_text(provenance_path, json.dumps(record, indent=2, sort_keys=True) + "\n")
    return weights, provenance_path


# ---------------------------------------------------------------------------------------------
# --reference auto
# ---------------------------------------------------------------------------------------------
def referee_config(config: TrackConfig) -> TrackConfig:
    """The config of the auto referee of a run of ``config`` (:data:`AUTO_RECIPE`)."""
    values = {name: getattr(config, name) for name in _INHERITED}
    epochs = min(config.epochs, AUTO_MAX_EPOCHS)
    values.update(method="pgd", pgd_steps=AUTO_PGD_STEPS, alpha=2.5 * config.epsilon / AUTO_PGD_STEPS,
                  epochs=epochs, eval_every=epochs, test_every=0, diagnostics=["none"], reference=None)
    return TrackConfig(**values).validate()


def auto_key(referee: TrackConfig, data: ImageData) -> tuple[str, dict[str, Any]]:
    """``(hex key, what it hashes)``: the recipe version, the data's content and every config value
    of ``referee`` (:func:`referee_config`) that changes its weights."""
    values = {k: v for k, v in referee.to_dict().items() if k not in _NOT_IN_KEY}
    payload = {"recipe_version": AUTO_RECIPE_VERSION, "data": data.fingerprint(), "config": values}
    key = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()
    return key, payload


def auto_referee(config: TrackConfig, data: ImageData | None = None, *, cache_dir: str | Path | None = None,
                 progress: bool = True) -> Path:
    """The cached run directory of the auto referee of a run of ``config``; trains it first if it
    is not cached (resuming an interrupted training). A cached referee whose marker, key or
    checkpoint checksum is wrong is a :class:`RobustdropError` naming the file."""
    if data is None:
        data = load_dataset(config.dataset, data_dir=config.data_dir)
    referee = referee_config(config)
    key, payload = auto_key(referee, data)
    run_dir = Path(cache_dir or default_cache_dir()) / "referees" / f"{referee.model}-{key[:16]}"
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    # Sweep cells of one setting share this referee: the first trains it, the others wait and reuse it.
    with RunLock(run_dir.parent, name=f".{run_dir.name}.lock",
                 wait=f"referee: another process is training {run_dir.name}; waiting for it"):
        return _cached_or_trained(referee, run_dir, key, payload, data, progress)


def _cached_or_trained(referee: TrackConfig, run_dir: Path, key: str, payload: dict, data: ImageData,
                       progress: bool) -> Path:
    marker = run_dir / AUTO_MARKER
    if marker.is_file():
        _check_cached(run_dir, key)
        print(f"referee: reusing {run_dir} (trained once for this data, model and ε)", flush=True)
        return run_dir
    _train(referee, run_dir, data, progress)
    checkpoint = result_checkpoint(run_dir)
    atomic_write_text(marker, json.dumps({
        "format": "robustdrop-referee-cache-1", "key": key, "recipe": AUTO_RECIPE, "keyed_on": payload,
        "checkpoint": str(checkpoint.relative_to(run_dir)), "sha256": sha256_file(checkpoint),
    }, indent=2, sort_keys=True) + "\n")
    print(f"referee: cached in {run_dir}; later runs of this setting reuse it", flush=True)
    return run_dir


def _train(referee: TrackConfig, run_dir: Path, data: ImageData, progress: bool) -> None:
    last = run_dir / "checkpoints" / "last.pt"
    resume = last.is_file() and (run_dir / RunStore.CONFIG).is_file()
    model = referee.model + (f" width {referee.width:g}" if referee.width is not None else "")
    print(f"referee: none cached for {data.name} / {model} / ε={format_eps(referee.epsilon)}; training one, "
          f"{AUTO_RECIPE} ({referee.epochs} epochs), into {run_dir}" + (" (resuming)" if resume else ""), flush=True)
    store = RunStore.open(run_dir) if resume else RunStore.create(run_dir.parent, run_dir.name, overwrite=True)
    Trainer(referee, store, [], resume=resume, progress=progress, data=data).fit()


def _check_cached(run_dir: Path, key: str) -> None:
    marker = run_dir / AUTO_MARKER
    try:
        record = json.loads(marker.read_text(encoding="utf-8"))
        recorded_key, checkpoint, digest = record["key"], run_dir / record["checkpoint"], record["sha256"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise RobustdropError(f"cached referee marker {marker} is unreadable ({type(exc).__name__}); delete {run_dir} "
                              "to train the referee again") from None
    if recorded_key != key:
        raise RobustdropError(f"cached referee {marker} was made for another setting (key {str(recorded_key)[:12]}…, "
                              f"this run needs {key[:12]}…); delete {run_dir} to train it again")
    if not checkpoint.is_file() or sha256_file(checkpoint) != digest:
        raise RobustdropError(f"cached referee {checkpoint} is missing or corrupt (its SHA-256 differs from {marker}); "
                              f"delete {run_dir} to train it again")
