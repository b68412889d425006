"""A repair's time against its (N + 1) x K plain training steps, as the model grows.

The labelled benchmark's nets (``bench/repair.py``) take 0.5-3 ms a step, so each probe's
fixed costs (the monitor's recorded steps, the write and read-back, the diagnosis) weigh as
much as its training. This script takes one pathology, Glorot & Bengio's deep sigmoid MLP at
Xavier init (10 hidden layers, SGD lr 0.1; the benchmark's ``sigmoid_deep_xavier``), at
growing widths and batch sizes, and measures on each: the plain K-step loop (one thread), the
repair in one process, and with ``workers=2``; the ratio is the repair's wall time over
(N + 1) x the plain K steps, N the candidates it trained. Same seed, same batches per width.

    python bench/repair_scale.py                      # widths 32 128 256 512, K = 100
    python bench/repair_scale.py --widths 64 256 --steps 200 --workers 0 2 4
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from cases.catalog import Job, blobs, mlp, train  # noqa: E402
from repair import timed_job_repair  # noqa: E402  (bench/repair.py)


def build(width: int, batch: int) -> Job:
    torch.manual_seed(0)
    model, hidden = mlp([width] + [width] * 10 + [4], nn.Sigmoid, init=nn.init.xavier_normal_)
    data = blobs(n=4 * batch, d=width, batch=batch)
    return Job(model, torch.optim.SGD(model.parameters(), lr=0.1), data, F.cross_entropy, hidden)


def plain_seconds(width: int, batch: int, steps: int, repeats: int = 3) -> float:
    """The median over ``repeats`` of K plain steps of a fresh build (after a warm-up)."""
    times = []
    for _ in range(repeats + 1):
        job = build(width, batch)
        start = time.perf_counter()
        train(job, steps)
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def repair_seconds(width: int, batch: int, steps: int, workers: int):
    return timed_job_repair(build(width, batch), steps, workers=workers)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--widths", type=int, nargs="+", default=[32, 128, 256, 512])
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    args = p.parse_args(argv)
    if any(w < 1 for w in args.widths) or args.batch < 1 or args.steps < 1:
        p.error("--widths, --batch and --steps must be positive")
    torch.set_num_threads(1)
    head = "| width | plain step ms | chosen | N | " + " | ".join(
        f"repair s (workers={w}) | ratio" for w in args.workers
    )
    print(f"K = {args.steps}, batch {args.batch}, one torch thread per process\n")
    print(head + " |")
    print("|" + " --- |" * (4 + 2 * len(args.workers)))
    for width in args.widths:
        unit = plain_seconds(width, args.batch, args.steps)
        cells, chosen, n = [], "-", 0
        for workers in args.workers:
            rep, seconds = repair_seconds(width, args.batch, args.steps, workers)
            n = len(rep.candidates)
            chosen = rep.best.label if rep.best is not None else "-"
            ratio = seconds / (unit * (n + 1)) if n else float("nan")
            cells += [f"{seconds:.1f}", f"{ratio:.2f}"]
        step_ms = 1000 * unit / args.steps
        print(
            f"| {width} | {step_ms:.2f} | {chosen} | {n} | " + " | ".join(cells) + " |", flush=True
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
