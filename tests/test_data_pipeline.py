"""Transforms, the seeded loaders, data=synthetic, torchvision's data sets (on fake roots, offline) and
task=benchmark's wiring (not its speed)."""

import json
import pickle
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.datasets.cifar
from omegaconf import OmegaConf
from PIL import Image
from torch import nn
from torchvision import datasets
from torchvision.transforms import v2

from rethink.config import DataConfig
from rethink.data import batch_mixer, build_data, eval_transform, make_loader, normalize, set_epoch, train_transform
from rethink.data.loaders import SeededSampler
from rethink.data.synthetic import PATTERNS, generate_synthetic
from rethink.data.transforms import RandAugment
from rethink.errors import UserError
from rethink.hydra_app import compose_config

MODEL = OmegaConf.create(
    {"train_size": 32, "eval_size": 32, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
)


def data_cfg(**values):
    return OmegaConf.merge(OmegaConf.structured(DataConfig), values)


def synthetic_cfg(**values):
    return data_cfg(
        name="synthetic", num_classes=3, images_per_class=16, image_size=40, batch_size=8, cache=False, **values
    )


# ---------------------------------------------------------------- transforms


@pytest.mark.parametrize("augment", ["none", "flip_crop", "randaugment", "trivialaugment"])
def test_train_transforms_give_uint8_at_train_size(augment):
    model = OmegaConf.merge(MODEL, {"train_size": 24, "eval_size": 28})
    image = torch.randint(0, 256, (3, 50, 70), dtype=torch.uint8)
    out = train_transform(model, data_cfg(augment=augment))(image)
    assert out.dtype == torch.uint8 and out.shape == (3, 24, 24)
    out = eval_transform(model, data_cfg(augment=augment, crop_pct=0.875))(image)
    assert out.dtype == torch.uint8 and out.shape == (3, 28, 28)


@pytest.mark.parametrize("level", [0, 3, 16 / 3, 10])
def test_randaugment_up_to_level_10_is_torchvisions_bit_for_bit(level):
    image = torch.randint(0, 256, (3, 40, 48), dtype=torch.uint8)
    ours = RandAugment(level)
    for seed in range(40):  # every op comes up within 40 draws of two
        torch.manual_seed(seed)
        expected = v2.RandAugment(magnitude=round(level * 3))(image)
        torch.manual_seed(seed)
        assert torch.equal(ours(image), expected)
    # the default (data.randaug_magnitude=3) is torchvision's default, magnitude bin 9 of 0-30
    assert train_transform(MODEL, data_cfg(augment="randaugment")).transforms[-1].magnitude == 9


def test_randaugment_beyond_level_10_widens_every_range_in_proportion_with_clamps():
    def magnitudes(level, size=100):
        r = RandAugment(level)
        space = {name: fn(r.num_magnitude_bins, size, size) for name, (fn, _) in r._AUGMENTATION_SPACE.items()}
        return {name: float(m[r.magnitude]) for name, m in space.items() if m is not None}

    at10, at15, at20 = magnitudes(10), magnitudes(15), magnitudes(20)
    for op in ("ShearX", "Rotate", "TranslateY", "Brightness", "Sharpness"):
        assert at15[op] == pytest.approx(1.5 * at10[op]) and at20[op] == pytest.approx(2 * at10[op])
    assert (at10["Rotate"], at20["Rotate"], at20["ShearY"]) == pytest.approx((30, 60, 0.6))
    assert (at10["Posterize"], at15["Posterize"], at20["Posterize"]) == (4, 2, 1)  # bits kept, at least one
    assert at10["Solarize"] == at20["Solarize"] == 0  # threshold 0 already at 10
    # every op applies at level 20 on uint8 images, the darkening side of the colour ops clamped at factor 0.1
    ours, image = RandAugment(20), torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8)
    for op, (_, signed) in ours._AUGMENTATION_SPACE.items():
        for sign in (1, -1) if signed else (1,):
            out = ours._apply_image_or_video_transform(
                image, op, sign * at20.get(op, 0.0), "nearest", {torch.Tensor: None}
            )
            assert out.dtype == torch.uint8 and out.shape == image.shape
    darkest = ours._apply_image_or_video_transform(image, "Brightness", -1.8, "nearest", {torch.Tensor: None})
    assert torch.equal(darkest, v2.functional.adjust_brightness(image, 0.1))
    with pytest.raises(UserError, match=r"RandAugment magnitude 21.*\[0, 20\]"):
        RandAugment(21)


