"""File-based data: folders, splits and manifests, odd and broken files, the image cache, tf_flowers'
download and extraction. Every image is made here in tmp_path; nothing touches the network."""

import csv
import hashlib
import io
import json
import logging
import struct
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

import rethink.data.cache
import rethink.data.datasets
import rethink.data.scan
from rethink.config import DataConfig
from rethink.data import build_data, flowers, load_image
from rethink.data.download import safe_extract
from rethink.data.splits import (
    ManifestRow,
    assign_splits,
    check_fractions,
    part_sizes,
    read_manifest,
    stratified_split,
    write_manifest,
)
from rethink.errors import UserError

MODEL = OmegaConf.create(
    {"train_size": 32, "eval_size": 32, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
)
COLOURS = {"apple": (200, 30, 30), "banana": (220, 210, 40), "cherry": (120, 0, 60)}


def data_cfg(**values):
    return OmegaConf.merge(OmegaConf.structured(DataConfig), values)


def folder_cfg(root: Path, **values):
    return data_cfg(name="folder", root=str(root), **values)


def write_jpeg(path: Path, colour=(128, 128, 128), size=(48, 40), seed=0) -> Path:
    rng = np.random.default_rng(seed)
    pixels = np.clip(np.array(colour) + rng.normal(0, 20, (size[1], size[0], 3)), 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, quality=90)
    return path


def make_tree(root: Path, counts: dict[str, int], prefix: str = "") -> Path:
    for name, count in counts.items():
        for i in range(count):
            write_jpeg(
                root / prefix / name / f"{name}_{i:03d}.jpg",
                COLOURS.get(name, (90, 90, 90)),
                seed=hash((prefix, name, i)) % 1000,
            )
    return root


# ---------------------------------------------------------------- splits and manifests


def test_split_is_deterministic_stratified_and_independent_of_order():
    labels = [0] * 3 + [1] * 10 + [2] * 200
    fractions = check_fractions([0.7, 0.15, 0.15])
    parts = stratified_split(labels, fractions, seed=3)
    assert (parts == stratified_split(labels, fractions, seed=3)).all()
    assert not (parts == stratified_split(labels, fractions, seed=4)).all()
    for label, count in ((0, 3), (1, 10), (2, 200)):
        sizes = np.bincount(parts[np.array(labels) == label], minlength=3)
        assert sizes.sum() == count and sizes.min() >= 1  # every class in every split
        assert list(sizes) == part_sizes(count, fractions)
    assert list(np.bincount(parts[np.array(labels) == 2])) == [140, 30, 30]


@pytest.mark.parametrize(
    "count, want", [(1, [1, 0, 0]), (2, [2, 0, 0]), (3, [1, 1, 1]), (4, [2, 1, 1]), (20, [14, 3, 3])]
)
def test_part_sizes_keep_one_training_image(count, want):
    assert part_sizes(count, (0.7, 0.15, 0.15)) == want


@pytest.mark.parametrize("bad", [[0.7, 0.3], [0.8, 0.2, 0.0], [0.5, 0.2, 0.2], [1.2, -0.1, -0.1]])
def test_bad_split_fractions_are_one_line_errors(bad):
    with pytest.raises(UserError, match=r"data\.split=.*sum to 1") as e:
        check_fractions(bad)
    assert "\n" not in str(e.value)


def test_missing_val_is_carved_from_train_only():
    labels = [0] * 20 + [1] * 20 + [0] * 5
    given = ["train"] * 40 + ["test"] * 5
    splits = assign_splits(labels, given, (0.7, 0.15, 0.15), seed=0)
    assert splits[40:] == ["test"] * 5
    assert [splits[:20].count("val"), splits[20:40].count("val")] == [3, 3]


def test_manifest_round_trip(tmp_path):
    rows = [ManifestRow("train", 0, "a,b", "a,b/x 1.jpg"), ManifestRow("test", 1, "c", "c/y.png")]
    write_manifest(tmp_path / "splits.csv", rows)
    assert read_manifest(tmp_path / "splits.csv") == rows
    (tmp_path / "bad.csv").write_text("a,b\n1,2\n")
    with pytest.raises(UserError, match="not a splits manifest"):
        read_manifest(tmp_path / "bad.csv")


def test_folder_run_files_and_same_split_every_time(tmp_path):
    root = make_tree(tmp_path / "d", {"cherry": 12, "apple": 10, "banana": 7})
    (root / "apple" / "notes.txt").write_text("not an image")
    (root / "apple" / "table.CSV").write_text("1,2")
    bundle = build_data(folder_cfg(root), MODEL)
    assert bundle.classes == ["apple", "banana", "cherry"]
    assert len(bundle.train) + len(bundle.val) + len(bundle.test) == 29
    assert not bundle.skipped
    run = tmp_path / "run"
    bundle.write_run_files(run)
    assert json.loads((run / "classes.json").read_text()) == ["apple", "banana", "cherry"]
    rows = list(csv.DictReader(open(run / "splits.csv")))
    assert list(rows[0]) == ["split", "label", "class", "path"]
    assert {r["path"].split("/")[0] for r in rows} == {"apple", "banana", "cherry"}
    assert all(r["class"] == bundle.classes[int(r["label"])] for r in rows)
    assert {(r["split"], r["class"]) for r in rows} == {
        (s, c) for s in ("train", "val", "test") for c in bundle.classes
    }
    assert not (run / "skipped_files.txt").exists()

    again = build_data(folder_cfg(root, split=[0.7, 0.15, 0.15], split_seed=0), MODEL)
    assert again.manifest == bundle.manifest
    other_seed = build_data(folder_cfg(root, split_seed=1), MODEL)
    assert other_seed.manifest != bundle.manifest

    # a run's splits.csv rebuilds that run's splits even after the folder has grown
    make_tree(root, {"apple": 14})
    rebuilt = build_data(folder_cfg(root), MODEL, manifest=run / "splits.csv")
    assert rebuilt.manifest == bundle.manifest
    assert rebuilt.test.paths == bundle.test.paths


def test_items_are_uint8_at_the_model_sizes(tmp_path):
    root = make_tree(tmp_path / "d", {"apple": 4, "banana": 4})
    model = OmegaConf.merge(MODEL, {"train_size": 24, "eval_size": 28})
    bundle = build_data(folder_cfg(root), model)
    image, label = bundle.train[(0, 123)]
    assert image.dtype == torch.uint8 and image.shape == (3, 24, 24) and isinstance(label, int)
    assert torch.equal(bundle.train[(0, 123)][0], image)  # the same sample seed, the same crop
    image, _ = bundle.test[0]
    assert image.shape == (3, 28, 28)


@pytest.mark.parametrize(
    "folders", [("train", "validation", "test"), ("Train", "Val", "TEST")], ids=["aliases", "any-case"]
)
def test_already_split_folder_is_used_as_it_is(tmp_path, folders):
    root = tmp_path / "d"
    for prefix, counts in zip(
        folders, ({"apple": 6, "banana": 5}, {"apple": 2, "banana": 2}, {"apple": 3, "banana": 1})
    ):
        make_tree(root, counts, prefix=prefix)
    bundle = build_data(folder_cfg(root), MODEL)
    assert bundle.classes == ["apple", "banana"]
    assert [len(bundle.train), len(bundle.val), len(bundle.test)] == [11, 4, 4]
    expected = dict(zip(("train", "val", "test"), folders))
    assert all(r.path.startswith(expected[r.split] + "/") for r in bundle.manifest)


def test_a_dangling_link_is_skipped_like_an_unreadable_file(tmp_path):
    root = make_tree(tmp_path / "d", {"apple": 5, "banana": 5})
    (root / "apple" / "gone.jpg").symlink_to(tmp_path / "nowhere.jpg")
    bundle = build_data(folder_cfg(root), MODEL)
    assert len(bundle.skipped) == 1 and "gone.jpg: cannot read" in bundle.skipped[0]
    assert len(bundle.train) + len(bundle.val) + len(bundle.test) == 10


def test_already_split_folder_without_val_carves_it_from_train(tmp_path):
    root = tmp_path / "d"
    make_tree(root, {"apple": 20, "banana": 20}, prefix="train")
    make_tree(root, {"apple": 3, "banana": 3}, prefix="test")
    bundle = build_data(folder_cfg(root), MODEL)
    assert len(bundle.test) == 6 and all(p.startswith("test/") for p in bundle.test.paths)
    assert len(bundle.val) == 6 and all(p.startswith("train/") for p in bundle.val.paths)
    assert sorted(bundle.val.labels) == [0, 0, 0, 1, 1, 1]


@pytest.mark.parametrize(
    "layout, message",
    [
        ({"train/apple": 2, "pears": 2}, "either one folder per class"),
        ({"val/apple": 2, "test/apple": 2}, "train/ .required"),
        ({"train/apple": 3, "test/kiwi": 1}, "'?kiwi'?/? is a class that train/ does not have"),
        ({"train/apple": 3, "train/kiwi": 0}, "class 'kiwi' has no readable images"),
    ],
)
def test_bad_split_layouts_are_clear_errors(tmp_path, layout, message):
    root = tmp_path / "d"
    for folder, count in layout.items():
        (root / folder).mkdir(parents=True)
        for i in range(count):
            write_jpeg(root / folder / f"{i}.jpg")
    with pytest.raises(UserError, match=message) as e:
        build_data(folder_cfg(root), MODEL)
    assert "\n" not in str(e.value)


def test_folder_needs_a_root(tmp_path):
    with pytest.raises(UserError, match=r"data=folder needs data\.root=PATH"):
        build_data(data_cfg(name="folder", root=None), MODEL)
    with pytest.raises(UserError, match=r"data\.root=.*no such folder"):
        build_data(folder_cfg(tmp_path / "nope"), MODEL)


# ---------------------------------------------------------------- odd and broken files


def png16(path: Path, values: np.ndarray) -> Path:
    """A 16-bit RGB PNG (Pillow cannot write one)."""
    height, width, _ = values.shape
    rows = b"".join(b"\x00" + values[y].astype(">u2").tobytes() for y in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")
    )
    return path


def odd_images(folder: Path) -> dict[str, tuple[Path, tuple[int, int, int]]]:
    """One file per odd mode, and the RGB colour its top-left pixel must come out as."""
    folder.mkdir(parents=True, exist_ok=True)
    made = {}

    def save(name, image, colour, **kwargs):
        image.save(folder / name, **kwargs)
        made[name] = (folder / name, colour)

    save("cmyk.jpg", Image.new("CMYK", (20, 16), (0, 255, 255, 0)), (255, 0, 0), quality=95)
    save("grey.png", Image.new("L", (20, 16), 100), (100, 100, 100))
    save("grey_alpha.png", Image.new("LA", (20, 16), (0, 0)), (255, 255, 255))  # fully transparent -> white
    save(
        "grey16.png", Image.fromarray(np.full((16, 20), 32896, np.uint16)), (128, 128, 128)
    )  # scaled, not clipped to 255
    save("grey32.tif", Image.fromarray(np.full((16, 20), 65535, np.int32)), (255, 255, 255))
    palette = Image.new("P", (20, 16), 0)
    palette.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    palette.paste(1, (10, 0, 20, 16))
    save("palette.png", palette, (255, 255, 255), transparency=0)
    save("palette.gif", palette, (255, 255, 255), transparency=0)
    save("rgba.png", Image.new("RGBA", (20, 16), (255, 0, 0, 128)), (255, 127, 127))
    png16(folder / "rgb16.png", np.full((16, 20, 3), [65535, 32896, 0], np.uint16))
    made["rgb16.png"] = (folder / "rgb16.png", (255, 128, 0))
    save("rgb.webp", Image.new("RGB", (20, 16), (10, 200, 30)), (10, 200, 30), lossless=True)
    save("rgb.bmp", Image.new("RGB", (20, 16), (10, 200, 30)), (10, 200, 30))
    return made


def test_every_odd_mode_becomes_rgb_uint8(tmp_path):
    for name, (path, colour) in odd_images(tmp_path).items():
        image = load_image(path)
        assert image.dtype == torch.uint8 and image.shape == (3, 16, 20), name
        assert np.abs(image[:, 0, 0].numpy().astype(int) - colour).max() <= 3, (name, image[:, 0, 0].tolist())
    assert load_image(tmp_path / "palette.png")[:, 0, 15].tolist() == [255, 0, 0]  # the opaque half


def write_unreadable(folder: Path) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buffer, "JPEG")
    (folder / "truncated.jpg").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "text.JPG").write_text("this is not a picture\n")
    return ["truncated.jpg", "empty.jpg", "text.JPG"]


