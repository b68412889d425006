"""Verified repair (issue #16): try remedies on copies of a model and keep what fixes it.

:func:`repair` returns a :class:`Repair` (see :mod:`vanishing.repair.engine`); the model
transformations are in :mod:`vanishing.repair.transforms`. The package itself is callable, so
that ``vanishing.repair(model, batches, loss_fn)`` (the contract's spelling) and
``from vanishing.repair import Repair`` both work.

Example:
    >>> import vanishing
    >>> from vanishing.repair import Repair, repair
    >>> Repair(healthy=True, steps=10).candidates
    []
    >>> callable(vanishing.repair) and vanishing.repair.Repair is Repair
    True
"""

import sys
import types

from vanishing.repair.engine import Candidate, Repair, repair, verdict

__all__ = ["Candidate", "Repair", "repair", "verdict"]


class _CallableModule(types.ModuleType):
    # ``vanishing.repair`` is this package once anything imports it (Python sets the attribute
    # on the parent), so the package forwards calls to the function of the same name
    def __call__(self, *args, **kwargs):
        return repair(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
