"""HTTP clients of Esper's services.

    from esper.client import Esper
    with Esper() as esper:                     # ESPER_<SERVICE>_URL, ESPER_API_TOKEN
        job = esper.submit(spec)
        for event in esper.events(job.job_id):
            ...

`AsyncEsper` is the same API awaited. `UrzaClient` is the one client of Urza the services and the
HTTP kernel tier use (kernels, artifacts, blueprints, compiles, uploads; a training job's kernel
provider). Every error a service answers is an `esper.exceptions.ServiceError`; no answer at all
is its subclass `ServiceUnreachableError`.
"""

from esper.client.aio import AsyncEsper
from esper.client.calls import Event, ServiceUrls
from esper.client.sync import Esper
from esper.client.urza import KernelDownload, UrzaClient

__all__ = ["AsyncEsper", "Esper", "Event", "KernelDownload", "ServiceUrls", "UrzaClient"]
