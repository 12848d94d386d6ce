"""Disk that cannot surprise: the decoded-image cache decided against the free space and capped, a checkpoint the
disk refuses as one line with the earlier one intact, best.pt with weights alone, a sweep's footprint."""

import errno
import logging
import os
import re
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

import rethink.atomic
import rethink.data
import rethink.train.session
from rethink.config import DataConfig
from rethink.data import build_data
from rethink.data.cache import ImageCache, cache_decision, entry_bytes, estimate_cache_bytes
from rethink.errors import UserError
from rethink.hydra_app import compose_config
from rethink.tasks.evaluate import evaluate
from rethink.tasks.sweep import disk_footprint, footprint_line
from rethink.tasks.train import train
from rethink.train.checkpoint import load_checkpoint

MODEL = OmegaConf.create({"train_size": 32, "eval_size": 32})
GB = 10**9


def photo_folder(root: Path, classes: int = 2, per_class: int = 12) -> Path:
    """PNGs of 48x40 pixels: a cache entry of 40*48*3 + 128 = 5,888 bytes each."""
    for c in range(classes):
        (root / f"class_{c}").mkdir(parents=True)
        for i in range(per_class):
            pixels = torch.randint(
                0, 256, (40, 48, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(c * 100 + i)
            )
            Image.fromarray(pixels.numpy()).save(root / f"class_{c}" / f"{i:03d}.png")
    return root


def folder_cfg(root: Path, cache_dir: Path, **values):
    return OmegaConf.merge(
        OmegaConf.structured(DataConfig), dict(name="folder", root=str(root), cache_dir=str(cache_dir), **values)
    )


def lines(caplog, level=logging.INFO, words="data.cache") -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= level and words in r.getMessage()]


# the decision ------------------------------------------------------------------------------------------------


def test_the_estimate_is_the_entries_bytes_at_the_stored_side():
    assert entry_bytes(48, 40, 114) == 48 * 40 * 3 + 128  # smaller than the side: kept as it is
    assert entry_bytes(500, 375, 100) == 133 * 100 * 3 + 128  # the shorter side brought down to 100
    assert estimate_cache_bytes([(48, 40), (500, 375)], 100) == entry_bytes(48, 40, 100) + entry_bytes(500, 375, 100)


def test_the_cache_decision():
    on, line = cache_decision("auto", 4 * GB, 10 * GB, None, images=7, where="/c")
    assert on and line.startswith("data.cache=auto: on") and "7 images" in line and "10.00 GB free" in line
    on, line = cache_decision("auto", 6 * GB, 10 * GB, None, where="/c")
    assert not on and "more than 50% of the 10.00 GB free" in line and "uncached" in line and "true insists" in line
    on, line = cache_decision("auto", 2 * GB, 100 * GB, 3 * GB, present_bytes=2 * GB, where="/c")
    assert not on and "data.cache_max_gb=3" in line and "a larger data.cache_max_gb" in line  # 2 + 2 GB > 3 GB
    on, line = cache_decision(True, 6 * GB, 10 * GB, None, where="/c")
    assert on and line.startswith("data.cache=true: on")  # true insists while it fits the free space at all
    on, line = cache_decision(True, 11 * GB, 10 * GB, None, where="/c")
    assert not on and line.startswith("data.cache=true: off") and "uncached" in line
    on, line = cache_decision(True, 2 * GB, 100 * GB, 1 * GB, where="/c")
    assert on and "stops the writing" in line  # the cap then stops it
    assert cache_decision("auto", 0, 0, 1, present_bytes=5 * GB, where="/c")[0]  # nothing left to write: on
    assert cache_decision(False, 1, 10 * GB, None) == (False, "")


def test_a_cache_on_a_small_file_system_is_off_in_one_line(tmp_path, monkeypatch, caplog):
    root = photo_folder(tmp_path / "d")
    monkeypatch.setattr(rethink.data, "free_space", lambda folder: (100_000, folder))  # 24 entries need 141 kB
    with caplog.at_level(logging.INFO, logger="rethink"):
        auto = build_data(folder_cfg(root, tmp_path / "c"), MODEL)
    assert auto.train.cache is None
    said = lines(caplog)
    assert len(said) == 1 and said[0].startswith("data.cache=auto: off") and str(tmp_path / "c") in said[0]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="rethink"):
        insisted = build_data(folder_cfg(root, tmp_path / "c", cache=True), MODEL)
    assert insisted.train.cache is None and insisted.train[0][0].shape == (3, 32, 32)
    said = lines(caplog)
    assert len(said) == 1 and said[0].startswith("data.cache=true: off") and lines(caplog, logging.WARNING)
    assert not (tmp_path / "c" / "side114").exists() and not list((tmp_path / "c").rglob("*.npy"))


