#!/usr/bin/env bash
# Build the stack's images (docker-compose.yml's `build:` sections), with BuildKit wherever this
# machine can use it:
#
#   deploy/docker/build.sh                 # every image
#   deploy/docker/build.sh tolaria urza    # some of them (any `compose build` arguments)
#
# Why a script: Compose v2 (`docker compose`) builds with BuildKit by itself, but Compose v1
# (`docker-compose`, the one the sandbox engine has) uses the legacy builder, which commits a
# container per Dockerfile instruction. On an engine with the vfs storage driver (no overlayfs
# in the sandbox) each commit copies the whole 1 GB+ image: a cold build of one image took 9 min
# there, against well under a minute with BuildKit. v1 can hand its builds to the `docker build`
# CLI (COMPOSE_DOCKER_CLI_BUILD=1); that CLI must speak BuildKit: one with the buildx plugin, or
# a CLI older than 23.0 (BuildKit built in, DOCKER_BUILDKIT=1). This script finds one and puts it
# first on PATH for Compose; without one it falls back to the legacy builder, slowly.
#
# ESPER_DOCKER_CLI=/path/to/docker picks the CLI by hand.
set -euo pipefail
cd "$(dirname "$0")/../.."

if docker compose version >/dev/null 2>&1; then
    exec docker compose build "$@"
fi
command -v docker-compose >/dev/null 2>&1 || {
    echo "build.sh: neither 'docker compose' nor 'docker-compose' is installed" >&2
    exit 1
}

buildkit_cli() {  # prints a docker CLI that can build with BuildKit, or nothing
    if [[ -n ${ESPER_DOCKER_CLI:-} ]]; then
        echo "$ESPER_DOCKER_CLI"
        return
    fi
    if docker buildx version >/dev/null 2>&1; then
        command -v docker
        return
    fi
    local dir cli major
    local IFS=:
    for dir in $PATH; do
        cli=$dir/docker
        [[ -x $cli ]] || continue
        major=$("$cli" version --format '{{.Client.Version}}' 2>/dev/null | cut -d. -f1) || true
        # Before 23.0 the CLI carries its own BuildKit client; from 23.0 on it needs buildx.
        if [[ $major =~ ^[0-9]+$ ]] && ((major < 23)); then
            echo "$cli"
            return
        fi
    done
}

cli=$(buildkit_cli)
if [[ -z $cli ]]; then
    echo "build.sh: no BuildKit-capable docker CLI here; using Compose v1's legacy builder" \
        "(slow on a vfs engine)" >&2
    DOCKER_BUILDKIT=0 exec docker-compose build "$@"
fi

shim=$(mktemp -d)
trap 'rm -rf "$shim"' EXIT
ln -s "$cli" "$shim/docker"
echo "build.sh: building with BuildKit through $cli" >&2
PATH="$shim:$PATH" COMPOSE_DOCKER_CLI_BUILD=1 DOCKER_BUILDKIT=1 docker-compose build "$@"
