"""Experiment configs: TOML files validated with pydantic, and the grid a sweep expands to.

A config has four sections (``task``, ``model``, ``train``, ``monitor``) and two top-level
fields (``name``, ``seed``); every field is a scalar, so that in a sweep config a list means
"sweep over these values" (see ``docs/config.md``). Validation errors are one line that names
the dotted field and what it accepts::

    model.activation: 'sigmod' is not one of sigmoid, tanh, softsign, relu, ...

This module imports no torch: a config can be checked without the training stack.
"""

from __future__ import annotations

import difflib
import hashlib
import itertools
import json
import os
import sys
import typing
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError

from vanishing import activations as _registry

__all__ = [
    "ConfigError",
    "TaskConfig",
    "ModelConfig",
    "TrainConfig",
    "MonitorConfig",
    "ExperimentConfig",
    "read_toml",
    "load_config",
    "parse_config",
    "apply_overrides",
    "expand_sweep",
    "config_key",
    "SECTIONS",
]

SECTIONS = ("task", "model", "train", "monitor")
RNN_CELL_ACTIVATIONS = ("tanh", "relu")  # what torch.nn.RNN(nonlinearity=...) accepts

TaskName = Literal["digits", "mnist1d", "adding", "copy", "teacher", "mnist"]
Standardize = Literal["standard", "minmax", "none"]
Kind = Literal["mlp", "cnn", "rnn", "transformer"]
Activation = Literal[_registry.buildable_kinds()]  # what experiments/models.py can build
Init = Literal[
    "default",
    "normal",
    "glorot_standard",
    "xavier_uniform",
    "xavier_normal",
    "he_uniform",
    "he_normal",
    "lecun_normal",
    "orthogonal",
    "identity",
]
BiasInit = Literal["zeros", "default", "constant", "normal"]
Norm = Literal["none", "batch", "layer"]
Cell = Literal["rnn", "lstm", "gru"]
RecurrentInit = Literal["default", "orthogonal", "identity"]
Optimizer = Literal["sgd", "momentum", "adam", "adamw"]
Schedule = Literal["constant", "cosine", "step"]
Device = Literal["cpu", "cuda", "auto"]
Stats = Literal["all", "parameters"]


# Upper bounds of what a config may ask for (docs/config.md, "Limits"): each refuses a value that
# cannot work here (it overflows, hangs or cannot fit in memory) with the usual one-line error,
# before anything is trained. Well beyond every published experiment this package reproduces.
MAX_SEED = 2**32 - 1  # numpy's and Python's generators' seed range (torch takes it too)
MAX_DEPTH = 1000  # watched layers; a 1000-layer MLP already takes minutes per 100 steps
MAX_WIDTH = 65536  # units, channels, classes, features
MAX_PARAMS = 2**31  # parameters of the built model (8 GiB of float32 weights, before grads)
MAX_STEPS = 10**7  # optimizer steps: 10 million at 1 kHz is still about three hours
MAX_EXAMPLES = 10**7  # examples of a generated split (the tasks are generated in memory)
MAX_SEQ_LEN = 100_000  # time steps of a sequence task
MAX_KERNEL = 1000
MAX_FLUSH_EVERY = 100_000  # recorded steps held in memory between writes
MAX_SCALE = 1e30  # init and gain scales: larger ones overflow float32 weights at once


class ConfigError(ValueError):
    """An invalid experiment or sweep config; the message is one line naming the field.

    Example:
        >>> from vanishing.experiments.config import ConfigError, parse_config
        >>> try:
        ...     parse_config({"model": {"activation": "sigmod"}})
        ... except ConfigError as e:
        ...     print(str(e)[:52])
        model.activation: 'sigmod' is not one of sigmoid, ta
    """


_STRICT = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False, validate_default=True)


