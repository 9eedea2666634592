"""Model registry: adding a model is one file and one ``@register_model`` line."""

from __future__ import annotations

import inspect
from collections.abc import Callable

from torch import nn

from robustdrop.errors import RobustdropError
from robustdrop.registry import Registry

MODELS: Registry[Callable[..., nn.Module]] = Registry("model", sort=True)  # name -> factory(**kwargs)


def register_model(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    return MODELS.register(name)


def available_models() -> list[str]:
    return MODELS.names()


def check_model(name: str) -> None:
    """Raise :class:`RobustdropError` unless ``name`` is a registered model."""
    MODELS.check(name)


def create_model(
    name: str,
    *,
    num_classes: int = 10,
    in_channels: int = 3,
    image_size: int = 32,
    width: float | None = None,
    depth: int | None = None,
) -> nn.Module:
    """Build a registered model.

    Args:
        name: registry name (see :func:`available_models`).
        num_classes: output logits.
        in_channels, image_size: input shape ``(B, in_channels, image_size, image_size)``.
        width: the model's width knob (a multiplier for ``preactresnet18``, the number of filters for
            ``cnn1`` and ``smallcnn``, the widen factor for ``wideresnet``); ``None`` takes the model's default.
        depth: the depth of models that have one (``wideresnet``: 6n+4); ``None`` takes the default.
    """
    check_model(name)
    kwargs = {"num_classes": num_classes, "in_channels": in_channels, "image_size": image_size}
    if width is not None:
        if width <= 0:
            raise RobustdropError(f"--width must be positive, got {width}")
        kwargs["width"] = width
    if depth is not None:
        if "depth" not in inspect.signature(MODELS[name]).parameters:
            with_depth = [n for n in available_models() if "depth" in inspect.signature(MODELS[n]).parameters]
            raise RobustdropError(f"--depth does not apply to {name!r}; drop it (models with a depth: "
                                  f"{', '.join(with_depth)})")
        kwargs["depth"] = int(depth)
    return MODELS[name](**kwargs)
