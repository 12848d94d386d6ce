"""data.on_gpu's loader (rethink/data/device_loader.py), run on CPU tensors: the same batches as the train
DataLoader, reproducible and resumable per seed, the store's size known from the files' headers, and a
training run through it (with progressive learning's size change); on a GPU, the same pixels as on the CPU."""

import gc
import json

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from rethink.config import DataConfig
from rethink.data import build_data, make_loader, set_epoch
from rethink.data.datasets import SeededImages
from rethink.data.device_loader import DeviceLoader, decoded, device_bytes, stored_shapes
from rethink.hydra_app import compose_config
from rethink.tasks.train import train
from rethink.train import fast_paths

MODEL = OmegaConf.create({"train_size": 24, "eval_size": 24, "mean": [0.5] * 3, "std": [0.25] * 3})


def photo_folder(root, sizes=((60, 45), (45, 60), (80, 40), (50, 50), (30, 70), (64, 48))):
    """Two classes of smooth JPEGs of several sizes and orientations, one turned by its EXIF tag."""
    for label, period in (("a", 9.0), ("b", 14.0)):
        for i, (w, h) in enumerate(sizes):
            path = root / label / f"{i}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            y, x = np.mgrid[0:h, 0:w]
            planes = [
                128 + 100 * np.sin(x / (period + c) + i) * np.cos(y / (period + 2 * c)) for c in range(3)
            ]  # ~1/20 px
            image = Image.fromarray(np.stack(planes, -1).round().clip(0, 255).astype(np.uint8))
            exif = Image.Exif()
            if i == 0:
                exif[0x0112] = 6  # shown rotated by 90 degrees
            image.save(path, quality=90, exif=exif)
    return root


def folder_data(tmp_path, **values):
    cfg = OmegaConf.merge(
        OmegaConf.structured(DataConfig),
        dict(
            name="folder",
            root=str(photo_folder(tmp_path / "photos")),
            cache_dir=str(tmp_path / "cache"),
            batch_size=3,
            num_workers=0,
            split=[0.75, 0.125, 0.125],
            **values,
        ),
    )
    return cfg, build_data(cfg, MODEL)


def test_the_store_holds_what_the_data_set_decodes_and_its_size_is_known_beforehand(tmp_path):
    cfg, data = folder_data(tmp_path)
    images = list(decoded(data.train, workers=2))
    assert [tuple(image.shape[-2:]) for image in images] == stored_shapes(data.train)  # from headers, EXIF included
    assert all(torch.equal(image, data.train.image(i)) for i, image in enumerate(images))
    loader = DeviceLoader(data.train, cfg, 24, seed=0, device=torch.device("cpu"))
    assert loader.store.pixels.numel() + len(loader.store) * 3 * 8 == device_bytes(data.train)
    assert all(torch.equal(loader.store.image(i), image) for i, image in enumerate(images))


class Decoding(SeededImages):
    """A data set whose images are decoded anew on every call (fresh tensors of an odd shape), and which counts,
    at each call, how many decoded images are alive."""

    SHAPE = (3, 37, 41)

    def __init__(self, count):
        super().__init__([k % 2 for k in range(count)], transform=lambda image: image)
        self.most_alive = 0

    def image(self, index):
        gc.collect()
        alive = sum(1 for o in gc.get_objects() if type(o) is torch.Tensor and tuple(o.shape) == self.SHAPE)
        self.most_alive = max(self.most_alive, alive)
        return torch.full(self.SHAPE, index, dtype=torch.uint8)


@pytest.mark.slow
def test_the_images_go_to_the_device_one_by_one_never_all_at_once_on_the_host():
    data = Decoding(40)
    cfg = OmegaConf.merge(OmegaConf.structured(DataConfig), dict(name="folder", batch_size=4, num_workers=0))
    loader = DeviceLoader(data, cfg, 24, seed=0, device=torch.device("cpu"))
    assert all(torch.equal(loader.store.image(k), torch.full(Decoding.SHAPE, k, dtype=torch.uint8)) for k in range(40))
    assert data.most_alive <= 2, data.most_alive  # the one being copied, at most: not the 40


