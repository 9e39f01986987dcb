"""Loading job data: generated sets, and real files in each supported format written to a
temporary data directory, split and standardised; malformed specs and files are refused with
the field to fix."""

from __future__ import annotations

import gzip
import os
import pickle
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from pydantic import ValidationError
from torch import nn

from esper.contracts.jobs import FileData, Split, SyntheticData
from tolaria.datasets import DataSplits, load_dataset, split_indices, synthetic
from tolaria.errors import SpecError

PATH = ["spec", "dataset", "path"]


# ------------------------------------------------ writers of the real formats
def write_idx(path: Path, array: np.ndarray, magic: int) -> None:
    """An IDX file: big-endian uint32 magic, then uint32 dimensions, then the bytes."""
    body = struct.pack(f">I{array.ndim}I", magic, *array.shape) + array.astype(np.uint8).tobytes()
    if path.name.endswith(".gz"):
        body = gzip.compress(body)
    path.write_bytes(body)


def write_mnist(directory: Path, images: np.ndarray, labels: np.ndarray, gz: bool) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    suffix = ".gz" if gz else ""
    write_idx(directory / f"train-images-idx3-ubyte{suffix}", images, 2051)
    write_idx(directory / f"train-labels-idx1-ubyte{suffix}", labels, 2049)


def write_cifar_batch(path: Path, data: np.ndarray, labels: list[int], protocol: int = 2) -> None:
    """A CIFAR-10 python batch: the pickled dict of the original (bytes keys)."""
    batch = {
        b"batch_label": path.name.encode(),
        b"labels": labels,
        b"data": data,
        b"filenames": [f"img{i}.png".encode() for i in range(len(labels))],
    }
    path.write_bytes(pickle.dumps(batch, protocol=protocol))


def images(rng: np.random.Generator, n: int, shape: tuple[int, ...]) -> np.ndarray:
    return rng.integers(0, 256, (n, *shape), dtype=np.uint8)


