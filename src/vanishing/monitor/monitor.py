"""``vanishing.watch``: record how the gradient flows through a model while it trains.

The monitor composes four pieces (docs/architecture.md):

* :class:`~vanishing.monitor.events.Events` registers every torch hook and tells the monitor
  the moments of a step (forward, backward end, optimizer step begin, gradients final, step end);
* probes (:mod:`vanishing.probes`), one per signal, measure at those moments and write their
  declared columns into the step's row;
* the :class:`~vanishing.monitor.buffer.Buffer` holds ``flush_every`` rows on the model's device;
* sinks (:mod:`vanishing.sinks`) receive each flushed block: the run directory always, others
  on request.

This module holds only the step lifecycle: which step is recorded, when a step ends or is
abandoned, and what a failure does (stop monitoring, never training).
"""

from __future__ import annotations

import atexit
import contextlib
import datetime as _dt
import os
import platform
import warnings
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from vanishing.modules import _unwrap as unwrap
from vanishing.modules import skip_connections
from vanishing.monitor.buffer import Buffer
from vanishing.monitor.events import Events
from vanishing.monitor.layout import Layout, entry_modules
from vanishing.probes.activations import ActivationProbe
from vanishing.probes.base import Probe, ProbeContext
from vanishing.probes.clipping import ScalerProbe
from vanishing.probes.errors import ErrorSignalProbe
from vanishing.probes.loss import LossProbe
from vanishing.probes.params import ParamProbe
from vanishing.probes.temporal import TemporalProbe
from vanishing.recorder.block import Block
from vanishing.recorder.columns import by_level
from vanishing.recorder.schema import PARAM_STATS, SCHEMA_VERSION
from vanishing.schedule import Schedule, resolve_schedule
from vanishing.sinks.parquet import ParquetSink

__all__ = ["Monitor", "watch", "WatchError"]

_STATS_LEVELS = ("all", "parameters")
_MAX_BUFFER_BYTES = 2**30  # the device buffer between flushes
_WATCHED_ATTR = "_vanishing_monitor"


class WatchError(ValueError):
    """Bad arguments to :func:`vanishing.watch` (one line, saying what to do instead)."""


