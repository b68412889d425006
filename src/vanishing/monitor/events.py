"""The only place that registers torch hooks: what happened in the training loop, and when.

A monitor hears five moments of a step, in this order:

``forward_begin`` / ``forward_end``
    a forward pass through the model's entry module(s), with gradients enabled.
``backward_end(roots)``
    a backward pass ended (``roots``: the tensors it started from; the loss).
``step_begin``
    ``optimizer.step()`` is about to change the weights.
``grads_ready``
    the gradients are final for this step. Without a closure that is at ``step_begin`` (after
    GradScaler's unscaling, which happens before the step). With ``optimizer.step(closure)``
    (Lightning's automatic optimization, LBFGS) the closure's forward and backward run *inside*
    ``step``, so it is right after the closure's first evaluation returns; LBFGS evaluates the
    closure again during the step, and those later evaluations are not measured (the recorded
    gradient and loss are those at the step's starting weights).
``step_end``
    ``optimizer.step()`` returned.

Without an optimizer a step is one backward pass: the monitor treats ``backward_end`` as the
whole step. A trainer integration may call :meth:`Events.step_begin` etc. itself instead of
relying on the optimizer's hooks.

Besides these, probes register their module and tensor hooks through :meth:`Events.on_output`,
:meth:`Events.on_input` and :meth:`Events.on_grad`, so that every hook is guarded (a failure
stops monitoring, never training) and removed by :meth:`Events.close`.

The end of a backward pass has no hook in torch: ``Tensor.backward`` calls
``torch.autograd.backward`` through the module attribute, so while any monitor is open that one
function is wrapped (restored on the last close). The wrapper calls the original with the same
arguments; nothing about the computation changes.
"""

from __future__ import annotations

import functools
import threading
import weakref
from collections.abc import Callable
from typing import Any, Protocol

import torch
from torch import Tensor, nn


class Listener(Protocol):
    """What a monitor implements to hear the events (all called by :class:`Events`; private
    to the monitor, so that they do not crowd its public API)."""

    def _on_forward_begin(self) -> None: ...
    def _on_forward_end(self) -> None: ...
    def _on_backward_wanted(self) -> bool: ...
    def _on_backward_begin(self) -> None: ...
    def _on_backward_end(self, roots: tuple[Tensor, ...]) -> None: ...
    def _on_step_begin(self) -> None: ...
    def _on_grads_ready(self) -> None: ...
    def _on_step_end(self) -> None: ...
    def _on_fail(self, error: BaseException) -> None: ...


