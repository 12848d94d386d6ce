"""Data sets at ImageNet's scale: a splitter that is not O(files x classes), a scan shared by torchrun's
processes and saved as it goes, image sizes recorded by the scan, and ImageNet's layout as it comes."""

import json
import os
import subprocess
import sys
import threading
import time
from collections import Counter
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image
from scipy.io import savemat

from rethink.config import DataConfig
from rethink.data import build_data, cache, device_loader, folder, images, scan, splits
from rethink.errors import UserError

ROOT = Path(__file__).resolve().parent.parent

# ---------------------------------------------------------------- the splitter


def old_shuffled_class(labels: np.ndarray, label: int, seed: int) -> np.ndarray:
    """The implementation before class_members (O(files) per class), as the reference."""
    return np.random.default_rng([seed, int(label)]).permutation(np.flatnonzero(labels == label))


def old_stratified_split(labels, fractions, seed):
    labels = np.asarray(labels)
    parts = np.zeros(len(labels), dtype=np.int64)
    for label in np.unique(labels):
        shuffled = old_shuffled_class(labels, label, seed)
        bounds = np.cumsum(splits.part_sizes(len(shuffled), fractions))[:-1]
        for part, chunk in enumerate(np.split(shuffled, bounds)):
            parts[chunk] = part
    return parts


def old_stratified_subset(labels, count, seed):
    labels = np.asarray(labels)
    if count >= len(labels):
        return list(range(len(labels)))
    classes, sizes = np.unique(labels, return_counts=True)
    shares, remainders = np.divmod(count * sizes, len(labels))
    tie_break = np.random.default_rng(seed).permutation(len(classes))
    by_remainder = np.lexsort((tie_break, -remainders))
    shares[by_remainder[: count - shares.sum()]] += 1
    chosen = [old_shuffled_class(labels, label, seed)[:share] for label, share in zip(classes, shares)]
    return sorted(np.concatenate(chosen).tolist())


@pytest.mark.parametrize("seed", [0, 1, 7])
def test_the_splitter_gives_exactly_what_the_per_class_scan_gave(seed):
    rng = np.random.default_rng(seed)
    for classes in (2, 13, 200):
        labels = rng.integers(0, classes, 3000).tolist()
        labels = [label for label in labels if label != 5]  # a gap in the labels
        fractions = (0.7, 0.15, 0.15)
        assert (splits.stratified_split(labels, fractions, seed) == old_stratified_split(labels, fractions, seed)).all()
        for count in (1, 17, 500, 2999):
            assert splits.stratified_subset(labels, count, seed) == old_stratified_subset(labels, count, seed)
    assert len(splits.stratified_split([], (0.7, 0.15, 0.15), seed)) == 0


def split_seconds(items: int, classes: int) -> float:
    labels = np.random.default_rng(0).integers(0, classes, items)
    started = time.perf_counter()
    parts = splits.stratified_split(labels, (0.7, 0.15, 0.15), seed=0)
    subset = splits.stratified_subset(labels, 50_000, seed=0)
    elapsed = time.perf_counter() - started
    assert np.bincount(parts).tolist() == pytest.approx([0.7 * items, 0.15 * items, 0.15 * items], rel=0.02)
    assert len(subset) == 50_000
    return elapsed


def test_a_million_items_in_a_thousand_classes_split_in_a_second():
    assert split_seconds(1_000_000, 1000) < 5  # 0.4 s here (2 cores), 2 s beside another test


@pytest.mark.slow
def test_a_million_items_in_twenty_thousand_classes_split_in_seconds_not_minutes():
    assert split_seconds(1_000_000, 20_000) < 8  # 3 s here; the per-class scan took 22 s (O(files x classes))


# ---------------------------------------------------------------- torchrun's start-up


def test_the_process_group_waits_trainer_dist_timeout_min_not_nccls_ten_minutes(monkeypatch):
    import torch.distributed

    from rethink.config import TrainerConfig
    from rethink.train import distributed

    joined = {}
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(
        torch.distributed, "init_process_group", lambda backend, **kw: joined.update(kw, backend=backend)
    )
    default = OmegaConf.structured(TrainerConfig).dist_timeout_min
    distributed.start(distributed.World(1, 2, 1), "cpu", default)
    assert joined["backend"] == "gloo" and joined["timeout"] == timedelta(minutes=60)
    distributed.start(distributed.World(1, 2, 1), "cpu", 240)
    assert joined["timeout"] == timedelta(hours=4)


