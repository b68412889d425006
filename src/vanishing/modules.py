"""Facts about ``torch.nn`` modules that several parts of the package need, torch imported lazily."""

from __future__ import annotations

from typing import Any

__all__ = ["_unwrap", "call_model"]

#: wrapper types whose ``.module`` is the model the user wrote
_WRAPPERS = ("DistributedDataParallel", "DataParallel", "FullyShardedDataParallel")


def call_model(model: Any, inputs: Any) -> Any:
    """``model`` on one batch's inputs, the one way the package calls a user's model on a batch
    (repair's runs and traces, ``inspect``, the theory's prediction): keyword arguments when
    ``inputs`` is a mapping (a Hugging Face batch: ``input_ids``, ``attention_mask``...), else
    ``model(inputs)`` whatever ``inputs`` is (a tensor, a tuple the forward unpacks itself).

    Example:
        >>> import torch
        >>> from vanishing.modules import call_model
        >>> class Net(torch.nn.Module):
        ...     def forward(self, x, scale=1.0):
        ...         return x * scale
        >>> call_model(Net(), {"x": torch.ones(2), "scale": 3.0}).tolist()
        [3.0, 3.0]
    """
    from collections.abc import Mapping

    if isinstance(inputs, Mapping):
        return model(**inputs)
    return model(inputs)


def _unwrap(model: Any) -> Any:
    """The module whose names users know: inside DDP/FSDP wrappers and ``torch.compile``.

    Example:
        >>> import torch
        >>> from vanishing.modules import _unwrap
        >>> net = torch.nn.Linear(2, 2)
        >>> _unwrap(torch.nn.DataParallel(net)) is net
        True
    """
    from torch import nn

    seen = set()
    while id(model) not in seen:
        seen.add(id(model))
        inner = getattr(model, "_orig_mod", None)  # torch.compile's OptimizedModule
        if isinstance(inner, nn.Module):
            model = inner
            continue
        if type(model).__name__ in _WRAPPERS and isinstance(
            getattr(model, "module", None), nn.Module
        ):
            model = model.module
            continue
        break
    return model


def local(t: Any) -> Any:
    """This process's shard of a DTensor (FSDP2's sharded parameters and gradients), else ``t``.

    Statistics of shards are combined across the shard group at flush (``Column.reduce``).

    Example:
        >>> import torch
        >>> from vanishing.modules import local
        >>> t = torch.ones(2)
        >>> local(t) is t
        True
    """
    return t.to_local() if type(t).__name__ == "DTensor" else t


def is_packed(x: Any) -> bool:
    """Whether ``x`` is a ``torch.nn.utils.rnn.PackedSequence``."""
    return type(x).__name__ == "PackedSequence" and hasattr(x, "batch_sizes")
