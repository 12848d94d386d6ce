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


# Helpers every test module may ask for (fixtures, not imports between test modules) -------------------------

TINY = [  # b0 at 32 px on 160 synthetic images: a run of two short epochs in seconds on one CPU core
    "data=synthetic",
    "data.images_per_class=40",
    "data.image_size=40",
    "data.num_workers=0",
    "data.batch_size=8",
    "model.train_size=32",
    "model.eval_size=32",
    "trainer.device=cpu",
    "trainer.epochs=2",
    "trainer.limit_train_batches=4",
    "trainer.limit_val_batches=2",
    "seed=3",
]


@pytest.fixture
def tiny_overrides() -> list[str]:
    """The overrides of a tiny run (a fresh list each time)."""
    return list(TINY)


@pytest.fixture
def unseeded(tiny_overrides) -> list[str]:
    """A tiny run's overrides without its seed."""
    return [a for a in tiny_overrides if not a.startswith("seed=")]


@pytest.fixture
def tiny(tiny_overrides):
    """`tiny(*overrides)`: the composed config of a tiny run with these overrides too."""
    from rethink.hydra_app import compose_config

    return lambda *overrides: compose_config([*tiny_overrides, *overrides])


def read_scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    found = {}
    for path in sorted(Path(run_dir).glob("events.out.tfevents*")):
        acc = EventAccumulator(str(path))
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            found.setdefault(tag, []).extend((e.step, e.value) for e in acc.Scalars(tag))
    return found


@pytest.fixture
def scalars():
    """`scalars(run_dir)`: every TensorBoard scalar of a run, tag -> [(step, value)], over its event files."""
    return read_scalars


@pytest.fixture
def run_command() -> list[str]:
    """The command that starts run.py."""
    return [sys.executable, str(ROOT / "run.py")]


@pytest.fixture
def run_py(run_command):
    """`run_py(*args, cwd=ROOT)`: run.py in a subprocess, its output captured as text (10 minutes at most)."""
    import subprocess

    def run(*args, cwd=ROOT, **kwargs):
        return subprocess.run([*run_command, *args], cwd=cwd, capture_output=True, text=True, timeout=600, **kwargs)

    return run


@pytest.fixture
def stop_exits():
    """For a test that signals its own process to stop a run: outside the run the signal exits (SystemExit
    128 + N), as under run.py, instead of ending pytest (which is what it does without a handler)."""
    import signal

    from rethink.train.runtime import exit_on_signal

    previous = {s: signal.signal(s, exit_on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    yield
    for s, handler in previous.items():
        signal.signal(s, handler)


def wait_until_written(path: Path, process, writes: int, timeout: float = 240) -> None:
    """Return once `path` was written `writes` times while `process` runs (its modification time changed)."""
    import time

    seen, last = 0, None
    deadline = time.time() + timeout
    while time.time() < deadline and process.poll() is None:
        if path.exists():
            stamp = path.stat().st_mtime_ns
            if stamp != last:
                seen, last = seen + 1, stamp
                if seen >= writes:
                    return
        time.sleep(0.05)
    raise AssertionError(
        f"{path} was not written {writes} times: {process.stdout.read() if process.poll() is not None else ''}"
    )


@pytest.fixture
def wait_for_checkpoint_writes():
    """`wait_for_checkpoint_writes(path, process, writes)`: wait until a running process wrote a file that often."""
    return wait_until_written


SUBPROCESS_FIXTURES = {"run_py", "run_command"}


def pytest_collection_modifyitems(config, items):
    """A test that starts run.py in a new process (a Python start and Hydra's composition, seconds each) belongs to
    the slow tier, like those marked `slow` by hand: `-m "not slow"` stays a loop of a few minutes."""
    for item in items:
        if SUBPROCESS_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
