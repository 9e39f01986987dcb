"""proto/: the committed JSON Schemas are exactly what the models generate, and they accept and
refuse the same payloads as the models do (so a reader in another language is not misled)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, ClassVar

import pytest
from jsonschema import Draft202012Validator
from pydantic import ValidationError

import esper.contracts as contracts_module
from esper.contracts import (
    API_BODIES,
    MESSAGES,
    ControlDecision,
    DecisionTaken,
    Envelope,
    ErrorBody,
    HealthStatus,
    JobStatusChanged,
    Message,
    Page,
    Readiness,
    SeedTransition,
    TelemetryReport,
    examples,
)
from esper.contracts import proto as generator

REPO_ROOT = Path(__file__).resolve().parents[3]
PROTO = REPO_ROOT / "proto"
EXAMPLES = examples()


def load(rel: str) -> dict[str, Any]:
    document: dict[str, Any] = json.loads((PROTO / rel).read_text(encoding="utf-8"))
    return document


def validator(rel: str) -> Draft202012Validator:
    schema = load(rel)
    Draft202012Validator.check_schema(schema)
    return Draft202012Validator(schema)


# ----------------------------------------------------------------------------- drift


def test_committed_proto_matches_the_models() -> None:
    problems = generator.check(PROTO)
    assert problems == [], "proto/ is out of date; run `make proto` and commit:\n" + "\n".join(
        problems
    )


def changed_telemetry_report() -> type[Message]:
    """The same contract with one more field, under the same class name."""

    class TelemetryReport(contracts_module.TelemetryReport):
        lr: float | None = None

    return TelemetryReport


def test_the_check_fails_when_a_model_changes() -> None:
    changed = [changed_telemetry_report() if m is TelemetryReport else m for m in MESSAGES]
    assert generator.check(PROTO, generator.render(changed)) == [
        "drifted: messages/telemetry.report.v3.json"
    ]


def test_the_check_fails_when_a_contract_is_added_or_removed() -> None:
    class HeartbeatV2(Message):
        TYPE: ClassVar[str] = "health.heartbeat"
        VERSION: ClassVar[int] = 2
        TOPIC: ClassVar[str] = "health"
        service: str

    added = generator.render([*MESSAGES, HeartbeatV2])
    assert generator.check(PROTO, added) == [
        "missing: messages/health.heartbeat.v2.json",
        "drifted: index.json",
    ]
    removed = generator.render([m for m in MESSAGES if m is not ControlDecision])
    assert generator.check(PROTO, removed) == [
        "extra: messages/control.decision.v1.json",
        "drifted: index.json",
    ]


def test_check_mode_lists_tampered_missing_and_extra_files_and_write_repairs_them(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    copy = tmp_path / "proto"
    shutil.copytree(PROTO, copy)
    tampered = copy / "messages" / "control.decision.v1.json"
    tampered.write_text(tampered.read_text().replace('"maximum": 1.0', '"maximum": 2.0', 1))
    (copy / "api" / "ErrorBody.json").unlink()
    (copy / "messages" / "gossip.rumour.v1.json").write_text("{}\n")
    (copy / "openapi").mkdir()
    (copy / "openapi" / "urza.json").write_text("{}\n")  # not the generator's: left alone

    assert generator.main(["--check", "--out", str(copy)]) == 1
    out = capsys.readouterr()
    assert out.out.splitlines() == [
        "missing: api/ErrorBody.json",
        "extra: messages/gossip.rumour.v1.json",
        "drifted: messages/control.decision.v1.json",
    ]
    assert "run `make proto`" in out.err

    assert generator.main(["--out", str(copy)]) == 0
    assert generator.main(["--check", "--out", str(copy)]) == 0
    assert (copy / "README.md").read_text() == (PROTO / "README.md").read_text()
    assert (copy / "openapi" / "urza.json").exists()
    assert not (copy / "messages" / "gossip.rumour.v1.json").exists()


def test_the_command_line_check_passes_on_the_committed_tree() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "esper.contracts.proto", "--check"],
        cwd=REPO_ROOT / "libs",  # finds the repository's proto/ from a subdirectory
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "up to date" in result.stdout


def test_output_is_deterministic_and_canonical() -> None:
    first, second = generator.render(), generator.render()
    assert first == second
    for rel, text in first.items():
        canonical = json.dumps(json.loads(text), indent=2, sort_keys=True, ensure_ascii=False)
        assert text == canonical + "\n", rel


def test_index_lists_every_message_and_api_body() -> None:
    index = load("index.json")
    listed = {(m["type"], m["version"]): m for m in index["messages"]}
    assert set(listed) == {(m.TYPE, m.VERSION) for m in MESSAGES}
    for model in MESSAGES:
        entry = listed[(model.TYPE, model.VERSION)]
        assert entry["topic"] == model.TOPIC and (PROTO / entry["schema"]).is_file()
    assert set(index["api"]) == {b.__name__ for b in API_BODIES}
    assert index["schema_version"] == 1


# ----------------------------------------------------------------------------- schemas vs models


def invalid_payloads(model: type[Message]) -> list[dict[str, Any]]:
    """Payloads the model refuses: an unknown field, a missing required one, a wrong type, and
    this contract's own rules."""
    valid = EXAMPLES[model][0].model_dump(mode="json")
    required = [n for n, f in model.model_fields.items() if f.is_required()]
    bad = [
        {**valid, "unexpected": 1},
        {k: v for k, v in valid.items() if k != required[0]},
        {**valid, required[0]: [1, 2]},
    ]
    germinate_only = {"blueprint": None, "blend": None, "strategy": None}
    if model is TelemetryReport:
        bad += [
            {**valid, "val_accuracy": 1.5},
            {**valid, "epoch": -1},
            {**valid, "nonfinite": ["train_loss"]},  # listed, yet it has a value
            {**valid, "seeds": [{**valid["seeds"][0], "alpha": 1.5}]},
            {**valid, "layers": [{**valid["layers"][0], "dead_fraction": -0.1}]},
        ]
    elif model is ControlDecision:
        bad += [
            {**valid, "blueprint": None},  # germinate with neither blueprint nor kernel
            {**valid, "kernel": "efficiency_kernel_v1"},  # with both
            {**valid, **germinate_only, "action": "retire", "alpha": None},  # no seed
            {**valid, **germinate_only, "action": "set_alpha", "seed": 0, "alpha": None},
            {**valid, **germinate_only, "action": "keep", "seed": 0},  # keep with an alpha
            {**valid, "action": "keep", "seed": 0, "alpha": None},  # keep with a blueprint
        ]
    elif model is SeedTransition:
        bad += [{**valid, "from_state": "DORMANT"}, {**valid, "to_state": "ZOMBIE"}]
    elif model is JobStatusChanged:
        bad += [{**valid, "previous": valid["status"]}]
    elif model is DecisionTaken:
        bad += [
            {**valid, "outcome": "refused"},  # refused without a code
            {**valid, "outcome": "refused", "code": None},
            {**valid, "outcome": "refused", "code": "slot_busy"},  # not one of the codes
            {**valid, "code": "no_free_slot"},  # applied with a code
        ]
    return bad


