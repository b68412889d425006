"""Rendering speed and memory of reports on a large run (100 layers, 100k steps).

Builds a synthetic run directory in the documented format (manifest.json, steps/, metrics/ parts
of ``flush_every`` steps, as ``vanishing.watch`` writes them; values follow a vanishing profile
with noise and planted spikes), then times reading it, rendering every plot (PNG + SVG) and
writing the HTML report, and reports the peak resident memory.

    .venv/bin/python bench/report.py                       # 100 layers x 100k steps
    .venv/bin/python bench/report.py --layers 20 --steps 5000   # a quick look
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from vanishing.recorder.schema import METRIC_COLUMNS

#: every float column of the metrics table, from the schema (step, layer, param, depth first)
METRIC_FLOATS = METRIC_COLUMNS[4:]


def manifest(layers: int, width: int = 32) -> dict:
    """A manifest for ``layers`` hidden Linear+Sigmoid pairs and a Linear output, forward order."""
    info, depth = [], 0
    for i in range(layers):
        params = [
            {
                "name": "weight",
                "shape": [width, width],
                "numel": width * width,
                "trainable": True,
                "shared_with": [],
            },
            {
                "name": "bias",
                "shape": [width],
                "numel": width,
                "trainable": True,
                "shared_with": [],
            },
        ]
        info.append(
            {
                "name": f"net.{2 * i}",
                "depth": depth,
                "type": "Linear",
                "role": "layer",
                "activation": "sigmoid",
                "recurrent": False,
                "params": params,
                "num_params": width * width + width,
                "ran_forward": True,
            }
        )
        info.append(
            {
                "name": f"net.{2 * i + 1}",
                "depth": depth + 1,
                "type": "Sigmoid",
                "role": "activation",
                "activation": "sigmoid",
                "recurrent": False,
                "params": [],
                "num_params": 0,
                "ran_forward": True,
            }
        )
        depth += 2
    info.append(
        {
            "name": f"net.{2 * layers}",
            "depth": depth,
            "type": "Linear",
            "role": "layer",
            "activation": None,
            "recurrent": False,
            "params": [
                {
                    "name": "weight",
                    "shape": [10, width],
                    "numel": 10 * width,
                    "trainable": True,
                    "shared_with": [],
                },
                {"name": "bias", "shape": [10], "numel": 10, "trainable": True, "shared_with": []},
            ],
            "num_params": 10 * width + 10,
            "ran_forward": True,
        }
    )
    return {
        "schema_version": 1,
        "created": "2026-01-01T00:00:00+00:00",
        "status": "closed",
        "forward_order_known": True,
        "steps_completed": 0,
        "model": "Synthetic",
        "device": "cpu",
        "stats": "all",
        "schedule": "every(1)",
        "flush_every": 50,
        "optimizer": {"type": "SGD", "defaults": {"lr": 0.1}},
        "amp_scaler": False,
        "layers": info,
        "versions": {"vanishing": "bench", "torch": "-", "python": "-"},
    }


def make_run(
    path: Path,
    *,
    layers: int = 100,
    steps: int = 100_000,
    flush_every: int = 50,
    seed: int = 0,
    spike_step: int | None = None,
    spike: float = 1e3,
) -> Path:
    """Write a synthetic run directory; a gradient spike (the first layer's weight gradient
    times ``spike``) at ``spike_step`` (default: one third of the way) tests that downsampling
    keeps extremes."""
    import pyarrow as pa

    from vanishing.recorder.writer import RunWriter

    rng = np.random.default_rng(seed)
    m = manifest(layers)
    m["steps_completed"] = steps
    m["flush_every"] = flush_every
    writer = RunWriter(path)
    writer.write_manifest(m)
    spike_at = steps // 3 if spike_step is None else spike_step
    param_layers = [x for x in m["layers"] if x["role"] == "layer"]
    act_layers = [x for x in m["layers"] if x["role"] == "activation"]
    P = 2 * len(param_layers)
    p_layer = np.array([x["name"] for x in param_layers for _ in (0, 1)], dtype=object)
    p_param = np.array(["weight", "bias"] * len(param_layers), dtype=object)
    p_depth = np.array([x["depth"] for x in param_layers for _ in (0, 1)], dtype=np.int32)
    # vanishing: the gradient shrinks ~x0.8 per layer towards the input
    p_level = np.array(
        [-3.0 - 0.1 * (len(param_layers) - 1 - i) for i in range(len(param_layers)) for _ in (0, 1)]
    )
    m_names = np.array(
        [x["name"] for x in param_layers] + [x["name"] for x in act_layers], dtype=object
    )
    m_depth = np.array(
        [x["depth"] for x in param_layers] + [x["depth"] for x in act_layers], dtype=np.int32
    )
    M = len(m_names)
    n_lay = len(param_layers)
    for start in range(0, steps, flush_every):
        s = np.arange(start, min(start + flush_every, steps), dtype=np.int64)
        n = len(s)
        g = 10 ** (p_level[None, :] + 0.2 * rng.standard_normal((n, P)))
        if start <= spike_at < start + n:
            g[spike_at - start, 0] *= spike
        pn = np.full((n, P), 5.0) + 0.01 * rng.standard_normal((n, P))
        un = 0.1 * g
        cols = {
            "step": np.repeat(s, P),
            "layer": np.tile(p_layer, n),
            "param": np.tile(p_param, n),
            "depth": np.tile(p_depth, n),
            "grad_norm": g.ravel(),
            "param_norm": pn.ravel(),
            "update_norm": un.ravel(),
            "grad_nonfinite": np.zeros(n * P),
            "param_nonfinite": np.zeros(n * P),
            "grad_ratio": (g / pn).ravel(),
            "update_ratio": (un / pn).ravel(),
        }
        err = np.full((n, M), np.nan)
        err[:, :n_lay] = 10 ** (p_level[::2][None, :] - 1 + 0.1 * rng.standard_normal((n, n_lay)))
        act = {
            c: np.full((n, M), np.nan)
            for c in ("act_mean", "act_std", "act_deriv_mean", "act_saturated", "act_dead")
        }
        frac = np.linspace(0, 1, M - n_lay)[None, :]
        act["act_mean"][:, n_lay:] = 0.5 + 0.4 * frac + 0.02 * rng.standard_normal((n, M - n_lay))
        act["act_std"][:, n_lay:] = 0.1 + 0.05 * rng.random((n, M - n_lay))
        act["act_deriv_mean"][:, n_lay:] = (
            0.24 - 0.2 * frac + 0.005 * rng.standard_normal((n, M - n_lay))
        )
        act["act_saturated"][:, n_lay:] = np.clip(
            0.6 * frac + 0.05 * rng.standard_normal((n, M - n_lay)), 0, 1
        )
        act["act_p02"] = act["act_mean"] - 2 * act["act_std"]
        act["act_p98"] = act["act_mean"] + 2 * act["act_std"]
        mcols = {
            "step": np.repeat(s, M),
            "layer": np.tile(m_names, n),
            "param": np.full(n * M, "", dtype=object),
            "depth": np.tile(m_depth, n),
            "error_norm": err.ravel(),
            **{c: v.ravel() for c, v in act.items()},
        }
        for c in METRIC_FLOATS:  # the statistics a row kind does not have are NaN
            cols.setdefault(c, np.full(n * P, np.nan))
            mcols.setdefault(c, np.full(n * M, np.nan))

        def column(name, p=cols, q=mcols):
            v = np.concatenate([p[name], q[name]])
            if name in ("layer", "param"):
                return pa.array(v, type=pa.string())
            if name == "step":
                return pa.array(v, type=pa.int64())
            if name == "depth":
                return pa.array(v, type=pa.int32())
            return pa.array(v, type=pa.float64())

        names = ["step", "layer", "param", "depth", *METRIC_FLOATS]
        metrics = pa.table({c: column(c) for c in names})
        loss = 2.3 * np.exp(-s / (steps / 3)) + 0.05 * rng.random(n)
        steps_t = pa.table(
            {
                "step": s,
                "time": 1.7e9 + s * 0.01,
                "loss": loss,
                "loss_nonfinite": np.zeros(n),
                "n_backward": np.ones(n, dtype=np.int64),
                "grad_nonfinite": np.zeros(n),
                "param_nonfinite": np.zeros(n),
                "skipped": np.zeros(n, dtype=np.int64),
            }
        )
        writer.write_block({"metrics": metrics, "steps": steps_t})
    (path / "config.json").write_text(json.dumps({"name": "synthetic", "seed": seed}))
    return path


def _cpu() -> float:
    """CPU seconds of this process (user + system): wall time on an idle machine, roughly; a
    shared machine's load inflates wall time, not this."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=100)
    ap.add_argument("--steps", type=int, default=100_000)
    ap.add_argument("--flush-every", type=int, default=50)
    ap.add_argument("--keep", type=Path, default=None, help="build the run here (once) and keep it")
    ap.add_argument("--build-only", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.build_only:
        make_run(args.keep, layers=args.layers, steps=args.steps, flush_every=args.flush_every)
        return
    tmp = Path(tempfile.mkdtemp(prefix="vanishing-bench-report-"))
    run_dir = args.keep or tmp / "run"
    try:
        if not (run_dir / "manifest.json").exists():
            t0 = time.perf_counter()
            # built in a child process, so that the peak memory below is the report's alone
            subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--build-only",
                    "--keep",
                    str(run_dir),
                    "--layers",
                    str(args.layers),
                    "--steps",
                    str(args.steps),
                    "--flush-every",
                    str(args.flush_every),
                ],
                check=True,
            )
            size = sum(p.stat().st_size for p in run_dir.rglob("*.parquet")) / 2**20
            print(f"built {run_dir}: {time.perf_counter() - t0:.1f} s, {size:.0f} MiB on disk")
        t0 = time.perf_counter()
        import matplotlib.figure  # noqa: F401
        import pandas  # noqa: F401
        import pyarrow.parquet  # noqa: F401

        from vanishing.report import plots
        from vanishing.report.data import RunData
        from vanishing.report.html import write_report

        t_import = time.perf_counter() - t0
        t1, c1 = time.perf_counter(), _cpu()
        out = write_report(run_dir, tmp / "report.html")
        t_html, c_html = time.perf_counter() - t1, _cpu() - c1
        rss_html = _peak_mib()
        t2 = time.perf_counter()
        data = RunData(run_dir)
        n = 0
        for name, fn in plots.RUN_PLOTS:
            fig = fn(data)
            if fig is not None:
                plots.save_figure(fig, tmp / name)
                n += 1
        t_plots = time.perf_counter() - t2
        read, total = data.coverage
        print(
            f"{args.layers} layers x {total} steps, flush_every {args.flush_every}: "
            f"{len(data.parts)} metrics parts, {sum(p['rows'] for p in data.parts):,} metric rows"
        )
        print(
            f"metrics read: {len(data.read_parts)} parts ({read} steps), "
            f"{len(data.buckets)} time buckets, {len(data.sample_steps)} sampled steps"
        )
        print(f"imports (pandas, pyarrow, matplotlib, vanishing.report): {t_import:.2f} s")
        print(
            f"HTML report (read + diagnosis + {n} plots as PNG, {out.stat().st_size / 2**20:.1f} MiB): "
            f"{t_html:.2f} s wall, {c_html:.2f} s CPU, peak RSS {rss_html:.0f} MiB"
        )
        print(f"all {n} plots again from a fresh read, saved as PNG + SVG: {t_plots:.2f} s")
        print(f"peak RSS overall: {_peak_mib():.0f} MiB")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
