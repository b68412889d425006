"""Sweep throughput: the same sweep of many small runs with 1 worker and with 2 workers.

Run from the repository root::

    python bench/sweep.py                       # 24 runs of ~1 s, 1 vs 2 workers
    python bench/sweep.py --steps 150 --seeds 2 --rounds 2 --json sweep.json

The sweep is 3 activations x 2 depths x ``--seeds`` seeds of a width-32 MLP on the generated
``teacher`` task (2000 examples, batch 64), ``--steps`` SGD steps each, every step watched with
all statistics; each run also evaluates, writes its run directory and diagnoses itself. Each
timing is one whole ``run_sweep`` call into a fresh directory: expanding and validating the grid,
starting the worker processes, training every run and writing every store row. The forkserver
(which imports torch once for all workers) is started by a warm-up sweep before anything is timed,
so neither variant pays for it. With ``--rounds`` > 1 the variants alternate (1, 2, 2, 1, ...)
and the medians are compared.

The target is a speedup >= 1.7x on 2 cores. Run it on an otherwise idle machine: other processes
on the same cores take their share from the 2-worker variant first; the script prints the load
average before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

CONFIG = """
name = "bench-sweep"
seeds = {seeds}

[task]
name = "teacher"
n_train = 2000
n_test = 500

[model]
activation = ["sigmoid", "tanh", "relu"]
depth = [4, 8]
width = 32
init = "xavier_normal"

[train]
steps = {steps}
batch_size = 64
lr = 0.05
eval_every = 100
"""

WARM = '[task]\nname = "teacher"\nn_train = 64\n[model]\ndepth = 1\nwidth = 4\n[train]\nsteps = 2\n'


def _sweep(config: Path, out: Path, workers: int) -> tuple[float, list[dict]]:
    from vanishing.experiments.sweep import run_sweep

    start = time.perf_counter()
    _, rows = run_sweep(config, out, workers=workers)
    return time.perf_counter() - start, rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300, help="training steps per run")
    parser.add_argument("--seeds", type=int, default=4, help="seeds per grid point (6 points)")
    parser.add_argument("--rounds", type=int, default=1, help="timings per variant")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)

    root = Path(tempfile.mkdtemp(prefix="vanishing-bench-sweep-"))
    config = root / "sweep.toml"
    config.write_text(CONFIG.format(seeds=list(range(args.seeds)), steps=args.steps))
    warm = root / "warm.toml"
    warm.write_text(WARM)
    n_runs = 6 * args.seeds

    load_before = os.getloadavg()
    print(
        f"sweep of {n_runs} runs ({args.steps} steps each), 1 vs 2 workers; "
        f"{os.cpu_count()} cores, load average {load_before[0]:.2f}",
        flush=True,
    )
    if load_before[0] > 0.5:
        print("warning: the machine is busy; the speedup will be understated", file=sys.stderr)
    _sweep(warm, root / "warm", 1)  # starts the forkserver: not timed

    times: dict[int, list[float]] = {1: [], 2: []}
    run_seconds: dict[int, list[float]] = {1: [], 2: []}
    order = []
    for r in range(args.rounds):
        order += [1, 2] if r % 2 == 0 else [2, 1]
    for i, workers in enumerate(order):
        wall, rows = _sweep(config, root / f"w{workers}-{i}", workers)
        bad = [r["status"] for r in rows if r["status"] != "completed"]
        if bad:
            print(f"warning: {len(bad)} runs did not complete: {bad}", file=sys.stderr)
        times[workers].append(wall)
        run_seconds[workers] += [r["summary"]["seconds"] for r in rows]
        print(f"  {workers} worker{'s' if workers > 1 else ' '}: {wall:7.2f} s", flush=True)

    t1, t2 = statistics.median(times[1]), statistics.median(times[2])
    load_after = os.getloadavg()
    result = {
        "runs": n_runs,
        "steps": args.steps,
        "rounds": args.rounds,
        "wall_1_worker_s": round(t1, 2),
        "wall_2_workers_s": round(t2, 2),
        "speedup": round(t1 / t2, 2),
        "mean_run_s_1_worker": round(statistics.mean(run_seconds[1]), 3),
        "mean_run_s_2_workers": round(statistics.mean(run_seconds[2]), 3),
        "cores": os.cpu_count(),
        "load_before": round(load_before[0], 2),
        "load_after": round(load_after[0], 2),
    }
    print(
        f"1 worker {t1:.2f} s, 2 workers {t2:.2f} s: speedup {t1 / t2:.2f}x "
        f"(target >= 1.7x); mean run {result['mean_run_s_1_worker']:.2f} s alone, "
        f"{result['mean_run_s_2_workers']:.2f} s side by side; load average "
        f"{load_before[0]:.2f} -> {load_after[0]:.2f}"
    )
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
