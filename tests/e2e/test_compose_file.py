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
        assert service["build"]["target"] == name and name in targets
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
    assert all("profiles" not in s for n, s in compose["services"].items() if n != "grafana")
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
    for name in SECRETS:
        assert len(one[name]) >= 32 and re.fullmatch(r"[A-Za-z0-9_-]+", one[name]), name
        assert one[name] != two[name], f"{name} is not fresh"
    assert len({one[name] for name in SECRETS}) == len(SECRETS)
    assert first.stat().st_mode & 0o077 == 0, "a file of secrets must be private"
    # Everything else is .env.example's value.
    example = read_env(ROOT / ".env.example")
    assert {k: v for k, v in one.items() if k not in SECRETS} == example

    before = first.read_text()
    again = make_env("--out", str(first))
    assert again.returncode != 0 and "exists" in again.stderr
    assert first.read_text() == before


def test_make_env_covers_every_secret_compose_requires() -> None:
    text = (ROOT / "docker-compose.yml").read_text()
    required = set(re.findall(r"\$\{([A-Z0-9_]+):\?", text))
    assert required == set(SECRETS)
    assert "\nenv:" in (ROOT / "Makefile").read_text()
