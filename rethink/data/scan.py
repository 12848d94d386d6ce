"""Find the unreadable files of a data set before training starts, not in the middle of epoch 7.

Every image is decoded in full once (JPEGs at 1/8 scale, which still reads every byte), on a few
threads; what was found is remembered under `data.cache_dir` by path, size and modification time, so
scanning an unchanged folder again decodes nothing. A file that cannot be decoded is remembered as
such; one that cannot be read at all (I/O error, permissions) is skipped in this run only.
"""

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from .cache import ScanRecords, content_digest
from .images import decode_error

log = logging.getLogger("rethink")


@dataclass(frozen=True)
class ScanResult:
    digests: dict[str, str]  # usable file (relative path) -> content hash
    skipped: dict[str, str]  # file that cannot be read or decoded (relative path) -> why


def scan_images(folder: Path, relpaths: list[str], cache_root: Path) -> ScanResult:
    records = ScanRecords(cache_root, folder)
    stats, found = {}, {}
    for rel in relpaths:
        try:
            stats[rel] = os.stat(folder / rel)
            found[rel] = records.get(rel, stats[rel])
        except OSError as e:  # a dangling link, a file gone since the listing
            found[rel] = (None, f"cannot read: {e.strerror or e}")
    unknown = [rel for rel, result in found.items() if result is None]
    if unknown:
        log.info(f"checking {len(unknown)} images in {folder} (once; remembered in {records.file.parent})")
        with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
            checks = pool.map(lambda rel: _check(folder / rel), unknown)
            for rel, result in zip(unknown, tqdm(checks, total=len(unknown), desc="scan", unit="img", disable=None)):
                found[rel] = result
                records.put(rel, stats[rel], *result)
        records.save()
    digests = {rel: digest for rel, (digest, error) in found.items() if error is None}
    skipped = {rel: error for rel, (digest, error) in found.items() if error is not None}
    return ScanResult(digests, skipped)


def _check(path: Path) -> tuple[str | None, str | None]:
    """(content hash, why the file cannot be used or None); the hash is None when it could not be read."""
    try:
        data = path.read_bytes()
    except OSError as e:
        return None, f"cannot read: {e.strerror or e}"
    return content_digest(data), decode_error(data)
