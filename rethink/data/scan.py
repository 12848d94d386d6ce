"""Find the unreadable files of a data set before training starts, not in the middle of epoch 7.

Every image is decoded in full once (JPEGs at 1/8 scale, which still reads every byte), on a few
threads; what was found (content hash, why it does not decode, the image's size) is remembered under
`data.cache_dir` by path, size and modification time, saved as it is found, so scanning an unchanged
folder again decodes nothing and a scan cut short continues where it stopped. A file that cannot be
decoded is remembered as such; one that cannot be read at all (I/O error, permissions) is skipped in
this run only.

Under torchrun the processes share the work (`Share`): each checks every world_size-th file of those
not remembered yet, saves what it found, and after a barrier reads what the others found, so every
file is read once in total, and no process waits for another to scan everything.
"""

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, TypeVar

from tqdm import tqdm

from .cache import ScanRecords, content_digest
from .images import inspect_image

log = logging.getLogger("rethink")

T = TypeVar("T")
CHUNK = 1024  # files handed to the threads at a time: bounded memory at any number of files
SAVE_EVERY, SAVE_SECONDS = 10_000, 60.0  # what was found is saved this often: a kill loses at most that


@dataclass(frozen=True)
class ScanResult:
    digests: dict[str, str]  # usable file (relative path) -> content hash
    skipped: dict[str, str]  # file that cannot be read or decoded (relative path) -> why
    sizes: dict[str, tuple[int, int]]  # usable file (relative path) -> (width, height), EXIF orientation applied


def _alone() -> None:
    pass


@dataclass(frozen=True)
class Share:
    """This process's part of work shared by torchrun's processes: `rank` of `count`, and `wait`, which
    returns once every process has called it (a barrier). The default: one process alone."""

    rank: int = 0
    count: int = 1
    wait: Callable[[], None] = _alone

    def first(self, work: Callable[[], T]) -> T:
        """`work()` in rank 0 first, then in the others (a download: they find it done)."""
        if self.rank != 0:
            self.wait()
        result = work()
        if self.rank == 0:
            self.wait()
        return result


ALONE = Share()


def scan_images(folder: Path, relpaths: list[str], cache_root: Path, share: Share = ALONE) -> ScanResult:
    records = ScanRecords(cache_root, folder, SAVE_EVERY, SAVE_SECONDS)
    stats, found = {}, {}
    for rel in relpaths:
        try:
            stat = os.stat(folder / rel)
            stats[rel] = (stat.st_size, stat.st_mtime_ns)
            found[rel] = records.get(rel, stats[rel])
        except OSError as e:  # a dangling link, a file gone since the listing
            found[rel] = (None, f"cannot read: {e.strerror or e}", None)
    unknown = [rel for rel, result in found.items() if result is None]
    share.wait()  # every process has read the records before any adds to them: they agree on `unknown`
    mine = unknown[share.rank :: share.count]
    if mine:
        shared = f", {len(unknown)} among {share.count} processes" if share.count > 1 else ""
        log.info(f"checking {len(mine)} images in {folder}{shared} (once; remembered in {records.directory.parent})")
        _check_all(folder, mine, stats, records, found)
    if share.count > 1:
        share.wait()  # every share is saved
        if unknown:
            _gather_shares(folder, unknown, stats, cache_root, found, compact=share.rank == 0)
    elif unknown:
        records.compact()
    digests = {rel: digest for rel, (digest, error, size) in found.items() if error is None}
    skipped = {rel: error for rel, (digest, error, size) in found.items() if error is not None}
    sizes = {rel: size for rel, (digest, error, size) in found.items() if error is None}
    return ScanResult(digests, skipped, sizes)


def _check_all(folder: Path, relpaths: list[str], stats: dict, records: ScanRecords, found: dict) -> None:
    """Check `relpaths` on a few threads, a chunk at a time, into `found` and `records` (saved as they go, and
    whatever was found when the scan stops, interrupted or not)."""
    try:
        with (
            ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool,
            tqdm(total=len(relpaths), desc="scan", unit="img", disable=None) as bar,
        ):
            for start in range(0, len(relpaths), CHUNK):
                chunk = relpaths[start : start + CHUNK]
                for rel, result in zip(chunk, pool.map(lambda rel: _check(folder / rel), chunk)):
                    found[rel] = result
                    records.put(rel, stats[rel], *result)
                    bar.update()
    finally:
        records.save()


def _gather_shares(folder: Path, unknown: list[str], stats: dict, cache_root: Path, found: dict, compact: bool) -> None:
    """The other processes' findings, from their saved records; a file none of them could read is tried here.
    `compact`: then gather the records into one file (rank 0; the others read on unharmed)."""
    records = ScanRecords(cache_root, folder, SAVE_EVERY, SAVE_SECONDS)
    missing = []
    for rel in unknown:
        if found.get(rel) is None:
            found[rel] = records.get(rel, stats[rel])
            if found[rel] is None:
                missing.append(rel)
    if missing:
        log.info(f"checking {len(missing)} images the other processes could not read or record")
        _check_all(folder, missing, stats, records, found)
    if compact:
        records.compact()


def _check(path: Path) -> tuple[str | None, str | None, tuple[int, int] | None]:
    """(content hash, why the file cannot be used or None, its upright (width, height) or None); the hash is None
    when it could not be read."""
    try:
        data = path.read_bytes()
    except OSError as e:
        return None, f"cannot read: {e.strerror or e}", None
    size, error = inspect_image(data)
    return content_digest(data), error, size
