"""KID (usp_fast.metrics.generation.kid) against an independent numpy computation of the unbiased MMD^2 with the
cubic polynomial kernel."""
import numpy as np
import pytest

from usp_fast.metrics.generation import EvalError, kid


def _mmd2_unbiased(x, y):
    """Binkowski et al. 2018, eq. for the unbiased MMD^2 estimator, written out with loops over pairs."""
    d, m, n = x.shape[1], len(x), len(y)

    def k(a, b):
        return (a @ b / d + 1) ** 3

    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(n)) / (m * n)
    return xx + yy - 2 * xy


def test_kid_equals_the_unbiased_cubic_kernel_mmd():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(12, 5)), rng.normal(0.5, 1.2, size=(12, 5))
    # subsets of the whole set are permutations of it, and the estimator does not depend on the order
    out = kid(x, y, subsets=3, subset_size=12, seed=1)
    assert out["kid"] == pytest.approx(_mmd2_unbiased(x, y), rel=1e-10)
    assert out["std"] == pytest.approx(0.0, abs=1e-12) and out["subset_size"] == 12


def test_kid_subsets_average_and_cap():
    rng = np.random.default_rng(1)
    x, y, z = rng.normal(size=(40, 8)), rng.normal(size=(30, 8)), rng.normal(1.0, 1.0, size=(30, 8))
    same, shifted = kid(x, y, subsets=50, subset_size=1000), kid(x, z, subsets=50, subset_size=1000)
    assert same["subset_size"] == 30  # capped at the smaller set
    assert same["std"] > 0  # subsets of x differ
    assert abs(same["kid"]) < shifted["kid"] and shifted["kid"] > 0
    picked = kid(x, y, subsets=4, subset_size=10, seed=3)
    state = np.random.RandomState(3)  # the subsets torch-fidelity draws, recomputed independently
    values = [_mmd2_unbiased(x[state.choice(40, 10, replace=False)], y[state.choice(30, 10, replace=False)])
              for _ in range(4)]
    assert picked["kid"] == pytest.approx(np.mean(values), rel=1e-9)
    assert picked["std"] == pytest.approx(np.std(values), rel=1e-9)
    with pytest.raises(EvalError):
        kid(x[:1], y)
