"""Learning tasks built locally from a config: nothing is downloaded at run time.

What each task gives (per example ``input_shape``; batch first):

| task | input_shape | outputs | loss / metric | default n_train / n_test |
| --- | --- | --- | --- | --- |
| ``digits`` | ``(1, 8, 8)`` image | 10 classes | cross-entropy / accuracy | 1438 / 359 |
| ``mnist1d`` | ``(1, 40)`` signal | 10 classes | cross-entropy / accuracy | 4000 / 1000 |
| ``adding`` | ``(T, 2)`` sequence | 1 value | mse / mse | 4000 / 1000 |
| ``copy`` | ``(T + 20, 10)`` sequence | 9 classes per step | cross-entropy / accuracy | 4000 / 1000 |
| ``teacher`` | ``(n_features,)`` flat | ``n_classes`` | cross-entropy / accuracy | 4000 / 1000 |
| ``mnist`` | ``(1, 28, 28)`` image | 10 classes | cross-entropy / accuracy | 60000 / 10000 |

``standardize`` (``standard`` | ``minmax`` | ``none``) uses the training split's statistics per
feature: per pixel or signal position for images and signals, per input channel (pooled over
time) for the sequence tasks; see :func:`vanishing.experiments.data.scale_features`. Targets are
never scaled. Everything is deterministic given ``seed``.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from vanishing.experiments.data import STANDARDIZE, digits, scale_features

TASKS = ("digits", "mnist1d", "adding", "copy", "teacher", "mnist")
# the teacher network is the same function for every experiment seed
TEACHER_SEED = 1234
# copy task: how many symbols to remember, the alphabet size, blank and delimiter tokens
COPY_SYMBOLS, COPY_ALPHABET, COPY_BLANK, COPY_DELIMITER = 10, 8, 0, 9


@dataclass
class Task:
    """A dataset with its shapes, loss and metric.

    ``x_*`` are float32 ``(N, *input_shape)``; ``y_*`` int64 class labels ``(N,)`` (``(N, T)``
    when ``per_step``) or float32 regression targets ``(N, n_outputs)``. ``metric_steps``
    ``(start, stop)``, for per-step tasks, are the time steps the metric scores (the loss always
    averages over all steps).

    Example:
        >>> import torch
        >>> from vanishing.experiments.tasks import make_task
        >>> task = make_task("teacher", n_train=100, n_test=50)
        >>> task.input_shape, task.n_outputs, task.metric_name
        ((32,), 10, 'accuracy')
        >>> logits = torch.nn.functional.one_hot(task.y_test, 10).float()
        >>> task.metric(logits, task.y_test)
        1.0
    """

    name: str
    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    input_shape: tuple[int, ...]
    n_outputs: int
    sequence: bool
    per_step: bool
    metric_name: str
    metric_steps: tuple[int, int] | None = None
    description: str = field(default="", repr=False)

    def loss(self, output: Tensor, target: Tensor) -> Tensor:
        """Mean cross-entropy (over examples and steps) or mean squared error."""
        if self.metric_name == "mse":
            return nn.functional.mse_loss(output, target.to(output.dtype))
        if self.per_step:
            return nn.functional.cross_entropy(output.flatten(0, -2), target.flatten())
        return nn.functional.cross_entropy(output, target)

    def metric(self, output: Tensor, target: Tensor) -> float:
        """Accuracy (over ``metric_steps`` for per-step tasks) or mean squared error."""
        with torch.no_grad():
            if self.metric_name == "mse":
                return nn.functional.mse_loss(output, target.to(output.dtype)).item()
            if self.per_step and self.metric_steps is not None:
                start, stop = self.metric_steps
                output, target = output[:, start:stop], target[:, start:stop]
            return (output.argmax(-1) == target).float().mean().item()


def _check_int(field_name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{field_name} must be an integer >= {minimum}, got {value!r}")
    return value


def make_task(
    name: str,
    *,
    seed: int = 0,
    n_train: int = 0,
    n_test: int = 0,
    seq_len: int = 50,
    standardize: str = "standard",
    data_dir: str | Path | None = "",
    teacher_depth: int = 3,
    n_classes: int = 10,
    n_features: int = 32,
) -> Task:
    """Build task ``name`` (one of :data:`TASKS`; see the module docstring for each one's shape).

    ``n_train``/``n_test`` 0 mean the task's default size. ``seq_len`` is the sequence length T
    of ``adding`` and the delay T of ``copy``; ``data_dir`` is the directory of the four MNIST
    IDX files (``mnist`` only); ``teacher_depth``, ``n_classes`` and ``n_features`` shape the
    ``teacher`` task.

    Example:
        >>> from vanishing.experiments.tasks import make_task
        >>> task = make_task("adding", seq_len=20, n_train=64, n_test=16, standardize="none")
        >>> task.input_shape, tuple(task.y_train.shape), task.metric_name
        ((20, 2), (64, 1), 'mse')
        >>> make_task("cifar")
        Traceback (most recent call last):
        ...
        ValueError: unknown task 'cifar'; expected one of: digits, mnist1d, adding, copy, teacher, mnist
    """
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; expected one of: {', '.join(TASKS)}")
    if standardize not in STANDARDIZE:
        raise ValueError(
            f"unknown standardize {standardize!r}; expected one of: {', '.join(STANDARDIZE)}"
        )
    _check_int("seed", seed, 0)
    _check_int("n_train", n_train, 0)
    _check_int("n_test", n_test, 0)
    if name == "digits":
        x, y, xt, yt = digits(seed=seed, standardize=standardize, n_train=n_train, n_test=n_test)
        return Task(
            "digits",
            x.reshape(-1, 1, 8, 8),
            y,
            xt.reshape(-1, 1, 8, 8),
            yt,
            (1, 8, 8),
            10,
            False,
            False,
            "accuracy",
            description="scikit-learn's 8x8 digits",
        )
    if name == "mnist1d":
        return _mnist1d(seed, n_train or 4000, n_test or 1000, standardize)
    if name == "adding":
        return _adding(
            seed, n_train or 4000, n_test or 1000, _check_int("seq_len", seq_len, 2), standardize
        )
    if name == "copy":
        return _copy(
            seed, n_train or 4000, n_test or 1000, _check_int("seq_len", seq_len, 1), standardize
        )
    if name == "teacher":
        _check_int("teacher_depth", teacher_depth, 1)
        _check_int("n_classes", n_classes, 2)
        _check_int("n_features", n_features, 1)
        return _teacher(
            seed, n_train or 4000, n_test or 1000, standardize, teacher_depth, n_classes, n_features
        )
    return _mnist(seed, n_train, n_test, standardize, data_dir)


def _mnist1d(seed: int, n_train: int, n_test: int, standardize: str) -> Task:
    """MNIST-1D (Greydanus 2020) generated by the ``mnist1d`` package; no download.

    ``make_dataset`` seeds numpy's and Python's global generators; their states are restored.
    The package already centres and scales the whole dataset to std 1 (``none`` keeps that).
    With the defaults (5000 samples, 80 % train) the split is the package's own.
    """
    import numpy as np
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.seed = seed
    args.num_samples = 10 * math.ceil((n_train + n_test) / 10)  # generated per class
    np_state, py_state = np.random.get_state(), random.getstate()
    try:
        data = make_dataset(args)
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)
    x = torch.tensor(np.concatenate([data["x"], data["x_test"]]), dtype=torch.float32)
    y = torch.tensor(np.concatenate([data["y"], data["y_test"]]), dtype=torch.long)
    x = x.unsqueeze(1)
    x_train, x_test = scale_features(x[:n_train], x[n_train : n_train + n_test], standardize)
    return Task(
        "mnist1d",
        x_train,
        y[:n_train],
        x_test,
        y[n_train : n_train + n_test],
        (1, x.shape[-1]),
        10,
        False,
        False,
        "accuracy",
        description="MNIST-1D, generated locally",
    )


def _adding(seed: int, n_train: int, n_test: int, T: int, standardize: str) -> Task:
    """The adding problem (Hochreiter & Schmidhuber 1997; layout of Le et al. 2015).

    Step t has two channels: a value U[0, 1] and a marker; exactly two markers are 1, the first
    at a uniform position in the first half ``[0, T//2)``, the second in ``[T//2, T)``. The
    target is the sum of the two marked values. Predicting 1 always scores the target's
    variance, 1/6 = 0.1667 (Le et al. quote 0.1767): a model that learned something beats it.
    """
    g = torch.Generator().manual_seed(seed)

    def sample(n: int) -> tuple[Tensor, Tensor]:
        values = torch.rand(n, T, generator=g)
        first = torch.randint(0, T // 2, (n,), generator=g)
        second = torch.randint(T // 2, T, (n,), generator=g)
        markers = torch.zeros(n, T)
        rows = torch.arange(n)
        markers[rows, first] = 1.0
        markers[rows, second] = 1.0
        target = values[rows, first] + values[rows, second]
        return torch.stack([values, markers], dim=-1), target.unsqueeze(1)

    x, y = sample(n_train)
    xt, yt = sample(n_test)
    x, xt = scale_features(x, xt, standardize, channels_last=True)
    return Task(
        "adding", x, y, xt, yt, (T, 2), 1, True, False, "mse", description=f"adding problem, T={T}"
    )


def _copy(seed: int, n_train: int, n_test: int, T: int, standardize: str) -> Task:
    """The copy (memory) task of Hochreiter & Schmidhuber (1997) as laid out by Arjovsky et al.

    Tokens: 0 blank, 1..8 symbols, 9 delimiter; inputs are their one-hot codes ``(T + 20, 10)``.
    Input: 10 random symbols (steps 0..9), T - 1 blanks, the delimiter (step T + 9), 10 blanks.
    Target per step: blank (class 0) for the first T + 10 steps, then the 10 symbols in order
    (steps T + 10 .. T + 19); 9 output classes. The metric is the accuracy on those 10 recall
    steps; a memoryless guess scores 1/8 there, and its cross-entropy over all steps is
    10 log(8) / (T + 20).
    """
    g = torch.Generator().manual_seed(seed)
    k = COPY_SYMBOLS

    def sample(n: int) -> tuple[Tensor, Tensor]:
        symbols = torch.randint(1, COPY_ALPHABET + 1, (n, k), generator=g)
        tokens = torch.full((n, T + 2 * k), COPY_BLANK, dtype=torch.long)
        tokens[:, :k] = symbols
        tokens[:, T + k - 1] = COPY_DELIMITER
        target = torch.full((n, T + 2 * k), COPY_BLANK, dtype=torch.long)
        target[:, T + k :] = symbols
        return nn.functional.one_hot(tokens, COPY_ALPHABET + 2).float(), target

    x, y = sample(n_train)
    xt, yt = sample(n_test)
    x, xt = scale_features(x, xt, standardize, channels_last=True)
    return Task(
        "copy",
        x,
        y,
        xt,
        yt,
        (T + 2 * k, COPY_ALPHABET + 2),
        COPY_ALPHABET + 1,
        True,
        True,
        "accuracy",
        metric_steps=(T + k, T + 2 * k),
        description=f"copy task, delay T={T}",
    )


def make_teacher(
    n_features: int, n_classes: int, depth: int, *, seed: int = TEACHER_SEED
) -> nn.Sequential:
    """The fixed random teacher of the ``teacher`` task: ``depth`` tanh layers of ``n_features``.

    Weights N(0, (5/3)^2 / fan_in) (tanh's gain, so the signal neither dies nor saturates
    with depth), biases N(0, 0.1^2), then a linear layer to ``n_classes`` logits. Each logit is
    then standardised (folded into the last layer) with its mean and std over 20000 Gaussian
    inputs, so that the argmax classes come out about equally often.

    Example:
        >>> import torch
        >>> from vanishing.experiments.tasks import make_teacher
        >>> teacher = make_teacher(8, 3, 2)
        >>> teacher(torch.randn(5, 8)).shape
        torch.Size([5, 3])
    """
    g = torch.Generator().manual_seed(seed)
    layers: list[nn.Module] = []
    for _ in range(depth):
        linear = nn.Linear(n_features, n_features)
        layers += [linear, nn.Tanh()]
    layers.append(nn.Linear(n_features, n_classes))
    teacher = nn.Sequential(*layers)
    with torch.no_grad():
        for m in teacher:
            if isinstance(m, nn.Linear):
                gain = 5 / 3 if m is not layers[-1] else 1.0
                m.weight.normal_(0.0, gain / math.sqrt(m.in_features), generator=g)
                m.bias.normal_(0.0, 0.1, generator=g)
        logits = teacher(torch.randn(20000, n_features, generator=g))
        mean, std = logits.mean(0), logits.std(0).clamp_min(1e-12)
        head = layers[-1]
        head.weight.div_(std.unsqueeze(1))
        head.bias.sub_(mean).div_(std)
    teacher.requires_grad_(False)
    return teacher.eval()


def _teacher(
    seed: int,
    n_train: int,
    n_test: int,
    standardize: str,
    depth: int,
    n_classes: int,
    n_features: int,
) -> Task:
    """Gaussian inputs N(0, I) labelled by the argmax of :func:`make_teacher`'s logits."""
    teacher = make_teacher(n_features, n_classes, depth)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_train, n_features, generator=g)
    xt = torch.randn(n_test, n_features, generator=g)
    with torch.no_grad():
        y, yt = teacher(x).argmax(1), teacher(xt).argmax(1)
    x, xt = scale_features(x, xt, standardize)
    return Task(
        "teacher",
        x,
        y,
        xt,
        yt,
        (n_features,),
        n_classes,
        False,
        False,
        "accuracy",
        description=f"teacher network, depth {depth}, {n_classes} classes",
    )


def _mnist(seed: int, n_train: int, n_test: int, standardize: str, data_dir) -> Task:
    """MNIST from local IDX files; ``n_train``/``n_test`` pick a seeded random subset."""
    if not data_dir:
        raise ValueError(
            "task 'mnist' needs data_dir: the directory with the four MNIST IDX files "
            "(--data-dir DIR, or data_dir in [task])"
        )
    from vanishing.experiments.idx import load_mnist

    x, y, xt, yt = (torch.as_tensor(a) for a in load_mnist(data_dir))
    g = torch.Generator().manual_seed(seed)
    picked = []
    for images, labels, n, split in ((x, y, n_train, "n_train"), (xt, yt, n_test, "n_test")):
        if n > len(images):
            raise ValueError(f"{split}={n} but the MNIST files hold {len(images)} images")
        if n and n < len(images):
            idx = torch.randperm(len(images), generator=g)[:n]
            images, labels = images[idx], labels[idx]
        picked += [images.float().unsqueeze(1), labels.long()]
    x, y, xt, yt = picked
    x, xt = scale_features(x, xt, standardize)
    return Task(
        "mnist",
        x,
        y,
        xt,
        yt,
        tuple(x.shape[1:]),
        10,
        False,
        False,
        "accuracy",
        description=f"MNIST from {data_dir}",
    )
