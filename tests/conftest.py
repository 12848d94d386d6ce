import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("RETHINK_NO_DOWNLOAD", "1")  # tests never touch the network
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(autouse=True)
def private_caches(tmp_path, monkeypatch):
    """Every test (and the run.py it starts) keeps its data and decoded-image caches to itself."""
    monkeypatch.setenv("RETHINK_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("RETHINK_DATA", str(tmp_path / "data"))
