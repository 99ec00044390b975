"""scikit-learn's bundled 8x8 digits (1,797 images) as tensors, for fast tests."""

import functools

import torch
from torch.utils.data import TensorDataset

# Mean and std of all 1,797 images' pixels scaled to [0, 1] (pixel value / 16), computed once.
DIGITS_MEAN = 0.30526028624095713
DIGITS_STD = 0.3760492217920148


@functools.lru_cache(maxsize=1)
def _load_digits():
    """(x [N, 1, 8, 8] normalized, y [N]); parsed once per process, callers get copies."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.as_tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = (x - DIGITS_MEAN) / DIGITS_STD
    return x, torch.as_tensor(digits.target, dtype=torch.int64)


def digits_datasets(test_fraction=0.2, seed=0):
    """(train, test) TensorDatasets: x float32 [N, 1, 8, 8] normalized, y int64 [N].

    The split is a fixed permutation drawn from `seed`, so it is the same on every run.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must lie in (0, 1), got {test_fraction!r}")
    x, y = _load_digits()
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_test = int(round(len(y) * test_fraction))
    test_idx, train_idx = order[:n_test], order[n_test:]
    return TensorDataset(x[train_idx], y[train_idx]), TensorDataset(x[test_idx], y[test_idx])
