"""The geometry of a file data set without loading it: what the API process reads to check a
job spec, so that it never holds a data set's features (dataformats.py reads them for training).

Each format is checked as its full reader checks it, with the same SpecError, by reading:

- npz: the `.npy` headers of the feature array (shape, dtype; object arrays are refused, as the
  full reader refuses to unpickle them) and the labels, streamed in blocks;
- csv: the whole table, streamed in blocks of lines that are parsed and let go;
- mnist: the IDX headers; the image bytes are read through and dropped, the labels kept;
- cifar10: in a child process, see `cifar10_geometry`.

What needs every feature value and is not streamed, NaN or infinite values in an npz feature
array, is found when the job loads the set: it then fails with the full reader's SpecError.
"""

from __future__ import annotations

import json
import math
import os
import re
import resource
import subprocess
import sys
import warnings
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import IO, Any

import numpy as np

from esper.contracts.jobs import FileData
from tolaria.dataformats import (
    NOT_NPY,
    LabelScan,
    csv_first_row,
    csv_label_column,
    csv_source,
    finite,
    label_shape,
    locate,
    npz_member,
    npz_sample_shape,
    npz_source,
    numeric,
    open_npz,
    read_cifar10,
    read_mnist,
    same_length,
)
from tolaria.errors import Location, SpecError

_DATASET: Location = ["spec", "dataset"]
_PATH: Location = [*_DATASET, "path"]
_BLOCK_BYTES = 1 << 20
_CSV_BLOCK_LINES = 4096
_NPY_VERSIONS = ((1, 0), (2, 0), (3, 0))
CIFAR_CHILD_SECONDS = 120
CIFAR_CHILD_MEMORY_BYTES = 3 << 30
"""Five batches of 30 MB, their concatenation, and python with numpy fit well within this."""


@dataclass(frozen=True)
class Geometry:
    shape: tuple[int, ...]
    """One sample's shape, as `load_dataset` gives it."""
    samples: int
    """After the spec's `limit`."""
    top_label: int
    """The largest label among those samples."""
    source: str
    """The data set as its full reader describes it."""


def read_geometry(spec: FileData, data_dir: Path) -> Geometry:
    """The geometry of the set `read_files(spec, data_dir)` would read, refusing what it
    would refuse (but for NaN features of an npz array, see the module's docstring)."""
    path = locate(spec, data_dir)
    if spec.kind == "npz":
        return npz_geometry(path, spec.x_key, spec.y_key, spec.limit, sequences=spec.sequences)
    if spec.kind == "csv":
        return csv_geometry(path, spec.label_column, spec.limit)
    if spec.kind == "mnist":
        raw = read_mnist(path, spec.limit, keep_images=False)
        return Geometry(raw.x.shape[1:], len(raw.y), int(raw.y.max()), raw.source)
    return cifar10_geometry(path, spec.limit)


# --------------------------------------------------------------- npz
def npz_geometry(
    path: Path, x_key: str, y_key: str, limit: int | None, *, sequences: bool = False
) -> Geometry:
    """The feature array's header only; its labels streamed, at most as many as it has
    samples (a label array longer than that is refused before it is read)."""
    x_where, y_where = [*_DATASET, "x_key"], [*_DATASET, "y_key"]
    with open_npz(path) as archive:
        members = archive.zip
        assert members is not None  # until the archive is closed
        x_name = npz_member(archive, path, x_key, "x_key")
        with _npy(members, x_name, path, x_key, "x_key") as (x_shape, x_dtype, _):
            pass
        y_name = npz_member(archive, path, y_key, "y_key")
        with _npy(members, y_name, path, y_key, "y_key") as (y_shape, y_dtype, stream):
            numeric(x_dtype, x_where, f"array {x_key!r}")
            shape = npz_sample_shape(x_shape, x_key, sequences=sequences)
            what = f"array {y_key!r}"
            label_shape(y_shape, y_where, what)
            if y_shape[0] > shape[0]:
                same_length(shape[0], y_shape[0], y_where)
            scan = LabelScan(y_where, what)
            counted = y_shape[0] if limit is None else limit
            for block in _npy_blocks(stream, y_dtype, y_shape[0]):
                scan.add(block, max(counted, 0))
                counted -= len(block)
            scan.check()
    same_length(shape[0], y_shape[0], y_where)
    samples = shape[0] if limit is None else min(shape[0], limit)
    source = npz_source(path, x_key, (samples, *shape[1:]), y_key)
    return Geometry(shape[1:], samples, scan.top, source)


