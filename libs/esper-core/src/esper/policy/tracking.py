"""Bookkeeping: what a job's telemetry, its events and the decisions sent to it mean for the
job's controller state. Pure functions, no I/O; any policy builds on them.

Telemetry and events travel on different streams, so they can be handled out of order (and by
different replicas). The rules here are written so that either order gives the same state:

- a report at or before the last epoch already handled is a duplicate or late, and is ignored;
- a seed the job answered `applied` for is tracked from that answer, even before telemetry lists
  it; a tracked seed counts as gone only when an epoch report that no longer lists it follows one
  that did, or when its transition to DORMANT arrives;
- a transition older than the last one applied to a seed, or about another kernel, is ignored.

A job that asks at decision points (`TelemetryReport.decision_point`) is read from its points
alone, so that what the policy sees at a point depends on the job's reports only, never on when
the other messages happened to arrive:

- the job's answers to decisions travel in its next report (`answers`), applied before it, in
  the job's order; the same DecisionTaken on the events stream, before or after, changes nothing
  the second time (`_answer` matches a decision once);
- a point report lists every live seed, as it is after the decisions of the previous point were
  executed, so a tracked seed it does not list is gone; SeedTransition events, which say the
  same thing at times that depend on the machine's load, are ignored;
- its other reports (sampled steps, sent lossily, and the last epoch's, which asks nothing) do
  not change the state: which of them arrive depends on load. The layer scores the reports
  before its first point left are dropped then, for the same reason.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from esper.contracts import (
    ControlAnswer,
    ControlDecision,
    DecisionTaken,
    JobStatusChanged,
    Message,
    SeedStats,
    SeedTransition,
    TelemetryReport,
)
from esper.contracts.jobs import HostKind
from esper.policy import fitting
from esper.policy.config import PolicyConfig
from esper.policy.models import BlueprintRecord, JobState, LayerView, Origin, Pending, SeedTrack

MAX_RECENT_DECISIONS = 50
MAX_ALPHAS = 8
MAX_ANSWERS = 16
"""Answers to decision points kept per job: a job resumed from a checkpoint asks again the
points since it (an epoch's point is checkpointed with the epoch), seldom more than a few."""
ALPHA_TOLERANCE = 1e-3


def new_state(job_id: str) -> JobState:
    return JobState(job_id=job_id)


# ------------------------------------------------------------------ telemetry
def ingest_report(
    state: JobState,
    report: TelemetryReport,
    config: PolicyConfig,
    kernel_kinds: Mapping[str, HostKind],
) -> bool:
    """Apply one report; False when it is a duplicate, arrived after a later one, or is not a
    point of a job that asks at points (its answers are for `ingest_answers`)."""
    if not is_new(state, report) or (state.points and not report.decision_point):
        return False
    if report.decision_point and not state.points:
        _enter_points(state)
    _layers(state, report, config)
    _seeds(state, report, kernel_kinds, config)
    if report.decision_point or report.kind == "epoch":
        _departures(state, report)
    if report.kind == "step":
        state.last_step = report.step
        return True
    state.last_epoch = report.epoch
    if report.epoch == 0:
        state.known = True  # a job seen from its first report has been seen start
    _plateau(state, report, config)
    fitting.record(state, report, config)
    _ramps(state, report)
    _expire_pending(state, config)
    return True


def is_new(state: JobState, report: TelemetryReport) -> bool:
    """Whether `report` comes after every report handled (not a duplicate, not late)."""
    if state.last_epoch is not None and report.epoch <= state.last_epoch:
        return False
    return not (
        report.kind == "step" and state.last_step is not None and report.step <= state.last_step
    )


def ingest_answers(state: JobState, answers: Sequence[DecisionTaken], config: PolicyConfig) -> bool:
    """Apply the job's answers that a report carries, in the job's order, exactly as their
    DecisionTaken events are: whichever copy comes first counts, the other changes nothing.
    Applied before the report itself, so the state at the report is the same whether the events
    stream was read before it or not. False when nothing changed."""
    changed = False
    for taken in answers:
        changed = _answer(state, taken, config) or changed
    return changed


def keep_answer(state: JobState, answer: ControlAnswer) -> None:
    """Remember the answer to a point (the last MAX_ANSWERS), to give it again if asked again."""
    answers = {**state.answers, answer.point: answer}
    state.answers = dict(list(answers.items())[-MAX_ANSWERS:])


def _enter_points(state: JobState) -> None:
    """The job's first decision point: from now on only its points feed the policy. The running
    layer scores are dropped: the sampled step reports they averaged may or may not have
    arrived (they are sent lossily), so they would make the first point's ranking depend on
    load."""
    state.points = True
    for view in state.layers.values():
        view.gradient_score = None
        view.gain_score = None
        view.bottleneck_score = None
        view.variance_score = None


def _layers(state: JobState, report: TelemetryReport, config: PolicyConfig) -> None:
    keep = config.signal_smoothing
    for order, stats in enumerate(report.layers):
        view = state.layers.get(stats.layer) or LayerView(order=order)
        view.order = order
        view.next_layer = stats.next_layer
        view.kind = stats.kind or view.kind  # v1/v2 reports do not say: learnt from kernels
        view.activation_mean = stats.activation_mean
        view.activation_variance = stats.activation_variance
        view.dead_fraction = stats.dead_fraction
        view.grad_norm = stats.grad_norm
        view.stats_step = report.step
        # A score is built only from measured values: a report without one leaves the running
        # average as it was, it never reads as a zero.
        live = None if stats.dead_fraction is None else 1.0 - stats.dead_fraction
        if live is not None and stats.grad_norm is not None:
            view.gradient_score = _smooth(view.gradient_score, stats.grad_norm * live, keep)
        if stats.growth_gain is not None:
            view.gain_score = _smooth(view.gain_score, stats.growth_gain, keep)
            if stats.grad_norm:
                ratio = stats.growth_gain / stats.grad_norm
                view.bottleneck_score = _smooth(view.bottleneck_score, ratio, keep)
        if live is not None and stats.activation_variance is not None:
            view.variance_score = _smooth(
                view.variance_score, stats.activation_variance * live, keep
            )
        state.layers[stats.layer] = view


def _smooth(previous: float | None, value: float, keep: float) -> float:
    return value if previous is None else keep * previous + (1.0 - keep) * value


def _seeds(
    state: JobState,
    report: TelemetryReport,
    kernel_kinds: Mapping[str, HostKind],
    config: PolicyConfig,
) -> None:
    for stats in report.seeds:
        track = state.track(stats.layer, stats.seed)
        if track is not None and _other_kernel(track.kernel_id, stats.kernel_id):
            _depart(state, track, "its slot now holds another kernel")
            track = None
        if track is None:
            track = SeedTrack(layer=stats.layer, seed=stats.seed, state=stats.state)
            state.seeds.append(track)
        _update(track, stats, report, config)
        layer = state.layers.get(stats.layer)
        kind = kernel_kinds.get(stats.kernel_id) if stats.kernel_id else None
        if layer is not None and layer.kind is None and kind is not None:
            layer.kind = kind


def _update(
    track: SeedTrack, stats: SeedStats, report: TelemetryReport, config: PolicyConfig
) -> None:
    track.state = stats.state
    track.alpha = stats.alpha
    track.kernel_id = stats.kernel_id or track.kernel_id
    track.blend = stats.blend
    track.error_count = stats.error_count
    if report.kind == "epoch":
        # Contributions are measured at the end of an epoch; step reports only repeat them.
        track.seen_epoch = report.epoch
        track.alphas = [*track.alphas, (report.epoch, stats.alpha)][-MAX_ALPHAS:]
        if stats.contribution is not None:
            track.contribution = stats.contribution
            track.contribution_epoch = report.epoch
            if track.verdict == "keep":
                # A kept seed is watched on: a run of low measurements judges it again. An
                # unmeasured epoch neither counts nor breaks the run.
                low = stats.contribution < config.rejudge_threshold
                track.low_epochs = track.low_epochs + 1 if low else 0


def _other_kernel(tracked: str | None, reported: str | None) -> bool:
    return tracked is not None and reported is not None and tracked != reported


def _plateau(state: JobState, report: TelemetryReport, config: PolicyConfig) -> None:
    state.val_accuracy = report.val_accuracy
    state.val_loss = report.val_loss
    if report.val_loss is None:
        return  # not measured: neither an improvement nor a stall
    if state.best_val_loss is None or report.val_loss < state.best_val_loss - config.min_delta:
        state.best_val_loss = report.val_loss
        state.stale_epochs = 0
    else:
        state.stale_epochs += 1


def restart_plateau(state: JobState) -> None:
    """After a germination or a verdict the model is a new one: a plateau must form anew, and
    a train_loss stall is measured from here."""
    state.best_val_loss = state.val_loss
    state.stale_epochs = 0
    state.model_epoch = state.last_epoch


def _departures(state: JobState, report: TelemetryReport) -> None:
    """A seed an epoch report listed before and this one does not is gone. A point report is
    complete (every live seed, after every decision answered before it): any seed it does not
    list is gone, even one only an answer told of."""
    listed = {(s.layer, s.seed) for s in report.seeds}
    for track in list(state.seeds):
        seen = report.decision_point or track.seen_epoch is not None
        if seen and (track.layer, track.seed) not in listed:
            where = f"epoch {report.epoch}" if report.kind == "epoch" else f"point {report.point}"
            _depart(state, track, f"{where} reports its slot DORMANT")


def _ramps(state: JobState, report: TelemetryReport) -> None:
    for track in state.seeds:
        if track.ramp_done_epoch is None and track.seen_epoch == report.epoch and _ramped(track):
            track.ramp_done_epoch = report.epoch


def _ramp_end(track: SeedTrack) -> int | None:
    """The first epoch of the latest run of reports showing the seed at its target α."""
    if not _ramped(track):
        return None
    assert track.target_alpha is not None
    end = None
    for epoch, alpha in reversed(track.alphas):
        if alpha < track.target_alpha - ALPHA_TOLERANCE:
            break
        end = epoch
    return end


def _ramped(track: SeedTrack) -> bool:
    return (
        track.target_alpha is not None
        and track.state == "ACTIVE"
        and track.alpha >= track.target_alpha - ALPHA_TOLERANCE
    )


def _expire_pending(state: JobState, config: PolicyConfig) -> None:
    pending = state.pending
    if pending is None or state.last_epoch is None:
        return
    since = -1 if pending.epoch is None else pending.epoch
    if state.last_epoch - since >= config.decision_timeout_epochs:
        # Lost, or the job is stuck: either way not the blueprint's fault; wait, then go on.
        state.pending = None
        state.abandoned = pending
        state.cooldown_until = state.last_epoch + config.cooldown_epochs
        state.note = (
            f"germination {pending.decision_id} unanswered after "
            f"{config.decision_timeout_epochs} epoch reports: given up"
        )


def _depart(state: JobState, track: SeedTrack, why: str) -> None:
    """The seed left its slot (DORMANT): forget it; charge its blueprint if it left before
    Tamiyo retired it."""
    state.seeds.remove(track)
    layer = state.layers.get(track.layer)
    if layer is not None:
        layer.full = False
    if track.origin == "unknown" or track.verdict == "retire":
        return
    if layer is not None:
        layer.failures += 1
    if track.blueprint is not None:
        _record(state, track.blueprint).failures += 1
    state.note = f"seed {track.seed} of layer {track.layer!r} failed: {why}"


def _record(state: JobState, blueprint: str) -> BlueprintRecord:
    return state.blueprints.setdefault(blueprint, BlueprintRecord())


# --------------------------------------------------------------------- events
def ingest_event(state: JobState, message: Message, config: PolicyConfig) -> bool:
    """Apply one event; False when it changes nothing."""
    if isinstance(message, SeedTransition):
        return _transition(state, message)
    if isinstance(message, DecisionTaken):
        return _answer(state, message, config)
    if isinstance(message, JobStatusChanged):
        state.status = message.status
        if message.status == "RUNNING":
            state.known = True
        if state.finished:
            state.pending = None
        return True
    return False


def _transition(state: JobState, event: SeedTransition) -> bool:
    if state.points:
        return False  # its next point report says the same, at a place that does not vary
    track = state.track(event.layer, event.seed)
    if track is not None:
        if _other_kernel(track.kernel_id, event.kernel_id):
            return False  # about the slot's previous kernel
        if event.step is not None and track.last_step is not None and event.step < track.last_step:
            return False
    if event.to_state == "DORMANT":
        layer = state.layers.get(event.layer)
        if layer is not None:
            layer.full = False
        if track is not None:
            _depart(state, track, event.reason)
        return True
    if track is None:
        track = SeedTrack(layer=event.layer, seed=event.seed, state=event.to_state)
        state.seeds.append(track)
    track.state = event.to_state
    track.kernel_id = event.kernel_id or track.kernel_id
    track.last_step = event.step if event.step is not None else track.last_step
    return True


def _answer(state: JobState, event: DecisionTaken, config: PolicyConfig) -> bool:
    if event.action != "germinate":
        return False
    pending = state.pending
    late = state.abandoned
    if pending is not None and pending.decision_id == event.decision_id:
        state.pending = None
    elif late is not None and late.decision_id == event.decision_id:
        # Given up on, yet answered after all (a backlog of telemetry was read first, say).
        state.abandoned = None
        if event.outcome != "applied":
            return True  # its cooldown was served when it was given up
        pending = late
    else:
        return False
    if event.outcome == "applied" and event.seed is not None:
        track = state.track(event.layer, event.seed)
        if track is None:
            track = SeedTrack(layer=event.layer, seed=event.seed, state="ACTIVE")
            state.seeds.append(track)
        track.origin = pending.origin
        track.decision_id = pending.decision_id
        track.blueprint = pending.blueprint
        track.target_alpha = pending.target_alpha
        track.germinated_epoch = pending.epoch
        track.verdict = None
        # Telemetry may have listed the seed before this answer arrived: date the ramp's end
        # by what those reports said.
        track.ramp_done_epoch = _ramp_end(track)
        state.note = f"germination {event.decision_id} applied: {event.reason}"
        return True
    _refused(state, pending, event, config)
    return True


def _refused(state: JobState, pending: Pending, event: DecisionTaken, config: PolicyConfig) -> None:
    """A refusal for want of room, or because the job grows no seeds, is not the blueprint's
    fault; anything else is charged to it. Decided by the refusal's code alone: its reason is
    for people, and rewording it must not change what the policy does."""
    if event.transient:
        _not_now(state, pending, event, config)
        return
    layer = state.layers.get(pending.layer)
    match event.code:
        case "no_free_slot":
            if layer is not None:
                layer.full = True
        case "max_seeds":
            state.seed_cap = state.live_seeds()
        case "morphogenesis_off":
            state.morphogenesis_off = True
        case _:
            if pending.blueprint is not None:
                _record(state, pending.blueprint).failures += 1
    state.cooldown_until = (state.last_epoch if state.last_epoch is not None else -1) + (
        config.cooldown_epochs
    )
    state.note = f"germination {pending.decision_id} refused ({event.code}): {event.reason}"


def _not_now(state: JobState, pending: Pending, event: DecisionTaken, config: PolicyConfig) -> None:
    """A refusal that may pass (Urza unreachable until the job's deadline): the germination never
    happened. Nobody is charged, the blueprint counts as not tried (diversify picks it again) and
    the plateau that called for growth stands again, so after `retry_cooldown_epochs` the same
    growth is decided anew."""
    if pending.blueprint is not None:
        record = _record(state, pending.blueprint)
        record.tried = max(0, record.tried - 1)
    before = pending.best_val_loss
    improved = (
        before is not None
        and state.best_val_loss is not None
        and state.best_val_loss < before - config.min_delta
    )
    if before is not None and not improved:
        # Reports read since the germination went on counting from its restart: add them.
        state.best_val_loss = before
        state.stale_epochs = pending.stale_epochs + state.stale_epochs
    state.model_epoch = pending.model_epoch  # the model did not change
    state.cooldown_until = (state.last_epoch if state.last_epoch is not None else -1) + (
        config.retry_cooldown_epochs
    )
    state.note = (
        f"germination {pending.decision_id} refused for now ({event.code}): {event.reason}; "
        f"deciding again after epoch {state.cooldown_until}"
    )


def under_evaluation(state: JobState) -> SeedTrack | None:
    """The seed in flight: grown from a blueprint by Tamiyo or an operator, not judged yet."""
    waiting = [t for t in state.seeds if t.verdict is None and judged_by_tamiyo(t)]
    return min(waiting, key=lambda t: (t.layer, t.seed)) if waiting else None


def judged_by_tamiyo(track: SeedTrack) -> bool:
    """Grown from a blueprint by Tamiyo or an operator. A kernel an operator hot-swapped in (no
    blueprint) is the operator's to judge."""
    return track.origin == "tamiyo" or (track.origin == "operator" and track.blueprint is not None)


# ------------------------------------------------------------------ decisions
def register_decision(
    state: JobState, decision: ControlDecision, origin: Origin, config: PolicyConfig
) -> None:
    """What publishing `decision` changes in the state (Tamiyo's decisions and operators')."""
    epoch = state.last_epoch
    if decision.action == "germinate":
        state.pending = Pending(
            decision_id=decision.decision_id,
            layer=decision.layer,
            seed=decision.seed,
            blueprint=decision.blueprint,
            kernel=decision.kernel,
            origin=origin,
            epoch=epoch,
            target_alpha=decision.alpha if decision.alpha is not None else 1.0,
            best_val_loss=state.best_val_loss,
            stale_epochs=state.stale_epochs,
            model_epoch=state.model_epoch,
        )
        state.germinations += 1
        if decision.blueprint is not None:
            _record(state, decision.blueprint).tried += 1
        restart_plateau(state)
    elif decision.seed is not None:
        track = state.track(decision.layer, decision.seed)
        if track is not None:
            _judged(state, track, decision, epoch, config)
    state.decisions = [*state.decisions, decision.decision_id][-MAX_RECENT_DECISIONS:]


def _judged(
    state: JobState,
    track: SeedTrack,
    decision: ControlDecision,
    epoch: int | None,
    config: PolicyConfig,
) -> None:
    if decision.action == "set_alpha":
        track.target_alpha = decision.alpha
        if track.verdict is None:
            track.ramp_done_epoch = None  # the evaluation window starts after the new ramp
        return
    if track.origin == "unknown":
        track.origin = "operator"  # an operator's verdict adopts a seed Tamiyo did not know
    if track.verdict is None and track.decision_id is not None and track.blueprint is not None:
        _count_payment(state, track, decision, config)
    track.verdict = "keep" if decision.action == "keep" else "retire"
    track.low_epochs = 0
    track.verdict_epoch = epoch
    restart_plateau(state)
    if track.blueprint is not None:
        record = _record(state, track.blueprint)
        record.last_contribution = track.contribution
        if track.contribution is not None and (
            record.best_contribution is None or track.contribution > record.best_contribution
        ):
            record.best_contribution = track.contribution
        if decision.action == "keep":
            record.kept += 1
        else:
            record.retired += 1
            record.failures += 1
    if decision.action == "retire":
        state.cooldown_until = (epoch if epoch is not None else -1) + config.cooldown_epochs
        layer = state.layers.get(track.layer)
        if layer is not None:
            layer.failures += 1


def _count_payment(
    state: JobState, track: SeedTrack, decision: ControlDecision, config: PolicyConfig
) -> None:
    """A germination's first verdict: did the capacity pay? Retired, or kept below
    keep_threshold (an operator's keep), it did not; kept at or above it, it did and the run of
    unpaid ones ends. A keep without a measurement says nothing either way."""
    contribution = track.contribution
    if decision.action == "retire" or (
        contribution is not None and contribution < config.keep_threshold
    ):
        state.unpaid_germinations += 1
    elif contribution is not None:
        state.unpaid_germinations = 0
