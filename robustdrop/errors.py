"""User-facing errors.

A :class:`RobustdropError` carries one line that says what is wrong and what to do about it.
The CLI prints it without a traceback and exits with status 2.
"""


class RobustdropError(Exception):
    """An error caused by the user's input (flag, file, data), not by a bug."""
