"""Reading the data files a job spec names: `.npz` archives, CSV tables, MNIST's IDX files and
CIFAR-10's python batches, from under Tolaria's data directory.

Each reader checks what it reads and raises SpecError pointing at the spec field to fix (the
path, `x_key`, `label_column`, …) with the resolved file named in the message. Readers return
the samples as stored (`[N, F]` features or `[N, C, H, W]` images, any numeric dtype) and int64
labels; splitting and normalising are datasets.py's. Checking a spec without loading the set
is dataheaders.py's, with the checks shared from here.
"""

from __future__ import annotations

import csv
import gzip
import io
import math
import os
import pickle
import struct
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from esper.contracts.jobs import FileData
from tolaria.errors import Location, SpecError

_DATASET: Location = ["spec", "dataset"]
_PATH: Location = [*_DATASET, "path"]

MNIST_IMAGES = "train-images-idx3-ubyte"
MNIST_LABELS = "train-labels-idx1-ubyte"
IDX_IMAGES_MAGIC = 2051  # unsigned bytes, 3 dimensions: [N, H, W]
IDX_LABELS_MAGIC = 2049  # unsigned bytes, 1 dimension: [N]
CIFAR_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
_READ_CHUNK = 1 << 20
NOT_NPY = "the member is not a .npy array"


@dataclass(frozen=True, eq=False)
class RawData:
    x: np.ndarray[Any, Any]
    """`[N, F]` features or `[N, C, H, W]` images."""
    y: np.ndarray[Any, np.dtype[np.int64]]
    source: str
    """What was read, for the job's description."""


def resolve_path(data_dir: Path, relative: str) -> Path:
    """`relative` inside `data_dir`, symlinks followed; anything that leads outside the data
    directory or does not exist is refused."""
    root = data_dir.resolve()
    target = (root / relative).resolve()
    if not target.is_relative_to(root):
        raise SpecError(_PATH, f"{relative!r} leads outside the data directory")
    if not target.exists():
        raise SpecError(_PATH, f"file not found: {target}")
    return target


def relative_message(message: str, data_dir: Path) -> str:
    """`message` with the data directory's absolute path (each spelling of it) taken out: files
    named relative to it, as a spec names them. For API answers: where the directory lies on the
    server is no client's business (the service's own logs keep the full paths)."""
    roots = {str(data_dir.resolve()), str(data_dir.absolute())}
    for root in sorted(roots, key=len, reverse=True):
        message = message.replace(root + os.sep, "").replace(root, ".")
    return message


def read_files(spec: FileData, data_dir: Path) -> RawData:
    """The samples of a `FileData` spec, at most `spec.limit` of them (the first ones)."""
    path = locate(spec, data_dir)
    if spec.kind == "npz":
        return read_npz(path, spec.x_key, spec.y_key, spec.limit, sequences=spec.sequences)
    if spec.kind == "csv":
        return read_csv(path, spec.label_column, spec.limit)
    if spec.kind == "mnist":
        return read_mnist(path, spec.limit)
    return read_cifar10(path, spec.limit)


def locate(spec: FileData, data_dir: Path) -> Path:
    """The spec's resolved path: a file for npz and csv, a directory for mnist and cifar10."""
    path = resolve_path(data_dir, spec.path)
    if spec.kind in ("npz", "csv"):
        if not path.is_file():
            raise SpecError(_PATH, f"{path} is a directory, not a .{spec.kind} file")
    elif not path.is_dir():
        raise SpecError(_PATH, f"{path} is a file; {spec.kind} data is a directory of files")
    return path


# ------------------------------------------------------------ checks
def labels(values: np.ndarray[Any, Any], where: Location, what: str) -> np.ndarray[Any, Any]:
    """Class labels `0 … C-1` as int64, from integers or integral floats."""
    label_shape(values.shape, where, what)
    scan = LabelScan(where, what)
    scan.add(values)
    scan.check()
    return values.astype(np.int64)


def label_shape(shape: tuple[int, ...], where: Location, what: str) -> None:
    if len(shape) != 1:
        raise SpecError(where, f"{what} must be one label per sample, not shape {shape}")


