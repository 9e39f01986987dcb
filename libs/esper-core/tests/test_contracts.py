"""esper.contracts: every message survives the trip through an envelope; every bad input is refused
with the typed error that a consumer dead-letters with, and its message says what and where."""

from __future__ import annotations

import json
import math
from typing import Any, ClassVar, get_args

import pytest
from pydantic import ValidationError
from torch import nn

import esper
from esper.contracts import (
    MESSAGES,
    SEED_STATE_NAMES,
    TOPICS,
    Blend,
    ControlDecision,
    DecisionTaken,
    DecisionTakenV1,
    Envelope,
    ErrorBody,
    HealthStatus,
    Heartbeat,
    HostSignature,
    JobMetrics,
    JobSpec,
    JobStatus,
    JobStatusChanged,
    JobStatusChangedV1,
    JobView,
    KernelReady,
    KernelReadyV1,
    LayerStats,
    Message,
    Page,
    Readiness,
    SeedStateName,
    SeedStats,
    SeedTransition,
    TelemetryReport,
    TelemetryReportV1,
    TelemetryReportV2,
    contract,
    contracts,
    examples,
    finite_or_none,
    register,
)
from esper.contracts import envelope as envelope_module
from esper.exceptions import (
    ConfigError,
    MalformedMessageError,
    MessageError,
    MessageValidationError,
    UnknownMessageTypeError,
    UnsupportedVersionError,
)
from esper.kasmina import BlendMode, LifecycleEvent, SeedState

EXAMPLES = examples()
CASES = [
    pytest.param(message, id=f"{model.TYPE}-{i}")
    for model, messages in EXAMPLES.items()
    for i, message in enumerate(messages)
]


def typical(model: type[Message]) -> Message:
    return EXAMPLES[model][0]


def raw_with(model: type[Message], **changes: Any) -> bytes:
    """The encoded envelope of `model`'s typical example with payload fields changed (a value of
    `...` deletes the field)."""
    data = json.loads(Envelope.wrap(typical(model), source="test").encode())
    for key, value in changes.items():
        if value is ...:
            del data["payload"][key]
        else:
            data["payload"][key] = value
    return json.dumps(data).encode()


def raw_envelope(**changes: Any) -> bytes:
    data = json.loads(Envelope.wrap(typical(Heartbeat), source="test").encode())
    for key, value in changes.items():
        if value is ...:
            del data[key]
        else:
            data[key] = value
    return json.dumps(data).encode()


# ----------------------------------------------------------------------------- the registry


def test_every_contract_of_esper_is_registered_and_has_an_example() -> None:
    ours = {
        m
        for versions in contracts().values()
        for m in versions.values()
        if m.__module__.startswith("esper.contracts.")
    }
    assert ours == set(MESSAGES)
    assert set(EXAMPLES) == set(MESSAGES)
    assert all(EXAMPLES[m] for m in MESSAGES)


def test_every_contract_travels_on_one_of_the_four_topics() -> None:
    assert TOPICS == ("telemetry", "control", "health", "events", "jobs")
    for versions in contracts().values():
        for model in versions.values():
            assert model.TOPIC in TOPICS, model
    assert {m.TOPIC for m in MESSAGES} == set(TOPICS)


def test_contract_lookup_by_type_and_version() -> None:
    assert contract("telemetry.report", 3) is TelemetryReport
    assert contract("telemetry.report", 2) is TelemetryReportV2
    assert contract("telemetry.report", 1) is TelemetryReportV1
    with pytest.raises(UnknownMessageTypeError, match=r"'telemetry\.nope'"):
        contract("telemetry.nope", 1)
    with pytest.raises(UnsupportedVersionError, match=r"no schema version 7 \(known: 1, 2, 3\)"):
        contract("telemetry.report", 7)


def test_registering_a_second_contract_for_a_type_and_version_raises() -> None:
    before = contracts()

    with pytest.raises(ConfigError, match=r"telemetry.report v1 is registered twice"):

        @register
        class Impostor(Message):
            TYPE: ClassVar[str] = "telemetry.report"
            VERSION: ClassVar[int] = 1
            TOPIC: ClassVar[str] = "telemetry"

    assert contracts() == before
    assert register(TelemetryReport) is TelemetryReport  # the same class again is harmless


