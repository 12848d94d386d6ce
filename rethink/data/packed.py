"""Packed data sets: a folder of images written once into tar shards with an index, so that a run starts
in seconds at any size, on every rank, without listing, stating or hashing a file.

    python run.py task=pack data=folder data.root=/data/imagenet pack.out=/data/imagenet.pack
    python run.py data=folder data.root=/data/imagenet.pack ...      # a run on it (any data.* preset)

A pack is WebDataset's format (shards/shard-NNNNNN.tar holding <key>.<ext> with the file's original
bytes and <key>.cls with its label), so tar, WebDataset and wids read it as they are; beside the shards,
index.npz holds every listed file's name, label, given split, content hash, image size and where its
bytes lie (shard, offset, length), and pack.json what the pack is (classes, source, counts, unreadable
files and why, how long packing took). A run reads an image with one positioned read (os.pread) at the
offset the index records: no shard is parsed at start-up or opened whole.

Packing is the scan (data/scan.py) done once: every file read, hashed and decoded in full (JPEGs at 1/8),
in parallel, one shard per worker task; each finished shard is kept (its tar and its part of the index),
so a pack that is killed continues where it stopped. A run on the pack gets the same split, the same
batches and, decoding the same bytes the same way, the same pixels as a run on the folder.
"""

import hashlib
import io
import json
import logging
import os
import shutil
import tarfile
import time
from collections import OrderedDict
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

from ..atomic import atomic_write, atomic_write_json
from ..errors import UserError
from .cache import content_digest
from .folder import Listing
from .images import DECODER, inspect_image
from .scan import ScanResult
from .splits import SPLITS

log = logging.getLogger("rethink")

FORMAT = "rethink-pack"
VERSION = 1
DESCRIPTION = "pack.json"  # written last: a folder with it is a finished pack
_SPLIT_CODES = {None: -1, **{split: code for code, split in enumerate(SPLITS)}}


def is_pack(folder: Path) -> bool:
    return (Path(folder) / DESCRIPTION).is_file()


@dataclass(frozen=True)
class Pack:
    """A finished pack, as a run reads it: the listing and the scan's findings come from its index."""

    folder: Path
    classes: list[str]
    names: np.ndarray  # bytes (utf-8), every listed file's path relative to the source folder
    labels: np.ndarray  # int32
    given_splits: np.ndarray  # int8: -1 (not split), 0 train, 1 val, 2 test
    digests: np.ndarray  # bytes, the content hash (b"" where the file could not be read)
    errors: dict[str, str]  # name -> why it cannot be used, for the listed files that cannot
    shards: np.ndarray  # int32, -1 where the file's bytes are not in the pack
    offsets: np.ndarray  # int64
    sizes: np.ndarray  # int64
    widths: np.ndarray  # int32, the image's size as decoded (EXIF orientation applied); 0 where unusable
    heights: np.ndarray
    shard_files: list[str]  # relative to the folder, by shard number

    @cached_property
    def name_list(self) -> list[str]:
        return [name.decode() for name in self.names.tolist()]

    def listing(self) -> Listing:
        return Listing(
            self.folder,
            self.classes,
            self.name_list,
            self.labels.tolist(),
            [SPLITS[code] if code >= 0 else None for code in self.given_splits.tolist()],
        )

    def scan_result(self) -> ScanResult:
        names, usable = self.name_list, np.flatnonzero(self.shards >= 0).tolist()
        digests = dict(zip((names[i] for i in usable), self.digests[usable].astype(str).tolist()))
        sizes = dict(zip((names[i] for i in usable), zip(self.widths[usable].tolist(), self.heights[usable].tolist())))
        return ScanResult(digests, dict(self.errors), sizes)

    @cached_property
    def _position(self) -> dict[bytes, int]:
        return {name: i for i, name in enumerate(self.names.tolist())}

    def locations(self, names: list[str]) -> "ShardLocations":
        """Where the bytes of each of `names` lie, in that order."""
        chosen = np.array([self._position[name.encode()] for name in names], dtype=np.int64)
        return ShardLocations(
            self.folder, self.shard_files, self.shards[chosen], self.offsets[chosen], self.sizes[chosen]
        )


