"""A pytest plugin (``-p suite_plugin``) for running llama.cpp's server tests against the Velesio router through
``llama_server_shim.py`` without editing the vendored tests: ``ServerPreset.load_all()``, which the suite's
session fixture calls to start every preset once so that its model is downloaded from Hugging Face, becomes a
no-op. Nothing is downloaded; the shim serves the embedded SmolLM2 whatever a preset names.

It imports the suite's ``utils`` module, so pytest runs in the suite's ``tests`` folder (run.sh does).
"""

from __future__ import annotations

import pytest


def _no_downloads() -> None:
    """The shim serves the embedded model: there is nothing to download."""


def pytest_configure(config: pytest.Config) -> None:
    import utils  # the vendored tools/server/tests/utils.py (the working folder is on sys.path)

    utils.ServerPreset.load_all = staticmethod(_no_downloads)