def test_a_cache_with_room_is_on_and_says_so(tmp_path, caplog):
    root = photo_folder(tmp_path / "d")
    with caplog.at_level(logging.INFO, logger="rethink"):
        bundle = build_data(folder_cfg(root, tmp_path / "c"), MODEL)
    assert bundle.train.cache is not None
    said = lines(caplog)
    assert len(said) == 1 and said[0].startswith("data.cache=auto: on, 24 images") and "0.1 MB" in said[0]


def test_a_large_data_sets_cache_is_judged_from_a_sample_of_its_entries(tmp_path, monkeypatch, caplog):
    root = photo_folder(tmp_path / "d")
    build_data(folder_cfg(root, tmp_path / "c"), MODEL).train.image(0)  # one entry cached
    monkeypatch.setattr(rethink.data, "CACHE_SAMPLE", 6)  # of the 24 distinct images, every 4th is looked at
    looked = []
    real_entry = ImageCache.entry
    monkeypatch.setattr(ImageCache, "entry", lambda self, *a: looked.append(a) or real_entry(self, *a))
    with caplog.at_level(logging.INFO, logger="rethink"):
        build_data(folder_cfg(root, tmp_path / "c"), MODEL)
    assert len(looked) == 6
    counted = int(re.match(r"data.cache=auto: on, (\d+) images", lines(caplog)[0])[1])
    assert counted in (20, 24)  # the missing entries among the 6 looked at, times 4 (20 if the cached one was)


def test_the_cap_stops_the_writing_with_one_warning_and_the_images_stay_the_same(tmp_path, caplog):
    root = photo_folder(tmp_path / "d")
    cap_gb = 3 * entry_bytes(48, 40, 114) / GB  # room for three entries
    with caplog.at_level(logging.INFO, logger="rethink"):
        capped = build_data(folder_cfg(root, tmp_path / "c", cache=True, cache_max_gb=cap_gb), MODEL)
        images = [capped.train.image(i) for i in range(len(capped.train))]
        images += [capped.train.image(i) for i in range(len(capped.train))]  # a second epoch
    assert len(list((tmp_path / "c").rglob("*.npy"))) == 3
    warned = lines(caplog, logging.WARNING, "data.cache_max_gb")
    assert len(warned) == 1 and "reached its cap" in warned[0] and "goes on" in warned[0]
    uncached = build_data(folder_cfg(root, tmp_path / "other", cache=False), MODEL)
    assert all(torch.equal(a, uncached.train.image(i % len(uncached.train))) for i, a in enumerate(images))
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="rethink"):  # auto: the rest would pass the cap, so off
        again = build_data(folder_cfg(root, tmp_path / "c", cache_max_gb=cap_gb), MODEL)
    assert again.train.cache is None and "data.cache_max_gb" in lines(caplog)[0]


def test_the_cap_is_shared_by_the_loader_workers(tmp_path, caplog):
    cache = ImageCache(tmp_path / "c", room=2 * entry_bytes(4, 4, 8))
    image = torch.zeros(3, 4, 4, dtype=torch.uint8)
    loader = torch.utils.data.DataLoader(
        [f"{i:032x}" for i in range(6)],
        batch_size=None,
        num_workers=2,
        collate_fn=lambda digest: cache.get(digest, 8, lambda: image).shape,
    )
    assert len(list(loader)) == 6
    assert len(list((tmp_path / "c").rglob("*.npy"))) == 2  # not two per worker


def test_under_torchrun_each_process_gets_its_share_of_the_cap(tmp_path, monkeypatch):
    root = photo_folder(tmp_path / "d")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    cap_gb = 4 * entry_bytes(48, 40, 114) / GB
    bundle = build_data(folder_cfg(root, tmp_path / "c", cache=True, cache_max_gb=cap_gb), MODEL)
    for i in range(len(bundle.train)):
        bundle.train.image(i)
    assert len(list((tmp_path / "c").rglob("*.npy"))) == 2  # the other process writes the other two


