"""The logger sinks, each read back with its own library's reader and compared with the run
directory's records (``vanishing.load_run``), which are the reference."""

import glob
import json
import math
import struct
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

import vanishing
from helpers import mlp, train
from test_sink_scalars import MLP, block
from vanishing.sinks import MissingExtraError, by_name

STEPS, FLUSH = 10, 4


def watched(run_dir, sinks):
    """A 6-hidden-layer sigmoid MLP trained 10 steps, blocks of 4, 4 and 2 steps."""
    torch.manual_seed(0)
    model = mlp(depth=6, width=8, act=nn.Sigmoid)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    with vanishing.watch(model, opt, run_dir=run_dir, sinks=sinks, flush_every=FLUSH):
        train(model, opt, steps=STEPS)
    return vanishing.load_run(run_dir)


def expected(run, max_layers=3):
    """{tag: {step: value}} computed from the run directory's tables, independently of the
    ScalarSelector: speeds from ``Run.speeds``, ratios from the metrics table."""
    hidden = run.hidden
    first, last = hidden[0], hidden[-1]
    speeds = run.speeds()
    metrics = run.metrics
    weights = metrics[metrics.param == "weight"]
    first_block = sorted(run.steps.step)[:FLUSH]
    rel = speeds.loc[first_block].div(speeds.loc[first_block, last], axis=0).median()
    chosen = list(dict.fromkeys([first, last, rel.idxmin()]))[:max_layers]
    series = {
        "vanishing/loss": run.steps.set_index("step")["loss"],
        "vanishing/first_last_ratio": speeds[first] / speeds[last],
        "vanishing/worst_update_ratio": weights.groupby("step")["update_ratio"].min(),
    }
    for layer in chosen:
        series[f"vanishing/grad_norm/{layer}"] = speeds[layer]
        rows = weights[weights.layer == layer].set_index("step")
        series[f"vanishing/update_ratio/{layer}"] = rows["update_ratio"]
    out = {
        tag: {int(s): float(v) for s, v in values.items() if np.isfinite(v)}
        for tag, values in series.items()
    }
    return {tag: values for tag, values in out.items() if values}, chosen


# ---------------------------------------------------------------- TensorBoard


