"""Debug helper for the GPU path: where does a host sync happen, and what does a step cost."""

import sys
import tempfile
import traceback

import torch
from torch import nn

import vanishing
from vanishing.monitor import Monitor


def net():
    layers = []
    for _ in range(20):
        layers += [nn.Linear(256, 256), nn.Sigmoid()]
    return nn.Sequential(*layers, nn.Linear(256, 10)).cuda()


def find_sync(stats):
    def fail(self, e):
        traceback.print_exc()
        raise e

    Monitor._fail = fail
    model = net()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x, y = torch.randn(128, 256, device="cuda"), torch.randint(0, 10, (128,), device="cuda")
    with vanishing.watch(
        model, opt, run_dir=tempfile.mkdtemp() + "/r", stats=stats, flush_every=1000
    ):
        try:
            for i in range(8):
                if i == 3:
                    torch.cuda.synchronize()
                    torch.cuda.set_sync_debug_mode("error")
                opt.zero_grad()
                nn.functional.cross_entropy(model(x), y).backward()
                opt.step()
        finally:
            torch.cuda.set_sync_debug_mode(0)


def profile(stats):
    from torch.profiler import ProfilerActivity, profile

    model = net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(128, 256, device="cuda"), torch.randint(0, 10, (128,), device="cuda")
    mon = None
    if stats != "plain":
        mon = vanishing.watch(
            model, opt, run_dir=tempfile.mkdtemp() + "/r", stats=stats, flush_every=1000
        )
    for _ in range(5):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(10):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
        torch.cuda.synchronize()
    print(f"==== {stats}")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
    if mon:
        mon.close()


if __name__ == "__main__":
    for stats in ("parameters", "all"):
        try:
            find_sync(stats)
            print(f"no sync found with stats={stats}")
        except Exception as e:  # noqa: BLE001
            print(f"SYNC with stats={stats}: {e}")
    if "--profile" in sys.argv:
        for s in ("plain", "parameters", "all"):
            profile(s)
