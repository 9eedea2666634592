"""Progress bars: drawn on a terminal, left out of log files.

A tqdm bar redrawn into a file is one carriage-return update after another (about 270 KB of them
for one quick run redirected with ``> log 2>&1``); a log already has the per-epoch summary lines
and a sweep's per-cell lines, which say the same once per epoch or cell. So a bar is drawn only
when asked for and its stream is a terminal, or in a notebook (tqdm.auto's widget, which writes
no text). A command that keeps its own log prints into the terminal and the log at once
(:func:`tee_stdout`; not a terminal, so no bar is drawn into it). Imports only tqdm.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
from collections.abc import Iterator
from typing import IO, Any

from tqdm import autonotebook, std
from tqdm.auto import tqdm


def draws_bars(stream: IO | None = None) -> bool:
    """Whether a bar on ``stream`` (default stderr) would be seen rather than logged: a terminal,
    or a notebook (where tqdm.auto is its widget)."""
    if autonotebook.tqdm is not std.tqdm:  # tqdm.auto chose the notebook widget: no text goes to any log
        return True
    stream = sys.stderr if stream is None else stream
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def progress_bar(*, enabled: bool = True, file: IO | None = None, **kwargs: Any) -> tqdm:
    """A tqdm bar (``kwargs`` as tqdm's), disabled (drawing nothing; its methods still work, so
    callers need no second code path) unless ``enabled`` and :func:`draws_bars`."""
    return tqdm(file=file, disable=not (enabled and draws_bars(file)), dynamic_ncols=True, **kwargs)


class _Tee(io.TextIOBase):
    """Text written to every stream of ``streams``."""

    def __init__(self, *streams: IO):
        self.streams = streams

    def write(self, text: str) -> int:
        for stream in self.streams:
            stream.write(text)
        return len(text)

    def flush(self) -> None:
        for stream in self.streams:
            stream.flush()


@contextlib.contextmanager
def tee_stdout(log: str | os.PathLike) -> Iterator[None]:
    """Within the block, what is printed goes to stdout as before and is appended to the file
    ``log`` too (a command's own record of what it said, kept across commands)."""
    with open(log, "a", encoding="utf-8") as file, contextlib.redirect_stdout(_Tee(sys.stdout, file)):
        yield
