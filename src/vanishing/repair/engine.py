"""The engine of verified repair: candidates from a diagnosis, each probed on a copy, judged.

:func:`repair` trains a copy of the user's model for K steps on the given batches under
:func:`vanishing.watch` (the *baseline*), diagnoses it, and for each remedy the diagnosis names
(best first) trains another copy, changed by that remedy, on the same batches from the same seed
for the same K steps, also watched and diagnosed. Each candidate gets a verdict (:func:`verdict`)
and the best one can be applied to the user's model (:meth:`Repair.apply`).

What is measured, and how (one definition each):

- **loss** (``loss_before`` of the baseline, ``loss_after`` of a candidate): the mean training
  loss of the last 10% of the K steps (at least one step), on the batches themselves; a run
  that diverged (a non-finite loss, or a loss above :data:`DIVERGED_FACTOR` times its first
  step's) is stopped there and its loss is ``inf``;
- **first/last ratio**: :meth:`vanishing.Run.first_last_ratio` of the run (the median over the
  steps of the first over the last hidden layer's speed of learning:
  :func:`vanishing.recorder.semantics.first_last_ratio`);
- **profile**: per hidden layer, the median over the steps of its speed of learning
  (:meth:`vanishing.Run.speeds`).

Remedies come in two sorts. *Model* remedies (re-initialisation, activation swaps, inserted
normalisation, residual connections, ...) are transformations of the module, done by
:func:`vanishing.repair.transforms.apply_remedy` on a deep copy; one that cannot apply to this
model is skipped with its reason (:attr:`Repair.skipped`). *Recipe* remedies change the training
loop instead and leave the model as it is: ``gradient_clipping`` (at the median pre-clip total
gradient norm of the baseline's first 10% of steps; lower when the first update was already
over :data:`UPDATE_BAND`'s top, 10% of the weights: the norm that would have made it
:data:`TARGET_UPDATE`), ``lower_learning_rate`` (x0.1 and x0.01, one candidate each; the
second is measured instead when the baseline's first update was over 10% of the weights: the
power of ten bringing it to about 1e-3), ``higher_learning_rate`` (x3 and x10; first, when
parameter groups' rates differ by 10x or more, every group at the largest rate) and
``learning_rate_warmup`` (linear over the first K/4 steps).

The candidates are the diagnosis' remedies in its order (finding by finding, each remedy best
first), each once; when it names an activation swap, the other swaps follow (which activation
trains best here is measured, not assumed); at most :data:`MAX_CANDIDATES` are trained.
"""

from __future__ import annotations

import contextlib
import copy
import math
import numbers
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "RECIPE_REMEDIES",
    "VERDICTS",
    "MARGIN",
    "RATIO_FACTOR",
    "DIVERGED_FACTOR",
    "MAX_CANDIDATES",
    "ACTIVATION_SWAPS",
    "SWAP_KINDS",
    "LR_FACTORS",
    "REFINE_PARTNERS",
    "UPDATE_BAND",
    "LOOP_OPTIONS",
    "RECORDED_STEPS",
    "Candidate",
    "Probe",
    "Repair",
    "probe",
    "repair",
    "verdict",
]

#: Remedies the engine applies in its training loop (they do not change the model).
RECIPE_REMEDIES = (
    "gradient_clipping",
    "lower_learning_rate",
    "higher_learning_rate",
    "learning_rate_warmup",
)
#: Verdicts, best first (also the order of :attr:`Repair.candidates`).
VERDICTS = ("fixed", "improved", "no_help", "worse")
#: A loss counts as lower (higher) when it is below (above) the baseline's by this fraction of
#: the baseline's magnitude: 5% on a K-step probe is beyond the step-to-step noise of a fixed
#: batch sequence from a fixed seed, and small enough that a real fix always clears it.
MARGIN = 0.05
#: The first/last gradient ratio moved toward 1 when its distance from 1 in decades shrank by
#: at least one decade (a factor of 10).
RATIO_FACTOR = 10.0
#: A run whose loss exceeds this multiple of its first step's loss has diverged (stopped early).
DIVERGED_FACTOR = 10.0
#: At most this many candidates are trained (remedies skipped as not applicable do not count).
MAX_CANDIDATES = 8
#: Activation swaps tried after the diagnosis' own remedies when it names one of them, in
#: this order (the candidate budget may cut the last): the self-normalising SELU first (with
#: LeCun init it keeps each layer's mean and variance at a fixed point, Klambauer et al. 2017;
#: also AUTOTRAINER's first repair), then the smooth ELU and GELU, then the piecewise-linear
#: leaky ReLU and ReLU.
ACTIVATION_SWAPS = ("selu", "elu", "gelu", "leaky_relu", "relu")
#: On a net of saturating activations the swaps follow a finding of these kinds too.
SWAP_KINDS = ("vanishing_gradient", "exploding_gradient", "saturated_activations")
#: The learning-rate factors tried, one candidate each.
LR_FACTORS = {"lower_learning_rate": (0.1, 0.01), "higher_learning_rate": (3.0, 10.0)}
#: Round two (when no candidate of round one is fixed): this many of round one's model changes,
#: the closest to a fix, are probed again at two learning rates each.
REFINE_PARTNERS = 2
#: A first update over the weights outside this band is a measurably wrong step size: round two
#: then moves it by powers of ten toward :data:`TARGET_UPDATE` instead of trying x3 and x10.
UPDATE_BAND = (1e-5, 0.1)
#: Recorded steps a run by default: the labelled benchmark's diagnoses judge 30 recorded steps;
#: each recorded step costs several plain steps of a small model (activations, error signals).
RECORDED_STEPS = 25
#: Candidate options that are settings of the training loop, not of the model transformation.
LOOP_OPTIONS = ("lr_factor", "group_lr", "clip", "warmup")


