"""Debug helper: cost and exactness of the GPU norm strategies (run on a CUDA machine)."""

import time

import torch

from vanishing.stats.norms import l2_norms, nonfinite_counts


def bench(f, n=200):
    f()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        f()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / n * 1e6


ts = [torch.randn(256, 256, device="cuda") * 1e-3 for _ in range(21)]
ts += [torch.randn(256, device="cuda") * 1e-3 for _ in range(21)]
print("old float64 foreach   us", bench(lambda: torch._foreach_norm(ts, 2, dtype=torch.float64)))
print("foreach float32       us", bench(lambda: torch._foreach_norm(ts, 2)))
print("l2_norms (new)        us", bench(lambda: l2_norms(ts)))
print("foreach L0            us", bench(lambda: torch._foreach_norm(ts, 0)))
print("nonfinite_counts      us", bench(lambda: nonfinite_counts(ts)))
tiny = [t * 1e-27 for t in ts[:3]] + [
    torch.zeros(5, device="cuda"),
    torch.tensor([3e-44, 4e-44], device="cuda"),
]
print("exact tiny:", l2_norms(tiny).tolist())
print("reference :", [t.double().norm().item() for t in tiny])
bad = [torch.tensor([1.0, float("nan"), float("inf")], device="cuda"), torch.ones(4, device="cuda")]
print(
    "counts",
    nonfinite_counts(bad).tolist(),
    "half",
    l2_norms([torch.ones(4, device="cuda", dtype=torch.half), ts[0]]).tolist(),
)
