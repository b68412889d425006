"""Weight norms before a step and the change the step made, for any optimizer.

The update a step makes is measured, not modelled: a snapshot of the weights before
``optimizer.step()`` is subtracted from the weights after it. Two strategies, by device:

* GPU (and any non-CPU device): ``torch._foreach_*`` kernels, which are fused there; the snapshot
  costs one copy of the optimizer's parameters.
* CPU: ``_foreach`` ops run one small kernel per tensor there, and a per-tensor norm is several
  times slower than a row-wise norm of a matrix. So parameters of equal size are stacked into
  ``[k x n]`` snapshot matrices, and every norm is one row-wise kernel per size group. After a
  step the snapshot is turned into the update in place (``before - after``), measured, and then
  refilled with the new weights: the next step's snapshot, reused as long as no parameter's
  version counter moved in between (so nothing is copied twice), whose norms, measured while it
  is in cache, are the next step's weight norms. Costs one copy of the parameters. A change
  made through ``p.data`` (which has a version counter of its own) between two steps is not
  seen, and is counted in the next step's update: change weights under ``torch.no_grad()``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from vanishing.modules import local
from vanishing.probes.base import Probe, ProbeContext
from vanishing.recorder.columns import BUILTIN
from vanishing.stats.norms import _exact_norm, _trusted, l2_norms, nonfinite_counts

if TYPE_CHECKING:
    from vanishing.monitor.buffer import Row
    from vanishing.monitor.layout import ParamRow

#: A weight whose entries are all below this in size can change by steps so small that their
#: float32 squares vanish (|change| >= ulp(weight) ~ 1.2e-7 |weight|; a square underflows below
#: ~3.7e-23, or below ~1.1e-19 when denormals are flushed): only then can an update norm read 0
#: while the weights moved.
_TINY_WEIGHT_RMS = 1e-12


def _row_norms(
    matrix: Tensor, *, exact_tiny: bool = True, weight_norms: list[float] | None = None
) -> list[float]:
    """L2 norm of each row, as Python floats; float32 ones that are not trusted redone in float64.

    ``weight_norms`` (for update rows, with ``exact_tiny=False``): the norms of the weights
    the updates were made to; a zero update of a row of tiny weights is also redone in float64.
    """
    kwargs = {} if matrix.dtype in (torch.float32, torch.float64) else {"dtype": torch.float32}
    values = torch.linalg.vector_norm(matrix, dim=1, **kwargs).tolist()  # host sync: CPU only
    n = matrix.shape[1]
    tiny = n * _TINY_WEIGHT_RMS**2
    for i, v in enumerate(values):
        recheck = v == 0.0 and weight_norms is not None and weight_norms[i] ** 2 < tiny
        if recheck or not _trusted(v, n, exact_tiny):
            values[i] = _exact_norm(matrix[i])
    return values


class UpdateTracker:
    """Weight norms before each step and update norms after it, for a fixed list of parameters.

    Example:
        >>> import torch
        >>> from vanishing.probes.params import UpdateTracker
        >>> w = torch.nn.Parameter(torch.tensor([3.0, 4.0]))
        >>> tracker = UpdateTracker([w])
        >>> tracker.before_step().tolist()
        [5.0]
        >>> with torch.no_grad():
        ...     _ = w.sub_(torch.tensor([0.0, 1.0]))
        >>> tracker.after_step().tolist()
        [1.0]
    """

    def __init__(self, params: list[Tensor]) -> None:
        self.params = params
        views = [p.detach() for p in params]
        self.grouped = bool(params) and all(
            p.device.type == "cpu" and p.is_contiguous() for p in views
        )
        if self.grouped:
            groups: dict[tuple, list[int]] = {}
            for i, p in enumerate(views):
                groups.setdefault((p.numel(), p.dtype), []).append(i)
            self._groups = []
            for (numel, dtype), idx in groups.items():
                flat = [views[i].view(-1) for i in idx]
                snapshot = torch.empty(len(idx), numel, dtype=dtype)
                self._groups.append((idx, flat, snapshot, list(snapshot.unbind(0))))
            order = [i for g in self._groups for i in g[0]]
            self._position = [0] * len(order)  # parameter i is entry _position[i] in group order
            for pos, i in enumerate(order):
                self._position[i] = pos
            self._versions: list[int] | None = None
            self._weight_norms: list[float] = []  # of the weights in the snapshot
        else:
            self._snapshot = [torch.empty_like(p) for p in views]

    def _current(self) -> bool:
        if self._versions is None:
            return False
        return all(p._version == v for p, v in zip(self.params, self._versions))

    def _in_order(self, grouped: list[float]) -> Tensor:
        return torch.tensor([grouped[pos] for pos in self._position], dtype=torch.float64)

    def before_step(self) -> Tensor:
        """Take the snapshot (unless the last one is still current); return the weight norms."""
        if not self.grouped:
            views = [p.detach() for p in self.params]
            torch._foreach_copy_(self._snapshot, views)
            return l2_norms(views)
        if not self._current():
            self._weight_norms = []
            for _, flat, snapshot, _ in self._groups:
                torch.stack(flat, out=snapshot)
                self._weight_norms += _row_norms(snapshot)
        return self._in_order(self._weight_norms)

    def after_step(self) -> Tensor:
        """The norm of the change each parameter went through since :meth:`before_step`.

        On the CPU this also measures the new weights' norms while they are in cache: they are
        the next :meth:`before_step`'s, as long as no parameter changes in between.
        """
        if not self.grouped:
            torch._foreach_sub_(self._snapshot, [p.detach() for p in self.params])
            return l2_norms(self._snapshot, exact_tiny=False)
        weight_norms: list[float] = []
        update_norms: list[float] = []
        start = 0
        for _, flat, snapshot, rows in self._groups:
            before = self._weight_norms[start : start + len(rows)]
            start += len(rows)
            torch._foreach_sub_(rows, flat)  # the snapshot becomes before - after, in place
            update_norms += _row_norms(snapshot, exact_tiny=False, weight_norms=before)
            torch.stack(flat, out=snapshot)  # the weights after this step: next snapshot
            weight_norms += _row_norms(snapshot)
        self._weight_norms = weight_norms
        self._versions = [p._version for p in self.params]
        return self._in_order(update_norms)


def _dense_values(g: Tensor) -> Tensor:
    """A sparse gradient (``nn.Embedding(sparse=True)``) as the values it holds: its norm and
    non-finite count are those of its coalesced values (duplicates summed first)."""
    if g.layout == torch.strided:
        return g
    return g.coalesce().values()


class ParamProbe(Probe):
    """Per parameter: gradient norm and non-finite count, weight norm and non-finite count, and
    the norm of the update the optimizer step made (with an optimizer).

    Gradients are read at ``grads_ready`` (after the closure's first evaluation, after
    GradScaler's unscaling); without an optimizer, at the end of each backward pass (unscaled
    here). The weight norms are those before the step.
    """

    columns = tuple(c for c in BUILTIN if c.level == "param")

    def attach(self, ctx: ProbeContext) -> None:
        self.ctx = ctx
        self.rows = ctx.layout.params
        self._tracker: tuple[list[ParamRow], UpdateTracker, list[ParamRow]] | None = None
        self._where: tuple[Tensor, Tensor] | None = None  # positions of held / other rows
        self._held = -1
        self.reset()

    def reset(self) -> None:
        self._grads: tuple[tuple[int, ...], Tensor, Tensor] | None = None
        self._weights: tuple[Tensor, Tensor] | None = None
        self._update: tuple[tuple[int, ...], Tensor] | None = None

    def _trainable(self) -> tuple[list[ParamRow], UpdateTracker, list[ParamRow]]:
        """The parameters the optimizer holds (with their update tracker), and the others."""
        groups = self.ctx.optimizer.param_groups
        n = sum(len(g["params"]) for g in groups)
        if self._tracker is None or n != self._held:
            held = {id(p) for g in groups for p in g["params"]}
            rows = [r for r in self.rows if id(r.param) in held]
            others = [r for r in self.rows if id(r.param) not in held]
            self._tracker = (rows, UpdateTracker([local(r.param) for r in rows]), others)
            self._held = n
            device = self.ctx.device
            self._where = tuple(
                torch.tensor([r.index for r in part], dtype=torch.long, device=device)
                for part in (rows, others)
            )
        return self._tracker

    def grads_ready(self) -> None:
        present = [r for r in self.rows if r.param.grad is not None]
        grads = [_dense_values(local(r.param.grad.detach())) for r in present]
        gnorm = l2_norms(grads)
        if self.ctx.optimizer is None:
            gnorm = self.ctx.unscale(gnorm)  # no GradScaler.unscale_ ran before this
        self._grads = (tuple(r.index for r in present), gnorm, nonfinite_counts(grads, gnorm))
        if self.ctx.optimizer is None:
            weights = [local(r.param.detach()) for r in self.rows]
            wnorm = l2_norms(weights)
            self._weights = (wnorm, nonfinite_counts(weights, wnorm))

    def step_begin(self) -> None:
        rows, tracker, others = self._trainable()
        held = tracker.before_step()
        if not others:
            wnorm = held
        else:
            held_at, others_at = self._where
            wnorm = torch.empty(len(self.rows), dtype=torch.float64, device=held.device)
            wnorm[held_at] = held
            wnorm[others_at] = l2_norms([local(r.param.detach()) for r in others])
        weights = [local(r.param.detach()) for r in self.rows]
        self._weights = (wnorm, nonfinite_counts(weights, wnorm))

    def step_end(self) -> None:
        rows, tracker, _ = self._trainable()
        if self._weights is not None:  # the snapshot was taken by this step's step_begin
            self._update = (tuple(r.index for r in rows), tracker.after_step())

    def measure(self, row: Row) -> None:
        if self._grads is not None:
            present, gnorm, gbad = self._grads
            if present:
                row.set_params("grad_norm", gnorm, present)
                row.set_params("grad_nonfinite", gbad, present)
        if self._weights is not None:
            wnorm, wbad = self._weights
            row.set_params("param_norm", wnorm)
            row.set_params("param_nonfinite", wbad)
        if self._update is not None:
            rows, unorm = self._update
            row.set_params("update_norm", unorm, rows)

    def close(self) -> None:
        self._tracker = None  # the snapshot: one copy of the parameters
