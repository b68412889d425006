"""Training setups whose records must not change when the monitor's code is restructured.

``python tests/golden/scenarios.py OUT`` records each scenario into ``OUT/<name>`` (a run
directory). ``tests/golden/recorded/`` holds them as recorded by the monitor before the seams
refactor (commit 8b0ceff); ``test_golden.py`` re-records them with the current code and
compares every table. They double as the "run written by an older version" fixtures: the
current reader must load and diagnose them.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn

import vanishing


def _mlp(depth=4, width=8, act=nn.Sigmoid, d_in=5, d_out=3):
    layers, d = [], d_in
    for _ in range(depth):
        layers += [nn.Linear(d, width), act()]
        d = width
    layers.append(nn.Linear(d, d_out))
    return nn.Sequential(*layers)


def _batches(n, *, batch=16, d_in=5, classes=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(batch, d_in, generator=g), torch.randint(0, classes, (batch,), generator=g))
        for _ in range(n)
    ]


def plain_sgd(run_dir):
    torch.manual_seed(0)
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    with vanishing.watch(model, opt, run_dir=run_dir, flush_every=3):
        for x, y in _batches(7):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()


def accumulation_frozen_unheld(run_dir):
    """Two micro-batches per step, a frozen layer, a layer the optimizer does not hold."""
    torch.manual_seed(0)
    model = _mlp(act=nn.Tanh)
    model[0].weight.requires_grad_(False)
    held = [p for n, p in model.named_parameters() if not n.startswith("4.")]
    opt = torch.optim.Adam(held, lr=0.01)
    with vanishing.watch(model, opt, run_dir=run_dir, flush_every=4):
        batches = _batches(10)
        for i in range(0, 10, 2):
            opt.zero_grad()
            for x, y in batches[i : i + 2]:
                (nn.functional.cross_entropy(model(x), y) / 2).backward()
            opt.step()


class _Twice(nn.Module):
    """A block called twice per forward, a ReLU and a GELU, a LayerNorm."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(5, 8)
        self.block = nn.Sequential(nn.Linear(8, 8), nn.ReLU())
        self.norm = nn.LayerNorm(8)
        self.act = nn.GELU()
        self.out = nn.Linear(8, 3)

    def forward(self, x):
        h = self.inp(x)
        h = self.block(self.block(h))
        return self.out(self.act(self.norm(h)))


def block_twice(run_dir):
    torch.manual_seed(0)
    model = _Twice()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with vanishing.watch(model, opt, run_dir=run_dir, every=2):
        for x, y in _batches(6):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()


class _Recurrent(nn.Module):
    def __init__(self, cell):
        super().__init__()
        self.rnn = cell(3, 6, num_layers=2, batch_first=True)
        self.head = nn.Linear(6, 1)

    def forward(self, x):
        out, _ = self.rnn(x)
        return self.head(out[:, -1])


def lstm_and_gru(run_dir):
    torch.manual_seed(0)
    model = nn.ModuleDict({"lstm": _Recurrent(nn.LSTM), "gru": _Recurrent(nn.GRU)})
    opt = torch.optim.RMSprop(model.parameters(), lr=0.01)
    g = torch.Generator().manual_seed(2)
    with vanishing.watch(model, opt, run_dir=run_dir):
        for _ in range(4):
            x = torch.randn(4, 12, 3, generator=g)
            y = torch.randn(4, 1, generator=g)
            opt.zero_grad()
            loss = (model["lstm"](x) - y).pow(2).mean() + (model["gru"](x) - y).pow(2).mean()
            loss.backward()
            opt.step()


def amp_scaler(run_dir):
    torch.manual_seed(0)
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    with vanishing.watch(model, opt, run_dir=run_dir, scaler=scaler):
        for i, (x, y) in enumerate(_batches(5)):
            opt.zero_grad()
            scaler.scale(nn.functional.cross_entropy(model(x), y)).backward()
            if i == 2:
                model[0].weight.grad[0, 0] = float("inf")  # an fp16 overflow: a skipped step
            scaler.step(opt)
            scaler.update()


def no_optimizer(run_dir):
    torch.manual_seed(0)
    model = _mlp(act=nn.ELU)
    with vanishing.watch(model, run_dir=run_dir):
        for x, y in _batches(3):
            model.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            with torch.no_grad():
                for p in model.parameters():
                    p -= 0.1 * p.grad


def conv(run_dir):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.LeakyReLU(0.1),
        nn.MaxPool2d(2),
        nn.Conv2d(4, 4, 3, padding=1),
        nn.SiLU(),
        nn.Flatten(),
        nn.Linear(4 * 4 * 4, 3),
    )
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    g = torch.Generator().manual_seed(3)
    with vanishing.watch(model, opt, run_dir=run_dir):
        for _ in range(3):
            x = torch.randn(6, 1, 8, 8, generator=g)
            y = torch.randint(0, 3, (6,), generator=g)
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()


def compiled(run_dir):
    torch.manual_seed(0)
    model = _mlp(depth=2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    fast = torch.compile(model, backend="eager")
    with vanishing.watch(fast, opt, run_dir=run_dir):
        for x, y in _batches(3):
            opt.zero_grad()
            nn.functional.cross_entropy(fast(x), y).backward()
            opt.step()


SCENARIOS = {
    f.__name__: f
    for f in (
        plain_sgd,
        accumulation_frozen_unheld,
        block_twice,
        lstm_and_gru,
        amp_scaler,
        no_optimizer,
        conv,
        compiled,
    )
}


if __name__ == "__main__":
    out = Path(sys.argv[1])
    for name, scenario in SCENARIOS.items():
        scenario(out / name)
        print("recorded", name)
