"""The JavaScript client's own tests (clients/js, Node's test runner), which start a router and a worker from
this environment's console scripts."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from conftest import BIN
from test_client_sdk import image_routes_available

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
JS = os.path.join(ROOT, "clients", "js")


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not on PATH")
def test_js_client_suite():
    version = subprocess.run(["node", "--version"], capture_output=True, text=True).stdout.strip()
    if int(version.lstrip("v").split(".")[0]) < 18:
        pytest.skip(f"node {version} is older than 18 (no fetch, no node --test)")
    # The image test runs where the router has the AUTOMATIC1111 routes and the diffusers backend is installed.
    images = "1" if image_routes_available() is None else "0"
    proc = subprocess.run(["node", "--test", "test/"], cwd=JS, capture_output=True, text=True, timeout=400,
                          env={**os.environ, "VELESIO_BIN": str(BIN), "VELESIO_TEST_IMAGES": images})
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    assert "# fail 0" in proc.stdout
