"""One request cannot freeze Tolaria or take its memory: big YAML bodies are refused without
stalling other routes, a spec is checked without building its data set, and a job whose
estimated memory is over the budget is refused with the estimate and the budget."""

from __future__ import annotations

import statistics
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
from jobhelpers import TOKEN

from esper.cli.stack import DEMO_JOB
from esper.contracts import JobSpec
from esper.contracts.jobs import FileData, SyntheticData, TrainingSpec
from esper.testing import ServiceProcess
from tolaria.datasets import dataset_geometry, load_dataset
from tolaria.errors import SpecError
from tolaria.memory import check_job_memory, estimate_job_memory
from tolaria.models import build_model
from tolaria.specyaml import YamlLimitError, load_spec_yaml
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
    body = (root / "examples" / "jobs" / "spirals.yaml").read_bytes()
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
        data = load_dataset(dataset, tmp_path)
        samples = len(data.train_y) + len(data.val_y) + len(data.test_y)
        assert dataset_geometry(dataset, tmp_path) == (data.input_shape, data.classes, samples)
    np.savez(tmp_path / "zeros.npz", x=np.ones((50, 4)), y=np.zeros(50, dtype=np.int64))
    with pytest.raises(SpecError, match="every label is 0"):
        dataset_geometry(FileData(kind="npz", path="zeros.npz"), tmp_path)
    np.savez(tmp_path / "two.npz", x=np.ones((2, 4)), y=np.arange(2))
    with pytest.raises(SpecError, match="too few to split"):
        dataset_geometry(FileData(kind="npz", path="two.npz"), tmp_path)
