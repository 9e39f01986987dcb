"""TelemetryReporter: hooks only on sampled steps, exact statistics, reports that fit the
contract."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn
from torch.overrides import TorchFunctionMode

import esper
from esper.contracts import Envelope
from esper.contracts.telemetry import TelemetryReport
from esper.exceptions import ConfigError
from esper.training import TelemetryReporter

JOB = "job-7"


class TorchCalls(TorchFunctionMode):
    """Records every torch function and tensor method called while active."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        self.calls.append(getattr(func, "__name__", repr(func)))
        return func(*args, **(kwargs or {}))


def reporter_for(
    model: nn.Module, every_steps: int | None = 2, **wrap: Any
) -> tuple[esper.MorphableModel, TelemetryReporter, list[TelemetryReport]]:
    morphable = esper.wrap(model, **wrap)
    published: list[TelemetryReport] = []
    return (
        morphable,
        TelemetryReporter(morphable, JOB, published.append, every_steps=every_steps),
        published,
    )


def hooks(morphable: nn.Module) -> int:
    return sum(len(m._forward_hooks) for m in morphable.modules())


def training_step(
    morphable: esper.MorphableModel,
    reporter: TelemetryReporter,
    optimizer: torch.optim.Optimizer,
    step: int,
    x: torch.Tensor,
    y: torch.Tensor,
) -> tuple[torch.Tensor, TelemetryReport | None]:
    optimizer.zero_grad()
    reporter.begin_step(step)
    loss = nn.functional.cross_entropy(morphable(x), y)
    loss.backward()
    report = reporter.end_step(step, 0, loss)
    optimizer.step()
    morphable.step()
    return loss, report


