"""Weight norms before a step and the change the step made, for any optimizer.

The update a step makes is measured, not modelled: a snapshot of the weights before
``optimizer.step()`` is subtracted from the weights after it. Two strategies, by device:

* GPU (and any non-CPU device): ``torch._foreach_*`` kernels, which are fused there; the snapshot
  costs one copy of the optimizer's parameters.
* CPU: ``_foreach`` ops run one small kernel per tensor there, and a per-tensor norm is several
  times slower than a row-wise norm of a matrix. So parameters of equal size are stacked into
  ``[k x n]`` matrices, and every norm is one row-wise kernel per size group. The weights stacked
  after a step are kept as the next step's snapshot, reused as long as no parameter's version
  counter moved in between (so nothing is copied twice). Costs two copies of the parameters.
"""

from __future__ import annotations

import torch
from torch import Tensor

from vanishing.stats.norms import l2_norms


def _row_norms(matrix: Tensor) -> Tensor:
    norms = torch.linalg.vector_norm(matrix, dim=1).to(torch.float64)
    bad = ~torch.isfinite(norms) | (norms == 0)
    if bad.any():  # host sync: CPU tensors only, where it costs nothing
        for i in bad.nonzero().flatten().tolist():  # host sync: CPU only
            norms[i] = l2_norms([matrix[i]])[0]
    return norms


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
                before = torch.empty(len(idx), numel, dtype=dtype)
                after = torch.empty(len(idx), numel, dtype=dtype)
                self._groups.append([idx, flat, before, after])
            order = [i for g in self._groups for i in g[0]]
            self._inverse = torch.empty(len(order), dtype=torch.long)
            self._inverse[torch.tensor(order)] = torch.arange(len(order))
            self._versions: list[int] | None = None
        else:
            self._snapshot = [torch.empty_like(p) for p in views]

    def _current(self) -> bool:
        if self._versions is None:
            return False
        return all(p._version == v for p, v in zip(self.params, self._versions))

    def before_step(self) -> Tensor:
        """Take the snapshot (unless the last one is still current); return the weight norms."""
        if not self.grouped:
            views = [p.detach() for p in self.params]
            torch._foreach_copy_(self._snapshot, views)
            return l2_norms(views)
        if not self._current():
            for _, flat, before, _ in self._groups:
                torch.stack(flat, out=before)
        norms = torch.cat([_row_norms(before) for _, _, before, _ in self._groups])
        return norms[self._inverse]

    def after_step(self) -> Tensor:
        """The norm of the change each parameter went through since :meth:`before_step`."""
        if not self.grouped:
            torch._foreach_sub_(self._snapshot, [p.detach() for p in self.params])
            return l2_norms(self._snapshot, exact_tiny=False)
        out = []
        for group in self._groups:
            _, flat, before, after = group
            torch.stack(flat, out=after)
            torch.sub(after, before, out=before)
            out.append(torch.linalg.vector_norm(before, dim=1).to(torch.float64))
            group[2], group[3] = after, before  # the weights after this step: next snapshot
        self._versions = [p._version for p in self.params]
        return torch.cat(out)[self._inverse]
