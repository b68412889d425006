"""Activation statistics: mean, std, mean phi'(z), saturated and dead shares, percentiles."""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from vanishing import activations
from vanishing.probes.base import Probe, ProbeContext
from vanishing.recorder.columns import BUILTIN
from vanishing.stats.activations import summarize, summarize_into

if TYPE_CHECKING:
    from vanishing.monitor.buffer import Row
    from vanishing.monitor.layout import ModuleRow

_CHANNEL_FIRST = (
    nn.modules.conv._ConvNd,
    nn.modules.batchnorm._BatchNorm,
    nn.GroupNorm,
    nn.modules.instancenorm._InstanceNorm,
    nn.modules.pooling._MaxPoolNd,
    nn.modules.pooling._AvgPoolNd,
)


class _Resolved:
    """What an activation module's statistics need, found at its first recorded call."""

    __slots__ = ("unit_dim", "options", "key", "needs_input")

    def __init__(self, row: ModuleRow, output: Tensor, last_layer: nn.Module | None) -> None:
        channels_first = output.dim() >= 3 and isinstance(last_layer, _CHANNEL_FIRST)
        self.unit_dim = 1 if (channels_first or output.dim() == 2) else -1
        if output.dim() >= 2 and output.shape[self.unit_dim] > 0:
            row.examples_per_unit = output.numel() // output.shape[self.unit_dim]
        entry = activations.get(row.kind)
        self.options = entry.stat_options(row.module)
        self.needs_input = entry.needs_input(row.module)
        params = self.options["params"]
        # calls that can be measured together: same kind, bound and options (tensors by id)
        self.key = (
            self.unit_dim,
            self.options["bound"],
            tuple((k, v if not isinstance(v, Tensor) else id(v)) for k, v in params.items()),
        )


class _Seen:
    """Whether a backward pass reached an activation's output (a tensor hook marks it)."""

    __slots__ = ("generation", "proof", "consumed")

    def __init__(self, generation: int, proof: bool) -> None:
        self.generation = generation
        self.proof = proof  # the output requires grad, so a backward that uses it says so
        self.consumed = False

    def mark(self, grad: Tensor) -> None:
        self.consumed = True

    def counts(self, last_generation: int) -> bool:
        # an output no gradient can reach (a frozen start of the model) counts with the
        # forward the backward followed
        return self.consumed or (not self.proof and self.generation == last_generation)


#: forward passes whose unconsumed activations are kept: a step may run several forwards before
#: one backward (a discriminator on real and fake data); a validation loop with gradients on
#: and no backward must not hold every batch until the next step
_KEPT_FORWARDS = 8


