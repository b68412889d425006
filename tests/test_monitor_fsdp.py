"""FSDP2 (``fully_shard``): each rank holds a shard of every parameter; the monitor must still
record whole-parameter norms. Two real processes on gloo, against a single-process reference."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch

SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    import torch, torch.distributed as dist
    from torch import nn
    import vanishing
    from vanishing.probes import Column, Probe

    class GradMax(Probe):  # a max-reduced column: each rank sees the max of its shard
        columns = (Column("grad_max_abs", level="param", reduce="max"),)
        def attach(self, ctx):
            self.rows = ctx.layout.params
        def grads_ready(self):
            self.values = torch.stack([r.param.grad.to_local().abs().max() for r in self.rows])
        def measure(self, row):
            row.set_params("grad_max_abs", self.values.double())

    def net():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 7), nn.Tanh(), nn.Linear(7, 3))

    def batches():
        g = torch.Generator().manual_seed(1)
        return [(torch.randn(8, 6, generator=g), torch.randint(0, 3, (8,), generator=g)) for _ in range(3)]

    def main(rank, world, out):
        os.environ["MASTER_ADDR"] = "127.0.0.1"
        os.environ["MASTER_PORT"] = sys.argv[2]
        dist.init_process_group("gloo", rank=rank, world_size=world)
        from torch.distributed.fsdp import fully_shard
        model = net()
        for m in model:
            if isinstance(m, nn.Linear):
                fully_shard(m)
        fully_shard(model)
        opt = torch.optim.Adam(model.parameters(), lr=0.05)
        with vanishing.watch(model, opt, run_dir=out, flush_every=2, probes=[GradMax()]):
            for x, y in batches():
                half = slice(rank * 4, rank * 4 + 4)  # each rank gets half of every batch
                opt.zero_grad()
                nn.functional.cross_entropy(model(x[half]), y[half]).backward()
                opt.step()
        dist.destroy_process_group()

    if __name__ == "__main__":
        import torch.multiprocessing as mp
        mp.spawn(main, args=(2, sys.argv[1]), nprocs=2)
    """
)


def _reference():
    """The same training on one process with the whole batches: FSDP averages the ranks' grads."""
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 7), nn.Tanh(), nn.Linear(7, 3))
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(1)
    data = [
        (torch.randn(8, 6, generator=g), torch.randint(0, 3, (8,), generator=g)) for _ in range(3)
    ]
    rows = {}
    for step, (x, y) in enumerate(data):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        for n, p in model.named_parameters():
            rows[(step, n)] = [p.grad.norm().item(), p.norm().item(), p.grad.abs().max().item()]
        opt.step()
        for n, p in model.named_parameters():
            rows[(step, n)].append((p.detach() - before[n]).norm().item())
    return rows


@pytest.mark.slow
def test_fsdp2_records_whole_parameter_norms(tmp_path):
    import torch.distributed as dist

    if not dist.is_available():
        pytest.skip("torch.distributed not available")
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError:
        pytest.skip("this torch has no FSDP2 fully_shard")
    script = tmp_path / "fsdp.py"
    script.write_text(SCRIPT)
    port = str(29400 + (hash(str(tmp_path)) % 500))
    r = subprocess.run(
        [sys.executable, str(script), str(tmp_path), port],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "monitoring stopped" not in r.stderr, r.stderr[-3000:]
    import vanishing

    expected = _reference()
    with pytest.raises(vanishing.RunError, match="one run per process"):
        vanishing.load_run(tmp_path)  # the shared run_dir holds rank0/ and rank1/
    for rank in (0, 1):
        run = vanishing.load_run(tmp_path / f"rank{rank}")
        assert run.layers[:3] == ["0", "1", "2"]
        m = run.metrics.dropna(subset=["grad_norm"])
        assert len(m) == 3 * 6
        for rec in m.itertuples():
            want = expected[(rec.step, f"{rec.layer}.{rec.param}")]
            got = [rec.grad_norm, rec.param_norm, rec.grad_max_abs, rec.update_norm]
            assert got == pytest.approx(want, rel=1e-4), (rank, rec.step, rec.layer, rec.param)
        assert (
            json.loads((tmp_path / f"rank{rank}" / "manifest.json").read_text())["status"]
            == "completed"
        )