def test_unreadable_files_are_skipped_and_named_once(tmp_path, caplog):
    root = make_tree(tmp_path / "d", {"apple": 5, "banana": 5})
    broken = write_unreadable(root / "banana")
    odd_images(root / "apple")
    with pytest.raises(UserError, match="text.JPG: not a readable image"):
        load_image(root / "banana" / "text.JPG")
    with caplog.at_level(logging.WARNING, logger="rethink"):
        bundle = build_data(folder_cfg(root), MODEL)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and all(name in warnings[0] for name in broken)
    assert sorted(Path(s.split(": ")[0]).name for s in bundle.skipped) == sorted(broken)
    assert len(bundle.train) + len(bundle.val) + len(bundle.test) == 10 + len(odd_images(tmp_path / "count"))
    bundle.write_run_files(tmp_path / "run")
    listed = (tmp_path / "run" / "skipped_files.txt").read_text()
    assert all(name in listed for name in broken) and "empty file" in listed
    for dataset in (bundle.train, bundle.val, bundle.test):  # everything left decodes
        for i in range(len(dataset)):
            assert dataset[i][0].dtype == torch.uint8


def test_a_class_of_broken_files_and_an_empty_data_set_are_errors(tmp_path):
    root = make_tree(tmp_path / "d", {"apple": 4})
    write_unreadable(root / "banana")
    with pytest.raises(UserError, match="class 'banana' has no readable images"):
        build_data(folder_cfg(root), MODEL)
    empty = tmp_path / "e"
    (empty / "apple").mkdir(parents=True)
    (empty / "apple" / "readme.txt").write_text("no images here")
    with pytest.raises(UserError, match="no images in"):
        build_data(folder_cfg(empty), MODEL)
    broken = tmp_path / "b"
    write_unreadable(broken / "apple")
    with pytest.raises(UserError, match="no readable images"):
        build_data(folder_cfg(broken), MODEL)


