"""Static checks of docker-compose.yml, .env.example and deploy/docker/Dockerfile: no engine needed.

They guard what the end-to-end test cannot see on one run: a port published beyond loopback, a
variable used but not documented, a service without a healthcheck, a torch requirement that
could pull a CUDA build.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
ESPER_SERVICES = {"tolaria": 8001, "tamiyo": 8002, "nissa": 8003, "urza": 8004}
VARIABLE = re.compile(r"\$\{([A-Z0-9_]+)(?::?[-?][^}]*)?\}")
REQUIRED = re.compile(r"^\$\{([A-Z0-9_]+):\?[^}]+\}$")
SECRETS = ("URZA_API_TOKEN", "TOLARIA_API_TOKEN", "TAMIYO_API_TOKEN", "NISSA_API_TOKEN")
SECRETS += ("URZA_SIGNING_KEY",)
# `make env` writes these too; only the `ray` profile's nodes need it (they refuse to start
# without it), so compose does not require it of every stack.
RAY_SECRETS = ("RAY_AUTH_TOKEN",)
RAY_PROFILE = ("ray-head", "ray-worker")
DEFAULT = re.compile(r"^\$\{[A-Z0-9_]+:-([^}]*)\}$")


def default(value: str) -> str:
    """What `${NAME:-default}` is when NAME is unset; a plain value as it is."""
    match = DEFAULT.match(value)
    return match.group(1) if match else value


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return loaded


@pytest.fixture(scope="module")
def dockerfile() -> str:
    return (ROOT / "deploy/docker/Dockerfile").read_text()


def test_every_port_is_published_on_loopback_by_default(compose: dict[str, Any]) -> None:
    for name, service in compose["services"].items():
        for port in service.get("ports", []):
            assert isinstance(port, str) and port.startswith("${ESPER_BIND_ADDRESS:-127.0.0.1}:"), (
                f"{name}: {port!r} must be published on ${{ESPER_BIND_ADDRESS:-127.0.0.1}}"
            )


def test_every_variable_compose_reads_is_documented_in_env_example(
    compose: dict[str, Any],
) -> None:
    text = (ROOT / "docker-compose.yml").read_text()
    used = set(VARIABLE.findall(text))
    # Secrets pass through by name (`KEY:` with no value) rather than `${KEY}`.
    for service in compose["services"].values():
        environment = service.get("environment", {})
        used |= {key for key, value in environment.items() if value is None}
    documented = set(
        re.findall(r"^#? ?([A-Z][A-Z0-9_]+)=", (ROOT / ".env.example").read_text(), re.M)
    )
    assert used - documented == set(), "undocumented in .env.example"


def test_env_example_sets_no_secret(compose: dict[str, Any]) -> None:
    for line in (ROOT / ".env.example").read_text().splitlines():
        if re.match(r"^[A-Z0-9_]*(TOKEN|KEY)=", line):
            raise AssertionError(f".env.example must leave secrets commented out: {line}")


def test_services_are_built_from_their_target_and_wait_for_their_dependencies(
    compose: dict[str, Any], dockerfile: str
) -> None:
    services = compose["services"]
    targets = set(re.findall(r"^FROM\s+\S+\s+AS\s+(\S+)\s*$", dockerfile, re.M | re.I))
    for name, port in ESPER_SERVICES.items():
        service = services[name]
        # Tolaria's target is a variable (tolaria or tolaria-ray), `tolaria` by default.
        assert default(service["build"]["target"]) == name and name in targets
        assert service["build"]["dockerfile"] == "deploy/docker/Dockerfile"
        assert service["environment"][f"{name.upper()}_HOST"] == "0.0.0.0"
        assert service["depends_on"]["redis"]["condition"] == "service_healthy"
        assert "/readyz" in service["healthcheck"]["test"], name
        assert any(p.endswith(f":{port}") for p in service["ports"]), name
    for name in ("tolaria", "tamiyo"):
        assert services[name]["depends_on"]["urza"]["condition"] == "service_healthy"
    for name in ("redis", "prometheus"):
        assert services[name]["healthcheck"]["test"], name


def test_redis_fsyncs_every_write_to_a_volume(compose: dict[str, Any]) -> None:
    redis = compose["services"]["redis"]
    command = " ".join(redis["command"])
    assert "--appendonly yes" in command and "--appendfsync always" in command
    assert "redis-data:/data" in redis["volumes"]


def test_volumes_monitoring_profile_and_mounts(compose: dict[str, Any]) -> None:
    assert {"urza-store", "tolaria-checkpoints", "redis-data", "prometheus-data"} <= set(
        compose["volumes"]
    )
    assert "./data:/data:ro" in compose["services"]["tolaria"]["volumes"]
    assert compose["services"]["grafana"]["profiles"] == ["monitoring"]
    profiled = {"grafana", *RAY_PROFILE}
    assert all("profiles" not in s for n, s in compose["services"].items() if n not in profiled)
    mounts = compose["services"]["prometheus"]["volumes"]
    assert "./deploy/prometheus:/etc/prometheus:ro" in mounts


def test_the_dockerfile_pins_torch_and_runs_unprivileged(dockerfile: str) -> None:
    assert "ARG TORCH_VERSION=2.13.0" in dockerfile
    assert "ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu" in dockerfile
    assert re.search(r'"torch==\$\{TORCH_VERSION\}"', dockerfile)
    assert "PIP_CONSTRAINT=/opt/esper/constraints.txt" in dockerfile
    stages = re.split(r"^FROM\s+", dockerfile, flags=re.M)[1:]
    for stage in stages:
        name = stage.split()[2] if len(stage.split()) > 2 else ""
        if name in ESPER_SERVICES:
            assert "USER esper:esper" in stage and "HEALTHCHECK" in stage, name
            assert f'CMD ["python", "-m", "{name}"]' in stage, name
            assert f"EXPOSE {ESPER_SERVICES[name]}" in stage, name


def test_tokens_and_signing_key_are_required(compose: dict[str, Any]) -> None:
    """Each service's own token, the Urza token it calls with and the signing key are
    `${NAME:?...}`: compose refuses to start a stack whose routes would be open."""
    expected = {
        "urza": {"URZA_API_TOKEN": "URZA_API_TOKEN", "URZA_SIGNING_KEY": "URZA_SIGNING_KEY"},
        "tolaria": {
            "TOLARIA_API_TOKEN": "TOLARIA_API_TOKEN",
            "TOLARIA_URZA_TOKEN": "URZA_API_TOKEN",
            "TOLARIA_KERNEL_SIGNING_KEY": "URZA_SIGNING_KEY",
        },
        "tamiyo": {"TAMIYO_API_TOKEN": "TAMIYO_API_TOKEN", "TAMIYO_URZA_TOKEN": "URZA_API_TOKEN"},
        "nissa": {"NISSA_API_TOKEN": "NISSA_API_TOKEN", "NISSA_URZA_TOKEN": "URZA_API_TOKEN"},
    }
    for name, variables in expected.items():
        environment = compose["services"][name]["environment"]
        for key, source in variables.items():
            match = REQUIRED.match(str(environment.get(key)))
            assert match and match.group(1) == source, f"{name}: {key}={environment.get(key)!r}"
    # No secret passes through by bare name any more (that form allowed an open stack).
    for name in ESPER_SERVICES:
        environment = compose["services"][name]["environment"]
        bare = [k for k, v in environment.items() if v is None and ("TOKEN" in k or "KEY" in k)]
        assert not bare, f"{name}: {bare}"


def make_env(*args: str) -> subprocess.CompletedProcess[str]:
    script = ROOT / "deploy/docker/make_env.py"
    return subprocess.run(
        [sys.executable, str(script), *args], capture_output=True, text=True, timeout=60
    )


def read_env(path: Path) -> dict[str, str]:
    pairs = re.findall(r"^([A-Z][A-Z0-9_]*)=(.*)$", path.read_text(), re.M)
    return dict(pairs)


def test_make_env_writes_fresh_secrets_and_never_overwrites(tmp_path: Path) -> None:
    first, second = tmp_path / "first.env", tmp_path / "second.env"
    assert make_env("--out", str(first)).returncode == 0
    assert make_env("--out", str(second)).returncode == 0
    one, two = read_env(first), read_env(second)
    for name in SECRETS + RAY_SECRETS:
        assert len(one[name]) >= 32 and re.fullmatch(r"[A-Za-z0-9_-]+", one[name]), name
        assert one[name] != two[name], f"{name} is not fresh"
    assert len({one[name] for name in SECRETS + RAY_SECRETS}) == len(SECRETS + RAY_SECRETS)
    assert first.stat().st_mode & 0o077 == 0, "a file of secrets must be private"
    # Everything else is .env.example's value.
    example = read_env(ROOT / ".env.example")
    assert {k: v for k, v in one.items() if k not in SECRETS + RAY_SECRETS} == example

    before = first.read_text()
    again = make_env("--out", str(first))
    assert again.returncode != 0 and "exists" in again.stderr
    assert first.read_text() == before


def test_make_env_covers_every_secret_compose_requires() -> None:
    text = (ROOT / "docker-compose.yml").read_text()
    required = set(re.findall(r"\$\{([A-Z0-9_]+):\?", text))
    assert required == set(SECRETS)
    assert "\nenv:" in (ROOT / "Makefile").read_text()


def test_the_ray_profile_runs_a_token_guarded_cluster_that_tolaria_can_use(
    compose: dict[str, Any], dockerfile: str
) -> None:
    services = compose["services"]
    head, worker = services["ray-head"], services["ray-worker"]
    for name, node in (("ray-head", head), ("ray-worker", worker)):
        assert node["profiles"] == ["ray"], name
        assert node["build"]["target"] == "tolaria-ray", name
        assert node["image"].split("/")[-1].startswith("tolaria-ray:"), name
        environment = node["environment"]
        assert environment["RAY_AUTH_MODE"] == "token", name
        assert environment["RAY_AUTH_TOKEN"] == "${RAY_AUTH_TOKEN:-}", name
        script = node["command"][-1]
        # An empty token stops the node with a message instead of a cluster nobody can join.
        assert script.startswith('test -n "$$RAY_AUTH_TOKEN" ||'), name
        assert "--block" in script and "--node-ip-address" in script, name
        assert "tolaria-checkpoints:/var/lib/esper/tolaria" in node["volumes"], name
    head_script, worker_script = head["command"][-1], worker["command"][-1]
    assert "ray start --head" in head_script and "--port 6379" in head_script
    assert "--ray-client-server-port 10001" in head_script
    assert "ray start --address ray-head:6379" in worker_script
    assert worker["depends_on"]["ray-head"]["condition"] == "service_healthy"
    assert "ray health-check" in " ".join(head["healthcheck"]["test"])

    # Tolaria stays on its local executor unless told otherwise; told, it finds the head.
    tolaria = services["tolaria"]["environment"]
    assert default(tolaria["TOLARIA_EXECUTOR"]) == "local"
    assert default(tolaria["TOLARIA_RAY_ADDRESS"]) == "ray://ray-head:10001"
    assert tolaria["TOLARIA_RAY_AUTH_TOKEN"] == "${RAY_AUTH_TOKEN:-}"
    assert default(services["tolaria"]["build"]["target"]) == "tolaria"
    assert services["tolaria"]["image"].endswith(
        "/${TOLARIA_TARGET:-tolaria}:${ESPER_IMAGE_TAG:-dev}"
    )

    # The image: Tolaria's, plus a pinned Ray with the dashboard agent, Ray Client and Train.
    stage = re.search(r"^FROM tolaria AS tolaria-ray\n(.*?)(?=^FROM |\Z)", dockerfile, re.M | re.S)
    assert stage, "deploy/docker/Dockerfile needs a `tolaria-ray` stage built FROM tolaria"
    body = stage.group(1)
    assert "ARG RAY_VERSION=2.60.0" in body
    assert '"ray[default,train]==${RAY_VERSION}"' in body
    assert body.rstrip().endswith("USER esper:esper")
