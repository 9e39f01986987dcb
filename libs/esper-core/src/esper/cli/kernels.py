"""`esper kernels list`, `esper blueprints list`: what Urza holds."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from esper.cli.output import console
from esper.client import Esper, ServiceUrls

kernels_app = typer.Typer(no_args_is_help=True, help="Kernels in Urza.")
blueprints_app = typer.Typer(no_args_is_help=True, help="Blueprints in Urza.")
Url = Annotated[str | None, typer.Option("--url", help="Urza's URL (default $ESPER_URZA_URL)")]


@kernels_app.command("list")
def list_kernels(
    blueprint: str | None = None,
    name: str | None = None,
    tag: str | None = None,
    limit: int = 100,
    url: Url = None,
) -> None:
    """Kernels, newest first."""
    with Esper(ServiceUrls.from_env(urza=url)) as esper:
        page = esper.kernels(blueprint=blueprint, name=name, tag=tag, limit=limit)
    table = Table("kernel", "name", "blueprint", "format", "host", "params", "lineage")
    for k in page.items:
        host = f"{k.host.kind} {k.host.in_features}→{k.host.out_features}"
        lineage = ", ".join(f"{a}={b}" for a, b in k.lineage.items() if a != "metrics")
        table.add_row(
            k.kernel_id, k.name, k.blueprint or "", k.format, host, str(k.params), lineage
        )
    console.print(table)


@blueprints_app.command("list")
def list_blueprints(url: Url = None) -> None:
    """Blueprints (the built-ins and registered ones)."""
    with Esper(ServiceUrls.from_env(urza=url)) as esper:
        items = esper.blueprints()
    table = Table("blueprint", "version", "hosts", "blend", "built-in", "description")
    for b in items:
        spec = b["spec"]
        table.add_row(
            spec["name"],
            str(spec["version"]),
            "/".join(spec["hosts"]),
            spec["default_blend"],
            "yes" if b["builtin"] else "",
            spec.get("description", ""),
        )
    console.print(table)
