"""Files written atomically: to a temporary file beside the target, then renamed over it, so a crash
or a kill leaves the old file or the new one, never half of one, and readers never see a partial file."""

import json
import math
import os
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable

_UMASK = os.umask(0)
os.umask(_UMASK)


def atomic_write(path: Path, write: Callable[[BinaryIO], object], durable: bool = False) -> None:
    """`write(f)` fills the file; `durable` also flushes it to the disk before the rename (for
    checkpoints, not for cache entries). The file gets the usual permissions (0666 less the umask). A write the
    file system refuses (a full disk, a quota) raises its OSError, whatever `write` made of it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            kept = _KeepsWriteErrors(f)
            try:
                write(kept)
            except Exception:
                if kept.error is not None:  # torch.save's zip writer reports ENOSPC as its own RuntimeError
                    raise kept.error from None
                raise
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class _KeepsWriteErrors:
    """A file that remembers the OSError its last failed write raised, and is otherwise the file itself."""

    def __init__(self, file: BinaryIO):
        self.file, self.error = file, None

    def write(self, data) -> int:
        try:
            return self.file.write(data)
        except OSError as e:
            self.error = e
            raise

    def __getattr__(self, name: str):
        return getattr(self.file, name)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode()))


def atomic_write_json(path: Path, data) -> None:
    """Strict JSON (RFC 8259): a number that is not finite is written as null, never as a bare NaN."""
    atomic_write_text(path, json.dumps(finite_or_null(data), indent=2, allow_nan=False) + "\n")


def finite_or_null(data):
    if isinstance(data, float) and not math.isfinite(data):
        return None
    if isinstance(data, dict):
        return {k: finite_or_null(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [finite_or_null(v) for v in data]
    return data
