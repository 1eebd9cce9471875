"""Fixtures of the PACS tests: a real Orthanc on 127.0.0.1 (skipped where the Debian packages are missing, a failure
with MEDSEG_REQUIRE_ORTHANC=1 as in CI)."""

from __future__ import annotations

from pathlib import Path

import orthanc
import pytest


@pytest.fixture
def orthanc_server(tmp_path: Path):
    orthanc.require()
    server = orthanc.start(tmp_path / "orthanc")
    yield server
    server.stop()
