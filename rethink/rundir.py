"""Run folders: each run gets its own, a run's record is never overwritten, a refused run leaves nothing.

Hydra resolves `hydra.run.dir`, `hydra.sweep.dir` and `hydra.output_subdir` (conf/config.yaml) through
the resolvers below before it writes anything, so they decide where a run lands:
- `claim`: the default folder (`outputs/<task>/<date>/<time>`) is created with an atomic mkdir; when
  another run took that name (runs started in the same second, on any machine sharing the file
  system), the next free `<time>-1`, `<time>-2`, ... is taken.
- `run_dir`: `resume=DIR` continues in DIR, which must hold a checkpoint.
- `record_dir`: where Hydra records the config: `.hydra`, unless the folder already holds a record
  (a resume writes `.hydra/resumed-<time>/`, another task `.hydra/<task>-<time>/`); a training run
  into a folder that already holds one is refused.
`discard_refused_start` undoes what this process added when a run is refused before it trained.
"""

import glob
import hashlib
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any, Optional

from .errors import UserError

_claimed: dict[str, str] = {}  # default folder -> the folder this process claimed for it
_fresh: set[Path] = set()  # run folders that were empty when this process started writing into them
_records: dict[Path, Path] = {}  # run folder -> the record folder this process added to an existing run
_log_sizes: dict[Path, int] = {}  # resumed run folder -> the size of its run.log before this process


def claim(default: str) -> str:
    """`default`, or `default-N` with the smallest N whose folder did not exist; created here, atomically.
    Under torchrun, rank 0 claims it and the other processes find the folder it claimed."""
    if default in _claimed:  # Hydra resolves the folder more than once
        return _claimed[default]
    base = Path(default)
    base.parent.mkdir(parents=True, exist_ok=True)
    run_id = os.environ.get("TORCHELASTIC_RUN_ID") if torchrun_rank() is not None else None
    if run_id and torchrun_rank() != 0:
        _claimed[default] = _claimed_by_rank_0(base, run_id)
        return _claimed[default]
    for n in range(10_000):
        candidate = base if n == 0 else base.with_name(f"{base.name}-{n}")
        try:
            candidate.mkdir()
        except FileExistsError:
            continue
        if run_id:
            (candidate / f".torchrun-{run_id}").touch()
        _claimed[default] = str(candidate)
        return str(candidate)
    raise UserError(f"{default}: 10,000 runs already use this name; set hydra.run.dir")


def torchrun_rank() -> int | None:
    """This process's rank under torchrun with more than one process, else None."""
    return int(os.environ["RANK"]) if int(os.environ.get("WORLD_SIZE", 1)) > 1 and "RANK" in os.environ else None


def _claimed_by_rank_0(base: Path, run_id: str, timeout_s: float = 300) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for marker in base.parent.glob(f"{glob.escape(base.name)}*/.torchrun-{run_id}"):
            return str(marker.parent)
        time.sleep(0.1)
    raise UserError(f"{base}: rank 0 of this torchrun did not claim a run folder within {timeout_s:.0f} s")


def run_dir(resume: Optional[str], default: str) -> str:
    """hydra.run.dir: a resumed run continues in its own folder (which must hold a checkpoint, checked
    before Hydra creates or writes anything); any other run claims `default`."""
    if resume is None or resume == "auto":
        return claim(default)
    folder = Path(str(resume)).expanduser()
    if not (folder / "checkpoints" / "last.pt").is_file():
        raise UserError(f"resume={resume}: no checkpoints/last.pt there; pass the directory of a run that saved a checkpoint")
    return str(folder)


