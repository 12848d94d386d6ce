"""data.decode=device (rethink/data/device_decode.py): batches decoded and cropped on the training device, here the
CPU (the same code runs nvJPEG on a GPU). The same batches from files and from a pack, for any number of workers,
per (seed, epoch), resumable mid-epoch; JPEGs upright; other formats through the CPU path's decoder."""

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from rethink.config import DataConfig
from rethink.data import build_data, file_listing, packed, set_epoch
from rethink.data.device_decode import DecodingLoader, decode_on
from rethink.errors import UserError
from rethink.hydra_app import compose_config
from rethink.tasks.train import train

MODEL = OmegaConf.create(
    {"train_size": 32, "eval_size": 32, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
)
CPU = torch.device("cpu")


def folder_cfg(root: Path, **values):
    return OmegaConf.merge(
        OmegaConf.structured(DataConfig),
        {"name": "folder", "root": str(root), "num_workers": 0, "batch_size": 4, "cache": False, **values},
    )


def photos(root: Path, per_class=8) -> Path:
    rng = np.random.default_rng(1)
    for name in ("a", "b"):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            image = Image.fromarray(rng.integers(0, 256, (40 + 2 * i, 56, 3), dtype=np.uint8))
            image.save(root / name / f"{i:02d}.{'png' if i == 3 else 'jpg'}")
    return root


def epoch_batches(dataset, cfg, epoch=1, start_batch=0, seed=7):
    loader = DecodingLoader(dataset, cfg, 24, seed=seed, device=CPU)
    set_epoch(loader, epoch, start_batch)
    return list(loader)


def test_the_same_batches_from_files_and_a_pack_with_any_workers_and_after_a_resume(tmp_path):
    folder = photos(tmp_path / "photos")
    packed.pack_listing(file_listing(folder_cfg(folder)), tmp_path / "pack", 5, 1)
    on_files = build_data(folder_cfg(folder), MODEL).train
    on_pack = build_data(folder_cfg(tmp_path / "pack"), MODEL).train
    reference = epoch_batches(on_files, folder_cfg(folder))
    assert len(reference) == len(on_files) // 4
    for images, labels in reference:
        assert images.dtype == torch.uint8 and images.shape == (4, 3, 24, 24) and labels.shape == (4,)
    for batches in (
        epoch_batches(on_pack, folder_cfg(folder)),
        epoch_batches(on_files, folder_cfg(folder, num_workers=2)),
    ):
        for (x, y), (u, v) in zip(reference, batches, strict=True):
            assert torch.equal(x, u) and torch.equal(y, v)
    tail = epoch_batches(on_files, folder_cfg(folder), start_batch=1)
    assert all(torch.equal(x, u) for (x, _), (u, _) in zip(reference[1:], tail, strict=True))
    other_epoch = epoch_batches(on_files, folder_cfg(folder), epoch=2)
    assert not all(torch.equal(x, u) for (x, _), (u, _) in zip(reference, other_epoch))


def test_jpegs_are_decoded_upright_and_other_formats_by_the_cpu_decoder(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 256, (30, 50, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored on its side
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", exif=exif, quality=95)
    encoded = torch.frombuffer(bytearray(buffer.getvalue()), dtype=torch.uint8)
    png = torch.from_numpy(pixels).permute(2, 0, 1).contiguous()  # as the worker hands a decoded PNG over
    upright, same = decode_on(CPU, [encoded, png])
    assert upright.shape == (3, 50, 30)  # turned as the camera showed it
    assert same is png or torch.equal(same, png)
    from_pil = torch.from_numpy(np.array(Image.open(buffer).transpose(Image.Transpose.ROTATE_270))).permute(2, 0, 1)
    assert (upright.int() - from_pil.int()).abs().float().mean() < 2  # libjpeg-turbo both; IDCT rounding may differ


def test_a_run_decodes_on_the_device_and_refuses_what_it_cannot(tmp_path, caplog):
    folder = photos(tmp_path / "photos", per_class=10)
    settings = [
        "data=folder",
        f"data.root={folder}",
        "data.decode=device",
        "data.num_workers=0",
        "data.batch_size=4",
        "data.split=[0.6,0.2,0.2]",
        "model=b0",
        "model.train_size=32",
        "model.eval_size=32",
        "trainer.device=cpu",
        "trainer.epochs=1",
        "trainer.limit_train_batches=2",
        "trainer.image_grid=false",
    ]
    caplog.set_level("INFO", logger="rethink")
    result = train(compose_config(settings), tmp_path / "run")
    assert 0 <= result["test_acc"] <= 1
    assert "data.decode=device: training batches decoded and cropped on cpu" in caplog.text
    with pytest.raises(UserError, match="data.decode=device crops as data.augment=flip_crop or none"):
        train(compose_config([*settings, "data.augment=randaugment"]), tmp_path / "randaugment")
    with pytest.raises(UserError, match="data=synthetic is held in memory"):
        train(
            compose_config(["data=synthetic", "data.decode=device", "trainer.device=cpu", "trainer.epochs=1"]),
            tmp_path / "synthetic",
        )