# ---------------------------------------------------------------- the caches


def test_images_are_decoded_once_and_scans_remembered(tmp_path, monkeypatch):
    root = make_tree(tmp_path / "d", {"apple": 6, "banana": 6})
    write_jpeg(root / "banana" / "big.jpg", size=(300, 200))
    write_jpeg(root / "banana" / "copy.jpg", size=(300, 200))  # the same bytes: one cache entry
    write_jpeg(root / "apple" / "small.jpg", size=(30, 20))
    decodes, checks = [], []
    monkeypatch.setattr(
        rethink.data.datasets, "load_image", lambda path, side=None: decodes.append(path) or load_image(path, side)
    )
    monkeypatch.setattr(
        rethink.data.scan, "inspect_image", lambda data: checks.append(1) or rethink.data.images.inspect_image(data)
    )
    cfg = folder_cfg(root, cache_dir=str(tmp_path / "c"))

    bundle = build_data(cfg, MODEL)
    assert len(checks) == 15
    every = [(d, i) for d in (bundle.train, bundle.val, bundle.test) for i in range(len(d))]
    first = [d.image(i) for d, i in every]
    assert len(decodes) == 14  # 15 files, two with the same content
    sides = {min(t.shape[1:]) for t in first}
    assert sides == {114, 40, 20}  # ceil(train 32 / sqrt(0.08)) = 114; smaller images are not upscaled
    big = next(t for t, (d, i) in zip(first, every) if d.paths[i].endswith("big.jpg"))
    assert tuple(big.shape) == (3, 114, 171)

    again = build_data(cfg, MODEL)  # a new job of the sweep
    second = [d.image(i) for d, i in [(again.train, i) for i in range(len(again.train))]]
    assert len(checks) == 15 and len(decodes) == 14  # nothing decoded again, no scan repeated
    assert all(torch.equal(a, b) for a, b in zip([bundle.train.image(i) for i in range(len(bundle.train))], second))
    assert len(list((tmp_path / "c").rglob("*.npy"))) == 14