def test_eval_transform_resizes_by_crop_pct_then_centre_crops():
    image = torch.zeros(3, 64, 128, dtype=torch.uint8)
    image[:, :, 60:68] = 255  # a bright vertical band in the middle survives the centre crop
    out = eval_transform(MODEL, data_cfg(crop_pct=0.5))(image)  # resize to 64 (no-op), crop 32
    assert out.shape == (3, 32, 32) and out[:, :, 12:20].min() == 255 and out[:, :, :10].max() == 0
    with pytest.raises(UserError, match=r"data\.crop_pct"):
        eval_transform(MODEL, data_cfg(crop_pct=1.5))


def test_normalize_on_uint8_batches():
    images = (
        torch.tensor([0, 255], dtype=torch.uint8)
        .view(2, 1, 1, 1)
        .expand(2, 3, 2, 2)
        .contiguous(memory_format=torch.channels_last)
    )
    out = normalize(images, [0.5, 0.5, 0.5], [0.5, 0.25, 0.5])
    assert out.dtype == torch.float32 and out.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(out[0, :, 0, 0], torch.tensor([-1.0, -2.0, -1.0]))
    assert torch.allclose(out[1, :, 0, 0], torch.tensor([1.0, 2.0, 1.0]))


def test_batch_mixer():
    assert batch_mixer(data_cfg(), 5) is None
    mixer = batch_mixer(data_cfg(mixup_alpha=0.2, cutmix_alpha=1.0), 5)
    assert isinstance(mixer, v2.RandomChoice) and {type(t) for t in mixer.transforms} == {v2.MixUp, v2.CutMix}
    images, labels = mixer(torch.rand(4, 3, 8, 8), torch.tensor([0, 1, 2, 4]))
    assert images.shape == (4, 3, 8, 8) and labels.shape == (4, 5) and torch.allclose(labels.sum(1), torch.ones(4))
    with pytest.raises(UserError, match=r"data\.mixup_alpha"):
        batch_mixer(data_cfg(mixup_alpha=-1), 5)


# ---------------------------------------------------------------- seeded loaders


def epochs_of(loader, epochs) -> list[list[torch.Tensor]]:
    out = []
    for epoch in epochs:
        set_epoch(loader, epoch)
        out.append([torch.cat([x.flatten(), y]) for x, y in loader])
    return out


def test_sampler_depends_on_seed_and_epoch_only():
    a = SeededSampler(range(50), seed=7, shuffle=True)
    assert list(a) == list(SeededSampler(range(50), seed=7, shuffle=True))
    first = list(a)
    a.set_epoch(1)
    assert sorted(i for i, _ in a) == list(range(50)) and list(a) != first
    assert [i for i, _ in SeededSampler(range(5), seed=7, shuffle=False)] == [0, 1, 2, 3, 4]


def test_batches_are_the_same_for_any_num_workers_and_after_resume():
    bundle = build_data(synthetic_cfg(), MODEL)
    serial = epochs_of(make_loader(bundle.train, synthetic_cfg(num_workers=0), train=True, seed=3), [0, 1])
    workers = make_loader(bundle.train, synthetic_cfg(num_workers=2), train=True, seed=3)
    assert workers.persistent_workers
    parallel = epochs_of(workers, [0, 1])
    assert all(torch.equal(a, b) for a, b in zip(serial[0] + serial[1], parallel[0] + parallel[1]))
    assert not torch.equal(serial[0][0], serial[1][0])  # another epoch, another order and augmentation
    resumed = epochs_of(make_loader(bundle.train, synthetic_cfg(num_workers=2), train=True, seed=3), [1])
    assert all(torch.equal(a, b) for a, b in zip(serial[1], resumed[0]))
    other_seed = epochs_of(make_loader(bundle.train, synthetic_cfg(num_workers=0), train=True, seed=4), [0])
    assert not torch.equal(serial[0][0], other_seed[0][0])


def test_loading_leaves_the_global_random_stream_alone():
    bundle = build_data(synthetic_cfg(), MODEL)
    torch.manual_seed(11)
    expected = torch.rand(3)
    torch.manual_seed(11)
    for _ in make_loader(bundle.train, synthetic_cfg(num_workers=0), train=True, seed=0):
        pass
    assert torch.equal(torch.rand(3), expected)


