"""Downloads that are verified by checksum, and archives extracted without path traversal."""

import hashlib
import tarfile
import urllib.error
import urllib.request
from pathlib import Path, PurePosixPath

from tqdm import tqdm

from ..atomic import atomic_write
from ..errors import UserError

CHUNK = 1 << 20


class DownloadFailed(Exception):
    """The network or the server failed (not the user): the caller says what to do instead."""


def download(url: str, dest: Path, sha256: str) -> None:
    """Fetch `url` into `dest` (through a temporary file beside it, with a progress bar), keeping it only
    when its sha256 matches; a mismatch is a UserError."""

    def fetch(out) -> None:
        digest = hashlib.sha256()
        with urllib.request.urlopen(url, timeout=60) as response:
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=f"download {dest.name}") as bar:
                while chunk := response.read(CHUNK):
                    out.write(chunk)
                    digest.update(chunk)
                    bar.update(len(chunk))
        if digest.hexdigest() != sha256:
            raise UserError(
                f"{url}: the download's sha256 is {digest.hexdigest()}, expected {sha256}; deleted it, run again to retry"
            )

    try:
        atomic_write(dest, fetch)
    except (urllib.error.URLError, OSError) as e:
        raise DownloadFailed(str(getattr(e, "reason", None) or e)) from e


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def safe_extract(archive: Path, dest: Path) -> None:
    """Extract a tar archive into `dest`, refusing absolute paths, `..`, links of any kind and special
    files (our own check first, then tarfile's "data" filter where this Python has it)."""
    try:
        with tarfile.open(archive) as tar:
            members = tar.getmembers()
            for member in members:
                problem = _unsafe(member)
                if problem:
                    raise UserError(
                        f"{archive}: refusing to extract {member.name!r} ({problem}); this is not the expected archive"
                    )
            if hasattr(tarfile, "data_filter"):
                tar.extractall(dest, members, filter="data")
            else:
                tar.extractall(dest, members)
    except (tarfile.TarError, EOFError) as e:  # tarfile.FilterError is a TarError
        raise UserError(f"{archive}: cannot extract it ({e}); delete it and run again") from None


def _unsafe(member: tarfile.TarInfo) -> str | None:
    """Why extracting `member` could write outside the target folder, or None. Links are refused
    outright: an image data set has no use for them, and chains of them can escape any per-link check."""
    path = PurePosixPath(member.name.replace("\\", "/"))
    if path.is_absolute() or (path.parts and path.parts[0].endswith(":")) or ".." in path.parts:  # /etc, C:, ../
        return "a path outside the target folder"
    if member.issym() or member.islnk():
        return f"a link to {member.linkname}"
    if not (member.isfile() or member.isdir()):
        return "a device, pipe or other special file"
    return None
