"""``vanishing.watch``: record how the gradient flows through a model while it trains.

The monitor hooks the model (forward hooks for activations and the error signal, a forward
pre-hook on recurrent layers for the temporal profile), the optimizer (step pre/post hooks for
gradient, weight and update statistics) and the end of each backward pass (see
``probes/backward.py``). Every statistic is computed on the model's device and written into a
preallocated device buffer ``[flush_every x columns]``; the buffer crosses to the host once per
flush, where it becomes Parquet part files in the run directory.
"""

from __future__ import annotations

import atexit
import datetime as _dt
import functools
import math
import os
import platform
import time
import warnings
import weakref
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from vanishing.probes import backward as _backward_probe
from vanishing.probes.params import UpdateTracker
from vanishing.recorder.schema import MODULE_STATS, PARAM_STATS, SCHEMA_VERSION, STEP_STATS
from vanishing.schedule import Schedule, resolve_schedule
from vanishing.stats.activations import (
    activation_kind,
    activation_params,
    activation_stats,
    max_derivative,
    stats_into,
)
from vanishing.stats.norms import (
    MAX_TIME_POINTS,
    cpu_norm,
    l2_norm,
    l2_norms,
    nonfinite_counts,
    temporal_profile,
)

__all__ = ["Monitor", "watch", "WatchError"]

_STATS_LEVELS = ("all", "parameters")
_RECURRENT = (nn.RNN, nn.LSTM, nn.GRU)
_CHANNEL_FIRST = (
    nn.modules.conv._ConvNd,
    nn.modules.batchnorm._BatchNorm,
    nn.GroupNorm,
    nn.modules.instancenorm._InstanceNorm,
    nn.modules.pooling._MaxPoolNd,
    nn.modules.pooling._AvgPoolNd,
)
_N_PARAM = len(PARAM_STATS)  # grad_norm, param_norm, update_norm, grad_nonfinite, param_nonfinite
_N_MODULE = len(MODULE_STATS)  # error_norm, then the activation statistics
_N_TIME = MAX_TIME_POINTS + 1  # the profile, then the sequence length
_WATCHED_ATTR = "_vanishing_monitor"


class WatchError(ValueError):
    """Bad arguments to :func:`vanishing.watch` (one line, saying what to do instead)."""


def _unwrap(model: nn.Module) -> nn.Module:
    """The module whose names users know: inside DDP/FSDP wrappers and ``torch.compile``."""
    seen = set()
    while id(model) not in seen:
        seen.add(id(model))
        inner = getattr(model, "_orig_mod", None)  # torch.compile's OptimizedModule
        if isinstance(inner, nn.Module):
            model = inner
            continue
        if type(model).__name__ in (
            "DistributedDataParallel",
            "DataParallel",
            "FullyShardedDataParallel",
        ) and isinstance(getattr(model, "module", None), nn.Module):
            model = model.module
            continue
        break
    return model


@dataclass
class _ModuleRow:
    index: int
    name: str
    module: nn.Module
    kind: str | None  # activation kind
    recurrent: bool
    owns_params: bool
    # resolved at the module's first recorded call
    unit_dim: int | None = None
    max_deriv: float | None = None
    params: dict[str, Any] = field(default_factory=dict)
    needs_input: bool = False
    examples_per_unit: int | None = None  # entries per unit in one call (batch x positions)


@dataclass
class _ParamRow:
    index: int
    param: nn.Parameter
    owners: list[tuple[str, str]] = field(default_factory=list)  # (module name, local name)


def _local(t: Tensor) -> Tensor:
    """This process's shard of a DTensor (FSDP2's sharded parameters and gradients), else ``t``.

    Norms of shards are squared and summed across the shard group at flush time.
    """
    return t.to_local() if type(t).__name__ == "DTensor" else t


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