class ActivationProbe(Probe):
    """A forward hook on each activation module keeps its output (and input where phi' needs
    it) until the end of the backward pass, when the same-shaped outputs of all layers are
    measured together: a few kernels in all instead of a dozen per layer.

    Only outputs the step's backward passes reached count (a tensor hook on each output tells):
    the activations of a forward with no backward (validation without ``torch.no_grad()``) are
    not the step's, and are dropped after a few more forwards.
    """

    columns = tuple(c for c in BUILTIN if c.level == "module" and c.name.startswith("act_"))

    def attach(self, ctx: ProbeContext) -> None:
        self.ctx = ctx
        self._resolved: dict[int, _Resolved] = {}
        self._buffers: dict[tuple, tuple[Tensor, Tensor]] = {}
        for row in ctx.layout.modules:
            if row.kind is not None:
                ctx.events.on_output(row.module, functools.partial(self._on_output, row))
        self.reset()

    def reset(self) -> None:
        self._pending: list[tuple[list[int], Tensor]] = []  # (module rows, [k x stats])
        self._tensors: list[tuple] = []  # (seen, row, resolved, z, y, version)
        self._inplace: list[tuple] = []  # (seen, module rows, [1 x stats])
        self._generation = 0

    def forward_begin(self, generation: int) -> None:
        self._generation = generation
        oldest = generation - _KEPT_FORWARDS
        if self._tensors and self._tensors[0][0].generation <= oldest:
            self._tensors = [e for e in self._tensors if e[0].generation > oldest]
        if self._inplace and self._inplace[0][0].generation <= oldest:
            self._inplace = [e for e in self._inplace if e[0].generation > oldest]

    def _on_output(self, row: ModuleRow, module: nn.Module, args: tuple, output: Any) -> None:
        if not (self.ctx.capturing() and torch.is_grad_enabled()):
            return
        if not isinstance(output, Tensor) or not output.is_floating_point():
            return
        if output.numel() == 0:
            self.ctx.note("an empty batch: no activation statistics for that call")
            return
        z = args[0] if args and isinstance(args[0], Tensor) else None
        res = self._resolved.get(row.index)
        if res is None:
            layout = self.ctx.layout
            last = layout.module_by_name.get(layout.last_layer or "")
            res = self._resolved[row.index] = _Resolved(
                row, output, last.module if last is not None else None
            )
        seen = _Seen(self._generation, output.requires_grad)
        if seen.proof:
            output.register_hook(seen.mark)
        if z is output:
            # In place: the output overwrote the input and may be overwritten again.
            vec = summarize(None, output, unit_dim=res.unit_dim, **res.options)
            self._inplace.append((seen, [row.index], vec.unsqueeze(0)))
            return
        # Kept until the end of the backward pass (autograd keeps most of them anyway: the next
        # layer saves its input). On the CPU the stacking buffers are kept between steps (no
        # allocation); on a GPU they come from the caching allocator each step, so no device
        # memory stays held between steps.
        z = z.detach() if res.needs_input else None
        y = output.detach()
        self._tensors.append((seen, row, res, z, y, y._version))

    def _measure(self) -> None:
        """Measure the kept outputs that a backward pass consumed; keep the others."""
        last = self._generation
        if self._inplace:
            ready = [e for e in self._inplace if e[0].counts(last)]
            self._inplace = [e for e in self._inplace if not e[0].counts(last)]
            self._pending.extend((rows, vec) for _, rows, vec in ready)
        groups: dict[tuple, list] = {}
        waiting = []
        for entry in self._tensors:
            seen, row, res, z, y, version = entry
            if not seen.counts(last):
                waiting.append(entry)
                continue
            if y._version != version:
                continue  # modified in place after the activation ran: its values are gone
            key = (row.kind, tuple(y.shape), y.dtype, y.device, z is None, res.key)
            groups.setdefault(key, []).append(entry[1:])
        self._tensors = waiting
        for entries in groups.values():
            row, res, z0, y0, _ = entries[0]
            ys = [e[3] for e in entries]
            dtype = y0.dtype if y0.dtype in (torch.float32, torch.float64) else torch.float32
            shape = (len(ys), y0.numel())
            if y0.device.type != "cpu":
                buffers = (
                    torch.empty(shape, dtype=dtype, device=y0.device),
                    torch.empty(shape, dtype=dtype, device=y0.device),
                )
            else:
                buffers = self._buffers.get((shape, dtype))
            if buffers is None:
                buffers = self._buffers[(shape, dtype)] = (
                    torch.empty(shape, dtype=dtype),
                    torch.empty(shape, dtype=dtype),
                )
            work, scratch = buffers
            if y0.dtype == dtype:
                torch.stack([y.reshape(-1) for y in ys], out=work)
            else:
                for i, y in enumerate(ys):
                    work[i].copy_(y.reshape(-1))
            zs = None if z0 is None else torch.stack([e[2] for e in entries])
            stats = summarize_into(  # reads the stacked outputs through a view of `work`
                zs,
                work.view(len(ys), *y0.shape),
                work,
                scratch,
                unit_dim=res.unit_dim,
                **res.options,
            )
            self._pending.append(([e[0].index for e in entries], stats))

    def backward_end(self, roots: tuple) -> None:
        if self._tensors or self._inplace:
            self._measure()

    def measure(self, row: Row) -> None:
        if self._tensors or self._inplace:  # reached by a backward with no end callback
            self._measure()
        if self._pending:
            rows = [i for module_rows, _ in self._pending for i in module_rows]
            row.set_modules(self.columns[0].name, rows, torch.cat([v for _, v in self._pending]))
        if not self.ctx.keep_for_next():
            self._buffers.clear()

    def held_bytes(self) -> dict[str, int]:
        """The CPU stacking buffers kept between recorded steps (see ``Monitor.memory``)."""
        kept = getattr(self, "_buffers", {})
        held = sum(t.numel() * t.element_size() for pair in kept.values() for t in pair)
        return {"activation_buffers": held}
