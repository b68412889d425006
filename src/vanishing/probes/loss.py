"""The step itself: the loss, how many of its losses were not finite, its backward passes."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from vanishing.probes.base import Probe, ProbeContext
from vanishing.recorder.columns import BUILTIN

if TYPE_CHECKING:
    from vanishing.monitor.buffer import Row


class LossProbe(Probe):
    """The scalar roots of the step's backward passes are its losses (summed: with accumulation
    over k micro-batches each divided by k, that is the mean loss); unscaled under AMP."""

    columns = tuple(c for c in BUILTIN if c.level == "step")

    def attach(self, ctx: ProbeContext) -> None:
        self.ctx = ctx
        self.reset()

    def reset(self) -> None:
        self._losses: list[Tensor] = []

    def backward_end(self, roots: tuple) -> None:
        for r in roots:
            if r.numel() == 1:
                self._losses.append(self.ctx.unscale(r.detach().reshape(())))

    def measure(self, row: Row) -> None:
        if self._losses:
            if row.host:
                losses = [float(v) for v in self._losses]  # CPU tensors: no device sync
                row.set_step("loss", sum(losses))
                row.set_step("loss_nonfinite", sum(not math.isfinite(v) for v in losses))
            else:
                losses = torch.stack(self._losses).to(torch.float64)
                row.set_step("loss", losses.sum())
                row.set_step("loss_nonfinite", (~torch.isfinite(losses)).sum())
        row.set_step("n_backward", self.ctx.n_backward())
