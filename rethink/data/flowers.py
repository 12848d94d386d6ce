"""tf_flowers: 3,670 photos of five flowers, downloaded once (228 MB, verified by sha256) into data.root.

data.root may be an extracted flower_photos folder (class folders directly inside), a folder holding
flower_photos/ or flower_photos.tgz, or empty (then the archive is downloaded into it).
"""

import shutil
import tempfile
from pathlib import Path

from ..environment import downloads_allowed
from ..errors import UserError
from .download import DownloadFailed, download, safe_extract, sha256_of

URL = "https://storage.googleapis.com/download.tensorflow.org/example_images/flower_photos.tgz"
SHA256 = "4c54ace7911aaffe13a365c34f650e71dd5bf1be0a58b464e5a7183e3e595d9c"
ARCHIVE = "flower_photos.tgz"
FOLDER = "flower_photos"
CLASSES = ("daisy", "dandelion", "roses", "sunflowers", "tulips")


def locate_flowers(root: Path) -> Path:
    """The extracted flower_photos folder, downloading and extracting it into `root` when needed."""
    if any((root / name).is_dir() for name in CLASSES):
        return root
    folder = root / FOLDER
    if folder.is_dir():
        return folder
    archive = root / ARCHIVE
    if archive.is_file():
        if sha256_of(archive) != SHA256:
            raise UserError(
                f"{archive}: sha256 differs from the published {SHA256[:12]}...; delete the file (it is damaged or another archive) and run again"
            )
    else:
        _download(archive)
    _extract(archive, folder)
    return folder


def _local_copy_hint(root: Path) -> str:
    return (
        f"set data.root to an extracted {FOLDER} folder or to a folder holding {ARCHIVE} "
        f"(now {root}), or use data=synthetic"
    )


def _download(archive: Path) -> None:
    root = archive.parent
    if not downloads_allowed():
        raise UserError(
            f"data=flowers: no {FOLDER}/ or {ARCHIVE} in {root} and downloads are off (RETHINK_NO_DOWNLOAD=1); {_local_copy_hint(root)}"
        )
    try:
        download(URL, archive, SHA256)
    except DownloadFailed as e:
        raise UserError(f"data=flowers: cannot download {URL} ({e}); {_local_copy_hint(root)}") from None


def _extract(archive: Path, folder: Path) -> None:
    """Extract into a temporary folder beside `folder`, then rename: an interrupted extraction leaves
    no half-filled flower_photos/ behind, and two jobs extracting at once do not collide."""
    staging = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{FOLDER}."))
    try:
        safe_extract(archive, staging)
        extracted = staging / FOLDER
        if not extracted.is_dir():
            raise UserError(f"{archive}: holds no {FOLDER}/ folder; delete it and run again")
        try:
            extracted.rename(folder)
        except OSError:
            if not folder.is_dir():  # else another job extracted it first
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