class LabelScan:
    """What `labels` checks, over labels that may come in blocks (a file streamed, never held
    whole): `add` each block, then `check` raises what `labels` would have raised about them
    all, in the same order. `top` is the largest label among the counted ones."""

    def __init__(self, where: Location, what: str) -> None:
        self.where, self.what = where, what
        self.bad_dtype: np.dtype[Any] | None = None
        self.fractional = False
        self.low: Any = None  # a numpy scalar, shown as `labels` showed it
        self.top = -1

    def add(self, values: np.ndarray[Any, Any], counted: int | None = None) -> None:
        """A block of labels; only its first `counted` (all by default) count for `top`."""
        if values.dtype.kind == "f":
            if not np.isfinite(values).all() or (values != np.round(values)).any():
                self.fractional = True
        elif values.dtype.kind not in "biu":
            self.bad_dtype = values.dtype
        if self.bad_dtype is not None or self.fractional or not values.size:
            return  # refused at `check`: the extremes of what is refused do not matter
        low = values.min()
        self.low = low if self.low is None or low < self.low else self.low
        if values[:counted].size:
            self.top = max(self.top, int(values[:counted].max()))

    def check(self) -> None:
        where, what = self.where, self.what
        if self.bad_dtype is not None:
            raise SpecError(where, f"{what} must be integer class labels, not {self.bad_dtype}")
        if self.fractional:
            raise SpecError(where, f"{what} holds values that are not whole numbers")
        if self.low is not None and self.low < 0:
            raise SpecError(where, f"{what} holds a negative label ({self.low}); use 0 … C-1")


def _features(x: np.ndarray[Any, Any], where: Location, what: str) -> None:
    numeric(x.dtype, where, what)
    finite(x, where, what)


def numeric(dtype: np.dtype[Any], where: Location, what: str) -> None:
    if dtype.kind not in "biuf":
        raise SpecError(where, f"{what} must be numeric, not {dtype}")


def finite(x: np.ndarray[Any, Any], where: Location, what: str) -> None:
    if x.dtype.kind == "f" and not np.isfinite(x).all():
        raise SpecError(where, f"{what} holds NaN or infinite values")


def _same_length(x: np.ndarray[Any, Any], y: np.ndarray[Any, Any], where: Location) -> None:
    same_length(len(x), len(y), where)


def same_length(samples: int, labels: int, where: Location) -> None:
    if samples != labels:
        raise SpecError(where, f"{samples} samples but {labels} labels")
    if not samples:
        raise SpecError(where, "holds no samples")


# --------------------------------------------------------------- npz
def read_npz(
    path: Path, x_key: str, y_key: str, limit: int | None, *, sequences: bool = False
) -> RawData:
    """Arrays `x_key` (`[N, F]`, `[N, H, W]` or `[N, C, H, W]`; `[N, C, L]` with `sequences`)
    and `y_key` (`[N]` labels)."""
    with open_npz(path) as archive:
        arrays: list[np.ndarray[Any, Any]] = []
        for key, field in ((x_key, "x_key"), (y_key, "y_key")):
            npz_member(archive, path, key, field)
            try:
                array = archive[key]
            except (OSError, ValueError, EOFError) as err:
                raise SpecError([*_DATASET, field], f"array {key!r} of {path}: {err}") from None
            if not isinstance(array, np.ndarray):  # NpzFile hands other members over as bytes
                raise SpecError([*_DATASET, field], f"array {key!r} of {path}: {NOT_NPY}")
            arrays.append(array)
    x, y = arrays
    _features(x, [*_DATASET, "x_key"], f"array {x_key!r}")
    x = x.reshape(npz_sample_shape(x.shape, x_key, sequences=sequences))
    y = labels(y, [*_DATASET, "y_key"], f"array {y_key!r}")
    _same_length(x, y, [*_DATASET, "y_key"])
    x, y = x[:limit], y[:limit]
    return RawData(x, y, npz_source(path, x_key, x.shape, y_key))


