"""Tamiyo and Nissa never build or run a torch module: their processes must not pay torch's import
time (~1.5 s) and memory. Each import runs in a fresh interpreter, since this one has torch loaded
by other tests. (esper's own light modules are checked in libs/esper-core/tests/test_public_api.py;
these are here because the library's tests do not depend on the services.)"""

from __future__ import annotations

import subprocess
import sys

import pytest


@pytest.mark.parametrize("module", ["tamiyo.main", "nissa.main"])
def test_the_service_app_does_not_load_torch(module: str) -> None:
    code = f"import sys, {module}; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
