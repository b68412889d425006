"""Train one experiment from its config into a run directory, under ``vanishing.watch``.

``run_experiment(config, run_dir)`` is the whole job of ``vanishing run`` and of each run of a
sweep: seed, build the task and the model, optionally pretrain layer by layer, train with the
configured optimizer, schedule and clipping in the package's one training loop
(:func:`vanishing.experiments.train.train`) while the monitor records every layer, evaluate on
the train and test splits, and write ``config.json``, ``eval.parquet`` and ``summary.json``
beside the monitor's records, through the run directory's sink (see ``docs/config.md``). A run whose loss becomes NaN or infinite
stops there with status ``"diverged"``; an exception ends it with status ``"failed"`` and the
error in the summary. Neither is raised to the caller.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vanishing.experiments.config import ConfigError, ExperimentConfig, parse_config

if TYPE_CHECKING:
    import torch

    from vanishing.monitor import Monitor

__all__ = ["run_experiment", "resolve_device", "SUMMARY", "EVAL", "CONFIG"]

CONFIG = "config.json"
SUMMARY = "summary.json"
EVAL = "eval.parquet"
EVAL_CHUNK = 8192  # examples per forward pass when evaluating a split

Progress = Callable[[int, float, "Monitor"], None]


def resolve_device(name: str) -> str:
    """The torch device a config's ``train.device`` means here; ``cuda`` must be available.

    Example:
        >>> from vanishing.experiments.runner import resolve_device
        >>> resolve_device("cpu")
        'cpu'
    """
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device: 'cuda' is not available on this machine; use cpu or auto")
    return name


def run_experiment(
    config: ExperimentConfig | dict[str, Any],
    run_dir: str | os.PathLike,
    *,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Train one experiment into ``run_dir`` (which must not hold a run) and return its summary.

    ``progress(step, loss, monitor)``, if given, is called after every optimizer step (a live
    display reads ``monitor.latest(...)`` at its own rate). The summary is the object written to
    ``summary.json``: status (``completed``, ``diverged`` or ``failed``), steps done, last
    training loss, test loss and metric, the first/last hidden-layer speed-of-learning ratio
    (:func:`vanishing.recorder.semantics.first_last_ratio`), the diagnosis kinds, seconds and
    the error.

    Example:
        >>> import tempfile
        >>> from vanishing.experiments.runner import run_experiment
        >>> cfg = {"model": {"depth": 6, "width": 16, "init": "glorot_standard"},
        ...        "train": {"steps": 30, "eval_every": 10}}
        >>> s = run_experiment(cfg, tempfile.mkdtemp() + "/run")
        >>> s["status"], s["steps"], "vanishing_gradient" in s["kinds"], s["first_last_ratio"] < 0.1
        ('completed', 30, True, True)
    """
    if not isinstance(config, ExperimentConfig):
        config = parse_config(config)
    run_dir = Path(run_dir)
    if (run_dir / SUMMARY).exists() or (run_dir / "manifest.json").exists():
        raise FileExistsError(
            f"{run_dir} already holds a run; pass a new run directory so nothing is overwritten"
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    from vanishing.sinks import ParquetSink

    # the run directory's files go through its sink: this one until the monitor exists (so a
    # run that fails before training still leaves its config and summary), then the monitor's
    ParquetSink(run_dir).write_json(CONFIG, config.to_dict())

    started = time.perf_counter()
    state = _State()
    try:
        _train(config, run_dir, state, progress)
    except Exception as e:  # noqa: BLE001 - a failed run is recorded, never raised
        state.status = "failed"
        state.error = f"{type(e).__name__}: {e}".splitlines()[0]
    directory = state.monitor.directory if state.monitor is not None else ParquetSink(run_dir)
    directory.write_bytes(EVAL, _eval_bytes(state.evals))
    summary = _summarize(run_dir, state, time.perf_counter() - started)
    directory.write_json(SUMMARY, summary)
    return summary


class _State:
    """What the training loop has done so far; survives an exception."""

    def __init__(self) -> None:
        self.status = "completed"
        self.steps = 0
        self.last_loss: float | None = None
        self.error: str | None = None
        self.metric_name = ""
        self.evals: list[dict[str, Any]] = []
        self.monitor: Monitor | None = None  # once training has started


def build_task_and_model(config: ExperimentConfig) -> tuple[Any, torch.nn.Module, str]:
    """An experiment's task, its model (on the config's device) and that device, seeded as
    ``vanishing run`` seeds them: the data and the model's initial weights depend on the seed
    only. ``vanishing fix`` builds from here too, so its probes start where a run starts.

    Example:
        >>> from vanishing.experiments.config import ExperimentConfig
        >>> from vanishing.experiments.runner import build_task_and_model
        >>> cfg = ExperimentConfig.model_validate({"model": {"depth": 2, "width": 4}})
        >>> task, model, device = build_task_and_model(cfg)
        >>> device, type(model).__name__
        ('cpu', 'Sequential')
    """
    import torch

    from vanishing.experiments.models import build_model
    from vanishing.experiments.tasks import make_task

    tc = config.task
    device = resolve_device(config.train.device)
    torch.manual_seed(config.seed)
    task = make_task(
        tc.name,
        seed=config.seed,
        n_train=tc.n_train,
        n_test=tc.n_test,
        seq_len=tc.seq_len,
        standardize=tc.standardize,
        data_dir=tc.data_dir,
        teacher_depth=tc.teacher_depth,
        n_classes=tc.n_classes,
        n_features=tc.n_features,
    )
    torch.manual_seed(config.seed)  # the model's initial weights depend on the seed only
    model = build_model(task, **config.model.model_dump()).to(device)
    return task, model, device


def _train(config: ExperimentConfig, run_dir: Path, state: _State, progress: Progress | None):
    import torch

    from vanishing.experiments.train import minibatches
    from vanishing.experiments.train import train as train_loop

    train = config.train
    task, model, device = build_task_and_model(config)
    state.metric_name = task.metric_name
    x, y = task.x_train.to(device), task.y_train.to(device)
    xt, yt = task.x_test.to(device), task.y_test.to(device)

    if train.pretrain_steps:
        from vanishing.experiments.pretrain import layerwise_pretrain

        layerwise_pretrain(
            model,
            x,
            steps=train.pretrain_steps,
            lr=_representable(train.pretrain_lr, list(model.parameters())),
            batch_size=train.batch_size,
            seed=config.seed,
        )

    opt = _optimizer(model, config)
    batches = minibatches(
        x, y, batch_size=train.batch_size, generator=torch.Generator().manual_seed(config.seed)
    )

    def evaluate(step: int) -> None:
        for split, xs, ys in (("train", x, y), ("test", xt, yt)):
            loss, metric = _evaluate(model, task, xs, ys)
            state.evals.append(
                {
                    "step": step,
                    "split": split,
                    "loss": loss,
                    "metric": metric,
                    "metric_name": task.metric_name,
                }
            )

    def on_step(step: int, loss: float, monitor: Monitor) -> None:
        state.monitor, state.steps, state.last_loss = monitor, step + 1, loss
        if progress is not None:
            progress(step, loss, monitor)

    mc = config.monitor
    watch = {
        "run_dir": run_dir,
        "stats": mc.stats,
        "every": mc.every,
        "flush_every": mc.flush_every,
    }
    if mc.sinks:
        from vanishing.sinks import by_name

        watch["sinks"] = [by_name(name, run_dir) for name in mc.sinks]
    log = train_loop(
        model,
        batches,
        task.loss,
        opt,
        steps=train.steps,
        watch=watch,
        clip_norm=train.clip_norm,
        schedule=_schedule(opt, config),
        evaluate=evaluate,
        eval_every=train.eval_every,
        on_step=on_step,
    )
    if log.diverged:
        state.status = "diverged"


def _optimizer(model: torch.nn.Module, config: ExperimentConfig) -> torch.optim.Optimizer:
    import torch

    t = config.train
    params = list(model.parameters())
    lr, wd = _representable(t.lr, params), _representable(t.weight_decay, params)
    if t.optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, weight_decay=wd)
    if t.optimizer == "momentum":
        return torch.optim.SGD(params, lr=lr, momentum=t.momentum, weight_decay=wd)
    if t.optimizer == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=wd)
    return torch.optim.AdamW(params, lr=lr, weight_decay=wd)


