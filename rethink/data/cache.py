"""On-disk caches under `data.cache_dir`: decoded, downscaled images, and what a scan found.

Decoded images are keyed by the file's content hash and the shorter side they were resized to, so one
entry serves every epoch, every job of a sweep and every copy of the same file. Every write goes to a
temporary file that is then renamed, so concurrent loader workers and jobs never see half a file.
A write that fails (disk full, read-only folder) is reported once and the run carries on uncached.
"""

import hashlib
import io
import json
import logging
import os
from pathlib import Path

import numpy as np
import torch

from ..atomic import atomic_write_bytes
from .images import load_image

log = logging.getLogger("rethink")

_reported_failures: set[Path] = set()


def try_atomic_write(path: Path, data: bytes, what: str, cache_root: Path) -> bool:
    """atomic_write, but a failure is a warning (once per cache folder and process), not an error."""
    try:
        atomic_write_bytes(path, data)
        return True
    except OSError as e:
        if cache_root not in _reported_failures:
            _reported_failures.add(cache_root)
            log.warning(f"cannot write the {what} cache in {cache_root} ({e.strerror or e}); carrying on without it (set data.cache_dir)")
        return False


class ImageCache:
    """Images decoded once, downscaled so the shorter side is `shorter_side` (never upscaled), kept as
    uint8 HxWx3 .npy files."""

    def __init__(self, directory: Path, shorter_side: int):
        self.directory = Path(directory)
        self.shorter_side = shorter_side
        self.writable = True

    def entry(self, digest: str) -> Path:
        return self.directory / f"side{self.shorter_side}" / digest[:2] / f"{digest}.npy"

    def load(self, path: Path, digest: str) -> torch.Tensor:
        """The image at `path` (whose content hash is `digest`) as uint8 3xHxW."""
        entry = self.entry(digest)
        try:
            return torch.from_numpy(np.load(entry)).permute(2, 0, 1)
        except (OSError, ValueError, EOFError):  # not cached yet (or unreadable: rewrite it)
            pass
        image = load_image(path, self.shorter_side)
        if self.writable:
            buffer = io.BytesIO()
            np.save(buffer, image.permute(1, 2, 0).contiguous().numpy())
            self.writable = try_atomic_write(entry, buffer.getvalue(), "image", self.directory)
        return image


class ScanRecords:
    """What a scan found for each file, keyed by path, size and modification time, so that a second
    scan of an unchanged folder decodes nothing. One JSON file per scanned folder."""

    def __init__(self, cache_root: Path, folder: Path):
        self.cache_root = Path(cache_root)
        key = _short_hash(str(Path(folder).resolve()))
        self.file = self.cache_root / "scans" / f"{key}.json"
        try:
            self.records: dict[str, list] = json.loads(self.file.read_text())
        except (OSError, ValueError):
            self.records = {}

    def get(self, path: str, stat: os.stat_result) -> tuple[str | None, str | None] | None:
        """(digest, error) remembered for this version of the file, or None."""
        record = self.records.get(path)
        if record and record[0] == stat.st_size and record[1] == stat.st_mtime_ns:
            return record[2], record[3]
        return None

    def put(self, path: str, stat: os.stat_result, digest: str | None, error: str | None) -> None:
        self.records[path] = [stat.st_size, stat.st_mtime_ns, digest, error]

    def save(self) -> None:
        data = json.dumps(self.records, separators=(",", ":")).encode()
        try_atomic_write(self.file, data, "scan", self.cache_root)


def content_digest(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def _short_hash(text: str) -> str:
    return hashlib.blake2b(text.encode(), digest_size=8).hexdigest()
