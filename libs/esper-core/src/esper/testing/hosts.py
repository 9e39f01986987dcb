"""Hosts for tests that run every built-in blueprint: a widening blueprint needs a widening host."""

from __future__ import annotations

from esper.blueprints.spec import BlueprintSpec
from esper.contracts.kernels import HostSignature


def host_for_blueprint(spec: BlueprintSpec, host: HostSignature) -> HostSignature:
    """`host` for a plain blueprint; for a widening one, `host` feeding a next layer of its
    kind (same geometry, 5 outputs) that it can widen into."""
    if not spec.widens:
        return host
    following = host.model_copy(
        update={"in_features": host.out_features, "out_features": 5, "groups": 1}
    )
    return host.widening(HostSignature.model_validate(following.model_dump()))
