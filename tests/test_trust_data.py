"""Issue 14, "numbers you can trust": what the data layer feeds training, validation and prediction.
Limited validation covers every class; the cache changes nothing but speed; a failed read neither
sticks nor moves files between splits; identical files stay in one split; predict sees what the
test split saw. Small images made in tmp_path, CPU only."""

import contextlib
import csv
import errno
import hashlib
import logging
import math
from collections import Counter, defaultdict
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image
from torchvision.transforms import v2

import rethink.tasks.predict
import rethink.tasks.restore
from rethink.config import DataConfig
from rethink.data import build_data, images, make_loader, scan, set_epoch, splits, transforms
from rethink.errors import UserError
from rethink.hydra_app import compose_config

MODEL = OmegaConf.create(
    {"train_size": 32, "eval_size": 32, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
)


def data_cfg(**values):
    return OmegaConf.merge(OmegaConf.structured(DataConfig), {"num_workers": 0, **values})


def folder_cfg(root: Path, **values):
    return data_cfg(name="folder", root=str(root), **values)


def write_photo(path: Path, size=(64, 48), seed=0) -> Path:
    """A smooth JPEG of `size` (width, height) with some texture, different for every seed."""
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 256, (3, 4, 3), dtype=np.uint8)).resize(size, Image.BICUBIC)
    pixels = np.asarray(coarse, np.float32) + rng.normal(0, 8, (size[1], size[0], 3))
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path, quality=90)
    return path


def photo_folder(root: Path, counts: dict[str, int], size=(64, 48), first_seed=0) -> Path:
    """Distinct photos (none identical to another unless first_seed repeats) in one folder per class."""
    for k, (name, count) in enumerate(counts.items()):
        for i in range(count):
            write_photo(root / name / f"{name}_{i:03d}.jpg", size, seed=first_seed + 100 * k + i)
    return root


def split_of(bundle) -> dict[str, str]:
    return {row.path: row.split for row in bundle.manifest}


def failing_reads(monkeypatch, name: str) -> None:
    """Reading the file called `name` fails as an NFS hiccup would (chmod cannot simulate it as root)."""
    read_bytes = Path.read_bytes

    def read(path: Path) -> bytes:
        if path.name == name:
            raise OSError(errno.EIO, "Input/output error")
        return read_bytes(path)

    monkeypatch.setattr(Path, "read_bytes", read)


# ---------------------------------------------------------------- 1. limited validation


def test_stratified_subset_is_proportional_seeded_and_all_when_small():
    labels = [0] * 30 + [1] * 10 + [2] * 20
    chosen = splits.stratified_subset(labels, 12, seed=3)
    assert len(chosen) == 12 and len(set(chosen)) == 12
    assert Counter(labels[i] for i in chosen) == {0: 6, 1: 2, 2: 4}  # proportional to class frequency
    assert chosen == splits.stratified_subset(labels, 12, seed=3)
    assert chosen != splits.stratified_subset(labels, 12, seed=4)
    assert splits.stratified_subset(labels, 100, seed=3) == list(range(60))
    # 10 classes of 3 and room for 4 images: 4 classes, one image each, and not always the first four
    many = [k for k in range(10) for _ in range(3)]
    picked = [sorted({many[i] for i in splits.stratified_subset(many, 4, seed)}) for seed in range(20)]
    assert all(len(classes) == 4 for classes in picked)
    assert len({tuple(classes) for classes in picked}) > 5
    assert Counter(c for classes in picked for c in classes).most_common(1)[0][1] < 20


