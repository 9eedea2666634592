"""User-facing errors and interruptions.

A :class:`RobustdropError` carries one line that says what is wrong and what to do about it.
The CLI prints it without a traceback and exits with status 2. :class:`FileWriteError` is the one
raised when a file cannot be written (disk full, no permission, read-only folder).
:class:`RunInterrupted` ends a run that was asked to stop (SIGINT, SIGTERM) after its checkpoint
was written; the CLI exits with ``128 + signal`` (130, 143).
"""

import signal


def first_line(exc: BaseException, limit: int = 200) -> str:
    """The first line of an exception's message (at most ``limit`` characters; the type's name if
    empty): how a foreign error is quoted inside a one-line :class:`RobustdropError`."""
    text = str(exc).strip()
    if text.startswith("Weights only load failed"):  # torch's many-line advice is not for our users
        return "not a file torch.load(weights_only=True) can read"
    return text.splitlines()[0][:limit] if text else type(exc).__name__


class RobustdropError(Exception):
    """An error caused by the user's input (flag, file, data) or environment, not by a bug."""


class FileWriteError(RobustdropError):
    """A file could not be written; the previous file at that path is unchanged."""


class RunInterrupted(KeyboardInterrupt):
    """A run stopped on SIGINT / SIGTERM after saving a checkpoint it can be resumed from.

    A :class:`KeyboardInterrupt`, so ``except Exception`` does not swallow it. ``exit_code`` is the
    shell's convention for death by that signal (130 for SIGINT, 143 for SIGTERM).
    """

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = int(signum)
        self.message = message

    @property
    def exit_code(self) -> int:
        return 128 + self.signum

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.signum).name

    def __str__(self) -> str:
        return self.message
