"""Lightning integration: ``lightning.Trainer(callbacks=[VanishingCallback()])``.

The callback attaches :func:`vanishing.watch` to the LightningModule and the trainer's
optimizer when training starts, sends a few summary scalars per step to the trainer's loggers,
and at the end of fit closes the monitor, prints the diagnosis and keeps it as
``callback.diagnosis``. The records are a normal run directory (``callback.run_dir``), readable
with :func:`vanishing.load_run`. See ``docs/lightning.md``.

Example:
    >>> import tempfile, torch, lightning as L
    >>> from vanishing.integrations.lightning import VanishingCallback
    >>> class Net(L.LightningModule):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Sigmoid(), torch.nn.Linear(8, 1))
    ...     def training_step(self, batch, batch_idx):
    ...         x, y = batch
    ...         return torch.nn.functional.mse_loss(self.net(x), y)
    ...     def configure_optimizers(self):
    ...         return torch.optim.SGD(self.parameters(), lr=0.1)
    >>> data = torch.utils.data.TensorDataset(torch.randn(64, 4), torch.randn(64, 1))
    >>> cb = VanishingCallback(verbose=False)
    >>> trainer = L.Trainer(max_steps=5, accelerator="cpu", logger=False, enable_checkpointing=False,
    ...                     enable_progress_bar=False, enable_model_summary=False,
    ...                     default_root_dir=tempfile.mkdtemp(), callbacks=[cb])
    >>> trainer.fit(Net(), torch.utils.data.DataLoader(data, batch_size=8))
    >>> import vanishing
    >>> vanishing.load_run(cb.run_dir).steps["step"].tolist()
    [0, 1, 2, 3, 4]
    >>> cb.diagnosis is not None
    True
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

try:
    from lightning.pytorch.callbacks import Callback
    from lightning.pytorch.utilities import rank_zero_only
except ImportError as e:  # the extra is not installed: say which one
    from vanishing.sinks import MissingExtraError

    raise MissingExtraError("vanishing.integrations.lightning", "lightning", "lightning") from e

__all__ = ["VanishingCallback"]

_DEFAULT_NAME = "vanishing"


class _LoggerSink:
    """Forwards a bounded set of scalars per step (:class:`ScalarSelector`) to Lightning loggers.

    Logs the first recorded step at or after each multiple of ``every_n`` steps; the values of
    one flush arrive together, so loggers see them up to ``flush_every`` steps late (with the
    right step numbers).
    """

    def __init__(self, loggers: Sequence[Any], every_n: int) -> None:
        from vanishing.sinks.scalars import ScalarSelector

        self.loggers = list(loggers)
        self.every_n = max(1, int(every_n))
        self.selector = ScalarSelector(max_layers=3, prefix="vanishing")
        self._next = 0

    def open(self, manifest: dict) -> None:
        self.selector.observe_manifest(manifest)

    def write(self, block: Any) -> None:
        for step, scalars in self.selector.scalars(block):
            if step < self._next or not scalars:
                continue
            self._next = (step // self.every_n + 1) * self.every_n
            self.log(scalars, step)

    def log(self, metrics: dict[str, float], step: int) -> None:
        for logger in self.loggers:
            logger.log_metrics(metrics, step)

    def close(self) -> None:
        pass


class VanishingCallback(Callback):
    """Records per-layer gradient statistics of a Lightning fit (``vanishing.watch`` inside).

    Args:
        run_dir: the run directory. Default: ``<trainer.log_dir>/vanishing`` (the logger's
            version directory; ``default_root_dir`` without a logger), or ``vanishing-1``,
            ``vanishing-2``, ... beside it when that already holds a run. An explicit
            ``run_dir`` that already holds a run is refused (as by ``watch``), unless the fit
            resumes from a checkpoint of that run. With ``trainer.world_size > 1`` each rank
            records into ``<run_dir>/rank<k>``.
        stats, every, flush_every: as for :func:`vanishing.watch`.
        sinks: more destinations for the flushed blocks (:mod:`vanishing.sinks`).
        log_every_n_steps: how often summary scalars go to ``trainer.loggers`` (default: the
            trainer's ``log_every_n_steps``); ``0`` sends none.
        probes: statistics of your own (:class:`vanishing.probes.Probe`).
        verbose: print the diagnosis at the end of fit (rank zero only).

    After fit: ``run_dir`` (where the records are), ``diagnosis`` (a
    :class:`vanishing.Diagnosis`, or ``None`` when nothing was recorded), ``monitor`` (the
    closed :class:`vanishing.Monitor`).

    Behaviour: a step is one step of ``trainer.optimizers[0]`` (with several optimizers the
    others' steps are not records of their own, see ``docs/lightning.md``); under gradient
    accumulation one record per optimizer step. With ``gradient_clip_val`` set, a
    :class:`~vanishing.probes.ClippingProbe` records the total norm before and after clipping;
    with a GradScaler (``precision="16-mixed"``) values are unscaled and skipped steps counted.
    Errors inside the monitor stop monitoring with a warning, never training.
    """

    def __init__(
        self,
        run_dir: str | os.PathLike | None = None,
        stats: str = "all",
        every: Any = 1,
        sinks: Sequence[Any] = (),
        flush_every: int = 50,
        log_every_n_steps: int | None = None,
        *,
        probes: Sequence[Any] = (),
        verbose: bool = True,
    ) -> None:
        self._explicit_dir = Path(run_dir) if run_dir is not None else None
        self.stats = stats
        self.every = every
        self.sinks = tuple(sinks)
        self.flush_every = flush_every
        self.log_every_n_steps = log_every_n_steps
        self.probes = tuple(probes)
        self.verbose = verbose
        self.run_dir: Path | None = self._explicit_dir
        self.diagnosis = None
        self.monitor = None
        self._base_dir: Path | None = None  # run_dir before the per-rank suffix
        self._restored: dict[str, Any] | None = None
        self._logger_sink: _LoggerSink | None = None
        self._optimizer = None
        self._finished = False

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        base = self._base_dir or self._explicit_dir
        state: dict[str, Any] = {"run_dir": None if base is None else str(base)}
        if self.monitor is not None:
            state["step"] = int(self.monitor.step)
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._restored = dict(state_dict)

    # ------------------------------------------------------------------ attach
    def on_train_start(self, trainer, pl_module) -> None:
        # on_train_start, not on_fit_start: only here is trainer.global_step restored on resume
        import vanishing
        from vanishing.probes import ClippingProbe

        self.diagnosis = None
        if not trainer.optimizers:
            warnings.warn(
                "vanishing: the trainer has no optimizer; nothing is recorded",
                RuntimeWarning,
                stacklevel=2,
            )
            return
        optimizer = trainer.optimizers[0]  # the torch optimizer (LightningOptimizer unwrapped)
        self._optimizer = optimizer
        self._finished = False
        if len(trainer.optimizers) > 1:
            _rank_zero_warn(
                f"vanishing: {len(trainer.optimizers)} optimizers; a record is one step of the "
                "first (trainer.optimizers[0]); see docs/lightning.md"
            )
        resume, start_step = False, None
        restored = self._restored or {}
        base = self._explicit_dir
        if base is None and restored.get("run_dir"):
            base = Path(restored["run_dir"])
        if base is None:
            base = self._default_dir(trainer)
        self._base_dir = base
        run_dir = base / f"rank{trainer.global_rank}" if trainer.world_size > 1 else base
        if self._restored is not None and (run_dir / "manifest.json").is_file():
            resume = True
            start_step = int(restored.get("step", trainer.global_step))
        probes = list(self.probes)
        if trainer.gradient_clip_val and not any(isinstance(p, ClippingProbe) for p in probes):
            probes.append(ClippingProbe())
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        sinks = list(self.sinks)
        every_n = (
            trainer.log_every_n_steps if self.log_every_n_steps is None else self.log_every_n_steps
        )
        self._logger_sink = None
        if trainer.loggers and every_n and trainer.is_global_zero:
            self._logger_sink = _LoggerSink(trainer.loggers, every_n)
            sinks.append(self._logger_sink)
        kwargs = dict(
            stats=self.stats,
            every=self.every,
            flush_every=self.flush_every,
            scaler=scaler,
            sinks=sinks,
            probes=probes,
        )
        try:
            self.monitor = vanishing.watch(
                pl_module,
                optimizer,
                run_dir=run_dir,
                resume=resume,
                start_step=start_step,
                **kwargs,
            )
        except vanishing.WatchError as e:
            if not resume:
                raise  # a bad argument: said before the first step, not during training
            # e.g. resuming from a checkpoint older than the run's last recorded step
            fresh = run_dir.with_name(f"{run_dir.name}-from-step{start_step}")
            _rank_zero_warn(f"vanishing: cannot continue {run_dir} ({e}); recording into {fresh}")
            self.monitor = vanishing.watch(
                pl_module, optimizer, run_dir=fresh, overwrite=True, start_step=start_step, **kwargs
            )
        self.run_dir = self.monitor.run_dir
        self._restored = None  # a later fit of this callback starts a new run

    def _default_dir(self, trainer) -> Path:
        root = Path(trainer.log_dir or trainer.default_root_dir)
        path, i = root / _DEFAULT_NAME, 1
        while (path / "manifest.json").exists() or (path / "rank0" / "manifest.json").exists():
            path = root / f"{_DEFAULT_NAME}-{i}"
            i += 1
        return Path(trainer.strategy.broadcast(str(path)))  # every rank in one directory

    # ------------------------------------------------------------------ during training
    def on_before_backward(self, trainer, pl_module, loss) -> None:
        # A LightningModule's training_step often calls a submodule (self.net(x)), not
        # self(x), so the monitor's hook on the module's forward may never fire; tell it a
        # forward ran before each backward (after Lightning's zero_grad, so that a step the
        # GradScaler skipped is recognised as skipped).
        mon = self.monitor
        if mon is None or mon.events.closed:
            return
        try:
            mon.events.forward_begin()
            mon.events.forward_end()
        except Exception as e:  # noqa: BLE001 - monitoring stops, training goes on
            self._stop(e)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        # Another optimizer than the watched one is about to step (manual optimization with
        # several optimizers): the backward passes since the watched step were for it, so they
        # belong to no record (else they would count as the next record's, or as a skipped step).
        mon = self.monitor
        if mon is None or mon.events.closed or optimizer is self._optimizer:
            return
        if getattr(optimizer, "optimizer", None) is self._optimizer:  # a LightningOptimizer
            return
        try:
            mon.discard_backward()
        except Exception as e:  # noqa: BLE001
            self._stop(e)

    # ------------------------------------------------------------------ end
    def on_train_end(self, trainer, pl_module) -> None:
        self._finish(trainer)  # before the strategy's teardown: the model is still in place

    def on_fit_end(self, trainer, pl_module) -> None:
        self._finish(trainer)

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        self._close()

    def _finish(self, trainer) -> None:
        mon = self.monitor
        if mon is None or self._finished:
            return
        self._finished = True
        try:
            self.diagnosis = mon.diagnose()
        except Exception as e:  # noqa: BLE001 - e.g. no step recorded
            _rank_zero_warn(f"vanishing: no diagnosis ({type(e).__name__}: {e})")
        self._close()
        if self.diagnosis is not None:
            if self._logger_sink is not None:
                from vanishing.diagnose.findings import KINDS

                counts = {
                    f"vanishing/findings/{k}": float(
                        sum(f.kind == k for f in self.diagnosis.findings)
                    )
                    for k in KINDS
                }
                try:
                    self._logger_sink.log(counts, max(int(mon.step) - 1, 0))
                except Exception as e:  # noqa: BLE001
                    _rank_zero_warn(f"vanishing: logging the findings failed: {e}")
            if self.verbose:
                _print(f"vanishing: records in {self.run_dir}\n{self.diagnosis}")

    def _close(self) -> None:
        mon = self.monitor
        if mon is None:
            return
        try:
            mon.close()
        except Exception as e:  # noqa: BLE001
            _rank_zero_warn(f"vanishing: closing the monitor failed: {e}")

    def _stop(self, error: BaseException) -> None:
        _rank_zero_warn(
            f"vanishing: monitoring stopped after an internal error ({type(error).__name__}: "
            f"{error}); training continues"
        )
        self._close()


@rank_zero_only
def _print(text: str) -> None:
    print(text)


@rank_zero_only
def _rank_zero_warn(text: str) -> None:
    warnings.warn(text, RuntimeWarning, stacklevel=3)
