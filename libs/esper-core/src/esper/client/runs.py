"""The stack as the controller of a user's own training loop (`esper.session(...,
controller="stack")`): the run is registered with Tolaria as an external job, its reports and
events go there (and on to Tamiyo and Nissa over the bus), and the decisions come back in the
replies (esper.contracts.runs). Kernels come from Urza.

Training must not die because the stack hiccups: a report that cannot be delivered is logged
and its events are sent with the next one; a decision point that gets no reply passes without
decisions, as a Tolaria job's does when no controller answers.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from esper.client.calls import ServiceUrls
from esper.client.sync import Esper
from esper.client.urza import UrzaClient
from esper.contracts import (
    ControlDecision,
    Envelope,
    JobSpec,
    JobView,
    Message,
    RunEnd,
    RunReport,
    TelemetryReport,
)
from esper.contracts.jobs import (
    ExternalData,
    ExternalModel,
    JobMetrics,
    MorphogenesisSpec,
    SeedView,
    TrainingSpec,
)
from esper.contracts.kernels import HostSignature
from esper.contracts.runs import MAX_RUN_EVENTS
from esper.contracts.vocabulary import KernelFormat
from esper.exceptions import ServiceError, ServiceUnreachableError

log = logging.getLogger(__name__)
SOURCE = "session"
REPLY_MARGIN_S = 60.0
"""A decision point's reply waits up to the spec's `decision_timeout_s` in Tolaria, then
carries the answer back: the HTTP timeout leaves this much on top."""


class StackController:
    """Registers the run (`POST /jobs`, model and dataset `external`) on creation; `answer`
    reports, `end` ends the job. `seeds` is read at each report (the run's seeds now)."""

    def __init__(
        self,
        *,
        name: str,
        spec: MorphogenesisSpec,
        epochs: int | None = None,
        description: str | None = None,
        urls: ServiceUrls | None = None,
        token: str | None = None,
    ) -> None:
        self.urls = urls or ServiceUrls.from_env()
        self.token = token
        self.client = Esper(
            self.urls, token=token, timeout_s=spec.decision_timeout_s + REPLY_MARGIN_S
        )
        training = TrainingSpec(epochs=epochs) if epochs is not None else TrainingSpec()
        job = JobSpec(
            name=name,
            model=ExternalModel(description=description),
            dataset=ExternalData(),
            training=training,
            morphogenesis=spec,
        )
        self.job_id = self.client.submit(job).job_id
        self.note = ""
        self.stop_requested = False
        self.seeds: Callable[[], list[SeedView]] = list
        self._unsent: list[Envelope] = []

    def answer(self, report: TelemetryReport, events: list[Message]) -> list[ControlDecision]:
        """Send `events` then `report`; the decisions to execute at this point (none when it is
        not a decision point, or it could not be asked)."""
        self._unsent.extend(
            Envelope.wrap(event, source=SOURCE, job_id=self.job_id) for event in events
        )
        sending = self._unsent[:MAX_RUN_EVENTS]
        body = RunReport(report=report, events=sending, seeds=self.seeds())
        try:
            reply = self.client.report_run(self.job_id, body)
        except ServiceUnreachableError as err:
            log.warning("run %s: report %s not delivered: %s", self.job_id, report.point, err)
            self.note = f"Tolaria unreachable: {err}"
            return []
        except ServiceError as err:
            if err.status == 409:  # the job ended without us (its lease ran out, deleted)
                log.error("run %s: Tolaria refuses its reports: %s", self.job_id, err)
                self.stop_requested = True
                return []
            raise
        del self._unsent[: len(sending)]
        self.stop_requested = reply.stop_requested
        self.note = reply.note or ""
        return list(reply.decisions)

    def end(
        self, status: str, error: str | None, metrics: JobMetrics | None, steps: int
    ) -> JobView | None:
        """End the run's job; None (logged) when Tolaria cannot be told: its lease ends it."""
        assert status in ("SUCCEEDED", "FAILED", "STOPPED")
        body = RunEnd.model_validate(
            {
                "status": status,
                "error": error[:2000] if error else None,
                "metrics": metrics,
                "seeds": self.seeds(),
                "steps": steps,
            }
        )
        try:
            return self.client.end_run(self.job_id, body)
        except (ServiceUnreachableError, ServiceError) as err:
            log.warning("run %s: its end (%s) not recorded: %s", self.job_id, status, err)
            return None
        finally:
            self.client.close()


class UrzaProvider:
    """Kernels for the run's seeds from Urza (compiled there, or the stored ones). A client per
    call: the session runs each decision on an event loop of its own."""

    def __init__(self, base_url: str, token: str | None) -> None:
        self.base_url = base_url
        self.token = token

    async def kernel_for(self, blueprint: str, host: HostSignature, fmt: KernelFormat) -> str:
        async with UrzaClient(self.base_url, token=self.token) as urza:
            return await urza.kernel_for(blueprint, host, fmt)