@dataclass
class Candidate:
    """One remedy as probed: what changed, the numbers before and after, and the verdict.

    ``loss_before``/``ratio_before``/``profile_before`` are the baseline's (the model as it
    is); ``*_after`` are this candidate's, after the same K steps on the same batches from the
    same seed. ``code`` is the change as a short Python snippet (a model transformation, or the
    change to make in the training loop when ``changes_model`` is False). ``prompted_by``: the
    finding kinds whose remedies named this one. ``options``: how the probe loop ran it
    (``lr_factor``, ``group_lr``, ``clip``, ``warmup``). ``why``: the verdict's reason;
    ``diverged``: stopped early; ``error``: why training failed ("" when it ran); ``steps_run``
    and ``seconds``: what the probe cost.

    Example:
        >>> from vanishing.repair import Candidate
        >>> c = Candidate("gradient_clipping", changes_model=False, loss_before=2.0, loss_after=1.0)
        >>> c.verdict, c.to_dict()["loss_after"]
        ('no_help', 1.0)
    """

    remedy: str
    changes_model: bool
    description: str = ""
    code: str = ""
    options: dict[str, Any] = field(default_factory=dict)
    prompted_by: list[str] = field(default_factory=list)
    layers: list[str] = field(default_factory=list)
    loss_before: float = math.nan
    loss_after: float = math.nan
    ratio_before: float | None = None
    ratio_after: float | None = None
    profile_before: dict[str, float] = field(default_factory=dict)
    profile_after: dict[str, float] = field(default_factory=dict)
    findings_after: list[Any] = field(default_factory=list)
    verdict: str = "no_help"
    why: str = ""
    diverged: bool = False
    error: str = ""
    steps_run: int = 0
    seconds: float = 0.0
    #: its first step's update over the weights, ``||w1 - w0|| / ||w0||`` (round two's rates)
    first_update: float | None = None
    #: False when its run was not diagnosed: it diverged or its loss is higher by the margin,
    #: which makes it ``worse`` whatever it shows (``findings_after`` is then empty)
    diagnosed: bool = True

    @property
    def label(self) -> str:
        """The remedy with its loop setting: ``lower_learning_rate x0.1``, ``orthogonal_init +
        lr x1e+05`` (a model change probed at another learning rate), or just the remedy."""
        factor = self.options.get("lr_factor")
        if factor is None:
            return self.remedy
        return f"{self.remedy} {'+ lr ' if self.changes_model else ''}x{factor:g}"

    @property
    def kinds_after(self) -> list[str]:
        """The finding kinds after this candidate's K steps, each once."""
        return list(dict.fromkeys(f.kind for f in self.findings_after))

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (NaN and infinities become strings, findings dicts)."""
        from dataclasses import asdict

        from vanishing.diagnose.findings import _jsonable

        out = {k: getattr(self, k) for k in self.__dataclass_fields__ if k != "findings_after"}
        out["findings_after"] = [asdict(f) for f in self.findings_after]
        return _jsonable(out)


@dataclass
class Repair:
    """What :func:`repair` found: the baseline, the candidates (best first) and the skipped.

    ``healthy``: the diagnosis found nothing, so nothing was tried. ``best``: the first
    ``fixed`` candidate, or None. ``skipped``: ``(remedy, reason)`` for each remedy that could
    not apply to this model. ``diagnosis``: the one the candidates came from.

    Example:
        >>> from vanishing.repair import Repair
        >>> rep = Repair(healthy=True, steps=50)
        >>> rep.best is None, str(rep)
        (True, 'Nothing to repair: the diagnosis found no gradient-flow problem.')
    """

    healthy: bool
    steps: int
    candidates: list[Candidate] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    diagnosis: Any = None
    baseline_findings: list[Any] = field(default_factory=list)
    loss_before: float = math.nan
    ratio_before: float | None = None
    profile_before: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    baseline_seconds: float = 0.0
    seed: int = 0
    margin: float = MARGIN
    every: int = 1
    run_dir: str | None = None
    _example_inputs: Any = field(default=None, repr=False, compare=False)

    @property
    def best(self) -> Candidate | None:
        """The first ``fixed`` candidate (they are sorted best first), or None."""
        return next((c for c in self.candidates if c.verdict == "fixed"), None)

    @property
    def code(self) -> str:
        """The best candidate's change as code ("" when none fixed it)."""
        return self.best.code if self.best is not None else ""

    def apply(self, model, candidate: Candidate | None = None):
        """Apply a model-changing candidate (default: :attr:`best`) to ``model`` in place, as
        it was probed (same transformation, same seed); returns ``model``.

        A training-recipe candidate (clipping, learning rate, warm-up) cannot be applied to a
        model: a ValueError says what to change in the training loop instead.

        Example:
            >>> import torch
            >>> from vanishing.repair import Candidate, Repair
            >>> rep = Repair(healthy=False, steps=10, candidates=[Candidate(
            ...     "gradient_clipping", False, verdict="fixed",
            ...     code="torch.nn.utils.clip_grad_norm_(model.parameters(), 1.3)")])
            >>> rep.apply(torch.nn.Linear(2, 2))
            Traceback (most recent call last):
            ...
            ValueError: gradient_clipping changes the training loop, not the model: add torch.nn.utils.clip_grad_norm_(model.parameters(), 1.3)
        """
        import torch

        if candidate is None:
            candidate = self.best
            if candidate is None:
                raise ValueError(
                    "no candidate fixed the problem, so there is no default to apply; "
                    "pass one of rep.candidates explicitly"
                )
        if not isinstance(candidate, Candidate):
            raise ValueError(f"candidate must be one of rep.candidates, got {candidate!r}")
        if not candidate.changes_model:
            raise ValueError(
                f"{candidate.remedy} changes the training loop, not the model: add {candidate.code}"
            )
        if not isinstance(model, torch.nn.Module):
            raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        from vanishing.repair import transforms

        loop = {k: v for k, v in candidate.options.items() if k in LOOP_OPTIONS}
        if loop:
            # a model change probed at another learning rate (round two): the model part is
            # applied here, the rate is the caller's loop
            import warnings

            warnings.warn(
                f"{candidate.label} was measured with the learning rate x"
                f"{loop.get('lr_factor', 1.0):g}: change the optimizer too (see candidate.code)",
                UserWarning,
                stacklevel=2,
            )
        options = {k: v for k, v in candidate.options.items() if k not in LOOP_OPTIONS}
        # seeded as the probe was (a new module, e.g. a swapped-in LSTM, draws its weights from
        # the global RNG), which is then restored
        with torch.random.fork_rng(devices=_devices(model)):
            torch.manual_seed(self.seed)
            transforms.apply_remedy(
                model,
                candidate.remedy,
                example_inputs=self._example_inputs,
                generator=torch.Generator().manual_seed(self.seed),
                **options,
            )
        return model

    def report(self, path: str | os.PathLike = "repair.html") -> Path:
        """Write the repair's HTML page (verdicts, before/after profiles through depth, the best
        change as code; :mod:`vanishing.report.repair`) and return its path.

        Example:
            >>> rep.report("repair.html")   # doctest: +SKIP
            PosixPath('repair.html')
        """
        import importlib

        # the report reads repairs; this module does not depend on it: found at call time
        return importlib.import_module("vanishing.report.repair").write_repair(self, path)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict of everything but the example inputs.

        Example:
            >>> import json
            >>> from vanishing.repair import Repair
            >>> json.loads(json.dumps(Repair(healthy=True, steps=5).to_dict()))["healthy"]
            True
        """
        from dataclasses import asdict

        from vanishing.diagnose.findings import _jsonable

        return _jsonable(
            {
                "healthy": self.healthy,
                "steps": self.steps,
                "seed": self.seed,
                "margin": self.margin,
                "best": self.best.remedy if self.best is not None else None,
                "loss_before": self.loss_before,
                "ratio_before": self.ratio_before,
                "profile_before": self.profile_before,
                "baseline_findings": [asdict(f) for f in self.baseline_findings],
                "diagnosis": self.diagnosis.to_dict() if self.diagnosis is not None else None,
                "candidates": [c.to_dict() for c in self.candidates],
                "skipped": [list(s) for s in self.skipped],
                "seconds": self.seconds,
                "baseline_seconds": self.baseline_seconds,
                "run_dir": self.run_dir,
            }
        )

    def __str__(self) -> str:
        if self.healthy:
            return "Nothing to repair: the diagnosis found no gradient-flow problem."
        kinds = ", ".join(dict.fromkeys(f.kind for f in self.baseline_findings)) or "none"
        lines = [
            f"Repair after {self.steps} steps per candidate (baseline findings: {kinds}; "
            f"loss = mean of the last 10% of steps; margin {self.margin:.0%})",
        ]
        rows = [("remedy", "verdict", "loss before -> after", "ratio before -> after", "change")]
        for c in self.candidates:
            rows.append(
                (
                    c.label + ("" if c.changes_model else " (loop)"),
                    c.verdict,
                    f"{_num(c.loss_before)} -> {'failed' if c.error else _num(c.loss_after)}",
                    f"{_num(c.ratio_before)} -> {_num(c.ratio_after)}",
                    c.description if len(c.description) <= 90 else c.description[:87] + "...",
                )
            )
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        for r in rows:
            lines.append("  ".join(r[i].ljust(widths[i]) for i in range(4)) + "  " + r[4])
        for remedy, reason in self.skipped:
            lines.append(f"skipped {remedy}: {reason}")
        best = self.best
        if best is None:
            lines.append("No candidate fixed it.")
        else:
            lines.append(f"Best: {best.label} ({best.why}); the change:")
            lines.extend("    " + line for line in best.code.splitlines())
        return "\n".join(lines)


def _num(x: float | None) -> str:
    if x is None:
        return "-"
    if not math.isfinite(x):
        return "diverged" if x > 0 else str(x)
    return f"{x:.3g}"


# ---------------------------------------------------------------------------- the verdict
def verdict(
    *,
    loss_before: float,
    loss_after: float,
    ratio_before: float | None,
    ratio_after: float | None,
    prompted_by: Iterable[str],
    kinds_after: Iterable[str],
    critical_before: Iterable[str] = (),
    critical_after: Iterable[str] = (),
    diverged: bool = False,
    margin: float = MARGIN,
    ratio_factor: float = RATIO_FACTOR,
) -> tuple[str, str]:
    """The verdict on a candidate and the reason, from its numbers against the baseline's.

    In this order: ``worse`` if it diverged or shows a critical finding kind the baseline did
    not; ``fixed`` if none of the finding kinds that prompted it remains and its loss is lower
    than the baseline's by ``margin`` (a fraction of the baseline loss's magnitude; any finite
    loss is lower than a diverged baseline's); ``improved`` if the loss is that much lower, or
    the first/last gradient ratio moved toward 1 by ``ratio_factor`` (its distance from 1 in
    decades shrank by ``log10(ratio_factor)``), unless the loss is higher by ``margin``: then
    ``worse``; else ``no_help``.

    Example:
        >>> from vanishing.repair.engine import verdict
        >>> verdict(loss_before=1.4, loss_after=0.6, ratio_before=1e-5, ratio_after=0.3,
        ...         prompted_by=["vanishing_gradient"], kinds_after=[])
        ('fixed', 'vanishing_gradient gone; loss 1.4 -> 0.6')
        >>> verdict(loss_before=1.4, loss_after=1.39, ratio_before=1e-5, ratio_after=1e-3,
        ...         prompted_by=["vanishing_gradient"], kinds_after=["vanishing_gradient"])[0]
        'improved'
    """
    prompted = list(dict.fromkeys(prompted_by))
    after = set(kinds_after)
    new_critical = sorted(set(critical_after) - set(critical_before))
    change = f"loss {_num(loss_before)} -> {_num(loss_after)}"
    if diverged or not math.isfinite(loss_after):
        return "worse", f"diverged ({change})"
    if new_critical:
        return "worse", f"new critical finding: {', '.join(new_critical)}"
    if math.isfinite(loss_before):
        lower = loss_after < loss_before - margin * abs(loss_before)
        higher = loss_after > loss_before + margin * abs(loss_before)
    else:
        lower, higher = True, False
    remaining = [k for k in prompted if k in after]
    if not remaining and lower:
        gone = ", ".join(prompted) or "the findings"
        return "fixed", f"{gone} gone; {change}"
    moved = False
    if ratio_before and ratio_after and ratio_before > 0 and ratio_after > 0:
        d_before = abs(math.log10(ratio_before))
        d_after = abs(math.log10(ratio_after))
        moved = d_after <= d_before - math.log10(ratio_factor)
    still = f"{', '.join(remaining)} remains" if remaining else "loss not lower by the margin"
    if higher:  # a flatter gradient that trains worse is no improvement
        return "worse", f"{change} (higher by more than {margin:.0%})"
    if lower or moved:
        because = change if lower else f"ratio {_num(ratio_before)} -> {_num(ratio_after)}"
        return "improved", f"{because}, but {still}"
    return "no_help", f"{still}; {change}"


# ---------------------------------------------------------------------------- the probe loop
@dataclass
class Probe:
    """One K-step run's results (the baseline or a candidate): every step's loss, the baseline's
    pre-clip total gradient norms and first relative update, the diagnosis after, the first/last
    ratio, the profile, and whether it diverged (stopped early). ``loss``: the mean of the last 10% of steps (``inf``
    when it diverged).

    Example:
        >>> from vanishing.repair.engine import Probe
        >>> Probe([3.0] * 10 + [1.0] * 10, [], None, None, {}, False, 0.1).loss
        1.0
    """

    losses: list[float]
    norms: list[float]
    diagnosis: Any
    ratio: float | None
    profile: dict[str, float]
    diverged: bool
    seconds: float
    #: the first step's update over the weights, ``||w1 - w0|| / ||w0||`` over all parameters
    #: (recorded with the gradient norms)
    first_update: float | None = None
    #: why training the candidate failed ("" when it ran), e.g. its loss_fn rejecting the
    #: output of a transformed model
    error: str = ""
    #: False when the run was not diagnosed (diverged, or a loss that makes it worse anyway)
    diagnosed: bool = True

    @property
    def loss(self) -> float:
        return _final_loss(self.losses, self.diverged)


def _final_loss(losses: Sequence[float], diverged: bool) -> float:
    if diverged or not losses:
        return math.inf
    tail = max(1, round(0.1 * len(losses)))
    return float(sum(losses[-tail:]) / tail)


class _InputError(ValueError):
    """What the caller passed cannot train (said in one line); not wrapped again."""


def _check_loss(loss) -> None:
    """``loss_fn``'s first result is a scalar tensor that backpropagates, or a one-line error."""
    import torch

    if not isinstance(loss, torch.Tensor):
        raise _InputError(
            f"loss_fn(outputs, targets) must return a scalar tensor, got {type(loss).__name__}"
        )
    if loss.numel() != 1:
        raise _InputError(
            "loss_fn(outputs, targets) must return a scalar tensor, got shape "
            f"{tuple(loss.shape)} (reduce it, e.g. .mean())"
        )
    if not loss.requires_grad:
        raise _InputError(
            "loss_fn(outputs, targets) returned a tensor that does not depend on the model's "
            "trainable parameters (no grad_fn: detached, or .item() made into a tensor)"
        )


