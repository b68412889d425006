"""The error signal: the norm of dLoss/d(output) of every parameter-owning layer."""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from vanishing.modules import is_packed
from vanishing.probes.base import Probe, ProbeContext
from vanishing.recorder.columns import Column
from vanishing.stats.norms import cpu_norm, l2_norm

if TYPE_CHECKING:
    from vanishing.monitor.buffer import Row
    from vanishing.monitor.layout import ModuleRow


class ErrorSignalProbe(Probe):
    """A tensor hook on each layer's output reads the gradient flowing back into it.

    A layer called several times in a step gets the mean of its calls' norms; a step of several
    backward passes (accumulation) likewise. Values are unscaled under AMP, per backward pass.
    """

    #: ``error_numel``: the entries of the gradient the norm is over (batch x features x
    #: positions), so that layers whose maps differ in size (pooling, strides) compare by the
    #: gradient's RMS, not by a norm that grows with the map (docs/run-format.md)
    columns = (
        Column("error_norm", "module", "mean"),
        Column("error_numel", "module", "mean", "linear"),
    )

    def attach(self, ctx: ProbeContext) -> None:
        self.ctx = ctx
        self._hooks: dict[int, Any] = {}
        self._numel_cache: dict[tuple, Tensor] = {}  # kept across steps (see _numel_tensor)
        for row in ctx.layout.modules:
            if row.owns_params and row.kind is None:
                ctx.events.on_output(row.module, functools.partial(self._on_output, row))
        self.reset()

    def reset(self) -> None:
        self._pending: list[tuple[list[int], Tensor]] = []  # (module rows, norms)
        self._values: list[tuple[int, float]] = []  # CPU: (module row, norm)
        self._numel: list[tuple[int, float]] = []  # (module row, entries): known without a sync

    def _on_output(self, row: ModuleRow, module, args: tuple, output: Any) -> None:
        if not (self.ctx.capturing() and torch.is_grad_enabled()):
            return
        out = output[0] if isinstance(output, (tuple, list)) and output else output
        out = getattr(out, "data", out) if is_packed(out) else out
        if isinstance(out, Tensor) and out.requires_grad:
            hook = self._hooks.get(row.index)
            if hook is None:
                hook = self._hooks[row.index] = self.ctx.events.guarded(
                    functools.partial(self._on_grad, row.index)
                )
            out.register_hook(hook)

    def _on_grad(self, index: int, grad: Tensor) -> None:
        g = grad.detach()
        self._numel.append((index, float(g.numel())))
        if g.device.type == "cpu":
            # Measured now, while the gradient is in cache, as a Python float; the floats of
            # all layers become one tensor at the end of the backward pass.
            self._values.append((index, cpu_norm(g)))
        else:
            self._pending.append(([index], self.ctx.unscale(l2_norm(g)).reshape(1)))

    def _collect(self) -> None:
        rows = [i for i, _ in self._values]
        norms = torch.tensor([v for _, v in self._values], dtype=torch.float64)
        self._pending.append((rows, self.ctx.unscale(norms)))
        self._values = []

    def backward_end(self, roots: tuple) -> None:
        # each backward is unscaled with the scale it ran under
        if self._values:
            self._collect()

    def measure(self, row: Row) -> None:
        # what hooks measured after the last backward-end callback (a second backward through
        # a retained graph, torch.autograd.grad, which has no such callback)
        if self._values:
            self._collect()
        if self._pending:
            rows = [i for module_rows, _ in self._pending for i in module_rows]
            row.set_modules("error_norm", rows, torch.cat([v for _, v in self._pending]))
        if self._numel:
            rows = [i for i, _ in self._numel]
            row.set_modules("error_numel", rows, self._numel_tensor(row))

    def _numel_tensor(self, row: Row) -> Tensor:
        """The step's entry counts as a float64 tensor where the buffer lives; the same counts
        step after step are uploaded to a GPU once (cached by value: no copy per step)."""
        values = tuple(n for _, n in self._numel)
        device = torch.device("cpu") if row.host else self._pending_device()
        key = (values, device)
        cached = self._numel_cache.get(key)
        if cached is None:
            if len(self._numel_cache) > 64:  # shapes that change every step: keep a few
                self._numel_cache.clear()
            cached = torch.tensor(values, dtype=torch.float64, device=device)
            self._numel_cache[key] = cached
        return cached

    def _pending_device(self) -> torch.device:
        return self._pending[0][1].device if self._pending else torch.device("cpu")
