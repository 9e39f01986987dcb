"""The `ray` executor (`TOLARIA_EXECUTOR=ray`): a job as a Ray Train run of
`distributed.workers` ranks, each running the same job loop (JobTrainer) in lockstep
(tolaria.lockstep).

The job's process (tolaria.runner) is the run's driver: it starts the attempt, hands the job to
Ray and ends it with what rank 0 reported. Rank 0 is the job as a single-process job is: it
reads the job's control group, reports, writes the checkpoint and the record; the other ranks
keep to themselves (FollowerRuntime). A rank lost mid-run: Ray Train starts the ranks again
(`FailureConfig`, up to `training.max_restarts` times) and every rank resumes from the job's
checkpoint, which all of them read — on a cluster of several machines Tolaria's work dir must be
shared storage (deploy/k8s: a ReadWriteMany volume).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from esper.contracts import ControlDecision, JobMetrics, JobProgress, JobSpec, Message
from esper.contracts.jobs import SeedView
from tolaria.lockstep import Lockstep, parameter_digest
from tolaria.runtime import JobRuntime
from tolaria.settings import TolariaSettings

log = logging.getLogger("tolaria.job")
OUTCOME = "outcome.json"
PASSED_ENV = ("TOLARIA_", "ESPER_", "URZA_", "OMP_NUM_THREADS")
"""What the ranks see of the driver's environment: they build the same settings from it (the
bus, the data and work dirs, Urza's address, token and signing key for their kernel fetches)."""
KEPT_BACK = ("TOLARIA_API_TOKEN", "TOLARIA_RAY_AUTH_TOKEN", "ESPER_API_TOKEN")
"""Secrets the ranks have no use for: a job's runtime env is readable on its cluster."""


class RayUnavailableError(RuntimeError):
    """`ray[train]` is not installed where the `ray` executor was asked for."""


class RayUnreachableError(RuntimeError):
    """The Ray cluster at `TOLARIA_RAY_ADDRESS` did not answer (or refused the token)."""


@dataclass
class RayOutcome:
    """What rank 0 reported at the end of the run."""

    status: str
    metrics: JobMetrics
    progress: JobProgress
    seeds: list[SeedView]
    digests: list[str] = field(default_factory=list)
    """Each rank's digest of its parameters and buffers at the end, in rank order."""
    applied: list[list[tuple[str, int, str]]] = field(default_factory=list)
    """Each rank's executed decisions: (decision id, step, outcome)."""


def run_on_ray(settings: TolariaSettings, job_id: str, spec: JobSpec) -> RayOutcome:
    """Run the job on the Ray cluster at `settings.ray_address` and wait for it."""
    # Before Ray is imported: it reads its authentication settings when it is.
    if settings.ray_auth_token is not None and settings.ray_auth_token.get_secret_value():
        os.environ["RAY_AUTH_MODE"] = "token"
        os.environ["RAY_AUTH_TOKEN"] = settings.ray_auth_token.get_secret_value()
    try:
        import ray
        from ray.train import FailureConfig, RunConfig, ScalingConfig
        from ray.train.torch import TorchConfig, TorchTrainer
    except ImportError as err:
        raise RayUnavailableError(
            "TOLARIA_EXECUTOR=ray needs Ray Train: pip install 'esper-tolaria[ray]'"
        ) from err
    env = {k: v for k, v in os.environ.items() if k.startswith(PASSED_ENV) and k not in KEPT_BACK}
    # The job's runtime env reaches every worker the run starts.
    try:
        ray.init(
            address=settings.ray_address,
            runtime_env={"env_vars": env},
            log_to_driver=False,
            ignore_reinit_error=True,
        )
    except ConnectionError as err:
        where = settings.ray_address or "a local Ray"
        raise RayUnreachableError(f"the Ray cluster at {where} cannot be reached: {err}") from err
    distributed = spec.distributed
    gpus = float(distributed.gpus_per_worker)
    resources = {"CPU": float(distributed.cpus_per_worker), **({"GPU": gpus} if gpus else {})}
    trainer = TorchTrainer(
        train_rank,
        train_loop_config={"job_id": job_id, "spec": spec.model_dump(mode="json")},
        torch_config=TorchConfig(backend="nccl" if gpus else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=distributed.workers, use_gpu=gpus > 0, resources_per_worker=resources
        ),
        run_config=RunConfig(
            name=job_id,
            storage_path=str((settings.work_dir / "ray").resolve()),
            failure_config=FailureConfig(max_failures=spec.training.max_restarts),
        ),
    )
    try:
        result = trainer.fit()
    finally:
        ray.shutdown()
    if result.checkpoint is None:
        raise RuntimeError(f"the Ray run of job {job_id} ended without rank 0's report")
    with result.checkpoint.as_directory() as folder:
        reported: dict[str, Any] = json.loads((Path(folder) / OUTCOME).read_text())
    return RayOutcome(
        status=str(reported["status"]),
        metrics=JobMetrics.model_validate(reported["metrics"]),
        progress=JobProgress.model_validate(reported["progress"]),
        seeds=[SeedView.model_validate(s) for s in reported["seeds"]],
        digests=list(reported["digests"]),
        applied=[[(str(i), int(s), str(o)) for i, s, o in rank] for rank in reported["applied"]],
    )