@pytest.mark.parametrize(
    ("attrs", "match"),
    [
        ({"TYPE": "Bad Type", "TOPIC": "events"}, "TYPE must be a dotted lower-case name"),
        ({"TYPE": "event.x", "TOPIC": "gossip"}, "TOPIC must be one of"),
        ({"TYPE": "event.x", "TOPIC": "events", "VERSION": 0}, "VERSION must be an int ≥ 1"),
    ],
)
def test_registering_a_malformed_contract_raises(attrs: dict[str, Any], match: str) -> None:
    before = contracts()
    model = type("Bad", (Message,), {"__annotations__": {}, **attrs})
    with pytest.raises(ConfigError, match=match):
        register(model)
    assert contracts() == before


def test_versions_of_one_type_are_told_apart(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(envelope_module, "_CONTRACTS", contracts())

    @register
    class HeartbeatV2(Heartbeat):
        VERSION: ClassVar[int] = 2
        load: float = 0.0

    v1 = Envelope.decode(Envelope.wrap(typical(Heartbeat), source="t").encode())
    v2 = Envelope.decode(
        Envelope.wrap(HeartbeatV2(**typical(Heartbeat).model_dump(), load=0.5), source="t").encode()
    )
    assert type(v1.message()) is Heartbeat and v1.version == 1
    assert type(v2.message()) is HeartbeatV2 and v2.version == 2
    with pytest.raises(UnsupportedVersionError, match=r"known: 1, 2"):
        Envelope.decode(raw_envelope(version=3))


# ----------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("message", CASES)
def test_round_trip_wrap_encode_decode_message(message: Message) -> None:
    envelope = Envelope.wrap(message, source="tolaria-0", correlation_id="dec-1")
    raw = envelope.encode()
    decoded = Envelope.decode(raw)

    assert decoded == envelope
    assert decoded.message() == message
    assert type(decoded.message()) is type(message)
    assert (decoded.type, decoded.version) == (message.TYPE, message.VERSION)
    assert decoded.topic == message.TOPIC
    assert decoded.job_id == getattr(message, "job_id", None)
    assert decoded.correlation_id == "dec-1" and decoded.source == "tolaria-0"
    # The decoded envelope is validated once: message() hands back that one instance.
    assert decoded.message() is decoded.message()
    # And what a consumer reads back encodes to the same bytes.
    assert Envelope.wrap(decoded.message(), source="tolaria-0").payload == envelope.payload


def test_envelope_takes_the_job_id_from_the_payload_and_refuses_a_different_one() -> None:
    report = typical(TelemetryReport)
    assert Envelope.wrap(report, source="t").job_id == "job-7f3a9c"
    assert Envelope.wrap(report, source="t", job_id="job-7f3a9c").job_id == "job-7f3a9c"
    with pytest.raises(ConfigError, match="differs from the payload's 'job-7f3a9c'"):
        Envelope.wrap(report, source="t", job_id="job-other")
    assert Envelope.wrap(typical(Heartbeat), source="t", job_id="job-1").job_id == "job-1"


def test_envelopes_get_unique_ids_and_a_timestamp() -> None:
    a, b = (Envelope.wrap(typical(Heartbeat), source="t") for _ in range(2))
    assert a.id != b.id
    assert a.ts > 1.7e9


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("raw", "error", "match"),
    [
        (b"{not json", MalformedMessageError, r"^not JSON: "),
        (b"\xff\xfe", MalformedMessageError, r"^not JSON: "),
        (b"", MalformedMessageError, r"^not JSON: "),
        (b"[1, 2]", MalformedMessageError, r"not an envelope: a JSON list"),
        (b'"hello"', MalformedMessageError, r"not an envelope: a JSON str"),
        (
            raw_envelope(source=...),
            MalformedMessageError,
            r"not an envelope: source: Field required",
        ),
        (raw_envelope(payload=...), MalformedMessageError, r"payload: Field required"),
        (raw_envelope(version="1"), MalformedMessageError, r"version: Input should be a valid int"),
        (raw_envelope(ts=math.nan), MalformedMessageError, r"ts: Input should be a finite number"),
        (raw_envelope(extra=1), MalformedMessageError, r"extra: Extra inputs are not permitted"),
        (
            raw_envelope(payload=[1]),
            MalformedMessageError,
            r"payload: Input should be a valid dict",
        ),
        (raw_envelope(type="gossip.rumour"), UnknownMessageTypeError, "'gossip.rumour'"),
        (
            raw_envelope(version=9),
            UnsupportedVersionError,
            r"'health.heartbeat' has no schema version 9 \(known: 1\)",
        ),
    ],
    ids=[
        "not-json",
        "not-utf8",
        "empty",
        "array",
        "string",
        "missing-source",
        "missing-payload",
        "version-as-string",
        "nan-ts",
        "extra-envelope-field",
        "payload-not-object",
        "unknown-type",
        "unknown-version",
    ],
)
def test_a_bad_envelope_raises_the_error_that_says_why(
    raw: bytes, error: type[MessageError], match: str
) -> None:
    with pytest.raises(error, match=match):
        Envelope.decode(raw)