def record_dir(resume: Optional[str], task: Any, output_dir: str, now: str) -> Optional[str]:
    """hydra.output_subdir, relative to the run folder; None (no record) for the processes of a
    torchrun other than rank 0."""
    if torchrun_rank():
        return None
    folder = Path(output_dir).resolve()
    task = getattr(task, "value", task)
    if folder not in _records and _is_empty(folder):
        _fresh.add(folder)
    if resume == "auto":  # continues the run in this folder, if there is one
        resume = str(folder) if (folder / "checkpoints" / "last.pt").is_file() else None
    if resume is not None:  # nothing is logged yet: run.log holds just the run's own lines
        log = folder / "run.log"
        _log_sizes.setdefault(folder, log.stat().st_size if log.is_file() else 0)
        return _record(folder, f".hydra/resumed-{now}")
    if folder in _fresh:
        return ".hydra"
    if task == "train" and ((folder / "checkpoints" / "last.pt").exists() or (folder / ".hydra" / "config.yaml").exists()):
        raise UserError(f"{output_dir} already holds a run; continue it with resume={output_dir}, or choose another hydra.run.dir")
    if (folder / ".hydra" / "config.yaml").exists():
        return _record(folder, f".hydra/{task}-{now}")
    return ".hydra"


def _is_empty(folder: Path) -> bool:
    """Nothing in it but the empty run.log that Hydra's logging opened a moment ago."""
    return all(p.name == "run.log" and p.stat().st_size == 0 for p in folder.iterdir())


def _record(folder: Path, subdir: str) -> str:
    _records.setdefault(folder, folder / subdir)
    return str(_records[folder].relative_to(folder))


def discard_refused_start(folder: Path) -> None:
    """After a run was refused before it trained: remove the folder if this process made it (and it
    holds no checkpoint), else what this process added to it (its record, its lines in run.log)."""
    folder = Path(folder).resolve()
    if folder in _fresh and not any((folder / "checkpoints").glob("*.pt")):
        shutil.rmtree(folder, ignore_errors=True)
        _remove_empty_parents(folder.parent)
        return
    if folder in _records:
        shutil.rmtree(_records[folder], ignore_errors=True)
    if folder in _log_sizes:
        try:
            os.truncate(folder / "run.log", _log_sizes[folder])
        except OSError:
            pass


def _remove_empty_parents(folder: Path) -> None:
    """The date folders a refused run created, up to (not including) `outputs/` or the working directory."""
    cwd = Path.cwd().resolve()
    while folder.name not in ("outputs", "") and folder != cwd and cwd in folder.parents:
        try:
            folder.rmdir()
        except OSError:
            return
        folder = folder.parent


SWEPT_KEYS_ENV = "RETHINK_SWEPT_KEYS"  # set when a sweep starts (rethink/tasks/sweep.py), read by its jobs
# keys that say how a job computes, not what: left out of its folder name when the swept keys are unknown
_NOT_IN_NAMES = ("hydra", "trainer.device", "trainer.progress", "data.num_workers", "data.root", "data.cache_dir", "resume")
MAX_NAME = 96


def job_dir(num: int, model: str, overrides) -> str:
    """A sweep job's folder: `<num>_<model>` and then, for each swept key but the model, `key=value`
    (`model.` left out: `3_v2_s_stages.3.block=fused_seed=1`). A name longer than MAX_NAME is cut and
    ends in a hash of the whole; the job number keeps every name unique either way."""
    swept = os.environ.get(SWEPT_KEYS_ENV)
    keys = set(swept.split(",")) if swept is not None else None
    parts = [f"{num}_{model}"]
    for override in overrides:
        key, _, value = str(override).partition("=")
        key = key.lstrip("+~")
        if _in_name(key, keys):
            value = {"True": "true", "False": "false"}.get(value, value)  # as typed, not as Hydra echoes a bool
            parts.append(f"{key.removeprefix('model.')}={value}")
    name = _filesystem_safe("_".join(parts))
    if len(name) > MAX_NAME:
        digest = hashlib.blake2b(name.encode(), digest_size=4).hexdigest()
        name = f"{name[: MAX_NAME - 9]}_{digest}"
    return name


def _in_name(key: str, swept: set[str] | None) -> bool:
    if key == "model":  # in the name already
        return False
    return key in swept if swept is not None else not key.startswith(_NOT_IN_NAMES)


def _filesystem_safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._=,+@-]", "-", name)