def _input_failure(e: Exception, step: int, n_batches: int) -> _InputError:
    """The unchanged model failing in a step's forward, loss or backward: the caller's input
    does not fit (a shape, a loss_fn reading the wrong output), said in one line."""
    return _InputError(
        f"training the model as given failed at step {step} (batch {step % n_batches}), "
        "before any remedy was tried (check that model(inputs) and loss_fn(outputs, "
        f"targets) work on these batches): {type(e).__name__}: {e}"
    )


def _train(
    model,
    batches,
    loss_fn,
    make_optimizer,
    steps: int,
    run_dir: Path,
    *,
    lr_factor: float = 1.0,
    group_lr: float | None = None,
    clip: float | None = None,
    clip_value: float | None = None,
    warmup: int = 0,
    every: int = 1,
    record_norms: bool = False,
    tick: Callable[[], None] | None = None,
    judged: bool = False,
    worse_above: float | None = None,
) -> Probe:
    """K steps of ``model`` on ``batches`` (cycled), watched; stops early on divergence.

    ``record_norms``: the pre-clip total gradient norm of the first 10% of steps (the
    clipping threshold's evidence). ``judged``: a candidate's run, whose verdict is ``worse``
    when it diverged or its final loss is above ``worse_above`` whatever its findings are: such
    a run is not diagnosed (the baseline's always is).
    """
    import torch

    import vanishing
    from vanishing.diagnose.findings import Diagnosis
    from vanishing.modules import call_model
    from vanishing.recorder.reader import load_run

    start = time.perf_counter()
    opt = make_optimizer(model)
    for group in opt.param_groups:
        group["lr"] = (group["lr"] if group_lr is None else group_lr) * lr_factor
    schedule = None
    if warmup:
        # the change the candidate's code tells the user to make: LambdaLR, stepped per step
        schedule = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda step: min(1.0, (step + 1) / warmup)
        )
    losses: list[float] = []
    first_losses: dict[int, float] = {}
    norms: list[float] = []
    diverged = False
    first_update = None
    params = [p for p in model.parameters() if p.requires_grad]
    norm_steps = max(1, round(0.1 * steps))
    watch = {"run_dir": run_dir, "flush_every": steps, "every": every}
    with vanishing.watch(model, optimizer=opt, **watch) as mon:
        model.train()
        for step in range(steps):
            inputs, targets = batches[step % len(batches)]
            opt.zero_grad(set_to_none=True)
            try:
                loss = loss_fn(call_model(model, inputs), targets)
                if step == 0:
                    _check_loss(loss)
                loss.backward()
            except (_InputError, torch.OutOfMemoryError):
                raise
            except Exception as e:
                if judged:  # a candidate's failure is that candidate's error (see _probe)
                    raise
                raise _input_failure(e, step, len(batches)) from e
            if record_norms and step < norm_steps:
                grads = [p.grad.detach().norm() for p in params if p.grad is not None]
                norms.append(float(torch.stack(grads).norm()) if grads else 0.0)
            if clip is not None:
                torch.nn.utils.clip_grad_norm_(params, clip)
            if clip_value is not None:
                torch.nn.utils.clip_grad_value_(params, clip_value)
            # every run's first update (one step's copy): round two sets rates from it
            before = [p.detach().clone() for p in params] if step == 0 else None
            opt.step()
            if before is not None:
                moved = torch.stack([(p.detach() - b).norm() for p, b in zip(params, before)])
                size = torch.stack([b.norm() for b in before]).norm()
                first_update = float(moved.norm() / size) if float(size) > 0 else None
            if schedule is not None:
                schedule.step()
            value = float(loss.detach())  # host sync: the divergence check needs it
            losses.append(value)
            if tick is not None:
                tick()
            # against the first loss on the same batch: batches differ, and a frozen model's
            # loss on one batch can be 10x its loss on another without anything growing
            first_on = first_losses.setdefault(step % len(batches), value)
            if not math.isfinite(value) or (first_on > 0 and value > DIVERGED_FACTOR * first_on):
                diverged = True
                break
        mon.flush()
        run = load_run(run_dir)  # read once: the diagnosis, the ratio and the profile
        loss = _final_loss(losses, diverged)
        if judged and (diverged or (worse_above is not None and loss > worse_above)):
            # the verdict is "worse" on the loss alone: a diagnosis would cost more than
            # the K steps of a small model and change nothing
            why = "diverged" if diverged else f"its loss {loss:.3g} is above {worse_above:.3g}"
            diagnosis = Diagnosis([], notes=[f"not diagnosed: {why}, so it is worse"])
            diagnosed = False
        else:
            # the live model lets the diagnosis measure the recurrent weights' singular values
            diagnosis = run.diagnose(model)
            diagnosed = True
    ratio = run.first_last_ratio()
    speeds = run.speeds()
    profile = {str(k): float(v) for k, v in speeds.median().items()} if len(speeds) else {}
    seconds = time.perf_counter() - start
    return Probe(
        losses, norms, diagnosis, ratio, profile, diverged, seconds, first_update, "", diagnosed
    )


