"""Tasks: each one's construction checked independently, scaling, determinism, losses, errors."""

import gzip
import math
import random
import struct

import numpy as np
import pytest
import torch
from torch import nn

from vanishing.experiments.data import digits, scale_features
from vanishing.experiments.tasks import TASKS, Task, make_task, make_teacher


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --------------------------------------------------------------------------- adding problem
def test_adding_problem_layout_and_targets():
    T = 30
    task = make_task("adding", seq_len=T, n_train=500, n_test=100, standardize="none", seed=3)
    assert task.input_shape == (T, 2) and task.sequence and not task.per_step
    assert task.n_outputs == 1 and task.metric_name == "mse"
    for x, y in ((task.x_train, task.y_train), (task.x_test, task.y_test)):
        values, markers = x[..., 0].numpy(), x[..., 1].numpy()
        assert values.min() >= 0 and values.max() < 1
        assert set(np.unique(markers)) == {0.0, 1.0}
        for v, m, target in zip(values, markers, y[:, 0].numpy()):
            marked = np.flatnonzero(m)
            assert len(marked) == 2
            assert marked[0] < T // 2 <= marked[1]
            assert math.isclose(target, v[marked[0]] + v[marked[1]], rel_tol=1e-6)


def test_adding_problem_baseline_is_the_target_variance():
    """Always predicting 1 scores Var(U1 + U2) = 2/12 = 1/6; a model has to beat that."""
    task = make_task("adding", seq_len=10, n_train=20000, n_test=10, standardize="none")
    y = task.y_train
    baseline = task.loss(torch.ones_like(y), y).item()
    assert abs(baseline - 1 / 6) < 0.006
    assert abs(y.mean().item() - 1.0) < 0.01


# --------------------------------------------------------------------------- copy task
def test_copy_task_layout_and_targets():
    T = 7
    task = make_task("copy", seq_len=T, n_train=64, n_test=16, standardize="none")
    assert task.input_shape == (T + 20, 10) and task.sequence and task.per_step
    assert task.n_outputs == 9 and task.metric_steps == (T + 10, T + 20)
    x, y = task.x_train, task.y_train
    assert torch.all(x.sum(-1) == 1)  # one-hot
    tokens = x.argmax(-1)
    symbols = tokens[:, :10]
    assert symbols.min() >= 1 and symbols.max() <= 8
    assert torch.all(tokens[:, 10 : T + 9] == 0)  # T - 1 blanks
    assert torch.all(tokens[:, T + 9] == 9)  # the delimiter
    assert torch.all(tokens[:, T + 10 :] == 0)  # blanks while recalling
    assert torch.all(y[:, : T + 10] == 0)
    assert torch.equal(y[:, T + 10 :], symbols)


def test_copy_task_loss_and_metric():
    task = make_task("copy", seq_len=5, n_train=32, n_test=8, standardize="none")
    y = task.y_test
    perfect = nn.functional.one_hot(y, 9).float() * 50
    assert task.metric(perfect, y) == 1.0
    blanks = nn.functional.one_hot(torch.zeros_like(y), 9).float()
    assert task.metric(blanks, y) == 0.0  # only the recall steps are scored
    uniform = torch.zeros(*y.shape, 9)
    assert math.isclose(task.loss(uniform, y).item(), math.log(9), rel_tol=1e-6)
    # mean over every step of every sequence, as the per-step cross-entropy by hand
    logits = torch.randn(*y.shape, 9)
    by_hand = -torch.log_softmax(logits, -1).gather(-1, y.unsqueeze(-1)).mean()
    assert torch.allclose(task.loss(logits, y), by_hand)


# --------------------------------------------------------------------------- teacher
def test_teacher_labels_are_the_teachers_argmax():
    task = make_task(
        "teacher",
        n_train=300,
        n_test=100,
        teacher_depth=2,
        n_classes=4,
        n_features=6,
        standardize="none",
    )
    teacher = make_teacher(6, 4, 2)
    linears = [m for m in teacher if isinstance(m, nn.Linear)]
    assert len(linears) == 3

    def by_hand(x):
        h = x.double()
        for lin in linears[:-1]:
            h = torch.tanh(h @ lin.weight.double().T + lin.bias.double())
        return (h @ linears[-1].weight.double().T + linears[-1].bias.double()).argmax(1)

    assert torch.equal(task.y_train, by_hand(task.x_train))
    assert torch.equal(task.y_test, by_hand(task.x_test))
    assert task.input_shape == (6,) and task.n_outputs == 4


def test_teacher_is_fixed_and_classes_are_balanced():
    a = make_task("teacher", seed=0)
    b = make_task("teacher", seed=1)
    assert not torch.equal(a.x_train, b.x_train)
    x = torch.randn(10, 32)
    assert torch.equal(make_teacher(32, 10, 3)(x), make_teacher(32, 10, 3)(x))
    counts = torch.bincount(a.y_train, minlength=10).float() / len(a.y_train)
    assert counts.min() > 0.5 / 10 and counts.max() < 2 / 10


