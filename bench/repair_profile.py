"""Where a repair's time goes: the phases of ``vanishing.repair`` on one benchmark case.

Runs ``repair`` on a case of ``tests/cases/catalog.py`` (K steps, one thread) a few times and
prints the median wall time of each phase beside the case's plain K steps: the training loops
(monitored), the diagnoses, the speed tables, the writes (flush, close), the set-ups (watch,
model changes) and reading the run back. What the loops cost beyond the plain steps is the
monitor's recording.

    python bench/repair_profile.py sigmoid_deep_normal --repeats 5
"""

from __future__ import annotations

import argparse
import collections
import functools
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))

import torch  # noqa: E402

#: (module, attribute, phase): the functions timed (each call's wall time goes to its phase)
PHASES = [
    ("vanishing.repair.engine", "_train", "probe runs, in all"),
    ("vanishing.repair.engine", "_model_plan", "model changes (copies, transforms)"),
    ("vanishing.recorder.reader", "load_run", "reading the runs back"),
    ("vanishing.recorder.reader:Run", "diagnose", "diagnoses"),
    ("vanishing.recorder.reader:Run", "speeds", "speed tables (ratio, profile)"),
    ("vanishing.monitor.monitor:Monitor", "flush", "writes (flush)"),
    ("vanishing.monitor.monitor:Monitor", "close", "close"),
    ("vanishing.monitor.monitor:Monitor", "__init__", "watch set-up"),
]


def _instrument(spent: dict[str, float]) -> None:
    import importlib

    for where, name, phase in PHASES:
        module, _, cls = where.partition(":")
        owner = importlib.import_module(module)
        owner = getattr(owner, cls) if cls else owner
        fn = getattr(owner, name)

        @functools.wraps(fn)
        def timed(*a, _fn=fn, _phase=phase, **k):
            start = time.perf_counter()
            try:
                return _fn(*a, **k)
            finally:
                spent[_phase] += time.perf_counter() - start

        setattr(owner, name, timed)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("case", help="a case of tests/cases/catalog.py, e.g. sigmoid_deep_normal")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    from cases.catalog import CASES
    from repair import plain_seconds, timed_repair

    cases = {c.name: c for c in CASES}
    if args.case not in cases:
        p.error(f"unknown case {args.case!r}; e.g. {', '.join(list(cases)[:4])}")
    case = cases[args.case]
    spent: dict[str, float] = collections.defaultdict(float)
    _instrument(spent)
    totals, phases, n = [], collections.defaultdict(list), 0
    for r in range(args.repeats + 1):  # the first is a warm-up
        spent.clear()
        rep, seconds = timed_repair(case, args.steps)
        if r:
            totals.append(seconds)
            for k, v in spent.items():
                phases[k].append(v)
        n = len(rep.candidates)
    plain = statistics.median(plain_seconds(case, args.steps) for _ in range(args.repeats))
    total = statistics.median(totals)
    print(f"{args.case}: {n} candidates, K = {args.steps}, medians of {args.repeats} repairs")
    print(f"{'repair, in all':40s} {total * 1e3:8.0f} ms")
    print(
        f"{'plain (N+1) x K steps':40s} {plain * (n + 1) * 1e3:8.0f} ms  ratio {total / (plain * (n + 1)):.2f}"
    )
    for _, _, phase in PHASES:
        if phase in phases:
            print(f"{'  ' + phase:40s} {statistics.median(phases[phase]) * 1e3:8.0f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
