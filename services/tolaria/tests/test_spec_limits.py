"""One request cannot freeze Tolaria or take its memory: big YAML bodies are refused without
stalling other routes, a spec is checked without building its data set, and a job whose
estimated memory is over the budget is refused with the estimate and the budget."""

from __future__ import annotations

import pickle
import re
import statistics
import struct
import threading
import time
import tracemalloc
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
from jobhelpers import TOKEN
from test_datasets import write_cifar_batch, write_mnist

from esper.cli.stack import DEMO_JOB
from esper.contracts import JobSpec
from esper.contracts.jobs import FileData, SyntheticData, TrainingSpec
from esper.specyaml import YamlLimitError, load_spec_yaml
from esper.testing import ServiceProcess
from tolaria.datasets import dataset_geometry, load_dataset
from tolaria.errors import SpecError
from tolaria.memory import check_job_memory, estimate_job_memory
from tolaria.models import build_model
from tolaria.validation import check_spec

TolariaFactory = Callable[..., ServiceProcess]


@pytest.fixture(scope="module")
def api_only(tolaria_factory: TolariaFactory) -> ServiceProcess:
    """An API-only replica: whatever it accepts stays queued, nothing trains here."""
    return tolaria_factory(TOLARIA_WORKERS="0")


@pytest.fixture
def api(api_only: ServiceProcess) -> Iterator[httpx.Client]:
    with httpx.Client(
        base_url=api_only.url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=120
    ) as client:
        yield client


def _big_yaml() -> bytes:
    """Just under 1 MB (and the service-wide body limit) of a valid YAML list."""
    body = b"name: big\nitems:\n" + b"- 1\n" * 249_990
    assert len(body) < 1_000_000
    return body


def test_healthz_stays_fast_while_big_yaml_bodies_are_refused(
    api_only: ServiceProcess, api: httpx.Client
) -> None:
    body = _big_yaml()
    done = threading.Event()
    answers: list[int] = []

    def submit() -> None:
        with httpx.Client(
            base_url=api_only.url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=120
        ) as client:
            while not done.is_set():
                resp = client.post(
                    "/jobs", content=body, headers={"Content-Type": "application/yaml"}
                )
                answers.append(resp.status_code)
                time.sleep(0.05)

    senders = [threading.Thread(target=submit) for _ in range(3)]
    for sender in senders:
        sender.start()
    latencies: list[float] = []
    try:
        time.sleep(0.3)  # the three bodies are on their way
        for _ in range(60):
            start = time.perf_counter()
            assert api.get("/healthz").status_code == 200
            latencies.append(time.perf_counter() - start)
            time.sleep(0.01)
    finally:
        done.set()
        for sender in senders:
            sender.join(timeout=120)
    p99 = statistics.quantiles(latencies, n=100)[98]
    assert p99 < 0.1, f"healthz p99 {p99 * 1000:.0f} ms while big YAML bodies were submitted"
    assert answers and set(answers) == {413}, answers


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("a: " + "[" * 40 + "]" * 40, "nests deeper"),
        ("a: [" + ", ".join(["1"] * 20_000) + "]", "nodes"),
        (  # a few lines whose aliases expand to a million nodes
            "a: &a [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]\n"
            + "".join(
                f"{n}: &{n} [{', '.join([f'*{p}'] * 10)}]\n"
                for p, n in zip("abcde", "bcdef", strict=True)
            ),
            "aliases expanded",
        ),
    ],
    ids=["deep", "many_nodes", "alias_bomb"],
)
def test_yaml_over_the_node_and_depth_limits_is_refused(
    api: httpx.Client, text: str, words: str
) -> None:
    with pytest.raises(YamlLimitError, match=words):
        load_spec_yaml(text)
    resp = api.post("/jobs", content=text, headers={"Content-Type": "application/yaml"})
    assert resp.status_code == 422, resp.text
    error = resp.json()["error"]
    assert error["type"] == "validation_error" and error["location"] == ["body"], error
    assert words in error["message"]