class ShardLocations:
    """The bytes of a data set's images in a pack's shards, read with one os.pread each. Each process (a loader
    worker is one) opens the shards it reads, keeping at most `open_files` open at once."""

    def __init__(self, folder: Path, shard_files: list[str], shards, offsets, sizes, open_files: int = 64):
        self.folder = Path(folder)
        self.shard_files = list(shard_files)
        self.shards, self.offsets, self.sizes = shards, offsets, sizes
        self.open_files = open_files
        self._files: OrderedDict[int, int] = OrderedDict()
        self._pid = os.getpid()

    def __len__(self) -> int:
        return len(self.shards)

    def read(self, index: int) -> bytes:
        shard, offset, size = int(self.shards[index]), int(self.offsets[index]), int(self.sizes[index])
        data = os.pread(self._descriptor(shard), size, offset)
        if len(data) != size:
            raise UserError(f"{self.folder / self.shard_files[shard]}: ends early; the pack is damaged, pack it again")
        return data

    def _descriptor(self, shard: int) -> int:
        if self._pid != os.getpid():  # a forked loader worker: its parent's descriptors are not its own to move
            self._files, self._pid = OrderedDict(), os.getpid()
        fd = self._files.get(shard)
        if fd is None:
            path = self.folder / self.shard_files[shard]
            try:
                fd = os.open(path, os.O_RDONLY)
            except OSError as e:
                raise UserError(f"{path}: cannot open the pack's shard ({e.strerror or e})") from None
            self._files[shard] = fd
            if len(self._files) > self.open_files:
                os.close(self._files.popitem(last=False)[1])
        self._files.move_to_end(shard)
        return fd

    def __getstate__(self):  # sent to a spawned worker without its open files
        return {**self.__dict__, "_files": OrderedDict(), "_pid": None}

    def __del__(self):
        if getattr(self, "_pid", None) == os.getpid():
            for fd in self._files.values():
                os.close(fd)


def read_pack(folder: Path) -> Pack:
    folder = Path(folder)
    try:
        description = json.loads((folder / DESCRIPTION).read_text())
        index = np.load(folder / "index.npz", allow_pickle=False)
    except (OSError, ValueError) as e:
        raise UserError(f"data.root={folder}: not a readable pack ({e}); pack it again with task=pack") from None
    if description.get("format") != FORMAT or description.get("version") != VERSION:
        raise UserError(
            f"data.root={folder}: {DESCRIPTION} is not a {FORMAT} version {VERSION}; pack the data set again with task=pack"
        )
    return Pack(
        folder,
        description["classes"],
        index["names"],
        index["labels"],
        index["given_splits"],
        index["digests"],
        description["unusable"],
        index["shards"],
        index["offsets"],
        index["sizes"],
        index["widths"],
        index["heights"],
        [shard["url"] for shard in description["shardlist"]],
    )


# Packing


def pack_listing(listing: Listing, out: Path, files_per_shard: int, workers: int) -> dict:
    """Write `listing`'s files into a pack at `out`; returns pack.json's content. A pack left unfinished at `out`
    (killed, out of time) is continued: the shards it finished are kept, when it was packing the same files."""
    out = Path(out)
    if is_pack(out):
        raise UserError(f"pack.out={out}: already holds a finished pack; remove it or choose another folder")
    if out.exists() and any(out.iterdir()) and not (out / "parts").is_dir():
        raise UserError(f"pack.out={out}: a folder that is not empty and not a pack; choose another folder")
    plan = _plan(listing, files_per_shard)
    parts = out / "parts"
    _start_or_continue(parts, plan)
    todo = [k for k in range(len(plan["shards"])) if not (parts / f"{k:06d}.npz").is_file()]
    started = time.perf_counter()
    if len(todo) < len(plan["shards"]):
        log.info(f"pack.out={out}: continuing an unfinished pack ({len(plan['shards']) - len(todo)} shards done)")
    log.info(f"packing {len(listing.paths)} files of {listing.root} into {len(todo)} shards with {workers} processes")
    jobs = [
        (
            listing.root,
            [listing.paths[i] for i in plan["shards"][k]],
            [listing.labels[i] for i in plan["shards"][k]],
            out,
            k,
        )
        for k in todo
    ]
    if workers > 1 and len(jobs) > 1:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            for k in pool.map(_pack_shard_job, jobs):
                log.info(f"shard {k + 1}/{len(plan['shards'])} packed")
    else:
        for job in jobs:
            _pack_shard_job(job)
    seconds = time.perf_counter() - started
    description = _finish(listing, plan, out, seconds, sum(len(plan["shards"][k]) for k in todo))
    shutil.rmtree(parts)
    return description


def _plan(listing: Listing, files_per_shard: int) -> dict:
    """Which files each shard holds: consecutive runs of the sorted listing. Its hash tells an unfinished pack of
    the same files from another."""
    shards = [
        list(range(i, min(i + files_per_shard, len(listing.paths))))
        for i in range(0, len(listing.paths), files_per_shard)
    ]
    digest = hashlib.sha256("\n".join(listing.paths).encode())
    digest.update(f"{files_per_shard} {DECODER}".encode())
    return {"shards": shards, "hash": digest.hexdigest()[:16]}