def batch(n: int = 32, d: int = 16, classes: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    return torch.randn(n, d, generator=g), torch.randint(0, classes, (n,), generator=g)


# -------------------------------------------------------------------------- sampled steps
def test_sampled_steps_publish_exact_layer_statistics(mlp: nn.Module) -> None:
    morphable, reporter, published = reporter_for(mlp, every_steps=2)
    optimizer = torch.optim.SGD(morphable.parameters(), lr=0.1)
    x, y = batch()

    for step in range(4):
        with torch.no_grad():  # what the hooks should see, computed independently
            h = morphable.layer("layer1")(x)
            expected = {"layer1": h, "layer2": morphable.layer("layer2")(torch.relu(h))}
        loss, report = training_step(morphable, reporter, optimizer, step, x, y)
        if step % 2:
            assert report is None
            continue
        assert report is not None and report is published[-1]
        assert (report.kind, report.step, report.job_id) == ("step", step, JOB)
        assert report.train_loss == pytest.approx(loss.item())
        assert [s.layer for s in report.layers] == ["layer1", "layer2"]
        for stats in report.layers:
            out = expected[stats.layer]
            host = morphable.layer(stats.layer).base_layer
            grads = torch.cat([host.weight.grad.flatten(), host.bias.grad.flatten()])
            assert stats.activation_mean == pytest.approx(out.mean().item(), abs=1e-6)
            assert stats.activation_variance == pytest.approx(out.var(unbiased=False).item())
            never_positive = (out <= 0).all(dim=0).float().mean().item()
            assert stats.dead_fraction == pytest.approx(never_positive)
            assert stats.grad_norm == pytest.approx(torch.linalg.vector_norm(grads).item())
            assert stats.grad_norm > 0
        assert report.seeds == [] and report.nonfinite == []
        assert hooks(morphable) == 0  # removed by end_step

    assert [r.step for r in published] == [0, 2]


def test_non_sampled_steps_install_nothing_and_run_no_tensor_op(mlp: nn.Module) -> None:
    morphable, reporter, published = reporter_for(mlp, every_steps=3)
    x, y = batch()
    loss = nn.functional.cross_entropy(morphable(x), y)
    loss.backward()

    for step in (1, 2, 4, 5):
        with TorchCalls() as mode:
            reporter.begin_step(step)
            assert hooks(morphable) == 0
            assert reporter.end_step(step, 0, loss) is None
        assert mode.calls == []
    assert published == []

    never = reporter_for(type(mlp)(), every_steps=None)[1]
    with TorchCalls() as mode:
        for step in (0, 1, 100):
            never.begin_step(step)
            assert never.end_step(step, 0, loss) is None
    assert mode.calls == [] and hooks(never.morphable) == 0

    reporter.begin_step(3)  # sampled: the hooks are there until end_step
    assert hooks(morphable) == 2 and reporter.collecting
    reporter.cancel_step()
    assert hooks(morphable) == 0 and not reporter.collecting


def test_dead_fraction_counts_features_never_positive_in_the_batch() -> None:
    linear = nn.Sequential(nn.Linear(2, 4))
    conv = nn.Sequential(nn.Conv2d(1, 2, 1))
    with torch.no_grad():
        linear[0].weight.copy_(torch.tensor([[0.0, 0], [0, 0], [1, 0], [0, 1]]))
        linear[0].bias.copy_(torch.tensor([-1.0, 0.0, 0.0, 0.0]))  # unit 1: exactly 0 is dead
        conv[0].weight.fill_(1.0)
        conv[0].bias.copy_(torch.tensor([-10.0, 0.0]))
    linear_r = reporter_for(linear)[1]
    conv_r = reporter_for(conv)[1]

    x = torch.tensor([[-1.0, -1.0], [0.5, -2.0]])  # unit 3 never positive, unit 2 once
    [stats] = linear_r.sample_layers(x)
    assert stats.dead_fraction == pytest.approx(0.75)

    image = -torch.ones(3, 1, 4, 4)
    image[2, 0, 3, 1] = 1.0  # channel 1 is positive at one position of one sample: alive
    [stats] = conv_r.sample_layers(image)
    assert stats.dead_fraction == pytest.approx(0.5)
    assert stats.grad_norm is None  # no backward in a sampling pass: not measured, not 0


def test_a_layer_run_twice_in_a_step_is_measured_over_both_calls() -> None:
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(torch.tanh(self.fc(x)))

    morphable, reporter, _ = reporter_for(Twice())
    x = torch.randn(8, 4)
    with torch.no_grad():
        first = morphable.model.fc(x)
        both = torch.cat([first, morphable.model.fc(torch.tanh(first))])
    [stats] = reporter.sample_layers(x)
    assert stats.activation_mean == pytest.approx(both.mean().item(), abs=1e-6)
    assert stats.activation_variance == pytest.approx(both.var(unbiased=False).item(), rel=1e-5)


def test_conv_layers_report_finite_statistics(cnn: nn.Module) -> None:
    morphable, reporter, _ = reporter_for(cnn, every_steps=1)
    optimizer = torch.optim.SGD(morphable.parameters(), lr=0.01)
    x, y = torch.randn(4, 3, 8, 8), torch.randint(0, 5, (4,))
    _, report = training_step(morphable, reporter, optimizer, 0, x, y)
    assert report is not None
    assert [s.layer for s in report.layers] == ["features.0", "features.2", "head"]
    for stats in report.layers:
        values = [
            stats.activation_mean,
            stats.activation_variance,
            stats.dead_fraction,
            stats.grad_norm,
        ]
        assert all(v is not None for v in values), stats


def test_sample_layers_leaves_the_model_as_it_was() -> None:
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))
    morphable, reporter, _ = reporter_for(model)
    morphable.train()
    running = model[1].running_mean.clone()

    stats = reporter.sample_layers(torch.randn(16, 4) + 3.0)

    assert [s.layer for s in stats] == ["0", "3"]
    torch.testing.assert_close(model[1].running_mean, running)  # no BatchNorm update
    assert all(m.training for m in morphable.modules())
    assert hooks(morphable) == 0