@contextmanager
def _npy(
    archive: zipfile.ZipFile, name: str, path: Path, key: str, field: str
) -> Iterator[tuple[tuple[int, ...], np.dtype[Any], IO[bytes]]]:
    """A member's `.npy` header (shape, dtype) and its stream, positioned at the data. Refuses
    what `np.load` refuses: a bad header, an object dtype, fewer bytes than the header gives."""
    where = [*_DATASET, field]
    try:
        with archive.open(name) as stream:
            magic = stream.read(len(np.lib.format.MAGIC_PREFIX) + 2)
            if not magic.startswith(np.lib.format.MAGIC_PREFIX):
                raise ValueError(NOT_NPY)
            version = (magic[-2], magic[-1])
            if version not in _NPY_VERSIONS:
                raise ValueError(f"unsupported .npy format version {version}")
            read_header = (
                np.lib.format.read_array_header_1_0
                if version == (1, 0)
                else np.lib.format.read_array_header_2_0
            )
            shape, _, dtype = read_header(stream)
            if dtype.hasobject:  # np.load's words: the full reader's error
                raise ValueError("Object arrays cannot be loaded when allow_pickle=False")
            need = math.prod(shape) * dtype.itemsize
            held = archive.getinfo(name).file_size - stream.tell()
            if held < need:  # np.load's words (it counts from the block where the data end)
                raise ValueError(f"EOF: reading array data, expected {need} bytes got {held}")
            yield tuple(int(d) for d in shape), dtype, stream
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        if isinstance(err, SpecError):  # the caller's, from inside the `with`
            raise
        raise SpecError(where, f"array {key!r} of {path}: {err}") from None


