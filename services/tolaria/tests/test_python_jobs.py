"""Through a real Tolaria, Redis and Urza: jobs whose model and data are the user's Python code
(`kind: python`), uploaded as a zip with the job or found under the data directory; the checks
at submission (in a child process, under a time limit) and what a refusal leaves behind
(nothing); the policy switch; the user's error at run time in the job's log."""

from __future__ import annotations

import hashlib
import io
import json
import os
import time
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from jobhelpers import TOKEN, wait_for
from pydantic import ValidationError
from typer.testing import CliRunner

from esper.cli import app
from esper.client import Esper, ServiceUrls
from esper.client.calls import zip_code
from esper.contracts.jobs import JobSpec
from esper.testing import ServiceProcess
from tolaria.settings import TolariaSettings

TolariaFactory = Callable[..., ServiceProcess]
CHECK_S = 10
MAX_CODE_BYTES = 64 << 10
MAX_UNPACKED = 512 << 10

MODELS = '''
import math
import subprocess
import sys
import time
from collections import OrderedDict

from torch import nn

NOT_CALLABLE = 3


def mlp(input_shape, classes, hidden=16):
    return nn.Sequential(OrderedDict(
        flat=nn.Flatten(),
        fc1=nn.Linear(math.prod(input_shape), hidden),
        act1=nn.Tanh(),
        fc2=nn.Linear(hidden, hidden),
        act2=nn.Tanh(),
        head=nn.Linear(hidden, classes),
    ))


def raises(input_shape, classes):
    raise ValueError("no model today")


def wrong_type(input_shape, classes):
    return "a model, honest"


def wrong_width(input_shape, classes):
    return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), classes + 3))


def hangs(input_shape, classes, pidfile=None):
    if pidfile:  # a process of its own too, which must not outlive the check
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3600)"])
        with open(pidfile, "w") as handle:
            handle.write(str(child.pid))
    time.sleep(3600)


class Fragile(nn.Module):
    """Passes the checks (run in eval mode); breaks once it trains."""

    def __init__(self, width, classes):
        super().__init__()
        self.fc = nn.Linear(width, classes)

    def forward(self, x):
        if self.training:
            raise RuntimeError("the fragile model broke in training")
        return self.fc(x.flatten(1))


def fragile(input_shape, classes):
    return Fragile(math.prod(input_shape), classes)
'''

DATA = """
import os

import torch
from torch.utils.data import Dataset


def blobs(samples=400, seed=0):
    generator = torch.Generator().manual_seed(seed)
    y = torch.arange(samples) % 2
    x = torch.randn(samples, 4, generator=generator) + 2.0 * y[:, None]
    return x, y


class Pairs(Dataset):
    def __init__(self, samples):
        self.x, self.y = blobs(samples)

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], int(self.y[i])


def pairs(samples=300):
    return Pairs(samples)


def service_variables():
    found = sorted(k for k in os.environ if k.startswith(("TOLARIA_", "URZA_", "ESPER_")))
    raise LookupError(f"service variables: {found}")


def negative_labels():
    return torch.zeros(10, 2), -torch.ones(10, dtype=torch.long)
"""


def code_files(note: str = "") -> dict[str, str]:
    """The user's package; `note` makes the zip (and its digest) differ between tests."""
    return {
        "usercode/__init__.py": f"# {note}\n",
        "usercode/models.py": MODELS,
        "usercode/data.py": DATA,
    }