def test_tensorboard_scalars_match_the_run_directory(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from vanishing.sinks import TensorBoardSink

    tb = tmp_path / "tb"
    sink = TensorBoardSink(tb)
    run = watched(tmp_path / "run", [sink])
    want, chosen = expected(run)
    assert chosen[:2] == ["0", "10"]  # here the first hidden layer is also the worst
    assert np.median(list(want["vanishing/first_last_ratio"].values())) == pytest.approx(
        run.first_last_ratio()
    )
    events = EventAccumulator(str(tb))
    events.Reload()
    assert sorted(events.Tags()["scalars"]) == sorted(want)
    for tag, values in want.items():
        got = {e.step: e.value for e in events.Scalars(tag)}
        assert sorted(got) == sorted(values), tag
        assert got == pytest.approx(values, rel=1e-6), tag  # TensorBoard stores float32
    assert sink.writer is None  # the writer it created is closed


def test_tensorboard_given_writer_is_flushed_not_closed(tmp_path):
    from vanishing.sinks import TensorBoardSink

    class Writer:
        def __init__(self):
            self.scalars, self.flushed, self.closed = [], 0, False

        def add_scalar(self, tag, value, global_step):
            self.scalars.append((global_step, tag, value))

        def flush(self):
            self.flushed += 1

        def close(self):
            self.closed = True

    writer = Writer()
    run = watched(tmp_path / "run", [TensorBoardSink(tmp_path / "unused", writer=writer)])
    want, _ = expected(run)
    got = {}
    for step, tag, value in writer.scalars:
        got.setdefault(tag, {})[step] = value
    assert sorted(got) == sorted(want)
    for tag, values in want.items():
        assert got[tag] == pytest.approx(values), tag
    assert writer.flushed == 1 and not writer.closed
    assert not (tmp_path / "unused").exists()


def test_unwritable_tensorboard_dir_warns_and_the_run_is_complete(tmp_path):
    from vanishing.sinks import TensorBoardSink

    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")  # works as root too, unlike chmod
    with pytest.warns(RuntimeWarning, match=r"TensorBoardSink\.open failed"):
        run = watched(tmp_path / "run", [TensorBoardSink(blocker / "tb")])
    assert list(run.steps.step) == list(range(STEPS))
    assert run.manifest["status"] == "completed"
    assert set(run.metrics.layer) >= set(run.hidden)


# ---------------------------------------------------------------- MLflow


@pytest.fixture
def mlflow_uri(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 asks for it
    return f"file://{tmp_path}/mlruns"


def test_mlflow_metrics_match_the_run_directory(tmp_path, mlflow_uri):
    from mlflow.tracking import MlflowClient

    from vanishing.sinks import MLflowSink

    sink = MLflowSink(tracking_uri=mlflow_uri, experiment="sinks-test")
    run = watched(tmp_path / "run", [sink])
    want, _ = expected(run)
    client = MlflowClient(tracking_uri=mlflow_uri)
    logged = client.get_run(sink.run_id)
    assert logged.info.status == "FINISHED"  # it started the run, so it ended it
    assert client.get_experiment(logged.info.experiment_id).name == "sinks-test"
    assert sorted(logged.data.metrics) == sorted(want)  # layer names "0".."10" need no change
    for tag, values in want.items():
        got = {m.step: m.value for m in client.get_metric_history(sink.run_id, tag)}
        assert got == pytest.approx(values, rel=1e-12), tag


def test_mlflow_uses_the_active_run_and_leaves_it_open(tmp_path, mlflow_uri, monkeypatch):
    import mlflow

    from vanishing.sinks import MLflowSink

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_uri)
    with mlflow.start_run() as active:
        sink = MLflowSink()
        run = watched(tmp_path / "run", [sink])
        assert sink.run_id == active.info.run_id
        assert mlflow.active_run().info.run_id == active.info.run_id
        assert mlflow.tracking.MlflowClient().get_run(sink.run_id).info.status == "RUNNING"
        history = mlflow.tracking.MlflowClient().get_metric_history(sink.run_id, "vanishing/loss")
        assert {m.step: m.value for m in history} == pytest.approx(
            expected(run)[0]["vanishing/loss"]
        )


def test_mlflow_one_batch_per_block_split_at_the_limit():
    from vanishing.sinks import MLflowSink
    from vanishing.sinks.mlflow import BATCH_LIMIT

    n = 150

    class Client:
        calls = []

        def log_batch(self, run_id, metrics):
            self.calls.append((run_id, list(metrics)))

    # 150 steps x 7 scalars (loss, 2 ratios, grad norm and update ratio of layers 0 and 4; the
    # worst relative to "4" is "0" itself) = 1050 metrics: two calls, 1000 + 50
    sink = MLflowSink(run="abc")
    sink.selector.observe_manifest(MLP)
    sink._client, sink.run_id = Client(), "abc"
    grads = {(layer, "bias"): np.full(n, 1.0 + d) for d, layer in enumerate(["0", "2", "4"])}
    updates = {(layer, "weight"): np.full(n, 0.1) for layer in ["0", "2", "4", "6"]}
    b = block(
        MLP,
        list(range(n)),
        step={"loss": np.ones(n)},
        param={"grad_norm": grads, "update_norm": updates, "param_norm": updates},
    )
    b.times = np.full(n, 1700000000.5)
    sink.write(b)
    sizes = [len(m) for _, m in Client.calls]
    assert sizes == [BATCH_LIMIT, n * 7 - BATCH_LIMIT]
    metric = Client.calls[0][1][0]
    assert (metric.key, metric.value, metric.step, metric.timestamp) == (
        "vanishing/loss",
        1.0,
        0,
        1700000000500,
    )


def test_mlflow_keys_are_sanitised():
    from vanishing.sinks.mlflow import metric_key

    assert (
        metric_key("vanishing/grad_norm/enc.layers.0-a_b") == "vanishing/grad_norm/enc.layers.0-a_b"
    )
    assert metric_key("vanishing/grad_norm/a:b c(d)é") == "vanishing/grad_norm/a_b_c_d__"
    assert metric_key("vanishing/update_ratio/..") == "vanishing/update_ratio/_.."
    long = metric_key("vanishing/grad_norm/" + "x" * 300)
    assert len(long) == 250 and long != metric_key("vanishing/grad_norm/" + "x" * 301)


# ---------------------------------------------------------------- Weights & Biases


def read_wandb_history(path):
    """History rows of an offline ``.wandb`` file: a LevelDB-log-format file (7-byte header,
    32 KiB blocks of records, each ``crc32 | length u16 | type u8 | data``), each record a
    ``wandb.proto.wandb_internal_pb2.Record``. wandb 0.31 has no Python reader of its own (its
    reader is in the Go core), so this is the format's own definition, read with wandb's protos."""
    from wandb.proto import wandb_internal_pb2 as pb

    with open(path, "rb") as f:
        data = f.read()
    assert data[:4] == b":W&B"
    block_size, pos, records, pending = 32768, 7, [], b""
    while pos + 7 <= len(data):
        left = block_size - pos % block_size
        if left < 7:  # the rest of a block too short for a header is padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0 and length == 0:
            pos += left
            continue
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind == 1:  # full
            records.append(chunk)
        elif kind == 2:  # first
            pending = chunk
        elif kind == 3:  # middle
            pending += chunk
        elif kind == 4:  # last
            records.append(pending + chunk)
    rows, metrics = [], []
    for raw in records:
        record = pb.Record()
        record.ParseFromString(raw)
        kind = record.WhichOneof("record_type")
        if kind == "history":
            rows.append(
                {
                    (item.key or "/".join(item.nested_key)): json.loads(item.value_json)
                    for item in record.history.item
                }
            )
        elif kind == "metric":
            metrics.append(record.metric)
    return rows, metrics


@pytest.fixture
def wandb_offline(tmp_path, monkeypatch):
    import wandb

    # wandb keeps its settings (WANDB_DIR among them) in a process-wide singleton made by the
    # first wandb call: tear it down so that this test's directory is the one used
    wandb.teardown()
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    yield tmp_path
    wandb.teardown()


def test_wandb_history_matches_the_run_directory(tmp_path, wandb_offline):
    import wandb

    from vanishing.sinks import WandbSink

    sink = WandbSink(project="sinks-test")
    run = watched(tmp_path / "run", [sink])
    assert wandb.run is None  # it started the run, so it finished it
    want, _ = expected(run)
    (path,) = glob.glob(str(wandb_offline / "wandb" / "offline-run-*" / "run-*.wandb"))
    rows, metrics = read_wandb_history(path)
    assert any(m.glob_name == "vanishing/*" and m.step_metric == "vanishing/step" for m in metrics)
    ours = [r for r in rows if "vanishing/step" in r]
    assert [r["vanishing/step"] for r in ours] == list(range(STEPS))
    got = {}
    for r in ours:
        for tag, value in r.items():
            if tag != "vanishing/step" and not tag.startswith("_"):  # wandb's _step, _runtime
                got.setdefault(tag, {})[r["vanishing/step"]] = value
    assert sorted(got) == sorted(want)
    for tag, values in want.items():
        assert got[tag] == pytest.approx(values, rel=1e-12), tag


def test_wandb_uses_the_current_run_and_leaves_it_running(tmp_path, wandb_offline):
    import wandb

    from vanishing.sinks import WandbSink

    current = wandb.init(project="sinks-test")
    try:
        sink = WandbSink()
        watched(tmp_path / "run", [sink])
        assert sink.run is current and wandb.run is current
        current.log({"mine": 1.0})  # the user's own logging still works
    finally:
        current.finish()


# ---------------------------------------------------------------- names and extras


def test_importing_sinks_imports_no_logger_library():
    code = (
        "import sys, vanishing.sinks as s; s.ScalarSelector; "
        "print([m for m in ('tensorboard', 'torch.utils.tensorboard', 'mlflow', 'wandb') "
        "if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize(
    "module, sink, make",
    [
        ("tensorboard", "TensorBoardSink", lambda s, tmp: s.TensorBoardSink(tmp)),
        ("mlflow", "MLflowSink", lambda s, tmp: s.MLflowSink()),
        ("wandb", "WandbSink", lambda s, tmp: s.WandbSink()),
    ],
)
def test_a_missing_library_names_its_extra(module, sink, make, tmp_path, monkeypatch):
    import vanishing.sinks as sinks

    monkeypatch.setitem(sys.modules, module, None)  # as if not installed: import fails
    with pytest.raises(MissingExtraError) as err:
        make(sinks, tmp_path)
    assert isinstance(err.value, ImportError)
    assert str(err.value) == f'{sink} needs {module}: pip install "vanishing[{module}]"'
    with pytest.raises(MissingExtraError, match=f"vanishing\\[{module}\\]"):
        by_name(module, tmp_path)


def test_by_name(tmp_path, mlflow_uri):
    from vanishing.sinks import MLflowSink, TensorBoardSink, WandbSink

    tb = by_name("tensorboard", tmp_path / "run")
    assert isinstance(tb, TensorBoardSink) and tb.log_dir == tmp_path / "run" / "tensorboard"
    tb = by_name("TensorBoard", tmp_path, log_dir=tmp_path / "elsewhere", max_layers=1)
    assert tb.log_dir == tmp_path / "elsewhere" and tb.selector.max_layers == 1
    ml = by_name("mlflow", tmp_path, tracking_uri=mlflow_uri, experiment="e")
    assert isinstance(ml, MLflowSink) and ml.tracking_uri == mlflow_uri
    wb = by_name("wandb", tmp_path, project="p", max_layers=2)
    assert isinstance(wb, WandbSink) and wb.init_kwargs == {"project": "p"}
    with pytest.raises(ValueError, match="known: mlflow, tensorboard, wandb"):
        by_name("parquet", tmp_path)


def test_tags_are_few_for_a_deep_model(tmp_path):
    """The bounded-volume rule on a real run: 40 hidden layers, still at most 10 tags."""
    from vanishing.sinks.scalars import ScalarSelector

    class Keep:
        def open(self, manifest):
            self.sel, self.rows = ScalarSelector(), []
            self.sel.observe_manifest(manifest)

        def write(self, b):
            self.rows += self.sel.scalars(b)

        def close(self):
            pass

    keep = Keep()
    model = mlp(depth=40, width=4, act=nn.Tanh)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with vanishing.watch(model, opt, run_dir=tmp_path / "run", sinks=[keep], flush_every=2):
        train(model, opt, steps=3)
    tags = set().union(*(set(t) for _, t in keep.rows))
    assert len(tags) <= 10
    assert not any(math.isnan(v) for _, t in keep.rows for v in t.values())


def test_clipping_probe_columns_become_tags(tmp_path):
    from vanishing.probes import ClippingProbe
    from vanishing.sinks import TensorBoardSink

    class Writer:
        scalars = {}

        def add_scalar(self, tag, value, global_step):
            self.scalars[(tag, global_step)] = value

    model = mlp(depth=2, width=4)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sink = TensorBoardSink(tmp_path / "tb", writer=Writer())
    rd = tmp_path / "run"
    with vanishing.watch(model, opt, run_dir=rd, sinks=[sink], probes=[ClippingProbe()]):
        for _ in range(2):
            opt.zero_grad()
            (100 * model(torch.randn(8, 5))).pow(2).mean().backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=1.0)
            opt.step()
    steps = vanishing.load_run(rd).steps.set_index("step")
    for step in (0, 1):
        for name in ("grad_norm_backward", "grad_norm_step"):
            assert Writer.scalars[(f"vanishing/{name}", step)] == pytest.approx(steps[name][step])
    assert ("vanishing/amp_scale", 0) not in Writer.scalars