def test_drop_last_never_leaves_zero_batches():
    bundle = build_data(synthetic_cfg(), MODEL)  # 3 x 16 images: 3 x 12 train, 3 x 2 val, 3 x 2 test
    assert len(bundle.train) == 36
    assert len(make_loader(bundle.train, synthetic_cfg(num_workers=0), train=True, seed=0)) == 4  # 36 // 8
    assert len(make_loader(bundle.train, synthetic_cfg(num_workers=0), train=True, seed=0, batch_size=64)) == 1
    assert len(make_loader(bundle.val, synthetic_cfg(num_workers=0), train=False, seed=0)) == 1  # 6 images, kept
    with pytest.raises(UserError, match=r"data\.num_workers"):
        make_loader(bundle.train, synthetic_cfg(num_workers=-1), train=True, seed=0)


# ---------------------------------------------------------------- data=synthetic


def test_synthetic_is_deterministic_per_split_seed():
    images, labels, classes = generate_synthetic(4, 10, 48, seed=0)
    assert images.shape == (40, 3, 48, 48) and images.dtype == torch.uint8 and classes == list(PATTERNS[:4])
    assert torch.equal(images, generate_synthetic(4, 10, 48, seed=0)[0])
    assert not torch.equal(images, generate_synthetic(4, 10, 48, seed=1)[0])
    assert torch.equal(images, generate_synthetic(10, 10, 48, seed=0)[0][:40])  # class k does not depend on the others
    assert len(PATTERNS) >= 10
    with pytest.raises(UserError, match=r"data\.num_classes=13"):
        generate_synthetic(13, 10, 48, seed=0)
    bundle = build_data(synthetic_cfg(), MODEL)
    again = build_data(synthetic_cfg(), MODEL)
    assert torch.equal(bundle.test.images, again.test.images) and bundle.test.labels == again.test.labels
    assert sorted(set(bundle.val.labels)) == [0, 1, 2] and sorted(set(bundle.test.labels)) == [0, 1, 2]
    assert len(bundle.manifest) == 48 and not bundle.skipped  # splits.csv names them synthetic/<index>


def test_synthetic_images_differ_by_seed_class_and_image():
    threads = torch.get_num_threads()
    images = generate_synthetic(12, 6, 64, seed=5)[0]
    assert torch.get_num_threads() == threads  # drawn on one thread, the caller's setting restored
    other = generate_synthetic(12, 6, 64, seed=6)[0]
    assert len({bytes(image.numpy()) for image in images}) == 72  # every image its own, in every class
    assert all(not torch.equal(images[k * 6 : k * 6 + 6], other[k * 6 : k * 6 + 6]) for k in range(12))
    assert torch.equal(images, generate_synthetic(12, 6, 64, seed=5)[0])


def _first_generator_mask(pattern, cx, cy, angle, radius, period, phase, size):
    """The first generator's per-pixel formulas, in float64: n x size x size, True on the pattern."""
    column = lambda values: values[:, None, None]  # noqa: E731
    y, x = np.mgrid[0:size, 0:size].astype(np.float64)
    dx, dy = x - column(cx), y - column(cy)
    cos, sin = column(np.cos(angle)), column(np.sin(angle))
    u, v = dx * cos + dy * sin, -dx * sin + dy * cos
    wave_u, wave_v = 2 * np.pi * u / column(period) + column(phase), 2 * np.pi * v / column(period) + column(phase)
    u, v = u / column(radius), v / column(radius)
    r = np.sqrt(u * u + v * v)
    return {
        "circle": r < 1,
        "square": np.maximum(abs(u), abs(v)) < 0.85,
        "triangle": (v < 0.5) & (np.sqrt(3) * abs(u) - v < 1),
        "stripes": np.sin(wave_v) > 0,
        "checkerboard": np.sin(wave_u) * np.sin(wave_v) > 0,
        "ring": (r < 1) & (r > 0.6),
        "cross": ((abs(u) < 0.3) & (abs(v) < 1)) | ((abs(v) < 0.3) & (abs(u) < 1)),
        "dots": np.cos(wave_u) * np.cos(wave_v) > 0.5,
        "diamond": abs(u) + abs(v) < 1.1,
        "vertical_stripes": np.sin(wave_u) > 0,
        "grid": (np.cos(wave_u) > 0.8) | (np.cos(wave_v) > 0.8),
        "ellipse": (u / 1.2) ** 2 + (v / 0.5) ** 2 < 1,
    }[pattern]