class Events:
    """Hooks on one model (and optionally its optimizer), routed to one listener."""

    def __init__(
        self,
        listener: Listener,
        entries: list[nn.Module],
        optimizer: torch.optim.Optimizer | None,
        *,
        discover: Callable[[str], None] | None = None,
        root: nn.Module | None = None,
    ) -> None:
        self._listener = listener
        self._handles: list[Any] = []
        # The probes' module hooks, removed and made again on a layout revision. Those on
        # entry modules stay; the others are detached on steps not recorded
        # (:meth:`probe_hooks`), where each would return at once.
        self._probe_handles: list[Any] = []
        self._toggled: list[tuple[nn.Module, bool, Callable]] = []  # (module, pre?, hook)
        self._toggled_handles: list[Any] = []
        self._hooks_on = True
        self._entries = {id(e) for e in entries}
        self._discovery: list[Any] = []
        self.closed = False
        self.active = True  # False after a failure: hooks stay registered but do nothing
        self.in_step = False  # inside optimizer.step() (a closure's forwards run here)
        for entry in entries:
            self._handles.append(entry.register_forward_pre_hook(self._guard(self._forward_pre)))
            self._handles.append(entry.register_forward_hook(self._guard(self._forward_post)))
        if discover is not None and root is not None:
            self.start_discovery(root, discover)
        if optimizer is not None:
            self._handles.append(optimizer.register_step_pre_hook(self._guard(self._step_pre)))
            self._handles.append(optimizer.register_step_post_hook(self._guard(self._step_post)))
        # A module or parameter assigned into the watched tree (``model[2] = nn.Linear(...)``,
        # ``m.weight = nn.Parameter(...)``): torch's global registration hooks tell us at no
        # per-step cost, whether or not the optimizer is told.
        self._tree: set[int] = set()
        self.structure_changed = False
        if root is not None:
            from torch.nn.modules import module as _module

            self.watch_structure(root)
            self._handles.append(_module.register_module_module_registration_hook(self._registered))
            self._handles.append(
                _module.register_module_parameter_registration_hook(self._registered)
            )
        _add_listener(self)

    def watch_structure(self, root: nn.Module) -> None:
        """Track assignments into ``root``'s modules from now on (after a layout revision)."""
        self._tree = {id(m) for m in root.modules()}
        self.structure_changed = False

    def _registered(self, parent: nn.Module, name: str, value: Any) -> None:
        if id(parent) in self._tree:
            self.structure_changed = True

    # ------------------------------------------------------------------ for probes
    def on_output(self, module: nn.Module, fn: Callable) -> None:
        """``fn(module, args, output)`` after each forward of ``module`` on a recorded step."""
        self._add_probe_hook(module, False, self._guard(fn))

    def on_input(self, module: nn.Module, fn: Callable) -> None:
        """``fn(module, args)`` before each forward of ``module`` on a recorded step; may
        return new args."""
        self._add_probe_hook(module, True, self._guard(fn))

    def _add_probe_hook(self, module: nn.Module, pre: bool, hook: Callable) -> None:
        if id(module) in self._entries:
            # An entry module's pre-hooks run in a tuple torch makes before its first one (the
            # monitor's own, which switches the others): one added there would miss that call.
            self._probe_handles.append(_register(module, pre, hook))
            return
        self._toggled.append((module, pre, hook))
        if self._hooks_on:
            self._toggled_handles.append(_register(module, pre, hook))

    def probe_hooks(self, on: bool) -> None:
        """Attach (``on``) or detach the probes' hooks on modules other than the entry ones.

        The monitor detaches them for the steps it does not record, when every hook would
        return at once: a module without hooks takes torch's fast call path, so a step not
        recorded costs about what a plain one does (``every=10`` on the 20x256 MLP of
        ``bench/overhead.py``: 1.14x -> 1.06x). Attached again when a recorded step starts; a
        probe sees the same calls either way.
        """
        if on == self._hooks_on:
            return
        self._hooks_on = on
        if on:
            self._toggled_handles = [_register(m, pre, h) for m, pre, h in self._toggled]
        else:
            for h in self._toggled_handles:
                h.remove()
            self._toggled_handles = []

    def on_grad(self, tensor: Tensor, fn: Callable) -> None:
        """``fn(grad)`` when the gradient w.r.t. ``tensor`` is computed (a tensor hook: it goes
        away with the tensor, so it needs no handle)."""
        tensor.register_hook(self.guarded(fn))

    def guarded(self, fn: Callable) -> Callable:
        """``fn`` wrapped so that a failure stops monitoring (reported once), never training."""
        return self._guard(fn)

    def start_discovery(self, root: nn.Module, discover: Callable[[str], None]) -> None:
        """``discover(name)`` as each module of ``root`` starts, until :meth:`stop_discovery`."""
        for name, module in root.named_modules():
            hook = functools.partial(_discover_hook, discover, name)
            self._discovery.append(module.register_forward_pre_hook(hook))

    def remove_probe_hooks(self) -> None:
        """Remove the module hooks probes asked for (a layout revision makes them again)."""
        for h in self._probe_handles + self._toggled_handles:
            h.remove()
        self._probe_handles.clear()
        self._toggled_handles.clear()
        self._toggled.clear()

    def stop_discovery(self) -> None:
        for h in self._discovery:
            h.remove()
        self._discovery.clear()

    def close(self) -> None:
        """Remove every hook. Idempotent."""
        self.remove_probe_hooks()
        for h in self._handles + self._discovery:
            h.remove()
        self._handles.clear()
        self._discovery.clear()
        _remove_listener(self)
        self.closed = True

    # ------------------------------------------------------------------ torch hooks
    def _guard(self, fn: Callable) -> Callable:
        listener = self._listener

        @functools.wraps(fn)
        def hook(*args, **kwargs):
            if self.closed or not self.active:
                return None
            try:
                return fn(*args, **kwargs)
            except Exception as e:  # noqa: BLE001 - report, stop monitoring, keep training
                listener._on_fail(e)
                return None

        return hook

    def _forward_pre(self, module: nn.Module, args: tuple) -> None:
        if torch.is_grad_enabled():
            self._listener._on_forward_begin()

    def _forward_post(self, module: nn.Module, args: tuple, output: Any) -> None:
        if torch.is_grad_enabled():
            self._listener._on_forward_end()

    def _backward_wanted(self) -> bool:
        return not self.closed and self.active and self._listener._on_backward_wanted()

    def _backward_begin(self) -> None:
        try:
            self._listener._on_backward_begin()
        except Exception as e:  # noqa: BLE001 - report, stop monitoring, keep training
            self._listener._on_fail(e)

    def _backward_end(self, roots: tuple[Tensor, ...]) -> None:
        if self.closed or not self.active:
            return
        try:
            self._listener._on_backward_end(roots)
        except Exception as e:  # noqa: BLE001 - report, stop monitoring, keep training
            self._listener._on_fail(e)

    def _step_pre(self, optimizer, args: tuple, kwargs: dict):
        self.in_step = True
        self._listener._on_step_begin()
        closure, where = _closure_of(args, kwargs)
        if closure is None:
            self._listener._on_grads_ready()
            return None
        wrapped = self._after_first_call(closure)
        if where == "args":  # args[0] is the optimizer itself
            return (args[0], wrapped, *args[2:]), kwargs
        return args, {**kwargs, "closure": wrapped}

    def _after_first_call(self, closure: Callable) -> Callable:
        done = False
        ready = self._guard(self._listener._on_grads_ready)

        @functools.wraps(closure)
        def first_then_plain(*a, **k):
            nonlocal done
            result = closure(*a, **k)
            if not done:
                done = True
                ready()
            return result

        return first_then_plain

    def _step_post(self, optimizer, args: tuple, kwargs: dict) -> None:
        self.in_step = False
        self._listener._on_step_end()

    # ------------------------------------------------------------------ for integrations
    def forward_begin(self) -> None:
        """Feed ``forward_begin`` (a trainer whose step calls a submodule the hooks miss)."""
        if not self.closed and self.active:
            self._guard(self._listener._on_forward_begin)()

    def forward_end(self) -> None:
        """Feed ``forward_end``: the next backward pass is this model's."""
        if not self.closed and self.active:
            self._guard(self._listener._on_forward_end)()

    def step_begin(self) -> None:
        """Feed ``step_begin`` and ``grads_ready`` (for a trainer that drives the optimizer
        itself and calls this instead of relying on the optimizer's hooks)."""
        self.in_step = True
        self._guard(self._listener._on_step_begin)()
        self._guard(self._listener._on_grads_ready)()

    def step_end(self) -> None:
        """Feed ``step_end``."""
        self.in_step = False
        self._guard(self._listener._on_step_end)()


