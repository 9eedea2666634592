"""A user's own model and checkpoints: ``--model package.module:factory`` and ``--checkpoints GLOB``.

robustdrop diagnoses models it did not train (``robustdrop diagnose``, ``robustdrop evaluate
--model``). This module is the one place that

* builds the user's architecture from a factory (:func:`build_user_model`): ``package.module:name``
  (imported like ``python -m`` would, the current directory first) or ``path/to/file.py:name``;
  ``name`` is a function or class called with **no arguments**, or with ``num_classes=`` only when
  its signature has a ``num_classes`` parameter (then robustdrop passes the dataset's class count);
* reads the weights of a checkpoint that any code saved (:func:`read_user_weights`), always with
  ``torch.load(weights_only=True)``: a raw ``state_dict``, or a dict holding it under
  ``"state_dict"`` (Lightning), ``"model_state_dict"`` or ``"model"`` (robustdrop, many scripts);
* fits them to the model (:func:`fit_weights`): a ``module.`` (DataParallel / DDP) or
  ``_orig_mod.`` (``torch.compile``) prefix is dropped, and a prefix shared by the model's keys (a
  LightningModule's attribute, ``model.``) is found and dropped; anything else that does not fit
  is a one-line error naming a missing or unexpected key or the two shapes;
* numbers checkpoint files by epoch (:func:`checkpoint_epoch`, :func:`find_checkpoints`);
* reads ``--normalize`` (:func:`parse_normalize`); the model that takes normalized inputs is seen
  from [0, 1] pixel space through :class:`Normalized`.

Epoch rule (robustdrop's epochs count from 1: epoch ``e`` is the model after ``e`` training epochs):
a Lightning checkpoint (it records ``pytorch-lightning_version``) is epoch ``checkpoint["epoch"] + 1``
(Lightning counts from 0: ``epoch=0-step=97.ckpt`` holds the first finished epoch); any other
file is numbered by its name: the number after ``epoch`` (``epoch_12.pt``, ``epoch-12``,
``ckpt-epoch=03.ckpt``, ``model_epoch12.pth``), else the name's only number (``12.pt``,
``ckpt_0012.pth``); a name with neither is an error, as are two files of one epoch.
"""

from __future__ import annotations

import glob
import importlib
import importlib.util
import inspect
import os
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from robustdrop.errors import RobustdropError, first_line

WEIGHT_KEYS = ("state_dict", "model_state_dict", "model")  # where a checkpoint dict keeps the weights, in order
WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DataParallel / DDP, torch.compile
LIGHTNING_MARK = "pytorch-lightning_version"
# Per-channel mean / std of CIFAR-10's training set, as the field's reference scripts normalize with
# (Wong et al. 2020, fast_adversarial).
NAMED_NORMALIZATIONS = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616)),
}
_EPOCH_WORD = re.compile(r"epoch[_\-=]?(\d+)", re.IGNORECASE)
_NUMBER = re.compile(r"\d+")


# ---------------------------------------------------------------------------------------------
# the architecture
# ---------------------------------------------------------------------------------------------
def load_factory(spec: str) -> Callable[..., nn.Module]:
    """The callable named by ``spec`` (``package.module:name`` or ``file.py:name``)."""
    module_name, sep, attr = str(spec).rpartition(":")
    if not sep or not module_name or not attr or not attr.replace(".", "").replace("_", "").isalnum():
        raise RobustdropError(f"--model {spec!r}: give package.module:factory (or path/to/file.py:factory), e.g. "
                              "mynets.resnet:PreActResNet18")
    module = _import(module_name, spec)
    target: Any = module
    for part in attr.split("."):
        if not hasattr(target, part):
            names = [n for n in dir(module) if not n.startswith("_") and callable(getattr(module, n))]
            raise RobustdropError(f"--model {spec}: {module_name} has no {attr!r} (it defines: "
                                  f"{', '.join(names[:8]) or 'nothing callable'})")
        target = getattr(target, part)
    if not callable(target):
        raise RobustdropError(f"--model {spec}: {attr} is a {type(target).__name__}, not a function or class that "
                              "builds the model")
    return target