def test_the_example_yaml_is_accepted(api: httpx.Client) -> None:
    root = Path(__file__).resolve().parents[3]
    body = (root / "examples" / "jobs" / "circles.yaml").read_bytes()
    resp = api.post("/jobs", content=body, headers={"Content-Type": "application/yaml"})
    assert resp.status_code == 202, resp.text
    assert api.post("/jobs/" + resp.json()["job_id"] + "/stop").status_code == 200


def test_yaml_anchors_within_the_limits_still_load() -> None:
    data = load_spec_yaml("base: &b {lr: 0.01}\ntraining: *b\n")
    assert data == {"base": {"lr": 0.01}, "training": {"lr": 0.01}}


def _peak_rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc")
def test_a_huge_generated_data_set_is_checked_without_being_built(
    api_only: ServiceProcess, api: httpx.Client
) -> None:
    """1M × 64 blobs are 256 MB of float32 before copies: the API checks the spec by arithmetic
    and refuses it for a layer it lacks without ever generating the set."""
    assert api_only.pid is not None
    spec: dict[str, Any] = {
        "model": {"kind": "mlp", "hidden": [32]},
        "dataset": {"kind": "blobs", "samples": 1_000_000, "features": 64, "classes": 4},
        "morphogenesis": {"layers": ["no_such_layer"]},
    }
    assert api.get("/healthz").status_code == 200
    before = _peak_rss(api_only.pid)
    start = time.perf_counter()
    resp = api.post("/jobs", json=spec)
    elapsed = time.perf_counter() - start
    assert resp.status_code == 422, resp.text
    assert resp.json()["error"]["location"] == ["body", "morphogenesis", "layers", 0]
    grown = _peak_rss(api_only.pid) - before
    assert grown < 50 << 20, f"the API process's peak memory grew by {grown >> 20} MiB"
    assert elapsed < 3.0, f"checking the spec took {elapsed:.1f} s"


def test_a_job_over_the_memory_budget_is_refused_with_the_estimate(api: httpx.Client) -> None:
    spec = {
        "model": {"kind": "mlp", "hidden": [65536]},
        "dataset": {"kind": "spirals"},
        "training": {"batch_size": 65536},
    }
    before = api.get("/jobs").json()["items"]
    resp = api.post("/jobs", json=spec)
    assert resp.status_code == 422, resp.text
    error = resp.json()["error"]
    assert error["type"] == "invalid_spec", error
    assert error["location"] == ["body", "training", "batch_size"], error
    assert "48.0 GiB" in error["message"] and "8.0 GiB" in error["message"], error
    assert "TOLARIA_MAX_JOB_MEMORY_BYTES" in error["message"]
    assert api.get("/jobs").json()["items"] == before


def test_the_budget_is_a_setting(tolaria_factory: TolariaFactory) -> None:
    small = tolaria_factory(TOLARIA_WORKERS="0", TOLARIA_MAX_JOB_MEMORY_BYTES=str(8 << 20))
    spec = {"model": {"kind": "mlp", "hidden": [256, 256]}, "dataset": {"kind": "spirals"}}
    with httpx.Client(
        base_url=small.url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60
    ) as client:
        resp = client.post("/jobs", json={**spec, "training": {"batch_size": 8192}})
        assert resp.status_code == 422, resp.text
        assert "8.0 MiB (8,388,608 bytes)" in resp.json()["error"]["message"]
        assert client.post("/jobs", json=spec).status_code == 202


# ------------------------------------------------------------ the estimate
MODELS: dict[str, tuple[dict[str, Any], tuple[int, ...]]] = {
    "mlp": ({"kind": "mlp", "hidden": [512, 512]}, (20,)),
    "cnn": ({"kind": "cnn", "channels": [32, 64]}, (3, 32, 32)),
    "resnet": ({"kind": "resnet", "width": 16}, (3, 32, 32)),
    "layers": (
        {
            "kind": "layers",
            "layers": [
                {"type": "conv2d", "out": 32},
                {"type": "batchnorm2d"},
                {"type": "relu"},
                {"type": "dropout"},
                {"type": "maxpool2d"},
                {"type": "groupnorm", "groups": 8},
                {"type": "global_avgpool"},
                {"type": "linear", "out": "classes"},
            ],
        },
        (3, 32, 32),
    ),
}