def _closure_of(args: tuple, kwargs: dict) -> tuple[Callable | None, str]:
    """The closure passed to ``optimizer.step`` (``args`` starts with the optimizer)."""
    if len(args) > 1 and callable(args[1]):
        return args[1], "args"
    closure = kwargs.get("closure")
    if callable(closure):
        return closure, "kwargs"
    return None, ""


def _register(module: nn.Module, pre: bool, hook: Callable) -> Any:
    if pre:
        return module.register_forward_pre_hook(hook)
    return module.register_forward_hook(hook)


def _discover_hook(discover: Callable[[str], None], name: str, module: nn.Module, args) -> None:
    discover(name)


# ---------------------------------------------------------------------- backward end
_lock = threading.Lock()
_listeners: weakref.WeakSet[Events] = weakref.WeakSet()
_original: Any = None
_installed = False


def _roots(args: tuple, kwargs: dict) -> tuple[Tensor, ...]:
    tensors = args[0] if args else kwargs.get("tensors")
    if isinstance(tensors, Tensor):
        return (tensors,)
    try:
        return tuple(t for t in tensors if isinstance(t, Tensor))
    except TypeError:
        return ()


def _backward(*args: Any, **kwargs: Any) -> Any:
    listeners = [e for e in list(_listeners) if e._backward_wanted()]
    for e in listeners:
        e._backward_begin()
    result = _original(*args, **kwargs)
    if listeners:
        roots = _roots(args, kwargs)
        for e in listeners:
            e._backward_end(roots)
    return result


def _add_listener(events: Events) -> None:
    global _original, _installed
    with _lock:
        if not _installed:
            _original = torch.autograd.backward
            torch.autograd.backward = _backward
            _installed = True
        _listeners.add(events)


def _remove_listener(events: Events) -> None:
    global _installed
    with _lock:
        _listeners.discard(events)
        # Restore only if nobody wrapped it after us; otherwise stay in the chain as a no-op.
        if not _listeners and _installed and torch.autograd.backward is _backward:
            torch.autograd.backward = _original
            _installed = False
