"""Packed data sets (rethink/data/packed.py, task=pack): a run on a pack is a run on the folder it was packed
from (the same split, batch order and pixels), it resumes bit for bit, and packing that stops continues."""

import json
import os
import signal
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from rethink.config import DataConfig
from rethink.data import build_data, file_listing, make_loader, packed, set_epoch
from rethink.errors import UserError
from rethink.hydra_app import compose_config
from rethink.tasks.train import train
from rethink.train.checkpoint import load_checkpoint

MODEL = OmegaConf.create(
    {"train_size": 32, "eval_size": 32, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
)


def folder_cfg(root: Path, **values):
    return OmegaConf.merge(
        OmegaConf.structured(DataConfig), {"name": "folder", "root": str(root), "num_workers": 0, **values}
    )


def photo_folder(root: Path, classes=("a", "b", "c"), per_class=12) -> Path:
    """Distinct JPEGs of several sizes and orientations, a PNG, an undecodable file and a copy of another file."""
    rng = np.random.default_rng(0)
    for k, name in enumerate(classes):
        for i in range(per_class):
            size = (40 + 4 * i, 30 + 2 * k)
            pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
            (root / name).mkdir(parents=True, exist_ok=True)
            image = Image.fromarray(pixels)
            if i == 1:
                exif = Image.Exif()
                exif[0x0112] = 6  # stored on its side: width and height swap when decoded
                image.save(root / name / f"{i:03d}.jpg", exif=exif)
            elif i == 2:
                image.save(root / name / f"{i:03d}.png")
            else:
                image.save(root / name / f"{i:03d}.jpg", quality=85)
    (root / classes[0] / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    (root / classes[1] / "copy.jpg").write_bytes((root / classes[0] / "000.jpg").read_bytes())
    return root


def pack_of(folder: Path, out: Path, files_per_shard=7, workers=1) -> Path:
    packed.pack_listing(file_listing(folder_cfg(folder)), out, files_per_shard, workers)
    return out


def batches(bundle, seed=5, epoch=2, workers=0):
    cfg = folder_cfg("unused", batch_size=4, num_workers=workers)
    loader = make_loader(bundle.train, cfg, train=True, seed=seed)
    set_epoch(loader, epoch)
    return list(loader)


def test_a_pack_gives_the_folders_split_batches_and_pixels(tmp_path):
    folder = photo_folder(tmp_path / "photos")
    pack = pack_of(folder, tmp_path / "pack")
    on_folder = build_data(folder_cfg(folder, cache=False), MODEL)
    on_pack = build_data(folder_cfg(pack, cache=False), MODEL)
    assert on_pack.manifest == on_folder.manifest  # the same split of the same names
    assert on_pack.fingerprint == on_folder.fingerprint
    assert on_pack.skipped[0].endswith("a/broken.jpg: " + on_folder.skipped[0].split(": ", 1)[1])
    assert on_pack.test_names == on_folder.test_names
    for split in ("train", "val", "test"):
        a, b = getattr(on_folder, split), getattr(on_pack, split)
        assert a.labels == b.labels
        for i in range(len(a)):
            assert torch.equal(a.image(i), b.image(i)), (split, i)
    for (x, y), (u, v) in zip(batches(on_folder), batches(on_pack), strict=True):
        assert torch.equal(x, u) and torch.equal(y, v)


def test_a_pack_read_by_loader_workers_gives_the_same_batches(tmp_path):
    folder = photo_folder(tmp_path / "photos", per_class=8)
    pack = pack_of(folder, tmp_path / "pack", files_per_shard=5, workers=2)
    on_pack = build_data(folder_cfg(pack, cache=False), MODEL)
    for (x, y), (u, v) in zip(batches(on_pack), batches(on_pack, workers=2), strict=True):
        assert torch.equal(x, u) and torch.equal(y, v)


def test_a_pack_is_webdatasets_format_with_a_compact_index(tmp_path):
    folder = photo_folder(tmp_path / "photos", per_class=4)
    pack = pack_of(folder, tmp_path / "pack", files_per_shard=5)
    description = json.loads((pack / "pack.json").read_text())
    assert description["files"] == 14 and description["packed"] == 13
    assert list(description["unusable"]) == ["a/broken.jpg"]
    assert sum(s["nsamples"] for s in description["shardlist"]) == 13
    with tarfile.open(pack / description["shardlist"][0]["url"]) as tar:
        names = tar.getnames()
        label = tar.extractfile(names[1]).read()
    assert names[0].endswith(".jpg") and names[1].endswith(".cls") and names[0][:-4] == names[1][:-4]
    assert label == b"0"  # the first file's class, as WebDataset's readers take it
    index = np.load(pack / "index.npz")
    assert index["names"].dtype.kind == "S" and index["widths"][1] == 30 and index["heights"][1] == 44  # EXIF
    assert not (pack / "parts").exists()


def test_an_unfinished_pack_continues_with_the_shards_it_finished(tmp_path, monkeypatch):
    folder = photo_folder(tmp_path / "photos", per_class=6)
    out = tmp_path / "pack"
    real = packed._pack_shard
    done = []

    def stop_at_third(root, names, labels, out, number):
        if len(done) == 2:
            raise KeyboardInterrupt
        real(root, names, labels, out, number)
        done.append(number)

    monkeypatch.setattr(packed, "_pack_shard", stop_at_third)
    with pytest.raises(KeyboardInterrupt):
        pack_of(folder, out, files_per_shard=4)
    assert not packed.is_pack(out)
    monkeypatch.setattr(packed, "_pack_shard", lambda *job: (done.append(job[-1]), real(*job)))
    description = packed.pack_listing(file_listing(folder_cfg(folder)), out, 4, 1)
    assert done[:2] == [0, 1] and done[2:] == [2, 3, 4]  # only the shards not yet written
    assert description["files_packed_now"] == 20 - 8
    fresh = pack_of(folder, tmp_path / "fresh", files_per_shard=4)
    for name in ("names", "offsets", "digests", "shards"):
        assert np.array_equal(np.load(out / "index.npz")[name], np.load(fresh / "index.npz")[name])


def test_packing_refuses_a_finished_pack_and_a_folder_of_other_things(tmp_path):
    folder = photo_folder(tmp_path / "photos", per_class=3)
    pack = pack_of(folder, tmp_path / "pack")
    with pytest.raises(UserError, match="already holds a finished pack"):
        pack_of(folder, pack)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="not empty and not a pack"):
        pack_of(folder, tmp_path / "other")


def test_a_damaged_pack_is_one_line(tmp_path):
    folder = photo_folder(tmp_path / "photos", per_class=3)
    pack = pack_of(folder, tmp_path / "pack")
    shard = pack / "shards" / "shard-000000.tar"
    shard.write_bytes(shard.read_bytes()[:1000])
    bundle = build_data(folder_cfg(pack, cache=False), MODEL)
    with pytest.raises(UserError, match="ends early; the pack is damaged"):
        [bundle.train.image(i) for i in range(len(bundle.train))]
    (pack / "index.npz").write_bytes(b"garbage")
    with pytest.raises(UserError, match="not a readable pack"):
        build_data(folder_cfg(pack), MODEL)


@pytest.mark.slow
def test_a_run_on_a_pack_stopped_mid_epoch_resumes_bit_for_bit(tmp_path, monkeypatch, stop_exits):
    import rethink.train.loop as loop

    pack = pack_of(photo_folder(tmp_path / "photos", per_class=10), tmp_path / "pack")
    settings = [
        "data=folder",
        f"data.root={pack}",
        "data.num_workers=0",
        "data.batch_size=4",
        "data.split=[0.6,0.2,0.2]",
        "model=b0",
        "model.train_size=32",
        "model.eval_size=32",
        "trainer.device=cpu",
        "trainer.epochs=2",
        "trainer.limit_train_batches=4",
        "seed=1",
    ]
    whole = train(compose_config(settings), tmp_path / "whole")
    real_step, steps = loop.Learner.step, {"n": 0}

    def step_then_signal(self, images, labels):
        steps["n"] += 1
        if steps["n"] == 6:  # the second batch of epoch 2
            os.kill(os.getpid(), signal.SIGTERM)
        return real_step(self, images, labels)

    monkeypatch.setattr(loop.Learner, "step", step_then_signal)
    with pytest.raises(SystemExit):
        train(compose_config(settings), tmp_path / "cut")
    monkeypatch.undo()
    resumed = train(compose_config([*settings, f"resume={tmp_path / 'cut'}"]), tmp_path / "ignored")
    a = load_checkpoint(tmp_path / "whole" / "checkpoints" / "last.pt")
    b = load_checkpoint(tmp_path / "cut" / "checkpoints" / "last.pt")
    assert [r["train_loss"] for r in a["history"]] == [r["train_loss"] for r in b["history"]]
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert resumed["test_acc"] == whole["test_acc"]


def test_task_pack_writes_the_pack_and_says_how_to_train_on_it(tmp_path, caplog):
    from rethink.tasks.pack import pack

    folder = photo_folder(tmp_path / "photos", per_class=3)
    base = ["task=pack", "data=folder", f"data.root={folder}", "pack.workers=1"]
    with pytest.raises(UserError, match="task=pack needs pack.out=FOLDER"):
        pack(compose_config(base), tmp_path / "run0")
    with pytest.raises(UserError, match="data=synthetic is held in memory"):
        pack(compose_config(["task=pack", "data=synthetic", f"pack.out={tmp_path / 'x'}"]), tmp_path / "run1")
    caplog.set_level("INFO", logger="rethink")
    (tmp_path / "run").mkdir()
    summary = pack(compose_config([*base, f"pack.out={tmp_path / 'pack'}"]), tmp_path / "run")
    assert json.loads((tmp_path / "run" / "pack.json").read_text()) == summary
    assert summary["packed"] == 10 and summary["unusable"] == 1 and summary["shards"] == 1
    assert f"train on it with data.root={tmp_path / 'pack'}" in caplog.text
    assert packed.is_pack(tmp_path / "pack")
