import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("RETHINK_NO_DOWNLOAD", "1")  # tests never touch the network
torch.set_num_threads(min(2, torch.get_num_threads()))