class TaskConfig(BaseModel):
    """``[task]``: the data set and how it is prepared.

    Example:
        >>> from vanishing.experiments.config import TaskConfig
        >>> TaskConfig(name="adding", seq_len=100).seq_len
        100
    """

    model_config = _STRICT

    name: TaskName = "digits"
    standardize: Standardize = "standard"
    n_train: int = Field(0, ge=0, le=MAX_EXAMPLES)
    n_test: int = Field(0, ge=0, le=MAX_EXAMPLES)
    seq_len: int = Field(50, ge=1, le=MAX_SEQ_LEN)
    data_dir: str = ""
    teacher_depth: int = Field(3, ge=1, le=MAX_DEPTH)
    n_classes: int = Field(10, ge=2, le=MAX_WIDTH)
    n_features: int = Field(32, ge=1, le=MAX_WIDTH)


class ModelConfig(BaseModel):
    """``[model]``: the architecture and the switches that cause or cure vanishing gradients.

    Example:
        >>> from vanishing.experiments.config import ModelConfig
        >>> ModelConfig(activation="relu", init="he_normal").depth
        10
    """

    model_config = _STRICT

    kind: Kind = "mlp"
    depth: int = Field(10, ge=0, le=MAX_DEPTH)
    width: int = Field(32, ge=1, le=MAX_WIDTH)
    activation: Activation = "sigmoid"
    init: Init = "default"
    init_std: float = Field(1.0, gt=0, le=MAX_SCALE)
    bias_init: BiasInit = "zeros"
    bias_value: float = Field(0.0, ge=-MAX_SCALE, le=MAX_SCALE)
    bias_std: float = Field(1.0, ge=0, le=MAX_SCALE)
    norm: Norm = "none"
    residual: bool = False
    cell: Cell = "rnn"
    recurrent_init: RecurrentInit = "default"
    recurrent_gain: float = Field(1.0, gt=0, le=MAX_SCALE)
    forget_bias: float = Field(0.0, ge=-MAX_SCALE, le=MAX_SCALE)
    heads: int = Field(4, ge=1, le=MAX_WIDTH)
    norm_first: bool = True
    kernel_size: int = Field(3, ge=1, le=MAX_KERNEL)