def builtin_probes(stats: str, scaler: Any = None) -> list[Probe]:
    """The probes of a stats level: ``"parameters"`` is loss and per-parameter statistics;
    ``"all"`` adds the error signal, the activations and the recurrent time profile. With a
    GradScaler, its scale is recorded too."""
    probes: list[Probe] = [LossProbe(), ParamProbe()]
    if stats == "all":
        probes += [ErrorSignalProbe(), ActivationProbe(), TemporalProbe()]
    if scaler is not None:
        probes.append(ScalerProbe(scaler))
    return probes


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
        sinks: Sequence[Any] = (),
        probes: Sequence[Probe] = (),
        overwrite: bool = False,
        resume: bool = False,
        start_step: int | None = None,
        low_memory: bool | None = None,
    ) -> None:
        _validate(model, optimizer, stats, flush_every, scaler, sinks, probes)
        if low_memory is not None and not isinstance(low_memory, bool):
            raise WatchError(f"low_memory must be True, False or None, got {low_memory!r}")
        if overwrite and resume:
            raise WatchError("overwrite=True and resume=True contradict each other; pick one")
        if start_step is not None and (
            not isinstance(start_step, int) or isinstance(start_step, bool) or start_step < 0
        ):
            raise WatchError(f"start_step must be a non-negative integer, got {start_step!r}")
        self._schedule = resolve_schedule(every)
        self._root = unwrap(model)
        if getattr(self._root, _WATCHED_ATTR, None) is not None:
            raise WatchError(
                "this model is already watched by another monitor; close() that one first"
            )
        if _is_compiled(model):
            # Code torch.compile made before the monitor's hooks existed would skip them (no
            # activation or error-signal rows): drop it; the next call compiles again.
            import torch._dynamo

            torch._dynamo.reset()
        self._optimizer = optimizer
        self._scaler = scaler
        self._stats = stats
        self._flush_every = flush_every
        self._closed = False
        self._broken: str | None = None

        self.layout = Layout(self._root)
        if not self.layout.params:
            raise WatchError("the model has no parameters: there is no gradient to watch")
        if optimizer is not None:
            held = {id(p) for g in optimizer.param_groups for p in g["params"]}
            if not any(id(r.param) in held for r in self.layout.params):
                raise WatchError(
                    "the optimizer holds none of the model's parameters; pass the optimizer "
                    "that trains this model (e.g. torch.optim.SGD(model.parameters(), ...))"
                )
        self._device = self.layout.params[0].param.device
        # default: on a GPU, where the caching allocator makes freeing and taking again free
        self._low_memory = self._device.type != "cpu" if low_memory is None else low_memory
        self._probes = builtin_probes(stats, scaler) + list(probes)
        columns = [c for p in self._probes for c in p.columns]
        try:
            by_level(columns)
        except ValueError as e:
            raise WatchError(f"probes: {e}") from None
        self._buffer = Buffer(
            columns,
            n_params=len(self.layout.params),
            n_modules=len(self.layout.modules),
            n_recurrent=len(self.layout.recurrent),
            capacity=flush_every,
            device=self._device,
        )

        held = flush_every * self._buffer.width * 8
        if held > _MAX_BUFFER_BYTES:
            most = max(1, _MAX_BUFFER_BYTES // (self._buffer.width * 8))
            raise WatchError(
                f"flush_every={flush_every} would hold {held / 2**30:.1f} GiB of records on "
                f"{self._device} for this model ({self._buffer.width} values a step); "
                f"use at most {most} (the default is 50)"
            )
        if run_dir is not None and str(run_dir).strip() == "":
            raise WatchError(
                "run_dir is empty; pass a directory path (or None for runs/<date-time>)"
            )
        if resume and run_dir is None:
            raise WatchError("resume=True needs the run_dir of the run to continue")
        self.run_dir = Path(run_dir) if run_dir is not None else _default_run_dir()
        rank, world = _rank()
        if world > 1:  # each rank records its own shards and batches: one run per rank
            self.run_dir = self.run_dir / f"rank{rank}"
        mode = "resume" if resume else "overwrite" if overwrite else "new"
        self._run = ParquetSink(self.run_dir, mode)
        self._sinks: list[Any] = [self._run, *sinks]
        self._started = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        self._resumed: list[int] = []
        first_step = 0
        if resume:
            first_step = self._continue(start_step)
        elif start_step is not None:
            first_step = start_step

        # per-step state
        self.step = first_step
        self._recording = self._schedule(first_step)
        self._frozen = False  # the step's measured pass is over (a closure evaluated again)
        self._backwards = 0  # backward passes in this step
        self._forward_seen = False
        self._depth = 0  # entry modules entered and not yet left
        self._grads_before: list[tuple[int, int]] | None = None
        self._generation = 0  # forward passes so far
        self._skipped = 0
        self._sentinel: tuple[nn.Parameter, weakref.ref, int] | None = None

        self._status = "running"
        self._failed = False
        self._revisions: list[dict[str, Any]] = []  # layout changes during the run
        self._notes: dict[str, dict[str, Any]] = {}
        self._manifest_changed = False  # a note since the manifest was last written
        self._unwritten: list[Block] = []  # blocks the run directory refused, to retry
        self._write_failed = False
        self._flushing = False
        try:
            self._run.open(self._manifest())
        except FileExistsError as e:
            raise WatchError(str(e)) from None
        except OSError as e:  # read-only, not a directory, a name too long, /proc, ...
            raise WatchError(
                f"run_dir {str(self.run_dir)!r} cannot be written ({e.strerror or e}); "
                "pass a directory you can create files in"
            ) from None
        for sink in sinks:
            self._call_sink(sink, "open", self._manifest())
        self.events = Events(
            self,
            entry_modules(self._root),
            optimizer,
            discover=self.layout.module_started,
            root=self._root,
        )
        # Compiled code guards on the hooks: switching them per step would recompile it.
        self._switch_hooks = not _is_compiled(model)
        self._set_recording(self._recording)
        ctx = ProbeContext(
            layout=self.layout,
            events=self.events,
            optimizer=optimizer,
            device=self._device,
            stats=stats,
            capturing=self._capturing,
            unscale=self._unscale,
            n_backward=lambda: self._backwards,
            note=self._note,
            keep_for_next=self._keep_for_next,
            step=lambda: self.step,
        )
        self._ctx = ctx
        for probe in self._probes:
            probe.attach(ctx)
        self._held_params = self._optimizer_size()
        setattr(self._root, _WATCHED_ATTR, weakref.ref(self))
        _open_monitors.add(self)
        _install_sigterm()

    def _note(self, text: str) -> None:
        """Keep a one-line note for the manifest (what could not be measured, and when)."""
        seen = self._notes.get(text)
        if seen is None:
            self._notes[text] = {
                "text": text,
                "first_step": self.step,
                "steps": 1,
                "last": self.step,
            }
            self._manifest_changed = True
        elif seen["last"] != self.step:
            seen["steps"] += 1
            seen["last"] = self.step

    def _continue(self, start_step: int | None) -> int:
        """Take over the run in ``run_dir`` (resume=True): check that it is of this model and
        return the step to continue from."""
        import json

        from vanishing.recorder.reader import RunError, load_run

        if not (self.run_dir / "manifest.json").is_file():
            raise WatchError(f"resume=True: {self.run_dir}: no run to resume (no manifest.json)")
        try:
            run = load_run(self.run_dir)
            old = run.manifest
            recorded = run.steps["step"]
        except (RunError, OSError, json.JSONDecodeError, KeyError) as e:
            raise WatchError(f"resume=True: {e}") from None
        theirs = {layer.get("name") for layer in old.get("layers", [])}
        ours = {r.name for r in self.layout.modules}
        if theirs != ours:
            differ = sorted(theirs ^ ours)[:4]
            raise WatchError(
                f"resume=True: {self.run_dir} holds a run of another model (layers differ: "
                f"{', '.join(map(repr, differ))}); pass a new run_dir"
            )
        self._started = old.get("created", self._started)
        done = int(recorded.max()) + 1 if len(recorded) else 0
        start = start_step if start_step is not None else max(done, old.get("steps_completed", 0))
        if start < done:
            raise WatchError(
                f"resume=True: start_step={start} is before the run's last recorded step "
                f"({done - 1}); steps would be recorded twice"
            )
        self._resumed = [*old.get("resumed_at", []), start]
        return start

    # ------------------------------------------------------------------ events
    def _set_recording(self, recording: bool) -> None:
        """Whether this step is recorded; the probes' module hooks are attached only then."""
        self._recording = recording
        if self._switch_hooks:
            self.events.probe_hooks(recording)

    def _keep_for_next(self) -> bool:
        """Whether memory kept for reuse at the next recorded step stays allocated after this
        one: unless ``low_memory`` and the next step is not recorded."""
        return not self._low_memory or self._schedule(self.step + 1)

    def _capturing(self) -> bool:
        return self._recording and not self._frozen

    def _on_fail(self, e: BaseException) -> None:
        """An internal error: stop monitoring (hooks become no-ops), keep what was recorded."""
        if self._broken is not None:
            return
        self._broken = f"{type(e).__name__}: {e}"
        self.events.active = False
        warnings.warn(
            f"vanishing: monitoring stopped after an internal error ({self._broken}); "
            "training continues unaffected, records up to now are kept",
            RuntimeWarning,
            stacklevel=3,
        )

    def _on_forward_begin(self) -> None:
        if self._backwards and not self.events.in_step and self._grads_were_reset():
            # The last backward's step never happened (e.g. GradScaler skipped it on inf/NaN):
            # its numbers belong to no optimizer step.
            self._skipped += 1
            self._reset()
            self._set_recording(self._schedule(self.step))
        if self._depth == 0 and self.events.structure_changed and not self._forward_seen:
            self._check_layout(whole_step=True)  # before this step's first forward: all of it
        if self._depth == 0:  # the outermost entry: a new forward pass (not a nested call)
            self._generation += 1
            if self._capturing():
                for probe in self._probes:
                    probe.forward_begin(self._generation)
        self._depth += 1

    def _on_forward_end(self) -> None:
        self._depth = max(0, self._depth - 1)
        self._forward_seen = True

    def _on_backward_wanted(self) -> bool:
        return not self._closed and self._broken is None and self._forward_seen

    def _grad_state(self) -> list[tuple[int, int]]:
        return [
            (id(g), g._version) if (g := r.param.grad) is not None else (0, 0)
            for r in self.layout.params
        ]

    def _on_backward_begin(self) -> None:
        self._grads_before = self._grad_state()

    def _on_backward_end(self, roots: tuple[Tensor, ...]) -> None:
        if not self.layout.order_final:
            self._finish_discovery()  # every forward of the first step has run by now
        if self._grads_before is not None and self._grad_state() == self._grads_before:
            # This backward reached none of the watched parameters (a GAN's discriminator step
            # on G(z).detach() while G is watched): it is not this model's, its loss not ours.
            return
        self._forward_seen = False
        self._depth = 0  # a forward that raised never ended
        self._backwards += 1
        if self._capturing():
            for probe in self._probes:
                probe.backward_end(roots)
        self._remember_grads()
        if self._optimizer is None:
            if self._recording:
                self._on_grads_ready()
                self._finish_step()
            else:
                self._advance()

    def _optimizer_size(self) -> int:
        opt = self._optimizer
        return 0 if opt is None else sum(len(g["params"]) for g in opt.param_groups)

    def _check_layout(self, whole_step: bool = False) -> None:
        """A module replaced or added since the layout was made (``model[2] = nn.Linear(...)``,
        seen by torch's registration hooks or by parameters given to the optimizer) starts a
        new layout revision: the steps so far are flushed under the old layout, the new one is
        watched from this step on, and the manifest says what changed (``revisions``, and a
        note). ``whole_step``: found before the step's first forward, so nothing of it is
        missed."""
        self.events.watch_structure(self._root)
        new = Layout(self._root)
        before = {r.name: r.module for r in self.layout.modules}
        after = {r.name: r.module for r in new.modules}
        params_before = [id(r.param) for r in self.layout.params]
        if (
            [id(r.param) for r in new.params] == params_before
            and all(before.get(n) is m for n, m in after.items())
            and before.keys() == after.keys()
        ):
            return
        added = [n for n in after if n not in before]
        removed = [n for n in before if n not in after]
        replaced = [n for n in after if n in before and before[n] is not after[n]]
        self.flush()  # the old layout's steps, under the old layout
        self.events.remove_probe_hooks()
        known = set(after)
        new.order = [n for n in self.layout.order if n in known]  # the new ones are found next
        self.layout = new
        self.events.start_discovery(self._root, new.module_started)
        self._buffer = Buffer(
            self._buffer.columns,
            n_params=len(new.params),
            n_modules=len(new.modules),
            n_recurrent=len(new.recurrent),
            capacity=self._flush_every,
            device=self._device,
        )
        self._ctx.layout = new
        for probe in self._probes:
            probe.attach(self._ctx)
        self._revisions.append(
            {"step": self.step, "added": added, "removed": removed, "replaced": replaced}
        )
        changed = ", ".join(
            f"{k} {v}"
            for k, v in (("added", added), ("removed", removed), ("replaced", replaced))
            if v
        )
        untrained = []
        if self._optimizer is not None:
            held = {id(p) for g in self._optimizer.param_groups for p in g["params"]}
            untrained = sorted(
                {r.owners[0][0] for r in new.params if r.owners and id(r.param) not in held}
            )
        self._note(
            f"layout changed at step {self.step} ({changed})"
            + ("" if whole_step else "; that step's activations and error signals are not recorded")
            + (
                f"; the optimizer does not hold the parameters of {', '.join(map(repr, untrained))}"
                ": they will not train unless they are added to it"
                if untrained
                else ""
            )
        )
        self._manifest_changed = True

    def _on_step_begin(self) -> None:
        size = self._optimizer_size()
        if size != self._held_params:  # parameters given to (or taken from) the optimizer
            self._held_params = size
            self._check_layout()
        if self._recording:
            for probe in self._probes:
                probe.step_begin()

    def _on_grads_ready(self) -> None:
        if self._capturing():
            for probe in self._probes:
                probe.grads_ready()
            self._frozen = self._optimizer is not None

    def _on_step_end(self) -> None:
        if not self._recording:
            self._advance()
            return
        for probe in self._probes:
            probe.step_end()
        self._finish_step()

    # ------------------------------------------------------------------ step lifecycle
    def _finish_discovery(self) -> None:
        self.layout.finish_discovery()
        self.events.stop_discovery()
        self._emit(self._buffer.empty(manifest=self._manifest()))

    def _remember_grads(self) -> None:
        for r in self.layout.params:
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

    def _unscale(self, value: Tensor) -> Tensor:
        scaler = self._scaler
        if (
            scaler is not None
            and scaler.is_enabled()
            and getattr(scaler, "_scale", None) is not None
        ):
            return value / scaler._scale.to(torch.float64)
        return value

    def _reset(self) -> None:
        self._backwards = 0
        self._forward_seen = False
        self._frozen = False
        for probe in self._probes:
            probe.reset()

    def _advance(self) -> None:
        self.step += 1
        self._set_recording(self._schedule(self.step))
        self._reset()

    def _finish_step(self) -> None:
        row = self._buffer.row()
        for probe in self._probes:
            probe.measure(row)
        full = self._buffer.commit(self.step, self._skipped)
        self._skipped = 0
        self._advance()
        if full:
            self.flush()

    # ------------------------------------------------------------------ output
    def _emit(self, block: Block) -> None:
        """Write a block to the run directory, then to the other sinks. A block the run
        directory refuses (disk full, read-only) is kept in memory and written, with those
        after it, at the next flush: one warning, and recording goes on."""
        pending, self._unwritten = [*self._unwritten, block], []
        for i, b in enumerate(pending):
            try:
                self._run.write(b)
            except Exception as e:  # noqa: BLE001 - kept, retried, never raised into training
                self._unwritten = pending[i:]
                if not self._write_failed:
                    self._write_failed = True
                    warnings.warn(
                        f"vanishing: could not write {self.run_dir} ({type(e).__name__}: {e}); "
                        "the steps are kept in memory and written at the next flush",
                        RuntimeWarning,
                        stacklevel=3,
                    )
                break
        else:
            if self._write_failed:
                self._write_failed = False
                warnings.warn(
                    f"vanishing: {self.run_dir} is writable again; the kept steps are written",
                    RuntimeWarning,
                    stacklevel=3,
                )
        for sink in self._sinks[1:]:
            self._call_sink(sink, "write", block)

    def _call_sink(self, sink: Any, method: str, *args: Any) -> None:
        try:
            getattr(sink, method)(*args)
        except Exception as e:  # noqa: BLE001 - one sink's failure never stops the others
            warnings.warn(
                f"vanishing: sink {type(sink).__name__}.{method} failed: {type(e).__name__}: {e}",
                RuntimeWarning,
                stacklevel=3,
            )

    def _manifest(self) -> dict[str, Any]:
        opt = self._optimizer
        trainable = None
        if opt is not None:
            trainable = {id(p) for g in opt.param_groups for p in g["params"]}
        return {
            "schema_version": SCHEMA_VERSION,
            "created": self._started,
            "status": self._status,
            "forward_order_known": self.layout.order_final,
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
            "low_memory": self._low_memory,
            "memory": getattr(self, "_memory_at_close", None) or self.memory(),
            "layers": self.layout.manifest_layers(trainable),
            # known at close (null before, and for a forward torch.fx cannot trace)
            "skip_connections": getattr(self, "_skip_connections", None),
            **{
                k: v
                for p in self._probes
                for k, v in getattr(p, "manifest_entries", dict)().items()
            },
            **(
                {"unmeasured_activations": self.layout.unmeasured} if self.layout.unmeasured else {}
            ),
            **({"resumed_at": self._resumed} if self._resumed else {}),
            **({"revisions": self._revisions} if self._revisions else {}),
            **(
                {
                    "notes": [
                        {k: v for k, v in n.items() if k != "last"} for n in self._notes.values()
                    ]
                }
                if self._notes
                else {}
            ),
            "versions": {
                "vanishing": _version(),
                "torch": torch.__version__,
                "python": platform.python_version(),
            },
        }

    def memory(self) -> dict[str, int]:
        """Bytes the monitor holds besides the model and its training, now.

        ``snapshot``: the copy of the optimizer's parameters that a recorded step's update is
        measured against (0 before the first step); ``snapshot_held``: how much of it is
        allocated now: all of it, refilled at each step, unless ``watch(low_memory=True)``
        (the default on a GPU) and the next step is not recorded: then it is freed after the
        recorded step and taken again at the next one (with ``every=k > 1``: no resident
        copy). ``activation_buffers``: on the CPU, the stacking buffers of the activation
        statistics, kept likewise. ``records``: the rows not yet flushed (``flush_every``
        rows). ``held``: what is allocated now, in all.

        Example:
            >>> import tempfile, torch, vanishing
            >>> model = torch.nn.Sequential(torch.nn.Linear(100, 100), torch.nn.Tanh())
            >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
            >>> with vanishing.watch(model, opt, run_dir=tempfile.mkdtemp() + "/r") as mon:
            ...     opt.zero_grad(); model(torch.randn(8, 100)).sum().backward(); opt.step()
            ...     m = mon.memory()
            >>> m["snapshot"] == m["snapshot_held"] == 4 * (100 * 100 + 100)
            True
        """
        out = {"snapshot": 0, "snapshot_held": 0, "activation_buffers": 0}
        for probe in self._probes:
            for k, v in getattr(probe, "held_bytes", dict)().items():
                out[k] = out.get(k, 0) + v
        out["records"] = self._buffer.nbytes
        out["held"] = out["snapshot_held"] + out["activation_buffers"] + out["records"]
        return out

    def discard_backward(self) -> None:
        """Forget what the backward passes since the last step measured: they were for
        another optimizer's step (a trainer with several optimizers calls this before one
        that is not watched steps), so they belong to no record of this one.

        Example:
            >>> mon.discard_backward()   # doctest: +SKIP
        """
        if not self.events.in_step:
            self._reset()

    @property
    def directory(self) -> ParquetSink:
        """The run directory's sink: ``write_json(name, obj)`` and ``write_bytes(name, data)``
        add files beside the records, atomically (experiments write ``config.json``,
        ``eval.parquet`` and ``summary.json`` this way).

        Example:
            >>> mon.directory.write_json("notes.json", {"lr": 0.1})   # doctest: +SKIP
        """
        return self._run

    def flush(self) -> None:
        """Write the buffered steps to the run directory now (one device-to-host transfer)."""
        if self._flushing:  # a signal arrived during a flush: that flush finishes the job
            return
        self._flushing = True
        try:
            params, modules, recurrent = self.layout.table_keys()
            manifest = self._manifest() if self._manifest_changed else {}
            self._manifest_changed = False
            block = self._buffer.take(
                self.layout.sharded,
                params=params,
                modules=modules,
                recurrent=recurrent,
                manifest=manifest,
            )
            if block is not None:
                self._emit(block)
            elif self._unwritten:
                self._emit(self._buffer.empty())
        finally:
            self._flushing = False
        _signal_after_flush()

    def close(self) -> None:
        """Flush what is buffered and remove every hook. Idempotent."""
        if self._closed:
            return
        try:
            self.events.close()
            if not self.layout.order_final:
                self.layout.finish_discovery()
            if getattr(self._root, _WATCHED_ATTR, None) is not None:
                delattr(self._root, _WATCHED_ATTR)
            _open_monitors.discard(self)
            self._memory_at_close = self.memory()  # what training held, for the manifest
            for probe in self._probes:
                getattr(probe, "close", lambda: None)()
        finally:
            self._closed = True
        self._flush_quietly()
        # Traced once training is over (the hooks removed), so the trace cannot touch a step;
        # it lets a diagnosis without the model (`vanishing diagnose RUN`) know the model's
        # skip connections, as one with the model measures them.
        try:
            self._skip_connections = skip_connections(self._root)
        except Exception:  # noqa: BLE001 - unknown, as for an untraceable forward
            self._skip_connections = None
        # the word a config run's summary uses too; "failed" when the `with` block raised
        self._status = "failed" if self._failed else "completed"
        try:
            self._emit(self._buffer.empty(manifest=self._manifest()))
        except Exception as e:  # noqa: BLE001
            warnings.warn(
                f"vanishing: could not write {self.run_dir}: {e}", RuntimeWarning, stacklevel=2
            )
        if self._unwritten:
            lost = sum(b.n for b in self._unwritten)
            warnings.warn(
                f"vanishing: {lost} recorded step(s) could not be written to {self.run_dir} "
                "before close(); they are lost",
                RuntimeWarning,
                stacklevel=2,
            )
        for sink in self._sinks[1:]:
            self._call_sink(sink, "close")

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
        if stat not in PARAM_STATS[:3]:
            raise ValueError(f"unknown stat {stat!r}; expected one of {', '.join(PARAM_STATS[:3])}")
        column = self._buffer.last_param(stat)
        if column is None:
            return {}
        values = column.tolist()  # host sync: on demand, for live displays
        modules, labels, _ = self.layout.names()
        by_layer = {
            labels[p.index][0]: v
            for p, v in zip(self.layout.params, values)
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

    def report(self, path: str | os.PathLike | None = None) -> Path:
        """Write the HTML report of everything recorded so far (flushes first); returns its path.

        ``path`` defaults to ``<run_dir>/report.html``. Works during training and after
        :meth:`close`.

        Example:
            >>> with vanishing.watch(model, optimizer=opt) as mon:   # doctest: +SKIP
            ...     train(model)
            >>> mon.report()                                        # doctest: +SKIP
            PosixPath('runs/2026-12-01-120000/report.html')
            >>> mon.report("deep.html")                             # doctest: +SKIP
            PosixPath('deep.html')
        """
        self.flush()
        import importlib

        # the report reads runs; this module does not depend on it: found at call time
        write_report = importlib.import_module("vanishing.report.html").write_report

        return write_report(self.run_dir, path)

    def __enter__(self) -> Monitor:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        # KeyboardInterrupt is a user's stop, not a failure of the training
        self._failed = exc_type is not None and not issubclass(exc_type, KeyboardInterrupt)
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<vanishing.Monitor {state} step={self.step} run_dir={str(self.run_dir)!r}>"


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
    """``runs/<date-time>``, made here, exclusively: two monitors started in the same second
    get two directories (the second one ``-1``), never one."""
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    base = Path("runs") / stamp
    base.parent.mkdir(parents=True, exist_ok=True)
    i = 0
    while True:
        path = base if i == 0 else Path(f"{base}-{i}")
        try:
            path.mkdir()
            return path
        except FileExistsError:
            i += 1


def _is_compiled(model: nn.Module) -> bool:
    """Whether ``model`` is (or wraps) a ``torch.compile`` module."""
    seen = set()
    while isinstance(model, nn.Module) and id(model) not in seen:
        seen.add(id(model))
        if isinstance(getattr(model, "_orig_mod", None), nn.Module):
            return True
        model = getattr(model, "module", None)
    return False


def _rank() -> tuple[int, int]:
    """(rank, world size) of this process under torch.distributed, (0, 1) otherwise."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _validate(model, optimizer, stats, flush_every, scaler, sinks, probes) -> None:
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
    for sink in sinks:
        if not all(callable(getattr(sink, m, None)) for m in ("open", "write", "close")):
            raise WatchError(
                f"sinks: {type(sink).__name__} is not a sink (needs open(manifest), "
                "write(block) and close(); see vanishing.sinks)"
            )
    for probe in probes:
        if not callable(getattr(probe, "measure", None)) or not hasattr(probe, "columns"):
            raise WatchError(
                f"probes: {type(probe).__name__} is not a probe (needs columns and "
                "measure(row); subclass vanishing.probes.Probe)"
            )


_open_monitors: weakref.WeakSet[Monitor] = weakref.WeakSet()


@contextlib.contextmanager
def suspended(model: nn.Module):
    """While inside, the monitor watching ``model`` (if any) hears nothing and the model may be
    watched by another, short-lived one (``vanishing.inspect`` of a model being trained).

    Example:
        >>> with suspended(model):   # doctest: +SKIP
        ...     diag = vanishing.inspect(model, x, y, loss_fn)
    """
    root = unwrap(model)
    ref = getattr(root, _WATCHED_ATTR, None)
    mon = ref() if ref is not None else None
    if mon is None or mon._closed:
        yield
        return
    active = mon.events.active
    mon.events.active = False
    delattr(root, _WATCHED_ATTR)
    try:
        yield
    finally:
        setattr(root, _WATCHED_ATTR, ref)
        mon.events.active = active


@atexit.register
def _flush_open_monitors() -> None:
    # A script that forgot close() still keeps what it recorded.
    for mon in list(_open_monitors):
        mon._flush_quietly()


# SIGTERM (what schedulers send before preemption) would end the process without atexit:
# flush every open monitor first, then do what the handler installed before ours does.
_previous_sigterm: Any = None
_sigterm_installed = False
_deferred_signal: int | None = None


def _install_sigterm() -> None:
    global _previous_sigterm, _sigterm_installed
    import signal
    import threading

    if _sigterm_installed or threading.current_thread() is not threading.main_thread():
        return
    try:
        _previous_sigterm = signal.signal(signal.SIGTERM, _on_sigterm)
    except (ValueError, OSError):  # not allowed here (an embedded interpreter): atexit only
        return
    _sigterm_installed = True


def _on_sigterm(signum: int, frame: Any) -> None:
    global _deferred_signal
    monitors = list(_open_monitors)
    if any(mon._flushing for mon in monitors):
        _deferred_signal = signum  # a flush is under way: it re-delivers the signal when done
        return
    for mon in monitors:
        mon._flush_quietly()
    _chain(signum, frame)


def _signal_after_flush() -> None:
    global _deferred_signal
    if _deferred_signal is not None:
        signum, _deferred_signal = _deferred_signal, None
        _on_sigterm(signum, None)


def _chain(signum: int, frame: Any) -> None:
    import signal

    previous = _previous_sigterm
    if callable(previous):
        previous(signum, frame)
    elif previous == signal.SIG_IGN:
        return
    else:  # the default action: terminate, as if we had never been here
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)


def watch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    run_dir: str | os.PathLike | None = None,
    stats: str = "all",
    every: int | str | Schedule = 1,
    flush_every: int = 50,
    scaler: Any = None,
    sinks: Sequence[Any] = (),
    probes: Sequence[Probe] = (),
    overwrite: bool = False,
    resume: bool = False,
    start_step: int | None = None,
    low_memory: bool | None = None,
) -> Monitor:
    """Watch a model train: per layer and per step, how the gradient flows.

    Attach before the loop; nothing else in the loop changes. Records go to ``run_dir``
    (default ``runs/<date-time>``), readable with :func:`vanishing.load_run`.

    Args:
        model: any ``nn.Module`` (a ``DistributedDataParallel`` or ``torch.compile`` wrapper is
            looked through, so layer names are the inner model's; given a compiled model,
            ``watch`` resets torch.compile's caches, since code compiled before the monitor's
            hooks existed would skip them: the next call compiles again). Under FSDP2
            (``fully_shard``), watch after sharding: each rank measures its shards and the flush
            combines them into whole-parameter norms (a collective, so every rank must run the
            same steps); activation statistics are each rank's own batch, as under DDP. With
            more than one process, each rank records into ``run_dir/rank<k>`` (pass the same
            ``run_dir`` on every rank).
        optimizer: the optimizer that trains it. With it, a step is one ``optimizer.step()``
            (gradient accumulation gives one record per step) and the actual update each step
            makes is measured. ``optimizer.step(closure)`` works too (Lightning, LBFGS): the
            gradients, loss and activations recorded are those of the closure's first
            evaluation, at the step's starting weights. Without an optimizer, a step is one
            backward pass and there are no update statistics.
        run_dir: the run directory to create. One that already holds a run is refused, unless
            ``overwrite=True`` (that run is removed first) or ``resume=True`` (that run is
            continued, e.g. after restarting from a checkpoint: the model must have the same
            layers; new steps are appended, numbered from ``start_step``, by default the step
            after the last one recorded).
        stats: ``"all"`` (default): gradient, weight and update statistics, plus the error
            signal at each layer's output, activation statistics and the temporal profile of
            recurrent layers. ``"parameters"``: only the per-parameter gradient, weight and update
            statistics, the loss and non-finite counts (the cheapest).
        every: which steps to record: ``1`` (every step, default), an int ``k`` (every k-th),
            ``"log"`` (every step up to 100, then ~100 a decade), or a ``step -> bool`` callable.
        flush_every: recorded steps held on the device between writes.
        scaler: the ``torch.amp.GradScaler`` when training with AMP, so that recorded values
            are unscaled and steps the scaler skips are not recorded.
        sinks: more destinations for each flushed block (:mod:`vanishing.sinks`); the run
            directory is always written.
        probes: statistics of your own (:class:`vanishing.probes.Probe`), recorded beside the
            built-in ones as extra columns of the run's tables.
        low_memory: with ``every`` > 1, hold no copy of the parameters between recorded
            steps: the copy a recorded step's update is measured against (and, on the CPU,
            the activation statistics' buffers) is freed after the step and taken again at
            the next recorded one. Default (None): on a GPU, where the caching allocator makes
            that free; not on the CPU, where each new allocation costs page faults (a few %
            with ``every=10``). :meth:`Monitor.memory` says what is held.

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
        sinks=sinks,
        probes=probes,
        overwrite=overwrite,
        resume=resume,
        start_step=start_step,
        low_memory=low_memory,
    )