@pytest.mark.parametrize("kind", list(MODELS))
def test_every_model_kind_is_estimated_and_refused_over_the_budget(kind: str) -> None:
    model_spec, shape = MODELS[kind]
    spec = JobSpec.model_validate({"model": model_spec, "dataset": {"kind": "spirals"}})
    with torch.device("meta"):
        model = build_model(spec.model, shape, 10)
    small = estimate_job_memory(model, TrainingSpec(batch_size=32), shape, 1000)
    big = estimate_job_memory(model, TrainingSpec(batch_size=4096), shape, 1000)
    assert small.parameters == sum(p.numel() for p in model.parameters()) > 0
    # Activations grow with the batch (evaluation runs batches of at least 1024).
    assert big.activation_bytes > 3 * small.activation_bytes > 0
    assert big.model_bytes == small.model_bytes == small.parameters * 4 * 4  # adam: 2 states
    check_job_memory(big, big.total)
    with pytest.raises(SpecError) as caught:
        check_job_memory(big, big.total - 1)
    assert caught.value.location == ["spec", "training", "batch_size"]
    assert f"{big.total - 1:,} bytes" in caught.value.message
    assert big.describe() in caught.value.message


def test_sgd_without_momentum_keeps_no_optimizer_state() -> None:
    with torch.device("meta"):
        model = build_model(JobSpec.model_validate(DEMO_JOB).model, (2,), 2)
    plain = estimate_job_memory(model, TrainingSpec(optimizer="sgd", momentum=0.0), (2,), 100)
    assert plain.model_bytes == plain.parameters * 4 * 2


def test_the_examples_and_the_demo_fit_the_default_budget(tmp_path: Path) -> None:
    check_spec(JobSpec.model_validate(DEMO_JOB), tmp_path)
    root = Path(__file__).resolve().parents[3]
    for path in sorted((root / "examples" / "jobs").glob("*.yaml")):
        spec = JobSpec.from_yaml(path.read_text())
        if isinstance(spec.dataset, SyntheticData):
            shape: tuple[int, ...] = (spec.dataset.features,)
            samples = spec.dataset.samples
        else:  # file data sets are not in the repository; CIFAR-10's geometry is known
            assert spec.dataset.kind == "cifar10", spec.dataset
            shape, samples = (3, 32, 32), 60_000
        with torch.device("meta"):
            model = build_model(spec.model, shape, 10)
        check_job_memory(estimate_job_memory(model, spec.training, shape, samples), 8 << 30)


def test_the_geometry_check_agrees_with_loading(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "imgs.npz", x=rng.random((50, 3, 8, 8)), y=np.arange(50) % 3)
    blobs = SyntheticData(kind="blobs", samples=300, features=16, classes=5)
    for dataset in (blobs, FileData(kind="npz", path="imgs.npz")):
        assert dataset_geometry(dataset, tmp_path) == _loaded(dataset, tmp_path)


# ------------------------------------------- file data sets, checked from their headers
def _loaded(spec: Any, data_dir: Path) -> tuple[tuple[int, ...], int, int]:
    data = load_dataset(spec, data_dir)
    return data.input_shape, data.classes, len(data.train_y) + len(data.val_y) + len(data.test_y)


def _outcome(check: Callable[[], object]) -> object:
    try:
        return check()
    except SpecError as err:  # numpy's parse errors name an object's address
        return err.location, re.sub(r" at 0x[0-9a-f]+", "", err.message)


def _npy_member(header: bytes, body: bytes = b"") -> bytes:
    return np.lib.format.MAGIC_PREFIX + b"\x01\x00" + struct.pack("<H", len(header)) + header + body


def _zip(path: Path, members: dict[str, bytes]) -> None:
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)


def _npz(**arrays: Any) -> Callable[[Path], object]:
    return lambda d: np.savez(d / "d.npz", **arrays)


