"""Publishing what a job grew: every ACTIVE seed, as trained, uploaded to Urza with its lineage
(the kernel it grew from, the job, its layer and slot, what it measured there)."""

from __future__ import annotations

import copy
import logging
from typing import TYPE_CHECKING

from esper.contracts import HostSignature
from esper.contracts.jobs import SeedView
from esper.contracts.kernels_api import KernelLineage, KernelUpload
from esper.kernels.artifact import digest_of
from esper.kernels.executor import serialize

if TYPE_CHECKING:
    from tolaria.training import JobTrainer

log = logging.getLogger("tolaria.job")


def publish_trained_kernels(trainer: JobTrainer) -> list[str]:
    """Upload every ACTIVE seed, as trained, to Urza with its lineage (the kernel it grew
    from, this job, its layer and slot, what it measured). A failed upload is logged, never
    fails the job: the training it records is done either way."""
    if trainer.morphable is None or trainer.urza is None or trainer.orchestrator is None:
        log.warning("publish_kernels is on, but there is no Urza to publish to")
        return []
    published = []
    for view in trainer.orchestrator.seed_views():
        if view.state != "ACTIVE" or view.kernel_id is None:
            continue
        try:
            published.append(_publish_seed(trainer, view))
        except Exception as err:
            log.warning("seed %s:%d not published: %s", view.layer, view.seed, err)
    return published


def _publish_seed(trainer: JobTrainer, view: SeedView) -> str:
    assert trainer.morphable is not None and trainer.urza is not None
    layer = trainer.morphable.layer(view.layer)
    host = HostSignature.of(layer.base_layer)
    parent = trainer.runtime.call(trainer.urza.kernel(view.kernel_id or ""))
    module = layer.seeds[str(view.seed)]
    data = serialize(copy.deepcopy(module).cpu().float(), host, parent.format)
    metrics = {"val_accuracy": trainer.metrics.val_accuracy or 0.0}
    if view.contribution is not None:
        metrics["contribution"] = view.contribution
    upload = KernelUpload(
        name=f"{parent.name}.{trainer.job_id}.{view.layer}.{view.seed}"[:128],
        format=parent.format,
        host=host,
        blueprint=parent.blueprint,
        blueprint_version=parent.blueprint_version,
        default_blend=parent.default_blend,
        digest=digest_of(data),
        lineage=KernelLineage(
            parent_kernel_id=parent.kernel_id,
            job_id=trainer.job_id,
            layer=view.layer,
            seed=view.seed,
            metrics=metrics,
        ),
    )
    result = trainer.runtime.call(trainer.urza.upload(upload, data), timeout=300)
    log.info(
        "published the trained seed %s:%d as kernel %s (from %s)",
        view.layer,
        view.seed,
        result.kernel.kernel_id,
        parent.kernel_id,
    )
    return result.kernel.kernel_id
