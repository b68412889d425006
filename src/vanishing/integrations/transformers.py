"""Hugging Face ``transformers.Trainer`` integration: watch a Trainer's model as it trains.

``VanishingCallback`` attaches :func:`vanishing.watch` to the Trainer's model and optimizer when
training begins and closes it when training ends; the records go to ``run_dir`` (default
``<output_dir>/vanishing``) and ``callback.diagnosis`` holds their diagnosis afterwards. The
Trainer is not changed: the losses, gradients and weights are bit-identical with and without it.

Example:
    >>> import tempfile, torch
    >>> from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments
    >>> from vanishing.integrations.transformers import VanishingCallback
    >>> class Tokens(torch.utils.data.Dataset):
    ...     def __init__(self): self.ids = torch.randint(0, 64, (32, 16))
    ...     def __len__(self): return len(self.ids)
    ...     def __getitem__(self, i): return {"input_ids": self.ids[i], "labels": self.ids[i]}
    >>> model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64,
    ...                                    n_positions=32, bos_token_id=0, eos_token_id=0))
    >>> args = TrainingArguments(output_dir=tempfile.mkdtemp(), max_steps=3, use_cpu=True,
    ...                          report_to=[], save_strategy="no", disable_tqdm=True)
    >>> callback = VanishingCallback(print_diagnosis=False)
    >>> trainer = Trainer(model=model, args=args, train_dataset=Tokens(), callbacks=[callback])
    >>> _ = trainer.train()     # the Trainer prints its final metrics (and vanishing/ scalars)
    {'train_runtime': ...}
    >>> import vanishing
    >>> vanishing.load_run(callback.run_dir).steps["n_backward"].tolist()
    [1, 1, 1]
    >>> callback.diagnosis.to_dict()["healthy"] in (True, False)
    True

What the run holds (docs/transformers.md):

* one record per optimizer step; with ``gradient_accumulation_steps=k`` each record has
  ``n_backward == k`` and the gradients are the accumulated ones the optimizer used. Record step
  ``n`` is the update made while ``state.global_step == n`` (HF logs it as ``"step": n + 1``).
* ``loss``: the sum of the step's backward losses. The Trainer scales each micro-batch's loss for
  accumulation before its backward pass (by ``1/k``, or by the token count of the whole
  accumulated batch for models that take ``num_items_in_batch``), so this is the loss of the
  whole accumulated batch: the ``loss`` HF logs with ``logging_steps=1``.
* with ``max_grad_norm`` set (HF's default is 1.0), a :class:`~vanishing.probes.ClippingProbe`:
  ``grad_norm_backward`` (the total norm before clipping: the ``grad_norm`` HF logs) and
  ``grad_norm_step`` (after clipping: what the optimizer used). The per-parameter
  ``grad_norm`` is read when the optimizer step begins, so it is after clipping.
* layers are the model's qualified module names; a tied weight (GPT-2's ``lm_head.weight`` is
  ``transformer.wte.weight``) is listed once, at the module that runs first, with the other in
  the manifest's ``shared_with``.
"""

from __future__ import annotations

import contextlib
import functools
import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

try:
    from transformers import TrainerCallback
except ImportError as e:  # the extra is not installed: say which one
    from vanishing.sinks import MissingExtraError

    raise MissingExtraError(
        "vanishing.integrations.transformers", "transformers", "transformers"
    ) from e

__all__ = ["VanishingCallback"]

#: ScalarSelector tags left out of HF's logs: HF logs the loss itself.
_DUPLICATE_TAGS = ("loss",)


def _never_raises(method: Callable) -> Callable:
    """A callback method whose failure becomes a warning and ends monitoring, never training."""

    @functools.wraps(method)
    def guarded(self: VanishingCallback, *args: Any, **kwargs: Any) -> None:
        try:
            method(self, *args, **kwargs)
        except Exception as e:  # noqa: BLE001 - monitoring must never stop training
            self._give_up(f"{method.__name__} failed: {type(e).__name__}: {e}")
        return None  # never change the Trainer's control

    return guarded


