"""What is watched: the modules and parameters of a model, in forward execution order.

The layout is found once, when the monitor attaches (rows: every module that owns parameters
and every activation module; every parameter once, tied ones with all their owners), and its
forward order during the first step (the order in which modules actually run). It names each
parameter row by the module that runs first among its owners and writes the manifest's
``layers``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn

from vanishing import activations
from vanishing.recorder.semantics import FollowingActivation

RECURRENT = (nn.RNN, nn.LSTM, nn.GRU)


def _shard_groups(param: Tensor) -> tuple:
    """The process groups over which a DTensor parameter is sharded (empty when it is not)."""
    if type(param).__name__ != "DTensor":
        return ()
    mesh = param.device_mesh
    return tuple(
        mesh.get_group(dim)
        for dim, placement in enumerate(param.placements)
        if placement.is_shard()
    )


@dataclass
class ModuleRow:
    index: int
    name: str
    module: nn.Module
    kind: str | None  # activation kind
    recurrent: bool
    owns_params: bool
    # filled by the activation probe at the module's first recorded call
    examples_per_unit: int | None = None  # entries per unit in one call (batch x positions)


@dataclass
class ParamRow:
    index: int
    param: nn.Parameter
    owners: list[tuple[str, str]] = field(default_factory=list)  # (module name, local name)


class Layout:
    """The rows of the monitor's buffer and their names, depths and forward order."""

    def __init__(self, root: nn.Module) -> None:
        self.root = root
        self.modules: list[ModuleRow] = []
        self.params: list[ParamRow] = []
        by_id: dict[int, ParamRow] = {}
        owner_of = _parametrized_owners(root)
        #: activation modules recognised but not measured (no registered derivative): named
        #: in the manifest so that a diagnosis can say what it could not judge
        self.unmeasured: list[dict[str, str]] = []
        for name, module in root.named_modules(remove_duplicate=True):
            cls = activations.unmeasured(module)
            if cls is not None:
                self.unmeasured.append({"name": name, "type": cls})
            if name in owner_of or any(name.startswith(p + ".") for p in owner_of):
                continue  # a parametrization's container: its tensors are its module's
            own = list(module.named_parameters(recurse=False))
            own += [(f"{tensor}.{local}", p) for tensor, local, p in _parametrized(module)]
            entry = activations.for_module(module)
            kind = entry.kind if entry is not None else None
            recurrent = isinstance(module, RECURRENT)
            if own or kind is not None:
                self.modules.append(
                    ModuleRow(len(self.modules), name, module, kind, recurrent, bool(own))
                )
            for local_name, p in own:
                row = by_id.get(id(p))
                if row is None:
                    row = by_id[id(p)] = ParamRow(len(self.params), p)
                    self.params.append(row)
                row.owners.append((name, local_name))
        self.module_by_name = {r.name: r for r in self.modules}
        self.recurrent = [r for r in self.modules if r.recurrent]
        self.recurrent_slot = {r.index: i for i, r in enumerate(self.recurrent)}
        # FSDP2: parameters sharded over process groups; their statistics are combined at flush
        self.sharded: dict[Any, list[int]] = {}
        for r in self.params:
            for group in _shard_groups(r.param):
                self.sharded.setdefault(group, []).append(r.index)
        # forward order, found during the first step
        self.order: list[str] = []
        self._seen: set[str] = set()
        self.ran: set[str] = set()
        self.order_final = False
        self.last_layer: str | None = None  # the last parameter-owning module to start
        self.following = FollowingActivation()  # each layer's activation kind, by name

    # -------------------------------------------------------------- forward order
    def module_started(self, name: str) -> None:
        """A module's forward began (during discovery): note its place and its activation."""
        if name not in self._seen:
            self._seen.add(name)
            self.order.append(name)
        row = self.module_by_name.get(name)
        if row is None:
            return
        if row.owns_params and row.kind is None:
            self.last_layer = name
        self.following.call(name, row.kind, row.owns_params, type(row.module).__name__)

    def finish_discovery(self) -> None:
        """Fix the forward order (at the end of the first backward pass, or at close)."""
        self.order_final = True
        ran = set(self.order)
        # Modules that own parameters but never ran their own forward (e.g. the out_proj of
        # nn.MultiheadAttention, used functionally by its parent) go right after their parent.
        order = list(self.order)
        for row in self.modules:
            if row.name in ran:
                continue
            parent = row.name
            while parent and parent not in ran:
                parent = parent.rpartition(".")[0]
            pos = order.index(parent) + 1 if parent in ran else len(order)
            while pos < len(order) and order[pos].startswith(row.name.rpartition(".")[0] + "."):
                pos += 1
            order.insert(pos, row.name)
            ran.add(row.name)
        self.ran = set(self.order)
        self.order = order

    # -------------------------------------------------------------- names
    def names(self) -> tuple[list[ModuleRow], dict[int, tuple[str, str]], dict[str, int]]:
        """Module rows in forward order, each parameter's (layer, local name), each depth."""
        order = {name: i for i, name in enumerate(self.order)}
        far = len(order) + len(self.modules)
        modules = sorted(self.modules, key=lambda r: (order.get(r.name, far), r.index))
        depth = {r.name: d for d, r in enumerate(modules)}
        labels = {
            p.index: min(p.owners, key=lambda o: (depth.get(o[0], far), o[0])) for p in self.params
        }
        return modules, labels, depth

    def table_keys(self) -> tuple[list[tuple[str, str, int]], list[tuple[str, int]], list[str]]:
        """Row keys of the run tables: (layer, param, depth) per parameter row, (layer, depth)
        per module row, the name of each recurrent layer."""
        _, labels, depth = self.names()
        params = [
            (labels[p.index][0], labels[p.index][1], depth.get(labels[p.index][0], -1))
            for p in self.params
        ]
        modules = [(r.name, depth.get(r.name, -1)) for r in self.modules]
        return params, modules, [r.name for r in self.recurrent]

    def manifest_layers(self, trainable: set[int] | None) -> list[dict[str, Any]]:
        """The manifest's ``layers`` (docs/run-format.md)."""
        modules, labels, depth = self.names()
        owned: dict[str, list[ParamRow]] = {}
        for p in self.params:
            owned.setdefault(labels[p.index][0], []).append(p)
        layers = []
        for r in modules:
            params = [
                {
                    "name": labels[p.index][1],
                    "shape": list(p.param.shape),
                    "numel": p.param.numel(),
                    "trainable": bool(
                        p.param.requires_grad and (trainable is None or id(p.param) in trainable)
                    ),
                    "shared_with": [f"{m}.{n}" if m else n for m, n in p.owners[1:]],
                }
                for p in owned.get(r.name, [])
            ]
            layer = {
                "name": r.name,
                "depth": depth[r.name],
                "type": type(r.module).__name__,
                "role": "activation" if r.kind is not None and not params else "layer",
                "activation": r.kind or self.following.after.get(r.name),
                "recurrent": r.recurrent,
                "params": params,
                "num_params": sum(p["numel"] for p in params),
                "ran_forward": r.name in self.ran,
            }
            if r.examples_per_unit is not None:
                layer["examples_per_unit"] = r.examples_per_unit
            layers.append(layer)
        return layers