def test_an_unwritable_cache_warns_once_and_carries_on(tmp_path, caplog):
    root = make_tree(tmp_path / "d", {"apple": 4, "banana": 4})
    (tmp_path / "file").write_text("a file where the cache folder should be")
    with caplog.at_level(logging.WARNING, logger="rethink"):
        bundle = build_data(folder_cfg(root, cache_dir=str(tmp_path / "file" / "cache")), MODEL)
        images = [bundle.train[i][0] for i in range(len(bundle.train))]
    assert all(image.shape == (3, 32, 32) for image in images)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "carrying on without it" in warnings[0]


def test_cache_off_reads_the_files(tmp_path, monkeypatch):
    root = make_tree(tmp_path / "d", {"apple": 4, "banana": 4})
    bundle = build_data(folder_cfg(root, cache=False), MODEL)
    assert bundle.train.cache is None and bundle.train[0][0].shape == (3, 32, 32)


# ---------------------------------------------------------------- tf_flowers download and extraction


def flowers_archive(path: Path, extra: list[tarfile.TarInfo] = ()) -> str:
    """A small flower_photos.tgz (five classes of four images) plus any `extra` members; its sha256."""
    with tarfile.open(path, "w:gz") as tar:
        for k, name in enumerate(flowers.CLASSES):
            for i in range(4):
                buffer = io.BytesIO()
                Image.new("RGB", (40, 30), (k * 50, 100 + 10 * i, 200 - k * 40)).save(buffer, "JPEG")  # no two alike
                info = tarfile.TarInfo(f"flower_photos/{name}/{i}.jpg")
                info.size = len(buffer.getvalue())
                tar.addfile(info, io.BytesIO(buffer.getvalue()))
        info = tarfile.TarInfo("flower_photos/LICENSE.txt")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"cc\n"))
        for member in extra:
            tar.addfile(member, io.BytesIO(b"x" * member.size) if member.isfile() else None)
    return hashlib.sha256(path.read_bytes()).hexdigest()


