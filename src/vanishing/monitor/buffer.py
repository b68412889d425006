"""The device buffer: ``[flush_every x width]`` float64, laid out from the declared columns.

A row (one recorded step) is ``[step columns | P x param columns | M x module columns |
R x (time profile, length)]``. Probes write into a :class:`Row` at step end with device ops
only; the buffer crosses to the host once per flush (:meth:`Buffer.take`), after the shards of
FSDP2 parameters have been combined by each column's ``reduce``.

On the CPU the buffer is a NumPy array shared with a tensor, and rows are written through NumPy
views (:class:`HostRow`): ~1 us a write against ~5-10 us for an indexed torch write, a dozen
writes a step. Elsewhere :class:`DeviceRow` writes with torch ops (no host sync). A test checks
that both record the same values.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from vanishing.recorder.block import Block
from vanishing.recorder.columns import Column, by_level
from vanishing.stats.norms import MAX_TIME_POINTS

_N_TIME = MAX_TIME_POINTS + 1  # the profile, then the sequence length


class Buffer:
    """Recorded steps held on the model's device between flushes."""

    def __init__(
        self,
        columns: Sequence[Column],
        *,
        n_params: int,
        n_modules: int,
        n_recurrent: int,
        capacity: int,
        device: torch.device,
        host_writes: bool = True,
    ) -> None:
        self.columns = tuple(columns)
        levels = by_level(self.columns)
        self.step_columns, self.param_columns = levels["step"], levels["param"]
        self.module_columns = levels["module"]
        self.P, self.M, self.R = n_params, n_modules, n_recurrent
        self.scol = {c.name: i for i, c in enumerate(self.step_columns)}
        self.pcol = {c.name: i for i, c in enumerate(self.param_columns)}
        self.mcol = {c.name: i for i, c in enumerate(self.module_columns)}
        self.Kp, self.Km = len(self.param_columns), len(self.module_columns)
        self.col_param = len(self.step_columns)
        self.col_module = self.col_param + self.Kp * self.P
        self.col_time = self.col_module + self.Km * self.M
        self.width = self.col_time + _N_TIME * self.R
        self.capacity = capacity
        self.device = device
        self.host_writes = host_writes and device.type == "cpu"
        self.data: Tensor | None = None  # allocated on the first recorded step
        self._host: np.ndarray | None = None  # on the CPU: the same memory, as NumPy
        self.slot = 0
        self._writing = 0  # the slot of the row being written
        self.last_slot: int | None = None
        self.keys: list[tuple[int, float, int]] = []  # (step, wall time, skipped before)
        self.index = IndexCache(n_modules, device)

    @property
    def nbytes(self) -> int:
        """The memory of the rows not yet flushed (allocated at the first recorded step)."""
        return 0 if self.data is None else self.data.numel() * self.data.element_size()

    def row(self) -> Row:
        """The row of the next recorded step, filled with NaN."""
        if self.data is None:
            if self.host_writes:
                self._host = np.empty((self.capacity, self.width))
                self.data = torch.from_numpy(self._host)  # the same memory
            else:
                self.data = torch.empty(
                    self.capacity, self.width, dtype=torch.float64, device=self.device
                )
        self._writing = self.slot
        if self._host is not None:
            return HostRow(self, self._host[self.slot])
        return DeviceRow(self, self.data[self.slot])

    def commit(self, step: int, skipped: int) -> bool:
        """The row is complete; True when the buffer is full (time to flush)."""
        if self._writing != self.slot:  # a flush (a signal handler's) ran while it was written
            self.data[self.slot] = self.data[self._writing]
        self.keys.append((step, time.time(), skipped))
        self.last_slot = self.slot
        self.slot += 1
        return self.slot >= self.capacity

    def take(self, shard_groups: dict[Any, list[int]], **block: Any) -> Block | None:
        """The buffered steps as a host :class:`Block` (one transfer), and empty the buffer."""
        n = self.slot
        if n == 0:
            return None
        if shard_groups:
            self._combine_shards(n, shard_groups)
        data = self.data[:n].cpu().numpy()  # host sync: the one transfer per flush
        if self.device.type == "cpu":
            data = data.copy()  # a block outlives the buffer's rows, which are reused
        keys, self.keys = self.keys[:n], self.keys[n:]
        self.slot = 0
        P, M, R = self.P, self.M, self.R
        values = {
            "step": {c.name: data[:, i] for i, c in enumerate(self.step_columns)},
            "param": _split(data[:, self.col_param : self.col_module], n, P, self.param_columns),
            "module": _split(data[:, self.col_module : self.col_time], n, M, self.module_columns),
        }
        tblock = data[:, self.col_time :].reshape(n, R, _N_TIME)
        return Block(
            steps=np.array([k[0] for k in keys], dtype=np.int64),
            times=np.array([k[1] for k in keys], dtype=np.float64),
            skipped=np.array([k[2] for k in keys], dtype=np.int64),
            columns=self.columns,
            values=values,
            time_profile=tblock[:, :, :MAX_TIME_POINTS],
            time_length=tblock[:, :, MAX_TIME_POINTS],
            **block,
        )

    def empty(self, **block: Any) -> Block:
        """A block of no steps (to carry a manifest), shaped like any other."""
        n = 0
        values = {
            "step": {c.name: np.zeros(n) for c in self.step_columns},
            "param": {c.name: np.zeros((n, self.P)) for c in self.param_columns},
            "module": {c.name: np.zeros((n, self.M)) for c in self.module_columns},
        }
        return Block(
            steps=np.zeros(n, dtype=np.int64),
            times=np.zeros(n),
            skipped=np.zeros(n, dtype=np.int64),
            columns=self.columns,
            values=values,
            time_profile=np.zeros((n, self.R, MAX_TIME_POINTS)),
            time_length=np.zeros((n, self.R)),
            **block,
        )

    def last_param(self, name: str) -> Tensor | None:
        """Column ``name`` of every parameter row at the last recorded step (on the device)."""
        if self.last_slot is None or self.data is None:
            return None
        row = self.data[self.last_slot, self.col_param : self.col_module].view(self.P, self.Kp)
        return row[:, self.pcol[name]]

    def _combine_shards(self, n: int, groups: dict[Any, list[int]]) -> None:
        """Whole-parameter statistics of sharded parameters from every rank's shard statistics.

        Each column combines by its ``reduce``: norms as sqrt(sum of squared shard norms),
        counts add up, maxima take the largest, means average the ranks that measured. This is
        a collective: every rank of a shard group flushes at the same steps (the same schedule
        and number of steps), as FSDP's own collectives already require.
        """
        import torch.distributed as dist

        reduce = [c.reduce for c in self.param_columns]
        sq = [j for j, r in enumerate(reduce) if r == "sum_sq"]
        mx = [j for j, r in enumerate(reduce) if r == "max"]
        mean = [j for j, r in enumerate(reduce) if r == "mean"]
        K = self.Kp
        pview = self.data[:n, self.col_param : self.col_module].view(n, self.P, K)
        for group, indices in groups.items():
            idx = torch.tensor(indices, dtype=torch.long, device=self.device)
            stats = pview.index_select(1, idx)  # [n, k, stats]
            measured = (~torch.isnan(stats)).to(torch.float64)
            summed = stats.clone()
            summed[..., sq] = summed[..., sq].square()
            summed[..., mx] = 0.0
            packed = torch.cat([torch.nan_to_num(summed, nan=0.0), measured], dim=-1)
            dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=group)
            combined = packed[..., :K].clone()
            combined[..., sq] = combined[..., sq].sqrt()
            combined[..., mean] = combined[..., mean] / packed[..., K:][..., mean]
            if mx:
                largest = torch.nan_to_num(stats[..., mx], nan=float("-inf"))
                dist.all_reduce(largest, op=dist.ReduceOp.MAX, group=group)
                combined[..., mx] = largest
            combined[packed[..., K:] == 0] = float("nan")  # measured on no rank
            pview[:, idx] = combined


