"""The heuristic policy runs in-process: `esper.policy` alone, fed real TelemetryReports, with
the job's state in memory — no Redis, no HTTP, no Tamiyo. The same code Tamiyo hosts."""

from __future__ import annotations

import sys

from esper.contracts import ControlDecision, LayerStats, TelemetryReport
from esper.policy import (
    Context,
    HeuristicPolicy,
    JobState,
    PolicyConfig,
    Proposal,
    builtin_catalogue,
    ingest_report,
    new_state,
    register_decision,
)

JOB = "job-in-process"
CONFIG = PolicyConfig(warmup_epochs=3, patience=2, min_delta=0.01, cooldown_epochs=0)


def layers() -> list[LayerStats]:
    """Three linear layers; "0" and "2" feed the next through an activation, so the job can
    widen them. "2" is pulled on hardest of the two (the output layer "4" is never grown)."""
    return [
        LayerStats(layer="0", grad_norm=0.2, dead_fraction=0.0, next_layer="2"),
        LayerStats(layer="2", grad_norm=0.5, dead_fraction=0.0, next_layer="4"),
        LayerStats(layer="4", grad_norm=0.9, dead_fraction=0.0),
    ]


def epoch_report(epoch: int, val_loss: float) -> TelemetryReport:
    return TelemetryReport(
        job_id=JOB,
        epoch=epoch,
        step=(epoch + 1) * 10,
        kind="epoch",
        val_loss=val_loss,
        val_accuracy=0.5,
        layers=layers(),
    )


def feed(state: JobState, report: TelemetryReport) -> list[Proposal]:
    """What an in-process controller does with each epoch report: the bookkeeping, then the
    policy."""
    assert ingest_report(state, report, CONFIG, kernel_kinds={})
    context = Context(CONFIG, builtin_catalogue(), catalogue_source="builtin")
    return HeuristicPolicy().on_report(state, report, context)


def test_a_plateau_past_warmup_widens_the_layer_that_names_a_next_layer() -> None:
    state = new_state(JOB)
    # val_loss flat from the start: a plateau by epoch 2, but still warming up until epoch 3.
    for epoch in range(3):
        assert feed(state, epoch_report(epoch, 0.69)) == []
        assert state.note.startswith("warming up"), state.note
    assert state.stale_epochs == 2

    [proposal] = feed(state, epoch_report(3, 0.69))
    assert (proposal.action, proposal.layer, proposal.blueprint) == ("germinate", "2", "widen")
    assert proposal.evidence["widens_into"] == "4"
    assert proposal.evidence["growth_trigger"] == "plateau"
    assert proposal.evidence["catalogue"] == "builtin"
    assert proposal.alpha == CONFIG.target_alpha
    assert "plateaued" in proposal.reason


def test_a_registered_germination_holds_further_growth_until_the_job_answers() -> None:
    state = new_state(JOB)
    proposals = [p for e in range(4) for p in feed(state, epoch_report(e, 0.69))]
    [proposal] = proposals
    decision = ControlDecision(
        decision_id="d-0001",
        job_id=JOB,
        action=proposal.action,
        layer=proposal.layer,
        blueprint=proposal.blueprint,
        blend=proposal.blend,
        strategy=proposal.strategy,
        ramp_steps=proposal.ramp_steps,
        alpha=proposal.alpha,
        reason=proposal.reason,
    )
    register_decision(state, decision, "tamiyo", CONFIG)

    assert feed(state, epoch_report(4, 0.69)) == []
    assert state.pending is not None and state.pending.decision_id == "d-0001"
    assert "in flight" in state.note


def test_the_policy_needs_no_service_and_no_torch() -> None:
    """In a fresh interpreter: importing and running the policy loads no service package (nor
    torch, which only building a seed needs)."""
    import subprocess

    code = (
        "import sys, esper.policy\n"
        "esper.policy.builtin_catalogue()\n"
        "print(sorted(m for m in ('tamiyo', 'fastapi', 'redis', 'torch') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