def test_under_ddp_each_process_stores_and_trains_on_its_own_share(tmp_path):
    cfg, data = folder_data(tmp_path)
    loaders = [
        DeviceLoader(data.train, cfg, 24, seed=5, device=torch.device("cpu"), shard=(rank, 2)) for rank in (0, 1)
    ]
    half = len(data.train) // 2
    assert [len(loader.store) for loader in loaders] == [half, half]
    assert device_bytes(data.train, shard=(1, 2)) == loaders[1].store.pixels.numel() + half * 3 * 8
    for rank, loader in enumerate(loaders):  # each holds every other image, from its rank on
        assert all(torch.equal(loader.store.image(k), data.train.image(rank + 2 * k)) for k in range(half))
    for epoch in (1, 2):
        seen = []
        for rank, loader in enumerate(loaders):
            set_epoch(loader, epoch)
            assert len(loader) == half // 3  # every process steps equally often
            order = [rank + 2 * k for k, _ in loader.sampler]
            assert [labels.tolist() for _, labels in loader] == [
                [data.train.labels[i] for i in order[b * 3 : b * 3 + 3]] for b in range(half // 3)
            ]
            seen += order
        assert sorted(seen) == list(range(2 * half))  # an epoch trains on every image once
    assert [i for i, _ in loaders[0].sampler] != [i for i, _ in loaders[1].sampler]  # not the same shuffle


def test_batches_are_the_train_loaders_own_in_order_reproducible_and_resumable(tmp_path):
    cfg, data = folder_data(tmp_path)
    cpu_loader = make_loader(data.train, cfg, train=True, seed=5)
    loader = DeviceLoader(data.train, cfg, 24, seed=5, device=torch.device("cpu"))
    assert len(loader) == len(cpu_loader) == len(data.train) // 3
    for epoch in (1, 2):
        set_epoch(cpu_loader, epoch), set_epoch(loader, epoch)
        batches = list(loader)
        assert [labels.tolist() for _, labels in batches] == [labels.tolist() for _, labels in cpu_loader]
        assert all(images.dtype == torch.uint8 and images.shape == (3, 3, 24, 24) for images, _ in batches)
        set_epoch(loader, epoch)
        assert all(torch.equal(a, b) for (a, _), (b, _) in zip(batches, loader))  # the same seed, the same crops
        set_epoch(loader, epoch, start_batch=1)  # a resumed epoch: the batches it had not trained on, exactly
        assert all(torch.equal(a, b) for (a, _), (b, _) in zip(batches[1:], loader))
    set_epoch(loader, 1)
    first = next(iter(loader))[0]
    assert not torch.equal(first, batches[0][0])  # epoch 2's crops are not epoch 1's
    assert loader.resized(16) is loader and next(iter(loader))[0].shape == (3, 3, 16, 16)


@pytest.mark.parametrize("crop_pct", [1.0, 0.875])
def test_without_augmentation_the_batch_is_torchvisions_resize_and_centre_crop(tmp_path, crop_pct):
    # at crop_pct 1 the images are stored at a shorter side of 24 (nothing to resize); at 0.875, of 27: resized
    cfg, data = folder_data(tmp_path, augment="none", crop_pct=crop_pct)
    loader = DeviceLoader(data.train, cfg, 24, seed=0, device=torch.device("cpu"))
    for i in range(len(data.train)):
        ours = loader._images(torch.tensor([i]), seed=0)[0]
        theirs = data.train.transform(
            data.train.image(i)
        )  # torchvision's uint8 kernel: within a level of its float one
        assert (ours.int() - theirs.int()).abs().max() <= (0 if crop_pct == 1 else 1), i


@pytest.mark.slow
def test_a_run_trains_from_device_resident_data_through_a_progressive_stage_change(
    tmp_path, monkeypatch, scalars, tiny_overrides
):
    monkeypatch.setattr(fast_paths, "data_on_gpu_choice", lambda *a: fast_paths.Choice(True, "test: on the CPU"))
    sizes = []
    resized = DeviceLoader.resized
    monkeypatch.setattr(DeviceLoader, "resized", lambda self, size: sizes.append(size) or resized(self, size))
    run = tmp_path / "run"
    metrics = train(
        compose_config([*tiny_overrides, "progressive=v2", "progressive.stages=2", "progressive.min_size=16"]), run
    )
    assert metrics["data_on_gpu"] is True and json.loads((run / "metrics.json").read_text())["data_on_gpu"] is True
    assert scalars(run)["train/image_size"] == [(1, 24), (2, 32)]
    assert sizes == [24, 32]  # each stage's crops made by the device loader


@pytest.mark.slow
def test_images_that_do_not_fit_after_all_fall_back_to_the_cpu_loader(tmp_path, monkeypatch, tiny_overrides):
    import rethink.train.fit as train_task

    def out_of_memory(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(fast_paths, "data_on_gpu_choice", lambda *a: fast_paths.Choice(True, "test: on the CPU"))
    monkeypatch.setattr(train_task, "DeviceLoader", out_of_memory)
    metrics = train(compose_config([*tiny_overrides, "trainer.epochs=1"]), tmp_path / "run")
    assert metrics["data_on_gpu"] is False and metrics["epochs"] == 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("augment", ["flip_crop", "none"])
def test_on_a_gpu_the_batches_are_the_cpus_within_a_level(tmp_path, augment):
    cfg, data = folder_data(tmp_path, augment=augment, crop_pct=0.875)
    cpu = DeviceLoader(data.train, cfg, 24, seed=0, device=torch.device("cpu"))
    gpu = DeviceLoader(data.train, cfg, 24, seed=0, device=torch.device("cuda"))
    set_epoch(cpu, 1), set_epoch(gpu, 1)
    for (cpu_images, cpu_labels), (gpu_images, gpu_labels) in zip(cpu, gpu):  # the same boxes (a CPU generator)
        assert gpu_images.is_cuda and gpu_labels.is_cuda and torch.equal(gpu_labels.cpu(), cpu_labels)
        assert (gpu_images.cpu().int() - cpu_images.int()).abs().max() <= 1  # float summation order at most
