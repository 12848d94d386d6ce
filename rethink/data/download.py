"""Downloads that are verified by checksum, and archives extracted without path traversal."""

import hashlib
import os
import tarfile
import tempfile
import urllib.error
import urllib.request
from pathlib import Path, PurePosixPath

from tqdm import tqdm

from ..errors import UserError

CHUNK = 1 << 20


class DownloadFailed(Exception):
    """The network or the server failed (not the user): the caller says what to do instead."""


def download(url: str, dest: Path, sha256: str) -> None:
    """Fetch `url` into `dest`: into a temporary file beside it first, with a progress bar, then renamed
    once its sha256 matches. A mismatch deletes the temporary file and is a UserError."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    try:
        digest = hashlib.sha256()
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=60) as response:
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=f"download {dest.name}") as bar:
                while chunk := response.read(CHUNK):
                    out.write(chunk)
                    digest.update(chunk)
                    bar.update(len(chunk))
        if digest.hexdigest() != sha256:
            raise UserError(f"{url}: the download's sha256 is {digest.hexdigest()}, expected {sha256}; deleted it, run again to retry")
        os.replace(tmp, dest)
    except (urllib.error.URLError, OSError) as e:
        raise DownloadFailed(str(getattr(e, "reason", None) or e)) from e
    finally:
        Path(tmp).unlink(missing_ok=True)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def safe_extract(archive: Path, dest: Path) -> None:
    """Extract a tar archive into `dest`, refusing absolute paths, `..`, links that point outside
    `dest` and special files (our own check first, then tarfile's "data" filter where it exists)."""
    try:
        with tarfile.open(archive) as tar:
            members = tar.getmembers()
            for member in members:
                problem = _unsafe(member)
                if problem:
                    raise UserError(f"{archive}: refusing to extract {member.name!r} ({problem}); this is not the expected archive")
            if hasattr(tarfile, "data_filter"):
                tar.extractall(dest, members, filter="data")
            else:
                tar.extractall(dest, members)
    except (tarfile.TarError, EOFError) as e:  # tarfile.FilterError is a TarError
        raise UserError(f"{archive}: cannot extract it ({e}); delete it and run again") from None


def _unsafe(member: tarfile.TarInfo) -> str | None:
    if _escapes(member.name, relative_to="."):
        return "a path outside the target folder"
    if member.issym() and _escapes(member.linkname, relative_to=str(PurePosixPath(member.name).parent)):
        return f"a link to {member.linkname}, outside the target folder"
    if member.islnk() and _escapes(member.linkname, relative_to="."):
        return f"a hard link to {member.linkname}, outside the target folder"
    if member.isdev() or member.isfifo():
        return "a device or pipe"
    return None


def _escapes(name: str, relative_to: str) -> bool:
    path = PurePosixPath(name.replace("\\", "/"))
    if path.is_absolute() or (path.parts and path.parts[0].endswith(":")):  # /etc, C:...
        return True
    depth = len(PurePosixPath(relative_to).parts) if relative_to != "." else 0
    for part in path.parts:
        depth += -1 if part == ".." else 0 if part == "." else 1
        if depth < 0:
            return True
    return False
