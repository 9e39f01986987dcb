"""Schemathesis over every service's `/openapi.json`: generated requests, both ones that fit the
documented schema and ones that do not, must never get a 5xx and must get an answer that matches
what the document says (status code, content type, headers, body schema).

One Redis and the four services run as real processes for the whole module, each with an API
token that every generated request carries, so the mutating routes are exercised past their auth.
Examples per operation are few and bounded: this runs inside `make test` on small machines.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis.core.result import Ok
from schemathesis.generation import GenerationMode

from esper.testing import RedisServer, ServiceProcess

TOKEN = "contract-test-token"
SIGNING_KEY = "contract-test-signing-key"
MAX_EXAMPLES = 12
_OURS = ("URZA_", "TOLARIA_", "TAMIYO_", "NISSA_", "ESPER_BUS_")
_instances = itertools.count()
AUTH = {"Authorization": f"Bearer {TOKEN}"}
HYPOTHESIS = settings(
    max_examples=MAX_EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=list(HealthCheck),
    phases=[Phase.explicit, Phase.generate],
    report_multiple_bugs=False,
)

# Schema-valid is not always valid: a blueprint whose hosts list a kind twice, a `keep` decision
# without a seed index fit the JSON Schema and are refused with a documented 422. Every other
# check (no 5xx, documented status codes, content types, headers and bodies, schema-invalid
# input refused) runs.
EXCLUDED = [schemathesis.checks.positive_data_acceptance]

pytestmark = pytest.mark.timeout(600)


def _service(name: str, root: Path, redis: RedisServer, **env: str) -> ServiceProcess:
    upper = name.upper()
    base = {
        f"{upper}_API_TOKEN": TOKEN,
        f"{upper}_LOG_JSON": "false",
        f"{upper}_INSTANCE": f"{name}-contract-{next(_instances)}",
        "ESPER_BUS_REDIS_URL": redis.url,
        "ESPER_BUS_PREFIX": "contract",
    }
    return ServiceProcess(
        name,
        port_env=f"{upper}_PORT",
        env={**base, **env},
        log_dir=root,
        drop_inherited=_OURS,
    )


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, ServiceProcess]]:
    root = tmp_path_factory.mktemp("contract")
    with RedisServer() as redis:
        urza = _service(
            "urza", root, redis, URZA_DATA_DIR=str(root / "urza"), URZA_SIGNING_KEY=SIGNING_KEY
        )
        with urza:
            services = {
                "urza": urza,
                "tolaria": _service(
                    "tolaria",
                    root,
                    redis,
                    TOLARIA_DATA_DIR=str(root / "tolaria-data"),
                    TOLARIA_WORK_DIR=str(root / "tolaria-work"),
                    TOLARIA_URZA_URL=urza.url,
                    TOLARIA_KERNEL_SIGNING_KEY=SIGNING_KEY,
                    # API only: a generated job spec must not start a training run.
                    TOLARIA_WORKERS="0",
                ),
                "tamiyo": _service("tamiyo", root, redis, TAMIYO_URZA_URL=""),
                "nissa": _service(
                    "nissa", root, redis, NISSA_DATA_DIR=str(root / "nissa"), NISSA_URZA_URL=""
                ),
            }
            started: list[ServiceProcess] = []
            try:
                for name in ("tolaria", "tamiyo", "nissa"):
                    started.append(services[name].start())
                yield services
            finally:
                for service in started:
                    service.stop()


def _failures(
    service: ServiceProcess, mode: GenerationMode, answers: list[tuple[str, int]]
) -> list[str]:
    """Every operation of the service's document, a few generated cases each; what failed, one
    entry per operation (the first failing case's report). `answers` gets (method, status) of
    every request."""
    schema = schemathesis.openapi.from_url(f"{service.url}/openapi.json")
    failures: list[str] = []
    for result in schema.get_all_operations():
        if not isinstance(result, Ok):
            failures.append(f"an operation schemathesis cannot read: {result.err()}"[:3000])
            continue
        operation = result.ok()

        # A test function per operation: schemathesis's pytest integration cannot load a
        # schema from a fixture under this pytest, so the operations are walked here.
        @HYPOTHESIS
        @given(case=operation.as_strategy(generation_mode=mode))
        def check(case: Any) -> None:
            response = case.call_and_validate(headers=AUTH, timeout=30, excluded_checks=EXCLUDED)
            answers.append((case.method.upper(), response.status_code))

        try:
            check()
        except Unsatisfiable:
            # Nothing to get wrong: an operation with no parameters and no body has no
            # negative cases.
            continue
        except (Exception, BaseExceptionGroup) as err:  # every failure is reported
            failures.append(f"{operation.method.upper()} {operation.path}: {err}"[:3000])
    return failures


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=str)
@pytest.mark.parametrize("name", ["urza", "tolaria", "tamiyo", "nissa"])
def test_service_matches_its_document(
    stack: dict[str, ServiceProcess], name: str, mode: GenerationMode
) -> None:
    answers: list[tuple[str, int]] = []
    failures = _failures(stack[name], mode, answers)
    assert not failures, f"{len(failures)} operations of {name} failed:\n\n" + "\n\n".join(failures)
    if mode == GenerationMode.POSITIVE:
        # The token is taken: mutating routes were exercised past their auth, not only refused.
        mutating = [status for method, status in answers if method not in ("GET", "HEAD")]
        assert not mutating or any(status not in (401, 403) for status in mutating), answers
