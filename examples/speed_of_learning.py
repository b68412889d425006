"""Nielsen's speed of learning in a deep sigmoid net vs a ReLU + He net, read back from the run.

python examples/speed_of_learning.py [--steps 200] [--out runs/example]
"""

import argparse
import tempfile

import torch
from torch import nn

import vanishing


def deep_mlp(activation: type[nn.Module], depth: int = 8, width: int = 64) -> nn.Sequential:
    layers, d = [], 20
    for _ in range(depth):
        linear = nn.Linear(d, width)
        if activation is nn.ReLU:  # He init: PyTorch's default is too small for ReLU
            nn.init.kaiming_normal_(linear.weight, nonlinearity="relu")
            nn.init.zeros_(linear.bias)
        layers += [linear, activation()]
        d = width
    return nn.Sequential(*layers, nn.Linear(d, 5))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--out", default=None, help="parent of the run directories")
    args = parser.parse_args()
    out = args.out or tempfile.mkdtemp()

    torch.manual_seed(0)
    x = torch.randn(512, 20)
    y = (x[:, :5].sum(1) > 0).long() + (x[:, 5:10].sum(1) > 0).long() * 2  # 4 classes

    for name, act in (("sigmoid", nn.Sigmoid), ("relu", nn.ReLU)):
        torch.manual_seed(0)
        model = deep_mlp(act)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        with vanishing.watch(model, optimizer=opt, run_dir=f"{out}/{name}") as mon:
            for _ in range(args.steps):
                idx = torch.randint(0, len(x), (64,))
                opt.zero_grad()
                nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
                opt.step()
        speed = vanishing.load_run(mon.run_dir).pivot("grad_norm", param="bias").median()
        hidden = speed.iloc[:-1]  # the output layer last
        print(
            f"{name:8s} speed of learning per hidden layer: "
            + " ".join(f"{v:.1e}" for v in hidden)
            + f"   first/last = {hidden.iloc[0] / hidden.iloc[-1]:.1e}"
        )


if __name__ == "__main__":
    main()
