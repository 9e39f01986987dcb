"""Nissa's housekeeping: drop jobs past retention (every `housekeeping_interval_s`), and write
job reports to disk (every `snapshot_interval_s`, and once more on shutdown).

A report is written when its job changed since the last write and its status is known; the
writes run in a thread, so a slow disk never stalls the consumers or a scrape.
"""

from __future__ import annotations

import asyncio
import logging
import time

from esper.service import Periodic
from nissa.reports import JobReport, ReportStore
from nissa.state import NissaState

log = logging.getLogger("nissa.keeper")
PRUNE_EVERY_S = 60.0


class Keeper:
    def __init__(self, state: NissaState, store: ReportStore) -> None:
        self.state = state
        self.store = store
        settings = state.settings
        # Both wait one interval first: at start there is nothing to tidy or to save.
        self._loops = [
            Periodic(name, seconds, step, wait_first=True, logger=log)
            for name, seconds, step in (
                ("housekeeping", settings.housekeeping_interval_s, self.tidy),
                ("report snapshots", settings.snapshot_interval_s, self.save),
            )
        ]
        self.written = 0
        self._pruned_at = 0.0

    async def restore(self) -> int:
        """Track again the jobs whose stored reports are still within retention."""
        reports = await asyncio.to_thread(self.store.load_all)
        restored = sum(self.state.restore(report) for report in reports)
        if restored:
            log.info("restored %d jobs from %s", restored, self.store.root)
        return restored

    def start(self) -> None:
        for loop in self._loops:
            loop.start()

    async def stop(self) -> None:
        for loop in self._loops:
            await loop.stop()
        await self.save()

    async def tidy(self) -> None:
        self.state.housekeeping()

    async def save(self) -> None:
        """Write the reports of changed jobs (and of jobs dropped before they were written)."""
        state = self.state
        reports: list[JobReport] = list(state.unsaved.values())
        state.unsaved.clear()
        for job in state.jobs.values():
            if job.dirty and job.status != "UNKNOWN":
                reports.append(job.to_report(state.kernels))
                job.dirty = False
        if reports or time.monotonic() - self._pruned_at >= PRUNE_EVERY_S:
            await asyncio.to_thread(self._write, reports)

    def _write(self, reports: list[JobReport]) -> None:
        for report in reports:
            try:
                self.store.write(report)
                self.written += 1
            except OSError as err:
                log.error("report of %s not written: %s", report.job_id, err)
        if time.monotonic() - self._pruned_at >= PRUNE_EVERY_S:
            self._pruned_at = time.monotonic()
            self.store.prune()