@pytest.mark.parametrize("pattern", PATTERNS)
def test_synthetic_masks_are_the_per_pixel_formulas(pattern):
    """Shapes solved row by row, textures from 16-bit phases: the same pixels as the per-pixel formulas,
    but for a rare one on an edge."""
    from rethink.data.synthetic import _Geometry, _mask

    rng = np.random.default_rng(len(pattern))
    n, size = 24, 80
    cx, cy = rng.uniform(0.3, 0.7, n) * size, rng.uniform(0.3, 0.7, n) * size
    angle, radius = np.deg2rad(rng.uniform(-15, 15, n)), rng.uniform(0.2, 0.35, n) * size
    period, phase = rng.uniform(0.12, 0.22, n) * size, rng.uniform(0, 2 * np.pi, n)
    mask = _mask(pattern, _Geometry(cx, cy, angle, radius, period, phase, size))
    assert mask.shape == (n, 1, size, size) and mask.dtype == torch.int16
    assert set(mask.unique().tolist()) == {-1, 0}
    expected = _first_generator_mask(pattern, cx, cy, angle, radius, period, phase, size)
    assert 0.02 < expected.mean() < 0.98
    assert ((mask[:, 0] == -1).numpy() != expected).mean() < 2e-4


@pytest.mark.slow
def test_synthetic_is_learnable_on_a_cpu():
    """The default data=synthetic, as composed by run.py, at 32 px: a small conv net with the default
    flip_crop augmentation ends well above chance (0.25) after a few seconds of training."""
    torch.manual_seed(0)
    cfg = compose_config(["data=synthetic", "model.train_size=32", "model.eval_size=32", "data.num_workers=0"])
    bundle = build_data(cfg.data, cfg.model)
    assert len(bundle.classes) == 4
    net = nn.Sequential(
        *[
            layer
            for c_in, c_out in ((3, 16), (16, 32), (32, 64))
            for layer in (nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(), nn.MaxPool2d(2))
        ],
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(64, 4),
    )
    loader = make_loader(bundle.train, cfg.data, train=True, seed=0)
    epochs = 8
    optimizer = torch.optim.Adam(net.parameters(), 3e-3)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, 3e-3, total_steps=epochs * len(loader))
    start = time.perf_counter()
    for epoch in range(epochs):
        set_epoch(loader, epoch)
        for images, labels in loader:
            loss = nn.functional.cross_entropy(net(normalize(images, cfg.model.mean, cfg.model.std)), labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    net.eval()
    with torch.no_grad():
        right = sum(
            (net(normalize(x, cfg.model.mean, cfg.model.std)).argmax(1) == y).sum().item()
            for x, y in make_loader(bundle.test, cfg.data, train=False, seed=0)
        )
    accuracy = right / len(bundle.test)
    assert accuracy >= 0.6, f"test accuracy {accuracy:.2f} after {time.perf_counter() - start:.0f} s"


# ---------------------------------------------------------------- torchvision data sets, offline


def fake_cifar(root: Path, name: str, per_class: int = 10) -> int:
    """torchvision's CIFAR layout with random pixels: the pickled batches and the meta file."""
    classes = 10 if name == "cifar10" else 100
    folder, label_key, meta = {
        "cifar10": ("cifar-10-batches-py", "labels", ("batches.meta", "label_names")),
        "cifar100": ("cifar-100-python", "fine_labels", ("meta", "fine_label_names")),
    }[name]
    files = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"] if name == "cifar10" else ["train", "test"]
    (root / folder).mkdir(parents=True)
    rng = np.random.default_rng(0)
    for file in files:
        labels = [k for k in range(classes) for _ in range(per_class)]
        batch = {"data": rng.integers(0, 256, (len(labels), 3072), dtype=np.uint8), label_key: labels}
        (root / folder / file).write_bytes(pickle.dumps(batch))
    (root / folder / meta[0]).write_bytes(pickle.dumps({meta[1]: [f"class{k}" for k in range(classes)]}))
    return classes


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_wiring_on_a_fake_root(tmp_path, monkeypatch, name):
    monkeypatch.setattr(
        torchvision.datasets.cifar, "check_integrity", lambda *args, **kwargs: True
    )  # no md5 of the real files
    classes = fake_cifar(tmp_path, name)
    train_files = 5 if name == "cifar10" else 1
    bundle = build_data(data_cfg(name=name, root=str(tmp_path), split=[0.8, 0.1, 0.1]), MODEL)
    assert bundle.classes == [f"class{k}" for k in range(classes)]
    assert len(bundle.test) == classes * 10
    assert len(bundle.val) == classes * round(train_files * 10 * 0.1)  # carved from train, stratified
    assert len(bundle.train) + len(bundle.val) == classes * 10 * train_files
    image, label = bundle.train[(0, 1)]
    assert image.shape == (3, 32, 32) and image.dtype == torch.uint8 and 0 <= label < classes


def test_flowers102_wiring_on_a_fake_root(tmp_path, monkeypatch):
    scipy_io = pytest.importorskip("scipy.io", reason="torchvision reads Flowers102's labels with scipy")
    monkeypatch.setattr(datasets.Flowers102, "_check_integrity", lambda self: True)
    base = tmp_path / "flowers-102"
    (base / "jpg").mkdir(parents=True)
    labels = [k % 102 + 1 for k in range(110)]  # 1-based, as in imagelabels.mat
    for image_id in range(1, 111):
        Image.new("RGB", (20, 16), (image_id, 0, 0)).save(base / "jpg" / f"image_{image_id:05d}.jpg")
    scipy_io.savemat(base / "imagelabels.mat", {"labels": np.array(labels)})
    scipy_io.savemat(
        base / "setid.mat", {"trnid": np.arange(1, 103), "valid": np.arange(103, 107), "tstid": np.arange(107, 111)}
    )
    bundle = build_data(data_cfg(name="flowers102", root=str(tmp_path)), MODEL)
    assert len(bundle.classes) == 102 and bundle.classes[0] == "pink primrose"
    assert [len(bundle.train), len(bundle.val), len(bundle.test)] == [102, 4, 4]
    assert bundle.test.paths == [f"jpg/image_{i:05d}.jpg" for i in range(107, 111)]
    assert bundle.test.labels == [labels[i - 1] - 1 for i in range(107, 111)]
    assert bundle.train[0][0].shape == (3, 32, 32)


@pytest.mark.parametrize("name", ["cifar10", "cifar100", "flowers102"])
def test_torchvision_sets_offline_are_one_clear_line(tmp_path, monkeypatch, name):
    monkeypatch.setenv("RETHINK_NO_DOWNLOAD", "1")
    if name == "flowers102":
        pytest.importorskip("scipy.io", reason="without scipy, data=flowers102 stops earlier (also a UserError)")
    with pytest.raises(UserError, match=f"data={name}: not found in .*RETHINK_NO_DOWNLOAD=1.*data.root") as e:
        build_data(data_cfg(name=name, root=str(tmp_path)), MODEL)
    assert "\n" not in str(e.value)


# ---------------------------------------------------------------- task=benchmark (wiring, not speed)


def test_benchmark_writes_its_figures(tmp_path):
    from rethink.tasks.benchmark import benchmark

    cfg = compose_config(
        [
            "task=benchmark",
            "data=synthetic",
            "model.train_size=32",
            "model.eval_size=32",
            "benchmark.images=6",
            "benchmark.warmup=2",
            "benchmark.training=false",
        ]
    )  # the training step: tests/test_benchmark.py
    result = benchmark(cfg, tmp_path / "run")
    written = json.loads((tmp_path / "run" / "benchmark.json").read_text())
    assert written == result
    pipeline = result["input_pipeline"]
    assert set(pipeline["samples_per_s"]) == {"reference", "cached", "cached_cpu_normalize", "files", "packed"}
    assert all(rate > 0 for rate in pipeline["samples_per_s"].values()) and result["cpu"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_normalize_mixer_and_pinned_batches_on_the_gpu():
    images = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8)
    on_gpu = normalize(images.cuda(), MODEL.mean, MODEL.std)
    assert on_gpu.is_cuda and torch.allclose(on_gpu.cpu(), normalize(images, MODEL.mean, MODEL.std))
    mixed, labels = batch_mixer(data_cfg(mixup_alpha=0.2, cutmix_alpha=1.0), 5)(
        on_gpu, torch.tensor([0, 1, 2, 3]).cuda()
    )
    assert mixed.is_cuda and labels.is_cuda and labels.shape == (4, 5)
    bundle = build_data(synthetic_cfg(), MODEL)
    batch, _ = next(iter(make_loader(bundle.train, synthetic_cfg(num_workers=0), train=True, seed=0, pin_memory=True)))
    assert batch.is_pinned()
