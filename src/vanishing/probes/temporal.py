"""Through time: the gradient norm w.r.t. a recurrent layer's input at each time step."""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from vanishing.modules import is_packed
from vanishing.probes.base import Probe, ProbeContext
from vanishing.recorder.columns import TIME_GRAD
from vanishing.stats.norms import temporal_profile

if TYPE_CHECKING:
    from vanishing.monitor.buffer import Row
    from vanishing.monitor.layout import ModuleRow


class TemporalProbe(Probe):
    """dL/dx_t of every ``nn.RNN``/``LSTM``/``GRU``, at up to ``MAX_TIME_POINTS`` time steps.

    Data fed straight into the layer has no gradient; a leaf alias that asks for one makes
    dL/dx_t visible without touching the parameters' gradients.

    Stacked layers (``nn.LSTM(num_layers=2)``): torch runs every layer of the module in one
    fused op, so the hidden sequence between layer ``l0`` and ``l1`` is never a tensor that a
    hook can see. What is measured is the stack's own input, dL/dx_t through *every* layer and
    time step (the profile the through-time rules judge). A profile per layer through time is
    not measured; per layer, the records keep each layer's parameters apart (``weight_ih_l1``,
    ``weight_hh_l1``: gradient, update, weight norms), which the diagnosis shows as ``rnn.l0``,
    ``rnn.l1`` (:func:`vanishing.recorder.semantics.param_unit`). A user who needs the time
    profile of each layer stacks single-layer modules (``nn.ModuleList`` of ``nn.LSTM``), each
    then measured here.
    """

    columns = (TIME_GRAD,)

    def attach(self, ctx: ProbeContext) -> None:
        self.ctx = ctx
        for row in ctx.layout.recurrent:
            ctx.events.on_input(row.module, functools.partial(self._on_input, row))
        self.reset()

    def reset(self) -> None:
        self._pending: dict[int, tuple[Tensor, int]] = {}  # slot -> (profile, length)

    def _on_input(self, row: ModuleRow, module: nn.Module, args: tuple) -> Any:
        if not (self.ctx.capturing() and torch.is_grad_enabled()) or not args:
            return None
        x = args[0]
        packed = is_packed(x)
        data = x.data if packed else x
        if not isinstance(data, Tensor) or not data.is_floating_point():
            return None
        new_args = None
        if not data.requires_grad:
            data = data.detach().requires_grad_(True)
            new_x = x._replace(data=data) if packed else data
            new_args = (new_x, *args[1:])
        if packed:
            hook = functools.partial(self._on_grad, row, None, x.batch_sizes)
        else:
            time_dim = 1 if (module.batch_first and data.dim() == 3) else 0
            hook = functools.partial(self._on_grad, row, time_dim, None)
        self.ctx.events.on_grad(data, hook)
        return new_args

    def _on_grad(self, row: ModuleRow, time_dim, batch_sizes, grad: Tensor) -> None:
        profile, T = temporal_profile(grad, time_dim=time_dim or 0, batch_sizes=batch_sizes)
        slot = self.ctx.layout.recurrent_slot[row.index]
        self._pending[slot] = (self.ctx.unscale(profile), T)

    def measure(self, row: Row) -> None:
        for slot, (profile, T) in self._pending.items():
            row.set_time(slot, profile, T)