def _start_or_continue(parts: Path, plan: dict) -> None:
    marker = parts / "plan.txt"
    if parts.is_dir():
        if marker.is_file() and marker.read_text() == plan["hash"]:
            return
        log.warning(f"{parts.parent}: an unfinished pack of other files (or shard sizes) is here; starting over")
        shutil.rmtree(parts)
        shutil.rmtree(parts.parent / "shards", ignore_errors=True)
    parts.mkdir(parents=True)
    marker.write_text(plan["hash"])


def _pack_shard_job(job) -> int:
    root, names, labels, out, number = job
    _pack_shard(root, names, labels, out, number)
    return number


def _pack_shard(root: Path, names: list[str], labels: list[int], out: Path, number: int) -> None:
    """One shard: each file read, hashed and checked (decoded in full); the readable ones written in order,
    with their label, into shards/shard-NNNNNN.tar; then the shard's part of the index. Both atomically, the
    index part last: its presence says the shard is done."""
    rows = []  # (shard, offset, size, digest, error, width, height) per file

    def write_tar(f) -> None:
        with tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for i, (name, label) in enumerate(zip(names, labels)):
                try:
                    data = (root / name).read_bytes()
                except OSError as e:
                    rows.append((-1, 0, 0, "", f"cannot read: {e.strerror or e}", 0, 0))
                    continue
                (size, error), digest = inspect_image(data), content_digest(data)
                if error is not None:
                    rows.append((-1, 0, 0, digest, error, 0, 0))
                    continue
                key = f"{number:06d}{i:06d}"
                offset = _add_member(tar, f"{key}{Path(name).suffix.lower()}", data)
                _add_member(tar, f"{key}.cls", str(label).encode())  # as WebDataset's readers expect it
                rows.append((number, offset, len(data), digest, None, *size))

    atomic_write(out / "shards" / f"shard-{number:06d}.tar", write_tar, durable=True)
    columns = list(zip(*rows)) if rows else [()] * 7
    part = dict(
        shards=np.array(columns[0], dtype=np.int32),
        offsets=np.array(columns[1], dtype=np.int64),
        sizes=np.array(columns[2], dtype=np.int64),
        digests=np.array(columns[3], dtype="S32"),
        widths=np.array(columns[5], dtype=np.int32),
        heights=np.array(columns[6], dtype=np.int32),
        errors=np.array(json.dumps({name: row[4] for name, row in zip(names, rows) if row[4] is not None})),
    )
    atomic_write(out / "parts" / f"{number:06d}.npz", lambda f: np.savez(f, **part))


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> int:
    """Append a file to `tar`; returns the offset of its bytes in the tar."""
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), 0o644, 0
    tar.addfile(info, io.BytesIO(data))
    return tar.offset - -(-len(data) // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE


def _finish(listing: Listing, plan: dict, out: Path, seconds: float, files_now: int) -> dict:
    """index.npz from the shards' parts, then pack.json (last)."""
    parts = [np.load(out / "parts" / f"{k:06d}.npz") for k in range(len(plan["shards"]))]
    index = {
        column: np.concatenate([p[column] for p in parts]) if parts else np.zeros(0)
        for column in ("shards", "offsets", "sizes", "digests", "widths", "heights")
    }
    unusable = {}
    for part in parts:
        unusable.update(json.loads(str(part["errors"])))
    index.update(
        names=np.array([p.encode() for p in listing.paths], dtype=bytes),
        labels=np.array(listing.labels, dtype=np.int32),
        given_splits=np.array([_SPLIT_CODES[s] for s in listing.splits], dtype=np.int8),
    )
    atomic_write(out / "index.npz", lambda f: np.savez(f, **index), durable=True)
    shard_files = [f"shards/shard-{k:06d}.tar" for k in range(len(plan["shards"]))]
    usable = int((index["shards"] >= 0).sum())
    description = {
        "format": FORMAT,
        "version": VERSION,
        "source": str(listing.root),
        "classes": listing.classes,
        "files": len(listing.paths),
        "packed": usable,
        "unusable": unusable,
        "bytes": int(index["sizes"].sum()),
        "decoder": DECODER,
        "seconds": round(seconds, 3),
        "files_packed_now": files_now,  # the rest were packed by an earlier, unfinished try
        "ms_per_file": round(1000 * seconds / files_now, 3) if files_now else None,
        # WebDataset's shard-list descriptor (wids reads it as it is)
        "wids_version": 1,
        "shardlist": [
            {"url": name, "nsamples": int((index["shards"] == k).sum()), "filesize": (out / name).stat().st_size}
            for k, name in enumerate(shard_files)
        ],
    }
    atomic_write_json(out / DESCRIPTION, description)
    return description