def serve(monkeypatch, archive: Path, sha256: str) -> None:
    """Downloads on, and the 'URL' is the local archive."""
    monkeypatch.delenv("RETHINK_NO_DOWNLOAD", raising=False)
    monkeypatch.setattr(flowers, "URL", archive.as_uri())
    monkeypatch.setattr(flowers, "SHA256", sha256)


def test_flowers_offline_says_how_to_use_a_local_copy(tmp_path, monkeypatch):
    monkeypatch.setenv("RETHINK_NO_DOWNLOAD", "1")
    with pytest.raises(UserError) as e:
        build_data(data_cfg(name="flowers", root=str(tmp_path / "none")), MODEL)
    message = str(e.value)
    assert "\n" not in message
    for words in ("data.root", "flower_photos", "flower_photos.tgz", "data=synthetic", "RETHINK_NO_DOWNLOAD"):
        assert words in message


def test_flowers_downloads_verifies_extracts_once(tmp_path, monkeypatch):
    archive = tmp_path / "served.tgz"
    serve(monkeypatch, archive, flowers_archive(archive))
    root = tmp_path / "root"
    bundle = build_data(data_cfg(name="flowers", root=str(root)), MODEL)
    assert bundle.classes == list(flowers.CLASSES)
    assert len(bundle.train) + len(bundle.val) + len(bundle.test) == 20
    assert sorted(p.name for p in root.iterdir()) == ["flower_photos", "flower_photos.tgz"]  # no temp files left

    monkeypatch.setattr(flowers, "URL", "file:///nonexistent")  # from now on, nothing is downloaded
    assert build_data(data_cfg(name="flowers", root=str(root)), MODEL).manifest == bundle.manifest
    assert build_data(data_cfg(name="flowers", root=str(root / "flower_photos")), MODEL).manifest == bundle.manifest
    (tmp_path / "only_archive").mkdir()
    (tmp_path / "only_archive" / "flower_photos.tgz").write_bytes(archive.read_bytes())
    assert build_data(data_cfg(name="flowers", root=str(tmp_path / "only_archive")), MODEL).manifest == bundle.manifest


