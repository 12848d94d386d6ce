"""On-disk caches under `data.cache_dir`: decoded images, and what a scan found.

Decoded images are keyed by the file's content hash, the shorter side they were decoded to and the decoder
(images.DECODER: a new decode or Pillow gets fresh entries), so one
entry serves every epoch, every job of a sweep and every copy of the same file. The cache only
remembers what the decode returned, bit for bit: a run gets the same pixels with it or without it.
Every write goes to a temporary file that is then renamed, so concurrent loader workers and jobs never
see half a file. A write that fails (disk full, read-only folder) is reported once and the run carries
on uncached.

The disk it may take is decided before a run reads anything (`cache_decision`): data.cache=auto turns the cache
on only where the entries this run still lacks (estimated from the images' sizes) fit half the free space of
the file system holding data.cache_dir and data.cache_max_gb; data.cache=true turns it off only where they do
not fit the free space at all. Either way one line says what was decided. data.cache_max_gb also stops the
writing once the run's entries reach it (`ImageCache.room`): the run goes on, uncached for the rest.
"""

import hashlib
import io
import json
import logging
import math
import multiprocessing
import os
import time
from pathlib import Path
from typing import Callable, Iterable, Optional

import numpy as np
import torch

from ..atomic import atomic_write_bytes
from .images import DECODER, shorter_side_size

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


NPY_HEADER_BYTES = 128  # what np.save writes before a uint8 HxWx3 array's pixels (its header, padded to 64 bytes)
# data.cache=auto takes at most this share of the free space: the run's checkpoints need room too
FREE_SPACE_SHARE = 0.5


def entry_bytes(width: int, height: int, stored_side: int) -> int:
    """The size of the cache entry of an image of (width, height) pixels decoded at `stored_side`."""
    width, height = shorter_side_size(width, height, stored_side)
    return width * height * 3 + NPY_HEADER_BYTES


def estimate_cache_bytes(sizes: Iterable[tuple[int, int]], stored_side: int) -> int:
    """The bytes the cache entries of images of these (width, height) sizes take, each decoded at `stored_side`."""
    return sum(entry_bytes(width, height, stored_side) for width, height in sizes)


def size_text(size: float) -> str:
    return f"{size / 1e6:.1f} MB" if size < 1e9 else f"{size / 1e9:.2f} GB"


def cache_decision(
    setting,
    estimate_bytes: int,
    free_bytes: int,
    cap_bytes: Optional[int],
    *,
    present_bytes: int = 0,
    images: int = 0,
    where: str = "the cache folder",
) -> tuple[bool, str]:
    """Whether the decoded-image cache is on, and the line that says why. `setting`: data.cache (True, False or
    "auto"); `estimate_bytes`: the entries of the `images` images this run still lacks; `free_bytes`: the free
    space of the file system holding the cache folder `where`; `cap_bytes`: data.cache_max_gb in bytes (None: no
    cap), against which the run's entries already there (`present_bytes`) count. Nothing left to write: on."""
    if setting is False:
        return False, ""
    shown = "true" if setting is True else "auto"
    if estimate_bytes == 0:
        return True, f"data.cache={shown}: on, every image is cached in {where} ({size_text(present_bytes)})"
    room = math.inf if cap_bytes is None else cap_bytes - present_bytes
    needs = f"{images} images not cached yet need ~{size_text(estimate_bytes)} in {where}"
    free = f"{size_text(free_bytes)} free there"
    capped = (
        "" if cap_bytes is None else f", data.cache_max_gb={cap_bytes / 1e9:g} with {size_text(present_bytes)} cached"
    )
    budget = free_bytes if setting is True else min(free_bytes * FREE_SPACE_SHARE, room)
    if estimate_bytes > budget:
        share, insist = (
            ("the", "")
            if setting is True
            else (
                f"{FREE_SPACE_SHARE:.0%} of the",
                "a larger data.cache_max_gb allows it, " if estimate_bytes > room else "data.cache=true insists, ",
            )
        )
        return False, (
            f"data.cache={shown}: off, {needs}, more than {share} {free}{capped}; the run goes on uncached "
            f"({insist}data.cache_dir=PATH on a larger disk moves it)"
        )
    stops = "; data.cache_max_gb stops the writing before the end" if estimate_bytes > room else ""
    return True, (
        f"data.cache={shown}: on, {needs} ({free}{capped}): each is decoded into the cache the first time it is "
        f"read (a slower first pass), later passes and runs read it back{stops}"
    )


class ImageCache:
    """Decoded images as uint8 HxWx3 .npy files, one folder per shorter side. `room`: the bytes it may still
    write (data.cache_max_gb less what is there; None: no cap), counted over this process and every loader
    worker it starts; once a write would pass it, the writing stops, with one warning."""

    def __init__(self, directory: Path, room: Optional[int] = None):
        self.directory = Path(directory)
        self.writable = True
        self.room = room
        self._written = None if room is None else multiprocessing.Value("q", 0)  # shared with forked workers
        self._warned = None if room is None else multiprocessing.Value("b", 0)

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
            data = buffer.getvalue()
            if self._fits(len(data)):
                self.writable = try_atomic_write(entry, data, "image", self.directory)
        return image

    def _fits(self, size: int) -> bool:
        """Whether an entry of `size` bytes stays within the room; counted as written if so."""
        if self.room is None:
            return True
        with self._written.get_lock():
            if self._written.value + size <= self.room:
                self._written.value += size
                return True
            first, self._warned.value = not self._warned.value, 1
        self.writable = False
        if first:
            log.warning(
                f"data.cache_max_gb: the image cache in {self.directory} reached its cap; the run goes on, decoding "
                "the images not cached yet each time (a larger data.cache_max_gb, or null, caches them)"
            )
        return False


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
