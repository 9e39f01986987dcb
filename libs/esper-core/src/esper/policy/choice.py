"""Where to grow and with what: the layer ranking and the blueprint choice by strategy.

The layer signal (services/tamiyo/README.md, "Which layer"): by default the host layer's
gradient norm × its live fraction (1 − dead_fraction), averaged over recent reports; for a layer
the job can widen, the gradient that new hidden units there would get (`LayerStats.growth_gain`)
instead. A layer the loss still pulls hard on at a plateau is one the optimizer cannot satisfy
with the units it has: that is where new capacity pays (the same reasoning GradMax-style growth
uses). Gradient norms are measured only on sampled training steps
(`training.telemetry_every_steps`); a job that reports per epoch only has none, and then the
layers are ranked by activation variance × live fraction instead — the decision's evidence
says which signal ranked them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from esper.contracts import Blend
from esper.contracts.jobs import HOST_KINDS
from esper.policy.config import PREFERENCE, PolicyConfig
from esper.policy.models import JobState


@dataclass(frozen=True)
class BlueprintInfo:
    """What the policy needs to know of a blueprint (from Urza's registry, or the built-ins)."""

    name: str
    hosts: tuple[str, ...]
    default_blend: Blend = "add"
    widens: bool = False
    """Its seeds add hidden units between a layer and the next (only where the job says a layer
    has one: `LayerStats.next_layer`)."""

    def fits(self, kind: str | None, widenable: bool = False) -> bool:
        """On a layer of unknown kind only a blueprint that serves every kind is safe."""
        if self.widens and not widenable:
            return False
        if kind is None:
            return all(k in self.hosts for k in HOST_KINDS)
        return kind in self.hosts


@dataclass(frozen=True)
class RankedLayer:
    name: str
    score: float


@dataclass(frozen=True)
class LayerRanking:
    layers: list[RankedLayer]
    signal: str
    """`gradient`, `activation_variance`, or `activation_variance (fallback: …)`."""
    excluded: dict[str, str]
    """Layers left out, and why."""


def rank_layers(state: JobState, config: PolicyConfig) -> LayerRanking:
    """The job's layers that may take a seed now, best first."""
    excluded: dict[str, str] = {}
    names = sorted(state.layers, key=lambda n: state.layers[n].order)
    if config.skip_output_layer and len(names) > 1:
        excluded[names[-1]] = "output layer"
        names = names[:-1]
    open_layers = []
    for name in names:
        if state.layers[name].full:
            excluded[name] = "no free seed slot"
        else:
            open_layers.append(name)
    signal: str = config.layer_signal
    scores = {n: _score(state, n, signal) for n in open_layers}
    if signal == "gradient" and open_layers and all(v is None for v in scores.values()):
        signal = "activation_variance (fallback: no gradient norms in this job's telemetry)"
        scores = {n: _score(state, n, "activation_variance") for n in open_layers}
    ranked = []
    for name in open_layers:
        score = scores[name]
        if score is None:
            excluded[name] = "not measured"
        else:
            ranked.append(RankedLayer(name, score))
    # A layer where growth already failed goes after the others, whatever its signal says: a
    # retired seed is evidence that capacity there does not pay.
    views = state.layers
    ranked.sort(key=lambda r: (views[r.name].failures, -r.score, views[r.name].order))
    return LayerRanking(ranked, signal, excluded)


def _score(state: JobState, name: str, signal: str) -> float | None:
    """Under the gradient signal a layer the job can widen is scored by the gradient new units
    there would get (`growth_gain`), the others by their own weights' gradient: both are norms
    of E[∂L/∂y·xᵀ] for units reading the layer's input, so they compare."""
    view = state.layers[name]
    if signal != "gradient":
        return view.variance_score
    return view.gain_score if view.gain_score is not None else view.gradient_score


def ordered(catalogue: Sequence[BlueprintInfo], config: PolicyConfig) -> list[BlueprintInfo]:
    """The catalogue in the order of preference, restricted to `config.blueprints` if set."""
    by_name = {b.name: b for b in catalogue}
    if config.blueprints is not None:
        return [by_name[n] for n in config.blueprints if n in by_name]
    known = [by_name[n] for n in PREFERENCE if n in by_name]
    rest = sorted((b for b in catalogue if b.name not in PREFERENCE), key=lambda b: b.name)
    return known + rest


@dataclass(frozen=True)
class Choice:
    blueprint: BlueprintInfo
    why: str


def choose_blueprint(
    state: JobState,
    kind: str | None,
    catalogue: Sequence[BlueprintInfo],
    config: PolicyConfig,
    widenable: bool = False,
) -> Choice | None:
    """A blueprint for a layer of `kind` (`widenable`: one the job can widen) by the configured
    strategy, or None if none may go."""
    candidates = [
        b
        for b in ordered(catalogue, config)
        if b.fits(kind, widenable) and _failures(state, b.name) < config.max_blueprint_failures
    ]
    if not candidates:
        return None
    widening = [b for b in candidates if b.widens]
    if config.prefer_widening and widening:
        return Choice(
            widening[0],
            "widen first: the layer can take new hidden units, the capacity a narrow layer lacks",
        )
    if config.strategy == "specialize":
        best = _best_measured(state, candidates)
        if best is not None:
            contribution = state.blueprints[best.name].best_contribution
            return Choice(best, f"specialize: best measured contribution so far ({contribution})")
    elif config.strategy == "ensemble":
        again = _last_kept(state, candidates)
        if again is not None:
            return Choice(again, "ensemble: the blueprint of the last kept seed, in another slot")
    untried = [b for b in candidates if _tried(state, b.name) == 0]
    if untried:
        prefix = "" if config.strategy == "diversify" else f"{config.strategy} has no basis yet; "
        return Choice(untried[0], f"{prefix}diversify: not tried in this job yet")
    least = min(candidates, key=lambda b: _tried(state, b.name))  # stable: preference order
    return Choice(least, "diversify: every blueprint was tried; the least tried one")


def _failures(state: JobState, name: str) -> int:
    record = state.blueprints.get(name)
    return 0 if record is None else record.failures


def _tried(state: JobState, name: str) -> int:
    record = state.blueprints.get(name)
    return 0 if record is None else record.tried


def _best_measured(state: JobState, candidates: list[BlueprintInfo]) -> BlueprintInfo | None:
    measured = [
        (record.best_contribution, b)
        for b in candidates
        if (record := state.blueprints.get(b.name)) is not None
        and record.best_contribution is not None
    ]
    if not measured:
        return None
    return max(measured, key=lambda pair: pair[0])[1]


def _last_kept(state: JobState, candidates: list[BlueprintInfo]) -> BlueprintInfo | None:
    names = {b.name: b for b in candidates}
    kept = [
        t
        for t in state.seeds
        if t.verdict == "keep" and t.blueprint is not None and t.blueprint in names
    ]
    if not kept:
        return None
    latest = max(kept, key=lambda t: t.verdict_epoch if t.verdict_epoch is not None else -1)
    assert latest.blueprint is not None
    return names[latest.blueprint]