@pytest.mark.parametrize("model", MESSAGES, ids=lambda m: m.TYPE)
def test_each_message_schema_accepts_what_the_model_accepts(model: type[Message]) -> None:
    check = validator(generator.message_path(model))
    schema = load(generator.message_path(model))
    assert schema["x-esper"] == {"type": model.TYPE, "version": model.VERSION, "topic": model.TOPIC}
    assert schema["examples"], "every message schema shows an example"
    for example in [*schema["examples"], *(m.model_dump(mode="json") for m in EXAMPLES[model])]:
        check.validate(example)
        model.model_validate_json(json.dumps(example), strict=True)


@pytest.mark.parametrize("model", MESSAGES, ids=lambda m: m.TYPE)
def test_each_message_schema_refuses_what_the_model_refuses(model: type[Message]) -> None:
    check = validator(generator.message_path(model))
    for payload in invalid_payloads(model):
        assert not check.is_valid(payload), payload
        with pytest.raises(ValidationError):
            model.model_validate_json(json.dumps(payload), strict=True)


def test_envelope_schema_matches_an_encoded_envelope() -> None:
    check = validator("envelope.json")
    envelope = json.loads(Envelope.wrap(EXAMPLES[TelemetryReport][0], source="tolaria").encode())
    check.validate(envelope)
    assert not check.is_valid({k: v for k, v in envelope.items() if k != "type"})
    assert not check.is_valid({**envelope, "version": 0})
    assert not check.is_valid({**envelope, "extra": 1})


def test_api_schemas_match_the_bodies() -> None:
    bodies: list[tuple[str, Any]] = [
        ("api/ErrorBody.json", ErrorBody.of("not_found", "no job 'j'", ["path", "job_id"])),
        ("api/HealthStatus.json", HealthStatus(status="ok", service="urza", version="1")),
        ("api/Readiness.json", Readiness.of("urza", "1", {"redis": "refused"})),
        ("api/Page.json", Page[str](items=["a"], next_cursor="n", total=3)),
    ]
    for rel, body in bodies:
        check = validator(rel)
        payload = body.model_dump(mode="json")
        check.validate(payload)
        assert not check.is_valid({**payload, "unexpected": True}), rel
    assert not validator("api/ErrorBody.json").is_valid({"error": {"message": "no type"}})