def _import(module_name: str, spec: str) -> Any:
    """Import ``module_name`` (a dotted name, searched from the current directory first, or a .py file)."""
    try:
        if module_name.endswith(".py"):
            path = Path(module_name)
            if not path.is_file():
                raise RobustdropError(f"--model {spec}: file {path} does not exist")
            loader_spec = importlib.util.spec_from_file_location(f"_robustdrop_user_{path.stem}", path)
            module = importlib.util.module_from_spec(loader_spec)
            loader_spec.loader.exec_module(module)
            return module
        if os.getcwd() not in sys.path and "" not in sys.path:  # the `robustdrop` script lacks it; python -m has it
            sys.path.insert(0, os.getcwd())
        return importlib.import_module(module_name)
    except RobustdropError:
        raise
    except ModuleNotFoundError as exc:
        if exc.name and module_name.startswith(exc.name):
            raise RobustdropError(f"--model {spec}: cannot import {module_name} (no module {exc.name!r}); run from the "
                                  "folder that holds it, add that folder to PYTHONPATH, or give path/to/file.py:factory"
                                  ) from None
        raise RobustdropError(f"--model {spec}: importing {module_name} failed: {first_line(exc)}") from None
    except Exception as exc:  # the user's module raised while being imported
        raise RobustdropError(f"--model {spec}: importing {module_name} failed: {type(exc).__name__}: "
                              f"{first_line(exc)}") from None


