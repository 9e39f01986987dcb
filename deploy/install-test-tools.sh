#!/usr/bin/env bash
# Installs the two outside tools Nissa's tests use, from Debian's apt: `promtool` (package
# `prometheus`: checks deploy/prometheus/*.yml) and `chromium` (renders the HTML job report for
# the screenshot test). Idempotent: a tool already on PATH is left alone. Without root or apt the
# script says so and exits 0; the tests that need a missing tool then skip and say why.
set -euo pipefail

need=()
command -v promtool >/dev/null 2>&1 || need+=(prometheus)
command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 \
    || need+=(chromium)

if [ ${#need[@]} -eq 0 ]; then
    echo "install-test-tools: promtool and chromium are already installed"
    exit 0
fi

if ! command -v apt-get >/dev/null 2>&1; then
    echo "install-test-tools: no apt-get here; not installing ${need[*]} (their tests will skip)"
    exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
        SUDO=(sudo -n)
    else
        echo "install-test-tools: not root and no password-less sudo; not installing ${need[*]}"
        exit 0
    fi
else
    SUDO=()
fi

export DEBIAN_FRONTEND=noninteractive
echo "install-test-tools: installing ${need[*]}"
# policy-rc.d 101: the prometheus package must not try to start a server while it installs.
policy=/usr/sbin/policy-rc.d
made_policy=0
if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' | "${SUDO[@]}" tee "$policy" >/dev/null
    "${SUDO[@]}" chmod +x "$policy"
    made_policy=1
fi
cleanup() { if [ "$made_policy" = 1 ]; then "${SUDO[@]}" rm -f "$policy"; fi; }
trap cleanup EXIT
"${SUDO[@]}" apt-get update -q
"${SUDO[@]}" apt-get install -y -q --no-install-recommends "${need[@]}"
command -v promtool >/dev/null && promtool --version 2>&1 | head -1
command -v chromium >/dev/null && chromium --version 2>&1 | head -1