class TrainConfig(BaseModel):
    """``[train]``: optimizer, schedule, clipping, batches, pretraining, evaluation, device.

    Example:
        >>> from vanishing.experiments.config import TrainConfig
        >>> TrainConfig(optimizer="adam", lr=1e-3).lr_schedule
        'constant'
    """

    model_config = _STRICT

    optimizer: Optimizer = "sgd"
    lr: float = Field(0.1, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    lr_schedule: Schedule = "constant"
    lr_step: int = Field(0, ge=0, le=MAX_STEPS)
    lr_gamma: float = Field(0.1, gt=0)
    steps: int = Field(400, ge=1, le=MAX_STEPS)
    batch_size: int = Field(64, ge=0, le=MAX_EXAMPLES)
    clip_norm: float = Field(0.0, ge=0)
    pretrain_steps: int = Field(0, ge=0, le=MAX_STEPS)
    pretrain_lr: float = Field(0.1, gt=0)
    eval_every: int = Field(50, ge=1, le=MAX_STEPS)
    device: Device = "cpu"


class MonitorConfig(BaseModel):
    """``[monitor]``: what ``vanishing.watch`` records and how often.

    Example:
        >>> from vanishing.experiments.config import MonitorConfig
        >>> MonitorConfig(every="log").every
        'log'
    """

    model_config = _STRICT

    stats: Stats = "all"
    every: int | str = 1
    flush_every: int = Field(50, ge=1, le=MAX_FLUSH_EVERY)
    #: destinations besides the run directory, by name (vanishing.sinks.by_name): a
    #: TensorBoard log under the run directory, the active/new MLflow run, a W&B run
    sinks: list[Literal["tensorboard", "mlflow", "wandb"]] = []

    @field_validator("every", mode="plain")
    @classmethod
    def _every(cls, value: Any) -> int | str:
        if value == "log" or (
            isinstance(value, int) and not isinstance(value, bool) and value >= 1
        ):
            return value
        raise PydanticCustomError(
            "every", "{value} is not a positive integer or 'log'", {"value": repr(value)}
        )


class ExperimentConfig(BaseModel):
    """One experiment, fully resolved: ``name``, ``seed`` and the four sections.

    ``ExperimentConfig.model_validate(dict)`` validates (raising pydantic's error);
    :func:`parse_config` does the same and raises a one-line :class:`ConfigError`.

    Example:
        >>> from vanishing.experiments.config import ExperimentConfig
        >>> cfg = ExperimentConfig.model_validate({"model": {"depth": 3}, "seed": 1})
        >>> cfg.model.depth, cfg.model.activation, cfg.train.optimizer, len(cfg.key)
        (3, 'sigmoid', 'sgd', 16)
    """

    model_config = _STRICT

    name: str = "experiment"
    seed: int = Field(0, ge=0, le=MAX_SEED)
    task: TaskConfig = Field(default_factory=TaskConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    monitor: MonitorConfig = Field(default_factory=MonitorConfig)

    @model_validator(mode="after")
    def _cross_field(self) -> ExperimentConfig:
        m, t, tr = self.model, self.task, self.train
        if m.kind == "rnn" and m.cell == "rnn" and m.activation not in RNN_CELL_ACTIVATIONS:
            _cross(
                f"model.activation: {m.activation!r} is not one of "
                f"{', '.join(RNN_CELL_ACTIVATIONS)} (the activations of model.cell 'rnn')"
            )
        if m.kind == "transformer" and m.width % m.heads:
            _cross(
                f"model.heads: model.width {m.width} is not divisible by {m.heads} heads; "
                "pick width = a multiple of heads"
            )
        if t.name == "mnist" and not t.data_dir:
            _cross(
                "task.data_dir: task 'mnist' needs the directory holding the four MNIST IDX "
                "files (nothing is downloaded)"
            )
        if m.depth == 0 and m.kind in ("rnn", "transformer"):
            _cross(f"model.depth: kind {m.kind!r} needs depth >= 1, got 0")
        if m.kind == "rnn" and (m.norm != "none" or m.residual):
            _cross(
                "model.norm: kind 'rnn' takes norm = 'none' and residual = false only"
                if m.norm != "none"
                else "model.residual: kind 'rnn' takes norm = 'none' and residual = false only"
            )
        if m.kind == "transformer" and m.norm == "batch":
            _cross(
                "model.norm: kind 'transformer' always uses LayerNorm; 'batch' is not one of "
                "none, layer"
            )
        if m.forget_bias and (m.kind != "rnn" or m.cell != "lstm"):
            _cross(
                "model.forget_bias: applies to LSTMs only; set kind = 'rnn' and cell = 'lstm', "
                "or forget_bias = 0"
            )
        params = _weights_estimate(m)
        if params > MAX_PARAMS:
            _cross(
                f"model.width: depth {m.depth} x width {m.width} is about {params:.2g} "
                f"parameters, more than the {MAX_PARAMS:.2g} that fit in memory; make it "
                "narrower or shallower"
            )
        if tr.pretrain_steps and m.kind != "mlp":
            _cross(
                f"train.pretrain_steps: layer-wise pretraining is for kind 'mlp', "
                f"not {m.kind!r}; set pretrain_steps = 0"
            )
        return self

    @property
    def key(self) -> str:
        """The run's stable key: :func:`config_key` of this config."""
        return config_key(self)

    def to_dict(self) -> dict[str, Any]:
        """The fully resolved config as a JSON-ready dict (every default filled in)."""
        return self.model_dump(mode="json")


def _weights_estimate(m: ModelConfig) -> int:
    """The hidden weights a model config builds, roughly (the largest terms): enough to refuse
    one that cannot fit in memory before building it."""
    per_layer = {
        "mlp": m.width**2,
        "cnn": m.width**2 * m.kernel_size**2,
        "rnn": 4 * 2 * m.width**2,  # up to four gates (LSTM), input and recurrent weights
        "transformer": 12 * m.width**2,  # attention 4 d^2, feed-forward 8 d^2
    }[m.kind]
    return max(1, m.depth) * per_layer


def _cross(message: str) -> typing.NoReturn:
    raise PydanticCustomError("cross_field", "{message}", {"message": message})


def config_key(config: ExperimentConfig) -> str:
    """16 hex characters of the SHA-256 of the resolved config's JSON (sorted keys), seed included.

    Example:
        >>> from vanishing.experiments.config import ExperimentConfig, config_key
        >>> a = ExperimentConfig.model_validate({"train": {"lr": 1}})
        >>> b = ExperimentConfig.model_validate({"train": {"lr": 1.0}})
        >>> config_key(a) == config_key(b), config_key(a) == config_key(a.model_copy(update={"seed": 1}))
        (True, False)
    """
    text = json.dumps(config.to_dict(), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# --------------------------------------------------------------------------- errors
_TYPE_NAMES = {
    "int_type": "an integer",
    "int_from_float": "an integer",
    "float_type": "a number",
    "bool_type": "true or false",
    "string_type": "a string",
    "model_type": "a table",
    "dict_type": "a table",
    "finite_number": "a finite number",
}
_BOUNDS = {
    "greater_than": ">",
    "greater_than_equal": ">=",
    "less_than": "<",
    "less_than_equal": "<=",
}


def _field_at(loc: tuple) -> Any:
    """The pydantic model class (or field annotation) at a location inside ExperimentConfig."""
    node: Any = ExperimentConfig
    for part in loc:
        fields = getattr(node, "model_fields", None)
        if not fields or part not in fields:
            return None
        node = fields[part].annotation
    return node


def _allowed(loc: tuple) -> list[str]:
    annotation = _field_at(loc)
    if typing.get_origin(annotation) is Literal:
        return [str(a) for a in typing.get_args(annotation)]
    return []


def _show(value: Any) -> str:
    if isinstance(value, dict):
        return "a table"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _one_line(error: dict[str, Any]) -> str:
    loc = tuple(str(p) for p in error["loc"])
    field = ".".join(loc)
    kind = error["type"]
    value = error.get("input")
    ctx = error.get("ctx") or {}
    if kind == "extra_forbidden":
        parent = _field_at(loc[:-1])
        known = list(getattr(parent, "model_fields", {}))
        if not loc[:-1]:
            known.append("seeds")
        close = difflib.get_close_matches(loc[-1], known, n=1, cutoff=0.6)
        hint = f"did you mean {close[0]}?" if close else f"known fields: {', '.join(known)}"
        return f"unknown field {field} ({hint})"
    if kind == "cross_field":
        return ctx["message"]
    if isinstance(value, list) and kind != "literal_error":
        return (
            f"{field}: got a list {_show(value)}; a list of values is a sweep axis, "
            "run it with `vanishing sweep`"
        )
    if kind == "literal_error":
        allowed = _allowed(tuple(error["loc"]))
        return f"{field}: {_show(value)} is not one of {', '.join(allowed)}"
    if kind in _BOUNDS:
        bound = next(iter(ctx.values()))
        return f"{field}: must be {_BOUNDS[kind]} {bound}, got {_show(value)}"
    if kind == "every":
        return f"{field}: {ctx['value']} is not a positive integer or 'log'"
    if kind in _TYPE_NAMES:
        return f"{field}: expected {_TYPE_NAMES[kind]}, got {_show(value)}"
    return f"{field}: {error['msg']}" if field else str(error["msg"])


def _config_error(e: ValidationError, where: str = "") -> ConfigError:
    message = _one_line(e.errors(include_url=False)[0])
    return ConfigError(f"{where}{message}")


# --------------------------------------------------------------------------- loading
def read_toml(path: str | os.PathLike) -> dict[str, Any]:
    """The raw dict of a TOML file; a missing file or a syntax error is a :class:`ConfigError`.

    Example:
        >>> import tempfile, pathlib
        >>> from vanishing.experiments.config import read_toml
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "c.toml"
        >>> _ = p.write_text('seed = 3\\n[model]\\ndepth = [2, 4]\\n')
        >>> read_toml(p)
        {'seed': 3, 'model': {'depth': [2, 4]}}
    """
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - Python 3.10
        import tomli as tomllib

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such config file")
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: invalid TOML: {e}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: unreadable: {e}") from None


def parse_config(raw: dict[str, Any]) -> ExperimentConfig:
    """Validate one experiment's raw dict; any problem is a one-line :class:`ConfigError`.

    Example:
        >>> from vanishing.experiments.config import parse_config
        >>> parse_config({"model": {"kind": "rnn", "cell": "lstm", "forget_bias": 1.0}}).model.cell
        'lstm'
        >>> parse_config({"model": {"actvation": "relu"}})
        Traceback (most recent call last):
        ...
        vanishing.experiments.config.ConfigError: unknown field model.actvation (did you mean activation?)
    """
    if not isinstance(raw, dict):
        raise ConfigError(f"a config is a table of fields, got {_show(raw)}")
    if "seeds" in raw:
        raise ConfigError(
            "seeds: a list of seeds makes a sweep; run it with `vanishing sweep`, "
            "or give one seed = N"
        )
    try:
        return ExperimentConfig.model_validate(raw)
    except ValidationError as e:
        raise _config_error(e) from None


def load_config(path: str | os.PathLike) -> ExperimentConfig:
    """Read and validate one experiment's TOML config.

    Example:
        >>> from vanishing.experiments.config import load_config
        >>> cfg = load_config("configs/deep_sigmoid.toml")   # doctest: +SKIP
        >>> cfg.model.activation                              # doctest: +SKIP
        'sigmoid'
    """
    raw = read_toml(path)
    try:
        return parse_config(raw)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def _parse_value(text: str) -> Any:
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - Python 3.10
        import tomli as tomllib
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text  # a bare word: the string itself (relu, he_normal, ...)


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """A copy of ``raw`` with ``dotted.field=value`` overrides applied (values parsed as TOML;
    a bare word is a string).

    Example:
        >>> from vanishing.experiments.config import apply_overrides
        >>> apply_overrides({"model": {"depth": 10}}, ["model.depth=20", "model.activation=relu", "seed=2"])
        {'model': {'depth': 20, 'activation': 'relu'}, 'seed': 2}
    """
    out = json.loads(json.dumps(raw))
    for item in overrides:
        field, sep, text = item.partition("=")
        field = field.strip()
        if not sep or not field:
            raise ConfigError(f"--set {item!r}: expected FIELD=VALUE, e.g. model.depth=20")
        parts = field.split(".")
        value = _parse_value(text.strip())
        if len(parts) == 1 and parts[0] in SECTIONS:
            raise ConfigError(
                f"--set {item!r}: {parts[0]} is a section; set its fields one by one, "
                f"e.g. --set {parts[0]}.{_example_field(parts[0], value)}"
            )
        if isinstance(value, dict):
            raise ConfigError(
                f"--set {item!r}: the value is a table; every field takes one value, "
                f"e.g. --set {field}=2"
            )
        known = _field_paths()
        if field not in known and (len(parts) == 1 or parts[0] in SECTIONS):
            # did-you-mean over every field path: `depth` -> `model.depth`, `model.dpeth` too
            leaf = [p for p in known if p.rsplit(".", 1)[-1] == parts[-1]]
            close = leaf or difflib.get_close_matches(field, known, n=1, cutoff=0.6)
            hint = f"did you mean {close[0]}?" if close else "see docs/config.md"
            raise ConfigError(f"--set {item!r}: unknown field {field} ({hint})")
        node = out
        for part in parts[:-1]:
            if part not in SECTIONS:
                raise ConfigError(
                    f"--set {item!r}: unknown section {part!r}; one of {', '.join(SECTIONS)}"
                )
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item!r}: {part} is not a table in the config")
        node[parts[-1]] = value
    return out


def _field_paths() -> list[str]:
    """Every settable field as a dotted path (``seed``, ``model.depth``, ...)."""
    paths = []
    for name, info in ExperimentConfig.model_fields.items():
        fields = getattr(info.annotation, "model_fields", None)
        if fields:
            paths += [f"{name}.{sub}" for sub in fields]
        else:
            paths.append(name)
    return paths


def _example_field(section: str, value: Any) -> str:
    if isinstance(value, dict) and value:
        key, v = next(iter(value.items()))
        return f"{key}={json.dumps(v) if isinstance(v, str) else v}"
    return f"{next(iter(ExperimentConfig.model_fields[section].annotation.model_fields))}=..."


# --------------------------------------------------------------------------- sweeps
def _axes(raw: dict[str, Any]) -> list[tuple[tuple[str, ...], list[Any]]]:
    axes = []
    for key, value in raw.items():
        if key in ("seed", "seeds"):
            continue
        if isinstance(value, dict):
            for field, v in value.items():
                if isinstance(v, list):
                    axes.append(((key, field), v))
        elif isinstance(value, list):
            axes.append(((key,), value))
    return axes


def expand_sweep(raw: dict[str, Any]) -> list[tuple[dict[str, Any], ExperimentConfig]]:
    """Every run of a sweep config: ``(params, config)`` pairs, all validated up front.

    Each list-valued field is an axis; the runs are the cartesian product of the axes (in the
    order the fields appear), times the top-level ``seeds = [...]`` (the innermost axis).
    ``params`` holds the swept fields' values by dotted name, and ``seed``.

    Example:
        >>> from vanishing.experiments.config import expand_sweep
        >>> runs = expand_sweep({"model": {"activation": ["sigmoid", "relu"], "depth": [2, 8]},
        ...                      "seeds": [0, 1]})
        >>> len(runs), runs[0][0]
        (8, {'model.activation': 'sigmoid', 'model.depth': 2, 'seed': 0})
        >>> runs[-1][1].model.activation, runs[-1][1].model.depth, runs[-1][1].seed
        ('relu', 8, 1)
    """
    if not isinstance(raw, dict):
        raise ConfigError(f"a sweep config is a table of fields, got {_show(raw)}")
    raw = dict(raw)
    if "seeds" in raw and "seed" in raw:
        raise ConfigError("seeds: give either seed = N or seeds = [...], not both")
    seeds = raw.pop("seeds", raw.pop("seed", 0))
    if not isinstance(seeds, list):
        seeds = [seeds]
    if not seeds:
        raise ConfigError("seeds: an empty list sweeps over nothing")
    axes = _axes(raw)
    for path, values in axes:
        if not values:
            raise ConfigError(f"{'.'.join(path)}: an empty list sweeps over nothing")
    names = [".".join(path) for path, _ in axes]
    runs: list[tuple[dict[str, Any], ExperimentConfig]] = []
    seen: dict[str, dict[str, Any]] = {}
    for combo in itertools.product(*(values for _, values in axes), seeds):
        point = json.loads(json.dumps(raw))
        for (path, _), value in zip(axes, combo):
            node = point
            for part in path[:-1]:
                node = node[part]
            node[path[-1]] = value
        point["seed"] = combo[-1]
        params = dict(zip(names, combo[:-1]))
        params["seed"] = combo[-1]
        try:
            config = ExperimentConfig.model_validate(point)
        except ValidationError as e:
            where = ", ".join(f"{k}={v!r}" for k, v in params.items())
            raise ConfigError(
                f"{_one_line(e.errors(include_url=False)[0])} (run {where})"
            ) from None
        key = config.key
        if key in seen:
            raise ConfigError(
                f"the sweep lists the same run twice: {seen[key]} and {params}; "
                "remove the repeated value"
            )
        seen[key] = params
        runs.append((params, config))
    return runs