def build_user_model(spec: str, *, num_classes: int) -> nn.Module:
    """Build the model of ``spec``: the factory called with no arguments, or with
    ``num_classes=num_classes`` when its signature has that parameter."""
    factory = load_factory(spec)
    kwargs: dict[str, Any] = {}
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):  # builtins without a signature: call as documented
        params = {}
    if "num_classes" in params:
        kwargs["num_classes"] = num_classes
    required = [n for n, p in params.items() if n not in kwargs and p.default is p.empty
                and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    if required:
        raise RobustdropError(f"--model {spec} needs arguments {', '.join(required)}; give a factory that takes none "
                              "(or only num_classes), e.g. def make(): return Net(width=64)")
    try:
        model = factory(**kwargs)
    except Exception as exc:  # the user's code
        raise RobustdropError(f"--model {spec}: calling it failed: {type(exc).__name__}: {first_line(exc)}") from None
    if not isinstance(model, nn.Module):
        raise RobustdropError(f"--model {spec} returned a {type(model).__name__}, not a torch.nn.Module")
    return model


# ---------------------------------------------------------------------------------------------
# normalized inputs
# ---------------------------------------------------------------------------------------------
def parse_normalize(values: Sequence[str] | None) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    """``--normalize``: ``cifar10`` or ``MEAN STD``, each one number or comma-separated numbers
    (one per channel). Returns ``(mean, std)``, or ``None`` when not given."""
    if not values:
        return None
    usage = ("--normalize takes MEAN STD (one value or one per channel, comma-separated, e.g. --normalize "
             "0.4914,0.4822,0.4465 0.2471,0.2435,0.2616) or a name: " + ", ".join(NAMED_NORMALIZATIONS))
    if len(values) == 1 and values[0] in NAMED_NORMALIZATIONS:
        return NAMED_NORMALIZATIONS[values[0]]
    if len(values) != 2:
        raise RobustdropError(f"{usage}; got {' '.join(values)}")
    try:
        mean, std = (tuple(float(v) for v in text.split(",")) for text in values)
    except ValueError:
        raise RobustdropError(f"{usage}; got {' '.join(values)}") from None
    return mean, std


# ---------------------------------------------------------------------------------------------
# checkpoint files
# ---------------------------------------------------------------------------------------------
def load_user_checkpoint(path: str | os.PathLike, *, mmap: bool = False) -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU; ``mmap`` maps the tensors instead of
    reading them (cheap, for checking many files). One-line error for an unreadable file."""
    path = Path(path)
    if not path.is_file():
        raise RobustdropError(f"checkpoint {path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except RuntimeError as exc:
        if mmap and "mmap" in str(exc).lower():  # the legacy (non-zip) format cannot be mapped
            return load_user_checkpoint(path)
        raise _unreadable(path, exc) from None
    except Exception as exc:  # torch raises many types for corrupt or foreign files
        raise _unreadable(path, exc) from None


def _unreadable(path: Path, exc: BaseException) -> RobustdropError:
    return RobustdropError(f"cannot read checkpoint {path} with torch.load(weights_only=True) ({first_line(exc)}); "
                           "save model.state_dict() (or a dict holding it) rather than the model object")


def _is_weights(obj: Any) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def read_user_weights(state: Any, path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The model weights in a loaded checkpoint ``state`` (see :data:`WEIGHT_KEYS`)."""
    if _is_weights(state):
        return dict(state)
    if isinstance(state, dict):
        for key in WEIGHT_KEYS:
            if _is_weights(state.get(key)):
                return dict(state[key])
        keys = ", ".join(map(str, list(state)[:6]))
        raise RobustdropError(f"checkpoint {path} holds no model weights (its keys: {keys}); save model.state_dict() "
                              f"or a dict with it under one of {', '.join(WEIGHT_KEYS)}")
    raise RobustdropError(f"checkpoint {path} holds a {type(state).__name__}, not a state_dict; save "
                          "model.state_dict() (or a dict holding it)")


def _strip_wrappers(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for prefix in WRAPPER_PREFIXES:
            if key.startswith(prefix):
                key, changed = key[len(prefix):], True
    return key


def _candidates(weights: dict[str, torch.Tensor]) -> list[tuple[str, dict[str, torch.Tensor]]]:
    """``(prefix, weights under it with the prefix and wrapper prefixes dropped)``, shortest prefix first."""
    prefixes = {""}
    for key in weights:
        parts = key.split(".")
        prefixes.update(".".join(parts[:i]) + "." for i in range(1, len(parts)))
    out = []
    for prefix in sorted(prefixes, key=lambda p: (p.count("."), p)):
        sub = {_strip_wrappers(k[len(prefix):]): v for k, v in weights.items() if k.startswith(prefix)}
        out.append((prefix, sub))
    return out


def fit_weights(model: nn.Module, weights: dict[str, torch.Tensor], path: str | os.PathLike,
                spec: str = "--model") -> dict[str, torch.Tensor]:
    """``weights`` renamed to ``model``'s keys (see the module docstring); error if they do not fit.
    The result loads with ``model.load_state_dict(..., strict=True)``."""
    expected = model.state_dict()
    want = set(expected)
    best: tuple[int, str, dict[str, torch.Tensor]] | None = None
    for prefix, sub in _candidates(weights):
        if prefix and not want & set(sub):
            continue
        if set(sub) == want:
            best = (len(want) + 1, prefix, sub)
            break
        overlap = len(want & set(sub))
        if best is None or overlap > best[0]:
            best = (overlap, prefix, sub)
    assert best is not None
    _, prefix, sub = best
    where = f" (under {prefix!r})" if prefix else ""
    missing, unexpected = sorted(want - set(sub)), sorted(set(sub) - want)
    if missing:
        raise RobustdropError(f"checkpoint {path} does not fit {spec}: it lacks {missing[0]!r}{where}"
                              + (f" and {len(missing) - 1} more" if len(missing) > 1 else "")
                              + (f"; it has {unexpected[0]!r}" if unexpected else "")
                              + "; check that --model builds the architecture that was trained")
    if unexpected:
        raise RobustdropError(f"checkpoint {path} does not fit {spec}: it has {unexpected[0]!r}{where}"
                              + (f" and {len(unexpected) - 1} more" if len(unexpected) > 1 else "")
                              + " that the model lacks; check that --model builds the architecture that was trained")
    for key, tensor in expected.items():
        if tuple(sub[key].shape) != tuple(tensor.shape):
            raise RobustdropError(f"checkpoint {path} does not fit {spec}: its {key} has shape {tuple(sub[key].shape)}, "
                                  f"the model's is {tuple(tensor.shape)}; check the factory's width / classes")
    return sub


def load_user_weights(model: nn.Module, path: str | os.PathLike, spec: str = "--model") -> Any:
    """Load checkpoint ``path`` into ``model`` (in place); returns the loaded checkpoint object."""
    state = load_user_checkpoint(path)
    model.load_state_dict(fit_weights(model, read_user_weights(state, path), path, spec))
    return state


# ---------------------------------------------------------------------------------------------
# a series of per-epoch checkpoints
# ---------------------------------------------------------------------------------------------
def is_lightning(state: Any) -> bool:
    return isinstance(state, dict) and LIGHTNING_MARK in state and isinstance(state.get("epoch"), int)


def epoch_from_name(path: str | os.PathLike) -> int:
    """The epoch in a checkpoint's file name (see the module docstring's rule)."""
    name = Path(path).name
    stem = name.split(".")[0] if not name.startswith(".") else name
    found = _EPOCH_WORD.findall(stem)
    if found:
        return int(found[-1])
    numbers = _NUMBER.findall(stem)
    if len(numbers) == 1:
        return int(numbers[0])
    raise RobustdropError(f"cannot tell the epoch of {path} from its name: name the files epoch_N.pt (e.g. "
                          "epoch_12.pt) or with a single number, or narrow --checkpoints to the per-epoch files")


def checkpoint_epoch(path: str | os.PathLike, state: Any) -> int:
    """The robustdrop epoch (from 1) of checkpoint ``path`` whose loaded content is ``state``."""
    if is_lightning(state):
        return int(state["epoch"]) + 1
    return epoch_from_name(path)


def expand_checkpoints(pattern: str) -> list[Path]:
    """The files ``pattern`` (a glob, ``~`` and ``**`` allowed) matches; error if none."""
    matches = sorted(Path(p) for p in glob.glob(os.path.expanduser(pattern), recursive=True))
    files = [p for p in matches if p.is_file()]
    if not files:
        raise RobustdropError(f"--checkpoints {pattern!r} matches no file; quote the pattern so the shell does not "
                              "expand it, and check the folder (e.g. 'ckpts/epoch_*.pt')")
    return files


def checkpoint_step(state: Any) -> int:
    """The optimizer step a loaded checkpoint records (``global_step``, Lightning's, or ``step``), else 0."""
    if isinstance(state, dict):
        for key in ("global_step", "step"):
            value = state.get(key)
            if isinstance(value, int) and not isinstance(value, bool):
                return int(value)
    return 0


def find_checkpoints(pattern: str) -> list[tuple[int, Path, int]]:
    """``(epoch, file, step)`` of every checkpoint ``pattern`` matches, by epoch; each file read once
    memory-mapped (cheap) to check that it loads and to number it. Errors: no file, an epoch below
    1 (robustdrop's epoch 0 is before training), two files of one epoch."""
    by_epoch: dict[int, tuple[Path, int]] = {}
    for path in expand_checkpoints(pattern):
        state = load_user_checkpoint(path, mmap=True)
        epoch = checkpoint_epoch(path, state)
        if epoch < 1:
            raise RobustdropError(f"{path} is epoch {epoch}: epochs count from 1 (epoch 1 = after the first training "
                                  "epoch); leave out the checkpoint of the initial weights")
        if epoch in by_epoch:
            raise RobustdropError(f"two checkpoints of epoch {epoch}: {by_epoch[epoch][0]} and {path}; narrow "
                                  "--checkpoints to one file per epoch (e.g. leave out last.ckpt)")
        by_epoch[epoch] = (path, checkpoint_step(state))
    return [(epoch, path, step) for epoch, (path, step) in sorted(by_epoch.items())]


# ----------------------------------------------------------------------------------------------
# Pixel space for models that take normalized inputs (the Monitor, evaluate --normalize, diagnose)
# ----------------------------------------------------------------------------------------------
class Normalized(nn.Module):
    """``model((x - mean) / std)``: a [0, 1]-pixel view of a model that takes normalized inputs.
    Holds the user's model as a submodule; changes nothing in it. ``mean``, ``std``: per channel."""

    def __init__(self, model: nn.Module, mean: torch.Tensor, std: torch.Tensor):
        super().__init__()
        self.model = model
        self.register_buffer("mean", mean.view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", std.view(1, -1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model((x - self.mean) / self.std)


def normalization(normalize: Any, channels: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(mean, std)`` as float32 ``(C,)`` tensors on ``device``; one value is repeated for every channel."""
    if normalize is None:
        return None
    try:
        mean, std = normalize
        mean = torch.as_tensor(mean, dtype=torch.float32).flatten()
        std = torch.as_tensor(std, dtype=torch.float32).flatten()
    except (TypeError, ValueError):
        raise RobustdropError("normalize must be (mean, std), each one number or one per channel, e.g. "
                              "((0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616))") from None
    out = []
    for name, t in (("mean", mean), ("std", std)):
        if t.numel() == 1:
            t = t.repeat(channels)
        if t.numel() != channels:
            raise RobustdropError(f"normalize: {name} has {t.numel()} values, the probe images have {channels} "
                                  "channels; give one value per channel")
        if not torch.isfinite(t).all():
            raise RobustdropError(f"normalize: {name} {t.tolist()} is not finite")
        out.append(t.to(device))
    if (out[1] <= 0).any():
        raise RobustdropError(f"normalize: std {out[1].tolist()} must be positive")
    return out[0], out[1]