# --------------------------------------------------------------------------- digits, mnist1d
def test_digits_task_is_the_bundled_digits_as_images():
    task = make_task("digits", standardize="none")
    x, y, xt, yt = digits(standardize="none")
    assert task.input_shape == (1, 8, 8) and task.x_train.shape == (1438, 1, 8, 8)
    assert torch.equal(task.x_train.reshape(-1, 64), x) and torch.equal(task.y_test, yt)
    assert float(task.x_train.max()) == 16.0 and torch.equal(task.x_train, task.x_train.round())
    from sklearn.datasets import load_digits

    raw = torch.tensor(load_digits().data, dtype=torch.float32)
    # every training image is one of the bundled images with its label
    assert torch.equal(task.x_train[0, 0].reshape(64), raw[(raw == x[0]).all(1)][0])
    sub = make_task("digits", n_train=100, n_test=50)
    assert len(sub.x_train) == 100 and len(sub.x_test) == 50


def test_mnist1d_is_the_packages_dataset_and_leaves_global_rngs_alone():
    from mnist1d.data import get_dataset_args, make_dataset

    np.random.seed(7)
    random.seed(7)
    expected_np, expected_py = np.random.rand(), random.random()
    np.random.seed(7)
    random.seed(7)
    task = make_task("mnist1d", seed=5, n_train=120, n_test=80, standardize="none")
    assert np.random.rand() == expected_np and random.random() == expected_py
    args = get_dataset_args()
    args.seed, args.num_samples = 5, 200
    data = make_dataset(args)
    x = np.concatenate([data["x"], data["x_test"]])
    y = np.concatenate([data["y"], data["y_test"]])
    assert task.input_shape == (1, 40) and task.x_train.shape == (120, 1, 40)
    assert np.allclose(task.x_train[:, 0].numpy(), x[:120], atol=1e-6)
    assert np.allclose(task.x_test[:, 0].numpy(), x[120:], atol=1e-6)
    assert np.array_equal(task.y_train.numpy(), y[:120])
    assert np.array_equal(task.y_test.numpy(), y[120:])


# --------------------------------------------------------------------------- standardisation
def test_standard_scaling_uses_training_statistics_per_feature():
    raw = make_task("digits", standardize="none")
    std = make_task("digits", standardize="standard")
    x, xt = raw.x_train.reshape(-1, 64).double(), raw.x_test.reshape(-1, 64).double()
    mean, sd = x.mean(0), x.std(0, unbiased=False)
    varying = sd > 0
    s = std.x_train.reshape(-1, 64).double()
    assert torch.allclose(s.mean(0), torch.zeros(64, dtype=torch.double), atol=1e-5)
    assert torch.allclose(
        s.std(0, unbiased=False)[varying],
        torch.ones(int(varying.sum()), dtype=torch.double),
        atol=1e-5,
    )
    assert torch.all(s[:, ~varying] == 0)  # constant pixels: only shifted
    safe = torch.where(varying, sd, torch.ones_like(sd))
    assert torch.allclose(std.x_test.reshape(-1, 64).double(), (xt - mean) / safe, atol=1e-5)


def test_minmax_scaling_maps_training_range_to_unit_interval():
    task = make_task("mnist1d", n_train=200, n_test=50, standardize="minmax")
    x = task.x_train[:, 0]
    assert x.min() >= 0 and x.max() <= 1
    assert torch.allclose(x.amin(0), torch.zeros(40)) and torch.allclose(x.amax(0), torch.ones(40))


def test_sequence_tasks_scale_each_channel_over_all_steps():
    task = make_task("adding", seq_len=20, n_train=1000, n_test=10, standardize="standard")
    flat = task.x_train.reshape(-1, 2).double()
    assert torch.allclose(flat.mean(0), torch.zeros(2, dtype=torch.double), atol=1e-5)
    assert torch.allclose(flat.std(0, unbiased=False), torch.ones(2, dtype=torch.double), atol=1e-5)
    # the marker channel keeps exactly two distinct values, the markers stay where they were
    raw = make_task("adding", seq_len=20, n_train=1000, n_test=10, standardize="none")
    assert torch.equal(task.x_train[..., 1] > 0, raw.x_train[..., 1] > 0)
    assert torch.equal(task.y_train, raw.y_train)  # targets are not scaled


def test_scale_features_rejects_unknown_mode():
    with pytest.raises(ValueError, match="unknown standardize 'zscore'; expected one of: standard"):
        scale_features(torch.zeros(2, 2), torch.zeros(1, 2), "zscore")


