#!/usr/bin/env bash
# The end-to-end test of the compose stack (tests/e2e), for `make e2e` and .ci/run.
#
# On a machine with no Docker engine answering, it first starts one with the sandbox tool
# (../shared/tools/docker-sandbox: installs dockerd and Compose v1, builds local stand-ins for the
# base images; about 2 minutes the first time). ESPER_E2E=1 makes the test fail rather than skip
# when something it needs is missing. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/../.."

sandbox=../shared/tools/docker-sandbox
if ! docker info >/dev/null 2>&1; then
    if [[ -x $sandbox ]]; then
        echo "e2e: no Docker engine answers; starting one with $sandbox" >&2
        "$sandbox"
    else
        echo "e2e: no Docker engine answers and $sandbox is not here" >&2
        exit 1
    fi
fi

python=${PYTHON:-.venv/bin/python}
# The docker SDK, when the venv predates its addition to the test extras.
"$python" -c "import docker" 2>/dev/null \
    || PIP_CONSTRAINT="$PWD/constraints.txt" "$python" -m pip install --quiet docker

ESPER_E2E=1 exec "$python" -m pytest tests/e2e -v -s -p no:cacheprovider "$@"
