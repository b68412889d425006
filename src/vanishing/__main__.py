"""``python -m vanishing``: the same as the ``vanishing`` command."""

from vanishing.cli import _console

if __name__ == "__main__":
    _console()
