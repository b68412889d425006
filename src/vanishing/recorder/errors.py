"""The error a run directory raises when it cannot be read; importable without the reader."""

from __future__ import annotations

__all__ = ["RunError"]


class RunError(ValueError):
    """A path that is not a readable run directory, or a run with nothing to read yet.

    Example:
        >>> from vanishing.recorder.errors import RunError
        >>> issubclass(RunError, ValueError)
        True
    """
