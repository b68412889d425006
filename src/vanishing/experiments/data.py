"""Datasets bundled or generated locally: nothing is downloaded at run time."""

from __future__ import annotations

import torch
from torch import Tensor

STANDARDIZE = ("standard", "minmax", "none")


def scale_features(
    x_train: Tensor, x_test: Tensor, mode: str, *, channels_last: bool = False
) -> tuple[Tensor, Tensor]:
    """Scale both splits with statistics of the training split only (no test leakage).

    ``mode`` is ``"standard"`` (subtract the mean, divide by the population standard deviation),
    ``"minmax"`` (map the training minimum to 0 and maximum to 1) or ``"none"``. A feature is one
    entry of an example (a pixel, a signal position), or, with ``channels_last=True`` (sequences
    ``(N, T, F)``), one of the ``F`` channels with its statistics pooled over time steps. A
    constant feature is only shifted (scale 1), as scikit-learn's scalers do.

    Example:
        >>> import torch
        >>> from vanishing.experiments.data import scale_features
        >>> x = torch.tensor([[0.0, 5.0], [2.0, 5.0]])
        >>> xs, xt = scale_features(x, torch.tensor([[4.0, 6.0]]), "standard")
        >>> xs.tolist(), xt.tolist()
        ([[-1.0, 0.0], [1.0, 0.0]], [[3.0, 1.0]])
        >>> scale_features(x, x, "minmax")[0].tolist()
        [[0.0, 0.0], [1.0, 0.0]]
    """
    if mode not in STANDARDIZE:
        raise ValueError(f"unknown standardize {mode!r}; expected one of: {', '.join(STANDARDIZE)}")
    if mode == "none":
        return x_train, x_test
    flat = (
        x_train.reshape(-1, x_train.shape[-1])
        if channels_last
        else x_train.reshape(len(x_train), -1)
    )
    flat = flat.double()
    if mode == "standard":
        shift = flat.mean(0)
        scale = flat.std(0, unbiased=False)
    else:
        shift = flat.amin(0)
        scale = flat.amax(0) - shift
    scale = torch.where(scale > 1e-12, scale, torch.ones_like(scale))
    shape = (-1,) if channels_last else x_train.shape[1:]
    shift, scale = shift.reshape(shape), scale.reshape(shape)

    def apply(x: Tensor) -> Tensor:
        return ((x.double() - shift) / scale).to(x_train.dtype)

    return apply(x_train), apply(x_test)


def digits(
    *,
    test_fraction: float = 0.2,
    seed: int = 0,
    standardize: str = "standard",
    n_train: int = 0,
    n_test: int = 0,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """scikit-learn's bundled 8x8 digits (1797 images), split by a seeded permutation.

    Returns ``(x_train, y_train, x_test, y_test)``: float32 inputs of 64 features (pixel values
    0..16 before scaling), int64 labels. The test split is the first ``n_test`` images of the
    permutation (default ``round(1797 * test_fraction)`` = 359), the training split the next
    ``n_train`` (default: all the rest, 1438). ``standardize`` is applied per pixel with the
    training split's statistics (see :func:`scale_features`).

    Example:
        >>> from vanishing.experiments.data import digits
        >>> x, y, xt, yt = digits()
        >>> tuple(x.shape), int(y.max()) + 1
        ((1438, 64), 10)
        >>> float(digits(standardize="none")[0].max())
        16.0
    """
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32)
    y = torch.tensor(data.target, dtype=torch.long)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    n_test = n_test or int(round(len(x) * test_fraction))
    n_train = n_train or len(x) - n_test
    if n_train < 0 or n_test < 0 or n_train + n_test > len(x):
        raise ValueError(
            f"digits has {len(x)} images; n_train={n_train} + n_test={n_test} do not fit "
            "(0 means the default split)"
        )
    test, train = perm[:n_test], perm[n_test : n_test + n_train]
    x_train, x_test = scale_features(x[train], x[test], standardize)
    return x_train, y[train], x_test, y[test]
