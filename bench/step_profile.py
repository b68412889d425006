"""What the monitor's cost per recorded step is made of: torch profiler op counts and times.

For one model of ``bench/overhead.py``, profiles ``--steps`` training steps plain and the same
steps watched (statistics every step), and prints per aten op the calls and CPU time per step
that the watched loop adds: the measured make-up of the overhead (kernels and passes), not an
estimate. Python time outside aten ops (hooks, bookkeeping) is the remainder of the wall-time
difference, printed last.

    python bench/step_profile.py --model mlp --stats parameters
    python bench/step_profile.py --model transformer --stats all --steps 30
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from overhead import make_task, plain_step  # noqa: E402


def _profile(step, steps: int) -> tuple[dict[str, tuple[int, float]], float]:
    from torch.profiler import ProfilerActivity, profile

    for _ in range(3):
        step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            step()
        wall = time.perf_counter() - start
    ops: dict[str, list] = defaultdict(lambda: [0, 0.0])
    for e in prof.key_averages():
        ops[e.key][0] += e.count
        ops[e.key][1] += e.self_cpu_time_total  # us, the op's own time (children apart)
    return {k: (c, t) for k, (c, t) in ops.items()}, wall


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="mlp", help="mlp (default) or transformer")
    p.add_argument("--stats", default="parameters", help="parameters (default) or all")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--top", type=int, default=15, help="ops shown (default 15)")
    args = p.parse_args(argv)
    import vanishing

    task = make_task(args.model)

    def plain_run():
        model, opt = task.fresh()
        return _profile(plain_step(model, opt, nn.CrossEntropyLoss(), task.x, task.y), args.steps)

    # plain before and after the watched run, the smaller of each op kept: a variant timed
    # first or last on a noisy machine reads slower, and that is not the monitor's
    before = plain_run()
    model, opt = task.fresh()
    with tempfile.TemporaryDirectory() as tmp:
        with vanishing.watch(model, optimizer=opt, stats=args.stats, run_dir=Path(tmp) / "r"):
            step = plain_step(model, opt, nn.CrossEntropyLoss(), task.x, task.y)
            watched, watched_wall = _profile(step, args.steps)
    after = plain_run()
    plain = {
        k: min(before[0].get(k, (0, 0.0)), after[0].get(k, (0, 0.0)), key=lambda v: v[1])
        for k in before[0].keys() | after[0].keys()
    }
    plain_wall = min(before[1], after[1])
    n = args.steps
    extra = []
    for key, (count, us) in watched.items():
        c0, t0 = plain.get(key, (0, 0.0))
        if count - c0 > 0 or us - t0 > 0:
            extra.append((key, (count - c0) / n, (us - t0) / n))
    extra.sort(key=lambda r: -r[2])
    ops_us = sum(us for _, _, us in extra if us > 0)
    wall_us = (watched_wall - plain_wall) / n * 1e6
    print(f"{args.model}, stats={args.stats}, {n} steps, {torch.__version__}, under the profiler:")
    print(f"plain {plain_wall / n * 1e3:.2f} ms/step, watched {watched_wall / n * 1e3:.2f} ms/step")
    print(f"{'op':40s} {'calls/step':>10s} {'us/step':>9s}")
    for key, calls, us in extra[: args.top]:
        print(f"{key:40s} {calls:10.1f} {us:9.1f}")
    calls = sum(c for _, c, _ in extra if c > 0)
    print(f"{'all ops added':40s} {calls:10.1f} {ops_us:9.1f}")
    print(f"{'rest (Python: hooks, bookkeeping)':40s} {'':10s} {wall_us - ops_us:9.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