def seeds_with_alpha(alpha: Any) -> list[dict[str, Any]]:
    seed = typical(TelemetryReport).model_dump(mode="json")["seeds"][0]
    return [{**seed, "alpha": alpha}]


@pytest.mark.parametrize(
    ("model", "changes", "match"),
    [
        (TelemetryReport, {"epoch": "3"}, r"epoch: Input should be a valid integer \(got '3'\)"),
        (TelemetryReport, {"epoch": -1}, r"epoch: Input should be greater than or equal to 0"),
        (TelemetryReport, {"kind": "batch"}, r"kind: Input should be 'epoch' or 'step'"),
        (TelemetryReport, {"train_loss": math.nan}, r"train_loss: Input should be a finite number"),
        (TelemetryReport, {"val_loss": math.inf}, r"val_loss: Input should be a finite number"),
        (TelemetryReport, {"train_loss": True}, r"train_loss: Input should be a valid number"),
        (TelemetryReport, {"val_accuracy": 1.2}, r"val_accuracy: .*less than or equal to 1"),
        (
            TelemetryReport,
            {"seeds": seeds_with_alpha(1.5)},
            r"seeds\.0\.alpha: Input should be less than or equal to 1 \(got 1\.5\)",
        ),
        (TelemetryReport, {"bogus": 1}, r"bogus: Extra inputs are not permitted"),
        (TelemetryReport, {"job_id": ...}, r"job_id: Field required"),
        (TelemetryReport, {"job_id": "job with spaces"}, r"job_id: String should match pattern"),
        (Heartbeat, {"status": "fine"}, r"status: Input should be 'ok', 'degraded' or 'down'"),
        (Heartbeat, {"interval_s": 0}, r"interval_s: Input should be greater than 0"),
        (SeedTransition, {"to_state": "ZOMBIE"}, r"to_state: Input should be 'DORMANT'"),
        (SeedTransition, {"from_state": "DORMANT"}, r"DORMANT → ACTIVE is not a lifecycle edge"),
        (JobStatusChanged, {"status": "PENDING"}, r"status and previous are both PENDING"),
        (KernelReady, {"digest": "md5:00"}, r"digest: String should match pattern"),
        (KernelReady, {"host": {"kind": "rnn"}}, r"host\.kind: Input should be 'linear'"),
        (DecisionTaken, {"outcome": "ignored"}, r"outcome: Input should be 'applied' or"),
    ],
    ids=lambda v: v.TYPE if isinstance(v, type) and issubclass(v, Message) else None,
)
def test_a_payload_that_breaks_its_contract_raises_message_validation_error(
    model: type[Message], changes: dict[str, Any], match: str
) -> None:
    raw = raw_with(model, **changes)
    with pytest.raises(MessageValidationError, match=match) as caught:
        Envelope.decode(raw)
    # Which message, of which contract: enough to find it in the dead-letter stream.
    envelope_id = json.loads(raw)["id"]
    assert str(caught.value).startswith(f"{model.TYPE} v{model.VERSION} message {envelope_id}: ")


def test_a_validation_error_names_every_problem_on_one_line() -> None:
    with pytest.raises(MessageValidationError) as caught:
        Envelope.decode(raw_with(TelemetryReport, epoch=-1, step="x", kind="batch"))
    text = str(caught.value)
    assert "\n" not in text
    assert all(where in text for where in ("epoch:", "step:", "kind:"))


def test_a_huge_bad_value_is_shortened_in_the_error() -> None:
    with pytest.raises(MessageValidationError) as caught:
        Envelope.decode(raw_with(TelemetryReport, epoch="9" * 10_000))
    assert len(str(caught.value)) < 300


# ----------------------------------------------------------------------------- ControlDecision


