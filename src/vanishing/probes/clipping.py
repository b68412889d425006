"""Gradient clipping and loss scaling made visible: what the loop did between backward and step.

:class:`ClippingProbe` records the total gradient norm twice per step: at the end of the step's
last backward pass (``grad_norm_backward``, unscaled under AMP: what a clipping call sees) and
when the optimizer step begins (``grad_norm_step``: what the optimizer uses). Where clipping
engaged, ``grad_norm_step < grad_norm_backward``; their ratio is how hard. :class:`ScalerProbe`
records the GradScaler's scale of each step (``amp_scale``); steps the scaler skipped are the
``skipped`` column of every run. The monitor adds :class:`ScalerProbe` when given a ``scaler``;
:class:`ClippingProbe` is opt-in (``watch(..., probes=[ClippingProbe()])``; the trainer
integrations add it when their clipping is on), since it reads every gradient once more per
backward pass.

Example:
    >>> import tempfile, torch, vanishing
    >>> from vanishing.probes.clipping import ClippingProbe
    >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
    >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
    >>> with vanishing.watch(model, opt, run_dir=tempfile.mkdtemp() + "/r", probes=[ClippingProbe()]) as mon:
    ...     opt.zero_grad(); (100 * model(torch.randn(8, 3))).pow(2).mean().backward()
    ...     _ = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=1.0)
    ...     opt.step()
    >>> s = vanishing.load_run(mon.run_dir).steps
    >>> bool(s.grad_norm_backward[0] > 1.0), round(float(s.grad_norm_step[0]), 3)
    (True, 1.0)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from vanishing.modules import local
from vanishing.probes.base import Probe, ProbeContext
from vanishing.probes.params import _dense_values
from vanishing.recorder.columns import Column
from vanishing.stats.norms import l2_norms

if TYPE_CHECKING:
    from vanishing.monitor.buffer import Row


def _total_norm(params: list) -> Tensor | None:
    grads = [_dense_values(local(p.grad.detach())) for p in params if p.grad is not None]
    if not grads:
        return None
    # the per-parameter norms are exact (float64 recheck of tiny ones); their root sum square
    # is the total norm without a second pass over the gradients
    return l2_norms(grads).square().sum().sqrt()


class ClippingProbe(Probe):
    """Total gradient norm at the end of the last backward pass and at the optimizer step."""

    columns = (
        Column("grad_norm_backward", "step", "sum_sq"),
        Column("grad_norm_step", "step", "sum_sq"),
    )

    def attach(self, ctx: ProbeContext) -> None:
        self.ctx = ctx
        self.params = [r.param for r in ctx.layout.params]
        self.reset()

    def reset(self) -> None:
        self._backward: Tensor | None = None
        self._step: Tensor | None = None

    def backward_end(self, roots: tuple) -> None:
        norm = _total_norm(self.params)
        self._backward = None if norm is None else self.ctx.unscale(norm)

    def grads_ready(self) -> None:
        norm = _total_norm(self.params)
        if norm is not None and self.ctx.optimizer is None:
            norm = self.ctx.unscale(norm)  # without an optimizer nothing unscaled them
        self._step = norm

    def measure(self, row: Row) -> None:
        if self._backward is not None:
            row.set_step("grad_norm_backward", self._backward)
        if self._step is not None:
            row.set_step("grad_norm_step", self._step)


class ScalerProbe(Probe):
    """The GradScaler's scale at each recorded step (the scale its backward passes ran under)."""

    columns = (Column("amp_scale", "step", "max"),)

    def __init__(self, scaler) -> None:
        self.scaler = scaler

    def attach(self, ctx: ProbeContext) -> None:
        self.reset()

    def reset(self) -> None:
        self._scale: Tensor | None = None

    def backward_end(self, roots: tuple) -> None:
        scale = getattr(self.scaler, "_scale", None)
        if self.scaler.is_enabled() and scale is not None:
            self._scale = scale.detach().to(torch.float64).clone()

    def measure(self, row: Row) -> None:
        if self._scale is not None:
            row.set_step("amp_scale", self._scale.reshape(()))
