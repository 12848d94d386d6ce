"""What this process finds around it: where caches and data live, whether it may download, the CPUs it may use,
the CPU's name, the version of the code it runs, and its place under torchrun. Read from the environment each time (tests and launchers change it);
imports nothing of the project."""

import functools
import os
import platform
import shutil
import subprocess
from pathlib import Path


def user_cache_home() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")


def data_root(configured: str | None) -> Path:
    """`data.root`, else $RETHINK_DATA, else $XDG_CACHE_HOME/rethink/data (~/.cache/rethink/data)."""
    return _first_of(configured, "RETHINK_DATA", "data")


def cache_dir(configured: str | None) -> Path:
    """`data.cache_dir`, else $RETHINK_CACHE, else $XDG_CACHE_HOME/rethink/images (~/.cache/rethink/images)."""
    return _first_of(configured, "RETHINK_CACHE", "images")


def _first_of(configured: str | None, variable: str, default_name: str) -> Path:
    chosen = configured or os.environ.get(variable)
    return Path(chosen).expanduser() if chosen else user_cache_home() / "rethink" / default_name


def free_space(directory: Path) -> tuple[int, Path]:
    """The free bytes of the file system that holds `directory` (which need not exist yet), and the folder
    measured: its nearest existing parent."""
    folder = Path(directory).expanduser().absolute()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return shutil.disk_usage(folder).free, folder


def downloads_allowed() -> bool:
    return os.environ.get("RETHINK_NO_DOWNLOAD", "") not in ("1", "true", "yes")


def available_cpus() -> int:
    """The CPUs this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def process_age_s() -> float | None:
    """Seconds since this process started (Linux: /proc), None where that cannot be read."""
    try:
        started_ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime_s = float(Path("/proc/uptime").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return uptime_s - started_ticks / os.sysconf("SC_CLK_TCK")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


PACKAGE_DIR = Path(__file__).resolve().parent


@functools.cache
def code_version(package: Path = PACKAGE_DIR) -> tuple[str, bool | None]:
    """(the git commit of the checkout this package runs from, whether the checkout differs from it: edited, added
    or deleted files that git does not ignore); ("unknown", None) outside a checkout (an installed package) or
    without git. Asked once per process."""

    def git(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", "-C", str(package), *args], capture_output=True, text=True, timeout=30)

    try:
        # a package inside another repository's ignored folder (a virtual environment) is not that repository's code
        tracked = git("ls-files", "--error-unmatch", "__init__.py")
        commit = git("rev-parse", "HEAD")
        status = git("status", "--porcelain")
    except (OSError, subprocess.SubprocessError):
        return "unknown", None
    if tracked.returncode or commit.returncode or status.returncode:
        return "unknown", None
    return commit.stdout.strip(), bool(status.stdout.strip())


def torchrun_rank() -> int | None:
    """This process's rank under torchrun with more than one process, else None."""
    return int(os.environ["RANK"]) if int(os.environ.get("WORLD_SIZE", 1)) > 1 and "RANK" in os.environ else None


def torchrun_processes() -> int:
    """The processes of this torchrun (1 outside one)."""
    return int(os.environ.get("WORLD_SIZE", 1)) if torchrun_rank() is not None else 1