class Monitor:
    """Records per-layer gradient statistics of a training loop; made by :func:`watch`.

    Use it as a context manager or call :meth:`close` when done. ``run_dir`` is where the
    records go; :meth:`flush` writes what is buffered now; ``step`` counts completed steps.

    Example:
        >>> import torch, tempfile, vanishing
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Sigmoid(), torch.nn.Linear(8, 1))
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> mon = vanishing.watch(model, optimizer=opt, run_dir=tempfile.mkdtemp() + "/run")
        >>> for _ in range(5):
        ...     opt.zero_grad(); model(torch.randn(16, 4)).pow(2).mean().backward(); opt.step()
        >>> mon.step
        5
        >>> mon.close()
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        *,
        run_dir: str | os.PathLike | None = None,
        stats: str = "all",
        every: int | str | Schedule = 1,
        flush_every: int = 50,
        scaler: Any = None,
    ) -> None:
        _validate(model, optimizer, stats, flush_every, scaler)
        self._schedule = resolve_schedule(every)
        self._root = _unwrap(model)
        if getattr(self._root, _WATCHED_ATTR, None) is not None:
            raise WatchError(
                "this model is already watched by another monitor; close() that one first"
            )
        self._optimizer = optimizer
        self._scaler = scaler
        self._stats = stats
        self._flush_every = flush_every
        self._closed = False
        self._broken: str | None = None
        self._handles: list[Any] = []
        self._error_hooks: dict[int, Callable] = {}
        self._act_buffers: dict[tuple, tuple[Tensor, Tensor]] = {}
        self._discovery_handles: list[Any] = []

        self._build_rows()
        if not self._params:
            raise WatchError("the model has no parameters: there is no gradient to watch")
        if optimizer is not None:
            held = {id(p) for g in optimizer.param_groups for p in g["params"]}
            if not any(id(r.param) in held for r in self._params):
                raise WatchError(
                    "the optimizer holds none of the model's parameters; pass the optimizer "
                    "that trains this model (e.g. torch.optim.SGD(model.parameters(), ...))"
                )
        self._device = self._params[0].param.device
        self._layout_columns()
        self._buffer: Tensor | None = None  # allocated on the first recorded step
        self._host_buffer = None  # on the CPU: a NumPy array sharing the buffer's memory
        self._host_writes = True  # on the CPU, write rows through NumPy (tests turn it off)
        self._slot = 0
        self._last_slot: int | None = None  # buffer row of the last recorded step
        self._host_rows: list[tuple[int, float, int]] = []  # (step, wall time, skipped before)

        self.run_dir = Path(run_dir) if run_dir is not None else _default_run_dir()
        from vanishing.recorder.writer import RunWriter

        try:
            self._writer = RunWriter(self.run_dir)
        except (FileExistsError, NotADirectoryError, PermissionError) as e:
            raise WatchError(str(e)) from None
        self._started = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")

        # forward order
        self._order: list[str] = []
        self._seen_names: set[str] = set()
        self._ran: set[str] = set()
        self._last_layer_name: str | None = None
        self._order_final = False
        self._following_activation: dict[str, str] = {}

        # per-step state
        self.step = 0
        self._recording = self._schedule(0)
        self._reset_pending()
        self._skipped = 0
        self._sentinel: tuple[nn.Parameter, weakref.ref, int] | None = None
        self._tracker: tuple[list[_ParamRow], UpdateTracker, list[_ParamRow]] | None = None
        self._weights: tuple[Tensor, Tensor] | None = None
        self._opt_groups_seen = -1
        self._grad_stats: tuple[Tensor, ...] | None = None
        self._index_cache: dict[tuple, tuple[Tensor, Tensor]] = {}

        self._status = "running"
        self._writer.write_manifest(self._manifest())
        self._attach()
        setattr(self._root, _WATCHED_ATTR, weakref.ref(self))
        _open_monitors.add(self)

    # ------------------------------------------------------------------ layout
    def _build_rows(self) -> None:
        self._modules: list[_ModuleRow] = []
        self._params: list[_ParamRow] = []
        by_id: dict[int, _ParamRow] = {}
        for name, module in self._root.named_modules(remove_duplicate=True):
            own = list(module.named_parameters(recurse=False))
            kind = activation_kind(module)
            recurrent = isinstance(module, _RECURRENT)
            if own or kind is not None:
                row = _ModuleRow(len(self._modules), name, module, kind, recurrent, bool(own))
                self._modules.append(row)
            for local, p in own:
                pr = by_id.get(id(p))
                if pr is None:
                    pr = by_id[id(p)] = _ParamRow(len(self._params), p)
                    self._params.append(pr)
                pr.owners.append((name, local))
        self._module_by_name = {r.name: r for r in self._modules}
        # FSDP2: parameters sharded over process groups; their norms are combined at flush
        self._sharded: dict[Any, list[int]] = {}
        for r in self._params:
            for group in _shard_groups(r.param):
                self._sharded.setdefault(group, []).append(r.index)

    def _layout_columns(self) -> None:
        P, M = len(self._params), len(self._modules)
        self._rnn_rows = [r for r in self._modules if r.recurrent]
        self._rnn_slot = {r.index: i for i, r in enumerate(self._rnn_rows)}
        R = len(self._rnn_rows)
        self._col_param = len(STEP_STATS)
        self._col_module = self._col_param + _N_PARAM * P
        self._col_time = self._col_module + _N_MODULE * M
        self._width = self._col_time + _N_TIME * R

    # ------------------------------------------------------------------ hooks
    def _attach(self) -> None:
        root = self._root
        for entry in _entry_modules(root):
            self._handles.append(
                entry.register_forward_pre_hook(self._guard(self._on_forward_start))
            )
            self._handles.append(entry.register_forward_hook(self._guard(self._on_forward_end)))
        for name, module in root.named_modules():
            h = module.register_forward_pre_hook(functools.partial(self._discover, name))
            self._discovery_handles.append(h)
        if self._stats == "all":
            for row in self._modules:
                if row.kind is not None:
                    hook = self._guard(functools.partial(self._on_activation, row))
                    self._handles.append(row.module.register_forward_hook(hook))
                if row.owns_params and row.kind is None:
                    hook = self._guard(functools.partial(self._on_layer_output, row))
                    self._handles.append(row.module.register_forward_hook(hook))
                if row.recurrent:
                    hook = self._guard(functools.partial(self._on_recurrent_input, row))
                    self._handles.append(row.module.register_forward_pre_hook(hook))
        if self._optimizer is not None:
            opt = self._optimizer
            self._handles.append(opt.register_step_pre_hook(self._guard(self._on_step_start)))
            self._handles.append(opt.register_step_post_hook(self._guard(self._on_step_end)))
        _backward_probe.add_listener(self)

    def _guard(self, fn: Callable) -> Callable:
        """Run a hook; a failure inside the monitor must never break the user's training."""

        @functools.wraps(fn)
        def hook(*args, **kwargs):
            if self._broken is not None or self._closed:
                return None
            try:
                return fn(*args, **kwargs)
            except Exception as e:  # noqa: BLE001 - report, stop monitoring, keep training
                self._fail(e)
                return None

        return hook

    def _fail(self, e: BaseException) -> None:
        self._broken = f"{type(e).__name__}: {e}"
        warnings.warn(
            f"vanishing: monitoring stopped after an internal error ({self._broken}); "
            "training continues unaffected, records up to now are kept",
            RuntimeWarning,
            stacklevel=3,
        )

    def _discover(self, name: str, module: nn.Module, args: tuple) -> None:
        if self._order_final:
            return
        if name not in self._seen_names:
            self._seen_names.add(name)
            self._order.append(name)
        row = self._module_by_name.get(name)
        if row is None:
            return
        if row.owns_params and row.kind is None:
            self._last_layer_name = name
        elif row.kind is not None:
            prev = self._last_layer_name
            if prev is not None and prev not in self._following_activation:
                self._following_activation[prev] = row.kind

    def _backward_wanted(self) -> bool:
        return not self._closed and self._broken is None and self._forward_seen

    # forward ---------------------------------------------------------------
    def _on_forward_start(self, module: nn.Module, args: tuple) -> None:
        if not torch.is_grad_enabled():
            return
        if self._pending_backward and self._grads_were_reset():
            # The last backward's step never happened (e.g. GradScaler skipped it on inf/NaN):
            # its numbers belong to no optimizer step.
            self._skipped += 1
            self._reset_pending()
            self._recording = self._schedule(self.step)

    def _on_forward_end(self, module: nn.Module, args: tuple, output: Any) -> None:
        if torch.is_grad_enabled():
            self._forward_seen = True

    def _finish_discovery(self) -> None:
        self._order_final = True
        for h in self._discovery_handles:
            h.remove()
        self._discovery_handles.clear()
        ran = set(self._order)
        # Modules that own parameters but never ran their own forward (e.g. the out_proj of
        # nn.MultiheadAttention, used functionally by its parent) go right after their parent.
        order = list(self._order)
        for row in self._modules:
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
        self._ran = set(self._order)
        self._order = order
        self._writer.write_manifest(self._manifest())

    def _on_activation(self, row: _ModuleRow, module: nn.Module, args: tuple, output: Any) -> None:
        if not (self._recording and torch.is_grad_enabled()):
            return
        if not isinstance(output, Tensor) or not output.is_floating_point():
            return
        z = args[0] if args and isinstance(args[0], Tensor) else None
        inplace = z is output
        if row.unit_dim is None:
            last = self._module_by_name.get(self._last_layer_name or "")
            last = last.module if last is not None else None
            channels_first = output.dim() >= 3 and isinstance(last, _CHANNEL_FIRST)
            row.unit_dim = 1 if (channels_first or output.dim() == 2) else -1
            if output.dim() >= 2 and output.shape[row.unit_dim] > 0:
                row.examples_per_unit = output.numel() // output.shape[row.unit_dim]
            row.max_deriv = max_derivative(row.kind, module)
            row.params = activation_params(row.kind, module)
            row.needs_input = row.kind in _NEEDS_INPUT or (
                row.kind == "leaky_relu" and module.negative_slope <= 0
            )
        params, needs_input = row.params, row.needs_input
        if inplace:
            # In place: the output overwrote the input and may be overwritten again.
            vec = activation_stats(
                row.kind,
                z.detach() if (needs_input and not inplace) else None,
                output,
                unit_dim=row.unit_dim,
                max_deriv=row.max_deriv,
                **params,
            )
            self._pending_act.append(([row.index], vec.unsqueeze(0)))
            return
        # Kept until the end of the backward pass (autograd keeps most of them anyway: the next
        # layer saves its input), then the same-shaped outputs of all layers are measured
        # together: a few kernels in all instead of a dozen per layer. On the CPU the buffers are
        # kept between steps (no allocation); on a GPU they come from the caching allocator each
        # step, so no device memory stays held between steps.
        z = z.detach() if needs_input else None
        y = output.detach()
        self._pending_act_tensors.append((row, z, y, y._version, params))

    def _measure_activations(self) -> None:
        groups: dict[tuple, list] = {}
        for entry in self._pending_act_tensors:
            row, z, y, version, params = entry
            if y._version != version:
                continue  # modified in place after the activation ran: its values are gone
            key = (
                row.kind,
                tuple(y.shape),
                y.dtype,
                y.device,
                z is None,
                row.unit_dim,
                row.max_deriv,
                tuple((k, v if not isinstance(v, Tensor) else id(v)) for k, v in params.items()),
            )
            groups.setdefault(key, []).append(entry)
        self._pending_act_tensors = []
        for entries in groups.values():
            row, z0, y0, _, params = entries[0]
            ys = [e[2] for e in entries]
            dtype = y0.dtype if y0.dtype in (torch.float32, torch.float64) else torch.float32
            shape = (len(ys), y0.numel())
            if y0.device.type != "cpu":
                buffers = (
                    torch.empty(shape, dtype=dtype, device=y0.device),
                    torch.empty(shape, dtype=dtype, device=y0.device),
                )
            else:
                buffers = self._act_buffers.get((shape, dtype))
            if buffers is None:
                buffers = self._act_buffers[(shape, dtype)] = (
                    torch.empty(shape, dtype=dtype),
                    torch.empty(shape, dtype=dtype),
                )
            work, scratch = buffers
            if y0.dtype == dtype:
                torch.stack([y.reshape(-1) for y in ys], out=work)
            else:
                for i, y in enumerate(ys):
                    work[i].copy_(y.reshape(-1))
            zs = None if z0 is None else torch.stack([e[1] for e in entries])
            stats = stats_into(  # reads the stacked outputs through a view of `work`
                row.kind,
                zs,
                work.view(len(ys), *y0.shape),
                work,
                scratch,
                unit_dim=row.unit_dim,
                max_deriv=row.max_deriv,
                **params,
            )
            self._pending_act.append(([e[0].index for e in entries], stats))

    def _on_layer_output(
        self, row: _ModuleRow, module: nn.Module, args: tuple, output: Any
    ) -> None:
        if not (self._recording and torch.is_grad_enabled()):
            return
        out = output[0] if isinstance(output, (tuple, list)) and output else output
        out = getattr(out, "data", out) if _is_packed(out) else out
        if isinstance(out, Tensor) and out.requires_grad:
            hook = self._error_hooks.get(row.index)
            if hook is None:
                hook = self._error_hooks[row.index] = self._guard(
                    functools.partial(self._on_error_signal, row.index)
                )
            out.register_hook(hook)

    def _on_error_signal(self, index: int, grad: Tensor) -> None:
        g = grad.detach()
        if g.device.type == "cpu":
            # Measured now, while the gradient is in cache, as a Python float; the floats of
            # all layers become one tensor at the end of the backward pass.
            self._pending_err_values.append((index, cpu_norm(g)))
        else:
            self._pending_err.append(([index], self._unscale(l2_norm(g)).reshape(1)))

    def _collect_error_signals(self) -> None:
        rows = [i for i, _ in self._pending_err_values]
        norms = torch.tensor([v for _, v in self._pending_err_values], dtype=torch.float64)
        self._pending_err.append((rows, self._unscale(norms)))
        self._pending_err_values = []

    def _on_recurrent_input(self, row: _ModuleRow, module: nn.Module, args: tuple) -> Any:
        if not (self._recording and torch.is_grad_enabled()) or not args:
            return None
        x = args[0]
        packed = _is_packed(x)
        data = x.data if packed else x
        if not isinstance(data, Tensor) or not data.is_floating_point():
            return None
        new_args = None
        if not data.requires_grad:
            # Data fed straight into the RNN has no gradient; a leaf alias that asks for one
            # makes dL/dx_t visible without touching the parameters' gradients.
            data = data.detach().requires_grad_(True)
            new_x = x._replace(data=data) if packed else data
            new_args = (new_x, *args[1:])
        if packed:
            hook = functools.partial(self._on_time_grad, row, None, x.batch_sizes)
        else:
            time_dim = 1 if (module.batch_first and data.dim() == 3) else 0
            hook = functools.partial(self._on_time_grad, row, time_dim, None)
        data.register_hook(self._guard(hook))
        return new_args

    def _on_time_grad(self, row: _ModuleRow, time_dim, batch_sizes, grad: Tensor) -> None:
        profile, T = temporal_profile(grad, time_dim=time_dim or 0, batch_sizes=batch_sizes)
        self._pending_time[self._rnn_slot[row.index]] = (self._unscale(profile), T)

    # backward / optimizer ---------------------------------------------------
    def _unscale(self, value: Tensor) -> Tensor:
        scaler = self._scaler
        if (
            scaler is not None
            and scaler.is_enabled()
            and getattr(scaler, "_scale", None) is not None
        ):
            return value / scaler._scale.to(torch.float64)
        return value

    def _on_backward_end(self, roots: tuple[Tensor, ...]) -> None:
        if self._broken is not None or self._closed:
            return
        try:
            if not self._order_final:
                self._finish_discovery()  # every forward of the first step has run by now
            self._forward_seen = False
            self._pending_backward += 1
            if self._pending_act_tensors:
                self._measure_activations()
            if self._pending_err_values:
                self._collect_error_signals()
            if self._recording:
                for r in roots:
                    if r.numel() == 1:
                        self._pending_loss.append(self._unscale(r.detach().reshape(())))
            self._remember_grads()
            if self._optimizer is None:
                if self._recording:
                    self._measure_gradients(unscale=True)
                    self._measure_weights()
                    self._finalize_step()
                else:
                    self._advance()
        except Exception as e:  # noqa: BLE001 - report, stop monitoring, keep training
            self._fail(e)

    def _remember_grads(self) -> None:
        for r in self._params:
            g = r.param.grad
            if g is not None:
                self._sentinel = (r.param, weakref.ref(g), g._version)
                return
        self._sentinel = None

    def _grads_were_reset(self) -> bool:
        if self._sentinel is None:
            return False
        p, ref, version = self._sentinel
        g = p.grad
        return g is None or g is not ref() or g._version != version

    def _trainable(self) -> tuple[list[_ParamRow], UpdateTracker, list[_ParamRow]]:
        """The parameters the optimizer holds (with their update tracker), and the others."""
        groups = self._optimizer.param_groups
        n = sum(len(g["params"]) for g in groups)
        if self._tracker is None or n != self._opt_groups_seen:
            held = {id(p) for g in groups for p in g["params"]}
            rows = [r for r in self._params if id(r.param) in held]
            others = [r for r in self._params if id(r.param) not in held]
            self._tracker = (rows, UpdateTracker([_local(r.param) for r in rows]), others)
            self._opt_groups_seen = n
        return self._tracker

    def _on_step_start(self, optimizer, args, kwargs) -> None:
        if not self._recording:
            return
        self._measure_gradients(unscale=False)
        rows, tracker, others = self._trainable()
        held = tracker.before_step()
        if not others:
            wnorm = held
        else:
            wnorm = torch.empty(len(self._params), dtype=torch.float64, device=held.device)
            wnorm[self._param_index(rows)] = held
            wnorm[self._param_index(others)] = l2_norms([_local(r.param.detach()) for r in others])
        weights = [_local(r.param.detach()) for r in self._params]
        self._weights = (wnorm, nonfinite_counts(weights, wnorm))

    def _on_step_end(self, optimizer, args, kwargs) -> None:
        if not self._recording:
            self._advance()
            return
        rows, tracker, _ = self._trainable()
        if self._weights is not None:  # the snapshot was taken by this step's pre-hook
            self._update = (rows, tracker.after_step())
        self._finalize_step()

    def _measure_gradients(self, *, unscale: bool) -> None:
        """Gradient norms and non-finite counts of every parameter that has a gradient now."""
        present = [r for r in self._params if r.param.grad is not None]
        grads = [_local(r.param.grad.detach()) for r in present]
        gnorm = l2_norms(grads)
        if unscale:
            gnorm = self._unscale(gnorm)
        self._grad_stats = (present, gnorm, nonfinite_counts(grads, gnorm))

    def _measure_weights(self) -> None:
        weights = [_local(r.param.detach()) for r in self._params]
        wnorm = l2_norms(weights)
        self._weights = (wnorm, nonfinite_counts(weights, wnorm))

    # ------------------------------------------------------------------ buffer
    def _reset_pending(self) -> None:
        self._pending_act: list[tuple[list[int], Tensor]] = []  # (module rows, [k x 5] stats)
        self._pending_act_tensors: list[tuple] = []
        self._pending_err: list[tuple[list[int], Tensor]] = []  # (module rows, norms)
        self._pending_err_values: list[tuple[int, float]] = []  # CPU: (module row, norm)
        self._pending_time: dict[int, tuple[Tensor, int]] = {}
        self._pending_loss: list[Tensor] = []
        self._pending_backward = 0
        self._forward_seen = False
        self._grad_stats = None
        self._weights = None
        self._update = None

    def _advance(self) -> None:
        self.step += 1
        self._recording = self._schedule(self.step)
        self._reset_pending()

    def _index(self, rows: tuple[int, ...]) -> tuple[Tensor, Tensor]:
        cached = self._index_cache.get(rows)
        if cached is None:
            counts = Counter(rows)
            n = len(self._modules)
            count = torch.zeros(n, 1, dtype=torch.float64)
            for i, c in counts.items():
                count[i, 0] = c
            cached = (
                torch.tensor(rows, dtype=torch.long, device=self._device),
                count.to(self._device),
            )
            if len(self._index_cache) > 1024:
                self._index_cache.clear()
            self._index_cache[rows] = cached
        return cached

    def _param_index(self, rows: list[_ParamRow]) -> Tensor | slice:
        if len(rows) == len(self._params):
            return slice(None)
        key = ("p",) + tuple(r.index for r in rows)
        cached = self._index_cache.get(key)
        if cached is None:
            cached = (torch.tensor(key[1:], dtype=torch.long, device=self._device), None)
            self._index_cache[key] = cached
        return cached[0]

    def _finalize_step(self) -> None:
        # what hooks measured after the last backward-end callback (a second backward through
        # a retained graph, torch.autograd.grad, which has no such callback)
        if self._pending_err_values:
            self._collect_error_signals()
        if self._pending_act_tensors:
            self._measure_activations()
        if self._buffer is None:
            if self._device.type == "cpu" and self._host_writes:
                import numpy as np

                self._host_buffer = np.empty((self._flush_every, self._width))
                self._buffer = torch.from_numpy(self._host_buffer)  # the same memory
            else:
                self._buffer = torch.empty(
                    self._flush_every, self._width, dtype=torch.float64, device=self._device
                )
        if self._host_buffer is not None:
            self._write_row_on_host(self._host_buffer[self._slot])
        else:
            self._write_row_on_device(self._buffer[self._slot])
        self._host_rows.append((self.step, time.time(), self._skipped))
        self._skipped = 0
        self._last_slot = self._slot
        self._slot += 1
        self._advance()
        if self._slot >= self._flush_every:
            self.flush()

    def _write_row_on_host(self, row) -> None:
        """:meth:`_write_row_on_device` for a CPU buffer, through NumPy views of it.

        A write through NumPy costs ~1 us against ~5-10 us for an indexed torch write, and a
        step writes a dozen of them; the values are the same (a test compares both ways).
        """
        import numpy as np

        row.fill(np.nan)
        P, M = len(self._params), len(self._modules)
        if self._pending_loss:
            losses = [float(v) for v in self._pending_loss]  # CPU tensors: no device sync
            row[0] = sum(losses)
            row[1] = sum(not math.isfinite(v) for v in losses)
        row[2] = self._pending_backward

        pview = row[self._col_param : self._col_module].reshape(P, _N_PARAM)
        if self._grad_stats is not None:
            present, gnorm, gbad = self._grad_stats
            if present:
                idx = self._host_param_index(present)
                pview[idx, 0] = gnorm.numpy()  # host sync: none, CPU tensors (CPU buffer only)
                pview[idx, 3] = gbad.numpy()
        if self._weights is not None:
            wnorm, wbad = self._weights
            pview[:, 1] = wnorm.numpy()
            pview[:, 4] = wbad.numpy()
        if self._update is not None:
            rows, unorm = self._update
            pview[self._host_param_index(rows), 2] = unorm.numpy()

        mview = row[self._col_module : self._col_time].reshape(M, _N_MODULE)
        for pending, cols in (
            (self._pending_err, slice(0, 1)),
            (self._pending_act, slice(1, None)),
        ):
            if not pending:
                continue
            rows = [i for module_rows, _ in pending for i in module_rows]
            vals = np.concatenate([v.numpy().reshape(len(r), -1) for r, v in pending])
            if len(set(rows)) == len(rows):  # each module measured once (the usual case)
                mview[rows, cols] = vals
            else:  # called several times: the mean over its calls
                sums = np.zeros((M, vals.shape[1]))
                np.add.at(sums, rows, vals)
                count = np.bincount(rows, minlength=M)[:, None]
                with np.errstate(invalid="ignore", divide="ignore"):
                    mview[:, cols] = np.where(count > 0, sums / count, np.nan)
        if self._pending_time:
            tview = row[self._col_time :].reshape(len(self._rnn_rows), _N_TIME)
            for slot, (profile, T) in self._pending_time.items():
                tview[slot, :MAX_TIME_POINTS] = profile.numpy()
                tview[slot, MAX_TIME_POINTS] = T

    def _host_param_index(self, rows: list[_ParamRow]):
        idx = self._param_index(rows)  # cached; a CPU tensor here, viewed as NumPy
        return idx if isinstance(idx, slice) else idx.numpy()

    def _write_row_on_device(self, row: Tensor) -> None:
        """Write the pending statistics of this step into ``row`` with device ops only."""
        row.fill_(float("nan"))
        P, M = len(self._params), len(self._modules)

        if self._pending_loss:
            losses = torch.stack(self._pending_loss).to(torch.float64)
            row[0] = losses.sum()
            row[1] = (~torch.isfinite(losses)).sum()
        row[2].fill_(self._pending_backward)  # fill_, not `= int`: that copies from the host

        pview = row[self._col_param : self._col_module].view(P, _N_PARAM)
        if self._grad_stats is not None:
            present, gnorm, gbad = self._grad_stats
            if present:
                idx = self._param_index(present)
                pview[idx, 0] = gnorm
                pview[idx, 3] = gbad
        if self._weights is not None:
            wnorm, wbad = self._weights
            pview[:, 1] = wnorm
            pview[:, 4] = wbad
        if self._update is not None:
            rows, unorm = self._update
            pview[self._param_index(rows), 2] = unorm

        mview = row[self._col_module : self._col_time].view(M, _N_MODULE)
        if self._pending_err:
            rows_t, count = self._index(tuple(i for rows, _ in self._pending_err for i in rows))
            vals = torch.cat([v for _, v in self._pending_err]).unsqueeze(1)
            sums = torch.zeros(M, 1, dtype=torch.float64, device=self._device)
            mview[:, :1] = sums.index_add_(0, rows_t, vals) / count
        if self._pending_act:
            rows_t, count = self._index(tuple(i for rows, _ in self._pending_act for i in rows))
            vals = torch.cat([v for _, v in self._pending_act])
            sums = torch.zeros(M, _N_MODULE - 1, dtype=torch.float64, device=self._device)
            mview[:, 1:] = sums.index_add_(0, rows_t, vals) / count
        if self._pending_time:
            tview = row[self._col_time :].view(len(self._rnn_rows), _N_TIME)
            for slot, (profile, T) in self._pending_time.items():
                tview[slot, :MAX_TIME_POINTS] = profile
                tview[slot, MAX_TIME_POINTS].fill_(T)

    # ------------------------------------------------------------------ output
    def _layer_names(self) -> tuple[list[_ModuleRow], dict[int, tuple[str, str]], dict[str, int]]:
        order = {name: i for i, name in enumerate(self._order)}
        far = len(order) + len(self._modules)
        modules = sorted(self._modules, key=lambda r: (order.get(r.name, far), r.index))
        depth = {r.name: d for d, r in enumerate(modules)}
        labels = {}
        for p in self._params:
            owner = min(p.owners, key=lambda o: (depth.get(o[0], far), o[0]))
            labels[p.index] = owner
        return modules, labels, depth

    def _manifest(self) -> dict[str, Any]:
        modules, labels, depth = self._layer_names()
        owned: dict[str, list[_ParamRow]] = {}
        for p in self._params:
            owned.setdefault(labels[p.index][0], []).append(p)
        trainable = None
        if self._optimizer is not None:
            trainable = {id(p) for g in self._optimizer.param_groups for p in g["params"]}
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
            layers.append(
                {
                    "name": r.name,
                    "depth": depth[r.name],
                    "type": type(r.module).__name__,
                    "role": "activation" if r.kind is not None and not params else "layer",
                    "activation": r.kind or self._following_activation.get(r.name),
                    "recurrent": r.recurrent,
                    "params": params,
                    "num_params": sum(p["numel"] for p in params),
                    "ran_forward": r.name in self._ran,
                }
            )
            if r.examples_per_unit is not None:
                layers[-1]["examples_per_unit"] = r.examples_per_unit
        opt = self._optimizer
        return {
            "schema_version": SCHEMA_VERSION,
            "created": self._started,
            "status": self._status,
            "forward_order_known": self._order_final,
            "steps_completed": self.step,
            "model": type(self._root).__name__,
            "device": str(self._device),
            "stats": self._stats,
            "schedule": repr(self._schedule),
            "flush_every": self._flush_every,
            "optimizer": None
            if opt is None
            else {"type": type(opt).__name__, "defaults": _jsonable(opt.defaults)},
            "amp_scaler": self._scaler is not None,
            "layers": layers,
            "versions": {
                "vanishing": _version(),
                "torch": torch.__version__,
                "python": platform.python_version(),
            },
        }

    def flush(self) -> None:
        """Write the buffered steps to the run directory now (one device-to-host transfer)."""
        if self._slot == 0:
            return
        n = self._slot
        if self._sharded:
            self._combine_shards(n)
        block = self._buffer[:n].cpu().numpy()  # host sync: the one transfer per flush
        host_rows = self._host_rows[:n]
        self._slot = 0
        self._host_rows = self._host_rows[n:]
        from vanishing.recorder.block import block_to_tables

        modules, labels, depth = self._layer_names()
        tables = block_to_tables(
            block,
            host_rows,
            params=[
                (labels[p.index][0], labels[p.index][1], depth.get(labels[p.index][0], -1))
                for p in self._params
            ],
            modules=[(r.name, depth.get(r.name, -1)) for r in self._modules],
            recurrent=[r.name for r in self._rnn_rows],
            columns=(self._col_param, self._col_module, self._col_time),
        )
        self._writer.write_block(tables)

    def _combine_shards(self, n: int) -> None:
        """Whole-parameter statistics of sharded parameters from every rank's shard statistics.

        Norms combine as sqrt(sum of squared shard norms) and non-finite counts add up. This is
        a collective: every rank of a shard group flushes at the same steps (the same schedule
        and number of steps), as FSDP's own collectives already require.
        """
        import torch.distributed as dist

        P = len(self._params)
        pview = self._buffer[:n, self._col_param : self._col_module].view(n, P, _N_PARAM)
        for group, indices in self._sharded.items():
            idx = torch.tensor(indices, dtype=torch.long, device=self._device)
            stats = pview.index_select(1, idx)  # [n, k, stats]
            measured = (~torch.isnan(stats)).to(torch.float64)
            squared = stats.clone()
            squared[..., :3] = squared[..., :3].square()  # norms add in squares, counts as is
            packed = torch.cat([torch.nan_to_num(squared, nan=0.0), measured], dim=-1)
            dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=group)
            combined = packed[..., :_N_PARAM].clone()
            combined[..., :3] = combined[..., :3].sqrt()
            combined[packed[..., _N_PARAM:] == 0] = float("nan")  # measured on no rank
            pview[:, idx] = combined

    def close(self) -> None:
        """Flush what is buffered and remove every hook. Idempotent."""
        if self._closed:
            return
        try:
            for h in self._handles + self._discovery_handles:
                h.remove()
            self._handles.clear()
            if not self._order_final:
                self._finish_discovery()
            _backward_probe.remove_listener(self)
            if getattr(self._root, _WATCHED_ATTR, None) is not None:
                delattr(self._root, _WATCHED_ATTR)
            _open_monitors.discard(self)
            self._tracker = None
        finally:
            self._closed = True
        self._flush_quietly()
        self._status = "closed"
        try:
            self._writer.write_manifest(self._manifest())
        except Exception as e:  # noqa: BLE001
            warnings.warn(
                f"vanishing: could not write {self.run_dir}: {e}", RuntimeWarning, stacklevel=2
            )

    def _flush_quietly(self) -> None:
        try:
            self.flush()
        except Exception as e:  # noqa: BLE001 - reported, never raised over a training error
            warnings.warn(
                f"vanishing: could not write {self.run_dir}: {e}", RuntimeWarning, stacklevel=2
            )

    def latest(self, stat: str = "grad_norm", *, param: str = "weight") -> dict[str, float]:
        """Each layer's ``stat`` for its ``param`` at the last recorded step, in forward order.

        ``stat`` is one of the per-parameter statistics (``grad_norm``, ``param_norm``,
        ``update_norm``); the result is empty before the first recorded step. It costs one host
        sync, so call it at display rate (a progress bar), not every step.

        Example:
            >>> mon.latest("grad_norm")   # doctest: +SKIP
            {'0': 0.0021, '2': 0.013, '4': 0.19}
        """
        from vanishing.recorder.schema import PARAM_STATS

        if stat not in PARAM_STATS[:3]:
            raise ValueError(f"unknown stat {stat!r}; expected one of {', '.join(PARAM_STATS[:3])}")
        if self._last_slot is None or self._buffer is None:
            return {}
        P = len(self._params)
        col = PARAM_STATS.index(stat)
        row = self._buffer[self._last_slot, self._col_param : self._col_module].view(P, _N_PARAM)
        values = row[:, col].tolist()  # host sync: on demand, for live displays
        modules, labels, _ = self._layer_names()
        by_layer = {
            labels[p.index][0]: v
            for p, v in zip(self._params, values)
            if labels[p.index][1] == param
        }
        return {r.name: by_layer[r.name] for r in modules if r.name in by_layer}

    def diagnose(self):
        """The diagnosis of everything recorded so far (flushes first).

        Example:
            >>> diag = mon.diagnose()   # doctest: +SKIP
            >>> diag.healthy            # doctest: +SKIP
            True
        """
        self.flush()
        from vanishing.recorder.reader import load_run

        # the live model lets the diagnosis measure the recurrent weights' singular values
        return load_run(self.run_dir).diagnose(self._root)

    def __enter__(self) -> Monitor:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<vanishing.Monitor {state} step={self.step} run_dir={str(self.run_dir)!r}>"


