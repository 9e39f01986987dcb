"""What Tamiyo asks Urza — the blueprints, a kernel's host kind — against a real Urza process,
and what it does when Urza cannot be reached."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from esper.blueprints import BUILTIN_BLUEPRINTS
from esper.client import UrzaClient
from esper.testing import RedisServer, ServiceProcess
from esper.testing.redis_server import free_port
from tamiyo.catalogue import Catalogue

NEW_BLUEPRINT = {
    "name": "tamiyo_test_mlp",
    "hosts": ["linear"],
    "body": [{"op": "host_proj", "out": "16"}, {"op": "act"}, {"op": "project", "out": "out"}],
}


@pytest.fixture(scope="module")
def urza(
    module_redis: RedisServer, bus_prefix: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServiceProcess]:
    root = tmp_path_factory.mktemp("urza")
    env = {
        "URZA_DATA_DIR": str(root),
        "URZA_LOG_JSON": "false",
        "ESPER_BUS_REDIS_URL": module_redis.url,
        "ESPER_BUS_PREFIX": bus_prefix,
    }
    with ServiceProcess("urza", port_env="URZA_PORT", env=env, log_dir=root) as service:
        yield service


async def test_blueprints_come_from_urza_and_a_new_one_is_found(urza: ServiceProcess) -> None:
    catalogue = Catalogue(UrzaClient(urza.url), ttl_s=3600)
    entries, source = await catalogue.entries()
    assert source == "urza"
    assert {b.name for b in entries} == set(BUILTIN_BLUEPRINTS)
    wide = next(b for b in entries if b.name == "wide_mlp")
    assert wide.hosts == ("linear",) and wide.default_blend == "add"
    assert await catalogue.find("tamiyo_test_mlp") is None
    registered = httpx.post(f"{urza.url}/blueprints", json=NEW_BLUEPRINT, timeout=60)
    assert registered.status_code in (200, 201), registered.text
    # Cached for an hour, yet a name not seen yet is looked up again at once.
    found = await catalogue.find("tamiyo_test_mlp")
    assert found is not None and found.hosts == ("linear",)
    await catalogue.aclose()


async def test_a_kernels_host_kind_comes_from_urza(urza: ServiceProcess) -> None:
    compiled = httpx.post(
        f"{urza.url}/kernels/compile",
        json={
            "blueprint": "low_rank",
            "host": {"kind": "linear", "in_features": 8, "out_features": 8},
        },
        timeout=120,
    )
    assert compiled.status_code in (200, 201), compiled.text
    kernel_id = compiled.json()["kernel"]["kernel_id"]
    catalogue = Catalogue(UrzaClient(urza.url))
    assert await catalogue.kernel_kind(kernel_id) == "linear"
    assert await catalogue.kernel_kind("krn_" + "0" * 24) is None  # Urza does not know it
    await catalogue.aclose()


async def test_without_urza_the_builtins_stand_in_and_say_so() -> None:
    catalogue = Catalogue(UrzaClient(f"http://127.0.0.1:{free_port()}", timeout_s=0.5))
    entries, source = await catalogue.entries()
    assert source == "builtin" and {b.name for b in entries} == set(BUILTIN_BLUEPRINTS)
    with pytest.raises(LookupError):
        await catalogue.find("wide_mlp")  # an operator's blueprint cannot be checked
    assert await catalogue.kernel_kind("krn_" + "1" * 24) is None
    await catalogue.aclose()
    offline = Catalogue(None)
    assert (await offline.entries())[1] == "builtin"
    assert await offline.find("wide_mlp") is not None and await offline.find("nope") is None
