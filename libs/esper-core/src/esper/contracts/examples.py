"""A valid example of every message: published in proto/ (the `examples` of each schema), and used
by the tests of every service that needs a message to send. Values are fixed so that the
generated schemas do not change from run to run."""

from __future__ import annotations

from esper.contracts.control import ControlAnswer, ControlDecision
from esper.contracts.envelope import Message
from esper.contracts.events import (
    DecisionPointMissed,
    DecisionTaken,
    DecisionTakenV1,
    HostSignatureV1,
    JobStatusChanged,
    JobStatusChangedV1,
    KernelReady,
    KernelReadyV1,
    SeedTransition,
)
from esper.contracts.health import Heartbeat
from esper.contracts.jobs import JobMetrics, JobQueued
from esper.contracts.kernels import HostSignature
from esper.contracts.telemetry import (
    LayerStats,
    LayerStatsV2,
    SeedStats,
    TelemetryReport,
    TelemetryReportV1,
    TelemetryReportV2,
)

JOB = "job-7f3a9c"
KERNEL = "krn_0123456789abcdef01234567"
DIGEST = "sha256:" + "ab" * 32


def examples() -> dict[type[Message], list[Message]]:
    """Each contract → a few valid instances (the first is the typical one)."""
    return {
        TelemetryReport: [
            TelemetryReport(
                job_id=JOB,
                epoch=3,
                step=1200,
                kind="epoch",
                train_loss=0.412,
                val_loss=0.455,
                val_accuracy=0.87,
                samples_per_s=5120.5,
                layers=[
                    LayerStats(
                        layer="layer1",
                        activation_mean=0.21,
                        activation_variance=0.9,
                        dead_fraction=0.125,
                        grad_norm=0.034,
                        next_layer="layer2",
                    ),
                    LayerStats(layer="layer2"),
                ],
                seeds=[
                    SeedStats(
                        layer="layer1",
                        seed=0,
                        state="ACTIVE",
                        alpha=0.35,
                        kernel_id=KERNEL,
                        blend="add",
                        contribution=0.012,
                        error_count=0,
                    ),
                    SeedStats(layer="layer1", seed=1, state="DORMANT", alpha=0.0),
                ],
                decision_point=True,
                answers=[
                    DecisionTaken(
                        decision_id="dec-000042",
                        job_id=JOB,
                        action="germinate",
                        outcome="applied",
                        reason="loaded into seed 0",
                        layer="layer1",
                        seed=0,
                    )
                ],
            ),
            TelemetryReport(
                job_id=JOB,
                epoch=0,
                step=40,
                kind="step",
                train_loss=None,
                nonfinite=["train_loss"],
            ),
        ],
        TelemetryReportV2: [
            TelemetryReportV2(
                job_id=JOB,
                epoch=3,
                step=1200,
                kind="epoch",
                val_accuracy=0.87,
                layers=[LayerStatsV2(layer="layer1", grad_norm=0.034)],
                decision_point=True,
            )
        ],
        TelemetryReportV1: [
            TelemetryReportV1(
                job_id=JOB, epoch=3, step=1200, kind="epoch", train_loss=0.412, val_accuracy=0.87
            )
        ],
        ControlAnswer: [
            ControlAnswer(
                job_id=JOB,
                epoch=3,
                step=1200,
                kind="epoch",
                decisions=[
                    ControlDecision(
                        decision_id="dec-000046",
                        job_id=JOB,
                        action="germinate",
                        layer="layer1",
                        blueprint="low_rank",
                        ramp_steps=200,
                        reason="validation loss plateaued for 3 epochs",
                    )
                ],
                note="germinating: validation loss plateaued for 3 epochs",
            ),
            ControlAnswer(
                job_id=JOB, epoch=1, step=400, kind="epoch", note="warming up: epoch 1 of 3"
            ),
        ],
        DecisionPointMissed: [
            DecisionPointMissed(
                job_id=JOB, epoch=3, step=1200, kind="epoch", reason="timeout", waited_s=30.0
            )
        ],
        ControlDecision: [
            ControlDecision(
                decision_id="dec-000042",
                job_id=JOB,
                action="germinate",
                layer="layer1",
                blueprint="low_rank",
                blend="add",
                strategy="diversify",
                ramp_steps=200,
                alpha=1.0,
                reason="validation loss plateaued for 3 epochs",
                evidence={"plateau_epochs": 3, "val_loss_slope": -0.0004, "strategy": "diversify"},
            ),
            ControlDecision(
                decision_id="dec-000043",
                job_id=JOB,
                action="set_alpha",
                layer="layer1",
                seed=0,
                alpha=0.7,
                ramp_steps=0,
                reason="operator request",
            ),
            ControlDecision(
                decision_id="dec-000044",
                job_id=JOB,
                action="retire",
                layer="layer1",
                seed=0,
                ramp_steps=50,
                reason="contribution -0.003 after a 2-epoch window",
                evidence={"contribution": -0.003, "window_epochs": 2},
            ),
        ],
        Heartbeat: [
            Heartbeat(
                service="tamiyo",
                instance="tamiyo-0:4711",
                status="ok",
                started_at=1_764_000_000.0,
                interval_s=5.0,
                details={"consumers": 2, "lag": 0, "redis": True},
            )
        ],
        SeedTransition: [
            SeedTransition(
                job_id=JOB,
                layer="layer1",
                seed=0,
                from_state="LOADING",
                to_state="ACTIVE",
                reason="kernel loaded",
                kernel_id=KERNEL,
                step=1200,
                occurred_at=1_764_000_123.5,
            )
        ],
        JobStatusChanged: [
            JobStatusChanged(job_id=JOB, status="RUNNING", previous="PENDING", attempt=1),
            JobStatusChanged(
                job_id=JOB,
                status="FAILED",
                previous="RUNNING",
                error="CUDA out of memory",
                attempt=2,
            ),
            JobStatusChanged(
                job_id=JOB,
                status="SUCCEEDED",
                previous="RUNNING",
                attempt=1,
                metrics=JobMetrics(
                    train_loss=0.21,
                    val_loss=0.31,
                    val_accuracy=0.89,
                    test_loss=0.33,
                    test_accuracy=0.88,
                    samples_per_s=5120.5,
                    best_epoch=7,
                    best_val_accuracy=0.91,
                    best_test_accuracy=0.9,
                    parameters=13_824,
                    train_flops=4.2e12,
                ),
            ),
        ],
        JobStatusChangedV1: [
            JobStatusChangedV1(job_id=JOB, status="SUCCEEDED", previous="RUNNING", attempt=1)
        ],
        KernelReady: [
            KernelReady(
                kernel_id=KERNEL,
                name="low_rank",
                blueprint="low_rank",
                format="export",
                host=HostSignature(kind="linear", in_features=16, out_features=32),
                digest=DIGEST,
                params=384,
                flops=768,
                tags=["efficiency_kernel_v1"],
            ),
            KernelReady(
                kernel_id="krn_89abcdef0123456789abcdef",
                name="widen",
                blueprint="widen",
                format="export",
                host=HostSignature(kind="linear", in_features=16, out_features=32).widening(
                    HostSignature(kind="linear", in_features=32, out_features=10)
                ),
                digest=DIGEST,
                params=442,
                flops=832,
            ),
        ],
        KernelReadyV1: [
            KernelReadyV1(
                kernel_id=KERNEL,
                name="low_rank",
                blueprint="low_rank",
                format="export",
                host=HostSignatureV1(kind="linear", in_features=16, out_features=32),
                digest=DIGEST,
                params=384,
                flops=768,
                tags=["efficiency_kernel_v1"],
            )
        ],
        DecisionTaken: [
            DecisionTaken(
                decision_id="dec-000042",
                job_id=JOB,
                action="germinate",
                outcome="applied",
                reason="loaded into seed 0",
                layer="layer1",
                seed=0,
            ),
            DecisionTaken(
                decision_id="dec-000045",
                job_id=JOB,
                action="germinate",
                outcome="refused",
                code="no_free_slot",
                reason="no free seed slot in layer 'layer1' (slots: ACTIVE, ACTIVE)",
                layer="layer1",
            ),
        ],
        DecisionTakenV1: [
            DecisionTakenV1(
                decision_id="dec-000042",
                job_id=JOB,
                action="germinate",
                outcome="applied",
                reason="loaded into seed 0",
                layer="layer1",
                seed=0,
            ),
            DecisionTakenV1(
                decision_id="dec-000045",
                job_id=JOB,
                action="germinate",
                outcome="refused",
                reason="no free seed slot in layer1",
                layer="layer1",
            ),
        ],
        JobQueued: [JobQueued(job_id=JOB)],
    }
