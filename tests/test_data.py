import gzip
import shutil
import struct

import pytest
import torch

from synq.data import digits_datasets, fashion_mnist as fm

FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
         "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")
needs_fmnist = pytest.mark.skipif(
    not all((fm.fashion_mnist_dir() / f).is_file() for f in FILES),
    reason="Fashion-MNIST not installed (sudo apt-get install dataset-fashion-mnist)")


@needs_fmnist
@pytest.mark.parametrize("split,n", [("train", 60000), ("test", 10000)])
def test_fashion_mnist_reads_installed_files(split, n):
    images, labels = fm.load_fashion_mnist(split)
    assert images.shape == (n, 28, 28) and images.dtype == torch.uint8
    assert labels.shape == (n,) and labels.dtype == torch.uint8
    assert labels.unique().tolist() == list(range(10))
    assert images.max() > 200  # not an all-zero read


@needs_fmnist
def test_fashion_mnist_dataset_is_normalized():
    x, y = fm.fashion_mnist_dataset("test").tensors
    assert x.shape == (10000, 1, 28, 28) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert abs(x.mean().item()) < 0.05 and abs(x.std().item() - 1) < 0.05


def test_missing_file_names_install_command(tmp_path, monkeypatch):
    monkeypatch.setenv(fm.ENV_VAR, str(tmp_path))
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        fm.load_fashion_mnist("test")


def _write_idx(path, magic, shape, payload):
    with gzip.open(path, "wb") as f:
        f.write(magic + struct.pack(f">{len(shape)}I", *shape) + payload)


def test_bad_magic_number(tmp_path):
    path = tmp_path / "bad.gz"
    _write_idx(path, b"\x00\x00\x0d\x01", (4,), bytes(4))  # float type code, not ubyte
    with pytest.raises(ValueError, match="magic number"):
        fm.read_idx(path, 1)


def test_truncated_payload(tmp_path):
    path = tmp_path / "short.gz"
    _write_idx(path, b"\x00\x00\x08\x03", (2, 28, 28), bytes(100))
    with pytest.raises(ValueError, match="expected 1568"):
        fm.read_idx(path, 3)


def test_not_gzip(tmp_path):
    path = tmp_path / "t10k-labels-idx1-ubyte.gz"
    path.write_bytes(b"this is not gzip data")
    with pytest.raises(ValueError, match="corrupt"):
        fm.read_idx(path, 1)


def test_idx_roundtrip_and_dir_argument(tmp_path):
    images = torch.randint(0, 256, (3, 28, 28), dtype=torch.uint8)
    _write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", b"\x00\x00\x08\x03", (3, 28, 28),
               images.numpy().tobytes())
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", b"\x00\x00\x08\x01", (3,), bytes([0, 9, 4]))
    x, y = fm.load_fashion_mnist("test", root=tmp_path)
    assert torch.equal(x, images) and y.tolist() == [0, 9, 4]


@needs_fmnist
def test_truncated_copy_of_real_file(tmp_path):
    src = fm.fashion_mnist_dir() / "t10k-labels-idx1-ubyte.gz"
    data = src.read_bytes()
    (tmp_path / src.name).write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="corrupt"):
        fm.read_idx(tmp_path / src.name, 1)
    shutil.copy(src, tmp_path / src.name)
    assert fm.read_idx(tmp_path / src.name, 1).shape == (10000,)


def test_digits_shapes_and_deterministic_split():
    train, test = digits_datasets()
    assert len(train) + len(test) == 1797 and len(test) == 359
    x, y = train.tensors
    assert x.shape == (1438, 1, 8, 8) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert y.min() == 0 and y.max() == 9
    again, _ = digits_datasets()
    assert torch.equal(again.tensors[0], x)
    assert not torch.equal(digits_datasets(seed=1)[0].tensors[1], y)