def test_limited_validation_covers_every_class_with_the_same_images_for_every_seed():
    cfg = data_cfg(name="synthetic", num_classes=4, images_per_class=20, image_size=16, batch_size=8)
    val = build_data(cfg, MODEL).val
    assert val.labels == sorted(val.labels) and len(val) == 12  # sorted by class: "the first batch" is class 0

    def batches(seed: int, epoch: int = 0) -> list:
        loader = make_loader(val, cfg, train=False, seed=seed, limit_batches=1)
        set_epoch(loader, epoch)
        return list(loader)

    first = batches(seed=0)
    assert len(first) == 1 and Counter(first[0][1].tolist()) == {0: 2, 1: 2, 2: 2, 3: 2}
    for other in (batches(seed=0), batches(seed=0, epoch=3), batches(seed=7)):
        assert torch.equal(other[0][0], first[0][0]) and torch.equal(other[0][1], first[0][1])
    whole = make_loader(val, cfg, train=False, seed=0, limit_batches=5)  # more than the split holds: all of it
    assert sorted(y for _, labels in whole for y in labels.tolist()) == val.labels


# ---------------------------------------------------------------- 2. the cache is only a speed-up


def test_cache_on_and_off_give_bit_identical_images(tmp_path):
    root = photo_folder(tmp_path / "d", {"apple": 4, "banana": 4}, size=(600, 480))  # JPEG draft decode at 1/4
    write_photo(root / "apple" / "small.jpg", size=(40, 30), seed=9)
    cached = build_data(folder_cfg(root, cache=True, cache_dir=str(tmp_path / "c")), MODEL)
    uncached = build_data(folder_cfg(root, cache=False), MODEL)
    for split in ("train", "val", "test"):
        a, b = getattr(cached, split), getattr(uncached, split)
        assert a.paths == b.paths
        for i in range(len(a)):
            assert torch.equal(a.image(i), b.image(i))
            assert torch.equal(a[(i, 123)][0], b[(i, 123)][0])
        for i in range(len(a)):  # read back from the cache this time
            assert torch.equal(a.image(i), b.image(i))


@pytest.mark.parametrize("train_size", [32, 224])
@pytest.mark.parametrize("cache", [True, False])
def test_train_crops_come_from_an_image_as_sharp_as_the_smallest_crop_needs(tmp_path, train_size, cache):
    """RandomResizedCrop may keep 8% of the area; it must not zoom into a copy shrunk for a 256 px resize."""
    root = photo_folder(tmp_path / "d", {"apple": 3, "banana": 3}, size=(500, 375))
    model = OmegaConf.merge(MODEL, {"train_size": train_size, "eval_size": train_size})
    train = build_data(folder_cfg(root, cache=cache, cache_dir=str(tmp_path / "c")), model).train
    smallest_scale = v2.RandomResizedCrop(train_size).scale[0]
    side = min(375, math.ceil(train_size / math.sqrt(smallest_scale)))  # 114 for 32 px; the full photo for 224
    assert tuple(train.image(0).shape) == (3, side, round(500 * side / 375))
    none = build_data(folder_cfg(root, cache=cache, augment="none", cache_dir=str(tmp_path / "c")), model).train
    assert min(none.image(0).shape[1:]) == max(train_size, round(train_size / 0.875))  # what resize + centre crop needs


# ---------------------------------------------------------------- 3. read failures


