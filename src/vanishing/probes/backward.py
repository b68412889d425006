"""Seeing the loss: a thin wrapper around ``torch.autograd.backward`` while a monitor is open.

Module hooks see tensors flowing through a model but never the scalar that backward starts
from. ``Tensor.backward`` calls ``torch.autograd.backward`` through the module attribute, so
wrapping that one function (only while at least one monitor is open, restored on the last
close) lets a monitor see each backward's roots and know when the backward pass has ended,
without any change to the user's loop. The wrapper calls the original with the same arguments;
nothing about the computation changes.
"""

from __future__ import annotations

import threading
import weakref
from typing import Any, Protocol

import torch


class BackwardListener(Protocol):
    def _backward_wanted(self) -> bool: ...
    def _on_backward_end(self, roots: tuple[torch.Tensor, ...]) -> None: ...


_lock = threading.Lock()
_listeners: weakref.WeakSet = weakref.WeakSet()
_original: Any = None
_installed = False


def _roots(args: tuple, kwargs: dict) -> tuple[torch.Tensor, ...]:
    tensors = args[0] if args else kwargs.get("tensors")
    if isinstance(tensors, torch.Tensor):
        return (tensors,)
    try:
        return tuple(t for t in tensors if isinstance(t, torch.Tensor))
    except TypeError:
        return ()


def _backward(*args: Any, **kwargs: Any) -> Any:
    listeners = [m for m in list(_listeners) if m._backward_wanted()]
    result = _original(*args, **kwargs)
    if listeners:
        roots = _roots(args, kwargs)
        for m in listeners:
            m._on_backward_end(roots)
    return result


def add_listener(listener: BackwardListener) -> None:
    """Route the end of every backward pass to ``listener`` (installs the wrapper if needed)."""
    global _original, _installed
    with _lock:
        if not _installed:
            _original = torch.autograd.backward
            torch.autograd.backward = _backward
            _installed = True
        _listeners.add(listener)


def remove_listener(listener: BackwardListener) -> None:
    """Stop routing to ``listener``; the last removal restores ``torch.autograd.backward``."""
    global _installed
    with _lock:
        _listeners.discard(listener)
        # Restore only if nobody wrapped it after us; otherwise stay in the chain as a no-op.
        if not _listeners and _installed and torch.autograd.backward is _backward:
            torch.autograd.backward = _original
            _installed = False
