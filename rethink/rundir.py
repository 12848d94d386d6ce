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
`discard_refused_start` undoes what this process added when a run is refused before it trained. `FOLDERS`
holds this process's decisions.
"""

import fcntl
import glob
import hashlib
import os
import re
import shutil
import time
import weakref
from pathlib import Path
from typing import Any, Optional

from .config import KEYS
from .environment import torchrun_rank
from .errors import UserError


class RunFolders:
    """What this process decided about run folders: Hydra resolves each folder more than once, and every
    answer after the first must be the first."""

    def __init__(self):
        self.claimed: dict[str, str] = {}  # default folder -> the folder this process claimed for it
        self.fresh: set[Path] = set()  # run folders that were empty when this process started writing into them
        self.records: dict[Path, Path] = {}  # run folder -> the record folder this process added to an existing run
        self.log_sizes: dict[Path, int] = {}  # a run's folder this process adds to -> the size of its run.log before
        self.refusals: dict[Path, str] = {}  # run folder -> why this process's run cannot go into it
        self.restarted: set[Path] = set()  # folders whose earlier attempt this process set aside (resume=auto)
        self.started: set[Path] = set()  # run folders whose run reached its first training step in this process

    def claim(self, default: str) -> str:
        """`default`, or `default-N` with the smallest N whose folder did not exist; created here, atomically.
        Under torchrun, rank 0 claims it and the other processes find the folder it claimed."""
        if default in self.claimed:  # Hydra resolves the folder more than once
            return self.claimed[default]
        base = Path(default)
        run_id = os.environ.get("TORCHELASTIC_RUN_ID") if torchrun_rank() is not None else None
        if run_id and torchrun_rank() != 0:
            self.claimed[default] = _claimed_by_rank_0(base, run_id)
            return self.claimed[default]
        base.parent.mkdir(parents=True, exist_ok=True)
        for n in range(10_000):
            candidate = base if n == 0 else base.with_name(f"{base.name}-{n}")
            try:
                candidate.mkdir()
            except FileExistsError:
                continue
            if run_id:
                (candidate / f".torchrun-{run_id}").touch()
            self.claimed[default] = str(candidate)
            return str(candidate)
        raise UserError(f"{default}: 10,000 runs already use this name; set hydra.run.dir")

    def run_dir(self, resume: Optional[str], default: str) -> str:
        """hydra.run.dir: a resumed run continues in its own folder (which must hold a checkpoint, checked
        before Hydra creates or writes anything); any other run claims `default`."""
        if resume is None or resume == "auto":
            return self.claim(default)
        return str(resumable_run(resume))

    def record_dir(self, resume: Optional[str], task: Any, output_dir: str, now: str) -> Optional[str]:
        """hydra.output_subdir, relative to the run folder; None (no record) for the processes of a
        torchrun other than rank 0. A run the folder cannot take is not refused here (a resolver's error would
        end a whole sweep) but recorded apart, and `raise_refusal` refuses it when its task starts."""
        if torchrun_rank():
            return None
        folder = Path(output_dir).resolve()
        task = getattr(task, "value", task)
        if folder in self.restarted:
            return ".hydra"
        if folder not in self.records and _is_empty(folder):
            self.fresh.add(folder)
        if task == "train" and folder not in self.fresh and run_is_locked(folder):
            return self._refuse(
                folder,
                now,
                f"{output_dir}: another process is training in this folder now (it holds its "
                ".lock); wait for it to end, or stop it, then continue with resume=auto",
            )
        if resume == "auto":  # continues the run in this folder, if there is one
            resume = str(folder) if (folder / "checkpoints" / "last.pt").is_file() else None
            if resume is None and task == "train" and folder not in self.fresh and holds_run(folder):
                self._set_aside_attempt(folder)  # killed before its first checkpoint: it starts again
                return ".hydra"
        if resume is not None:
            self._note_log_size(folder)  # nothing is logged yet: run.log holds just the run's own lines
            return self._record(folder, f".hydra/resumed-{now}")
        if folder in self.fresh:
            return ".hydra"
        if task == "train" and holds_run(folder):
            return self._refuse(
                folder,
                now,
                f"{output_dir} already holds a run; continue it with {resume_argument(output_dir)}, "
                "or choose another hydra.run.dir",
            )
        if (folder / ".hydra" / "config.yaml").exists():  # another task in a run's folder
            self._note_log_size(folder)
            return self._record(folder, f".hydra/{task}-{now}")
        return ".hydra"

    def _record(self, folder: Path, subdir: str) -> str:
        self.records.setdefault(folder, folder / subdir)
        return str(self.records[folder].relative_to(folder))

    def _note_log_size(self, folder: Path) -> None:
        log = folder / "run.log"
        self.log_sizes.setdefault(folder, log.stat().st_size if log.is_file() else 0)

    def _refuse(self, folder: Path, now: str, message: str) -> str:
        self.refusals[folder] = message
        self._note_log_size(folder)
        return self._record(folder, f".hydra/refused-{now}")

    def raise_refusal(self, folder: Path) -> None:
        """The UserError for a run that `record_dir` found its folder could not take, if any."""
        message = self.refusals.get(Path(folder).resolve())
        if message:
            raise UserError(message)

    def _set_aside_attempt(self, folder: Path) -> None:
        """Everything an attempt that never saved a checkpoint left in `folder` moves to earlier-attempt-<n>/ (its
        record as hydra/, so that it is not taken for a run of its own); run.log, which Hydra has open already,
        is copied there and emptied."""
        self.restarted.add(folder)
        n = 1 + sum(1 for _ in folder.glob("earlier-attempt-*"))
        aside = folder / f"earlier-attempt-{n}"
        aside.mkdir()
        for item in list(folder.iterdir()):
            if item.name == "run.log":
                shutil.copy2(item, aside / "run.log")
                os.truncate(item, 0)
            elif not item.name.startswith(("earlier-attempt-", ".lock")):
                item.rename(aside / ("hydra" if item.name == ".hydra" else item.name))

    def mark_training_started(self, folder: Path) -> None:
        """The run in `folder` reaches its first training step: from now on everything it wrote stays."""
        self.started.add(Path(folder).resolve())

    def discard_refused_start(self, folder: Path, keep_new_folder: bool = False) -> None:
        """After a run ended before its first training step: remove the folder if this process made it (and it
        holds no checkpoint; not with `keep_new_folder`, a sweep job's, which keeps its run.log), else what this
        process added to it (its record, its lines in run.log). Nothing of a run that trained is removed."""
        folder = Path(folder).resolve()
        if folder in self.started:
            return
        if folder in self.fresh:
            if not keep_new_folder and not any((folder / "checkpoints").glob("*.pt")):
                shutil.rmtree(folder, ignore_errors=True)
                _remove_empty_parents(folder.parent)
            return
        if folder in self.records:
            shutil.rmtree(self.records[folder], ignore_errors=True)
        if folder in self.log_sizes:
            try:
                os.truncate(folder / "run.log", self.log_sizes[folder])
            except OSError:
                pass


FOLDERS = RunFolders()  # this process's; hydra_app.py registers its methods as the resolvers of conf/config.yaml


def resumable_run(resume: str) -> Path:
    """The folder `resume=` names, which must hold a checkpoint to continue from."""
    folder = Path(str(resume)).expanduser()
    if not (folder / "checkpoints" / "last.pt").is_file():
        raise UserError(
            f"resume={resume}: no checkpoints/last.pt there; pass the directory of a run that saved a checkpoint"
        )
    return folder


def claimed_by_this_run(folder: Path) -> bool:
    """Whether `folder` is one this process claimed as new (`outputs/<task>/<date>/<time>`), not one it was given."""
    return Path(folder).resolve() in {Path(claimed).resolve() for claimed in FOLDERS.claimed.values()}


def holds_run(folder: Path, own_record: bool = False) -> bool:
    """Whether `folder` holds a training run: its checkpoint, or (unless `own_record`: the folder's .hydra/ record is
    this run's own, once Hydra wrote it) a record of one."""
    folder = Path(folder)
    return (folder / "checkpoints" / "last.pt").exists() or (
        not own_record and (folder / ".hydra" / "config.yaml").exists()
    )


def refuse_existing_run(folder: Path, own_record: bool = False) -> None:
    """A new training run never goes into a folder that holds one: that run's record is never overwritten."""
    if holds_run(folder, own_record):
        raise UserError(
            f"{folder} already holds a run; continue it with {resume_argument(folder)}, or choose another hydra.run.dir"
        )


def resume_argument(folder: Any, key: str = "resume") -> str:
    """`resume=<folder>` as it can be pasted into a shell: a folder whose name Hydra's grammar would not take as
    it is (a sweep job's `1_b0_seed=1`) is quoted for Hydra, and that for the shell."""
    text = str(folder)
    if re.fullmatch(r"[\w./~-]+", text):
        return f"{key}={text}"
    return f"\"{key}='{text}'\"" if "'" not in text and '"' not in text else f"{key}={text}"


def run_is_locked(folder: Path) -> bool:
    """Whether a live process trains in `folder` (it holds the folder's .lock; `hold_run_lock`)."""
    lock = Path(folder) / ".lock"
    if not lock.exists():
        return False
    with open(lock, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return True
        fcntl.flock(f, fcntl.LOCK_UN)
    return False


def hold_run_lock(folder: Path):
    """Lock `folder` for this process's run (until the returned file is closed, or the process ends, however it
    ends): a second process that would train in it at the same time is refused in one line."""
    f = open(Path(folder) / ".lock", "a")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.close()
        raise UserError(
            f"{folder}: another process is training in this folder now (it holds its .lock); wait for it "
            "to end, or stop it, then continue it"
        ) from None
    _HELD_LOCKS.add(f)
    return f


# A flock belongs to the open file, which a forked child (a DataLoader worker) shares: after a kill -9 of the run its
# workers would hold the lock on until they notice, and a resume right away would be refused. Children close theirs.
# (/dev/null takes the descriptor's place, so the child's file object may still close it whenever it likes.)
_HELD_LOCKS: "weakref.WeakSet" = weakref.WeakSet()


def _close_held_locks_in_child() -> None:
    for f in list(_HELD_LOCKS):
        if not f.closed:
            null = os.open(os.devnull, os.O_RDONLY)
            os.dup2(null, f.fileno())  # drops this process's share of the lock; the run keeps its own
            os.close(null)
    _HELD_LOCKS.clear()


os.register_at_fork(after_in_child=_close_held_locks_in_child)


def _claimed_by_rank_0(base: Path, run_id: str, timeout_s: float = 300) -> str:
    """The folder rank 0 of this torchrun claimed: found by its marker, whatever second (or day) rank 0's clock
    gave the folder's name (`outputs/<task>/<date>/<time>`), not by the name this process would give it."""
    deadline = time.monotonic() + timeout_s
    places = (
        (base.parent, f"{glob.escape(base.name)}*/.torchrun-{run_id}"),
        (base.parent.parent, f"*/*/.torchrun-{run_id}"),
    )
    while time.monotonic() < deadline:
        for folder, pattern in places:
            for marker in folder.glob(pattern):
                return str(marker.parent)
        time.sleep(0.1)
    raise UserError(f"{base}: rank 0 of this torchrun did not claim a run folder within {timeout_s:.0f} s")


def _is_empty(folder: Path) -> bool:
    """Nothing in it but the empty run.log that Hydra's logging opened a moment ago."""
    return all(p.name == "run.log" and p.stat().st_size == 0 for p in folder.iterdir())


def discard_refused_sweep(folder: Path) -> None:
    """A sweep refused before its first job started (a job that does not compose): the multirun.yaml Hydra wrote
    into its folder, and the folders that leaves empty."""
    folder = Path(folder).resolve()
    (folder / "multirun.yaml").unlink(missing_ok=True)
    _remove_empty_parents(folder)


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
SWEEP_JOBS_ENV = "RETHINK_SWEEP_JOBS"  # how many jobs the sweep runs: the width of their numbers
MAX_NAME = 96


def job_dir(num: int, model: str, overrides) -> str:
    """A sweep job's folder: `<num>_<model>` and then, for each swept key but the model, `key=value`
    (`model.` left out: `3_v2_s_stages.3.block=fused_seed=1`). The number has as many digits as the sweep's
    last (`03_...` in a sweep of 12 jobs), so that the names sort as the jobs do (TensorBoard sorts its runs by
    name). A name longer than MAX_NAME is cut and ends in a hash of the whole; the job number keeps every name
    unique either way."""
    swept = os.environ.get(SWEPT_KEYS_ENV)
    keys = set(swept.split(",")) if swept is not None else None
    digits = len(str(max(int(os.environ.get(SWEEP_JOBS_ENV) or 1) - 1, 0)))
    parts = [f"{int(num):0{digits}d}_{model}"]
    for override in overrides:
        key, _, value = str(override).partition("=")
        key = key.lstrip("+~")
        if _in_name(key, keys):
            value = {"True": "true", "False": "false"}.get(value, value)  # as typed, not as Hydra echoes a bool
            parts.append(f"{key.removeprefix('model.')}={value}")
    return folder_name("_".join(parts))


def folder_name(name: str) -> str:
    """`name` as a folder name: characters a file system or a shell would trip on replaced by `-`; a name longer
    than MAX_NAME cut, ending in a hash of the whole."""
    name = _filesystem_safe(name)
    if len(name) > MAX_NAME:
        digest = hashlib.blake2b(name.encode(), digest_size=4).hexdigest()
        name = f"{name[: MAX_NAME - 9]}_{digest}"
    return name


def _in_name(key: str, swept: set[str] | None) -> bool:
    """Whether a job folder's name shows `key`: a key the sweep varies (every key of the command line when that
    is unknown), never the model (its name comes first already), Hydra's own, or a key that says only how a
    job computes (rethink/keys.py)."""
    if key == "model" or key.startswith("hydra") or (swept is not None and key not in swept):
        return False
    roles = KEYS.under("model.stages" if key == "stages" else key)
    return not roles or any(role.in_job_names for role in roles)


def _filesystem_safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._=,+@-]", "-", name)