def decision(**fields: Any) -> ControlDecision:
    base: dict[str, Any] = {
        "decision_id": "dec-1",
        "job_id": "job-1",
        "layer": "layer1",
        "reason": "test",
    }
    return ControlDecision(**{**base, **fields})


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"action": "germinate"}, "germinate needs a blueprint or a kernel"),
        (
            {"action": "germinate", "blueprint": "low_rank", "kernel": "efficiency_kernel_v1"},
            "germinate needs a blueprint or a kernel \\(exactly one\\)",
        ),
        ({"action": "retire"}, "retire needs a seed index"),
        ({"action": "keep"}, "keep needs a seed index"),
        ({"action": "set_alpha", "alpha": 0.5}, "set_alpha needs a seed index"),
        ({"action": "set_alpha", "seed": 0}, "set_alpha needs an alpha target"),
        ({"action": "retire", "seed": 0, "blueprint": "low_rank"}, "blueprint only applies to"),
        ({"action": "keep", "seed": 0, "blend": "lerp"}, "blend only applies to germinate"),
        ({"action": "keep", "seed": 0, "alpha": 1.0}, "alpha does not apply to keep"),
        ({"action": "set_alpha", "seed": 0, "alpha": 1.5}, "alpha\n.*less than or equal to 1"),
        ({"action": "germinate", "blueprint": "Low Rank"}, "blueprint\n.*pattern"),
        ({"action": "explode", "seed": 0}, "action\n.*'germinate', 'keep', 'retire'"),
        ({"action": "keep", "seed": 0, "evidence": {"x": [1]}}, "evidence.x"),
        ({"action": "keep", "seed": 0, "evidence": {"x": math.nan}}, "finite"),
        ({"action": "keep", "seed": 0, "evidence": {"": 1}}, "evidence"),
    ],
)
def test_control_decision_cross_field_rules(fields: dict[str, Any], match: str) -> None:
    with pytest.raises(ValidationError, match=match):
        decision(**fields)


@pytest.mark.parametrize(
    "fields",
    [
        {"action": "germinate", "blueprint": "low_rank"},
        {"action": "germinate", "kernel": "efficiency_kernel_v1", "seed": 0, "blend": "lerp"},
        {"action": "germinate", "blueprint": "low_rank", "alpha": 0.7, "ramp_steps": 100},
        {"action": "keep", "seed": 2},
        {"action": "retire", "seed": 0, "ramp_steps": 10},
        {"action": "set_alpha", "seed": 0, "alpha": 0.0},
    ],
)
def test_control_decisions_that_fit_their_action(fields: dict[str, Any]) -> None:
    made = decision(**fields)
    assert Envelope.decode(Envelope.wrap(made, source="tamiyo").encode()).message() == made


def test_a_cross_field_violation_on_the_wire_is_a_message_validation_error() -> None:
    with pytest.raises(MessageValidationError, match=r"\(root\): Value error, germinate needs"):
        Envelope.decode(raw_with(ControlDecision, blueprint=None))


# ----------------------------------------------------------------------------- telemetry


def test_missing_telemetry_reads_as_missing() -> None:
    report = TelemetryReport(job_id="j", epoch=0, step=0, kind="step")
    assert report.train_loss is None and report.val_loss is None and report.val_accuracy is None
    stats = LayerStats(layer="l")
    assert stats.dead_fraction is None and stats.grad_norm is None
    assert SeedStats(layer="l", seed=0, state="DORMANT", alpha=0.0).contribution is None
    assert json.loads(report.model_dump_json())["train_loss"] is None


def test_from_measurements_reports_a_nonfinite_metric_as_missing_and_says_so() -> None:
    report = TelemetryReport.from_measurements(
        job_id="j",
        epoch=1,
        step=10,
        kind="epoch",
        metrics={"train_loss": math.nan, "val_loss": math.inf, "samples_per_s": 10.0},
    )
    assert report.train_loss is None and report.val_loss is None
    assert report.samples_per_s == 10.0
    assert report.nonfinite == ["train_loss", "val_loss"]
    assert Envelope.decode(Envelope.wrap(report, source="t").encode()).message() == report


def test_a_metric_listed_as_nonfinite_cannot_also_have_a_value() -> None:
    with pytest.raises(ValidationError, match="train_loss is listed as non-finite"):
        TelemetryReport(
            job_id="j", epoch=0, step=0, kind="step", train_loss=1.0, nonfinite=["train_loss"]
        )


def test_a_layer_or_a_seed_slot_reported_twice_is_refused() -> None:
    with pytest.raises(ValidationError, match="a layer appears more than once"):
        TelemetryReport(
            job_id="j",
            epoch=0,
            step=0,
            kind="step",
            layers=[LayerStats(layer="a"), LayerStats(layer="a")],
        )
    seed = SeedStats(layer="a", seed=0, state="DORMANT", alpha=0.0)
    with pytest.raises(ValidationError, match=r"a \(layer, seed\) slot appears more than once"):
        TelemetryReport(job_id="j", epoch=0, step=0, kind="step", seeds=[seed, seed])


def encoded(message: Message, **changes: Any) -> bytes:
    """`message` in an envelope as its producer would send it, with payload fields changed."""
    data = json.loads(Envelope.wrap(message, source="test").encode())
    data["payload"].update(changes)
    return json.dumps(data).encode()