# ------------------------------------------------------------------------------- epochs
async def test_epoch_report_lists_seeds_with_their_contribution(mlp: nn.Module) -> None:
    registry = esper.LocalKernelRegistry()
    meta = registry.compile("low_rank", mlp.layer1)
    morphable, reporter, published = reporter_for(
        mlp, every_steps=None, kernels=esper.KernelCache([registry])
    )
    await morphable.load_kernel("layer1", 0, meta.kernel_id, alpha=0.5)
    await morphable.load_kernel("layer1", 1, meta.kernel_id, blend="lerp", alpha=0.25)
    assert not reporter.has_layer_stats
    x, _ = batch()
    reporter.sample_layers(x)
    assert reporter.has_layer_stats

    report = reporter.epoch_report(
        epoch=2,
        step=40,
        train_loss=0.5,
        val_loss=0.6,
        val_accuracy=0.8,
        samples_per_s=1234.5,
        contributions={("layer1", 0): 0.03},
    )

    assert published == [report]
    assert (report.kind, report.epoch, report.step) == ("epoch", 2, 40)
    assert (report.train_loss, report.val_loss, report.val_accuracy) == (0.5, 0.6, 0.8)
    assert report.samples_per_s == 1234.5 and report.nonfinite == []
    measured, unmeasured = report.seeds
    assert (measured.layer, measured.seed, measured.state) == ("layer1", 0, "ACTIVE")
    assert (measured.alpha, measured.kernel_id, measured.blend) == (0.5, meta.kernel_id, "add")
    assert (measured.contribution, measured.error_count) == (0.03, 0)
    assert (unmeasured.seed, unmeasured.blend, unmeasured.alpha) == (1, "lerp", 0.25)
    assert unmeasured.contribution is None  # never measured: missing, not 0
    assert [s.layer for s in report.layers] == ["layer1", "layer2"]
    assert all(s.activation_mean is not None and s.grad_norm is None for s in report.layers)

    # the window is the epoch: the next report does not repeat stale layer statistics
    assert not reporter.has_layer_stats
    later = reporter.epoch_report(3, 60, 0.4, None, None, None, None)
    assert later.layers == [] and later.val_loss is None and later.nonfinite == []
    morphable.record_contribution("layer1", 1, -0.01)  # measured elsewhere: read from the model
    assert [s.contribution for s in later.seeds] == [None, None]
    assert [s.contribution for s in reporter.seed_stats()] == [None, pytest.approx(-0.01)]


# -------------------------------------------------------------------- contract and NaN
def test_reports_round_trip_through_the_bus_envelope(mlp: nn.Module) -> None:
    morphable, reporter, published = reporter_for(mlp, every_steps=1)
    optimizer = torch.optim.SGD(morphable.parameters(), lr=0.1)
    x, y = batch()
    training_step(morphable, reporter, optimizer, 0, x, y)
    reporter.epoch_report(0, 1, 1.0, 1.1, 0.25, 100.0, {})

    for report in published:
        assert TelemetryReport.model_validate_json(report.model_dump_json()) == report
        raw = Envelope.wrap(report, source="tolaria").encode()
        decoded = Envelope.decode(raw)
        assert decoded.message() == report and decoded.job_id == JOB


def test_non_finite_values_are_reported_as_non_finite(mlp: nn.Module) -> None:
    morphable, reporter, published = reporter_for(mlp, every_steps=1)
    optimizer = torch.optim.SGD(morphable.parameters(), lr=0.1)
    x, y = batch()
    x[0, 0] = float("nan")

    _, report = training_step(morphable, reporter, optimizer, 0, x, y)

    assert report is not None
    assert report.train_loss is None and report.nonfinite == ["train_loss"]
    assert all(s.activation_mean is None and s.grad_norm is None for s in report.layers)
    epoch = reporter.epoch_report(0, 1, float("nan"), float("inf"), None, 10.0, None)
    assert epoch.nonfinite == ["train_loss", "val_loss"]
    assert (epoch.train_loss, epoch.val_loss, epoch.val_accuracy) == (None, None, None)
    for report in published:  # still valid on the wire
        assert Envelope.decode(Envelope.wrap(report, source="tolaria").encode()).message() == report


def test_a_failing_publisher_does_not_stop_training(mlp: nn.Module) -> None:
    def broken(report: TelemetryReport) -> None:
        raise ConnectionError("bus down")

    morphable = esper.wrap(mlp)
    reporter = TelemetryReporter(morphable, JOB, broken, every_steps=1)
    optimizer = torch.optim.SGD(morphable.parameters(), lr=0.1)
    x, y = batch()
    _, report = training_step(morphable, reporter, optimizer, 0, x, y)
    assert report is not None and reporter.publish_errors == 1
    assert hooks(morphable) == 0


def test_every_steps_must_be_positive(mlp: nn.Module) -> None:
    with pytest.raises(ConfigError, match="every_steps"):
        TelemetryReporter(esper.wrap(mlp), JOB, lambda r: None, every_steps=0)