def _parametrized(module: nn.Module) -> list[tuple[str, str, nn.Parameter]]:
    """(tensor, local name, parameter) of each parametrized tensor of ``module``
    (``torch.nn.utils.parametrize``: weight_norm, spectral_norm, orthogonal): the parametrized
    module is the layer, its ``weight.original0`` a parameter of it."""
    lists = getattr(module, "parametrizations", None)
    if not isinstance(lists, nn.ModuleDict):
        return []
    return [
        (tensor, local, p)
        for tensor, plist in lists.items()
        for local, p in plist.named_parameters(recurse=False)
    ]


def _parametrized_owners(root: nn.Module) -> set[str]:
    """Qualified names of the ``parametrizations`` containers inside ``root``."""
    return {
        f"{name}.parametrizations" if name else "parametrizations"
        for name, module in root.named_modules()
        if _parametrized(module)
    }


def entry_modules(root: nn.Module) -> list[nn.Module]:
    """The modules a forward pass enters through: the root and, for a model class of one's own,
    its children (a training step may call a submodule, ``self.net(x)``, rather than the root:
    Lightning modules often do; a hook on each costs little, unlike on all 40 of a Sequential's);
    for a container without a forward of its own (``nn.ModuleDict``, ``nn.ModuleList``) its
    children's entries, recursively."""
    if type(root).forward is not nn.Module.forward:
        if type(root).__module__.startswith("torch.nn."):
            return [root]  # torch's own modules (nn.Sequential, ...) are called as a whole
        return [root, *root.children()]
    entries: list[nn.Module] = []
    for child in root.children():
        entries.extend(entry_modules(child))
    return entries
