"""Which cell starts next: the sweep's order, dependencies and the deadline (every backend's rule).

A cell is *ready* when every cell it runs after (``after``, ``"@cell"`` values) has finished, in
this sweep or before; the next cell to start is the first ready one in the sweep's order (most
valuable first). A cell whose dependency failed or was blocked is *blocked*: it is reported as
failed ("not run: needs X") without starting. After the deadline (or once ``stop`` says so: a
SIGTERM to the driver) nothing starts; the cells not started stay pending for the next run of the
sweep.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping, Sequence


class Schedule:
    """The cells to run, in order, with their dependencies.

    Args:
        cells: the cells to run, in the sweep's order.
        after: ``{cell: [cells it runs after]}`` (cells missing here have none).
        finished: cells already finished (before this run of the sweep).
        deadline: ``time.time()`` after which no cell starts (None: no deadline).
        stop: when it returns True the deadline has come, whatever the clock says (a signal).
    """

    def __init__(self, cells: Sequence[str], after: Mapping[str, Iterable[str]], finished: Iterable[str] = (),
                 deadline: float | None = None, stop: Callable[[], bool] | None = None):
        self.pending = list(cells)
        self.after = {c: list(after.get(c, ())) for c in cells}
        self.finished = set(finished)
        self.failed: set[str] = set()
        self.running: set[str] = set()
        self.deadline = deadline
        self.stop = stop

    def past_deadline(self) -> bool:
        if self.stop is not None and self.stop():
            return True
        return self.deadline is not None and time.time() >= self.deadline

    def blocked(self) -> list[tuple[str, str]]:
        """Pending cells that can never run now, with the dependency that failed; removes them."""
        out = []
        changed = True
        while changed:
            changed = False
            for cell in list(self.pending):
                bad = next((d for d in self.after[cell] if d in self.failed), None)
                if bad is not None:
                    self.pending.remove(cell)
                    self.failed.add(cell)
                    out.append((cell, bad))
                    changed = True
        return out

    def next_ready(self) -> str | None:
        """The first pending cell whose dependencies all finished (removed from pending), or None."""
        if self.past_deadline():
            return None
        for cell in self.pending:
            if all(d in self.finished for d in self.after[cell]):
                self.pending.remove(cell)
                self.running.add(cell)
                return cell
        return None

    def done(self, cell: str, status: str) -> None:
        """``cell`` ended ``finished``, ``failed`` (its dependents are blocked) or ``stopped`` (they wait)."""
        self.running.discard(cell)
        if status == "finished":
            self.finished.add(cell)
        elif status == "failed":
            self.failed.add(cell)

    def stuck(self) -> bool:
        """Nothing runs and nothing can start: the rest waits for cells that did not finish (stopped)."""
        return not self.running and (self.past_deadline() or not any(
            all(d in self.finished for d in self.after[c]) for c in self.pending))
