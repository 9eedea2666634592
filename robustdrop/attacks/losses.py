"""Attack losses beyond cross-entropy, in the ``loss_fn(logits, y, reduction=...)`` form that
:class:`~robustdrop.attacks.Attack` subclasses (e.g. :class:`~robustdrop.attacks.PGD`) accept."""

from __future__ import annotations

import torch


def cw_margin_loss(logits: torch.Tensor, y: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Carlini–Wagner margin loss ``max_{j≠y} z_j − z_y`` on the logits ``z`` (B, K), labels ``y`` (B,).

    Positive exactly when the example is misclassified (up to ties), so maximising it is the
    L∞ "CW" attack of the APART / fast-AT literature when used as PGD's ``loss_fn``
    (``PGD(eps, steps=20, loss_fn=cw_margin_loss)``). Unbounded (no κ clamp), computed in the
    logits' dtype. ``reduction``: ``"none"`` (B,), ``"sum"`` or ``"mean"``.
    """
    if logits.ndim != 2 or logits.shape[1] < 2:
        raise ValueError(f"cw_margin_loss needs logits of shape (B, K) with K >= 2, got {tuple(logits.shape)}")
    true = logits.gather(1, y.view(-1, 1)).squeeze(1)
    others = logits.masked_fill(torch.nn.functional.one_hot(y, logits.shape[1]).bool(), float("-inf"))
    margin = others.amax(dim=1) - true
    if reduction == "none":
        return margin
    if reduction == "sum":
        return margin.sum()
    if reduction == "mean":
        return margin.mean()
    raise ValueError(f"reduction must be 'none', 'sum' or 'mean', got {reduction!r}")


def loss_name(loss_fn) -> str:
    """The short name an attack's spec gives a loss (``pgd-cw``): ``cw`` for :func:`cw_margin_loss`,
    else the function's name, so metric rows under different losses never share an attack name."""
    return "cw" if loss_fn is cw_margin_loss else getattr(loss_fn, "__name__", type(loss_fn).__name__)
