"""Shared fixtures of the dataset tests (builders live in dataset_fixtures.py)."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture
def hf_cache(tmp_path: Path) -> Path:
    """`datasets` converts parquet into its own cache: keep it inside the test's tmp dir."""
    return tmp_path / "hf_cache"
