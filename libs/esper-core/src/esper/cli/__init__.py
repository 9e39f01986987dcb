"""The `esper` command line: run the local stack, submit and follow jobs, look at kernels.

    esper up                   # Redis + the four services, logs streamed, dead ones restarted;
                               # Ctrl-C (or SIGTERM, SIGHUP) stops
    esper demo                 # the stack, the growth demo job and its control run
    esper jobs submit examples/jobs/circles.yaml --follow
    esper jobs list | status ID | stop ID | logs ID | checkpoint ID
    esper kernels list;  esper blueprints list;  esper stack status

An error from a service is one readable line (and exit code 1), never a traceback.
"""

from __future__ import annotations

import sys

import typer

from esper.cli import jobs, kernels, stack
from esper.cli.output import fail
from esper.exceptions import EsperError

app = typer.Typer(no_args_is_help=True, add_completion=False, help=__doc__.splitlines()[0])
app.add_typer(jobs.app, name="jobs")
app.add_typer(kernels.kernels_app, name="kernels")
app.add_typer(kernels.blueprints_app, name="blueprints")
app.add_typer(stack.stack_app, name="stack")
app.command("up")(stack.up)
app.command("demo")(stack.demo)


def main() -> None:
    try:
        app()
    except EsperError as err:
        fail(str(err))
    except KeyboardInterrupt:
        sys.exit(130)
