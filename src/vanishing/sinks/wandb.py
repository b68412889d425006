"""Weights & Biases: the selected scalars of every recorded step as W&B history rows."""

from __future__ import annotations

from typing import Any

from vanishing.sinks.scalars import ScalarSelector

#: The x-axis of every ``vanishing/*`` curve: the training step of the record.
STEP_KEY = "vanishing/step"


class WandbSink:
    """Logs the :class:`~vanishing.sinks.scalars.ScalarSelector`'s scalars to a W&B run.

    Which run: ``run`` if given, else the current ``wandb.run``, else ``wandb.init(**init_kwargs)``
    (finished at ``close``; a run it did not start is left running). At ``open`` it declares
    ``run.define_metric("vanishing/*", step_metric="vanishing/step")``; each recorded step is
    then one ``run.log({"vanishing/step": step, **scalars})``, so the curves' x-axis is the
    training step even though a block of past steps is logged at a flush, after W&B's own
    ``_step`` has moved on. Your own ``wandb.log`` calls are not affected. Needs ``wandb``
    (``pip install "vanishing[wandb]"``).

    Example (offline: nothing leaves the machine):
        >>> import os, tempfile, torch, vanishing
        >>> from vanishing.sinks import WandbSink
        >>> saved = dict(os.environ)
        >>> os.environ.update(WANDB_MODE="offline", WANDB_SILENT="true", WANDB_DIR=tempfile.mkdtemp())
        >>> sink = WandbSink(project="demo")
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> with vanishing.watch(model, opt, run_dir=tempfile.mkdtemp() + "/r", sinks=[sink]):
        ...     for _ in range(3):
        ...         opt.zero_grad(); model(torch.randn(8, 3)).pow(2).mean().backward(); opt.step()
        >>> sink.logged                     # the steps logged
        [0, 1, 2]
        >>> os.environ.clear(); os.environ.update(saved)
    """

    def __init__(self, run: Any = None, *, max_layers: int = 3, **init_kwargs: Any) -> None:
        from vanishing.sinks import _require

        _require("wandb", "WandbSink", "wandb")
        self.selector = ScalarSelector(max_layers=max_layers)
        self.init_kwargs = init_kwargs
        self.run: Any = run
        self._started = False
        #: the training steps logged so far, in order
        self.logged: list[int] = []

    def open(self, manifest: dict[str, Any]) -> None:
        import wandb

        self.selector.observe_manifest(manifest)
        if self.run is None:
            self.run = wandb.run
        if self.run is None:
            self.run = wandb.init(**self.init_kwargs)
            self._started = True
        self.run.define_metric(STEP_KEY)
        self.run.define_metric(f"{self.selector.prefix}/*", step_metric=STEP_KEY)

    def write(self, block: Any) -> None:
        if self.run is None:  # open failed (and was reported)
            self.selector.observe_manifest(block.manifest)
            return
        for step, scalars in self.selector.scalars(block):
            self.run.log({STEP_KEY: step, **scalars})
            self.logged.append(step)

    def close(self) -> None:
        if self._started and self.run is not None:
            self.run.finish()
            self._started = False