_NEEDS_INPUT = {"gelu", "silu", "prelu"}  # phi'(z) cannot be read off their output


def _entry_modules(root: nn.Module) -> list[nn.Module]:
    """The modules a forward pass enters through: the root, or for a container without a forward
    of its own (``nn.ModuleDict``, ``nn.ModuleList``) its children, recursively."""
    if type(root).forward is not nn.Module.forward:
        return [root]
    entries: list[nn.Module] = []
    for child in root.children():
        entries.extend(_entry_modules(child))
    return entries


def _is_packed(x: Any) -> bool:
    return isinstance(x, nn.utils.rnn.PackedSequence)


def _jsonable(d: dict) -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, (int, float, str, bool)) or v is None:
            out[k] = v
        elif isinstance(v, (tuple, list)) and all(isinstance(x, (int, float)) for x in v):
            out[k] = list(v)
        elif isinstance(v, Tensor) and v.numel() == 1:
            out[k] = float(v)  # host sync: once, when the manifest is written
        else:
            out[k] = repr(v)
    return out


def _version() -> str:
    from vanishing import __version__

    return __version__


def _default_run_dir() -> Path:
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    base = Path("runs") / stamp
    path, i = base, 1
    while path.exists():
        path = Path(f"{base}-{i}")
        i += 1
    return path


