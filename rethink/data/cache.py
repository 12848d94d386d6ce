"""On-disk caches under `data.cache_dir`: decoded images, and what a scan found.

Decoded images are keyed by the file's content hash, the shorter side they were decoded to and the decoder
(images.DECODER: a new decode or Pillow gets fresh entries), so one
entry serves every epoch, every job of a sweep and every copy of the same file. The cache only
remembers what the decode returned, bit for bit: a run gets the same pixels with it or without it.
Every write goes to a temporary file that is then renamed, so concurrent loader workers and jobs never
see half a file. A write that fails (disk full, read-only folder) is reported once and the run carries
on uncached.
"""

import hashlib
import io
import json
import logging
import os
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..atomic import atomic_write_bytes
from .images import DECODER

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
            log.warning(
                f"cannot write the {what} cache in {cache_root} ({e.strerror or e}); carrying on without it (set data.cache_dir)"
            )
        return False


class ImageCache:
    """Decoded images as uint8 HxWx3 .npy files, one folder per shorter side."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        self.writable = True

    def folder(self, shorter_side: int) -> Path:
        """One folder per shorter side and decoder: an entry another decoder made is never read back as this one's."""
        return self.directory / f"side{shorter_side}-{DECODER}"

    def entry(self, digest: str, shorter_side: int) -> Path:
        return self.folder(shorter_side) / digest[:2] / f"{digest}.npy"

    def get(self, digest: str, shorter_side: int, decode: Callable[[], torch.Tensor]) -> torch.Tensor:
        """The image whose content hash is `digest`, as `decode()` (uint8 3xHxW) returned it when it
        was first asked for."""
        entry = self.entry(digest, shorter_side)
        try:
            return torch.from_numpy(np.load(entry)).permute(2, 0, 1)
        except (OSError, ValueError, EOFError):  # not cached yet (or unreadable: rewrite it)
            pass
        image = decode()
        if self.writable:
            buffer = io.BytesIO()
            np.save(buffer, image.permute(1, 2, 0).contiguous().numpy())
            self.writable = try_atomic_write(entry, buffer.getvalue(), "image", self.directory)
        return image


class ScanRecords:
    """What a scan found for each file, keyed by path, size and modification time, so that a second
    scan of an unchanged folder decodes nothing. One JSON file per scanned folder. Only files that
    were read are remembered (with their content hash): a read that failed (EIO, a network file
    system's hiccup, permissions, which chmod changes without touching the modification time) may
    succeed next time, so it is tried again."""

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
        if record and record[0] == stat.st_size and record[1] == stat.st_mtime_ns and record[2] is not None:
            return record[2], record[3]
        return None  # unknown, changed, or a read failure that older versions remembered

    def put(self, path: str, stat: os.stat_result, digest: str | None, error: str | None) -> None:
        """Remember a file's (content hash, why it cannot be decoded or None); a file that could not
        be read (no hash) is forgotten instead."""
        if digest is None:
            self.records.pop(path, None)
        else:
            self.records[path] = [stat.st_size, stat.st_mtime_ns, digest, error]

    def save(self) -> None:
        data = json.dumps(self.records, separators=(",", ":")).encode()
        try_atomic_write(self.file, data, "scan", self.cache_root)


def content_digest(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def _short_hash(text: str) -> str:
    return hashlib.blake2b(text.encode(), digest_size=8).hexdigest()