def test_a_v3_report_carries_the_layer_a_widening_seed_grows_into() -> None:
    report = typical(TelemetryReport)
    assert isinstance(report, TelemetryReport) and report.VERSION == 3
    envelope = Envelope.decode(encoded(report))
    assert envelope.version == 3 and envelope.current() is envelope.message()
    current = envelope.current()
    assert isinstance(current, TelemetryReport) and current == report
    assert [(s.layer, s.next_layer) for s in current.layers] == [
        ("layer1", "layer2"),
        ("layer2", None),
    ]


def test_a_layer_cannot_be_its_own_next_layer() -> None:
    itself = [{"layer": "a", "next_layer": "a"}]
    with pytest.raises(MessageValidationError, match=r"layers\.0: Value error, layer 'a' names"):
        Envelope.decode(encoded(typical(TelemetryReport), layers=itself))


@pytest.mark.parametrize("old", [TelemetryReportV1, TelemetryReportV2])
def test_an_older_report_is_read_as_v3_whose_layers_cannot_be_widened(
    old: type[Message],
) -> None:
    sent = typical(old)
    layers = [{"layer": "layer1", "grad_norm": 0.5}, {"layer": "layer2"}]
    envelope = Envelope.decode(encoded(sent, layers=layers))
    assert type(envelope.message()) is old and envelope.version == old.VERSION
    current = envelope.current()
    assert type(current) is TelemetryReport
    assert [(s.layer, s.grad_norm, s.next_layer) for s in current.layers] == [
        ("layer1", 0.5, None),
        ("layer2", None, None),
    ]
    assert current.model_dump(exclude={"layers", "decision_point", "answers"}) == (
        envelope.message().model_dump(exclude={"layers", "decision_point", "answers"})
    )
    assert current.decision_point == getattr(envelope.message(), "decision_point", False)


@pytest.mark.parametrize("old", [TelemetryReportV1, TelemetryReportV2])
def test_an_older_report_whose_layer_names_a_next_layer_is_refused(old: type[Message]) -> None:
    layers = [{"layer": "layer1", "next_layer": "layer2"}]
    with pytest.raises(MessageValidationError, match=r"layers\.0\.next_layer: Extra inputs"):
        Envelope.decode(encoded(typical(old), layers=layers))


def test_a_v2_report_keeps_its_own_rules_when_read() -> None:
    twice = [{"layer": "a"}, {"layer": "a"}]
    with pytest.raises(MessageValidationError, match="a layer appears more than once"):
        Envelope.decode(encoded(typical(TelemetryReportV2), layers=twice))


def test_a_v1_kernel_ready_is_read_as_v2_with_a_one_layer_host() -> None:
    envelope = Envelope.decode(encoded(typical(KernelReadyV1)))
    assert type(envelope.message()) is KernelReadyV1 and envelope.version == 1
    current = envelope.current()
    assert isinstance(current, KernelReady) and current.host.downstream is None
    assert current.host == HostSignature(kind="linear", in_features=16, out_features=32)
    assert current.model_dump(exclude={"host"}) == envelope.message().model_dump(exclude={"host"})


def test_a_widening_kernel_travels_as_v2_and_a_v1_reader_refuses_it() -> None:
    widening = EXAMPLES[KernelReady][1]
    assert isinstance(widening, KernelReady) and widening.host.downstream is not None
    raw = Envelope.wrap(widening, source="urza").encode()
    assert Envelope.decode(raw).current() == widening
    as_v1 = json.loads(raw)
    as_v1["version"] = 1
    with pytest.raises(MessageValidationError, match=r"host\.downstream: Extra inputs"):
        Envelope.decode(json.dumps(as_v1).encode())


def test_a_v1_kernel_ready_keeps_the_host_geometry_rules() -> None:
    bad_groups = {"kind": "linear", "in_features": 3, "out_features": 4, "groups": 2}
    with pytest.raises(MessageValidationError, match=r"host: Value error, groups=2 must divide"):
        Envelope.decode(encoded(typical(KernelReadyV1), host=bad_groups))


def test_finite_or_none() -> None:
    assert finite_or_none(0.0) == 0.0
    assert finite_or_none(-2.5) == -2.5
    assert finite_or_none(None) is None
    assert finite_or_none(math.nan) is None
    assert finite_or_none(-math.inf) is None


def test_seed_state_names_are_kasmina_seed_states() -> None:
    assert set(get_args(SeedStateName)) == {s.name for s in SeedState}
    # In order too: Nissa lists states in metrics by this tuple, and DORMANT must stay first.
    assert tuple(s.name for s in SeedState) == SEED_STATE_NAMES