def _validate(model, optimizer, stats, flush_every, scaler) -> None:
    if not isinstance(model, nn.Module):
        raise WatchError(
            f"watch() needs a torch.nn.Module, got {type(model).__name__}; pass the model itself"
        )
    if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
        raise WatchError(
            f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}"
        )
    if stats not in _STATS_LEVELS:
        raise WatchError(f"stats must be one of {_STATS_LEVELS}, got {stats!r}")
    if not isinstance(flush_every, int) or isinstance(flush_every, bool) or flush_every < 1:
        raise WatchError(f"flush_every must be a positive integer, got {flush_every!r}")
    if scaler is not None and not hasattr(scaler, "is_enabled"):
        raise WatchError("scaler must be a torch.amp.GradScaler (or None)")


_open_monitors: weakref.WeakSet[Monitor] = weakref.WeakSet()


@atexit.register
def _flush_open_monitors() -> None:
    # A script that forgot close() still keeps what it recorded.
    for mon in list(_open_monitors):
        mon._flush_quietly()


def watch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    run_dir: str | os.PathLike | None = None,
    stats: str = "all",
    every: int | str | Schedule = 1,
    flush_every: int = 50,
    scaler: Any = None,
) -> Monitor:
    """Watch a model train: per layer and per step, how the gradient flows.

    Attach before the loop; nothing else in the loop changes. Records go to ``run_dir``
    (default ``runs/<date-time>``), readable with :func:`vanishing.load_run`.

    Args:
        model: any ``nn.Module`` (a ``DistributedDataParallel`` or ``torch.compile`` wrapper is
            looked through, so layer names are the inner model's). Under FSDP2
            (``fully_shard``), watch after sharding: each rank measures its shards and the flush
            combines them into whole-parameter norms (a collective, so every rank must run the
            same steps); activation statistics are each rank's own batch, as under DDP.
        optimizer: the optimizer that trains it. With it, a step is one ``optimizer.step()``
            (gradient accumulation gives one record per step) and the actual update each step
            makes is measured. Without it, a step is one backward pass and there are no update
            statistics.
        run_dir: the run directory to create; it must not already hold a run.
        stats: ``"all"`` (default): gradient, weight and update statistics, plus the error
            signal at each layer's output, activation statistics and the temporal profile of
            recurrent layers. ``"parameters"``: only the per-parameter gradient, weight and update
            statistics, the loss and non-finite counts (the cheapest).
        every: which steps to record: ``1`` (every step, default), an int ``k`` (every k-th),
            ``"log"`` (every step up to 100, then ~100 a decade), or a ``step -> bool`` callable.
        flush_every: recorded steps held on the device between writes.
        scaler: the ``torch.amp.GradScaler`` when training with AMP, so that recorded values
            are unscaled and steps the scaler skips are not recorded.

    Example:
        >>> import torch, tempfile, vanishing
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Sigmoid(), torch.nn.Linear(8, 1))
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> with vanishing.watch(model, optimizer=opt, run_dir=tempfile.mkdtemp() + "/run") as mon:
        ...     for _ in range(3):
        ...         opt.zero_grad(); model(torch.randn(16, 4)).pow(2).mean().backward(); opt.step()
        >>> vanishing.load_run(mon.run_dir).steps["step"].tolist()
        [0, 1, 2]
    """
    return Monitor(
        model,
        optimizer,
        run_dir=run_dir,
        stats=stats,
        every=every,
        flush_every=flush_every,
        scaler=scaler,
    )