# ---------------------------------------------------------------- the scan: shared, saved as it goes, sizes


def jpeg_folder(root: Path, classes: int = 3, per_class: int = 40) -> tuple[Path, list[str]]:
    """Tiny JPEGs, every one different; returns the folder and the relative paths, sorted."""
    rng = np.random.default_rng(0)
    for k in range(classes):
        for i in range(per_class):
            path = root / f"class{k}" / f"{i:04d}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 255, (6 + k, 8 + i % 5, 3), dtype=np.uint8)).save(path)
    return root, sorted(p.relative_to(root).as_posix() for p in root.rglob("*.jpg"))


@pytest.fixture
def reads(monkeypatch):
    """Every file the scan decodes, by content hash (a Counter, filled as the scan goes)."""
    counted = Counter()
    lock = threading.Lock()

    def counting(data):
        with lock:
            counted[cache.content_digest(data)] += 1
        return images.inspect_image(data)

    monkeypatch.setattr(scan, "inspect_image", counting)
    return counted


def test_processes_share_the_scan_and_every_file_is_read_once_in_total(tmp_path, reads):
    root, paths = jpeg_folder(tmp_path / "d")
    barrier = threading.Barrier(3)
    results = [None] * 3

    def process(rank):
        results[rank] = scan.scan_images(root, paths, tmp_path / "c", scan.Share(rank, 3, barrier.wait))

    threads = [threading.Thread(target=process, args=(rank,)) for rank in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert len(reads) == len(paths) and set(reads.values()) == {1}  # each file once, not once per process
    alone = scan.scan_images(root, paths, tmp_path / "c2")
    assert all(result == alone for result in results) and len(alone.digests) == len(paths)
    assert len(list((tmp_path / "c" / "scans").rglob("*.json"))) == 1  # rank 0 gathered the three parts into one


def test_a_scan_cut_short_keeps_what_it_found_and_the_rerun_reads_only_the_rest(tmp_path, monkeypatch, reads):
    root, paths = jpeg_folder(tmp_path / "d")
    counting = scan.inspect_image
    fifty_first = cache.content_digest((root / paths[50]).read_bytes())

    def interrupted(data):  # a Ctrl-C while the 51st file is checked
        if cache.content_digest(data) == fifty_first:
            raise KeyboardInterrupt
        return counting(data)

    with monkeypatch.context() as patch:
        patch.setattr(scan, "inspect_image", interrupted)
        with pytest.raises(KeyboardInterrupt):
            scan.scan_images(root, paths, tmp_path / "c")
    first = Counter(reads)
    assert 50 <= sum(first.values()) < len(paths)
    remembered = cache.ScanRecords(tmp_path / "c", root).records
    assert sorted(remembered) == paths[:50]
    reads.clear()
    again = scan.scan_images(root, paths, tmp_path / "c")
    assert len(again.digests) == len(paths) and sum(reads.values()) == len(paths) - len(remembered)
    assert not set(reads) & {record[2] for record in remembered.values()}  # nothing read twice


def test_scan_records_are_saved_every_n_files_without_waiting_for_the_end(tmp_path):
    records = cache.ScanRecords(tmp_path / "c", tmp_path, flush_every=5, flush_seconds=3600)
    for i in range(12):
        records.put(f"f{i}.jpg", (100 + i, 7), f"digest{i}", None, (8, 6))
    on_disk = cache.ScanRecords(tmp_path / "c", tmp_path).records  # what a kill now would leave
    assert sorted(on_disk) == sorted(f"f{i}.jpg" for i in range(10))
    assert on_disk["f3.jpg"] == (103, 7, "digest3", None, 8, 6)
    records.save()
    assert len(cache.ScanRecords(tmp_path / "c", tmp_path).records) == 12
    assert len(list((tmp_path / "c" / "scans").rglob("*.json"))) == 1  # the scan's three parts gathered into one


def test_records_of_the_version_before_sizes_are_scanned_again(tmp_path, reads):
    root, paths = jpeg_folder(tmp_path / "d", classes=2, per_class=3)
    old = {p: [(root / p).stat().st_size, (root / p).stat().st_mtime_ns, "0" * 32, None] for p in paths}
    key = cache._short_hash(str(root.resolve()))
    (tmp_path / "c" / "scans").mkdir(parents=True)
    (tmp_path / "c" / "scans" / f"{key}.json").write_text(json.dumps(old))  # version 1: one JSON object, no sizes
    found = scan.scan_images(root, paths, tmp_path / "c")
    assert (
        sum(reads.values()) == len(paths) and len(found.sizes) == len(paths) and "0" * 32 not in found.digests.values()
    )


def test_the_scan_records_each_images_upright_size_and_on_gpu_estimates_read_no_header(tmp_path, monkeypatch):
    root = tmp_path / "d"
    made = {}
    for k, (name, size, orientation) in enumerate(
        (("a/wide.jpg", (40, 20), 1), ("a/turned.jpg", (40, 20), 6), ("a/big.jpg", (300, 200), 8))
        + tuple((f"b/{i}.png", (9 + i, 30), 1) for i in range(3))
    ):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        exif = Image.Exif()
        exif[0x0112] = orientation
        Image.new("RGB", size, (90, 20 * k, 200)).save(root / name, exif=exif)
        made[name] = size[::-1] if orientation != 1 else size
    paths = sorted(made)
    found = scan.scan_images(root, paths, tmp_path / "c")
    assert found.sizes == made and made["a/turned.jpg"] == (20, 40)
    assert scan.scan_images(root, paths, tmp_path / "c").sizes == made  # remembered

    cfg = OmegaConf.merge(
        OmegaConf.structured(DataConfig),
        {"name": "folder", "root": str(root), "cache_dir": str(tmp_path / "c"), "split": [0.34, 0.33, 0.33]},
    )
    model = OmegaConf.create({"train_size": 16, "eval_size": 16, "mean": [0.5] * 3, "std": [0.25] * 3})
    data = build_data(cfg, model)
    for part in (data.train, data.val, data.test):
        decoded = [tuple(part.image(i).shape[-2:]) for i in range(len(part))]
        with monkeypatch.context() as patch:
            patch.setattr(images.Image, "open", lambda *a, **k: pytest.fail("a header was read"))
            assert device_loader.stored_shapes(part) == decoded


SCAN_UNDER_TORCHRUN = """
import json, sys
from omegaconf import OmegaConf
from rethink.config import DataConfig
from rethink.data import build_data, cache, images, scan
from rethink.train import distributed

world = distributed.torchrun_world()
distributed.start(world, "cpu")
read = []
scan.inspect_image = lambda data: read.append(cache.content_digest(data)) or images.inspect_image(data)
cfg = OmegaConf.merge(OmegaConf.structured(DataConfig), {"name": "folder", "root": sys.argv[1], "cache_dir": sys.argv[2]})
model = OmegaConf.create({"train_size": 16, "eval_size": 16, "mean": [0.5] * 3, "std": [0.25] * 3})
data = build_data(cfg, model, share=distributed.data_share(world))
with open(f"{sys.argv[3]}/rank{world.rank}.json", "w") as f:
    json.dump({"read": read, "fingerprint": data.fingerprint, "train": len(data.train)}, f)
distributed.stop(world)
"""


@pytest.mark.slow
def test_under_torchrun_every_file_is_read_once_in_total_not_once_per_rank(tmp_path):
    root, paths = jpeg_folder(tmp_path / "d", classes=4, per_class=75)  # 300 files
    script = tmp_path / "scan_under_torchrun.py"
    script.write_text(SCAN_UNDER_TORCHRUN)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(script)]
    for run in ("first", "second"):
        (tmp_path / run).mkdir()
        result = subprocess.run(
            [*command, str(root), str(tmp_path / "c"), str(tmp_path / run)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=300,
            env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"},
        )
        assert result.returncode == 0, result.stderr[-3000:]
    first = [json.loads((tmp_path / "first" / f"rank{r}.json").read_text()) for r in (0, 1)]
    reads = Counter(first[0]["read"] + first[1]["read"])
    assert len(reads) == len(paths) and set(reads.values()) == {1}  # every file once in total
    assert [len(rank["read"]) for rank in first] == [150, 150]  # each rank its half, at once
    second = [json.loads((tmp_path / "second" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [rank["read"] for rank in second] == [[], []]  # remembered: nothing read again
    assert len({rank["fingerprint"] for rank in first + second}) == 1  # every rank has the same data set


def test_a_download_happens_on_rank_0_first_then_on_the_others():
    barrier, order = threading.Barrier(2), []
    threads = [
        threading.Thread(target=lambda r=r: scan.Share(r, 2, barrier.wait).first(lambda: order.append(r)))
        for r in (1, 0)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=10)
    assert order == [0, 1]


# ---------------------------------------------------------------- ImageNet's layout

WNIDS = ["n01440764", "n01443537", "n01484850"]
DEVKIT_IDS = {"n01440764": 3, "n01443537": 1, "n01484850": 2}  # the devkit's ILSVRC2012_IDs are not in wnid order


def imagenet_tree(root: Path, per_class: int = 6, val: int = 9) -> dict[str, str]:
    """train/<wnid>/*.JPEG and a flat val/ of `val` images; returns each val file's true wnid."""
    rng = np.random.default_rng(1)
    for wnid in WNIDS:
        for i in range(per_class):
            path = root / "train" / wnid / f"{wnid}_{i}.JPEG"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 255, (8, 10, 3), dtype=np.uint8)).save(path, format="JPEG")
    truth = {}
    (root / "val").mkdir(parents=True)
    for i in range(val):
        name = f"ILSVRC2012_val_{i + 1:08d}.JPEG"
        Image.fromarray(rng.integers(0, 255, (8, 10, 3), dtype=np.uint8)).save(root / "val" / name, format="JPEG")
        truth[name] = WNIDS[(i * 7) % 3]
    return truth


def write_label_file(form: str, where: Path, truth: dict[str, str]) -> None:
    where.mkdir(parents=True, exist_ok=True)
    names = sorted(truth)
    if form == "torchvision":
        torch.save(({w: (w,) for w in WNIDS}, [truth[n] for n in names]), where / "meta.bin")
    elif form == "kaggle":
        rows = [f"{Path(n).stem},{truth[n]} 1 2 30 40 {truth[n]} 5 6 7 8" for n in reversed(names)]
        (where / "LOC_val_solution.csv").write_text("ImageId,PredictionString\n" + "\n".join(rows) + "\n")
    else:
        synsets = np.zeros(4, dtype=[("ILSVRC2012_ID", "O"), ("WNID", "O"), ("words", "O"), ("num_children", "O")])
        for i, (wnid, number) in enumerate([*DEVKIT_IDS.items(), ("n00001740", 4)]):
            synsets[i] = (number, wnid, "a thing", 0 if number < 4 else 3)
        savemat(where / "meta.mat", {"synsets": synsets})
        lines = [str(DEVKIT_IDS[truth[n]]) for n in names]
        (where / "ILSVRC2012_validation_ground_truth.txt").write_text("\n".join(lines) + "\n")


@pytest.mark.parametrize(
    "form, where",
    [("torchvision", "."), ("kaggle", "."), ("devkit", "ILSVRC2012_devkit_t12/data"), ("devkit", ".")],
)
def test_a_flat_val_folder_is_labelled_by_its_label_file(tmp_path, form, where):
    truth = imagenet_tree(tmp_path / "in")
    write_label_file(form, tmp_path / "in" / where, truth)
    listing = folder.list_folder(tmp_path / "in")
    assert listing.classes == WNIDS
    val = {
        path: listing.classes[label]
        for path, label, split in zip(listing.paths, listing.labels, listing.splits)
        if split == "val"
    }
    assert val == {f"val/{name}": wnid for name, wnid in truth.items()}


def test_data_imagenet_takes_kaggles_layout_with_val_as_the_test_split(tmp_path):
    truth = imagenet_tree(tmp_path / "kaggle" / "ILSVRC" / "Data" / "CLS-LOC")
    root = tmp_path / "kaggle" / "ILSVRC" / "Data" / "CLS-LOC"
    write_label_file("kaggle", tmp_path / "kaggle", truth)  # LOC_val_solution.csv lies above ILSVRC/
    (root / "test").mkdir()
    Image.new("RGB", (8, 8)).save(root / "test" / "ILSVRC2012_test_00000001.JPEG", format="JPEG")  # no labels: left out
    cfg = OmegaConf.merge(
        OmegaConf.structured(DataConfig),
        {"name": "imagenet", "root": str(root), "cache_dir": str(tmp_path / "c"), "split": [0.6, 0.3, 0.1]},
    )
    model = OmegaConf.create({"train_size": 16, "eval_size": 16, "mean": [0.5] * 3, "std": [0.25] * 3})
    data = build_data(cfg, model)
    rows = {row.path: (row.split, row.class_name) for row in data.manifest}
    assert {p: c for p, (s, c) in rows.items() if s == "test"} == {f"val/{n}": w for n, w in truth.items()}
    assert len(data.val) == 6 and len(data.train) == 12  # val carved from train/, 2 of each class's 6
    assert not any(p.startswith("test/") for p in rows)


def test_data_imagenet_takes_a_val_folder_already_sorted_into_classes(tmp_path):
    truth = imagenet_tree(tmp_path / "in")
    for name, wnid in truth.items():
        (tmp_path / "in" / "val" / wnid).mkdir(exist_ok=True)
        (tmp_path / "in" / "val" / name).rename(tmp_path / "in" / "val" / wnid / name)
    listing = folder.list_folder(tmp_path / "in", folder.IMAGENET_SPLIT_FOLDERS)
    assert sorted(p for p, s in zip(listing.paths, listing.splits) if s == "test") == sorted(
        f"val/{w}/{n}" for n, w in truth.items()
    )


def test_a_flat_split_folder_without_a_label_file_is_one_clear_error(tmp_path):
    imagenet_tree(tmp_path / "in")
    with pytest.raises(
        UserError,
        match="val/ holds images but no class folders; label them with meta.bin, LOC_val_solution.csv or ILSVRC2012_validation_ground_truth.txt",
    ):
        folder.list_folder(tmp_path / "in")
    (tmp_path / "in" / "ILSVRC2012_validation_ground_truth.txt").write_text("1\n" * 9)
    with pytest.raises(UserError, match="meta.mat"):
        folder.list_folder(tmp_path / "in")


def test_a_pack_of_imagenets_layout_gives_data_imagenet_the_same_split(tmp_path):
    from rethink.data import file_listing, packed

    root = tmp_path / "kaggle" / "ILSVRC" / "Data" / "CLS-LOC"
    write_label_file("kaggle", tmp_path / "kaggle", imagenet_tree(root))

    def cfg(where):
        return OmegaConf.merge(
            OmegaConf.structured(DataConfig),
            {"name": "imagenet", "root": str(where), "cache_dir": str(tmp_path / "c"), "split": [0.6, 0.3, 0.1]},
        )

    packed.pack_listing(file_listing(cfg(root)), tmp_path / "pack", files_per_shard=7, workers=1)
    model = OmegaConf.create({"train_size": 16, "eval_size": 16, "mean": [0.5] * 3, "std": [0.25] * 3})
    on_folder, on_pack = build_data(cfg(root), model), build_data(cfg(tmp_path / "pack"), model)
    assert on_pack.manifest == on_folder.manifest and on_pack.fingerprint == on_folder.fingerprint
    assert {row.split for row in on_pack.manifest} == {"train", "val", "test"}


@pytest.mark.slow
def test_a_torchrun_run_on_a_folder_shares_its_scan_and_trains(tmp_path, unseeded):
    root, paths = jpeg_folder(tmp_path / "d", classes=3, per_class=30)
    args = [a for a in unseeded if not a.startswith(("data=", "data.images_per_class", "data.image_size"))]
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node=2",
        str(ROOT / "run.py"),
    ]
    result = subprocess.run(
        [
            *command,
            *args,
            "data=folder",
            f"data.root={root}",
            "trainer.epochs=1",
            "trainer.image_grid=false",
            "trainer.cpu_threads=1",
            "seed=0",
            f"hydra.run.dir={tmp_path / 'run'}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"checking 45 images in {root}, 90 among 2 processes" in (tmp_path / "run" / "run.log").read_text()
    parts = list((tmp_path / "cache" / "scans").rglob("*.json"))  # conftest: RETHINK_CACHE=tmp_path/cache
    assert len(parts) == 1 and len(json.loads(parts[0].read_text())["paths"]) == 90  # gathered by rank 0
