"""User mistakes: one line that names what was wrong and what is allowed (rethink/hydra_app.py turns Hydra's and
OmegaConf's own errors into such lines). Imports nothing of the project."""

import re
from pathlib import Path


class UserError(Exception):
    """A mistake in what the user asked for. It ends a single run with its message on one line and
    exit status 1; in a sweep it fails that job only and Hydra runs the others."""

    def __init__(self, message: str = ""):
        super().__init__(_from_a_worker(message))


def _from_a_worker(message: str) -> str:
    """A DataLoader re-raises a worker's UserError with torch's whole report ("Caught UserError in DataLoader
    worker process 0. Original Traceback ..."): the worker's own line, and where it was raised."""
    caught = re.match(r"Caught UserError in (DataLoader worker process \d+)", str(message))
    if not caught:
        return message
    original = re.findall(r"^\S*UserError: (.*)$", str(message), flags=re.M)
    return f"{original[-1]} (in {caught[1]})" if original else message


def why_unreadable(path: Path, exc: BaseException) -> str:
    """Why `torch.load(path, weights_only=True)` raised `exc`, in a few words. Never torch's own text:
    it runs to many lines and advises weights_only=False, which would let the file run code."""
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError as e:
        return e.strerror or type(e).__name__
    if not head:
        return "an empty file"
    if not head.startswith((b"PK\x03\x04", b"\x80")):  # torch.save writes a zip archive (a pickle before torch 1.6)
        return "not a PyTorch file"
    foreign = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))
    if foreign:
        return (
            f"it holds a {foreign[1]} object; only tensors and plain data are loaded, as anything else could run code"
        )
    return "a truncated or corrupt PyTorch file"