def _torch_optimizer(optimizer: Any) -> Any:
    """The optimizer whose ``step`` changes the weights, inside any wrappers of it.

    accelerate's ``AcceleratedOptimizer`` (what ``Trainer`` holds) keeps the real optimizer in
    ``.optimizer`` and calls its ``step``; the wrapper is a ``torch.optim.Optimizer`` by class but
    was never initialised as one, so torch's step hooks on it would never run.
    """
    seen = set()
    while id(optimizer) not in seen and getattr(optimizer, "optimizer", None) is not None:
        seen.add(id(optimizer))
        optimizer = optimizer.optimizer
    return optimizer


def _sharded(model: torch.nn.Module) -> bool:
    """Whether any parameter is a shard (FSDP2's DTensor, FSDP1's FlatParameter)."""
    return any(
        type(p).__name__ in ("DTensor", "FlatParameter") or hasattr(p, "_local_tensor")
        for p in model.parameters()
    )


class _Latest:
    """A sink that turns each flushed block into the ScalarSelector's tags, keeping the last."""

    def __init__(self, selector: Any) -> None:
        self.selector = selector
        self.latest: tuple[int, dict[str, float]] | None = None

    def open(self, manifest: dict) -> None:
        self.selector.observe_manifest(manifest)

    def write(self, block: Any) -> None:
        rows = self.selector.scalars(block)
        if rows:
            self.latest = rows[-1]

    def close(self) -> None:
        pass


