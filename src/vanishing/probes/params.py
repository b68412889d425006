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
* CPU, fused (opt-in, ``VANISHING_FUSED=1``): one compiled pass per parameter
  (:mod:`vanishing.stats.fused`), compiled when the probe attaches; the gradient norms too.
  Where compiling fails, the eager path runs and the manifest's ``measurement`` says so.

Weight and gradient norms run with denormals flushed to zero on a CPU where that is measured
to pay (:class:`~vanishing.stats.norms.flush_denormals`, the user's setting restored after). The
update norms do not: under flushing a zero norm could no longer tell "no change" from
"changes below 1.1e-19" without another pass, and the updates of a vanishing layer are mostly
exact zeros (below the weights' float32 resolution), which cost no denormal arithmetic.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from vanishing.modules import local
from vanishing.probes.base import Probe, ProbeContext
from vanishing.recorder.columns import BUILTIN
from vanishing.stats import fused as _fused
from vanishing.stats.norms import (
    _exact_norms,
    _trusted,
    flush_denormals,
    l2_norms,
    nonfinite_counts,
)

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
    if weight_norms is None:  # weights: flushed (see the module's docstring)
        with flush_denormals() as flushed:
            values = torch.linalg.vector_norm(matrix, dim=1, **kwargs).tolist()  # host sync: CPU
    else:  # updates: in the user's setting (None: asked only where it matters)
        flushed = None
        values = torch.linalg.vector_norm(matrix, dim=1, **kwargs).tolist()  # host sync: CPU
    n = matrix.shape[1]
    tiny = n * _TINY_WEIGHT_RMS**2
    redo = [
        i
        for i, v in enumerate(values)
        if (v == 0.0 and weight_norms is not None and weight_norms[i] ** 2 < tiny)
        or not _trusted(v, n, exact_tiny, flushed)
    ]
    if redo:
        for i, v in zip(redo, _exact_norms([matrix[i] for i in redo])):
            values[i] = v
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

    def __init__(self, params: list[Tensor], fused: _fused.FusedUpdate | None = None) -> None:
        self.params = params
        self.fused = fused  # compiled for exactly these parameters, in this order
        views = [p.detach() for p in params]
        self.grouped = bool(params) and all(
            p.device.type == "cpu" and p.is_contiguous() for p in views
        )
        self._versions: list[int] | None = None
        self._refilled_at = -2  # the number of the step whose end refilled the snapshot
        if fused is not None:
            self.grouped = False
            self._weight_norms: list[float] = []
        elif self.grouped:
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
            self._weight_norms = []  # of the weights in the snapshot
        else:
            self._snapshot = [torch.empty_like(p) for p in views]

    @property
    def nbytes(self) -> int:
        """The snapshot's size: one copy of the parameters (held or not)."""
        return sum(p.numel() * p.element_size() for p in self.params)

    @property
    def held(self) -> bool:
        """Whether the snapshot's memory is allocated now (see :meth:`after_step`'s ``keep``)."""
        if self.fused is not None:
            return True
        if self.grouped:
            return any(g[2] is not None for g in self._groups)
        return self._snapshot is not None

    def _current(self, step: int | None) -> bool:
        """Whether the snapshot holds the weights as they are: refilled at the end of the step
        just before ``step`` (steps in between changed the weights, which the version counters
        miss under fused optimizers: ``AdamW(fused=True)``, the Hugging Face Trainer's default,
        writes the parameters without bumping them), and no version counter moved since."""
        if self._versions is None or (step is not None and step != self._refilled_at + 1):
            return False
        return all(p._version == v for p, v in zip(self.params, self._versions))

    def _in_order(self, grouped: list[float]) -> Tensor:
        return torch.tensor([grouped[pos] for pos in self._position], dtype=torch.float64)

    def before_step(self, step: int | None = None) -> Tensor:
        """Take the snapshot (unless the last one is still current); return the weight norms.

        ``step``: the number of the step about to be taken (see :meth:`after_step`)."""
        if self.fused is not None:
            if not self._current(step):
                self._weight_norms = self.fused.refill()
            return torch.tensor(self._weight_norms, dtype=torch.float64)
        if not self.grouped:
            views = [p.detach() for p in self.params]
            if self._snapshot is None:
                self._snapshot = [v.clone() for v in views]
            else:
                torch._foreach_copy_(self._snapshot, views)
            return l2_norms(views)
        if not self._current(step):
            self._weight_norms = []
            for g, (idx, flat, snapshot, _) in enumerate(self._groups):
                if snapshot is None:  # released after the last step: a fresh one
                    snapshot = torch.stack(flat)
                    self._groups[g] = (idx, flat, snapshot, list(snapshot.unbind(0)))
                else:
                    torch.stack(flat, out=snapshot)
                self._weight_norms += _row_norms(snapshot)
        return self._in_order(self._weight_norms)

    def after_step(self, keep: bool = True, step: int | None = None) -> Tensor:
        """The norm of the change each parameter went through since :meth:`before_step`.

        On the CPU this also measures the new weights' norms while they are in cache: they are
        the next :meth:`before_step`'s, as long as no parameter changes in between.

        ``keep=False`` (the next step is not recorded, so the snapshot could not be reused):
        the snapshot is freed instead of refilled, and the next :meth:`before_step` takes a new
        one; between steps the monitor then holds no copy of the parameters. The compiled
        (fused) path keeps its own. ``step``: this step's number; a snapshot refilled here is
        reused only by ``before_step(step + 1)`` (without numbers: whenever no version counter
        moved).
        """
        self._refilled_at = step if step is not None else -2
        if self.fused is not None:
            update_norms, self._weight_norms = self.fused.step()
            self._versions = [p._version for p in self.params]
            return torch.tensor(update_norms, dtype=torch.float64)
        if not self.grouped:
            torch._foreach_sub_(self._snapshot, [p.detach() for p in self.params])
            update = l2_norms(self._snapshot, exact_tiny=False)
            if not keep:
                self._snapshot = None
            return update
        weight_norms: list[float] = []
        update_norms: list[float] = []
        start = 0
        for g, (idx, flat, snapshot, rows) in enumerate(self._groups):
            before = self._weight_norms[start : start + len(rows)]
            start += len(rows)
            torch._foreach_sub_(rows, flat)  # the snapshot becomes before - after, in place
            update_norms += _row_norms(snapshot, exact_tiny=False, weight_norms=before)
            if keep:
                torch.stack(flat, out=snapshot)  # the weights after this step: next snapshot
                weight_norms += _row_norms(snapshot)
            else:
                self._groups[g] = (idx, flat, None, None)
        self._weight_norms = weight_norms
        self._versions = [p._version for p in self.params] if keep else None
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
        self._fused_grads: _fused.FusedSquareNorms | None = None
        self._grad_rows: list[ParamRow] = []
        # Compiled here, when the monitor attaches (never inside a step), and only at the first
        # attach: a layout revision later reuses kernels compiled for the same shapes, if any.
        first = not hasattr(self, "_measurement")
        self._fused_wanted = _fused.requested() and ctx.device.type == "cpu"
        with flush_denormals() as on:  # whether this CPU can flush (the weights' norms do)
            pass
        self._measurement = {"update": _fused.EAGER, "grad": _fused.EAGER, "flush_denormal": on}
        if self._fused_wanted and (first or self._fused_cached()):
            self._build_fused()
        self.reset()

    def _fused_cached(self) -> bool:
        return _fused.compilations == len(_fused._compiled)  # nothing failed to compile so far

    def _build_fused(self) -> None:
        """Compile the fused kernels for these parameters (``VANISHING_FUSED=1``)."""
        try:
            self._grad_rows = [r for r in self.rows if r.param.requires_grad]
            self._fused_grads = _fused.FusedSquareNorms([local(r.param) for r in self._grad_rows])
            self._measurement["grad"] = _fused.FUSED
            if self.ctx.optimizer is not None:
                self._trainable(fused=True)
        except _fused.FusedUnavailable as e:
            self._measurement["fused_error"] = str(e)
            self.ctx.note(f"fused measurement unavailable, measured eagerly: {e}")

    def manifest_entries(self) -> dict:
        """What this probe adds to the run manifest: which measurement path ran."""
        if not hasattr(self, "_measurement"):
            return {}
        return {"measurement": dict(self._measurement)}

    def _fused_failed(self, e: Exception) -> None:
        """A fused kernel failed while training (e.g. it would have recompiled): eager for good."""
        self._fused_grads = None
        self._measurement.update(grad=_fused.EAGER, update=_fused.EAGER)
        self._measurement["fused_error"] = f"{type(e).__name__}: {str(e).strip()[:200]}"
        if self._tracker is not None:
            self._tracker[1].fused = None
            self._tracker = None  # rebuilt eagerly (a fresh snapshot) at the next step
        self.ctx.note("fused measurement stopped, measured eagerly from here on")

    def reset(self) -> None:
        self._grads: tuple[tuple[int, ...], Tensor, Tensor] | None = None
        self._weights: tuple[Tensor, Tensor] | None = None
        self._update: tuple[tuple[int, ...], Tensor] | None = None

    def _trainable(
        self, fused: bool = False
    ) -> tuple[list[ParamRow], UpdateTracker, list[ParamRow]]:
        """The parameters the optimizer holds (with their update tracker), and the others.

        ``fused``: compile the fused update kernel for them (only from ``attach``); a tracker
        made again later (the optimizer's parameters changed) is eager, unless kernels for the
        same shapes are compiled already.
        """
        groups = self.ctx.optimizer.param_groups
        n = sum(len(g["params"]) for g in groups)
        if self._tracker is None or n != self._held:
            held = {id(p) for g in groups for p in g["params"]}
            rows = [r for r in self.rows if id(r.param) in held]
            others = [r for r in self.rows if id(r.param) not in held]
            params = [local(r.param) for r in rows]
            kernel = None
            if fused or (self._measurement["update"] == _fused.FUSED and self._fused_cached()):
                kernel = self._fused_update([p.detach() for p in params], compile_now=fused)
            self._measurement["update"] = _fused.FUSED if kernel is not None else _fused.EAGER
            self._tracker = (rows, UpdateTracker(params, kernel), others)
            self._held = n
            device = self.ctx.device
            self._where = tuple(
                torch.tensor([r.index for r in part], dtype=torch.long, device=device)
                for part in (rows, others)
            )
        return self._tracker

    def _fused_update(self, weights: list[Tensor], compile_now: bool):
        """The fused update kernel for ``weights``; None where it is not compiled (or fails)."""
        if (
            not compile_now
            and (
                "_update_sums",
                _fused._signature(weights),
            )
            not in _fused._compiled
        ):
            return None  # would compile inside a step: stay eager
        try:
            return _fused.FusedUpdate(weights)
        except _fused.FusedUnavailable as e:
            self._measurement["fused_error"] = str(e)
            self.ctx.note(f"fused measurement unavailable, measured eagerly: {e}")
            return None

    def _grad_norms(self, present: list[ParamRow], grads: list[Tensor]) -> Tensor:
        same = len(present) == len(self._grad_rows) and all(
            a is b for a, b in zip(present, self._grad_rows)
        )
        if self._fused_grads is not None and same:
            try:
                norms = self._fused_grads(grads)
            except Exception as e:  # noqa: BLE001 - e.g. it would recompile: go eager
                self._fused_failed(e)
                norms = None
            if norms is not None:
                return torch.tensor(norms, dtype=torch.float64)
        return l2_norms(grads)

    def grads_ready(self) -> None:
        present = [r for r in self.rows if r.param.grad is not None]
        grads = [_dense_values(local(r.param.grad.detach())) for r in present]
        gnorm = self._grad_norms(present, grads)
        if self.ctx.optimizer is None:
            gnorm = self.ctx.unscale(gnorm)  # no GradScaler.unscale_ ran before this
        self._grads = (tuple(r.index for r in present), gnorm, nonfinite_counts(grads, gnorm))
        if self.ctx.optimizer is None:
            weights = [local(r.param.detach()) for r in self.rows]
            wnorm = l2_norms(weights)
            self._weights = (wnorm, nonfinite_counts(weights, wnorm))

    def step_begin(self) -> None:
        rows, tracker, others = self._trainable()
        held = tracker.before_step(self.ctx.step())
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
            try:
                update = tracker.after_step(keep=self.ctx.keep_for_next(), step=self.ctx.step())
            except Exception as e:  # noqa: BLE001 - a fused kernel failed: no update this step
                if tracker.fused is None:
                    raise
                self._fused_failed(e)
                return
            self._update = (tuple(r.index for r in rows), update)

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

    def held_bytes(self) -> dict[str, int]:
        """Memory this probe holds for the update measurement (see ``Monitor.memory``)."""
        if getattr(self, "_tracker", None) is None:
            return {"snapshot": 0, "snapshot_held": 0}
        tracker = self._tracker[1]
        return {"snapshot": tracker.nbytes, "snapshot_held": tracker.nbytes * tracker.held}

    def close(self) -> None:
        self._tracker = None  # the snapshot: one copy of the parameters
