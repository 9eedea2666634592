"""A registry: the one list of the names of one kind of thing (methods, models, diagnostics).

Each kind keeps one :class:`Registry`; everything that lists, offers or validates those names (the
config, the CLI's choices and help, ``--diagnostics``) reads it, so a name registered by a user is
accepted everywhere. May import only :mod:`robustdrop.errors`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Generic, TypeVar

from robustdrop.errors import RobustdropError

T = TypeVar("T")


class Registry(Mapping[str, T], Generic[T]):
    """Names → registered objects, read-only as a mapping, in registration order.

    Args:
        kind: what is registered, for messages (``"method"``).
        sort: list :meth:`names` alphabetically instead of in registration order.

    Examples:
        >>> MODELS = Registry("model")
        >>> @MODELS.register("tiny")
        ... def tiny(**kwargs): ...
        >>> MODELS.check("huge")
        Traceback (most recent call last):
        robustdrop.errors.RobustdropError: unknown model 'huge'; choose one of: tiny
    """

    def __init__(self, kind: str, *, sort: bool = False):
        self.kind = kind
        self.sort = sort
        self._entries: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator: register the decorated object as ``name`` (a name may be registered once)."""
        def decorator(obj: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} registered twice")
            self._entries[name] = obj
            return obj

        return decorator

    def names(self) -> list[str]:
        return sorted(self._entries) if self.sort else list(self._entries)

    def check(self, name: str) -> None:
        """Raise :class:`RobustdropError` (listing the valid names) unless ``name`` is registered."""
        if name not in self._entries:
            raise RobustdropError(f"unknown {self.kind} {name!r}; choose one of: {', '.join(self.names())}")

    def __getitem__(self, name: str) -> T:
        return self._entries[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)
