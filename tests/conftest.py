import pytest
import torch

_approx = pytest.approx


def _relative_approx(expected, rel=None, abs=None, nan_ok=False):
    """``pytest.approx`` without its silent absolute tolerance of 1e-12.

    This project's numbers are often far below 1e-12 (vanishing gradients of 1e-20 are the
    point), where the default would accept any value at all. A test that wants an absolute
    tolerance passes ``abs=`` itself.
    """
    if abs is None:
        abs = 0.0
        if rel is None:
            rel = 1e-6
    return _approx(expected, rel=rel, abs=abs, nan_ok=nan_ok)


pytest.approx = _relative_approx


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def run_dir(tmp_path):
    return tmp_path / "run"