def _npy_blocks(stream: IO[bytes], dtype: np.dtype[Any], count: int) -> Iterator[np.ndarray]:
    if dtype.kind not in "biuf":  # refused by LabelScan for its dtype: no need to read them
        yield np.empty(0, dtype)
        return
    per_block = max(1, _BLOCK_BYTES // max(dtype.itemsize, 1))
    for start in range(0, count, per_block):
        n = min(per_block, count - start)
        data = stream.read(n * dtype.itemsize)
        if len(data) < n * dtype.itemsize:
            raise EOFError("the array ends before its header says")
        yield np.frombuffer(data, dtype=dtype, count=n)


# --------------------------------------------------------------- csv
def csv_geometry(path: Path, label_column: int, limit: int | None) -> Geometry:
    """One pass over the table in blocks of lines, each parsed as the full reader parses the
    whole table (np.loadtxt) and then let go: the rows are counted, the label column scanned,
    the feature columns checked for NaN, but no block outlives its turn."""
    try:
        first, header = csv_first_row(path)
        columns, rows, scan, bad_features = _scan_csv(path, header, label_column, limit)
    except (OSError, ValueError) as err:
        raise SpecError(_PATH, f"{path} is not a numeric CSV table: {err}") from None
    column, name = csv_label_column(path, rows, columns, label_column, first if header else None)
    assert scan is not None  # a label column exists: the table was scanned
    scan.what = f"column {column}{name}"
    scan.check()
    if bad_features is not None:
        finite(bad_features, _PATH, f"the feature columns of {path}")
    return Geometry((columns - 1,), rows, scan.top, csv_source(path, columns, column, name))


def _scan_csv(
    path: Path, header: bool, label_column: int, limit: int | None
) -> tuple[int, int, LabelScan | None, np.ndarray | None]:
    """(columns, rows, the label column's scan, a block of features holding NaN if any). A
    ValueError for what np.loadtxt would refuse, rows numbered as it numbers them."""
    columns = rows = lines = 0
    scan: LabelScan | None = None
    bad_features: np.ndarray | None = None
    with path.open(newline="", encoding="utf-8") as f:
        if header:
            next(f, None)
        while limit is None or rows < limit:
            block = list(islice(f, _CSV_BLOCK_LINES))
            if not block:
                break
            table = _parse_block(block, lines, None if limit is None else limit - rows)
            if len(table):
                if columns and table.shape[1] != columns:
                    raise ValueError(
                        f"the number of columns changed from {columns} to {table.shape[1]} "
                        f"at row {lines + 1}"
                    )
                columns = table.shape[1]
                if columns >= 2 and -columns <= label_column < columns:
                    column = label_column % columns
                    if scan is None:
                        scan = LabelScan([*_DATASET, "label_column"], f"column {column}")
                    scan.add(table[:, column])
                    features = np.delete(table, column, axis=1)
                    if bad_features is None and not np.isfinite(features).all():
                        bad_features = features
                rows += len(table)
            lines += len(block)
    return columns, rows, scan, bad_features


def _parse_block(block: list[str], offset: int, max_rows: int | None) -> np.ndarray:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "input contained no data"
            return np.loadtxt(block, delimiter=",", max_rows=max_rows, ndmin=2, dtype=np.float64)
    except ValueError as err:  # its rows count from the block's start: from the table's here
        shifted = re.sub(r"at row (\d+)", lambda m: f"at row {int(m[1]) + offset}", str(err))
        raise ValueError(shifted) from None


# ----------------------------------------------------------- cifar10
def cifar10_geometry(directory: Path, limit: int | None) -> Geometry:
    """CIFAR-10 batches are pickles: their structure (a dict of a uint8 `[N, 3072]` array and
    N labels) shows only once they are unpickled, and unpickling builds the arrays, 30 MB a
    batch. So the API process does not read them: a child process runs the full reader
    (`read_cifar10`, the same checks and errors) under an address-space limit and a time
    limit, and answers with the geometry or the SpecError. A hostile or huge batch costs that
    child, not the API, its memory."""
    command = [sys.executable, "-m", "tolaria.dataheaders", str(directory), str(limit or 0)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    try:
        done = subprocess.run(
            command, capture_output=True, text=True, timeout=CIFAR_CHILD_SECONDS, env=env
        )
        answer = json.loads(done.stdout)
    except subprocess.TimeoutExpired:
        raise SpecError(
            _PATH, f"{directory}: reading the CIFAR-10 batches took over {CIFAR_CHILD_SECONDS} s"
        ) from None
    except ValueError:  # no answer: the child died (out of its memory, or a crash)
        tail = done.stderr.strip().splitlines()[-1:] or [f"exit status {done.returncode}"]
        raise SpecError(
            _PATH, f"{directory}: the CIFAR-10 batches could not be read: {tail[0]}"
        ) from None
    if "message" in answer:
        raise SpecError(answer["location"], answer["message"])
    return Geometry(tuple(answer["shape"]), answer["samples"], answer["top"], answer["source"])


def _cifar10_child(directory: str, limit: int) -> dict[str, Any]:
    """In the child: the full reader, under the memory limit."""
    resource.setrlimit(resource.RLIMIT_AS, (CIFAR_CHILD_MEMORY_BYTES, CIFAR_CHILD_MEMORY_BYTES))
    try:
        raw = read_cifar10(Path(directory), limit or None)
    except SpecError as err:
        return {"location": err.location, "message": err.message}
    return {
        "shape": [int(d) for d in raw.x.shape[1:]],
        "samples": len(raw.y),
        "top": int(raw.y.max()),
        "source": raw.source,
    }


if __name__ == "__main__":
    print(json.dumps(_cifar10_child(sys.argv[1], int(sys.argv[2]))))