def _split(block: np.ndarray, n: int, rows: int, columns: Sequence[Column]) -> dict:
    view = block.reshape(n, rows, len(columns))
    return {c.name: view[:, :, j] for j, c in enumerate(columns)}


class IndexCache:
    """Index tensors of parameter and module row sets, made once per distinct set."""

    def __init__(self, n_modules: int, device: torch.device) -> None:
        self.M = n_modules
        self.device = device
        self._cache: dict[tuple, Any] = {}

    def params(self, rows: tuple[int, ...], n_params: int) -> Tensor | slice:
        if len(rows) == n_params:
            return slice(None)
        key = ("p", *rows)
        cached = self._cache.get(key)
        if cached is None:
            cached = self._cache[key] = torch.tensor(rows, dtype=torch.long, device=self.device)
        return cached

    def modules(self, rows: tuple[int, ...]) -> tuple[Tensor, Tensor]:
        """The rows as an index and, per module, how many of them it is (for the mean)."""
        cached = self._cache.get(rows)
        if cached is None:
            count = torch.zeros(self.M, 1, dtype=torch.float64)
            for i, c in Counter(rows).items():
                count[i, 0] = c
            cached = (
                torch.tensor(rows, dtype=torch.long, device=self.device),
                count.to(self.device),
            )
            if len(self._cache) > 1024:
                self._cache.clear()
            self._cache[rows] = cached
        return cached


