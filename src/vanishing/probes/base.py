"""The probe protocol: one small object per signal.

A probe declares the :class:`~vanishing.recorder.columns.Column` s it fills, hooks what it needs
when attached, and at the end of each recorded step writes its values into the step's row of
the monitor's buffer, as device tensors (no host sync). The monitor composes probes and calls
them at the moments of a step (``vanishing.monitor.events``); every method but ``measure`` is
optional.

Example: the largest absolute weight of every parameter, a statistic the package does not have.

    >>> import tempfile, torch, vanishing
    >>> from vanishing.probes import Column, Probe
    >>> class MaxAbsWeight(Probe):
    ...     columns = (Column("weight_max_abs", level="param", reduce="max", scale="linear"),)
    ...     def attach(self, ctx):
    ...         self.params = [r.param for r in ctx.layout.params]
    ...     def measure(self, row):
    ...         values = torch.stack([p.detach().abs().max() for p in self.params])
    ...         row.set_params("weight_max_abs", values.double())
    >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
    >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
    >>> with vanishing.watch(model, opt, run_dir=tempfile.mkdtemp() + "/r", probes=[MaxAbsWeight()]) as mon:
    ...     opt.zero_grad(); model(torch.randn(8, 3)).sum().backward(); opt.step()
    >>> m = vanishing.load_run(mon.run_dir).metrics
    >>> bool((m[m.param == "weight"].weight_max_abs > 0).all())
    True
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from vanishing.recorder.columns import Column

if TYPE_CHECKING:
    import torch

    from vanishing.monitor.buffer import Row
    from vanishing.monitor.events import Events
    from vanishing.monitor.layout import Layout


@dataclass
class ProbeContext:
    """What a probe may use when it attaches (fields are read-only to probes)."""

    layout: Layout
    events: Events
    optimizer: torch.optim.Optimizer | None
    device: torch.device
    stats: str  # "all" or "parameters"
    #: True while this step is recorded and its measured pass is not over: a probe that keeps
    #: values from hooks checks it (LBFGS's later closure evaluations are not measured).
    capturing: Callable[[], bool]
    #: divides by the GradScaler's scale (identity without AMP): for values of a backward pass
    unscale: Callable[[Any], Any]
    #: backward passes so far in this step
    n_backward: Callable[[], int]
    #: ``note(text)``: something the probe could not measure this step, kept in the manifest's
    #: ``notes`` (each text once, with the first step and how many steps it happened)
    note: Callable[[str], None] = lambda text: None
    #: whether memory a probe keeps for reuse at the next recorded step stays allocated after
    #: this one: False under ``watch(low_memory=...)`` when the next step is not recorded
    keep_for_next: Callable[[], bool] = lambda: True
    #: the number of the current step (optimizer steps so far)
    step: Callable[[], int] = lambda: 0


class Probe:
    """Base class of probes; subclasses set ``columns`` and override what they need."""

    columns: Sequence[Column] = ()

    def attach(self, ctx: ProbeContext) -> None:
        """Hook what the probe needs (through ``ctx.events``) and keep ``ctx``."""

    def forward_begin(self, generation: int) -> None:
        """A forward pass of the model begins (only while capturing); ``generation`` counts
        them, so that what a forward captured can be told from what the next one does."""

    def backward_end(self, roots: tuple) -> None:
        """A backward pass of a recorded step ended (only while capturing)."""

    def grads_ready(self) -> None:
        """The gradients are final for this recorded step."""

    def step_begin(self) -> None:
        """A recorded step's ``optimizer.step()`` is about to change the weights."""

    def step_end(self) -> None:
        """A recorded step's ``optimizer.step()`` returned."""

    def measure(self, row: Row) -> None:
        """Write this step's values into ``row`` (``row.set_step/set_params/set_modules``), at
        the end of the step: after ``optimizer.step()`` (weights read here are the new ones)."""
        raise NotImplementedError

    def reset(self) -> None:
        """The step is over (recorded or not): forget what was kept for it."""
