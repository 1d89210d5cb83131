"""A package's version from its installed metadata, without importing it (no torch at startup)."""

from __future__ import annotations

from importlib import metadata


def package_version(name: str) -> str:
    """The installed version of distribution `name`, or 'not installed'."""
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"
