"""Time and memory of diagnosing a long run (200 layers x 20,000 steps by default).

Builds the synthetic run of ``bench/report.py`` (the documented format, a vanishing profile with
noise and planted spikes) once, then diagnoses it in fresh processes, each timed with its peak
resident memory: ``vanishing.load_run(run).diagnose()`` (bounded read: a sample of the steps)
and the ``vanishing diagnose RUN`` command; ``--full`` adds the exact full read for comparison
(minutes and gigabytes at this size) and checks that both give the same finding kinds and layers.

    .venv/bin/python bench/diagnose_scale.py                  # 200 layers x 20k steps
    .venv/bin/python bench/diagnose_scale.py --keep /tmp/big --full
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = """
import json, resource, sys, time
t = time.perf_counter()
import vanishing
from vanishing.recorder.reader import Run
run = Run(sys.argv[1], max_steps=None)
full = sys.argv[2] == "full"
diag = run.diagnose() if not full else __import__("vanishing.diagnose.engine", fromlist=["x"]).diagnose_run(run)
seconds = time.perf_counter() - t
print(json.dumps({
    "seconds": seconds,
    "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    "findings": sorted([f.kind, sorted(f.layers)] for f in diag.findings),
    "notes": diag.notes,
}))
"""


def _child(run_dir: Path, mode: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", CHILD, str(run_dir), mode],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout)


def _cli(run_dir: Path) -> tuple[float, float]:
    t = time.perf_counter()
    r = subprocess.run(
        ["/usr/bin/time", "-f", "%M", sys.executable, "-m", "vanishing", "diagnose", str(run_dir)],
        capture_output=True,
        text=True,
    )
    seconds = time.perf_counter() - t
    peak_kib = float(r.stderr.strip().splitlines()[-1])
    return seconds, peak_kib / 1024


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=200)
    ap.add_argument("--steps", type=int, default=20_000)
    ap.add_argument("--flush-every", type=int, default=50)
    ap.add_argument("--keep", type=Path, default=None, help="build the run here (once) and keep it")
    ap.add_argument("--full", action="store_true", help="also diagnose from the full read")
    args = ap.parse_args(argv)
    run_dir = args.keep or Path(tempfile.mkdtemp(prefix="vanishing-bench-diag-")) / "run"
    if not (run_dir / "manifest.json").exists():
        t0 = time.perf_counter()
        subprocess.run(
            [sys.executable, str(Path(__file__).with_name("report.py")), "--build-only",
             "--keep", str(run_dir), "--layers", str(args.layers), "--steps", str(args.steps),
             "--flush-every", str(args.flush_every)],
            check=True,
        )  # fmt: skip
        print(f"built {run_dir} in {time.perf_counter() - t0:.0f} s")
    bounded = _child(run_dir, "bounded")
    print(
        f"{args.layers} layers x {args.steps} steps: Run.diagnose() {bounded['seconds']:.1f} s, "
        f"peak {bounded['peak_mib']:.0f} MiB; findings {bounded['findings']}"
    )
    seconds, peak = _cli(run_dir)
    print(f"vanishing diagnose RUN: {seconds:.1f} s wall, peak {peak:.0f} MiB")
    if args.full:
        full = _child(run_dir, "full")
        same = full["findings"] == bounded["findings"]
        print(
            f"full read: {full['seconds']:.1f} s, peak {full['peak_mib']:.0f} MiB; "
            f"same findings (kinds and layers) as the bounded read: {same}"
        )


if __name__ == "__main__":
    main()
