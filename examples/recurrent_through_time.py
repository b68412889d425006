"""How much gradient reaches each time step: a tanh RNN vs an LSTM (forget bias 3), long sequences.

python examples/recurrent_through_time.py [--steps 30] [--length 100]
"""

import argparse
import tempfile

import torch
from torch import nn

import vanishing


class Net(nn.Module):
    def __init__(self, cell: type[nn.Module]) -> None:
        super().__init__()
        self.rnn = cell(2, 32, batch_first=True)
        self.head = nn.Linear(32, 1)
        if cell is nn.LSTM:  # forget-gate bias 3: the cell state keeps ~95% a step at init
            with torch.no_grad():
                self.rnn.bias_hh_l0[32:64].fill_(3.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(x)
        return self.head(out[:, -1]).squeeze(1)


def adding_problem(n: int, length: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum the two values marked in a long sequence (Hochreiter & Schmidhuber, 1997)."""
    values = torch.rand(n, length, generator=g)
    marks = torch.zeros(n, length)
    first = torch.randint(0, length // 2, (n,), generator=g)
    second = torch.randint(length // 2, length, (n,), generator=g)
    marks[torch.arange(n), first] = 1.0
    marks[torch.arange(n), second] = 1.0
    return torch.stack([values, marks], dim=2), (values * marks).sum(1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--length", type=int, default=100)
    args = parser.parse_args()
    out = tempfile.mkdtemp()
    for cell in (nn.RNN, nn.LSTM):
        torch.manual_seed(0)
        g = torch.Generator().manual_seed(0)
        model = Net(cell)
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        with vanishing.watch(model, optimizer=opt, run_dir=f"{out}/{cell.__name__}") as mon:
            for _ in range(args.steps):
                x, y = adding_problem(32, args.length, g)
                opt.zero_grad()
                nn.functional.mse_loss(model(x), y).backward()
                opt.step()
        profile = vanishing.load_run(mon.run_dir).temporal.groupby("t").grad_norm.median()
        ratio = profile.iloc[0] / profile.iloc[-1]
        print(f"{cell.__name__:5s} gradient at t=0 / at t=T-1: {ratio:.1e}")


if __name__ == "__main__":
    main()