def test_blend_names_are_kasmina_blend_modes() -> None:
    assert set(get_args(Blend)) == {m.value for m in BlendMode}


# ----------------------------------------------------------------------------- events


@pytest.fixture
def grown() -> tuple[esper.MorphableModel, esper.LocalKernelRegistry, list[LifecycleEvent]]:
    """A tiny real model with a low_rank kernel loaded into seed 0 of `0`, and every lifecycle
    event it emitted on the way."""
    model = nn.Sequential(nn.Linear(8, 4))
    registry = esper.LocalKernelRegistry()
    meta = registry.compile("low_rank", model[0], tags=["efficiency_kernel_v1"])
    morphable = esper.wrap(model, seeds_per_layer=2, kernels=esper.KernelCache([registry]))
    events: list[LifecycleEvent] = []
    morphable.add_listener(events.append)
    morphable.load_kernel_sync("0", 0, meta.kernel_id)
    morphable.retire_seed("0", 0, reason="poor contribution")
    return morphable, registry, events


def test_seed_transition_from_real_lifecycle_events(
    grown: tuple[esper.MorphableModel, esper.LocalKernelRegistry, list[LifecycleEvent]],
) -> None:
    _, registry, events = grown
    kernel_id = registry.lookup("efficiency_kernel_v1").kernel_id
    edges = [(e.from_state.name, e.to_state.name) for e in events]
    assert edges[:4] == [
        ("DORMANT", "ALLOCATED"),
        ("ALLOCATED", "LOADING"),
        ("LOADING", "ACTIVE"),
        ("ACTIVE", "RETIRING"),
    ]
    for step, event in enumerate(events):
        message = SeedTransition.from_lifecycle(event, job_id="job-1", step=step)
        assert (message.layer, message.seed, message.step) == ("0", 0, step)
        assert (message.from_state, message.to_state) == (
            event.from_state.name,
            event.to_state.name,
        )
        assert message.reason == event.reason and message.occurred_at == event.ts
        envelope = Envelope.decode(Envelope.wrap(message, source="tolaria").encode())
        assert envelope.message() == message and envelope.job_id == "job-1"
    assert SeedTransition.from_lifecycle(events[2], "job-1").kernel_id == kernel_id
    assert SeedTransition.from_lifecycle(events[3], "job-1").reason == "poor contribution"


def test_seed_transition_shortens_a_long_reason_rather_than_losing_the_event() -> None:
    event = LifecycleEvent("l", 1, SeedState.LOADING, SeedState.DORMANT, "x" * 10_000, None)
    message = SeedTransition.from_lifecycle(event, "job-1")
    assert len(message.reason) == 2000 and message.reason.endswith("…")
    empty = LifecycleEvent("l", 1, SeedState.LOADING, SeedState.DORMANT, "", None)
    assert SeedTransition.from_lifecycle(empty, "job-1").reason == "(no reason given)"


def test_seed_transition_refuses_an_edge_the_lifecycle_does_not_have() -> None:
    event = LifecycleEvent("l", 0, SeedState.DORMANT, SeedState.ACTIVE, "skip ahead", None)
    with pytest.raises(ValidationError, match="DORMANT → ACTIVE is not a lifecycle edge"):
        SeedTransition.from_lifecycle(event, "job-1")


def test_kernel_ready_from_a_real_kernel_meta(
    grown: tuple[esper.MorphableModel, esper.LocalKernelRegistry, list[LifecycleEvent]],
) -> None:
    _, registry, _ = grown
    meta = registry.lookup("efficiency_kernel_v1")
    message = KernelReady.from_meta(meta, tags=["efficiency_kernel_v1"])
    assert message.host == meta.host and message.digest == meta.digest
    assert message.blueprint == "low_rank" and message.params == meta.params > 0
    assert Envelope.decode(Envelope.wrap(message, source="urza").encode()).message() == message


# ----------------------------------------------------------------------------- decision_taken

GERMINATE = ControlDecision(
    decision_id="d-1",
    job_id="job-1",
    action="germinate",
    layer="2",
    blueprint="residual_mlp",
    reason="plateau",
)


def test_a_refusal_is_built_with_its_code_in_one_place() -> None:
    refused = DecisionTaken.refused(GERMINATE, "kernel_unavailable", "x" * 5000)
    assert (refused.outcome, refused.code, refused.job_id, refused.seed) == (
        "refused",
        "kernel_unavailable",
        "job-1",
        None,
    )
    assert len(refused.reason) == 2000  # a long error is shortened rather than fail the answer
    answered = DecisionTaken.refused(GERMINATE, "wrong_job", "not mine", job_id="job-2", seed=1)
    assert (answered.job_id, answered.seed, answered.decision_id) == ("job-2", 1, "d-1")
    assert Envelope.decode(Envelope.wrap(answered, source="t").encode()).message() == answered