def open_npz(path: Path) -> np.lib.npyio.NpzFile:
    try:
        # No pickles: an object array in the archive is refused rather than unpickled.
        archive = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as err:
        raise SpecError(_PATH, f"{path} is not a readable .npz archive: {err}") from None
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise SpecError(_PATH, f"{path} is a single .npy array, not an .npz archive")
    return archive


def npz_member(archive: np.lib.npyio.NpzFile, path: Path, key: str, field: str) -> str:
    """The archive's member name for array `key` (as `NpzFile` looks it up)."""
    if key not in archive.files:
        raise SpecError([*_DATASET, field], f"{path} has no array {key!r}; it has {archive.files}")
    names = archive.zip.namelist() if archive.zip is not None else []
    return key if key in names else f"{key}.npy"


def npz_sample_shape(
    shape: tuple[int, ...], x_key: str, *, sequences: bool = False
) -> tuple[int, ...]:
    """`[N, …]` as the model sees it: a channel added to `[N, H, W]` images; `[N, C, L]`
    sequences (`sequences`) as they are."""
    if len(shape) == 3:
        return shape if sequences else (shape[0], 1, *shape[1:])
    if sequences:
        raise SpecError(
            [*_DATASET, "sequences"],
            f"array {x_key!r} has shape {shape}; sequences are [N, C, L] (channels, length)",
        )
    if len(shape) not in (2, 4):
        raise SpecError(
            [*_DATASET, "x_key"],
            f"array {x_key!r} has shape {shape}; samples must be [N, F], [N, H, W] or [N, C, H, W]",
        )
    return shape


def npz_source(path: Path, x_key: str, shape: tuple[int, ...], y_key: str) -> str:
    return f"npz {path.name} ({x_key!r} {list(shape[1:])}, {y_key!r})"


# --------------------------------------------------------------- csv
def read_csv(path: Path, label_column: int, limit: int | None) -> RawData:
    """Comma-separated numbers, one sample a row; the first row is a header when some cell of
    it is not a number."""
    try:
        first, header = csv_first_row(path)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "input contained no data"
            table = np.loadtxt(
                path,
                delimiter=",",
                skiprows=1 if header else 0,
                max_rows=limit,
                ndmin=2,
                dtype=np.float64,
                encoding="utf-8",
            )
    except (OSError, ValueError) as err:
        raise SpecError(_PATH, f"{path} is not a numeric CSV table: {err}") from None
    rows, columns = table.shape
    column, name = csv_label_column(path, rows, columns, label_column, first if header else None)
    y = labels(table[:, column], [*_DATASET, "label_column"], f"column {column}{name}")
    x = np.delete(table, column, axis=1)
    _features(x, _PATH, f"the feature columns of {path}")
    return RawData(x, y, csv_source(path, columns, column, name))


def csv_first_row(path: Path) -> tuple[list[str] | None, bool]:
    """The first row, and whether it is a header (some cell of it is not a number). Raises
    OSError and ValueError (UnicodeDecodeError) as reading the file does."""
    with path.open(newline="", encoding="utf-8") as f:
        first = next(csv.reader(f), None)
    return first, first is not None and any(c.strip() and not _is_number(c) for c in first)


def csv_label_column(
    path: Path, rows: int, columns: int, label_column: int, header: list[str] | None
) -> tuple[int, str]:
    """The label column's index and, from the header, its name as the description shows it."""
    if not rows:
        raise SpecError(_PATH, f"{path} holds no data rows")
    if columns < 2:
        raise SpecError(_PATH, f"{path} needs feature columns and a label column")
    if not -columns <= label_column < columns:
        raise SpecError(
            [*_DATASET, "label_column"], f"{path} has {columns} columns, no column {label_column}"
        )
    column = label_column % columns
    name = f" ({header[column].strip()!r})" if header and column < len(header) else ""
    return column, name


def csv_source(path: Path, columns: int, column: int, name: str) -> str:
    return f"csv {path.name} ({columns - 1} features, label column {column}{name})"


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


