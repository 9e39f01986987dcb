"""The policy interface and the heuristic policy.

A `Policy` sees a job's controller state, already updated by the bookkeeping (tracking.py) with
the message that just arrived, and proposes zero or more decisions. It may update the state's
`note`; everything else about a decision (its id, recording it, publishing it) is the
controller's. A learned policy implements the same two methods.

The heuristic policy, at each epoch report of a job:

1. judges a seed it (or an operator) germinated once the seed has trained `evaluation_epochs`
   epochs at its full α: keep when its measured contribution is at least `keep_threshold`,
   retire otherwise; and judges a kept seed again, retiring it when its contribution stays
   below `rejudge_threshold` for `rejudge_epochs` epoch reports in a row;
2. otherwise germinates when every gate is open: the job is known and running with
   morphogenesis on, past `warmup_epochs`, no germination in flight, growth still paying (fewer
   than `max_unpaid_germinations` unpaid in a row), not cooling down, under its seed caps, not
   overfitting (fitting.py), and it underfits: its val_loss has plateaued (`patience`,
   `min_delta`) or its train_loss has stalled (`train_stall_epochs`, `train_stall_delta`).
   The layer is the best ranked by the layer signal that has a free slot and a blueprint that
   fits; the blueprint is picked by strategy.

Each proposal says why, with the evidence that triggered it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field

from esper.contracts import Action, Blend, Message, Scalar, TelemetryReport
from esper.contracts.control import Strategy
from esper.policy.choice import BlueprintInfo, choose_blueprint, rank_layers
from esper.policy.config import PolicyConfig
from esper.policy.fitting import (
    Bottleneck,
    Stall,
    narrow_layer,
    overfit_note,
    train_progress,
    train_stall,
)
from esper.policy.models import JobState, SeedTrack
from esper.policy.tracking import judged_by_tamiyo, under_evaluation


@dataclass(frozen=True)
class Context:
    config: PolicyConfig
    catalogue: Sequence[BlueprintInfo]
    catalogue_source: str = "urza"
    """`urza`, or `builtin` when Urza could not be asked (its built-ins are in every Urza)."""


@dataclass(frozen=True)
class Proposal:
    """A decision without its id: the controller derives the id from the triggering message."""

    action: Action
    layer: str
    reason: str
    seed: int | None = None
    blueprint: str | None = None
    blend: Blend | None = None
    strategy: Strategy | None = None
    ramp_steps: int = 0
    alpha: float | None = None
    evidence: dict[str, Scalar] = field(default_factory=dict)


class Policy(ABC):
    name: str

    @abstractmethod
    def on_report(
        self, state: JobState, report: TelemetryReport, context: Context
    ) -> list[Proposal]:
        """Called after an epoch report was applied to `state`."""

    def on_event(self, state: JobState, event: Message, context: Context) -> list[Proposal]:
        """Called after an event was applied to `state`; the heuristic decides on reports only."""
        return []


class HeuristicPolicy(Policy):
    name = "heuristic"

    def on_report(
        self, state: JobState, report: TelemetryReport, context: Context
    ) -> list[Proposal]:
        config = context.config
        blocked = self._blocked(state, config)
        if blocked is not None:
            state.note = blocked
            return []
        verdict = self._judge(state, report, config)
        verdicts = [verdict] if isinstance(verdict, Proposal) else []
        verdicts += _rejudge(state, report, config)
        if verdicts:
            return verdicts
        if isinstance(verdict, str):
            state.note = verdict
            return []
        gate = self._gate(state, report, config)
        if isinstance(gate, str):
            state.note = gate
            return []
        return self._germinate(state, report, context, gate)

    # ------------------------------------------------------------------ gates
    @staticmethod
    def _blocked(state: JobState, config: PolicyConfig) -> str | None:
        if not config.enabled:
            return "policy disabled: watching only"
        if not state.known:
            return (
                "unknown job: Tamiyo has not seen it start (no RUNNING event, no epoch-0 "
                "report); no decision for it"
            )
        if state.finished:
            return f"job {state.status}: no more decisions"
        return None

    @staticmethod
    def _gate(
        state: JobState, report: TelemetryReport, config: PolicyConfig
    ) -> str | Stall | Bottleneck | None:
        """Why not germinate now; else what calls for growth: the plateau (None), a stalled
        train_loss, or a layer too narrow for what the loss asks of it."""
        epoch = report.epoch
        if state.morphogenesis_off:
            return "the job refused a germination: its morphogenesis is off"
        if state.pending is not None:
            return f"germination {state.pending.decision_id} in flight: waiting for the job"
        judging = under_evaluation(state)
        if judging is not None:
            return f"seed {judging.seed} of layer {judging.layer!r} in flight: " + _progress(
                judging, config
            )
        if epoch < config.warmup_epochs:
            return f"warming up: epoch {epoch} < warmup_epochs {config.warmup_epochs}"
        if state.unpaid_germinations >= config.max_unpaid_germinations:
            return (
                f"growth stopped: the last {state.unpaid_germinations} germinations did not pay "
                f"(retired, or kept below keep_threshold {config.keep_threshold}); "
                f"max_unpaid_germinations {config.max_unpaid_germinations} reached, no more "
                "germination for this job"
            )
        if state.cooldown_until is not None and epoch <= state.cooldown_until:
            return f"cooling down until after epoch {state.cooldown_until}"
        live = state.live_seeds()
        if live >= config.max_seeds_per_job:
            return f"{live} live seeds: max_seeds_per_job {config.max_seeds_per_job} reached"
        if state.seed_cap is not None and live >= state.seed_cap:
            return f"{live} live seeds: the job's own max_seeds ({state.seed_cap}) reached"
        if report.val_loss is None:
            return "val_loss not measured in this report: no plateau decision on a missing value"
        if state.overfit is not None:
            return overfit_note(state.overfit)
        if state.stale_epochs >= config.patience:
            return None
        stall = train_stall(state, config)
        if stall is not None:
            return stall
        narrow = narrow_layer(state, config)
        if narrow is not None:
            return narrow
        return (
            f"no plateau: {state.stale_epochs} of {config.patience} epochs without a val_loss "
            f"better than {state.best_val_loss} by {config.min_delta}; "
            f"{train_progress(state, config)}"
        )

    # -------------------------------------------------------------- verdicts
    @staticmethod
    def _judge(
        state: JobState, report: TelemetryReport, config: PolicyConfig
    ) -> Proposal | str | None:
        """The verdict on the seed in flight; a note when it is due but cannot be made yet."""
        track = under_evaluation(state)
        if track is None or track.ramp_done_epoch is None or track.state != "ACTIVE":
            return None
        if report.epoch < track.ramp_done_epoch + config.evaluation_epochs:
            return None
        if track.contribution is None or track.contribution_epoch != report.epoch:
            return (
                f"seed {track.seed} of layer {track.layer!r}: evaluation window over, but this "
                "report has no measured contribution; waiting for one"
            )
        keep = track.contribution >= config.keep_threshold
        comparison = "≥" if keep else "<"
        evidence: dict[str, Scalar] = {
            "contribution": track.contribution,
            "keep_threshold": config.keep_threshold,
            "epoch": report.epoch,
            "ramp_done_epoch": track.ramp_done_epoch,
            "evaluation_epochs": config.evaluation_epochs,
            "alpha": track.alpha,
            "blueprint": track.blueprint,
            "kernel_id": track.kernel_id,
            "val_accuracy": report.val_accuracy,
            "val_loss": report.val_loss,
        }
        reason = (
            f"seed {track.seed} of layer {track.layer!r} ({track.blueprint or track.kernel_id}) "
            f"contributes {track.contribution:+.4f} validation accuracy (with vs α forced to 0) "
            f"after {config.evaluation_epochs} epochs at full α: {comparison} keep_threshold "
            f"{config.keep_threshold}"
        )
        if keep:
            return Proposal("keep", track.layer, reason, seed=track.seed, evidence=evidence)
        return Proposal(
            "retire",
            track.layer,
            reason,
            seed=track.seed,
            ramp_steps=config.retire_ramp_steps,
            evidence=evidence,
        )

    # ----------------------------------------------------------- germination
    @staticmethod
    def _germinate(
        state: JobState,
        report: TelemetryReport,
        context: Context,
        trigger: Stall | Bottleneck | None,
    ) -> list[Proposal]:
        config = context.config
        stall = trigger if isinstance(trigger, Stall) else None
        narrow = trigger if isinstance(trigger, Bottleneck) else None
        why = "plateau" if trigger is None else "train_loss stalled" if stall else "narrow layer"
        ranking = rank_layers(state, config)
        if narrow is not None:  # the narrow layer itself, wherever the signal ranks it
            ranking.layers[:] = [r for r in ranking.layers if r.name == narrow.layer]
        if not ranking.layers:
            excluded = ", ".join(f"{n}: {cause}" for n, cause in ranking.excluded.items())
            state.note = f"{why}, but no layer can take a seed ({excluded or 'no layers seen'})"
            return []
        for position, ranked in enumerate(ranking.layers):
            kind = state.layers[ranked.name].kind
            widenable = state.layers[ranked.name].next_layer is not None
            choice = choose_blueprint(state, kind, context.catalogue, config, widenable)
            if choice is None:
                continue
            blueprint = choice.blueprint
            runner_up = ranking.layers[position + 1] if position + 1 < len(ranking.layers) else None
            evidence: dict[str, Scalar] = {
                "epoch": report.epoch,
                "val_loss": report.val_loss,
                "best_val_loss": state.best_val_loss,
                "stale_epochs": state.stale_epochs,
                "patience": config.patience,
                "min_delta": config.min_delta,
                "layer_signal": ranking.signal,
                "layer_score": ranked.score,
                "layer_rank": position + 1,
                "runner_up_layer": runner_up.name if runner_up else None,
                "runner_up_score": runner_up.score if runner_up else None,
                "layer_kind": kind,
                "widens_into": state.layers[ranked.name].next_layer if blueprint.widens else None,
                "layer_failures": state.layers[ranked.name].failures,
                "strategy": config.strategy,
                "catalogue": context.catalogue_source,
                "live_seeds": state.live_seeds(),
                "max_seeds_per_job": config.max_seeds_per_job,
                "train_loss": report.train_loss,
                "growth_trigger": (
                    "plateau" if trigger is None else "train_stall" if stall else "bottleneck"
                ),
                "unpaid_germinations": state.unpaid_germinations,
            }
            if narrow is not None:
                evidence |= {
                    "bottleneck_score": narrow.ratio,
                    "bottleneck_ratio": config.bottleneck_ratio,
                }
            if stall is not None:
                evidence |= {
                    "train_loss_from": stall.train_from,
                    "train_stall_epochs": stall.epochs,
                    "train_improvement": stall.improvement,
                    "train_stall_delta": config.train_stall_delta,
                }
            reason = (
                f"{_trigger(state, config, trigger)}; layer {ranked.name!r} ranks "
                f"{'first' if position == 0 else f'#{position + 1}'} by {ranking.signal} "
                f"({ranked.score:.4g}); blueprint {blueprint.name} — {choice.why}"
            )
            return [
                Proposal(
                    "germinate",
                    ranked.name,
                    reason,
                    seed=None,
                    blueprint=blueprint.name,
                    blend=config.blend or blueprint.default_blend,
                    strategy=config.strategy,
                    ramp_steps=config.ramp_steps,
                    alpha=config.target_alpha,
                    evidence=evidence,
                )
            ]
        state.note = f"{why}, but no blueprint fits the candidate layers (or all are penalised)"
        return []


def _trigger(state: JobState, config: PolicyConfig, trigger: Stall | Bottleneck | None) -> str:
    if trigger is None:
        return (
            f"val_loss plateaued ({state.stale_epochs} epochs without beating "
            f"{state.best_val_loss} by {config.min_delta})"
        )
    if isinstance(trigger, Bottleneck):
        return (
            f"underfitting: layer {trigger.layer!r} is narrow — new units there would get "
            f"{trigger.ratio:.2f}× the gradient of its own weights (≥ bottleneck_ratio "
            f"{config.bottleneck_ratio}), and not overfitting, before any val_loss plateau "
            f"({state.stale_epochs} of {config.patience} epochs)"
        )
    stall = trigger
    return (
        f"underfitting: train_loss stalled ({stall.train_from:.4g} → {stall.train_to:.4g}, "
        f"{stall.improvement:.1%} over {stall.epochs} epochs < train_stall_delta "
        f"{config.train_stall_delta:.1%}) and not overfitting, before any val_loss plateau "
        f"({state.stale_epochs} of {config.patience} epochs)"
    )


def _rejudge(state: JobState, report: TelemetryReport, config: PolicyConfig) -> list[Proposal]:
    """Retire every kept seed whose measured contribution stayed below rejudge_threshold for
    rejudge_epochs epoch reports in a row, this one included: capacity that stopped paying."""
    out = []
    for track in sorted(state.seeds, key=lambda t: (t.layer, t.seed)):
        if not (
            track.verdict == "keep"
            and judged_by_tamiyo(track)
            and track.state == "ACTIVE"
            and track.contribution is not None
            and track.contribution_epoch == report.epoch
            and track.low_epochs >= config.rejudge_epochs
        ):
            continue
        evidence: dict[str, Scalar] = {
            "contribution": track.contribution,
            "rejudge_threshold": config.rejudge_threshold,
            "rejudge_epochs": config.rejudge_epochs,
            "low_epochs": track.low_epochs,
            "kept_epoch": track.verdict_epoch,
            "epoch": report.epoch,
            "blueprint": track.blueprint,
            "kernel_id": track.kernel_id,
            "val_accuracy": report.val_accuracy,
            "val_loss": report.val_loss,
        }
        reason = (
            f"seed {track.seed} of layer {track.layer!r} ({track.blueprint or track.kernel_id}), "
            f"kept at epoch {track.verdict_epoch}, contributed below rejudge_threshold "
            f"{config.rejudge_threshold} for {track.low_epochs} epoch reports in a row "
            f"(now {track.contribution:+.4f} validation accuracy): it no longer pays"
        )
        out.append(
            Proposal(
                "retire",
                track.layer,
                reason,
                seed=track.seed,
                ramp_steps=config.retire_ramp_steps,
                evidence=evidence,
            )
        )
    return out


def _progress(track: SeedTrack, config: PolicyConfig) -> str:
    if track.ramp_done_epoch is None:
        return f"{track.state}, α {track.alpha:.3f} ramping to {track.target_alpha}"
    return (
        f"at full α since epoch {track.ramp_done_epoch}; judged after "
        f"{config.evaluation_epochs} epochs"
    )
