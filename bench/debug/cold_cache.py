"""Why a statistic costs 2-5x more inside a training loop than in a micro-benchmark.

Times the tensor operations the monitor runs on the 20-layer width-256 MLP's parameters
(5.3 MB) twice: back to back (the data stays in cache) and after sweeping a 64 MB buffer
through the cache first, which is what a training step does to them in between. Run::

    python bench/debug/cold_cache.py
"""

from __future__ import annotations

import statistics
import time

import torch

SWEEP = torch.empty(16 * 1024 * 1024)  # 64 MB: more than this machine's caches


def timed(fn, *, cold: bool, n: int = 200) -> float:
    times = []
    for i in range(n + 10):
        if cold:
            SWEEP.add_(1.0)
        t = time.perf_counter()
        fn()
        if i >= 10:
            times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def main() -> None:
    gen = torch.Generator().manual_seed(0)
    weights = [torch.randn(256, 256, generator=gen) for _ in range(20)]
    grads = [w * 1e-3 for w in weights]
    flat = [w.view(-1) for w in weights]
    snapshot = torch.stack(flat)
    rows = list(snapshot.unbind(0))
    ops = {
        "gradient norms (_foreach_norm, 20 x 256 KB)": lambda: torch._foreach_norm(grads),
        "snapshot copy (stack, 5.2 MB)": lambda: torch.stack(flat, out=snapshot),
        "row norms of the snapshot": lambda: torch.linalg.vector_norm(snapshot, dim=1),
        "update: subtract in place (_foreach_sub_)": lambda: torch._foreach_sub_(rows, flat),
    }
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'operation':48s} {'warm ms':>8s} {'cold ms':>8s}")
    for name, fn in ops.items():
        print(f"{name:48s} {timed(fn, cold=False):8.3f} {timed(fn, cold=True):8.3f}")


if __name__ == "__main__":
    main()
