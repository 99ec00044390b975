"""Offline data sets: Fashion-MNIST (Debian package) and scikit-learn's digits."""

from .digits import DIGITS_MEAN, DIGITS_STD, digits_datasets
from .fashion_mnist import (FMNIST_MEAN, FMNIST_STD, fashion_mnist_dataset, fashion_mnist_dir,
                            fashion_mnist_loaders, load_fashion_mnist, normalize_images,
                            read_idx)

__all__ = ["DIGITS_MEAN", "DIGITS_STD", "FMNIST_MEAN", "FMNIST_STD", "digits_datasets",
           "fashion_mnist_dataset", "fashion_mnist_dir", "fashion_mnist_loaders",
           "load_fashion_mnist", "normalize_images", "read_idx"]
