"""Facts about ``torch.nn`` modules that several parts of the package need, torch imported lazily."""

from __future__ import annotations

from typing import Any

__all__ = ["_unwrap", "call_model", "skip_connections", "is_residual_module", "RESIDUAL_MODULES"]

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


_MISSING = object()

#: Module classes (matched by name along the class's MRO) whose own forward adds a skip
#: connection, so their internals are not traced: torch's Transformer layers, and Hugging Face's
#: blocks, which all derive from ``GradientCheckpointingLayer`` (``LlamaDecoderLayer``,
#: ``GPT2Block``, ``BertLayer``, ``T5Block``, ``ViTLayer``: ``x + attn(x)``, ``x + mlp(x)``)
#: and are not fx-traceable themselves.
RESIDUAL_MODULES = (
    "TransformerEncoderLayer",
    "TransformerDecoderLayer",
    "GradientCheckpointingLayer",
)


def is_residual_module(module: Any) -> bool:
    """Whether ``module`` is of a class known to add a skip connection (:data:`RESIDUAL_MODULES`).

    Example:
        >>> import torch
        >>> from vanishing.modules import is_residual_module
        >>> is_residual_module(torch.nn.TransformerEncoderLayer(8, 2)), is_residual_module(torch.nn.Linear(2, 2))
        (True, False)
    """
    return any(c.__name__ in RESIDUAL_MODULES for c in type(module).__mro__)


def _plain_chain(module: Any) -> bool:
    """Whether ``module`` is an ``nn.Sequential`` (its own forward) of ``torch.nn`` layers and
    such Sequentials: a chain in which one output feeds the next and nothing is added. The
    layers are those ``torch.fx`` treats as leaves by default."""
    import torch

    if isinstance(module, torch.nn.Sequential):
        return type(module).forward is torch.nn.Sequential.forward and all(
            _plain_chain(child) for child in module.children()
        )
    return type(module).__module__.startswith(("torch.nn.", "torch.ao.nn."))


def skip_connections(model: Any) -> bool | None:
    """Whether ``model`` adds a tensor to one computed from it through a layer with parameters
    (``x + f(x)``: a skip connection), read from a ``torch.fx`` trace; None when the model
    cannot be traced (data-dependent control flow).

    Example:
        >>> import torch
        >>> from vanishing.modules import skip_connections
        >>> class Block(torch.nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.f = torch.nn.Linear(4, 4)
        ...     def forward(self, x):
        ...         return x + torch.relu(self.f(x))
        >>> skip_connections(Block()), skip_connections(torch.nn.Sequential(torch.nn.Linear(4, 4)))
        (True, False)
    """
    import operator
    import warnings

    import torch
    import torch.fx as fx

    if any(is_residual_module(m) for m in model.modules()):
        return True
    if _plain_chain(model):
        # what the trace below finds for a Sequential of torch.nn layers (each a leaf of the
        # trace: nothing inside it is seen), without the trace's ~5 ms: no addition at all
        return False

    class _Tracer(fx.Tracer):
        def is_leaf_module(self, m: torch.nn.Module, name: str) -> bool:
            return is_residual_module(m) or super().is_leaf_module(m, name)

    # Tracing runs the forward's Python on proxies: a forward that counts its calls
    # (``self.calls += 1``) or caches something would keep the change; put every module's
    # attributes back as they were (rebound ones; a container mutated in place stays)
    saved = [(m, dict(m.__dict__)) for m in model.modules()]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            graph = _Tracer().trace(model)
    except Exception:  # noqa: BLE001 - any tracing failure means "unknown"
        return None
    finally:
        for m, before in saved:
            now = m.__dict__
            for key in [k for k in now if k not in before]:
                del now[key]
            for key, value in before.items():
                if now.get(key, _MISSING) is not value:
                    now[key] = value
    modules = dict(model.named_modules())
    ancestors: dict[fx.Node, set] = {}
    for node in graph.nodes:
        seen: set = set()
        for source in node.all_input_nodes:
            seen |= ancestors[source] | {source}
        ancestors[node] = seen

    def has_params(node: fx.Node) -> bool:
        return node.op == "call_module" and any(True for _ in modules[node.target].parameters())

    adds = (operator.add, operator.iadd, torch.add)
    for node in graph.nodes:
        is_add = (node.op == "call_function" and node.target in adds) or (
            node.op == "call_method" and node.target in ("add", "add_")
        )
        operands = [a for a in node.args[:2] if isinstance(a, fx.Node)] if is_add else []
        if len(operands) != 2:
            continue
        for x, y in (operands, operands[::-1]):
            if x in ancestors[y]:
                path = (ancestors[y] - ancestors[x] - {x}) | {y}
                if any(has_params(n) for n in path):
                    return True
    return False
