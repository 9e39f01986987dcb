"""Talking to the running stack: submit a job to Tolaria, see when it ends, and collect what it
measured (its view, its per-epoch history from the checkpoint, its seed events, Tamiyo's
decisions about it). Everything goes through the services' HTTP APIs."""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from typing import Any

import httpx
import torch

TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


@dataclass
class Germination:
    epoch: int
    """The epoch whose end the decision followed (0-based)."""
    layer: str
    blueprint: str


@dataclass
class Outcome:
    """One finished job, as the benchmark reads it."""

    job_id: str
    status: str
    metrics: dict[str, Any]
    history: list[dict[str, Any]]
    seeds: list[dict[str, Any]]
    germinations: list[Germination] = field(default_factory=list)
    """Tamiyo's applied germinations (adaptive arm), oldest first."""
    loaded: list[int] = field(default_factory=list)
    """Training steps at which a seed was allocated in the job (its own events): every
    germination the job executed, whoever decided it."""
    tamiyo_decisions: int = 0
    """Tamiyo's decisions that the job applied."""
    error: str | None = None

    @property
    def accuracy(self) -> float | None:
        best = self.metrics.get("best_test_accuracy")
        return float(best) if best is not None else _float(self.metrics.get("test_accuracy"))

    @property
    def accuracy_source(self) -> str:
        return "best" if self.metrics.get("best_test_accuracy") is not None else "last"


def _float(value: Any) -> float | None:
    return None if value is None else float(value)


class Stack:
    def __init__(self, tolaria_url: str, tamiyo_url: str, urza_url: str) -> None:
        self.tolaria = httpx.Client(base_url=tolaria_url, timeout=60)
        self.tamiyo = httpx.Client(base_url=tamiyo_url, timeout=60)
        self.urza = httpx.Client(base_url=urza_url, timeout=60)

    def close(self) -> None:
        for client in (self.tolaria, self.tamiyo, self.urza):
            client.close()

    def submit(self, spec: dict[str, Any]) -> str:
        response = self.tolaria.post("/jobs", json=spec)
        if response.status_code != 202:
            raise RuntimeError(f"Tolaria refused {spec.get('name')}: {response.text[:2000]}")
        return str(response.json()["job_id"])

    def status(self, job_id: str) -> str:
        return str(self.tolaria.get(f"/jobs/{job_id}").raise_for_status().json()["status"])

    def collect(self, job_id: str, morphogenesis: bool) -> Outcome:
        view = self.tolaria.get(f"/jobs/{job_id}").raise_for_status().json()
        outcome = Outcome(
            job_id=job_id,
            status=view["status"],
            metrics=view["metrics"],
            history=self._history(job_id),
            seeds=view["seeds"],
            error=view.get("error"),
        )
        if morphogenesis:
            records = self._decisions(job_id)
            outcome.tamiyo_decisions = sum(
                r["source"] == "tamiyo" and r["outcome"] == "applied" for r in records
            )
            outcome.germinations = [
                Germination(int(r["epoch"]), r["decision"]["layer"], r["decision"]["blueprint"])
                for r in records
                if r["source"] == "tamiyo"
                and r["decision"]["action"] == "germinate"
                and r["outcome"] == "applied"
                and r["decision"].get("blueprint")
            ]
            outcome.loaded = self._allocations(job_id)
        return outcome

    def logs(self, job_id: str) -> str:
        return self.tolaria.get(f"/jobs/{job_id}/logs", params={"tail": 40}).text

    def kernel_params(self, kernel_id: str) -> int:
        return int(self.urza.get(f"/kernels/{kernel_id}").raise_for_status().json()["params"])

    def _history(self, job_id: str) -> list[dict[str, Any]]:
        response = self.tolaria.get(f"/jobs/{job_id}/checkpoint")
        if response.status_code == 404:
            return []
        response.raise_for_status()
        state = torch.load(io.BytesIO(response.content), map_location="cpu", weights_only=True)
        return list(state.get("history", []))

    def _decisions(self, job_id: str) -> list[dict[str, Any]]:
        page = self.tamiyo.get("/decisions", params={"job_id": job_id, "limit": 1000})
        page.raise_for_status()
        return list(reversed(page.json()["items"]))  # newest first on the wire

    def _allocations(self, job_id: str) -> list[int]:
        """Steps of the job's DORMANT → ALLOCATED seed transitions, from its event stream (which
        ends by itself once the job has ended)."""
        steps: list[int] = []
        with self.tolaria.stream("GET", f"/jobs/{job_id}/events") as stream:
            kind = ""
            for line in stream.iter_lines():
                if line.startswith("event: "):
                    kind = line.removeprefix("event: ")
                    if kind == "end":
                        break
                elif line.startswith("data: ") and kind == "event.seed_transition":
                    body = json.loads(line.removeprefix("data: "))
                    payload = body.get("payload", body)
                    if payload.get("to_state") == "ALLOCATED":
                        steps.append(int(payload.get("step") or 0))
        return steps