def _representable(value: float, params: list[torch.Tensor]) -> float:
    """``value`` as the parameters' dtype holds it: beyond its range (3.4e38 for float32) it
    is infinite, as a float32 cast makes it.

    torch refuses to scale a float32 update by a finite number beyond the dtype's range
    ("value cannot be converted to type float without overflow"), which would end a run with
    ``lr = 1e308`` as ``failed``. As infinity, that run does what such a learning rate does:
    its first update makes the weights non-finite, and it stops as ``diverged`` with the
    non-finite step recorded.
    """
    import torch

    floats = [p.dtype for p in params if p.dtype.is_floating_point]
    if floats and value > min(torch.finfo(d).max for d in floats):
        return math.inf
    return value


def _schedule(opt: torch.optim.Optimizer, config: ExperimentConfig) -> Any:
    import torch

    t = config.train
    if t.lr_schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=t.steps)
    if t.lr_schedule == "step":
        every = t.lr_step or max(1, t.steps // 3)
        return torch.optim.lr_scheduler.StepLR(opt, step_size=every, gamma=t.lr_gamma)
    return None


def _evaluate(model, task, x, y) -> tuple[float, float]:
    """Loss and metric over a whole split, in eval mode, in chunks (example-weighted means)."""
    import torch

    was_training = model.training
    model.eval()
    total_loss = total_metric = 0.0
    try:
        with torch.no_grad():
            for start in range(0, len(x), EVAL_CHUNK):
                xb, yb = x[start : start + EVAL_CHUNK], y[start : start + EVAL_CHUNK]
                out = model(xb)
                n = len(xb)
                total_loss += float(task.loss(out, yb)) * n  # host sync: evaluation result
                total_metric += float(task.metric(out, yb)) * n
    finally:
        model.train(was_training)
    n = max(1, len(x))
    return total_loss / n, total_metric / n


def _eval_bytes(rows: list[dict[str, Any]]) -> bytes:
    """``eval.parquet``'s content: one row per evaluation and split."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema(
        [
            ("step", pa.int64()),
            ("split", pa.string()),
            ("loss", pa.float64()),
            ("metric", pa.float64()),
            ("metric_name", pa.string()),
        ]
    )
    sink = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), sink)
    return sink.getvalue().to_pybytes()


def _finite(value: float | None) -> float | None:
    return float(value) if value is not None and math.isfinite(value) else None


def _summarize(run_dir: Path, state: _State, seconds: float) -> dict[str, Any]:
    test = [r for r in state.evals if r["split"] == "test"]
    last_test = test[-1] if test else None
    test_loss = _finite(last_test["loss"]) if last_test else None
    # kinds stay None (not judged, not "healthy") for a run that recorded no steps
    ratio, kinds = None, None
    if (run_dir / "manifest.json").exists():
        from vanishing.recorder.reader import load_run

        try:
            run = load_run(run_dir)
            ratio = run.first_last_ratio()
            if not run.steps.empty:
                kinds = list(run.diagnose().kinds)
        except Exception as e:  # noqa: BLE001 - a summary is written whatever the records hold
            if state.error is None:
                state.error = f"reading the records failed: {type(e).__name__}: {e}"
    return {
        "status": state.status,
        "steps": state.steps,
        "train_loss": _finite(state.last_loss),
        "test_loss": test_loss,
        "test_metric": _finite(last_test["metric"]) if test_loss is not None else None,
        "metric_name": state.metric_name,
        "first_last_ratio": ratio,
        "kinds": kinds,
        "seconds": round(seconds, 3),
        "error": state.error,
    }