class Row:
    """One step's row of the buffer, as probes write it. Values are tensors on the device (or
    Python numbers); indices are parameter / module row numbers of the layout."""

    host = False  # True when values may be read as Python numbers cheaply (CPU buffer)

    def __init__(self, buffer: Buffer, data: Any) -> None:
        self.buffer = buffer
        self.data = data

    def set_step(self, name: str, value: Any) -> None:
        """Step-level column ``name`` (a 0-d tensor or a number)."""
        raise NotImplementedError

    def set_params(self, name: str, values: Tensor, rows: tuple[int, ...] | None = None) -> None:
        """Param-level column ``name`` of the parameter ``rows`` (default: all, in order)."""
        raise NotImplementedError

    def set_modules(self, first: str, rows: Sequence[int], values: Tensor) -> None:
        """``values[i]`` ([len(rows) x c]) into ``c`` consecutive module columns starting at
        ``first``, for module ``rows[i]``; a module listed several times (called several times
        in the step) gets the mean of its values."""
        raise NotImplementedError

    def set_time(self, slot: int, profile: Tensor, length: int) -> None:
        """The temporal profile (``MAX_TIME_POINTS`` norms) of recurrent layer ``slot``."""
        raise NotImplementedError


class HostRow(Row):
    host = True

    def __init__(self, buffer: Buffer, data: np.ndarray) -> None:
        super().__init__(buffer, data)
        data.fill(np.nan)
        b = buffer
        self._p = data[b.col_param : b.col_module].reshape(b.P, b.Kp)
        self._m = data[b.col_module : b.col_time].reshape(b.M, b.Km)

    def set_step(self, name: str, value: Any) -> None:
        self.data[self.buffer.scol[name]] = value

    def set_params(self, name: str, values: Tensor, rows: tuple[int, ...] | None = None) -> None:
        b = self.buffer
        idx = slice(None) if rows is None else b.index.params(rows, b.P)
        if not isinstance(idx, slice):
            idx = idx.numpy()  # host sync: none, the cached CPU index viewed
        self._p[idx, b.pcol[name]] = values.numpy()  # host sync: none, CPU tensors only

    def set_modules(self, first: str, rows: Sequence[int], values: Tensor) -> None:
        start = self.buffer.mcol[first]
        vals = values.numpy().reshape(len(rows), -1)  # host sync: none, CPU tensors
        cols = slice(start, start + vals.shape[1])
        if len(set(rows)) == len(rows):  # each module measured once (the usual case)
            self._m[list(rows), cols] = vals
            return
        M = self.buffer.M
        sums = np.zeros((M, vals.shape[1]))
        np.add.at(sums, list(rows), vals)
        count = np.bincount(list(rows), minlength=M)[:, None]
        with np.errstate(invalid="ignore", divide="ignore"):
            self._m[:, cols] = np.where(count > 0, sums / count, np.nan)

    def set_time(self, slot: int, profile: Tensor, length: int) -> None:
        b = self.buffer
        tview = self.data[b.col_time :].reshape(b.R, _N_TIME)
        tview[slot, :MAX_TIME_POINTS] = profile.numpy()  # host sync: none, CPU tensors
        tview[slot, MAX_TIME_POINTS] = length


class DeviceRow(Row):
    def __init__(self, buffer: Buffer, data: Tensor) -> None:
        super().__init__(buffer, data)
        data.fill_(float("nan"))
        b = buffer
        self._p = data[b.col_param : b.col_module].view(b.P, b.Kp)
        self._m = data[b.col_module : b.col_time].view(b.M, b.Km)

    def set_step(self, name: str, value: Any) -> None:
        i = self.buffer.scol[name]
        if isinstance(value, Tensor):
            self.data[i] = value
        else:
            self.data[i].fill_(value)  # fill_, not `= number`: that copies from the host

    def set_params(self, name: str, values: Tensor, rows: tuple[int, ...] | None = None) -> None:
        b = self.buffer
        idx = slice(None) if rows is None else b.index.params(rows, b.P)
        self._p[idx, b.pcol[name]] = values

    def set_modules(self, first: str, rows: Sequence[int], values: Tensor) -> None:
        b = self.buffer
        start = b.mcol[first]
        vals = values.reshape(len(rows), -1)
        index, count = b.index.modules(tuple(rows))
        sums = torch.zeros(b.M, vals.shape[1], dtype=torch.float64, device=b.device)
        self._m[:, start : start + vals.shape[1]] = sums.index_add_(0, index, vals) / count

    def set_time(self, slot: int, profile: Tensor, length: int) -> None:
        b = self.buffer
        tview = self.data[b.col_time :].view(b.R, _N_TIME)
        tview[slot, :MAX_TIME_POINTS] = profile
        tview[slot, MAX_TIME_POINTS].fill_(length)
