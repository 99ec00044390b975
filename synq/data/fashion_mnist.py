"""Fashion-MNIST from the Debian package dataset-fashion-mnist (idx .gz files, offline)."""

import gzip
import os
import struct
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

DEFAULT_DIR = "/usr/share/datasets/fashion-mnist"
ENV_VAR = "SYNQ_FMNIST_DIR"
INSTALL_HINT = "install it with `sudo apt-get install dataset-fashion-mnist`"

# Mean and std of the 60,000 training images' pixels scaled to [0, 1], computed once
# from train-images-idx3-ubyte.gz (float64); fixed here so every run normalizes alike.
FMNIST_MEAN = 0.2860405969887955
FMNIST_STD = 0.35302424451492254

CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
           "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")

_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
_UBYTE = 0x08  # idx type code for unsigned bytes


def fashion_mnist_dir(root=None):
    """The data folder: the argument, else $SYNQ_FMNIST_DIR, else the Debian path."""
    return Path(root or os.environ.get(ENV_VAR) or DEFAULT_DIR)


def read_idx(path, ndim):
    """Read an unsigned-byte idx file (optionally gzipped) into a uint8 tensor."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Fashion-MNIST file {path} is missing; {INSTALL_HINT} "
                                f"or point ${ENV_VAR} at a folder holding the idx .gz files")
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:  # gzip.BadGzipFile is an OSError
        raise ValueError(f"Fashion-MNIST file {path} is corrupt ({e}); reinstall it "
                         f"(`sudo apt-get install --reinstall dataset-fashion-mnist`)") from e
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(f"Fashion-MNIST file {path} is truncated ({len(data)} bytes); "
                         f"{INSTALL_HINT}")
    zero, dtype, nd = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype != _UBYTE or nd != ndim:
        raise ValueError(f"Fashion-MNIST file {path} has a bad magic number "
                         f"0x{data[:4].hex()} (expected 0x000008{ndim:02x}); {INSTALL_HINT}")
    shape = struct.unpack(f">{ndim}I", data[4:header])
    expected = int(np.prod(shape))
    if len(data) - header != expected:
        raise ValueError(f"Fashion-MNIST file {path} holds {len(data) - header} bytes of data, "
                         f"expected {expected} for shape {shape}; {INSTALL_HINT}")
    array = np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)
    return torch.from_numpy(array.copy())


def load_fashion_mnist(split="train", root=None):
    """Return (images uint8 [N, 28, 28], labels uint8 [N]) of the 'train' or 'test' split."""
    if split not in _FILES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    folder = fashion_mnist_dir(root)
    image_file, label_file = _FILES[split]
    images = read_idx(folder / image_file, 3)
    labels = read_idx(folder / label_file, 1)
    if images.shape[0] != labels.shape[0]:
        raise ValueError(f"Fashion-MNIST {split}: {images.shape[0]} images but "
                         f"{labels.shape[0]} labels in {folder}; {INSTALL_HINT}")
    return images, labels


def normalize_images(images):
    """uint8 [N, H, W] -> float32 [N, 1, H, W], normalized with the training mean/std."""
    x = images.unsqueeze(1).float().div_(255.0)
    return x.sub_(FMNIST_MEAN).div_(FMNIST_STD)


def fashion_mnist_dataset(split="train", root=None):
    """Normalized float TensorDataset (x [N, 1, 28, 28] float32, y [N] int64)."""
    images, labels = load_fashion_mnist(split, root)
    return TensorDataset(normalize_images(images), labels.long())


def fashion_mnist_loaders(batch_size=128, root=None, test_batch_size=None, num_workers=0,
                          seed=0):
    """(train_loader, test_loader) over normalized tensors; the train loader shuffles."""
    generator = torch.Generator().manual_seed(seed)
    train = DataLoader(fashion_mnist_dataset("train", root), batch_size=batch_size,
                       shuffle=True, num_workers=num_workers, generator=generator)
    test = DataLoader(fashion_mnist_dataset("test", root), batch_size=test_batch_size or 2 * batch_size,
                      shuffle=False, num_workers=num_workers)
    return train, test
