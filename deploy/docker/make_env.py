"""Write `.env` for docker-compose.yml: `.env.example` with a fresh random value for every secret
(`make env`). An existing `.env` is never overwritten: it holds the tokens clients already use
and the key the stored kernels are signed with.

    python3 deploy/docker/make_env.py [--example .env.example] [--out .env]

Standard library only: it runs before any virtual environment exists.
"""

from __future__ import annotations

import argparse
import os
import re
import secrets
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TOKENS = ("URZA_API_TOKEN", "TOLARIA_API_TOKEN", "TAMIYO_API_TOKEN", "NISSA_API_TOKEN")
KEYS = ("URZA_SIGNING_KEY",)
RAY_TOKENS = ("RAY_AUTH_TOKEN",)
SECRETS = TOKENS + KEYS + RAY_TOKENS
"""What docker-compose.yml requires (`${NAME:?...}`; the other services' Urza token and
Tolaria's kernel key are these same values, passed on by the compose file), and the token of the
`ray` profile's cluster, which only that profile's nodes require."""
_SECRET_LINE = re.compile(r"^#? ?(" + "|".join(SECRETS) + r")=.*$", re.M)


def fresh(name: str) -> str:
    # Tokens go in headers (URL-safe text); the HMAC key is hex, as .env.example suggests.
    return secrets.token_hex(32) if name in KEYS else secrets.token_urlsafe(32)


def render(example: str) -> str:
    """`example` with each secret's line (commented out or not) set to a fresh value."""
    found = set(_SECRET_LINE.findall(example))
    missing = [name for name in SECRETS if name not in found]
    if missing:
        raise ValueError(f"the example has no line for {', '.join(missing)}")
    return _SECRET_LINE.sub(lambda m: f"{m.group(1)}={fresh(m.group(1))}", example)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--example", type=Path, default=ROOT / ".env.example")
    parser.add_argument("--out", type=Path, default=ROOT / ".env")
    args = parser.parse_args(argv)
    text = render(args.example.read_text())
    try:
        # O_EXCL: an .env that appears meanwhile is not overwritten either. 0600: it is secret.
        fd = os.open(args.out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        print(
            f"{args.out} exists: left as it is (delete it first for fresh secrets)", file=sys.stderr
        )
        return 1
    with os.fdopen(fd, "w") as out:
        out.write(text)
    print(f"wrote {args.out} with fresh {', '.join(SECRETS)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
