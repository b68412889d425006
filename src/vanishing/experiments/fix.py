"""``vanishing fix CONFIG``: repair an experiment and write the fixed config.

The experiment's model, data, loss and optimizer are built as ``vanishing run`` builds them;
:func:`vanishing.repair` tries the diagnosis' remedies on copies for K steps on the same
batches; the best candidate that a config field can express becomes ``fixed.toml`` (the
original config with those fields changed), beside a before/after report (the baseline's probe
run and the fixed one's, side by side). The config change is then checked on its own: the
fixed config is built and probed for the same K steps, and its loss and findings are reported.

Example:
    >>> from vanishing.experiments.fix import config_changes
    >>> config_changes("relu", {}, {"model": {"activation": "sigmoid"}})
    {'model.activation': 'relu', 'model.init': 'he_normal'}
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["FixResult", "config_changes", "fix_experiment", "to_toml"]

#: the init each activation swap brings (as vanishing.repair.transforms re-initialises)
_SWAP_INIT = {
    "relu": "he_normal",
    "leaky_relu": "he_normal",
    "gelu": "he_normal",
    "prelu": "he_normal",
    "elu": "xavier_normal",
    "selu": "lecun_normal",
}
_INIT = {
    "he_init": "he_normal",
    "xavier_init": "xavier_normal",
    "lecun_init": "lecun_normal",
    "orthogonal_init": "orthogonal",
}


def config_changes(remedy: str, options: dict[str, Any], config: dict[str, Any]) -> dict | None:
    """The config fields (dotted names) that express ``remedy`` with the probe's ``options``
    (``lr_factor``, ``clip``), or None when no config field can (``learning_rate_warmup``,
    ``zero_init_residual``...). A model change probed at another learning rate (repair's round
    two: a model remedy with ``lr_factor``) sets both.

    Example:
        >>> from vanishing.experiments.fix import config_changes
        >>> config_changes("gradient_clipping", {"clip": 1.5}, {})
        {'train.clip_norm': 1.5}
        >>> config_changes("learning_rate_warmup", {}, {}) is None
        True
        >>> config_changes("lstm", {"lr_factor": 10.0}, {"train": {"lr": 0.01}})
        {'model.cell': 'lstm', 'train.lr': 0.1}
    """
    train = config.get("train", {})
    factor = options.get("lr_factor")
    if remedy in ("lower_learning_rate", "higher_learning_rate"):
        return {"train.lr": float(train.get("lr", 0.1)) * float(factor)} if factor else None
    changes = _remedy_changes(remedy, options, config)
    if changes is not None and factor:
        changes["train.lr"] = float(train.get("lr", 0.1)) * float(factor)
    return changes


def _remedy_changes(remedy: str, options: dict[str, Any], config: dict[str, Any]) -> dict | None:
    model = config.get("model", {})
    if remedy in _SWAP_INIT:
        return {"model.activation": remedy, "model.init": _SWAP_INIT[remedy]}
    if remedy in _INIT:
        changes = {"model.init": _INIT[remedy]}
        if remedy == "orthogonal_init" and model.get("kind") == "rnn":
            changes["model.recurrent_init"] = "orthogonal"
        return changes
    if remedy in ("batch_norm", "layer_norm"):
        return {"model.norm": "batch" if remedy == "batch_norm" else "layer"}
    if remedy == "residual":
        return {"model.residual": True}
    if remedy in ("lstm", "gru"):
        return {"model.cell": remedy}
    if remedy == "forget_gate_bias":
        return {"model.forget_bias": float(options.get("value", 1.0))}
    if remedy == "pre_layer_norm":
        return {"model.norm_first": True}
    if remedy == "gradient_clipping" and options.get("clip"):
        return {"train.clip_norm": float(options["clip"])}
    return None


def _set(config: dict[str, Any], dotted: str, value: Any) -> None:
    section, _, name = dotted.partition(".")
    config.setdefault(section, {})[name] = value


def to_toml(config: dict[str, Any]) -> str:
    """A resolved config dict as TOML (top-level scalars, then one table per section; None
    values left out, as TOML has no null).

    Example:
        >>> from vanishing.experiments.fix import to_toml
        >>> print(to_toml({"name": "x", "seed": 0, "model": {"depth": 3, "residual": True}}))
        name = "x"
        seed = 0
        <BLANKLINE>
        [model]
        depth = 3
        residual = true
        <BLANKLINE>
    """

    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            if isinstance(v, float) and not math.isfinite(v):
                raise ValueError(f"a config value {v!r} cannot be written to TOML")
            return repr(v)
        if isinstance(v, str):
            return json.dumps(v)  # a TOML basic string: the same escapes
        if isinstance(v, (list, tuple)):
            return "[" + ", ".join(value(x) for x in v) + "]"
        raise ValueError(f"a config value {v!r} cannot be written to TOML")

    lines = [
        f"{k} = {value(v)}" for k, v in config.items() if v is not None and not isinstance(v, dict)
    ]
    for section, table in config.items():
        if isinstance(table, dict):
            lines += ["", f"[{section}]"]
            lines += [f"{k} = {value(v)}" for k, v in table.items() if v is not None]
    return "\n".join(lines) + "\n"


@dataclass
class FixResult:
    """What :func:`fix_experiment` did: the repair, the chosen candidate and config changes,
    the fixed config's own check, and the files written.

    Example:
        >>> from vanishing.experiments.fix import FixResult
        >>> FixResult(repair=None).fixed
        False
    """

    repair: Any
    chosen: Any = None
    changes: dict[str, Any] = field(default_factory=dict)
    check_loss: float | None = None
    check_kinds: list[str] = field(default_factory=list)
    fixed_config: Path | None = None
    report: Path | None = None
    out: Path | None = None
    unexpressed: list[str] = field(default_factory=list)

    @property
    def fixed(self) -> bool:
        """True when a candidate a config can express was found and written."""
        return self.fixed_config is not None


def _build(config: Any, steps: int):
    """Task, model, optimizer and K batches exactly as ``vanishing run`` builds them."""
    import itertools

    import torch

    from vanishing.experiments.runner import _optimizer, build_task_and_model
    from vanishing.experiments.train import minibatches

    task, model, device = build_task_and_model(config)
    x, y = task.x_train.to(device), task.y_train.to(device)
    train = config.train
    batches = list(
        itertools.islice(
            minibatches(
                x,
                y,
                batch_size=train.batch_size,
                generator=torch.Generator().manual_seed(config.seed),
            ),
            steps,
        )
    )
    return task, model, _optimizer(model, config), batches


def fix_experiment(
    config_path: str | os.PathLike,
    out: str | os.PathLike,
    *,
    steps: int = 200,
    progress: bool = True,
) -> FixResult:
    """Repair the experiment of ``config_path``: K = ``steps`` steps per candidate (at most the
    config's own steps). Writes into ``out`` (which must not hold files): ``probes/`` (the
    runs of the baseline and every candidate), ``repair.json`` and ``repair.html`` (every
    candidate, before/after profiles), and when a candidate a config
    field can express fixed the baseline, ``fixed.toml``, ``check/`` (the fixed config's own
    K-step probe) and ``report.html`` (before beside after). Raises ``ValueError`` on bad
    input (``vanishing.experiments.config.ConfigError`` for the config).

    Example:
        >>> r = fix_experiment("configs/deep_sigmoid.toml", "fix-out")   # doctest: +SKIP
        >>> r.chosen.remedy, r.changes                                   # doctest: +SKIP
        ('elu', {'model.activation': 'elu', 'model.init': 'xavier_normal'})
    """
    import torch

    import vanishing
    from vanishing.experiments.config import ExperimentConfig, load_config, read_toml
    from vanishing.sinks import ParquetSink

    config = load_config(config_path)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"{out} already exists and is not an empty directory; pick a new --out")
    k = min(steps, config.train.steps)
    task, model, optimizer, batches = _build(config, k)
    rep = vanishing.repair(
        model,
        batches,
        task.loss,
        optimizer=optimizer,
        steps=k,
        seed=config.seed,
        progress=progress,
        run_dir=out / "probes",
    )
    result = FixResult(repair=rep, out=out)
    ParquetSink(out).write_json("repair.json", rep.to_dict())
    rep.report(out / "repair.html")
    raw = read_toml(config_path)
    resolved = config.to_dict()
    for c in rep.candidates:
        if c.verdict != "fixed":
            continue
        changes = config_changes(c.remedy, c.options, resolved)
        if changes is None:
            result.unexpressed.append(c.remedy)
            continue
        result.chosen, result.changes = c, changes
        break
    if result.chosen is None:
        return result
    fixed = json.loads(json.dumps(resolved))
    for dotted, value in result.changes.items():
        _set(fixed, dotted, value)
    fixed.setdefault("name", raw.get("name"))
    fixed_config = ExperimentConfig.model_validate(fixed)  # the fix is a valid config
    (out / "fixed.toml").write_text(
        f"# vanishing fix {Path(config_path).name}: {result.chosen.label} "
        f"({', '.join(f'{k} = {v!r}' for k, v in result.changes.items())}), measured over "
        f"{k} steps: loss {rep.loss_before:.4g} -> {result.chosen.loss_after:.4g}\n"
        + to_toml(fixed_config.to_dict())
    )
    result.fixed_config = out / "fixed.toml"
    # the config change on its own: built from the fixed config, probed the same way
    _, fixed_model, fixed_opt, fixed_batches = _build(fixed_config, k)
    check = out / "check"
    mon = vanishing.watch(fixed_model, optimizer=fixed_opt, run_dir=check)
    try:
        for xb, yb in fixed_batches:
            fixed_opt.zero_grad()
            loss = task.loss(fixed_model(xb), yb)
            loss.backward()
            if fixed_config.train.clip_norm:
                torch.nn.utils.clip_grad_norm_(
                    fixed_model.parameters(), fixed_config.train.clip_norm
                )
            fixed_opt.step()
    finally:
        mon.close()
    run = vanishing.load_run(check)
    losses = run.steps["loss"].tolist()
    tail = losses[-max(1, len(losses) // 10) :]
    result.check_loss = float(sum(tail) / len(tail))
    result.check_kinds = run.diagnose().kinds
    from vanishing.report.html import render_compare, write_page

    before = out / "probes" / "baseline"
    page = render_compare(
        [before, check], labels=[f"before: {Path(config_path).name}", "after: fixed.toml"]
    )
    result.report = write_page(out / "report.html", page)
    return result