@pytest.mark.slow
def test_a_run_whose_cache_does_not_fit_trains_uncached(tmp_path, tiny_overrides, monkeypatch, caplog):
    root = photo_folder(tmp_path / "d", per_class=16)
    monkeypatch.setattr(rethink.data, "free_space", lambda folder: (1000, folder))
    overrides = [a for a in tiny_overrides if not a.startswith("data.")]
    cfg = compose_config(
        [*overrides, "data=folder", f"data.root={root}", "data.num_workers=0", "data.batch_size=4", "trainer.epochs=1"]
    )
    with caplog.at_level(logging.INFO, logger="rethink"):
        metrics = train(cfg, tmp_path / "run")
    assert metrics["epochs"] == 1 and len(lines(caplog)) == 1 and "off" in lines(caplog)[0]
    assert not list(Path(cfg.data.cache_dir or tmp_path / "cache").rglob("*.npy"))


# checkpoints -----------------------------------------------------------------------------------------------


class FullDisk:
    """A file that the file system refuses more than 100 kB of, once `full()`: as a full disk does, below
    torch.save (whose zip writer reports it as its own RuntimeError)."""

    def __init__(self, file, full):
        self.file, self.full, self.written = file, full, 0

    def write(self, data):
        if self.full() and self.written + len(data) > 100_000:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.written += len(data)
        return self.file.write(data)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.file.close()

    def __getattr__(self, name):
        return getattr(self.file, name)


def disk_full_from_checkpoint(monkeypatch, number: int) -> None:
    """Every file written atomically is refused past 100 kB from the run's `number`-th checkpoint on."""
    saves = [0]
    real_save = rethink.train.session.save_checkpoint

    def counted(state, path):
        saves[0] += 1
        return real_save(state, path)

    class OsWithAFullDisk:
        def fdopen(self, fd, mode):
            return FullDisk(os.fdopen(fd, mode), lambda: saves[0] >= number)

        def __getattr__(self, name):
            return getattr(os, name)

    monkeypatch.setattr(rethink.train.session, "save_checkpoint", counted)
    monkeypatch.setattr(rethink.atomic, "os", OsWithAFullDisk())


@pytest.mark.slow
def test_a_checkpoint_the_disk_refuses_is_one_line_and_the_earlier_one_resumes(tmp_path, tiny, monkeypatch):
    disk_full_from_checkpoint(monkeypatch, 3)  # epoch 1's last.pt and best.pt fit; epoch 2's last.pt does not
    with pytest.raises(UserError) as refused:
        train(tiny("trainer.epochs=2"), tmp_path)
    line = str(refused.value)
    assert "\n" not in line and f"cannot write checkpoint {tmp_path / 'checkpoints' / 'last.pt'}" in line
    assert "No space left on device" in line and " free there" in line and "epoch 1" in line
    assert f"resume={tmp_path}" in line
    checkpoints = tmp_path / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["best.pt", "last.pt"]  # no temporary file left
    assert load_checkpoint(checkpoints / "last.pt")["epoch"] == 1
    monkeypatch.undo()
    metrics = train(tiny("trainer.epochs=2", f"resume={tmp_path}"), tmp_path / "ignored")
    assert metrics["epochs"] == 2 and load_checkpoint(checkpoints / "last.pt")["epoch"] == 2


@pytest.mark.slow
def test_a_full_disk_anywhere_in_the_run_is_the_same_one_line(tmp_path, tiny, monkeypatch):
    import rethink.train.report

    real = rethink.train.report.Report.epoch

    def epoch(self, record, progress):  # TensorBoard's writer meets the full disk first, before epoch 2's checkpoint
        if record["epoch"] == 2:
            raise OSError(errno.EDQUOT, os.strerror(errno.EDQUOT), str(tmp_path / "events.out.tfevents.1"))
        return real(self, record, progress)

    monkeypatch.setattr(rethink.train.report.Report, "epoch", epoch)
    with pytest.raises(UserError) as refused:
        train(tiny("trainer.epochs=2"), tmp_path)
    line = str(refused.value)
    assert line.startswith(f"cannot write {tmp_path / 'events.out.tfevents.1'} ({os.strerror(errno.EDQUOT)};")
    assert "last.pt (epoch 1) is intact" in line and f"resume={tmp_path}" in line


