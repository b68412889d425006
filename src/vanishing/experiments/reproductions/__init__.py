"""Published experiments reproduced under the monitor: ``vanishing reproduce NAME``.

Each reproduction is a module here with a ``reproduce(...)`` function; this package stays light
(no torch import) so that the command line can list the names cheaply.

Example:
    >>> from vanishing.experiments.reproductions import AVAILABLE
    >>> AVAILABLE
    ('nielsen',)
"""

from __future__ import annotations

#: names accepted by ``vanishing reproduce NAME``, each a module of this package
AVAILABLE = ("nielsen",)