def test_a_refusal_without_a_code_or_an_answer_applied_with_one_is_refused() -> None:
    fields: dict[str, Any] = {
        "decision_id": "d-1",
        "job_id": "job-1",
        "action": "germinate",
        "reason": "words",
        "layer": "2",
    }
    with pytest.raises(ValidationError, match="a refused decision needs a code"):
        DecisionTaken(**fields, outcome="refused")
    with pytest.raises(ValidationError, match="an applied decision has no refusal code"):
        DecisionTaken(**fields, outcome="applied", code="internal")
    with pytest.raises(ValidationError, match="code"):
        DecisionTaken(**fields, outcome="refused", code="slot_busy")
    with pytest.raises(MessageValidationError, match="a refused decision needs a code"):
        Envelope.decode(raw_with(DecisionTaken, outcome="refused"))
    with pytest.raises(MessageValidationError, match="an applied decision has no refusal code"):
        Envelope.decode(raw_with(DecisionTaken, code="max_seeds"))


def v1_answer(outcome: str, reason: str) -> bytes:
    """An `event.decision_taken` v1 envelope, as a producer from before refusal codes sent it."""
    payload = {
        "decision_id": "d-1",
        "job_id": "job-1",
        "action": "germinate",
        "outcome": outcome,
        "reason": reason,
        "layer": "2",
        "seed": None,
    }
    envelope = {"type": "event.decision_taken", "version": 1, "source": "tolaria-old"}
    return json.dumps({**envelope, "payload": payload}).encode()


@pytest.mark.parametrize(
    ("reason", "code"),
    [
        ("no free seed slot in layer '2' (slots: ACTIVE, ACTIVE)", "no_free_slot"),
        ("max_seeds reached: the job holds 2 seed(s) and max_seeds is 2", "max_seeds"),
        ("morphogenesis is disabled for this job", "morphogenesis_off"),
        ("morphogenesis is off for this job", "morphogenesis_off"),
        ("decision d-1 is for job 'job-2', not for this job 'job-1'", "wrong_job"),
        ("unknown layer 'nope'; wrapped layers: 0, 2", "unknown_layer"),
        ("retire names no seed of layer '2'", "invalid_seed"),
        ("seed 9 is out of range: layer '2' has 2 seed slots (0-1)", "invalid_seed"),
        ("cannot keep: seed 0 of layer '2' is DORMANT, not ACTIVE", "seed_state"),
        ("cannot germinate: seed 0 of layer '2' is ACTIVE, not DORMANT; retire it", "seed_state"),
        (
            "no kernel for blueprint 'x' on layer '2' (linear 8→8): HTTPError: 503",
            "kernel_unavailable",
        ),
        ("loading kernel krn_0 into seed 0 of layer '2' failed: OSError: gone", "load_failed"),
        ("cannot ramp seed 0 of layer '2' to α=1.0: LerpBudgetError: over", "alpha_rejected"),
        ("cannot set α: LerpBudgetError: Σα would be 1.5", "alpha_rejected"),
        ("the job has finished training", "job_finished"),
        ("internal error: KeyError: 'no free seed slot'", "internal"),
        ("the moon is in the wrong phase", "internal"),
    ],
)
def test_a_v1_refusal_is_still_read_and_gets_its_code(reason: str, code: str) -> None:
    envelope = Envelope.decode(v1_answer("refused", reason))
    old = envelope.message()
    assert type(old) is DecisionTakenV1 and envelope.version == 1
    current = envelope.current()
    assert type(current) is DecisionTaken
    assert (current.outcome, current.code, current.reason) == ("refused", code, reason)
    assert current.model_dump(exclude={"code"}) == old.model_dump()


def test_a_v1_answer_applied_reads_as_v2_without_a_code() -> None:
    current = Envelope.decode(v1_answer("applied", "germinated seed 0")).current()
    assert type(current) is DecisionTaken and current.code is None
    # The current version needs no upgrade: current() is the message itself.
    v2 = Envelope.decode(Envelope.wrap(typical(DecisionTaken), source="t").encode())
    assert v2.current() is v2.message()


def ended_job(status: JobStatus, metrics: JobMetrics) -> JobView:
    spec = JobSpec.model_validate({"model": {"kind": "mlp"}, "dataset": {"kind": "spirals"}})
    return JobView(
        job_id="job-ended",
        status=status,
        attempt=2,
        created_at=1.0,
        error="stopped on request" if status == "STOPPED" else None,
        metrics=metrics,
        spec=spec,
    )


