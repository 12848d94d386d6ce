"""Where data sets, decoded-image caches and scan results live when the config does not say."""

import os
from pathlib import Path


def user_cache_home() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")


def data_root(configured: str | None) -> Path:
    """`data.root`, else $RETHINK_DATA, else $XDG_CACHE_HOME/rethink/data (~/.cache/rethink/data)."""
    if configured:
        return Path(configured).expanduser()
    if os.environ.get("RETHINK_DATA"):
        return Path(os.environ["RETHINK_DATA"]).expanduser()
    return user_cache_home() / "rethink" / "data"


def cache_dir(configured: str | None) -> Path:
    """`data.cache_dir`, else $RETHINK_CACHE, else $XDG_CACHE_HOME/rethink/images (~/.cache/rethink/images)."""
    if configured:
        return Path(configured).expanduser()
    if os.environ.get("RETHINK_CACHE"):
        return Path(os.environ["RETHINK_CACHE"]).expanduser()
    return user_cache_home() / "rethink" / "images"


def downloads_allowed() -> bool:
    return os.environ.get("RETHINK_NO_DOWNLOAD", "") not in ("1", "true", "yes")
