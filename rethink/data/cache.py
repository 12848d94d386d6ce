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
import time
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
    scan of an unchanged folder decodes nothing: its content hash, why it does not decode (or None) and
    its upright (width, height). Only files that were read are remembered: a read that failed (EIO, a
    network file system's hiccup, permissions, which chmod changes without touching the modification
    time) may succeed next time, so it is tried again.

    Kept in one folder per scanned folder and record version, as part files of compact JSON columns that
    are only ever added whole (atomically) and read together, a later one over an earlier: a scan saves what it found
    every `flush_every` files or `flush_seconds` (so a kill keeps it), each process of a torchrun world its
    own parts, and at its end gathers its parts into one. `compact()` gathers every part into one file."""

    VERSION = 2  # 2: with the image's size (version 1, one JSON object without sizes, is scanned again)

    def __init__(self, cache_root: Path, folder: Path, flush_every: int = 10_000, flush_seconds: float = 60.0):
        self.cache_root = Path(cache_root)
        key = _short_hash(str(Path(folder).resolve()))
        self.directory = self.cache_root / "scans" / f"{key}-v{self.VERSION}"
        self.flush_every, self.flush_seconds = flush_every, flush_seconds
        self.records, self.loaded_parts = _read_parts(self.directory)
        self.pending: dict[str, tuple] = {}  # found, not saved yet
        self.saved_parts: list[Path] = []  # what this object saved so far, gathered into one by save()
        self.last_flush = time.monotonic()

    def get(self, path: str, stat: tuple[int, int]) -> tuple[str, str | None, tuple[int, int] | None] | None:
        """(digest, error, (width, height) or None) remembered for this version (size, mtime_ns) of the file, or None."""
        record = self.records.get(path)
        if record and record[0] == stat[0] and record[1] == stat[1]:
            return record[2], record[3], (record[4], record[5]) if record[4] else None
        return None  # unknown or changed

    def put(
        self, path: str, stat: tuple[int, int], digest: str | None, error: str | None, size: tuple[int, int] | None
    ) -> None:
        """Remember a file's (content hash, why it cannot be decoded or None, size or None); a file that could
        not be read (no hash) is forgotten instead. Saves when enough was found since the last save."""
        if digest is None:
            self.records.pop(path, None)
            return
        width, height = size or (0, 0)
        self.records[path] = self.pending[path] = (stat[0], stat[1], digest, error, width, height)
        if len(self.pending) >= self.flush_every or time.monotonic() - self.last_flush >= self.flush_seconds:
            self.flush()

    def flush(self) -> None:
        """Save what was found since the last save, as a part file of its own."""
        if self.pending and self._write(self.pending):
            self.pending = {}
        self.last_flush = time.monotonic()

    def save(self) -> None:
        """Save what this scan found, as one part file (its earlier parts gathered into it)."""
        if not self.saved_parts:
            self.flush()
            return
        mine = {}
        for part in self.saved_parts:
            mine.update(_read_part(part))
        mine.update(self.pending)
        earlier, self.saved_parts = self.saved_parts, []
        if self._write(mine):
            self.pending = {}
            _remove(earlier)

    def compact(self) -> None:
        """Gather every part file this object read or wrote into one (every record kept until the new file is in place)."""
        parts = self.loaded_parts + self.saved_parts
        if len(parts) + bool(self.pending) <= 1:
            return
        self.saved_parts = []
        if self._write(dict(self.records)):
            self.pending, self.loaded_parts = {}, []
            _remove(parts)

    def _write(self, records: dict[str, tuple]) -> bool:
        part = self.directory / f"{time.time_ns():020d}-{os.getpid()}-{len(self.saved_parts)}.json"
        columns = {
            "paths": list(records),
            "sizes": [r[0] for r in records.values()],
            "mtimes": [r[1] for r in records.values()],
            "digests": [r[2] for r in records.values()],
            "widths": [r[4] for r in records.values()],
            "heights": [r[5] for r in records.values()],
            "errors": {str(i): r[3] for i, r in enumerate(records.values()) if r[3] is not None},
        }
        data = json.dumps(columns, separators=(",", ":")).encode()
        if try_atomic_write(part, data, "scan", self.cache_root):
            self.saved_parts.append(part)
            return True
        return False


def _read_parts(directory: Path) -> tuple[dict[str, tuple], list[Path]]:
    """Every part file's records (a later part's over an earlier's) and the parts read. A part that vanishes
    meanwhile (gathered into another by a process beside this one) means reading the folder again."""
    for _ in range(5):
        try:
            parts = sorted(directory.glob("*.json"))
            records = {}
            for part in parts:
                records.update(_read_part(part))
            return records, parts
        except FileNotFoundError:
            continue
    return {}, []


def _read_part(part: Path) -> dict[str, tuple]:
    """A part file's records: path -> (size, mtime_ns, digest, error, width, height), width and height 0 when not
    known; {} when unreadable. (Built by zip, in C: 1.28M records in seconds.)"""
    try:
        columns = json.loads(part.read_bytes())
        errors = [None] * len(columns["paths"])
        for index, error in columns["errors"].items():
            errors[int(index)] = error
        values = zip(
            columns["sizes"], columns["mtimes"], columns["digests"], errors, columns["widths"], columns["heights"]
        )
        return dict(zip(columns["paths"], values))
    except FileNotFoundError:
        raise
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def _remove(parts: list[Path]) -> None:
    for part in parts:
        try:
            part.unlink()
        except OSError:
            pass


def content_digest(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def _short_hash(text: str) -> str:
    return hashlib.blake2b(text.encode(), digest_size=8).hexdigest()