def test_an_ended_job_status_carries_its_final_metrics_through_the_wire() -> None:
    ended = [m for m in EXAMPLES[JobStatusChanged] if isinstance(m, JobStatusChanged) and m.metrics]
    assert ended, "an example says a job's final metrics"
    envelope = Envelope.decode(Envelope.wrap(ended[0], source="tolaria").encode())
    assert envelope.version == 2 and envelope.current() == ended[0]
    metrics = envelope.current().metrics  # type: ignore[attr-defined]
    assert metrics.test_accuracy is not None and metrics.best_test_accuracy is not None


def test_a_v1_job_status_is_read_as_v2_without_metrics() -> None:
    envelope = Envelope.decode(encoded(typical(JobStatusChangedV1)))
    assert type(envelope.message()) is JobStatusChangedV1 and envelope.version == 1
    current = envelope.current()
    assert type(current) is JobStatusChanged and current.metrics is None
    assert current.model_dump(exclude={"metrics"}) == envelope.message().model_dump()


def test_a_v1_job_status_keeps_its_rules_and_refuses_metrics() -> None:
    with pytest.raises(MessageValidationError, match="nothing changed"):
        Envelope.decode(encoded(typical(JobStatusChangedV1), previous="SUCCEEDED"))
    with pytest.raises(MessageValidationError, match="metrics: Extra inputs"):
        Envelope.decode(encoded(typical(JobStatusChangedV1), metrics={"val_accuracy": 0.5}))


def test_only_an_ended_job_status_carries_metrics() -> None:
    running = typical(JobStatusChanged)
    assert isinstance(running, JobStatusChanged) and running.status == "RUNNING"
    with pytest.raises(MessageValidationError, match="only an ended job has final metrics"):
        Envelope.decode(encoded(running, metrics={"val_accuracy": 0.5}))


def test_the_status_of_an_ended_job_is_built_from_its_record() -> None:
    measured = JobMetrics(val_accuracy=0.7, best_epoch=3, best_val_accuracy=0.75)
    event = JobStatusChanged.ended(ended_job("STOPPED", measured))
    assert (event.status, event.previous, event.attempt) == ("STOPPED", "RUNNING", 2)
    assert event.error == "stopped on request" and event.metrics == measured
    # Nothing measured: no metrics, rather than all-null ones that would read as measured.
    assert JobStatusChanged.ended(ended_job("FAILED", JobMetrics())).metrics is None


# ----------------------------------------------------------------------------- frozen, strict


def test_messages_are_frozen_and_forbid_unknown_fields() -> None:
    beat = typical(Heartbeat)
    with pytest.raises(ValidationError, match="frozen"):
        setattr(beat, "status", "down")  # noqa: B010 (the attribute is what is being tested)
    with pytest.raises(ValidationError, match="Extra inputs are not permitted"):
        Heartbeat.model_validate({**beat.model_dump(), "colour": "green"})


# ----------------------------------------------------------------------------- API bodies


def test_error_body_is_one_shape() -> None:
    body = ErrorBody.of("not_found", "no job 'j-9'", location=["path", "job_id"], job_id="j-9")
    assert body.model_dump() == {
        "error": {
            "type": "not_found",
            "message": "no job 'j-9'",
            "location": ["path", "job_id"],
            "details": {"job_id": "j-9"},
        }
    }
    with pytest.raises(ValidationError, match=r"type\n.*String should match pattern"):
        ErrorBody.of("Not Found", "x")


def test_readiness_status_follows_its_checks() -> None:
    ready = Readiness.of("urza", "0.1.0", {"redis": True, "consumers": True})
    assert ready.status == "ready"
    not_ready = Readiness.of("urza", "0.1.0", {"redis": "connection refused", "consumers": True})
    assert not_ready.status == "not_ready"
    with pytest.raises(ValidationError, match="status must be not_ready"):
        Readiness(status="ready", service="urza", version="0.1.0", checks={"redis": False})


def test_health_cannot_say_ok_with_a_failing_check() -> None:
    HealthStatus(status="degraded", service="nissa", version="0.1.0", checks={"redis": False})
    with pytest.raises(ValidationError, match="status is ok but checks fail: redis"):
        HealthStatus(status="ok", service="nissa", version="0.1.0", checks={"redis": False})


def test_page_is_generic() -> None:
    page = Page[int](items=[1, 2], next_cursor="c2", total=10)
    assert Page[int].model_validate_json(page.model_dump_json()) == page
    with pytest.raises(ValidationError, match=r"items\.0"):
        Page[int](items=["x"])  # type: ignore[list-item]
