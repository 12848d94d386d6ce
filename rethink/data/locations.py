"""Where data sets, decoded-image caches and scan results live when the config does not say."""

import os
from pathlib import Path


def user_cache_home() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")


def data_root(configured: str | None) -> Path:
    """`data.root`, else $RETHINK_DATA, else $XDG_CACHE_HOME/rethink/data (~/.cache/rethink/data)."""
    return _first_of(configured, "RETHINK_DATA", "data")


def cache_dir(configured: str | None) -> Path:
    """`data.cache_dir`, else $RETHINK_CACHE, else $XDG_CACHE_HOME/rethink/images (~/.cache/rethink/images)."""
    return _first_of(configured, "RETHINK_CACHE", "images")


def _first_of(configured: str | None, variable: str, default_name: str) -> Path:
    chosen = configured or os.environ.get(variable)
    return Path(chosen).expanduser() if chosen else user_cache_home() / "rethink" / default_name


def downloads_allowed() -> bool:
    return os.environ.get("RETHINK_NO_DOWNLOAD", "") not in ("1", "true", "yes")