def zipped(files: dict[str, str | bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, content in files.items():
            archive.writestr(name, content)
    return buffer.getvalue()


def python_job(
    model: str = "usercode.models:mlp", data: str = "usercode.data:blobs", **extra: Any
) -> dict[str, Any]:
    return {
        "name": "python-job",
        "model": {"kind": "python", "entrypoint": model, "args": {"hidden": 16}}
        if model.endswith(":mlp")
        else {"kind": "python", "entrypoint": model},
        "dataset": {"kind": "python", "entrypoint": data, "args": {}},
        "training": {"epochs": 3, "batch_size": 32, "lr": 0.05, "seed": 0},
        "morphogenesis": {
            "controller": "schedule",
            "schedule": [{"epoch": 0, "layer": "fc2", "blueprint": "residual_mlp"}],
            "ramp_steps": 10,
        },
        **extra,
    }


def upload(
    client: httpx.Client, spec: dict[str, Any] | str, code: bytes | None = None
) -> httpx.Response:
    text = spec if isinstance(spec, str) else json.dumps(spec)
    files: dict[str, Any] = {"spec": (None, text)}
    if code is not None:
        files["code"] = ("code.zip", code, "application/zip")
    return client.post("/jobs", files=files)


@pytest.fixture(scope="module")
def work_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("python-work")


@pytest.fixture(scope="module")
def coded(tolaria_factory: TolariaFactory, work_dir: Path) -> ServiceProcess:
    return tolaria_factory(
        TOLARIA_WORK_DIR=str(work_dir),
        TOLARIA_ALLOW_USER_CODE="true",
        TOLARIA_USER_CODE_CHECK_S=str(CHECK_S),
        TOLARIA_MAX_CODE_BYTES=str(MAX_CODE_BYTES),
        TOLARIA_MAX_CODE_UNPACKED_BYTES=str(MAX_UNPACKED),
    )


@pytest.fixture(scope="module")
def api(coded: ServiceProcess) -> Iterator[httpx.Client]:
    with httpx.Client(
        base_url=coded.url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60
    ) as c:
        yield c


def stored_zips(work_dir: Path) -> set[str]:
    return {path.name for path in (work_dir / "code").glob("*")}


def job_names(client: httpx.Client) -> list[str]:
    return [job["name"] for job in client.get("/jobs").json()["items"]]


def assert_nothing_stored(client: httpx.Client, work_dir: Path, before: set[str]) -> None:
    assert stored_zips(work_dir) == before
    assert "refused" not in job_names(client)


# ------------------------------------------------------------------ running
def test_an_uploaded_python_job_trains_and_grows(api: httpx.Client, work_dir: Path) -> None:
    code = zipped(dict(code_files("grows")))
    response = upload(api, python_job(), code)
    assert response.status_code == 202, response.text
    job_id = response.json()["job_id"]
    view = wait_for(api, job_id, lambda v: v["status"] in ("SUCCEEDED", "FAILED"), 180)
    assert view["status"] == "SUCCEEDED", view
    assert [(s["layer"], s["blueprint"]) for s in view["seeds"]] == [("fc2", "residual_mlp")]
    assert view["metrics"]["val_accuracy"] > 0.8
    hexdigest = hashlib.sha256(code).hexdigest()
    assert view["spec"]["code"] == {"path": None, "digest": f"sha256:{hexdigest}"}
    assert (work_dir / "code" / f"{hexdigest}.zip").read_bytes() == code
    assert (work_dir / "jobs" / job_id / "code" / "usercode" / "models.py").is_file()

    # The same code again, by digest only, in a JSON spec: nothing to upload twice.
    again = api.post("/jobs", json={**python_job(), "code": {"digest": f"sha256:{hexdigest}"}})
    assert again.status_code == 202, again.text
    assert api.delete(f"/jobs/{job_id}").status_code == 204
    assert not (work_dir / "jobs" / job_id / "code").exists()


def test_a_python_job_from_a_directory_under_the_data_dir(
    api: httpx.Client, data_dir: Path
) -> None:
    for name, text in code_files("data dir").items():
        (data_dir / "mine" / name).parent.mkdir(parents=True, exist_ok=True)
        (data_dir / "mine" / name).write_text(text)
    spec = python_job(data="usercode.data:pairs", code={"path": "mine"})
    spec["morphogenesis"] = {"enabled": False}
    response = api.post("/jobs", json=spec)
    assert response.status_code == 202, response.text
    view = wait_for(
        api,
        response.json()["job_id"],
        lambda v: v["status"] != "PENDING" and v["status"] != "RUNNING",
        120,
    )
    assert view["status"] == "SUCCEEDED", view

    outside = api.post("/jobs", json={**spec, "code": {"path": "nowhere"}})
    assert outside.status_code == 422, outside.text
    assert outside.json()["error"]["location"] == ["body", "code", "path"]


def test_an_error_of_the_users_code_at_run_time_fails_the_job_with_its_traceback(
    api: httpx.Client,
) -> None:
    spec = python_job(model="usercode.models:fragile")
    spec["morphogenesis"] = {"enabled": False}
    response = upload(api, spec, zipped(dict(code_files("fragile"))))
    assert response.status_code == 202, response.text
    job_id = response.json()["job_id"]
    view = wait_for(api, job_id, lambda v: v["status"] in ("SUCCEEDED", "FAILED"), 120)
    assert view["status"] == "FAILED"
    assert "the fragile model broke in training" in view["error"]
    logs = api.get(f"/jobs/{job_id}/logs").text
    assert "Traceback (most recent call last)" in logs
    assert "models.py" in logs and "the fragile model broke in training" in logs
    assert view["attempt"] == 1  # the user's error is not retried as a crash


# ------------------------------------------------------------------ refusals
@pytest.mark.parametrize(
    ("part", "entrypoint", "says"),
    [
        ("model", "nosuch.module:mlp", "cannot import nosuch.module"),
        ("model", "usercode.models:missing", "has no missing"),
        ("model", "usercode.models:NOT_CALLABLE", "not callable"),
        ("model", "usercode.models:wrong_type", "returned a str, not a torch.nn.Module"),
        ("model", "usercode.models:wrong_width", "not [2, 2] logits"),
        ("model", "usercode.models:raises", "raised ValueError: no model today"),
        ("model", "usercode.models:hangs", f"did not return within {CHECK_S} s"),
        ("dataset", "usercode.data:negative_labels", "labels must be ≥ 0"),
        ("dataset", "usercode.models:mlp", "raised TypeError"),
        # The check child gets none of the services' tokens, keys or bus settings.
        ("dataset", "usercode.data:service_variables", "LookupError: service variables: []"),
    ],
)
def test_a_bad_entrypoint_is_refused_naming_it_and_nothing_is_stored(
    api: httpx.Client,
    work_dir: Path,
    tmp_path: Path,
    part: str,
    entrypoint: str,
    says: str,
) -> None:
    before = stored_zips(work_dir)
    spec = python_job(**({"model": entrypoint} if part == "model" else {"data": entrypoint}))
    spec["name"] = "refused"
    hanging = entrypoint.endswith(":hangs")
    if hanging:
        spec["model"]["args"] = {"pidfile": str(tmp_path / "pid")}
    response = upload(api, spec, zipped(dict(code_files(f"refused {entrypoint}"))))
    assert response.status_code == 422, response.text
    body = response.json()["error"]
    assert body["location"] == ["body", part, "entrypoint"]
    assert entrypoint in body["message"] and says in body["message"], body["message"]
    assert_nothing_stored(api, work_dir, before)
    if hanging:
        assert_gone(int((tmp_path / "pid").read_text()))


def assert_gone(pid: int, timeout_s: float = 5.0) -> None:
    """The process has ended (a zombie waiting for init to reap it counts as ended)."""
    deadline = time.monotonic() + timeout_s
    status = Path(f"/proc/{pid}/status")
    while time.monotonic() < deadline:
        try:
            if "\nState:\tZ" in status.read_text():
                return
        except FileNotFoundError:
            return
        time.sleep(0.1)
    raise AssertionError(f"process {pid} outlived the check")


def _symlink_zip() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        link = zipfile.ZipInfo("usercode/link")
        link.external_attr = 0o120777 << 16
        archive.writestr(link, "/etc/passwd")
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("code", "status", "says"),
    [
        (zipped({**code_files(), "../escape.py": "x = 1"}), 422, "leaves its directory"),
        (zipped({**code_files(), "/etc/evil.py": "x = 1"}), 422, "absolute path"),
        (zipped({**code_files(), "C:/evil.py": "x = 1"}), 422, "absolute path"),
        (_symlink_zip(), 422, "symbolic link"),
        (b"not a zip at all", 422, "not a zip archive"),
        (zipped({**code_files(), "big.bin": os.urandom(MAX_CODE_BYTES)}), 413, "over the limit"),
        (zipped({**code_files(), "zeros.bin": bytes(MAX_UNPACKED)}), 413, "unpacks to"),
    ],
    ids=["dotdot", "absolute", "drive", "symlink", "not-zip", "too-big", "unpacks-too-big"],
)
def test_a_bad_zip_is_refused_and_nothing_is_stored(
    api: httpx.Client, work_dir: Path, code: bytes, status: int, says: str
) -> None:
    before = stored_zips(work_dir)
    response = upload(api, {**python_job(), "name": "refused"}, code)
    assert response.status_code == status, response.text
    assert says in response.json()["error"]["message"]
    assert_nothing_stored(api, work_dir, before)


def test_specs_that_do_not_say_where_the_code_is_are_refused(api: httpx.Client) -> None:
    no_code = api.post("/jobs", json=python_job())
    assert no_code.status_code == 422 and "needs `code`" in no_code.json()["error"]["message"]
    stray = {
        "model": {"kind": "mlp"},
        "dataset": {"kind": "moons"},
        "code": {"path": "mine"},
    }
    assert api.post("/jobs", json=stray).status_code == 422
    unknown = api.post("/jobs", json={**python_job(), "code": {"digest": "sha256:" + "0" * 64}})
    assert unknown.status_code == 422 and unknown.json()["error"]["location"] == [
        "body",
        "code",
        "digest",
    ]
    both = upload(api, {**python_job(), "code": {"path": "mine"}}, zipped(dict(code_files())))
    assert both.status_code == 422 and "one or the other" in both.json()["error"]["message"]
    no_spec = api.post("/jobs", files={"code": ("code.zip", zipped(dict(code_files())))})
    assert no_spec.status_code == 422 and no_spec.json()["error"]["location"] == ["body", "spec"]


def test_a_spec_alone_keeps_its_own_size_limit(api: httpx.Client) -> None:
    # The route's body limit leaves room for a zip; a spec without one still has its own.
    limit = TolariaSettings().max_spec_bytes
    body = json.dumps({**python_job(), "name": "x" * limit})
    response = api.post("/jobs", content=body, headers={"Content-Type": "application/json"})
    assert response.status_code == 413, response.text
    assert response.json()["error"]["details"]["limit_bytes"] == limit


def test_python_specs_bound_their_entrypoints_and_args() -> None:
    with pytest.raises(ValidationError, match="pattern"):
        JobSpec.model_validate({**python_job(), "model": {"kind": "python", "entrypoint": "a b"}})
    with pytest.raises(ValidationError, match="must not set classes"):
        JobSpec.model_validate(
            {
                **python_job(),
                "model": {"kind": "python", "entrypoint": "m:f", "args": {"classes": 3}},
            }
        )
    with pytest.raises(ValidationError, match="args are over"):
        JobSpec.model_validate(
            {
                **python_job(),
                "model": {"kind": "python", "entrypoint": "m:f", "args": {"a": "x" * 20000}},
            }
        )


def test_a_tolaria_that_does_not_allow_user_code_refuses_it_with_403(
    tolaria_factory: TolariaFactory, work_dir: Path, data_dir: Path
) -> None:
    # Empty, as compose writes it where no API token is set: off.
    closed = tolaria_factory(TOLARIA_WORK_DIR=str(work_dir), TOLARIA_ALLOW_USER_CODE="false")
    before = stored_zips(work_dir)
    with httpx.Client(
        base_url=closed.url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60
    ) as client:
        uploaded = upload(
            client, {**python_job(), "name": "refused"}, zipped(dict(code_files("x")))
        )
        assert uploaded.status_code == 403, uploaded.text
        assert "TOLARIA_ALLOW_USER_CODE" in uploaded.json()["error"]["message"]
        by_path = client.post("/jobs", json={**python_job(), "code": {"path": "mine"}})
        assert by_path.status_code == 403, by_path.text
        assert_nothing_stored(client, work_dir, before)
    assert not TolariaSettings(allow_user_code=False).user_code_allowed
    assert not TolariaSettings(allow_user_code="with_token").user_code_allowed
    assert TolariaSettings(allow_user_code="with_token", api_token="t").user_code_allowed
    assert TolariaSettings(allow_user_code=True).user_code_allowed


# ------------------------------------------------------------ client and CLI
def test_the_client_and_the_cli_send_a_directory_as_the_jobs_code(
    api: httpx.Client, coded: ServiceProcess, tmp_path: Path
) -> None:
    project = tmp_path / "project"
    for name, text in code_files("client").items():
        (project / name).parent.mkdir(parents=True, exist_ok=True)
        (project / name).write_text(text)
    (project / "usercode" / "__pycache__").mkdir()
    (project / "usercode" / "__pycache__" / "models.cpython-312.pyc").write_bytes(b"stale")
    code = zip_code(project)
    assert code == zip_code(project)  # the same directory, the same bytes: stored once
    assert sorted(zipfile.ZipFile(io.BytesIO(code)).namelist()) == sorted(code_files())
    spec = {**python_job(), "morphogenesis": {"enabled": False}}
    spec["training"] = {**spec["training"], "epochs": 1}

    with Esper(ServiceUrls.from_env(tolaria=coded.url), token=TOKEN) as esper:
        submitted = esper.submit(spec, code=project)
    digest = f"sha256:{hashlib.sha256(code).hexdigest()}"
    assert api.get(f"/jobs/{submitted.job_id}").json()["spec"]["code"]["digest"] == digest

    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(yaml.safe_dump(spec))
    result = CliRunner().invoke(
        app,
        ["jobs", "submit", str(spec_file), "--code", str(project)],
        env={"ESPER_TOLARIA_URL": coded.url, "ESPER_API_TOKEN": TOKEN},
    )
    assert result.exit_code == 0, result.output
    assert "submitted: job-" in result.output