# ------------------------------------------------------------- mnist
def read_mnist(directory: Path, limit: int | None, keep_images: bool = True) -> RawData:
    """The training IDX files of MNIST (or any set in its format: Fashion-MNIST, KMNIST…),
    plain or gzipped. Images come out as `[N, 1, H, W]` uint8; without `keep_images` they are
    read through and checked but not kept (a zero-strided stand-in has their shape)."""
    images_path = _one_of(directory, MNIST_IMAGES)
    labels_path = _one_of(directory, MNIST_LABELS)
    images, count = _read_idx(images_path, IDX_IMAGES_MAGIC, limit, keep_images)
    raw_labels, label_count = _read_idx(labels_path, IDX_LABELS_MAGIC, limit)
    if count != label_count:
        raise SpecError(
            _PATH, f"{images_path.name} holds {count} images but {labels_path.name} {label_count}"
        )
    y = labels(raw_labels, _PATH, str(labels_path))
    _same_length(images, y, _PATH)
    height, width = images.shape[1:]
    return RawData(images[:, None], y, f"mnist {directory.name} ({count} images {height}×{width})")


def _one_of(directory: Path, name: str) -> Path:
    for candidate in (directory / name, directory / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    raise SpecError(_PATH, f"file not found: {directory / name} (or {name}.gz)")


def _read_idx(
    path: Path, magic: int, limit: int | None, keep: bool = True
) -> tuple[np.ndarray[Any, Any], int]:
    """The first `limit` records of an IDX file of unsigned bytes (without `keep`: a zero-strided
    stand-in of their shape, the bytes read and dropped), and the record count its header
    gives. The header: a big-endian uint32 magic (0x0000 0x08 ndim), then ndim uint32
    dimensions."""
    try:
        with _open(path) as f:
            head = _read_exactly(f, 4)
            if len(head) < 4:
                raise SpecError(_PATH, f"{path} is truncated: it has no IDX header")
            (found,) = struct.unpack(">I", head)
            if found != magic:
                raise SpecError(
                    _PATH, f"{path} is not an IDX file of this kind: magic {found}, not {magic}"
                )
            ndim = magic & 0xFF
            dims_bytes = _read_exactly(f, 4 * ndim)
            if len(dims_bytes) < 4 * ndim:
                raise SpecError(_PATH, f"{path} is truncated inside its IDX header")
            dims = struct.unpack(f">{ndim}I", dims_bytes)
            count = dims[0]
            records = count if limit is None else min(count, limit)
            record = math.prod(dims[1:])
            data = _read_exactly(f, records * record) if keep else None
            got = len(data) if data is not None else _skip(f, records * record)
            if got < records * record:
                raise SpecError(
                    _PATH,
                    f"{path} is truncated: its header gives {count} records of {record} bytes, "
                    f"the file ends after {got // max(record, 1)}",
                )
            if records == count and f.read(1):
                raise SpecError(
                    _PATH, f"{path} has bytes beyond the {count} records its header gives"
                )
    except (OSError, EOFError, zlib.error) as err:  # gzip: BadGzipFile, a cut-off stream
        raise SpecError(_PATH, f"{path} cannot be read (truncated or corrupt?): {err}") from None
    if data is None:
        return np.broadcast_to(np.zeros((), np.uint8), (records, *dims[1:])), count
    array = np.frombuffer(data, dtype=np.uint8).reshape(records, *dims[1:])
    return array, count


def _open(path: Path) -> io.BufferedIOBase:
    if path.name.endswith(".gz"):
        return gzip.open(path, "rb")
    return path.open("rb")


def _read_exactly(f: io.BufferedIOBase, size: int) -> bytearray:
    """Up to `size` bytes, fewer only at the end of the file. In chunks, so a header that
    promises far more than the file holds does not allocate it all up front."""
    data = bytearray()
    while len(data) < size:
        chunk = f.read(min(_READ_CHUNK, size - len(data)))
        if not chunk:
            break
        data += chunk
    return data


def _skip(f: io.BufferedIOBase, size: int) -> int:
    """Reads up to `size` bytes and drops them (a gzip stream cannot seek cheaply): how many
    there were."""
    done = 0
    while done < size:
        chunk = f.read(min(_READ_CHUNK, size - done))
        if not chunk:
            break
        done += len(chunk)
    return done


# ----------------------------------------------------------- cifar10
def read_cifar10(directory: Path, limit: int | None) -> RawData:
    """`data_batch_1` … `data_batch_5` of the CIFAR-10 python version (those present, in
    order): dicts holding `data` (uint8 `[N, 3072]`, channel-major 32×32 images) and `labels`.
    Images come out as `[N, 3, 32, 32]` uint8; `batches.meta`'s class names, when present, go
    into the description."""
    paths = [directory / name for name in CIFAR_BATCHES if (directory / name).is_file()]
    if not paths:
        raise SpecError(_PATH, f"file not found: {directory / CIFAR_BATCHES[0]}")
    xs: list[np.ndarray[Any, Any]] = []
    ys: list[np.ndarray[Any, Any]] = []
    for path in paths:
        if limit is not None and sum(len(y) for y in ys) >= limit:
            break
        batch = _unpickle(path)
        data, batch_labels = _field(batch, "data", path), _field(batch, "labels", path)
        if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2:
            raise SpecError(_PATH, f"{path}: `data` is not a uint8 [N, 3072] array")
        if data.shape[1] != 3 * 32 * 32:
            raise SpecError(_PATH, f"{path}: `data` rows hold {data.shape[1]} values, not 3072")
        y = labels(np.asarray(batch_labels), _PATH, f"{path}: `labels`")
        _same_length(data, y, _PATH)
        xs.append(data.reshape(-1, 3, 32, 32))
        ys.append(y)
    x, y = np.concatenate(xs)[:limit], np.concatenate(ys)[:limit]
    names = _class_names(directory / "batches.meta")
    shown = f"; classes {', '.join(names)}" if names else ""
    source = f"cifar10 {directory.name} ({', '.join(p.name for p in paths)}{shown})"
    return RawData(x, y, source)


def _field(batch: Any, key: str, path: Path) -> Any:
    """A batch's entry; python 2 pickles have bytes keys, python 3 ones may have str keys."""
    if isinstance(batch, dict):
        for k in (key.encode(), key):
            if k in batch:
                return batch[k]
    raise SpecError(_PATH, f"{path} is not a CIFAR-10 batch: no `{key}` entry")


def _class_names(path: Path) -> list[str]:
    if not path.is_file():
        return []
    try:
        names = _field(_unpickle(path), "label_names", path)
        return [n.decode() if isinstance(n, bytes) else str(n) for n in names]
    except (SpecError, TypeError, UnicodeDecodeError):
        return []  # the names only label the description; training does not need them


class _BatchUnpickler(pickle.Unpickler):
    """Rebuilds only what a CIFAR batch holds: dicts, lists, bytes, numbers and numpy arrays.

    Unpickling otherwise imports and calls whatever a pickle names, i.e. runs code. The data
    directory is the operator's mount and its files must be trusted; but which file is read is
    the job submitter's choice, so anything else a pickle asks for is refused.
    """

    _ALLOWED = frozenset(
        {
            ("numpy.core.multiarray", "_reconstruct"),
            ("numpy._core.multiarray", "_reconstruct"),
            ("numpy.core.multiarray", "scalar"),
            ("numpy._core.multiarray", "scalar"),
            ("numpy.core.numeric", "_frombuffer"),
            ("numpy._core.numeric", "_frombuffer"),
            ("numpy", "ndarray"),
            ("numpy", "dtype"),
            ("_codecs", "encode"),  # bytes in protocol-2 pickles written by python 3
        }
    )

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"{module}.{name} has no place in a CIFAR-10 batch")
        return super().find_class(module, name)


def _unpickle(path: Path) -> Any:
    try:
        with path.open("rb") as f:
            # Python 2 pickles: "bytes" keeps their str keys and values as bytes.
            return _BatchUnpickler(f, encoding="bytes").load()
    except Exception as err:  # a damaged pickle fails in any of a dozen ways
        raise SpecError(_PATH, f"{path} is not a readable CIFAR-10 batch: {err}") from None