def test_a_failed_read_is_retried_next_run_and_a_failed_decode_is_remembered(tmp_path, monkeypatch):
    root = photo_folder(tmp_path / "d", {"apple": 4})
    (root / "apple" / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    paths = sorted(p.relative_to(root).as_posix() for p in root.rglob("*.jpg"))
    with monkeypatch.context() as patch:
        failing_reads(patch, "apple_001.jpg")
        first = scan.scan_images(root, paths, tmp_path / "c")
    assert first.skipped["apple/apple_001.jpg"].startswith("cannot read") and "apple/broken.jpg" in first.skipped
    decodes = []
    monkeypatch.setattr(scan, "inspect_image", lambda data: decodes.append(1) or images.inspect_image(data))
    again = scan.scan_images(root, paths, tmp_path / "c")
    assert "apple/apple_001.jpg" in again.digests and list(again.skipped) == ["apple/broken.jpg"]
    assert len(decodes) == 1  # only the file that could not be read was checked again


def test_an_unreadable_file_moves_no_other_file_between_splits(tmp_path, monkeypatch):
    root = photo_folder(tmp_path / "d", {"apple": 12, "banana": 9, "cherry": 15})
    with monkeypatch.context() as patch:
        failing_reads(patch, "banana_004.jpg")
        without = split_of(build_data(folder_cfg(root, cache_dir=str(tmp_path / "c1")), MODEL))
    every = split_of(build_data(folder_cfg(root, cache_dir=str(tmp_path / "c2")), MODEL))
    assert set(every) - set(without) == {"banana/banana_004.jpg"}
    assert without == {path: split for path, split in every.items() if path in without}


# ---------------------------------------------------------------- 4. identical files


def digest_groups(root: Path, paths) -> list[list[str]]:
    groups = defaultdict(list)
    for path in paths:
        groups[hashlib.sha256((root / path).read_bytes()).hexdigest()].append(path)
    return [members for members in groups.values() if len(members) > 1]


def test_identical_files_end_in_one_split(tmp_path):
    root = photo_folder(tmp_path / "d", {"apple": 10, "banana": 10, "cherry": 10})
    for name in ("apple", "banana", "cherry"):
        for i in range(6):
            for copy in range(1 + i % 3):
                (root / name / f"{name}_{i:03d}_copy{copy}.jpg").write_bytes(
                    (root / name / f"{name}_{i:03d}.jpg").read_bytes()
                )
    (root / "cherry" / "from_apple.jpg").write_bytes((root / "apple" / "apple_007.jpg").read_bytes())
    bundle = build_data(folder_cfg(root), MODEL)
    where = split_of(bundle)
    groups = digest_groups(root, where)
    assert len(groups) == 19
    assert [g for g in groups if len({where[p] for p in g}) > 1] == []
    assert {split for split in where.values()} == {"train", "val", "test"}


def test_a_presplit_folder_keeps_its_splits_and_warns_about_copies_across_them(tmp_path, caplog):
    root = tmp_path / "d"
    photo_folder(root / "train", {"apple": 12, "banana": 12})
    photo_folder(root / "test", {"apple": 3, "banana": 3}, first_seed=1000)
    (root / "test" / "apple" / "leak.jpg").write_bytes((root / "train" / "apple" / "apple_000.jpg").read_bytes())
    for copy in range(3):  # copies inside train/: val is carved from train/, and they must stay together
        (root / "train" / "banana" / f"copy{copy}.jpg").write_bytes(
            (root / "train" / "banana" / "banana_005.jpg").read_bytes()
        )
    with caplog.at_level(logging.WARNING, logger="rethink"):
        bundle = build_data(folder_cfg(root), MODEL)
    where = split_of(bundle)
    assert all(where[p] == "test" for p in where if p.startswith("test/"))
    assert all(where[p] in ("train", "val") for p in where if p.startswith("train/"))
    copies = ["train/banana/banana_005.jpg"] + [f"train/banana/copy{c}.jpg" for c in range(3)]
    assert len({where[p] for p in copies}) == 1
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "1 group" in warnings[0]


# ---------------------------------------------------------------- 5. predict sees what the test split saw


def test_predict_feeds_the_model_exactly_what_validation_does(tmp_path, monkeypatch):
    root = photo_folder(tmp_path / "d", {"apple": 4, "banana": 4}, size=(600, 480))
    cfg = compose_config(
        ["data=folder", f"data.root={root}", "model.train_size=32", "model.eval_size=32", "trainer.device=cpu"]
    )
    bundle = build_data(cfg.data, cfg.model)
    seen = []

    class Recorder(torch.nn.Module):
        def forward(self, batch):
            seen.extend(batch)
            return torch.zeros(len(batch), 2)

    restored = rethink.tasks.restore.Restored(
        cfg, [], Recorder(), lambda batch: batch, SimpleNamespace(autocast=contextlib.nullcontext)
    )
    monkeypatch.setattr(rethink.tasks.predict, "load_checkpoint", lambda path: {"classes": ["apple", "banana"]})
    monkeypatch.setattr(rethink.tasks.predict, "restore", lambda state, cfg, use_ema: restored)
    files = [root / path for path in bundle.val.paths + bundle.test.paths]
    run = OmegaConf.merge(cfg, {"task": "predict", "ckpt": "unused", "inputs": str(tmp_path / "inputs")})
    (tmp_path / "inputs").mkdir()
    for i, path in enumerate(files):
        (tmp_path / "inputs" / f"{i:02d}.jpg").write_bytes(path.read_bytes())
    rethink.tasks.predict.predict(run, tmp_path / "run")
    expected = [bundle.val[i][0] for i in range(len(bundle.val))] + [bundle.test[i][0] for i in range(len(bundle.test))]
    assert len(seen) == len(expected) and all(torch.equal(a, b) for a, b in zip(seen, expected))


def test_the_preprocessing_description_says_what_is_done():
    from rethink.data import describe_eval_preprocessing

    data = data_cfg(crop_pct=0.8)
    model = OmegaConf.merge(MODEL, {"train_size": 224, "eval_size": 240})
    described = describe_eval_preprocessing(model, data)
    assert described["stored_side"] == transforms.stored_size(model, data) == 792
    assert described["resize"] == 300 and described["crop"] == 240
    assert "bilinear" in described["stored_resize"] and "bilinear" in described["interpolation"]


# ---------------------------------------------------------------- 6. run files and the log


def test_predictions_csv_has_one_column_per_name(tmp_path):
    rows = [{"path": "a.jpg", "classes": ["rose", "tulip", "daisy"], "probs": [0.7, 0.2, 0.1]}]
    rethink.tasks.predict.write_predictions(tmp_path / "p.csv", rows, 3)
    with open(tmp_path / "p.csv", newline="") as f:
        header, line = list(csv.reader(f))
    assert header == ["path"] + [f"top{k}_{what}" for k in (1, 2, 3) for what in ("class", "prob")]
    assert line == ["a.jpg", "rose", "0.700000", "tulip", "0.200000", "daisy", "0.100000"]


def test_in_memory_data_sets_write_splits_csv_that_eval_can_check(tmp_path):
    cfg = data_cfg(name="synthetic", num_classes=3, images_per_class=10, image_size=16)
    bundle = build_data(cfg, MODEL)
    bundle.write_run_files(tmp_path)
    with open(tmp_path / "splits.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 30 and len({r["path"] for r in rows}) == 30
    assert {r["path"] for r in rows} == {f"synthetic/{i:06d}" for i in range(30)}
    assert [int(r["label"]) for r in rows if r["split"] == "val"] == bundle.val.labels
    assert build_data(cfg, MODEL, manifest=tmp_path / "splits.csv").manifest == bundle.manifest
    with pytest.raises(UserError, match="splits.csv"):
        build_data(
            data_cfg(name="synthetic", num_classes=3, images_per_class=10, image_size=16, split_seed=5),
            MODEL,
            manifest=tmp_path / "splits.csv",
        )


def test_the_first_epochs_cache_build_is_announced_once(tmp_path, caplog):
    root = photo_folder(tmp_path / "d", {"apple": 4, "banana": 4})
    cfg = folder_cfg(root, cache_dir=str(tmp_path / "c"))
    with caplog.at_level(logging.INFO, logger="rethink"):
        bundle = build_data(cfg, MODEL)
    announced = [r.getMessage() for r in caplog.records if "into the cache" in r.getMessage()]
    assert len(announced) == 1 and "8 images" in announced[0] and str(tmp_path / "c") in announced[0]
    for dataset in (bundle.train, bundle.val, bundle.test):
        for i in range(len(dataset)):
            dataset.image(i)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="rethink"):
        build_data(cfg, MODEL)
    assert not [r for r in caplog.records if "into the cache" in r.getMessage()]