class VanishingCallback(TrainerCallback):
    """Record per-layer gradient statistics of a ``transformers.Trainer`` run.

    Pass it as ``Trainer(..., callbacks=[VanishingCallback()])``. At ``on_train_begin`` it
    watches the Trainer's model and the torch optimizer inside accelerate's wrapper (with the
    wrapper's GradScaler under fp16, so values are unscaled), adding a
    :class:`~vanishing.probes.ClippingProbe` when ``args.max_grad_norm`` is set; at
    ``on_train_end`` it closes the monitor, sets :attr:`diagnosis` and prints it once (main
    process). A failure inside the callback is a ``RuntimeWarning`` and ends monitoring; training
    goes on unchanged.

    Args:
        run_dir: the run directory; default ``<args.output_dir>/vanishing``.
        stats, every, sinks, flush_every: as for :func:`vanishing.watch`.
        overwrite: replace a run already in ``run_dir`` (without it a new training run into an
            existing run directory is refused with a warning and not recorded). When training
            resumes from a checkpoint (``state.global_step > 0``) a run in ``run_dir`` is
            continued instead, from that step.
        log_scalars: add a few bounded summary scalars of the last recorded step to HF's logs at
            each ``on_log`` (keys ``vanishing/first_last_ratio``, ``vanishing/worst_update_ratio``,
            the clipping norms; :class:`vanishing.sinks.scalars.ScalarSelector`). To have them
            current, each log flushes the monitor (one host transfer, one part per table).
        print_diagnosis: print the diagnosis at the end of training (main process only).

    Attributes:
        run_dir: where the records go (``None`` before training when not given).
        monitor: the :class:`vanishing.Monitor` while training, else ``None``.
        diagnosis: the :class:`vanishing.Diagnosis` after training, else ``None``.

    Under multi-process data parallel training (DDP) only the main process records (gradients
    are the same on every rank after their all-reduce; activations are its own batch). Sharded
    training (FSDP, DeepSpeed) is not supported: the callback warns and does not record.
    """

    def __init__(
        self,
        run_dir: str | os.PathLike | None = None,
        stats: str = "all",
        every: Any = 1,
        sinks: Sequence[Any] = (),
        flush_every: int = 50,
        *,
        overwrite: bool = False,
        log_scalars: bool = True,
        print_diagnosis: bool = True,
    ) -> None:
        self._run_dir_given = None if run_dir is None else Path(run_dir)
        self.run_dir: Path | None = self._run_dir_given
        self.stats = stats
        self.every = every
        self.sinks = tuple(sinks)
        self.flush_every = flush_every
        self.overwrite = overwrite
        self.log_scalars = log_scalars
        self.print_diagnosis = print_diagnosis
        self.monitor: Any = None
        self.diagnosis: Any = None
        self._model: torch.nn.Module | None = None
        self._scalars: _Latest | None = None
        self._logged_step = -1

    # ------------------------------------------------------------------ lifecycle
    @_never_raises
    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs) -> None:
        import vanishing
        from vanishing.probes import ClippingProbe

        self._close()  # a previous train() that ended in an exception left it open
        self.diagnosis = None
        if model is None:
            raise ValueError("the Trainer passed no model to its callbacks")
        distributed = getattr(args, "world_size", 1) > 1
        if distributed and (
            getattr(args, "fsdp", None) or getattr(args, "deepspeed", None) or _sharded(model)
        ):
            warnings.warn(
                "vanishing: VanishingCallback does not support sharded training (FSDP, "
                "DeepSpeed) yet; this run is not recorded",
                RuntimeWarning,
                stacklevel=2,
            )
            return
        if distributed and not state.is_world_process_zero:
            return  # DDP: the main process records; every rank has the same gradients

        self.run_dir = self._run_dir_given or Path(args.output_dir) / "vanishing"
        start = int(state.global_step or 0)
        resume = start > 0 and not self.overwrite and (self.run_dir / "manifest.json").is_file()
        probes = [ClippingProbe()] if (args.max_grad_norm or 0) > 0 else []
        sinks = list(self.sinks)
        self._scalars = None
        self._logged_step = -1
        if self.log_scalars:
            from vanishing.sinks.scalars import ScalarSelector

            self._scalars = _Latest(ScalarSelector(max_layers=0, prefix="vanishing"))
            sinks.append(self._scalars)
        try:
            self.monitor = vanishing.watch(
                model,
                _torch_optimizer(optimizer) if optimizer is not None else None,
                run_dir=self.run_dir,
                stats=self.stats,
                every=self.every,
                flush_every=self.flush_every,
                scaler=getattr(optimizer, "scaler", None),
                sinks=sinks,
                probes=probes,
                overwrite=self.overwrite,
                resume=resume,
                start_step=start,
            )
        except vanishing.WatchError as e:
            hint = ""
            if "already holds" in str(e) or "exists" in str(e):
                hint = "; pass VanishingCallback(overwrite=True) or another run_dir"
            raise RuntimeError(f"{e}{hint}") from None
        self._model = model

    @_never_raises
    def on_log(self, args, state, control, logs=None, **kwargs) -> None:
        if self.monitor is None or self._scalars is None or logs is None:
            return
        self.monitor.flush()
        latest = self._scalars.latest
        if latest is None or latest[0] <= self._logged_step:
            return  # nothing recorded since the last log (an eval log, the final metrics)
        step, tags = latest
        self._logged_step = step
        skip = {f"{self._scalars.selector.prefix}/{t}" for t in _DUPLICATE_TAGS}
        tags = {k: v for k, v in tags.items() if k not in skip}
        logs.update(tags)
        # the Trainer copied ``logs`` into log_history before calling us: keep them there too
        history = state.log_history
        if history and history[-1].get("step") == state.global_step:
            history[-1].update(tags)

    @_never_raises
    def on_train_end(self, args, state, control, **kwargs) -> None:
        if self.monitor is None:
            return
        self._close()
        from vanishing import load_run

        self.diagnosis = load_run(self.run_dir).diagnose(self._model)
        if self.print_diagnosis and state.is_world_process_zero:
            print(f"vanishing: run {self.run_dir}\n{self.diagnosis}")

    # ------------------------------------------------------------------ internals
    def _close(self) -> None:
        monitor, self.monitor = self.monitor, None
        if monitor is not None:
            monitor.close()

    def _give_up(self, why: str) -> None:
        warnings.warn(
            f"vanishing: VanishingCallback: {why}; training continues without monitoring",
            RuntimeWarning,
            stacklevel=3,
        )
        with contextlib.suppress(Exception):  # already reported; training must go on
            self._close()

    def __repr__(self) -> str:
        state = "recording" if self.monitor is not None else "idle"
        return f"<VanishingCallback {state} run_dir={str(self.run_dir)!r}>"