def train_rank(config: dict[str, Any]) -> None:
    """One rank of the run (on a Ray worker): the job loop, in lockstep with the others."""
    import ray.train

    from tolaria.runner import ShipToJobLog
    from tolaria.training import JobTrainer, StopRequested

    settings = TolariaSettings()
    job_id: str = config["job_id"]
    spec = JobSpec.model_validate(config["spec"])
    lockstep = Lockstep()
    runtime = (JobRuntime if lockstep.leads else FollowerRuntime)(settings, job_id).start()
    shipper = ShipToJobLog(runtime) if lockstep.leads else None
    if shipper is not None:
        logging.getLogger().addHandler(shipper)
        logging.getLogger().setLevel(logging.INFO)
    try:
        trainer = JobTrainer(runtime, spec, settings.data_dir, settings.work_dir, lockstep)
        if trainer.resume() and lockstep.leads:
            trainer.record_progress()
        status = "SUCCEEDED"
        try:
            trainer.run()
        except StopRequested:
            status = "STOPPED"
        digests = lockstep.gather(parameter_digest(trainer.model))
        applied = lockstep.gather(trainer.points.executed if trainer.points is not None else [])
        if lockstep.leads:
            same = "the same" if len(set(digests)) == 1 else "DIFFERENT"
            log.info("%d ranks, %s parameters: %s", lockstep.world, same, ", ".join(digests))
            for rank, executed in enumerate(applied):
                done = ", ".join(f"{i}@{step} {outcome}" for i, step, outcome in executed)
                log.info("rank %d executed: %s", rank, done or "nothing")
        outcome = {
            "status": status,
            "metrics": trainer.metrics.model_dump(mode="json"),
            "progress": trainer.view_progress().model_dump(mode="json"),
            "seeds": [s.model_dump(mode="json") for s in trainer.seed_views()],
            "digests": digests,
            "applied": applied,
        }
        # Every rank reports (a report is collective); rank 0's comes with the outcome, as a
        # Ray Train checkpoint: what reaches the driver of a Ray Train run.
        with tempfile.TemporaryDirectory() as folder:
            checkpoint = None
            if lockstep.leads:
                (Path(folder) / OUTCOME).write_text(json.dumps(outcome))
                checkpoint = ray.train.Checkpoint.from_directory(folder)
            ray.train.report({"status": status}, checkpoint=checkpoint)
    finally:
        if shipper is not None:
            logging.getLogger().removeHandler(shipper)
        runtime.close()


class FollowerRuntime(JobRuntime):
    """A rank other than 0: an event loop for its kernel fetches, and nothing on the bus — rank
    0 speaks for the job, and tells the others what to do (tolaria.lockstep)."""

    def start(self) -> FollowerRuntime:
        self._thread.start()
        return self

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=5)

    def emit(self, message: Message) -> None:
        pass

    def record(self, **fields: Any) -> None:
        pass

    def telemetry(self, report: Any) -> None:
        pass

    def ask_again(self, report: Any) -> None:
        pass

    def log_line(self, line: str) -> None:
        pass

    def flush(self) -> None:
        pass

    def requeue_held_decisions(self) -> None:
        pass

    def release_decisions(self, decisions: list[ControlDecision]) -> None:
        pass

    def controller_alive(self) -> bool:
        raise AssertionError("only rank 0 asks the controller")
