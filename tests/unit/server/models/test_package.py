"""Unit tests for the latentcast.server.models package as a whole."""

from __future__ import annotations

import subprocess
import sys


def test_module_import_is_cheap() -> None:
    # models must not pull diffusers/transformers in at import time (lazy imports),
    # checked in a fresh interpreter.
    code = (
        "import sys, latentcast.server.models, latentcast.server.previews; "
        "print('diffusers' in sys.modules, 'transformers' in sys.modules)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "False False"