@pytest.mark.slow
def test_a_first_checkpoint_the_disk_refuses_says_the_run_must_start_again(tmp_path, tiny, monkeypatch):
    disk_full_from_checkpoint(monkeypatch, 1)
    with pytest.raises(UserError, match="before any checkpoint was saved"):
        train(tiny("trainer.epochs=1"), tmp_path)
    assert not list((tmp_path / "checkpoints").iterdir())


@pytest.mark.slow
def test_best_pt_holds_the_weights_alone_and_eval_reads_it(tmp_path, tiny, tiny_overrides):
    train(tiny("trainer.epochs=2", "trainer.ema=true"), tmp_path / "run")
    best = load_checkpoint(tmp_path / "run" / "checkpoints" / "best.pt")
    last = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert not {"optimizer", "scheduler", "scaler", "rng"} & set(best)
    assert {"model", "ema", "config", "classes", "epoch"} <= set(best) and best["ema"] is not None
    assert {"optimizer", "scheduler"} <= set(last)
    sizes = [(tmp_path / "run" / "checkpoints" / name).stat().st_size for name in ("best.pt", "last.pt")]
    assert sizes[0] < sizes[1]
    report = evaluate(compose_config([*tiny_overrides, "task=eval", f"ckpt={tmp_path / 'run'}"]), tmp_path / "eval")
    assert report["images"] > 0


@pytest.mark.slow
def test_a_run_killed_between_last_pt_and_best_pt_resumes_and_scores_its_best(tmp_path, tiny, monkeypatch):
    from rethink.train.checkpoint import Progress

    run = tmp_path / "run"
    train(tiny("trainer.epochs=1"), run)
    (run / "checkpoints" / "best.pt").unlink()  # a kill -9 after last.pt was written, before best.pt
    add_epoch = Progress.add_epoch

    def no_better(self, epoch, *args):  # the epochs after it score no better: epoch 1 stays the best
        best = (self.best_val_acc, self.best_epoch)
        record = add_epoch(self, epoch, *args)
        self.best_val_acc, self.best_epoch = best
        return record

    monkeypatch.setattr(Progress, "add_epoch", no_better)
    result = train(tiny("trainer.epochs=2", f"resume={run}"), tmp_path / "ignored")
    best = load_checkpoint(run / "checkpoints" / "best.pt")
    assert best["epoch"] == 1 and "optimizer" not in best and result["best_epoch"] == 1


# a sweep's footprint -----------------------------------------------------------------------------------------


def test_a_sweeps_footprint_counts_every_file_once(tmp_path):
    for job in ("0_b0", "1_b0"):
        (tmp_path / job / ".hydra").mkdir(parents=True)
        (tmp_path / job / "checkpoints").mkdir()
        (tmp_path / job / "checkpoints" / "last.pt").write_bytes(bytes(300_000))
        (tmp_path / job / "run.log").write_bytes(bytes(100_000))
    (tmp_path / "0_b0" / "checkpoints" / "best.pt").hardlink_to(tmp_path / "0_b0" / "checkpoints" / "last.pt")
    runs, total, checkpoints = disk_footprint(tmp_path)
    assert runs == 2 and 800_000 <= total < 900_000 and 600_000 <= checkpoints < 700_000
    assert footprint_line(tmp_path) == f"sweep {tmp_path}: 2 runs, 0.8 MB on disk (checkpoints 0.6 MB)"


def test_a_sweep_prints_its_footprint_when_it_ends(tmp_path, capsys):
    from rethink.tasks.sweep import SweepCallback

    (tmp_path / "0_b0" / ".hydra").mkdir(parents=True)
    (tmp_path / "0_b0" / "checkpoints").mkdir()
    (tmp_path / "0_b0" / "checkpoints" / "last.pt").write_bytes(bytes(2_000_000))
    callback = SweepCallback()
    callback._compare(tmp_path)
    printed = capsys.readouterr().out.strip().splitlines()
    assert printed[-1].startswith(f"sweep {tmp_path}: 1 run, ") and printed[-1].endswith(
        " MB on disk (checkpoints 2.0 MB)"
    )  # with the comparison the sweep's end wrote beside it