# --------------------------------------------------------------------------- determinism
@pytest.mark.parametrize("name", ["digits", "mnist1d", "adding", "copy", "teacher"])
def test_tasks_are_deterministic_given_the_seed(name):
    kw = {"n_train": 60, "n_test": 20, "seq_len": 8}
    a, b, c = (
        make_task(name, seed=1, **kw),
        make_task(name, seed=1, **kw),
        make_task(name, seed=2, **kw),
    )
    for field in ("x_train", "y_train", "x_test", "y_test"):
        assert torch.equal(getattr(a, field), getattr(b, field))
    assert not torch.equal(a.x_train, c.x_train)
    assert a.x_train.dtype == torch.float32 and len(a.x_train) == 60 and len(a.x_test) == 20
    assert a.x_train.shape[1:] == a.input_shape


# --------------------------------------------------------------------------- mnist from IDX
def _write_idx(path, array, gz):
    codes = {np.uint8: 0x08}
    header = struct.pack(">HBB", 0, codes[array.dtype.type], array.ndim)
    header += struct.pack(f">{array.ndim}I", *array.shape)
    data = header + array.astype(array.dtype.newbyteorder(">")).tobytes()
    opener = gzip.open if gz else open
    with opener(path, "wb") as f:
        f.write(data)


@pytest.fixture
def mnist_dir(tmp_path):
    pytest.importorskip("vanishing.experiments.idx")
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (30, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, 30).astype(np.uint8)
    test_images = rng.integers(0, 256, (12, 28, 28), dtype=np.uint8)
    test_labels = rng.integers(0, 10, 12).astype(np.uint8)
    _write_idx(tmp_path / "train-images-idx3-ubyte.gz", images, True)
    _write_idx(tmp_path / "train-labels-idx1-ubyte", labels, False)
    _write_idx(tmp_path / "t10k-images-idx3-ubyte", test_images, False)
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", test_labels, True)
    return tmp_path, (images, labels, test_images, test_labels)


def test_mnist_reads_local_idx_files(mnist_dir):
    path, (images, labels, test_images, test_labels) = mnist_dir
    task = make_task("mnist", data_dir=path, standardize="none")
    assert task.input_shape == (1, 28, 28) and task.n_outputs == 10
    assert np.array_equal(task.x_train[:, 0].numpy(), images.astype(np.float32))
    assert np.array_equal(task.y_train.numpy(), labels)
    assert np.array_equal(task.x_test[:, 0].numpy(), test_images.astype(np.float32))
    assert np.array_equal(task.y_test.numpy(), test_labels)
    sub = make_task("mnist", data_dir=str(path), n_train=10, n_test=5, seed=3)
    again = make_task("mnist", data_dir=str(path), n_train=10, n_test=5, seed=3)
    assert sub.x_train.shape == (10, 1, 28, 28) and torch.equal(sub.x_train, again.x_train)
    flat = sub.x_train.reshape(10, -1).double()
    assert torch.allclose(flat.mean(0), torch.zeros(784, dtype=torch.double), atol=1e-5)
    # each picked image, unscaled, is one of the files' images with its own label
    raw = make_task("mnist", data_dir=str(path), n_train=10, n_test=5, seed=3, standardize="none")
    for img, label in zip(raw.x_train[:, 0].numpy(), raw.y_train.numpy()):
        (match,) = np.flatnonzero((images == img).all((1, 2)))
        assert labels[match] == label
    with pytest.raises(ValueError, match="n_train=31 but the MNIST files hold 30 images"):
        make_task("mnist", data_dir=path, n_train=31)


def test_mnist_without_data_dir_is_a_clear_error():
    with pytest.raises(ValueError, match="task 'mnist' needs data_dir"):
        make_task("mnist")


# --------------------------------------------------------------------------- errors, loss
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"name": "cifar"}, "unknown task 'cifar'; expected one of: digits, mnist1d, adding"),
        ({"name": "digits", "standardize": "z"}, "unknown standardize 'z'; expected one of"),
        ({"name": "adding", "seq_len": 1}, "seq_len must be an integer >= 2"),
        ({"name": "teacher", "n_classes": 1}, "n_classes must be an integer >= 2"),
        ({"name": "digits", "n_train": 1500, "n_test": 400}, "do not fit"),
        ({"name": "digits", "n_train": -1}, "n_train must be an integer >= 0"),
    ],
)
def test_bad_task_config_is_a_one_line_error(kwargs, match):
    with pytest.raises(ValueError, match=match) as err:
        make_task(**kwargs)
    assert "\n" not in str(err.value)


def test_regression_loss_and_metric_are_the_mean_squared_error():
    task = make_task("adding", seq_len=5, n_train=8, n_test=8)
    out = torch.randn(8, 1)
    expected = ((out - task.y_test) ** 2).mean()
    assert torch.allclose(task.loss(out, task.y_test), expected)
    assert math.isclose(task.metric(out, task.y_test), expected.item(), rel_tol=1e-6)


def test_task_names():
    assert TASKS == ("digits", "mnist1d", "adding", "copy", "teacher", "mnist")
    assert isinstance(make_task("teacher", n_train=4, n_test=4), Task)