def standardised(raw: np.ndarray, train: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    x = torch.from_numpy(raw.astype(np.float64))
    std, mean = torch.std_mean(x[train], dim=dims, correction=0, keepdim=True)
    return ((x - mean) / std).float()


def all_x(data: DataSplits) -> torch.Tensor:
    return torch.cat([data.train_x, data.val_x, data.test_x])


def spec_error(spec: Any, data_dir: Path) -> SpecError:
    with pytest.raises(SpecError) as info:
        load_dataset(spec, data_dir)
    return info.value


# ------------------------------------------------------------- synthetic
KINDS = [
    SyntheticData(kind="spirals", classes=3),
    SyntheticData(kind="moons"),
    SyntheticData(kind="circles"),
    SyntheticData(kind="blobs", classes=4, features=7),
    SyntheticData(kind="checkerboard"),
]


@pytest.mark.parametrize("spec", KINDS, ids=lambda s: s.kind)
def test_synthetic_sets_have_the_spec_geometry(spec: SyntheticData, tmp_path: Path) -> None:
    data = load_dataset(spec, tmp_path)
    assert data.input_shape == (spec.features,)
    assert data.classes == spec.classes
    assert (len(data.train_y), len(data.val_y), len(data.test_y)) == (1400, 400, 200)
    assert data.train_x.dtype == torch.float32 and data.train_y.dtype == torch.int64
    labels = torch.cat([data.train_y, data.val_y, data.test_y])
    assert set(labels.tolist()) == set(range(spec.classes))
    assert torch.isfinite(all_x(data)).all()
    # Rows of generated points never coincide: the splits share no sample.
    assert len(torch.unique(all_x(data), dim=0)) == 2000
    assert spec.kind in data.description and "1400 train" in data.description


@pytest.mark.parametrize("spec", KINDS, ids=lambda s: s.kind)
def test_synthetic_sets_follow_their_seed(spec: SyntheticData, tmp_path: Path) -> None:
    first, again = load_dataset(spec, tmp_path), load_dataset(spec, tmp_path)
    other = load_dataset(spec.model_copy(update={"seed": spec.seed + 1}), tmp_path)
    assert torch.equal(first.train_x, again.train_x) and torch.equal(first.val_y, again.val_y)
    assert not torch.equal(first.train_x, other.train_x)


def test_standardisation_uses_training_statistics_only(tmp_path: Path) -> None:
    spec = SyntheticData(kind="blobs", features=3, classes=3, noise=0.5, samples=500)
    raw, _ = synthetic(spec)
    train, val, test = split_indices(500, spec.split)
    data = load_dataset(spec, tmp_path)
    expected = standardised(raw, train, (0,))
    torch.testing.assert_close(data.train_x, expected[train])
    torch.testing.assert_close(data.val_x, expected[val])
    torch.testing.assert_close(data.test_x, expected[test])
    torch.testing.assert_close(data.train_x.mean(0), torch.zeros(3), atol=1e-5, rtol=0)
    assert data.val_x.mean(0).abs().max() > 1e-3  # held-out data is not re-centred


def test_splits_are_disjoint_and_sized_by_fraction() -> None:
    train, val, test = split_indices(101, Split(validation=0.2, test=0.1, seed=3))
    assert (len(train), len(val), len(test)) == (71, 20, 10)
    assert sorted(torch.cat([train, val, test]).tolist()) == list(range(101))
    again = split_indices(101, Split(validation=0.2, test=0.1, seed=3))
    other = split_indices(101, Split(validation=0.2, test=0.1, seed=4))
    assert torch.equal(val, again[1]) and not torch.equal(val, other[1])
    _, small_val, small_test = split_indices(4, Split(validation=0.01, test=0.01))
    assert (len(small_val), len(small_test)) == (1, 1)
    assert len(split_indices(10, Split(test=0.0))[2]) == 0


def test_spirals_need_a_wide_enough_network(tmp_path: Path) -> None:
    data = load_dataset(SyntheticData(kind="spirals", noise=0.15, samples=1200), tmp_path)

    def accuracy(hidden: int, activation: type[nn.Module], lr: float) -> float:
        torch.manual_seed(0)
        model = nn.Sequential(
            nn.Linear(2, hidden), activation(), nn.Linear(hidden, hidden), activation()
        )
        model.append(nn.Linear(hidden, 2))
        optimizer = torch.optim.Adam(model.parameters(), lr)
        for _ in range(600):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(data.train_x), data.train_y).backward()
            optimizer.step()
        with torch.no_grad():
            return (model(data.val_x).argmax(1) == data.val_y).float().mean().item()

    assert accuracy(8, nn.Tanh, 0.02) < 0.85
    assert accuracy(64, nn.ReLU, 0.01) > 0.93


def test_checkerboard_has_two_classes(tmp_path: Path) -> None:
    err = spec_error(SyntheticData(kind="checkerboard", classes=3), tmp_path)
    assert err.location == ["spec", "dataset", "classes"]
    with pytest.raises(ValidationError, match="2 classes"):
        SyntheticData(kind="moons", classes=3)


def test_generated_sets_must_fit_in_memory(tmp_path: Path) -> None:
    spec = SyntheticData(kind="blobs", samples=2_000_000, features=4096)
    assert spec_error(spec, tmp_path).location == ["spec", "dataset", "samples"]
    assert spec_error(SyntheticData(kind="blobs", samples=20, classes=30), tmp_path).location == [
        "spec",
        "dataset",
        "samples",
    ]


