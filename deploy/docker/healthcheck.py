"""Container probe: `python healthcheck.py <service> [path]` exits 0 when the service answers
the path (default `/healthz`) with 200, and 1 otherwise, saying why on stderr.

Python's standard library and not curl, because the slim base image has no curl. The port is the
service's own setting (`<SERVICE>_PORT`), so a container that moves its port keeps a working
probe. The image's HEALTHCHECK asks `/healthz` (the process is alive); docker-compose.yml asks
`/readyz` instead, so that `depends_on: service_healthy` waits until Redis and the service's own
checks pass.
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request

DEFAULT_PORTS = {"tolaria": 8001, "tamiyo": 8002, "nissa": 8003, "urza": 8004}
TIMEOUT_S = 4.0  # below the HEALTHCHECK --timeout, so a hung service fails here with a reason


def main(argv: list[str]) -> int:
    if len(argv) not in (2, 3) or argv[1] not in DEFAULT_PORTS:
        print(f"usage: {argv[0]} {{{','.join(DEFAULT_PORTS)}}} [path]", file=sys.stderr)
        return 2
    service = argv[1]
    path = argv[2] if len(argv) == 3 else "/healthz"
    port = os.environ.get(f"{service.upper()}_PORT") or str(DEFAULT_PORTS[service])
    url = f"http://127.0.0.1:{port}{path}"
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_S) as response:
            status = response.status
    except urllib.error.HTTPError as err:  # 503 from /readyz: say which check failed
        body = err.read(500).decode(errors="replace")
        print(f"{url}: {err.code} {body}", file=sys.stderr)
        return 1
    except (OSError, ValueError) as err:
        print(f"{url}: {type(err).__name__}: {err}", file=sys.stderr)
        return 1
    if status != 200:
        print(f"{url}: {status}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
