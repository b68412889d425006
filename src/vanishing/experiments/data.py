"""Datasets bundled or generated locally: nothing is downloaded at run time."""

from __future__ import annotations

import torch
from torch import Tensor


def digits(*, test_fraction: float = 0.2, seed: int = 0) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """scikit-learn's bundled 8x8 digits, standardised with the training split's statistics.

    Returns ``(x_train, y_train, x_test, y_test)``: float32 inputs of 64 features, int64 labels.

    Example:
        >>> from vanishing.experiments.data import digits
        >>> x, y, xt, yt = digits()
        >>> tuple(x.shape), int(y.max()) + 1
        ((1438, 64), 10)
    """
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32)
    y = torch.tensor(data.target, dtype=torch.long)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    n_test = int(round(len(x) * test_fraction))
    test, train = perm[:n_test], perm[n_test:]
    mean, std = x[train].mean(0), x[train].std(0).clamp_min(1e-6)
    x = (x - mean) / std
    return x[train], y[train], x[test], y[test]