def _text(name: str, text: str) -> Callable[[Path], object]:
    return lambda d: (d / name).write_text(text)


def _mnist(images: np.ndarray, labels: np.ndarray, gz: bool = False) -> Callable[[Path], object]:
    return lambda d: write_mnist(d / "m", images, labels, gz)


def _idx(name: str, body: bytes | None) -> Callable[[Path], object]:
    """MNIST files with `name` replaced by `body`, or removed."""

    def write(d: Path) -> None:
        gz = name.endswith(".gz")
        write_mnist(d / "m", np.zeros((10, 4, 4), np.uint8), np.arange(10) % 2, gz=gz)
        if body is None:
            (d / "m" / name).unlink()
        else:
            (d / "m" / name).write_bytes(body)

    return write


def _cifar(*batches: tuple[np.ndarray, list[int]] | bytes) -> Callable[[Path], object]:
    def write(d: Path) -> None:
        (d / "c").mkdir()
        for i, batch in enumerate(batches, 1):
            if isinstance(batch, bytes):
                (d / "c" / f"data_batch_{i}").write_bytes(batch)
            else:
                write_cifar_batch(d / "c" / f"data_batch_{i}", *batch)

    return write


_X = np.arange(40.0).reshape(20, 2)
_LINES = "a,b,label\n" + "".join(f"{i},{i * i % 7},{i % 3}\n" for i in range(6000))
_IMAGES = np.random.default_rng(1).integers(0, 256, (12, 5, 5), dtype=np.uint8)
_BATCH = np.random.default_rng(2).integers(0, 256, (6, 3072), dtype=np.uint8)
_HEADER = b"{'descr': '<f8', 'fortran_order': False, 'shape': (20, 2), }"
NPZ = {"kind": "npz", "path": "d.npz"}
CSV = {"kind": "csv", "path": "t.csv"}
MNIST = {"kind": "mnist", "path": "m"}
CIFAR = {"kind": "cifar10", "path": "c"}
FILE_CASES: dict[str, tuple[Callable[[Path], object], dict[str, Any]]] = {
    "npz_features": (_npz(x=_X, y=np.arange(20) % 3), NPZ),
    "npz_gray_limit": (_npz(x=np.zeros((30, 6, 5)), y=np.arange(30.0) % 4), {**NPZ, "limit": 9}),
    "npz_colour": (_npz(x=np.zeros((20, 3, 4, 4), np.uint8), y=np.arange(20) % 2), NPZ),
    "npz_missing_file": (lambda d: None, NPZ),
    "npz_not_a_zip": (_text("d.npz", "not a zip"), NPZ),
    "npz_single_npy": (lambda d: np.save(d / "d.npz", _X), NPZ),
    "npz_no_y": (_npz(x=_X, labels=np.zeros(20)), NPZ),
    "npz_corrupt_header": (
        lambda d: _zip(d / "d.npz", {"x.npy": _npy_member(b"{'descr': nonsense}\n"), "y.npy": b""}),
        NPZ,
    ),
    "npz_bad_magic": (
        lambda d: _zip(d / "d.npz", {"x.npy": b"\x93NUMPX" + bytes(20), "y.npy": b""}),
        NPZ,
    ),
    "npz_truncated_x": (
        lambda d: _zip(d / "d.npz", {"x.npy": _npy_member(_HEADER.ljust(117) + b"\n", bytes(8))}),
        NPZ,
    ),
    "npz_object_x": (_npz(x=np.array([{"a": 1}] * 4, dtype=object), y=np.zeros(4)), NPZ),
    "npz_object_y": (_npz(x=np.zeros((4, 2)), y=np.array([None] * 4, dtype=object)), NPZ),
    "npz_x_1d": (_npz(x=np.zeros(5), y=np.zeros(5, int)), NPZ),
    "npz_x_complex": (_npz(x=np.array([[1 + 2j]] * 3), y=np.zeros(3, int)), NPZ),
    "npz_x_strings": (_npz(x=np.array([["a"]] * 3), y=np.zeros(3, int)), NPZ),
    "npz_fewer_labels": (_npz(x=_X, y=np.zeros(19, int)), NPZ),
    "npz_more_labels": (_npz(x=_X, y=np.arange(21) % 2), NPZ),
    "npz_no_samples": (_npz(x=np.zeros((0, 2)), y=np.zeros(0, int)), NPZ),
    "npz_labels_2d": (_npz(x=_X, y=np.zeros((20, 1), int)), NPZ),
    "npz_labels_fraction": (_npz(x=_X, y=np.full(20, 0.5)), NPZ),
    "npz_labels_negative": (_npz(x=_X, y=np.arange(20) - 3), NPZ),
    "npz_labels_strings": (_npz(x=_X, y=np.array(["a"] * 20)), NPZ),
    "npz_one_class": (_npz(x=_X, y=np.zeros(20, int)), NPZ),
    "npz_one_class_in_limit": (_npz(x=_X, y=np.arange(20) // 10), {**NPZ, "limit": 10}),
    "npz_too_few": (_npz(x=_X[:2], y=np.arange(2)), NPZ),
    "csv_header": (_text("t.csv", _LINES), CSV),
    "csv_label_first_limit": (_text("t.csv", _LINES), {**CSV, "label_column": 0, "limit": 15}),
    "csv_plain": (_text("t.csv", "".join(f"1,{i},{i % 2}.0\n" for i in range(12))), CSV),
    "csv_missing_file": (lambda d: None, CSV),
    "csv_not_numeric": (_text("t.csv", "x,y\n1,0\n2,oops\n"), CSV),
    "csv_not_numeric_late": (_text("t.csv", _LINES + "2,oops,1\n"), CSV),
    "csv_columns_change": (_text("t.csv", "1,0,1\n2,1\n"), CSV),
    "csv_columns_change_late": (_text("t.csv", _LINES + "2,1\n"), CSV),
    "csv_no_column": (_text("t.csv", "1,0\n2,1\n"), {**CSV, "label_column": 2}),
    "csv_fraction": (_text("t.csv", "1,0\n2,1.5\n3,1\n"), CSV),
    "csv_negative_late": (_text("t.csv", _LINES + "1,1,-2\n"), CSV),
    "csv_no_rows": (_text("t.csv", "a,b\n"), CSV),
    "csv_one_column": (_text("t.csv", "0\n1\n"), CSV),
    "csv_nan": (_text("t.csv", "1,0\nnan,1\n3,1\n"), CSV),
    "csv_one_class": (_text("t.csv", "1,0\n2,0\n3,0\n"), CSV),
    "mnist": (_mnist(_IMAGES, np.arange(12) % 10), MNIST),
    "mnist_gz_limit": (_mnist(_IMAGES, np.arange(12) % 10, gz=True), {**MNIST, "limit": 7}),
    "mnist_truncated": (
        _idx("train-images-idx3-ubyte", struct.pack(">IIII", 2051, 10, 4, 4)),
        MNIST,
    ),
    "mnist_bad_magic": (_idx("train-images-idx3-ubyte", struct.pack(">I", 2049)), MNIST),
    "mnist_no_header": (_idx("train-labels-idx1-ubyte", b"\x00\x00"), MNIST),
    "mnist_extra_bytes": (
        _idx("train-images-idx3-ubyte", struct.pack(">IIII", 2051, 10, 4, 4) + bytes(161)),
        MNIST,
    ),
    "mnist_fewer_labels": (
        _idx("train-labels-idx1-ubyte", struct.pack(">II", 2049, 9) + bytes(9)),
        MNIST,
    ),
    "mnist_corrupt_gzip": (_idx("train-images-idx3-ubyte.gz", b"\x1f\x8b" + bytes(30)), MNIST),
    "mnist_missing_labels": (_idx("train-labels-idx1-ubyte", None), MNIST),
    "mnist_one_class": (_mnist(_IMAGES, np.zeros(12)), MNIST),
    "cifar": (_cifar((_BATCH, [i % 10 for i in range(6)]), (_BATCH, [1] * 6)), CIFAR),
    "cifar_limit": (_cifar((_BATCH, [0, 1, 0, 0, 0, 0]), (_BATCH, [5] * 6)), {**CIFAR, "limit": 5}),
    "cifar_missing": (lambda d: (d / "c").mkdir(), CIFAR),
    "cifar_not_a_dict": (_cifar(pickle.dumps([1, 2, 3])), CIFAR),
    "cifar_garbage": (_cifar(b"\x80\x02garbage"), CIFAR),
    "cifar_short_rows": (_cifar((_BATCH[:, :100], [0, 1] * 3)), CIFAR),
    "cifar_fewer_labels": (_cifar((_BATCH, [0, 1] * 2)), CIFAR),
    "cifar_one_class": (_cifar((_BATCH, [0] * 6)), CIFAR),
}


@pytest.mark.parametrize("case", list(FILE_CASES))
def test_file_geometry_agrees_with_loading(case: str, tmp_path: Path) -> None:
    """The same geometry, or the same SpecError (location and message), as loading the set."""
    write, spec = FILE_CASES[case]
    write(tmp_path)
    dataset = FileData.model_validate(spec)
    loaded = _outcome(lambda: _loaded(dataset, tmp_path))
    assert _outcome(lambda: dataset_geometry(dataset, tmp_path)) == loaded
    refused = isinstance(loaded, tuple) and isinstance(loaded[0], list)
    assert refused != (case in GOOD_CASES), loaded


GOOD_CASES = {
    "npz_features",
    "npz_gray_limit",
    "npz_colour",
    "csv_header",
    "csv_label_first_limit",
    "csv_plain",
    "mnist",
    "mnist_gz_limit",
    "cifar",
    "cifar_limit",
}


def test_nan_features_of_an_npz_show_when_the_job_loads_them(tmp_path: Path) -> None:
    """The one check the headers cannot make: it needs every feature value."""
    np.savez(tmp_path / "d.npz", x=np.array([[0.0], [np.nan], [1.0]]), y=np.arange(3) % 2)
    spec = FileData(kind="npz", path="d.npz")
    assert dataset_geometry(spec, tmp_path) == ((1,), 2, 3)
    with pytest.raises(SpecError, match="NaN"):
        load_dataset(spec, tmp_path)


def _peak_bytes(check: Callable[[], object]) -> int:
    tracemalloc.start()
    try:
        check()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_file_data_sets_are_checked_without_holding_their_features(tmp_path: Path) -> None:
    """64 MB of npz features and a 3 MB CSV table (8 MB as float64): the check's peak
    allocation stays at a few blocks."""
    samples, features = 1 << 18, 64
    with zipfile.ZipFile(tmp_path / "big.npz", "w") as archive:
        with archive.open("x.npy", "w", force_zip64=True) as member:
            header = {"descr": "<f4", "fortran_order": False, "shape": (samples, features)}
            np.lib.format.write_array_header_1_0(member, header)
            block = bytes(1 << 20)
            for _ in range(samples * features * 4 // len(block)):
                member.write(block)
        with archive.open("y.npy", "w") as member:
            np.lib.format.write_array(member, (np.arange(samples) % 7).astype(np.uint8))
    spec = FileData(kind="npz", path="big.npz")
    geometry: list[object] = []
    peak = _peak_bytes(lambda: geometry.append(dataset_geometry(spec, tmp_path)))
    assert geometry == [((features,), 7, samples)]
    assert peak < 4 << 20, f"checking 64 MB of features allocated {peak >> 20} MiB"

    rows = 100_000
    table = "".join(f"{i % 10},{i % 3},{i % 5},{i % 4}\n" for i in range(rows))
    (tmp_path / "big.csv").write_text(table)
    csv_spec = FileData(kind="csv", path="big.csv")
    peak = _peak_bytes(lambda: geometry.append(dataset_geometry(csv_spec, tmp_path)))
    assert geometry[1] == ((3,), 4, rows)
    assert peak < 2 << 20, f"checking {rows * 4 * 8 >> 20} MiB of CSV allocated {peak >> 20} MiB"
