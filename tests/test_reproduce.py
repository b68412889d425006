"""`vanishing reproduce nielsen`: Nielsen's network2 checked against an independent numpy
backprop (BP1-BP4), his update rule, the qualitative result of his chapter 5, and the CLI."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from test_idx import write_idx, write_mnist
from vanishing.experiments.idx import MNIST_FILES
from vanishing.experiments.reproductions import nielsen


def _cli(*args, cwd=None):
    # a fixed width: the child's COLUMNS otherwise depends on the runner (under pytest 9.2
    # subprocesses were seen to get COLUMNS=80, which wraps the table headers asserted on)
    return subprocess.run(
        [sys.executable, "-m", "vanishing", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
        env={**os.environ, "COLUMNS": "120"},
    )


def _sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


def numpy_network2(weights, biases, x, y, *, steps, eta=0.1, lmbda=5.0):
    """Nielsen's network2.py in numpy: full-batch GD with cross-entropy, L2 on the weights.

    Returns the speed of learning ||dC/db_l|| of each hidden layer before each update, from the
    four backpropagation equations (BP1 for the cross-entropy cost with sigmoid output: delta^L =
    a^L - y; BP2 delta^l = (W^{l+1}T delta^{l+1}) * sigma'(z^l); BP3 dC/db = delta; BP4
    dC/dW = delta a^{l-1}T), averaged over the batch.
    """
    W = [w.copy() for w in weights]
    B = [b.copy() for b in biases]
    n, L = len(x), len(W)
    speeds = []
    for _ in range(steps):
        acts = [x.T]
        for w, b in zip(W, B):
            acts.append(_sigmoid(w @ acts[-1] + b[:, None]))
        nabla_b, nabla_w = [None] * L, [None] * L
        delta = acts[-1] - y.T  # BP1
        for layer in range(L - 1, -1, -1):
            nabla_b[layer] = delta.sum(axis=1) / n  # BP3
            nabla_w[layer] = delta @ acts[layer].T / n  # BP4
            if layer:
                delta = (W[layer].T @ delta) * acts[layer] * (1 - acts[layer])  # BP2
        speeds.append([np.linalg.norm(g) for g in nabla_b[:-1]])
        W = [(1 - eta * lmbda / n) * w - eta * gw for w, gw in zip(W, nabla_w)]
        B = [b - eta * gb for b, gb in zip(B, nabla_b)]
    return np.array(speeds)


def _params(model):
    linears = [m for m in model if isinstance(m, torch.nn.Linear)]
    weights = [m.weight.detach().double().numpy() for m in linears]
    biases = [m.bias.detach().double().numpy() for m in linears]
    return weights, biases


def test_recorded_speeds_equal_numpy_backprop_step_by_step(tmp_path):
    x, y, _ = nielsen.load_data(dtype=torch.float64)
    sizes = [64, 30, 30, 30, 10]
    run_dir = nielsen.train_net(sizes, x, y, seed=3, steps=8, run_dir=tmp_path / "r")
    recorded = nielsen.speeds_from_run(run_dir)
    weights, biases = _params(nielsen.build_net(sizes, seed=3, dtype=torch.float64))
    expected = numpy_network2(weights, biases, x.numpy(), y.numpy(), steps=8)
    assert recorded.shape == (8, 3)
    np.testing.assert_allclose(recorded, expected, rtol=1e-9)
    assert not np.allclose(recorded[0], recorded[-1])  # the weights did move


def test_float32_speeds_match_autograd_at_init(tmp_path):
    x, y, _ = nielsen.load_data()
    sizes = [64, 30, 30, 10]
    run_dir = nielsen.train_net(sizes, x, y, seed=1, steps=1, run_dir=tmp_path / "r")
    model = nielsen.build_net(sizes, seed=1)
    biases = [m.bias for m in model if isinstance(m, torch.nn.Linear)][:-1]
    grads = torch.autograd.grad(nielsen.cost(model(x), y), biases)
    np.testing.assert_allclose(
        nielsen.speeds_from_run(run_dir)[0], [float(g.norm()) for g in grads], rtol=1e-5
    )


def test_cost_is_nielsens_cross_entropy():
    rng = np.random.default_rng(0)
    a = rng.uniform(0.01, 0.99, (7, 10))
    y = np.eye(10)[rng.integers(0, 10, 7)]
    expected = -np.sum(y * np.log(a) + (1 - y) * np.log(1 - a)) / 7
    assert float(nielsen.cost(torch.tensor(a), torch.tensor(y))) == pytest.approx(
        expected, rel=1e-12
    )


def test_update_is_nielsens_formula():
    model = nielsen.build_net([6, 5, 4, 3], seed=0, dtype=torch.float64)
    opt = nielsen.make_optimizer(model, eta=0.1, lmbda=5.0, n=20)
    x = torch.rand(20, 6, dtype=torch.float64)
    y = torch.nn.functional.one_hot(torch.randint(0, 3, (20,)), 3).double()
    nielsen.cost(model(x), y).backward()
    before = {k: (p.detach().clone(), p.grad.clone()) for k, p in model.named_parameters()}
    opt.step()
    for name, p in model.named_parameters():
        w, g = before[name]
        decay = 1 - 0.1 * 5.0 / 20 if name.endswith("weight") else 1.0  # no L2 on biases
        torch.testing.assert_close(p.detach(), decay * w - 0.1 * g, rtol=1e-15, atol=1e-15)


def test_initialisation_is_nielsens():
    net = nielsen.build_net([784, 30, 30, 10], seed=0)
    first, hidden = net[0], net[2]
    assert float(first.weight.detach().std()) == pytest.approx(1 / 28, rel=0.03)  # N(0, 1/784)
    assert float(hidden.weight.detach().std()) == pytest.approx(
        1 / np.sqrt(30), rel=0.05
    )  # N(0, 1/30)
    biases = torch.cat([m.bias for m in net if isinstance(m, torch.nn.Linear)])
    assert float(biases.detach().std()) == pytest.approx(1.0, abs=0.2)  # N(0, 1), only 70 draws
    assert all(isinstance(m, torch.nn.Sigmoid) for m in net[1::2]) and len(net) == 6
    same = nielsen.build_net([784, 30, 30, 10], seed=0)
    other = nielsen.build_net([784, 30, 30, 10], seed=1)
    assert torch.equal(net[0].weight, same[0].weight)
    assert not torch.equal(net[0].weight, other[0].weight)


def test_digits_data_is_scaled_like_nielsens_mnist():
    x, y, name = nielsen.load_data()
    from sklearn.datasets import load_digits

    digits = load_digits()
    assert name == "digits" and x.shape == (1000, 64)
    np.testing.assert_allclose(x.numpy(), digits.data[:1000] / 16, rtol=1e-6)
    assert y.argmax(1).tolist() == digits.target[:1000].tolist() and torch.all(y.sum(1) == 1)


def test_earlier_layers_learn_slower_and_more_so_in_deeper_nets(tmp_path):
    """Nielsen ch. 5: at initialisation the speed rises with the hidden layer's index, and the
    gap between the first and last hidden layer widens as the net gets deeper."""
    result = nielsen.reproduce(seeds=5, steps=20, out=tmp_path / "n")
    assert [net.sizes for net in result.nets] == [[64] + [30] * k + [10] for k in (2, 3, 4)]
    ratios = []
    for net in result.nets:
        assert net.init == sorted(net.init), net.init
        assert all(b / a > 2 for a, b in zip(net.init, net.init[1:])), net.init
        ratios.append(net.init[0] / net.init[-1])
    assert ratios[0] > ratios[1] > ratios[2], ratios
    assert ratios[2] < 0.05  # four hidden layers: the first learns > 20x slower than the last
    # the curves are medians over seeds of what each run recorded
    deep = result.nets[-1]
    per_seed = np.stack([nielsen.speeds_from_run(d) for d in deep.run_dirs])
    assert per_seed.shape == (5, 20, 4)
    np.testing.assert_allclose(deep.curves, np.median(per_seed, axis=0))
    assert deep.final == pytest.approx(list(np.median(per_seed[:, -1], axis=0)))
    # training slows every layer down as the cost falls (Nielsen's plots)
    assert all(f < i for f, i in zip(deep.final, deep.init))

    figure = nielsen.plot_speeds(result)
    axes = figure.get_axes()
    assert len(axes) == 3 and all(ax.get_yscale() == "log" for ax in axes)
    assert [len(ax.get_lines()) for ax in axes] == [2, 3, 4]
    np.testing.assert_allclose(axes[2].get_lines()[0].get_ydata(), deep.curves[:, 0])
    png, svg = result.plots
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and b"<svg" in svg.read_bytes()[:500]
    saved = json.loads((result.out / "nielsen.json").read_text())
    assert saved["nets"] == result.to_dict()["nets"] and saved["data"] == "digits"


def test_bad_arguments_are_value_errors(tmp_path):
    with pytest.raises(ValueError, match="seeds must be a positive integer"):
        nielsen.reproduce(seeds=0, out=tmp_path / "a")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(ValueError, match="already exists and is not an empty directory"):
        nielsen.reproduce(seeds=1, steps=1, out=tmp_path / "full")
    with pytest.raises(ValueError, match="sizes must list"):
        nielsen.build_net([10], seed=0)


def test_cli_json_prints_only_the_schema(tmp_path):
    r = _cli("reproduce", "nielsen", "--json", "--seeds", 2, "--steps", 3, "--out", tmp_path / "o")
    payload = json.loads(r.stdout)  # nothing else on stdout
    # the contract's shape: name and checks (what, published, measured, tolerance, ok); the exit
    # code says whether every check passed
    assert payload["name"] == "nielsen" and r.returncode == (0 if payload["ok"] else 1), r.stderr
    assert payload["ok"] == all(c["ok"] for c in payload["checks"])
    assert all(
        list(c) == ["what", "published", "measured", "tolerance", "ok"] for c in payload["checks"]
    )
    # Nielsen's quoted speeds are the published side of the per-layer checks
    published = [c["published"] for c in payload["checks"] if "speed of layer" in c["what"]]
    assert published == [0.07, 0.31, 0.012, 0.06, 0.283, 0.003, 0.017, 0.07, 0.285]
    assert [sorted(net) for net in payload["nets"]] == [["final", "init", "sizes"]] * 3
    for net, depth in zip(payload["nets"], (2, 3, 4)):
        assert net["sizes"] == [64] + [30] * depth + [10]
        assert len(net["init"]) == len(net["final"]) == depth
        assert all(isinstance(v, float) and v > 0 for v in net["init"] + net["final"])
    runs = sorted(
        p.relative_to(tmp_path / "o").as_posix() for p in (tmp_path / "o").glob("*/seed-*")
    )
    assert runs == [f"{k}-hidden/seed-{s:02d}" for k in (2, 3, 4) for s in (0, 1)]
    for plot in ("speed.png", "speed.svg"):
        assert (tmp_path / "o" / plot).stat().st_size > 1000


def test_cli_table_on_digits(tmp_path):
    r = _cli("reproduce", "nielsen", "--quick", cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Nielsen (MNIST), init" in r.stdout and "measured, init" in r.stdout
    assert "0.003 < 0.017 < 0.07 < 0.285" in r.stdout  # Nielsen's speeds, beside ours
    assert "reproduced: 13 of 13 checks pass" in r.stdout and "(quick run)" in r.stdout
    (out,) = (tmp_path / "runs").glob("reproduce-nielsen-*")
    assert (out / "speed.png").is_file() and (out / "4-hidden" / "seed-00").is_dir()


def test_cli_mnist_from_tiny_idx_files(tmp_path):
    write_mnist(tmp_path / "mnist", n_train=1000, n_test=5, gz=True)
    r = _cli(
        "reproduce", "nielsen", "--json", "--seeds", 1, "--steps", 2,
        "--data-dir", tmp_path / "mnist", "--out", tmp_path / "o",
    )  # fmt: skip
    payload = json.loads(r.stdout)
    assert r.returncode == (0 if payload["ok"] else 1), r.stderr  # random pixels: may not match
    nets = payload["nets"]
    assert [net["sizes"][0] for net in nets] == [784] * 3
    assert json.loads((tmp_path / "o" / "nielsen.json").read_text())["data"] == "mnist"

    write_mnist(tmp_path / "small", n_train=999, n_test=5)
    r = _cli("reproduce", "nielsen", "--data-dir", tmp_path / "small", "--out", tmp_path / "s")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == [
        f"error: Nielsen's experiment trains on the first 1000 examples, but the MNIST training "
        f"set in {tmp_path / 'small'} has only 999"
    ]
    assert not (tmp_path / "s").exists() and r.stdout == ""


def test_cli_bad_input_exits_2_with_one_line(tmp_path):
    cases = [
        (("reproduce", "x"), "error: unknown experiment 'x'; available: nielsen"),
        (("reproduce", "all", "--seeds", 2), "error: --seeds only apply to nielsen"),
        (("reproduce", "nielsen", "--data-dir", tmp_path / "nope"), "error: --data-dir"),
        (
            ("reproduce", "nielsen", "--data-dir", tmp_path),
            "error: MNIST file train-images-idx3-ubyte not found",
        ),
        (("reproduce", "nielsen", "--seeds", 0), "error: --seeds must be at least 1"),
    ]
    for args, start in cases:
        r = _cli(*args, cwd=tmp_path)
        assert r.returncode == 2, (args, r.stdout, r.stderr)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(start), (args, r.stderr)
        assert r.stdout == ""
    # an --out that would be overwritten: refused before anything runs, exactly one line
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    r = _cli("reproduce", "nielsen", "--out", tmp_path / "full", cwd=tmp_path)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr == (
        f"error: {tmp_path / 'full'} already exists and is not an empty directory; "
        "pick a new --out\n"
    )
    # a corrupt file in the data directory is named in the error
    write_mnist(tmp_path / "m", n_train=3)
    write_idx(tmp_path / "m" / MNIST_FILES[0], np.zeros((3, 28, 28), np.uint8), code=0x07)
    r = _cli("reproduce", "nielsen", "--data-dir", tmp_path / "m")
    assert r.returncode == 2 and "bad magic number" in r.stderr and MNIST_FILES[0] in r.stderr


def test_checks_decide_by_their_stated_tolerance():
    from vanishing.experiments.reproductions.base import Check

    assert Check.within("x", published=1.0, measured=1.09, rel=0.1).ok
    assert not Check.within("x", published=1.0, measured=1.11, rel=0.1).ok
    assert Check.within("x", published=0.5, measured=0.52, abs=0.03).tolerance == "+-0.03"
    assert not Check.within("x", published=1.0, measured=float("nan"), rel=1.0).ok
    assert Check.factor("x", published=0.01, measured=0.019, factor=2).ok
    assert not Check.factor("x", published=0.01, measured=0.0049, factor=2).ok
    assert not Check.below("x", published=0.0, measured=0.01, limit=0.01).ok  # strict
    assert Check.above("x", published=0.0, measured=11, limit=10).ok
    with pytest.raises(ValueError, match="exactly one of rel= or abs="):
        Check.within("x", published=1.0, measured=1.0)
    # JSON-safe: an infinite measurement is a string, never invalid JSON
    json.dumps(Check.below("x", published=1, measured=float("inf"), limit=1).to_dict())


def test_gallery_embeds_every_check_table_and_plot_escaped(tmp_path):
    from matplotlib.figure import Figure

    from vanishing.experiments.reproductions.base import Check, Reproduction, Table, save_figure
    from vanishing.report.gallery import write_gallery

    fig = Figure()
    fig.subplots().plot([1, 2, 3])
    plots = save_figure(fig, tmp_path, "curve")
    good = Reproduction(
        "good", "A <b>title</b>", "Someone 2010", [Check.below("MSE", published=0.1, measured=0.05, limit=0.1)],
        tables=[Table("numbers", ["layer", "value"], [[1, 0.123456]])], plots=plots,
    )  # fmt: skip
    bad = Reproduction(
        "bad", "Other", "X 2011", [Check.above("gain", published=2, measured=1, limit=2)]
    )
    text = write_gallery([good, bad], tmp_path / "index.html", seconds={"good": 3.0}).read_text()
    assert "A &lt;b&gt;title&lt;/b&gt;" in text and "<b>title</b>" not in text
    assert "1 of 2 published results reproduced" in text
    assert text.count("data:image/png;base64,") == 1  # the PNG once, not its SVG twin
    assert "0.123" in text and "0.123456" not in text and "3 s" in text
    assert 'id="bad"' in text and "not reproduced" in text