# ------------------------------------------------------------------- npz
def test_npz_features(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(5.0, 3.0, (50, 4))
    y = np.arange(50) % 3
    np.savez(tmp_path / "table.npz", features=x, target=y.astype(np.float32))
    spec = FileData(kind="npz", path="table.npz", x_key="features", y_key="target")
    data = load_dataset(spec, tmp_path)
    assert (data.input_shape, data.classes) == ((4,), 3)
    train, val, test = split_indices(50, spec.split)
    expected = standardised(x, train, (0,))
    torch.testing.assert_close(data.val_x, expected[val])
    assert torch.equal(data.test_y, torch.from_numpy(y)[test])


def test_npz_images_get_a_channel_and_per_channel_statistics(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    gray = images(rng, 30, (6, 5))
    np.savez_compressed(tmp_path / "gray.npz", x=gray, y=np.arange(30) % 2)
    data = load_dataset(FileData(kind="npz", path="gray.npz"), tmp_path)
    assert data.input_shape == (1, 6, 5)
    colour = images(rng, 40, (3, 4, 4))
    colour[:, 2] //= 4  # channels of different spread
    (tmp_path / "sub").mkdir()
    np.savez(tmp_path / "sub" / "colour.npz", x=colour, y=np.arange(40) % 4)
    spec = FileData(kind="npz", path="sub/colour.npz", limit=30)
    data = load_dataset(spec, tmp_path)
    assert data.input_shape == (3, 4, 4) and len(all_x(data)) == 30
    train = split_indices(30, spec.split)[0]
    torch.testing.assert_close(data.train_x, standardised(colour[:30], train, (0, 2, 3))[train])


@pytest.mark.parametrize(
    ("arrays", "field", "words"),
    [
        ({"x": np.zeros((5, 2)), "labels": np.zeros(5)}, "y_key", "no array 'y'"),
        ({"x": np.zeros((5, 2)), "y": np.array([0, 1, 0.5, 1, 0])}, "y_key", "whole numbers"),
        ({"x": np.zeros((5, 2)), "y": np.array([0, 1, -1, 1, 0])}, "y_key", "negative"),
        ({"x": np.zeros((5, 2)), "y": np.zeros((5, 1), int)}, "y_key", "one label per sample"),
        ({"x": np.zeros((5, 2)), "y": np.array(["a"] * 5)}, "y_key", "integer class labels"),
        ({"x": np.zeros((5, 2)), "y": np.zeros(4, int)}, "y_key", "5 samples but 4 labels"),
        ({"x": np.zeros(5), "y": np.zeros(5, int)}, "x_key", "shape (5,)"),
        ({"x": np.array([[0.0], [np.nan]]), "y": np.zeros(2, int)}, "x_key", "NaN"),
        ({"x": np.array([[1 + 2j]] * 3), "y": np.zeros(3, int)}, "x_key", "numeric"),
    ],
)
def test_npz_contents_are_checked(
    arrays: dict[str, np.ndarray], field: str, words: str, tmp_path: Path
) -> None:
    np.savez(tmp_path / "bad.npz", **arrays)
    err = spec_error(FileData(kind="npz", path="bad.npz"), tmp_path)
    assert err.location == ["spec", "dataset", field]
    assert words in err.message


def test_npz_object_arrays_are_not_unpickled(tmp_path: Path) -> None:
    np.savez(tmp_path / "objects.npz", x=np.array([{"a": 1}] * 4, dtype=object), y=np.zeros(4))
    err = spec_error(FileData(kind="npz", path="objects.npz"), tmp_path)
    assert err.location == ["spec", "dataset", "x_key"]


def test_files_that_are_not_npz_archives(tmp_path: Path) -> None:
    (tmp_path / "text.npz").write_text("not a zip")
    assert spec_error(FileData(kind="npz", path="text.npz"), tmp_path).location == PATH
    np.save(tmp_path / "single.npy", np.zeros((4, 2)))
    err = spec_error(FileData(kind="npz", path="single.npy"), tmp_path)
    assert "not an .npz archive" in err.message
    (tmp_path / "folder.npz").mkdir()
    assert "directory" in spec_error(FileData(kind="npz", path="folder.npz"), tmp_path).message


def test_too_few_samples_to_split(tmp_path: Path) -> None:
    np.savez(tmp_path / "tiny.npz", x=np.arange(6.0).reshape(3, 2), y=np.array([0, 1, 1]))
    data = load_dataset(FileData(kind="npz", path="tiny.npz"), tmp_path)
    assert (len(data.train_y), len(data.val_y), len(data.test_y)) == (1, 1, 1)
    err = spec_error(FileData(kind="npz", path="tiny.npz", limit=2), tmp_path)
    assert err.location == ["spec", "dataset", "split"]
    assert "2 samples" in err.message


def test_one_class_is_not_a_classification(tmp_path: Path) -> None:
    np.savez(tmp_path / "same.npz", x=np.zeros((10, 2)), y=np.zeros(10, int))
    assert spec_error(FileData(kind="npz", path="same.npz"), tmp_path).location == [
        "spec",
        "dataset",
    ]


def test_classes_missing_from_training_are_reported(tmp_path: Path) -> None:
    y = np.zeros(20, int)
    y[7] = 4  # labels 1–3 never occur; class 4 has one sample
    np.savez(tmp_path / "sparse.npz", x=np.arange(40.0).reshape(20, 2), y=y)
    data = load_dataset(FileData(kind="npz", path="sparse.npz"), tmp_path)
    assert data.classes == 5
    assert "no training sample of class 1, 2, 3" in data.description


# ------------------------------------------------------------------ paths
def test_missing_files_are_named_by_their_resolved_path(tmp_path: Path) -> None:
    err = spec_error(FileData(kind="npz", path="nowhere/data.npz"), tmp_path)
    assert err.location == PATH
    assert str(tmp_path.resolve() / "nowhere" / "data.npz") in err.message
    assert str(err).startswith("spec.dataset.path: file not found: ")


def test_paths_cannot_leave_the_data_directory(tmp_path: Path) -> None:
    for path in ["../x.npz", "a/../../x.npz", "/etc/passwd", "a/.."]:
        with pytest.raises(ValidationError):
            FileData(kind="npz", path=path)
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    np.savez(tmp_path / "outside.npz", x=np.zeros((10, 2)), y=np.arange(10) % 2)
    # The contract's pattern is the first guard; the loader checks again after resolving.
    unchecked = FileData.model_construct(kind="npz", path="../outside.npz", split=Split())
    assert "outside the data directory" in spec_error(unchecked, data_dir).message
    os.symlink(tmp_path / "outside.npz", data_dir / "link.npz")
    err = spec_error(FileData(kind="npz", path="link.npz"), data_dir)
    assert err.location == PATH and "outside" in err.message


# -------------------------------------------------------------------- csv
def test_csv_with_header_and_label_column(tmp_path: Path) -> None:
    rows = [[float(i), float(i * i % 7), i % 3] for i in range(20)]
    lines = ["a,b,label"] + [f"{a},{b},{c}" for a, b, c in rows]
    (tmp_path / "t.csv").write_text("\n".join(lines) + "\n")
    data = load_dataset(FileData(kind="csv", path="t.csv"), tmp_path)
    assert (data.input_shape, data.classes) == ((2,), 3)
    assert "'label'" in data.description
    table = np.array(rows, dtype=np.float64)
    spec = FileData(kind="csv", path="t.csv", label_column=0, limit=15)
    data = load_dataset(spec, tmp_path)
    assert data.classes == 15 and data.input_shape == (2,)
    train, val, _ = split_indices(15, spec.split)
    torch.testing.assert_close(data.val_x, standardised(table[:15, 1:], train, (0,))[val])


def test_csv_without_header(tmp_path: Path) -> None:
    (tmp_path / "t.csv").write_text("".join(f"1,{i},{i % 2}.0\n" for i in range(12)))
    data = load_dataset(FileData(kind="csv", path="t.csv", label_column=-1), tmp_path)
    assert len(all_x(data)) == 12 and data.classes == 2


@pytest.mark.parametrize(
    ("text", "spec", "field", "words"),
    [
        ("x,y\n1,0\n2,oops\n", {}, "path", "oops"),
        ("1,0\n2,1\n", {"label_column": 2}, "label_column", "no column 2"),
        ("1,0\n2,1.5\n3,1\n", {}, "label_column", "whole numbers"),
        ("1,0,1\n2,1\n", {}, "path", "not a numeric CSV"),
        ("a,b\n", {}, "path", "no data rows"),
        ("0\n1\n", {}, "path", "feature columns"),
        ("1,0\nnan,1\n3,1\n", {}, "path", "NaN"),
    ],
)
def test_csv_contents_are_checked(
    text: str, spec: dict[str, Any], field: str, words: str, tmp_path: Path
) -> None:
    (tmp_path / "bad.csv").write_text(text)
    err = spec_error(FileData(kind="csv", path="bad.csv", **spec), tmp_path)
    assert err.location == ["spec", "dataset", field]
    assert words in err.message


# ------------------------------------------------------------------ mnist
@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gzip"])
def test_mnist_idx_files(gz: bool, tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    pixels = images(rng, 25, (7, 6))  # the header's dimensions, not 28×28
    labels = np.arange(25) % 10
    write_mnist(tmp_path / "mnist", pixels, labels, gz)
    spec = FileData(kind="mnist", path="mnist")
    data = load_dataset(spec, tmp_path)
    assert (data.input_shape, data.classes) == ((1, 7, 6), 10)
    train, val, _ = split_indices(25, spec.split)
    expected = standardised(pixels[:, None], train, (0, 2, 3))
    torch.testing.assert_close(data.val_x, expected[val])
    assert torch.equal(data.val_y, torch.from_numpy(labels)[val])
    limited = load_dataset(FileData(kind="mnist", path="mnist", limit=12), tmp_path)
    assert len(all_x(limited)) == 12


def test_mnist_at_full_size(tmp_path: Path) -> None:
    write_mnist(tmp_path, images(np.random.default_rng(3), 40, (28, 28)), np.arange(40) % 10, True)
    assert load_dataset(FileData(kind="mnist", path="."), tmp_path).input_shape == (1, 28, 28)


def idx_error(tmp_path: Path, name: str, body: bytes) -> SpecError:
    write_mnist(tmp_path / "m", np.zeros((10, 4, 4), np.uint8), np.arange(10) % 2, gz=False)
    (tmp_path / "m" / name).write_bytes(body)
    err = spec_error(FileData(kind="mnist", path="m"), tmp_path)
    assert err.location == PATH
    return err


def test_idx_files_are_validated(tmp_path: Path) -> None:
    images_name, labels_name = "train-images-idx3-ubyte", "train-labels-idx1-ubyte"
    header = struct.pack(">IIII", 2051, 10, 4, 4)
    cut = idx_error(tmp_path, images_name, header + bytes(100))
    assert "truncated" in cut.message and images_name in cut.message
    wrong = idx_error(tmp_path, images_name, struct.pack(">I", 2049))
    assert "magic 2049, not 2051" in wrong.message
    assert "truncated" in idx_error(tmp_path, labels_name, struct.pack(">I", 2049)).message
    assert "no IDX header" in idx_error(tmp_path, labels_name, b"\x00\x00").message
    longer = header + bytes(161)
    assert "beyond the 10 records" in idx_error(tmp_path, images_name, longer).message
    fewer = struct.pack(">II", 2049, 9) + bytes(9)
    assert "10 images but" in idx_error(tmp_path, labels_name, fewer).message


def test_truncated_and_corrupt_gzip(tmp_path: Path) -> None:
    write_mnist(tmp_path, np.zeros((10, 4, 4), np.uint8), np.arange(10) % 2, gz=True)
    name = tmp_path / "train-images-idx3-ubyte.gz"
    whole = name.read_bytes()
    name.write_bytes(whole[: len(whole) // 2])
    assert "cannot be read" in spec_error(FileData(kind="mnist", path="."), tmp_path).message
    name.write_bytes(b"\x1f\x8b" + bytes(30))
    assert spec_error(FileData(kind="mnist", path="."), tmp_path).location == PATH


def test_mnist_needs_both_files(tmp_path: Path) -> None:
    write_mnist(tmp_path / "m", np.zeros((10, 4, 4), np.uint8), np.arange(10) % 2, gz=False)
    (tmp_path / "m" / "train-labels-idx1-ubyte").unlink()
    err = spec_error(FileData(kind="mnist", path="m"), tmp_path)
    assert "file not found" in err.message and "train-labels-idx1-ubyte" in err.message
    assert (
        "is a file"
        in spec_error(FileData(kind="mnist", path="m/train-images-idx3-ubyte"), tmp_path).message
    )


# ---------------------------------------------------------------- cifar10
def test_cifar10_batches(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    directory = tmp_path / "cifar-10-batches-py"
    directory.mkdir()
    first, second = images(rng, 12, (3072,)), images(rng, 8, (3072,))
    write_cifar_batch(directory / "data_batch_1", first, [i % 10 for i in range(12)])
    write_cifar_batch(directory / "data_batch_2", second, [9 - i for i in range(8)], protocol=5)
    meta = {b"label_names": [b"airplane", b"automobile"], b"num_vis": 3072}
    (directory / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))
    spec = FileData(kind="cifar10", path="cifar-10-batches-py")
    data = load_dataset(spec, tmp_path)
    assert (data.input_shape, data.classes) == ((3, 32, 32), 10)
    assert "data_batch_1, data_batch_2" in data.description and "airplane" in data.description
    raw = np.concatenate([first, second]).reshape(20, 3, 32, 32)
    train, val, _ = split_indices(20, spec.split)
    torch.testing.assert_close(data.val_x, standardised(raw, train, (0, 2, 3))[val])
    labels = torch.tensor([i % 10 for i in range(12)] + [9 - i for i in range(8)])
    assert torch.equal(data.val_y, labels[val])
    limited = load_dataset(spec.model_copy(update={"limit": 15}), tmp_path)
    assert len(all_x(limited)) == 15


def test_python3_batches_with_str_keys(tmp_path: Path) -> None:
    data = images(np.random.default_rng(5), 10, (3072,))
    batch = {"data": data, "labels": np.arange(10) % 2}
    (tmp_path / "data_batch_1").write_bytes(pickle.dumps(batch))
    assert load_dataset(FileData(kind="cifar10", path="."), tmp_path).classes == 2


class _Planted:
    """A pickle that would create a directory when loaded."""

    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.mkdir, (str(self.target),))


def test_cifar_pickles_cannot_run_code(tmp_path: Path) -> None:
    planted = tmp_path / "planted"
    (tmp_path / "data_batch_1").write_bytes(pickle.dumps({b"data": _Planted(planted)}))
    err = spec_error(FileData(kind="cifar10", path="."), tmp_path)
    assert err.location == PATH and "mkdir has no place" in err.message
    assert not planted.exists()


@pytest.mark.parametrize(
    ("content", "words"),
    [
        (pickle.dumps([1, 2, 3]), "no `data` entry"),
        (pickle.dumps({b"data": np.zeros((4, 3072), np.uint8)}), "no `labels` entry"),
        (pickle.dumps({b"data": np.zeros((4, 100), np.uint8), b"labels": [0] * 4}), "100 values"),
        (pickle.dumps({b"data": np.zeros((4, 3072)), b"labels": [0] * 4}), "uint8"),
        (pickle.dumps({b"data": np.zeros((4, 3072), np.uint8), b"labels": [0] * 3}), "4 samples"),
        (b"\x80\x02garbage", "not a readable CIFAR-10 batch"),
    ],
)
def test_cifar_batches_are_validated(content: bytes, words: str, tmp_path: Path) -> None:
    (tmp_path / "data_batch_1").write_bytes(content)
    err = spec_error(FileData(kind="cifar10", path="."), tmp_path)
    assert err.location == PATH and words in err.message


def test_cifar_needs_a_batch(tmp_path: Path) -> None:
    (tmp_path / "test_batch").write_bytes(b"")
    err = spec_error(FileData(kind="cifar10", path="."), tmp_path)
    assert "file not found" in err.message and "data_batch_1" in err.message


@pytest.mark.parametrize("cells", [2, 4, 8, 16])
def test_a_checkerboard_of_n_cells_alternates_colour_from_cell_to_cell(cells: int) -> None:
    x, y = synthetic(SyntheticData(kind="checkerboard", samples=20_000, noise=0.0, cells=cells))
    column = np.floor((x[:, 0] + 2.0) * cells / 4.0).astype(int)
    row = np.floor((x[:, 1] + 2.0) * cells / 4.0).astype(int)
    assert column.min() == row.min() == 0 and column.max() == row.max() == cells - 1
    assert ((column + row) % 2 == y).all()  # one colour a cell, the neighbours the other
    assert abs(float(y.mean()) - 0.5) < 0.02


def test_only_a_checkerboard_has_cells() -> None:
    with pytest.raises(ValidationError, match="only checkerboard takes `cells`"):
        SyntheticData(kind="moons", cells=8)
