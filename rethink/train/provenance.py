"""What a training run's numbers rest on besides its config: the code version (git commit, and whether the checkout
was edited), torch, CUDA and cuDNN, the device, the precision and the data set's identity (its split's fingerprint).
Written to the run folder's provenance.json when the run starts (so runs that never finish have it too), and
added to metrics.json and to the HPARAMS session; task=compare warns when a group pools runs that differ in them."""

import json
from pathlib import Path
from typing import Optional

import torch

from ..atomic import atomic_write_json
from ..environment import code_version, cpu_model

FILE = "provenance.json"
UNKNOWN = "unknown"


def provenance(device: torch.device, precision: str, data_fingerprint: str) -> dict:
    commit, dirty = code_version()
    return {
        "code_version": describe_code(commit, dirty),
        "code_commit": commit,
        "code_dirty": dirty,
        "torch_version": torch.__version__,
        "cuda_version": torch.version.cuda or "none",
        "cudnn_version": str(torch.backends.cudnn.version()) if torch.backends.cudnn.is_available() else "none",
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model(),
        "precision": precision,
        "data_fingerprint": data_fingerprint,
    }


def describe_code(commit: str, dirty: Optional[bool]) -> str:
    """`1a2b3c4d5e6f`, `1a2b3c4d5e6f+edited` (the checkout differed from its commit) or `unknown`."""
    if commit == UNKNOWN:
        return UNKNOWN
    return commit[:12] + ("+edited" if dirty else "")


def record(run_dir: Path, current: dict) -> dict:
    """Write provenance.json for a run that starts; a resume by another code version records both, in order
    (`1a2b3c4d5e6f then 9f8e7d6c5b4a`): its numbers come from both. Returns what was written."""
    try:
        earlier = json.loads((run_dir / FILE).read_text()).get("code_version")
    except (OSError, ValueError, AttributeError):
        earlier = None
    recorded = dict(current)
    if earlier and earlier.split(" then ")[-1] != current["code_version"]:
        recorded["code_version"] = f"{earlier} then {current['code_version']}"
    atomic_write_json(run_dir / FILE, recorded)
    return recorded


def hparams(recorded: dict) -> dict:
    """The fields for TensorBoard's HPARAMS table (strings)."""
    names = ("code_version", "torch_version", "cuda_version", "cudnn_version", "device_name", "data_fingerprint")
    return {name: str(recorded.get(name, UNKNOWN)) for name in names}
