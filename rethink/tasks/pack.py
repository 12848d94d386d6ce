"""task=pack: write a file-based data set once into tar shards with an index (rethink/data/packed.py).

    python run.py task=pack data=folder data.root=/data/imagenet pack.out=/data/imagenet.pack
    python run.py data=folder data.root=/data/imagenet.pack ...

Every file is read, hashed and checked once, in parallel, one shard per process task; a pack that was
stopped continues where it stopped when run again with the same pack.out.
"""

import logging
from pathlib import Path

from omegaconf import DictConfig

from ..atomic import atomic_write_json
from ..data import file_listing
from ..data.packed import pack_listing
from ..environment import available_cpus
from ..errors import UserError

log = logging.getLogger("rethink")


def pack(cfg: DictConfig, run_dir: Path) -> dict:
    if cfg.pack.out is None:
        raise UserError(
            "task=pack needs pack.out=FOLDER: where to write the pack (a new or an unfinished pack's folder)"
        )
    listing = file_listing(cfg.data)
    workers = cfg.pack.workers or available_cpus()
    description = pack_listing(listing, Path(cfg.pack.out).expanduser(), cfg.pack.files_per_shard, workers)
    summary = {k: v for k, v in description.items() if k not in ("classes", "shardlist", "unusable")}
    summary.update(out=str(Path(cfg.pack.out).expanduser()), shards=len(description["shardlist"]))
    summary["unusable"] = len(description["unusable"])
    atomic_write_json(run_dir / "pack.json", summary)
    shown = f" ({summary['unusable']} unusable, listed in its pack.json)" if summary["unusable"] else ""
    log.info(
        f"packed {description['packed']} of {description['files']} files{shown} into {summary['shards']} shards, "
        f"{description['bytes'] / 1e9:.2f} GB, in {description['seconds']:.1f} s: "
        f"train on it with data.root={summary['out']}"
    )
    return summary
