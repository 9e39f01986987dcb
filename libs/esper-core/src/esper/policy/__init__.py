"""The heuristic controller: when and where a job grows a seed, and whether a seed earned its place.

This is the one implementation of the policy. Tamiyo hosts it as a service (it feeds it the
bus's telemetry and events, keeps each job's `JobState` in Redis, serves the HTTP API and asks
Urza for the blueprint catalogue); a training loop can run the same code in-process, with the
state in memory and the built-in catalogue, so the decisions are the same in both places.

It is pure: no I/O, no clock in a decision, no service. A caller, per job:

    state = new_state(job_id)
    ingest_report(state, report, config, kernel_kinds={})  # the bookkeeping (tracking.py)
    proposals = HeuristicPolicy().on_report(state, report, Context(config, builtin_catalogue()))
    # give each proposal an id (derive_decision_id) and make it a decision (build_decision),
    # then register_decision(state, decision, "tamiyo", config)

or, all of that for one job in memory: `LocalController(job_id, config).answer(report, events)`
at each decision point (local.py; esper.session runs it for a user's own training loop).

Modules: config.py (PolicyConfig, every threshold), models.py (the job's state), tracking.py
(what reports, events and decisions do to the state), fitting.py (overfitting, a stalled
train_loss, a narrow layer), choice.py (layer ranking, blueprint choice), policy.py (Policy,
HeuristicPolicy), catalogue.py (the built-in blueprints), decisions.py (a proposal's decision and
its id), local.py (LocalController).
"""

from esper.policy.catalogue import builtin_catalogue
from esper.policy.choice import BlueprintInfo
from esper.policy.config import PolicyConfig
from esper.policy.decisions import build_decision, derive_decision_id
from esper.policy.local import LocalController
from esper.policy.models import JobState
from esper.policy.policy import Context, HeuristicPolicy, Policy, Proposal
from esper.policy.tracking import ingest_event, ingest_report, new_state, register_decision

__all__ = [
    "BlueprintInfo",
    "Context",
    "HeuristicPolicy",
    "JobState",
    "LocalController",
    "Policy",
    "PolicyConfig",
    "Proposal",
    "build_decision",
    "builtin_catalogue",
    "derive_decision_id",
    "ingest_event",
    "ingest_report",
    "new_state",
    "register_decision",
]