def test_flowers_checksum_mismatch_deletes_the_download(tmp_path, monkeypatch):
    archive = tmp_path / "served.tgz"
    flowers_archive(archive)
    serve(monkeypatch, archive, "0" * 64)
    root = tmp_path / "root"
    with pytest.raises(UserError, match="sha256 is [0-9a-f]{64}, expected 0{64}"):
        build_data(data_cfg(name="flowers", root=str(root)), MODEL)
    assert list(root.iterdir()) == []
    (root / "flower_photos.tgz").write_bytes(archive.read_bytes())  # a user's copy that is not the real one
    with pytest.raises(UserError, match="sha256 differs"):
        build_data(data_cfg(name="flowers", root=str(root)), MODEL)
    assert (root / "flower_photos.tgz").exists()  # the user's file is theirs to delete


def link(name: str, target: str, kind=tarfile.SYMTYPE) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return info


def regular(name: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = 4
    return info


@pytest.mark.parametrize(
    "member",
    [
        regular("flower_photos/../../evil.txt"),
        regular("/tmp/rethink-evil.txt"),
        link("flower_photos/daisy/passwd", "/etc/passwd"),
        link("flower_photos/daisy/up", "../../../outside"),
        link("flower_photos/daisy/hard", "../outside.txt", kind=tarfile.LNKTYPE),
    ],
    ids=["dotdot", "absolute", "symlink-absolute", "symlink-up", "hardlink-up"],
)
def test_archives_that_escape_are_refused(tmp_path, monkeypatch, member):
    archive = tmp_path / "served.tgz"
    serve(monkeypatch, archive, flowers_archive(archive, [member]))
    root = tmp_path / "a" / "b" / "root"
    with pytest.raises(UserError, match="refusing to extract"):
        build_data(data_cfg(name="flowers", root=str(root)), MODEL)
    assert not (root / "flower_photos").exists()
    assert [p.name for p in root.iterdir()] == ["flower_photos.tgz"]  # nothing extracted, no staging left
    assert not list((tmp_path / "a").glob("**/evil.txt")) and not Path("/tmp/rethink-evil.txt").exists()


@pytest.mark.parametrize("has_data_filter", [True, False], ids=["python-filter", "no-python-filter"])
def test_a_chain_of_links_cannot_escape(tmp_path, monkeypatch, has_data_filter):
    # each link stays inside on its own; together they reach the parent folder
    if not has_data_filter:  # Pythons before 3.10.12 / 3.11.4 have no tarfile.data_filter
        monkeypatch.delattr(tarfile, "data_filter", raising=False)
    archive = tmp_path / "chain.tar"
    with tarfile.open(archive, "w") as tar:
        tar.addfile(link("a", "."))
        tar.addfile(link("a/b", ".."))
        tar.addfile(regular("a/b/pwned.txt"), io.BytesIO(b"evil"))
    with pytest.raises(UserError, match="refusing to extract 'a' \\(a link"):
        safe_extract(archive, tmp_path / "out")
    assert not (tmp_path / "pwned.txt").exists()