def probe(
    model,
    batches,
    loss_fn,
    *,
    optimizer=None,
    steps: int = 200,
    seed: int = 0,
    remedies: Sequence[str] = (),
    lr_factor: float = 1.0,
    clip_norm: float | None = None,
    clip_value: float | None = None,
    warmup: int = 0,
    every: int | None = None,
    run_dir: str | os.PathLike | None = None,
) -> Probe:
    """One probe as :func:`repair` runs it: a deep copy of ``model``, changed by the model
    ``remedies`` in turn (:func:`vanishing.repair.transforms.apply_remedy`; NotApplicable
    propagates), trained for ``steps`` on ``batches`` (cycled) from ``seed``, watched and
    diagnosed, with the loop changes given (learning rate x ``lr_factor``, gradient-norm or
    -value clipping, linear warm-up over ``warmup`` steps), recording as :func:`repair` does
    (``every``). For composite fixes (a benchmark's
    fixed repair order) and for re-checking a candidate independently.

    Example:
        >>> import torch
        >>> from vanishing.repair.engine import probe
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <...>
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
        >>> x, y = torch.randn(32, 4), torch.randn(32, 1)
        >>> p = probe(net, [(x, y)], torch.nn.functional.mse_loss, steps=5, clip_norm=1.0)
        >>> len(p.losses), p.diverged
        (5, False)
    """
    import torch

    if optimizer is None:

        def optimizer(params):
            return torch.optim.SGD(params, lr=0.1)

    make_optimizer = _optimizer_factory(optimizer, model)
    batches = list(batches)
    if not batches:
        raise ValueError("batches is empty; pass at least one (inputs, targets) pair")
    root = Path(run_dir) if run_dir is not None else Path(tempfile.mkdtemp(prefix="probe-"))
    try:
        with torch.random.fork_rng(devices=_devices(model)):
            copy_ = _copy(model)
            if remedies:
                from vanishing.repair import transforms

                for remedy in remedies:
                    torch.manual_seed(seed)
                    transforms.apply_remedy(
                        copy_,
                        remedy,
                        example_inputs=batches[0][0],
                        generator=torch.Generator().manual_seed(seed),
                    )
            torch.manual_seed(seed)
            return _train(
                copy_,
                batches,
                loss_fn,
                make_optimizer,
                steps,
                root / "run",
                lr_factor=lr_factor,
                clip=clip_norm,
                clip_value=clip_value,
                warmup=warmup,
                every=max(1, steps // RECORDED_STEPS) if every is None else every,
                record_norms=True,
            )
    finally:
        if run_dir is None:
            shutil.rmtree(root, ignore_errors=True)


# ---------------------------------------------------------------------------- candidates
@dataclass
class _Plan:
    """A candidate to probe: the remedy and how (model transformation or loop options)."""

    remedy: str
    changes_model: bool
    prompted_by: list[str]
    options: dict[str, Any] = field(default_factory=dict)
    description: str = ""
    code: str = ""
    layers: list[str] = field(default_factory=list)
    model: Any = None  # the transformed copy (model remedies)


def _remedy_order(diagnosis, saturating: bool = False) -> list[tuple[str, list[str]]]:
    """Remedy names in the diagnosis' order (finding by finding, best first), each once, with
    the finding kinds that named it; then, when it names an activation swap (its measured cause
    is the activation), the other swaps of :data:`ACTIVATION_SWAPS` it did not name, for the
    same kinds: which activation trains best on this model is what the probe measures. When
    the model's hidden activations saturate (``saturating``: sigmoid, tanh), the swaps follow a
    finding of :data:`SWAP_KINDS` too, whatever it names: the activation's derivative is a
    factor of the per-layer gradient gain it measured, and each swap re-initialises the layers
    for its new activation (so it also covers a re-initialisation the finding named).

    Example:
        >>> from vanishing.diagnose.findings import Diagnosis, Finding, Remedy
        >>> from vanishing.repair.engine import _remedy_order
        >>> f = Finding("dead_units", ["4"], "warning", "dead", remedies=[Remedy("leaky_relu", "."),
        ...             Remedy("he_init", ".")])
        >>> [name for name, _ in _remedy_order(Diagnosis([f]))]
        ['leaky_relu', 'he_init', 'selu', 'elu', 'gelu', 'relu']
    """
    order: dict[str, list[str]] = {}
    for f in diagnosis.findings:
        for r in f.remedies:
            kinds = order.setdefault(r.name, [])
            if f.kind not in kinds:
                kinds.append(f.kind)
    swaps = [kinds for name, kinds in order.items() if name in ACTIVATION_SWAPS]
    if saturating:
        swaps += [[f.kind] for f in diagnosis.findings if f.kind in SWAP_KINDS]
    if swaps:
        prompted = list(dict.fromkeys(k for kinds in swaps for k in kinds))
        for name in ACTIVATION_SWAPS:
            order.setdefault(name, list(prompted))
    return list(order.items())


def _saturating_hidden(model, example_inputs) -> bool:
    """Whether an activation module with flat tails on both sides (sigmoid, tanh, ...) follows
    a hidden layer (any Linear/Conv/recurrent layer but the last in forward order).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from vanishing.repair.engine import _saturating_hidden
        >>> x = torch.randn(2, 4)
        >>> _saturating_hidden(nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 1)), x)
        True
        >>> _saturating_hidden(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 1)), x)
        False
    """
    from vanishing import activations
    from vanishing.repair import transforms

    flat = {a.kind for a in activations.registered() if a.tails == "both"}
    try:
        kinds = list(transforms.describe_activations(model, example_inputs).values())
    except Exception:  # noqa: BLE001 - an untraceable forward: no extra candidates, no error
        return False
    return any(k in flat for k in kinds[:-1])


#: The first step's update over the weights that a measured learning-rate factor aims at (the
#: usual rule of thumb for a healthy SGD step: about 1e-3 of the weights' size).
TARGET_UPDATE = 1e-3


def _measured_lr_factor(first_update: float | None) -> float | None:
    """A power of ten bringing the baseline's first relative update to about
    :data:`TARGET_UPDATE` (None when it is not finite or already smaller).

    Example:
        >>> from vanishing.repair.engine import _measured_lr_factor
        >>> _measured_lr_factor(2.5e4), _measured_lr_factor(1e-4)
        (1e-08, None)
    """
    if first_update is None or not math.isfinite(first_update) or first_update <= TARGET_UPDATE:
        return None
    return 10.0 ** math.floor(math.log10(TARGET_UPDATE / first_update))


def _recipe_plans(remedy, prompted, base: Probe, steps: int, lrs: list[float]) -> list[_Plan]:
    def lr_text(factor):
        now = ", ".join(f"{lr:.3g}" for lr in lrs)
        new = ", ".join(f"{lr * factor:.3g}" for lr in lrs)
        return now, new

    if remedy == "gradient_clipping":
        early = [n for n in base.norms[: max(1, round(0.1 * steps))] if math.isfinite(n)]
        if not early or max(early) == 0:
            return []
        early.sort()
        threshold, why = early[len(early) // 2], "the median of the first 10% of steps' norms"
        first = base.norms[0] if base.norms else None
        u = base.first_update
        if (
            u is not None
            and math.isfinite(u)
            and u > UPDATE_BAND[1]
            and first is not None
            and math.isfinite(first)
            and first > 0
        ):
            # the first step already moved the weights by more than UPDATE_BAND allows (an
            # exploding init): the early norms' median would clip nothing that matters. Where
            # an update scales with the gradient (SGD), this norm makes the first update about
            # TARGET_UPDATE of the weights, as the measured learning-rate factor aims at
            scaled = first * TARGET_UPDATE / u
            if scaled < threshold:
                threshold = scaled
                why = (
                    f"the first step's norm {first:.3g} x {TARGET_UPDATE:g} / its relative "
                    f"update {u:.3g}"
                )
        threshold = float(f"{threshold:.3g}")
        return [
            _Plan(
                remedy,
                False,
                prompted,
                {"clip": threshold},
                f"clip the gradient norm at {threshold:g} ({why})",
                f"torch.nn.utils.clip_grad_norm_(model.parameters(), {threshold:g})"
                "  # after loss.backward(), before optimizer.step()",
            )
        ]
    if remedy in LR_FACTORS:
        plans = []
        if remedy == "higher_learning_rate" and len(lrs) > 1 and min(lrs) * 10 <= max(lrs):
            # parameter groups whose learning rates differ by 10x or more: the slow groups'
            # rate is the measured cause; give every group the fastest one's
            top = max(lrs)
            now = ", ".join(f"{lr:.3g}" for lr in lrs)
            plans.append(
                _Plan(
                    remedy,
                    False,
                    prompted,
                    {"group_lr": top},
                    f"every parameter group's learning rate set to the largest, {top:g} "
                    f"(now {now})",
                    "for group in optimizer.param_groups:  # once, before training\n"
                    f"    group['lr'] = {top:g}",
                )
            )
        factors = list(LR_FACTORS[remedy])
        measured = _measured_lr_factor(base.first_update)
        if remedy == "lower_learning_rate" and measured is not None and measured < factors[-1]:
            factors[-1] = measured
        for factor in factors:
            now, new = lr_text(factor)
            plans.append(
                _Plan(
                    remedy,
                    False,
                    prompted,
                    {"lr_factor": factor},
                    f"learning rate x{factor:g} ({now} -> {new})",
                    "for group in optimizer.param_groups:  # once, before training\n"
                    f"    group['lr'] *= {factor:g}",
                )
            )
        return plans
    if remedy == "learning_rate_warmup":
        w = max(1, steps // 4)
        return [
            _Plan(
                remedy,
                False,
                prompted,
                {"warmup": w},
                f"linear learning-rate warm-up over the first {w} steps",
                "scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: "
                f"min(1.0, (s + 1) / {w}))  # scheduler.step() after each optimizer.step()",
            )
        ]
    return []


def _model_plan(model, remedy, prompted, example_inputs, seed) -> _Plan | str:
    """A transformed deep copy, or the reason the remedy does not apply."""
    import torch

    try:
        from vanishing.repair import transforms
    except ImportError as e:  # the transformations are being written alongside the engine
        return f"the model transformations are not available ({e})"
    candidate = _copy(model)
    try:
        torch.manual_seed(seed)
        applied = transforms.apply_remedy(
            candidate,
            remedy,
            example_inputs=example_inputs,
            generator=torch.Generator().manual_seed(seed),
        )
    except transforms.NotApplicable as e:
        return str(e) or f"{remedy} does not apply to this model"
    except Exception as e:  # a transformation that breaks on this model: skip it, say why
        return f"the transformation failed ({type(e).__name__}: {e})"
    return _Plan(
        remedy,
        True,
        prompted,
        {},
        getattr(applied, "description", "") or remedy,
        getattr(applied, "code", "") or "",
        list(getattr(applied, "layers", []) or []),
        candidate,
    )


def _rate_factors(cand: Candidate, probe: Probe) -> tuple[float, ...]:
    """Round two's learning-rate factors for a model change, from its own round-one probe.

    Diverged, or a first update over :data:`UPDATE_BAND`: the two powers of ten that put the
    first update just below and just above :data:`TARGET_UPDATE` (at most x0.1: lower, since
    the rate it had was too high); under the band: the same two powers (higher); inside it, when
    its loss was not higher (its gradient fix did not hurt, K steps were too few): x3 and x10.
    Otherwise none.

    Example:
        >>> from vanishing.repair.engine import Candidate, Probe, _rate_factors
        >>> slow = Probe([1.0] * 10, [], None, None, {}, False, 0.1, first_update=9.2e-8)
        >>> _rate_factors(Candidate("orthogonal_init", True, verdict="worse"), slow)
        (10000.0, 100000.0)
        >>> big = Probe([1.0, 2.0], [], None, None, {}, True, 0.1, first_update=9.2)
        >>> _rate_factors(Candidate("orthogonal_init", True, verdict="worse"), big)
        (0.0001, 0.001)
    """
    r = probe.first_update
    low, high = UPDATE_BAND
    finite = r is not None and math.isfinite(r) and r > 0
    if probe.diverged or (finite and r > high):
        if not finite:
            return (0.1, 0.01)
        m = 10.0 ** math.floor(math.log10(TARGET_UPDATE / r))
        return (m, 10 * m) if 10 * m <= 0.1 else (0.01, 0.1)
    if not finite:
        return ()
    if r < low:
        m = 10.0 ** math.floor(math.log10(TARGET_UPDATE / r))
        return (m, 10 * m)
    if cand.verdict in ("improved", "no_help"):
        return LR_FACTORS["higher_learning_rate"]
    return ()


def _rate_plans(tried, model, example_inputs, seed, lrs: list[float]) -> list[_Plan]:
    """Round two: the :data:`REFINE_PARTNERS` model changes of round one closest to a fix (not
    diverged first, then the lowest loss; each with rates from :func:`_rate_factors`), each
    a fresh transformed copy (the same seed: the same change) at each of its factors.

    ``tried``: ``(plan, candidate, probe)`` of round one.
    """
    pool = [
        (plan, c, probe)
        for plan, c, probe in tried
        if plan.changes_model and not c.error and _rate_factors(c, probe)
    ]
    pool.sort(key=lambda t: (t[1].diverged, t[1].loss_after))
    plans: list[_Plan] = []
    for plan, c, probe in pool[:REFINE_PARTNERS]:
        for factor in _rate_factors(c, probe):
            fresh = _model_plan(model, plan.remedy, plan.prompted_by, example_inputs, seed)
            if isinstance(fresh, str):  # it applied in round one: the same call applies again
                break
            now = ", ".join(f"{lr:.3g}" for lr in lrs)
            new = ", ".join(f"{lr * factor:.3g}" for lr in lrs)
            measured = "" if probe.first_update is None else f"{probe.first_update:.2g}"
            fresh.model = None  # built again when probed (_candidate_model)
            fresh.options = {"lr_factor": factor}
            fresh.description = (
                f"{fresh.description}; and learning rate x{factor:g} ({now} -> {new}; at the "
                f"old rate its first update was {measured or '?'} of the weights)"
            )
            fresh.code = (
                fresh.code.rstrip("\n")
                + "\n# and in the training loop:\n"
                + "for group in optimizer.param_groups:  # once, before training\n"
                + f"    group['lr'] *= {factor:g}\n"
            )
            plans.append(fresh)
    return plans


# ---------------------------------------------------------------------------- optimizers
#: The attribute on a copy's parameter that holds its qualified name in the user's model (see
#: :func:`_copy`): the transformations rename parameters (``0.weight`` becomes ``0.0.weight``
#: inside an inserted ``Sequential``, a residual wrapper renumbers a Sequential), so a copy's
#: names cannot say which of the user's optimizer groups a parameter belongs to; this can. Only
#: copies carry it (the user's parameters are never tagged).
_ORIGIN = "_vanishing_repair_origin"


def _copy(model):
    """``copy.deepcopy(model)``, each copied parameter remembering its name in ``model``;
    a model that cannot be deep-copied gets a one-line ValueError."""
    memo: dict[int, Any] = {}
    try:
        clone = copy.deepcopy(model, memo)
    except Exception as e:  # a lock, an open file, a C handle held by the model
        raise ValueError(
            "repair trains deep copies of the model (copy.deepcopy), and this one cannot be "
            f"copied: {type(e).__name__}: {e}"
        ) from e
    for name, p in model.named_parameters():
        q = memo.get(id(p))
        if q is not None:
            setattr(q, _ORIGIN, name)
    return clone


def _optimizer_factory(optimizer, model):
    """``f(module) -> Optimizer`` from the user's factory or an optimizer instance."""
    import torch

    if isinstance(optimizer, torch.optim.Optimizer):
        # a fresh optimizer of the same class and hyperparameters (its state is not copied);
        # each parameter keeps its group, found by its name in the user's model (a copy's
        # parameters remember it, whatever a transformation renamed them to), and new
        # parameters (an inserted norm layer) join the first group
        names = {id(p): n for n, p in model.named_parameters()}
        groups = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
        where = {
            names[id(p)]: i
            for i, g in enumerate(optimizer.param_groups)
            for p in g["params"]
            if id(p) in names
        }
        cls = type(optimizer)

        def make(module):
            buckets: list[list] = [[] for _ in groups]
            for n, p in module.named_parameters():
                if p.requires_grad:
                    buckets[where.get(getattr(p, _ORIGIN, n), 0)].append(p)
            spec = [dict(g, params=b) for g, b in zip(groups, buckets) if b]
            return cls(spec)

        return make
    if not callable(optimizer):
        raise ValueError(
            "optimizer must be a function of the parameters returning an optimizer "
            "(e.g. lambda p: torch.optim.SGD(p, lr=0.1)) or an optimizer instance, "
            f"got {type(optimizer).__name__}"
        )

    def make_from(module):
        opt = optimizer(module.parameters())
        if not isinstance(opt, torch.optim.Optimizer):
            raise ValueError(
                f"optimizer(params) must return a torch.optim.Optimizer, got {type(opt).__name__}"
            )
        return opt

    return make_from


# ---------------------------------------------------------------------------- progress
@contextlib.contextmanager
def _progress(progress, total: int):
    """``advance(label)`` per step: a rich bar, the user's callable, or nothing."""
    if callable(progress):
        done = [0]

        def advance(label):
            done[0] += 1
            progress(label, done[0], total)

        yield advance
        return
    if not progress:
        yield lambda label: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    with Progress(
        TextColumn("repair: {task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        transient=True,
    ) as bar:
        task = bar.add_task("baseline", total=total)

        def advance(label):
            bar.update(task, advance=1, description=label)

        yield advance


# ---------------------------------------------------------------------------- repair()
_WORKER_JOB: dict[str, Any] = {}


def repair(
    model,
    batches,
    loss_fn,
    *,
    optimizer=None,
    steps: int = 200,
    diagnosis=None,
    seed: int = 0,
    progress: bool | Callable[[str, int, int], None] = True,
    max_candidates: int = MAX_CANDIDATES,
    workers: int = 0,
    run_dir: str | os.PathLike | None = None,
    margin: float = MARGIN,
    every: int | None = None,
    refine: bool = True,
) -> Repair:
    """Try the diagnosis' remedies on copies of ``model`` and say which one is measured to fix it.

    ``batches``: ``(inputs, targets)`` pairs, cycled for ``steps`` (K) steps, the same for the
    baseline and every candidate (an iterator is read once, up to K batches); inputs that are a
    mapping (a Hugging Face batch) are passed as keyword arguments, ``model(**inputs)``.
    ``loss_fn(outputs, targets)`` returns a scalar. ``optimizer``: a function of the parameters
    returning an optimizer (default SGD, lr 0.1) or an optimizer instance (a fresh one of its
    class and hyperparameters is made for each copy). ``diagnosis``: the diagnosis to repair
    (default: the baseline's own, after its K steps). ``seed``: ``torch.manual_seed`` before
    each copy is changed and trained (the global RNG is restored afterwards). ``progress``: a
    progress bar (rich), False for none, or ``f(label, done, total)`` called per step.
    ``workers`` > 1: candidates in that many forked worker processes (the inputs need not
    pickle; the results do); 0 or 1: in this process, one after the other. ``run_dir``: keep
    each run's records in ``run_dir/<baseline|NN-remedy>`` (default: a temporary directory,
    removed after). ``margin``: the fraction by which a loss must be lower (see
    :func:`verdict`). ``every``: the monitor records every ``every``-th step of each run
    (default ``max(1, steps // RECORDED_STEPS)``: about 25 recorded steps a run, the regime the
    diagnosis is validated in, at a fraction of the cost of recording every step).

    The model is never changed (nor its ``.grad``): everything trains on deep copies. Cost:
    (N + 1) x K training steps for N candidates, plus one diagnosis each. A healthy baseline
    (or a healthy ``diagnosis``: then nothing is trained) gives ``healthy=True`` and no
    candidates.

    Example:
        >>> import torch, vanishing
        >>> from vanishing.repair import repair
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <...>
        >>> net = torch.nn.Sequential(*[m for _ in range(10) for m in (torch.nn.Linear(32, 32),
        ...                             torch.nn.Sigmoid())], torch.nn.Linear(32, 4))
        >>> x = torch.randn(256, 32); y = (x[:, :4]).argmax(1)
        >>> rep = repair(net, [(x, y)], torch.nn.functional.cross_entropy, steps=100,
        ...              progress=False)  # doctest: +SKIP
        >>> rep.best.verdict, rep.best.changes_model  # doctest: +SKIP
        ('fixed', True)
    """
    import torch

    from vanishing.diagnose.findings import Diagnosis

    if not isinstance(model, torch.nn.Module):
        raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    if not callable(loss_fn):
        raise ValueError(f"loss_fn must be callable as loss_fn(outputs, targets), got {loss_fn!r}")
    if not isinstance(seed, numbers.Integral) or isinstance(seed, bool):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    if (
        not isinstance(max_candidates, int)
        or isinstance(max_candidates, bool)
        or max_candidates < 0
    ):
        raise ValueError(f"max_candidates must be a non-negative integer, got {max_candidates!r}")
    if not isinstance(workers, int) or isinstance(workers, bool) or workers < 0:
        raise ValueError(f"workers must be a non-negative integer, got {workers!r}")
    if not (isinstance(margin, (int, float)) and 0 <= margin < 1):
        raise ValueError(f"margin must be a fraction in [0, 1), got {margin!r}")
    if every is None:
        every = max(1, steps // RECORDED_STEPS)
    if not isinstance(every, int) or isinstance(every, bool) or every < 1:
        raise ValueError(f"every must be a positive integer, got {every!r}")
    from vanishing.monitor.monitor import _WATCHED_ATTR

    if getattr(model, _WATCHED_ATTR, None) is not None:
        raise ValueError("this model is being watched by a monitor; close() it before repair()")
    if optimizer is None:

        def optimizer(params):
            return torch.optim.SGD(params, lr=0.1)

    make_optimizer = _optimizer_factory(optimizer, model)
    if isinstance(batches, Sequence):
        batches = list(batches)
    else:
        import itertools

        batches = list(itertools.islice(iter(batches), steps))
    if not batches:
        raise ValueError("batches is empty; pass at least one (inputs, targets) pair")
    for i, batch in enumerate(batches):
        if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
            what = (
                f"a {len(batch)}-tuple"
                if isinstance(batch, (tuple, list))
                else type(batch).__name__
            )
            raise ValueError(f"each batch must be an (inputs, targets) pair; batch {i} is {what}")
    example_inputs = batches[0][0]
    if diagnosis is not None and not isinstance(diagnosis, Diagnosis):
        raise ValueError(
            "diagnosis must be a vanishing Diagnosis (e.g. mon.diagnose()) or None, "
            f"got {type(diagnosis).__name__}"
        )
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError(
            "the model has no trainable parameters (requires_grad=True): nothing to repair"
        )

    started = time.perf_counter()
    root = Path(run_dir) if run_dir is not None else Path(tempfile.mkdtemp(prefix="repair-"))
    rep = Repair(
        healthy=False,
        steps=steps,
        seed=seed,
        margin=margin,
        every=every,
        _example_inputs=example_inputs,
    )
    rep.run_dir = str(root) if run_dir is not None else None
    if diagnosis is not None and diagnosis.healthy:
        rep.healthy, rep.diagnosis = True, diagnosis
        return rep
    try:
        with torch.random.fork_rng(devices=_devices(model)):
            _run(
                rep,
                model,
                batches,
                loss_fn,
                make_optimizer,
                diagnosis,
                root,
                progress,
                max_candidates,
                workers,
                example_inputs,
                refine,
            )
    finally:
        if run_dir is None:
            shutil.rmtree(root, ignore_errors=True)
    rep.seconds = time.perf_counter() - started
    return rep


def _devices(model) -> list:
    devices = {p.device for p in model.parameters() if p.device.type == "cuda"}
    return sorted(d.index or 0 for d in devices)


def _run(
    rep,
    model,
    batches,
    loss_fn,
    make_optimizer,
    diagnosis,
    root,
    progress,
    max_candidates,
    workers,
    example_inputs,
    refine=True,
) -> None:
    import torch

    steps, seed = rep.steps, rep.seed
    with _progress(progress, steps * (max_candidates + 1)) as advance:
        torch.manual_seed(seed)
        base = _train(
            _copy(model),  # not kept: freed (with its gradients) before the candidates train
            batches,
            loss_fn,
            make_optimizer,
            steps,
            root / "baseline",
            every=rep.every,
            record_norms=True,
            tick=lambda: advance("baseline"),
        )
        rep.baseline_seconds = base.seconds
        rep.loss_before, rep.ratio_before = base.loss, base.ratio
        rep.profile_before = base.profile
        rep.baseline_findings = list(base.diagnosis.findings)
        rep.diagnosis = diagnosis if diagnosis is not None else base.diagnosis
        if rep.diagnosis.healthy:
            rep.healthy = True
            return
        # one scratch copy for the rates and the trace: tracing runs the forward, and a
        # stateful one (a cache, a step counter) must not see it on the user's model
        scratch = _copy(model)
        lrs = [g["lr"] for g in make_optimizer(scratch).param_groups]
        plans: list[_Plan] = []
        saturating = _saturating_hidden(scratch, example_inputs)
        del scratch
        for remedy, prompted in _remedy_order(rep.diagnosis, saturating):
            if len(plans) >= max_candidates:
                break
            if remedy in RECIPE_REMEDIES:
                found = _recipe_plans(remedy, prompted, base, steps, lrs)
                if not found:
                    rep.skipped.append((remedy, "no finite gradient norm to set a threshold from"))
                plans.extend(found[: max_candidates - len(plans)])
                continue
            plan = _model_plan(model, remedy, prompted, example_inputs, seed)
            if isinstance(plan, str):
                rep.skipped.append((remedy, plan))
            else:
                plan.model = None  # built again when probed (_candidate_model): one at a time
                plans.append(plan)
        job = dict(
            batches=batches,
            loss_fn=loss_fn,
            make_optimizer=make_optimizer,
            model=model,
            steps=steps,
            seed=seed,
            example_inputs=example_inputs,
            root=root,
            base=base,
            every=rep.every,
            # a candidate whose loss ends above this is worse (see verdict): not diagnosed
            worse_above=(
                base.loss + rep.margin * abs(base.loss) if math.isfinite(base.loss) else None
            ),
        )
        results = _probe_all(job, plans, workers, advance, first_index=0)
        judged = [_judge(rep, base, plan, probe) for plan, probe in zip(plans, results)]
        if refine and not any(c.verdict == "fixed" for c, _ in judged):
            # round two: no single remedy fixed it within K steps; the closest model changes
            # again, each at the learning rates its own first update calls for
            second = _rate_plans(
                [(plan, c, probe) for plan, (c, probe) in zip(plans, judged)],
                model,
                example_inputs,
                seed,
                lrs,
            )
            if second:
                results = _probe_all(job, second, workers, advance, first_index=len(plans))
                judged += [_judge(rep, base, plan, probe) for plan, probe in zip(second, results)]
    rep.candidates = [c for c, _ in judged]
    rank = {v: i for i, v in enumerate(VERDICTS)}
    rep.candidates.sort(
        key=lambda c: (rank[c.verdict], c.loss_after if math.isfinite(c.loss_after) else math.inf)
    )


def _probe_all(job, plans, workers, advance, first_index: int) -> list[Probe]:
    """Probe ``plans`` in order (or in ``workers`` forked processes); one Probe each."""
    if workers > 1 and len(plans) > 1:
        return _in_workers(job, plans, workers, advance, first_index)
    return [_probe(job, first_index + i, plan, advance) for i, plan in enumerate(plans)]


def _judge(rep, base: Probe, plan: _Plan, probe: Probe) -> tuple[Candidate, Probe]:
    """The candidate of one probed plan, with its verdict against the baseline."""
    critical_before = {f.kind for f in base.diagnosis.findings if f.severity == "critical"}
    cand = Candidate(
        plan.remedy,
        plan.changes_model,
        description=plan.description,
        code=plan.code,
        options=dict(plan.options),
        prompted_by=list(plan.prompted_by),
        layers=plan.layers,
        loss_before=base.loss,
        loss_after=probe.loss,
        ratio_before=base.ratio,
        ratio_after=probe.ratio,
        profile_before=base.profile,
        profile_after=probe.profile,
        findings_after=list(probe.diagnosis.findings),
        diverged=probe.diverged,
        error=probe.error,
        steps_run=len(probe.losses),
        seconds=probe.seconds,
        first_update=probe.first_update,
        diagnosed=probe.diagnosed,
    )
    cand.verdict, cand.why = verdict(
        loss_before=base.loss,
        loss_after=probe.loss,
        ratio_before=base.ratio,
        ratio_after=probe.ratio,
        prompted_by=plan.prompted_by,
        kinds_after=cand.kinds_after,
        critical_before=critical_before,
        critical_after={f.kind for f in probe.diagnosis.findings if f.severity == "critical"},
        diverged=probe.diverged,
        margin=rep.margin,
    )
    if probe.error:
        cand.why = f"training failed: {probe.error}"
    return cand, probe


def _probe(job, index: int, plan: _Plan, advance) -> Probe:
    """Train one candidate: the same batches, the same seed, K steps."""
    import torch

    label = f"{plan.remedy} {plan.options.get('lr_factor', '')}".strip()
    try:
        model = _candidate_model(job, plan)
        torch.manual_seed(job["seed"])
        return _run_probe(job, index, plan, model, advance, label)
    except Exception as e:  # the changed model does not train (its output no longer fits
        # loss_fn, ...): the candidate is worse, with the reason; the others still run
        from vanishing.diagnose.findings import Diagnosis

        # not "diverged": it never trained (its loss is inf, its verdict worse, its why the error)
        error = f"{type(e).__name__}: {e}"
        return Probe([], [], Diagnosis([]), None, {}, False, 0.0, None, error, diagnosed=False)


def _candidate_model(job, plan: _Plan):
    """The copy a plan trains: built now, not when it was planned, so that one candidate's
    copy is alive at a time (a large model, N candidates: not N copies at once). The same
    transformation from the same seed as when planned (:func:`_model_plan`), so the same model."""
    if not plan.changes_model:
        return _copy(job["model"])
    built = _model_plan(
        job["model"], plan.remedy, plan.prompted_by, job["example_inputs"], job["seed"]
    )
    if isinstance(built, str):  # it applied when planned: the same call applies again
        raise RuntimeError(f"{plan.remedy} no longer applies: {built}")
    return built.model


def _run_probe(job, index, plan, model, advance, label) -> Probe:
    return _train(
        model,
        job["batches"],
        job["loss_fn"],
        job["make_optimizer"],
        job["steps"],
        job["root"] / f"{index:02d}-{plan.remedy}",
        lr_factor=plan.options.get("lr_factor", 1.0),
        group_lr=plan.options.get("group_lr"),
        clip=plan.options.get("clip"),
        warmup=plan.options.get("warmup", 0),
        every=job["every"],
        tick=lambda: advance(label),
        judged=True,
        worse_above=job["worse_above"],
    )


def _worker(index: int) -> Probe:
    import torch

    torch.set_num_threads(1)  # one process per core: each runs its own steps
    job = _WORKER_JOB["job"]
    first = _WORKER_JOB["first_index"]
    return _probe(job, first + index, _WORKER_JOB["plans"][index], lambda label: None)


def _in_workers(job, plans, workers, advance, first_index: int = 0) -> list[Probe]:
    """Candidates in forked processes: the job is inherited, only the results are pickled."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    _WORKER_JOB.update(job=job, plans=plans, first_index=first_index)
    results: list[Probe | None] = [None] * len(plans)
    try:
        ctx = multiprocessing.get_context("fork")
        with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
            futures = {pool.submit(_worker, i): i for i in range(len(plans))}
            # the bar moves by a candidate's K steps as each one finishes (the workers' steps
            # are not reported one by one)
            for future in as_completed(futures):
                i = futures[future]
                results[i] = future.result()
                for _ in range(job["steps"]):
                    advance(f"{plans[i].remedy} (workers)")
    finally:
        _WORKER_JOB.clear()
    return results
