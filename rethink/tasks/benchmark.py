"""task=benchmark: where a training run's time and memory go, measured in one process, as ratios.

Two parts, each switchable, both in benchmark.json and printed as tables:
- the input pipeline (benchmark.pipeline), below: training samples per second per core, the seed
  project's input pipeline against ours.
- the training step (benchmark.training): ours, through the trainer's own Learner with the run's trainer.*
  settings, against torchvision's same network; see benchmark_step.py.

Reference: the seed project's pipeline, torchvision's ImageFolder way (PIL open and convert, RandomResizedCrop,
horizontal flip, ToTensor, Normalize, torchvision.transforms). Cached: ours, as a loader worker runs it (the image read back from the decoded-
image cache, then RandomResizedCrop and flip on uint8; normalisation happens later on the device); it is
also timed with normalisation on the CPU, for a like-for-like figure. Uncached, as a first epoch or a data set
too large for the cache runs: decoded from the files, and from a pack of the same files (task=pack), each
at the cache's side (a JPEG's DCT reduction) and then cropped. Both run in this one process, on
`benchmark.threads` threads, without loader workers, over the same training images of the configured
data set (cache warmed first; `benchmark.warmup` untimed samples each). In-memory data sets
(synthetic, cifar) have no files: photo-like 500x375 JPEGs are written to a temporary folder instead.

Like with like: both crop the same photos at the same detail. The cache holds each image decoded at the
shorter side RandomResizedCrop's smallest crop needs (`stored_size`: train_size / sqrt(0.08), 792 px for
224), never enlarged, so a 500x375 photo is cached whole, as the reference decodes it; only larger photos
are cached downscaled, still to more pixels than any crop is resized to. `cache_side` in benchmark.json
is that side; `cached_at_full_size` the fraction of the timed images the cache holds at full size.
"""

import logging
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torchvision
from omegaconf import DictConfig, OmegaConf
from PIL import Image
from torch.utils.data import default_collate
from torchvision import transforms as v1

from ..atomic import atomic_write_json
from ..config import value
from ..data import build_data, normalize
from ..data.datasets import FileImages, PackedImages
from ..data.folder import Listing
from ..data.loaders import SeededSampler
from ..data.packed import pack_listing, read_pack
from ..environment import cpu_model
from ..errors import UserError
from . import benchmark_step

log = logging.getLogger("rethink")

FILE_BASED = ("flowers", "folder", "imagenet", "flowers102")
PHOTO_SIZE = (500, 375)  # a typical tf_flowers photo


def benchmark(cfg: DictConfig, run_dir: Path) -> dict:
    b = cfg.benchmark
    if not (b.training or b.pipeline):
        raise UserError("benchmark.training and benchmark.pipeline are both false: nothing to time")
    if b.training:
        benchmark_step.plan(cfg)  # its mistakes before anything is timed
    result = dict(cpu=cpu_model(), torch=torch.__version__, torchvision=torchvision.__version__)
    tables = []
    if b.pipeline:  # first: a data set that is not there fails before anything is timed
        result["input_pipeline"] = _input_pipeline(cfg)
        tables.append(format_pipeline(result["input_pipeline"], result["cpu"]))
    if b.training:
        result["training"] = benchmark_step.measure(cfg)
        tables.append(benchmark_step.format_training(result["training"]))
    print("\n\n".join(tables))
    atomic_write_json(run_dir / "benchmark.json", result)
    log.info(f"wrote {run_dir / 'benchmark.json'}")
    return result


def _input_pipeline(cfg: DictConfig) -> dict:
    b = cfg.benchmark
    threads = torch.get_num_threads()
    torch.set_num_threads(b.threads)
    try:
        rates, source, cache_side, full_size = _measure(cfg)
    finally:
        torch.set_num_threads(threads)  # the rest of the process (a sweep's next job) keeps its threads
    return {
        "data": source,
        "images": b.images,
        "warmup": b.warmup,
        "threads": b.threads,
        "batch_size": cfg.data.batch_size,
        "train_size": cfg.model.train_size,
        "cache_side": cache_side,
        "cached_at_full_size": full_size,
        "samples_per_s": {name: round(rate, 1) for name, rate in rates.items()},
        "ratio_cached_vs_reference": round(rates["cached"] / rates["reference"], 2),
        "ratio_cached_cpu_normalize_vs_reference": round(rates["cached_cpu_normalize"] / rates["reference"], 2),
    }


def _measure(cfg: DictConfig) -> tuple[dict, str, int, float]:
    """Samples per second of each pipeline, what data they ran on, the shorter side the cache holds,
    and the fraction of the timed images it holds at full size."""
    b = cfg.benchmark
    with tempfile.TemporaryDirectory(prefix="rethink-benchmark-") as tmp:
        data_cfg, source = _file_data(cfg.data, Path(tmp), b.images + b.warmup)
        train = build_data(data_cfg, cfg.model).train
        if not isinstance(train, FileImages) or train.cache is None:
            raise UserError("task=benchmark times the decoded-image cache: leave data.cache=true")
        keys = list(SeededSampler(range(len(train)), seed=cfg.seed, shuffle=True))
        keys = [keys[i % len(keys)] for i in range(b.warmup + b.images)]
        reference = SeedPipeline(train, cfg.model.train_size, cfg.model.mean, cfg.model.std)
        for index, _ in keys:  # warm the cache: this benchmark times reading it back
            train.image(index)
        with_cpu_normalize = NormalizedAfter(train, cfg.model.mean, cfg.model.std)
        timed = sorted({i for i, _ in keys})
        uncached = _uncached(train, timed, Path(tmp) / "pack")
        rates = {
            "reference": _samples_per_s(reference, [i for i, _ in keys], b.warmup, cfg.data.batch_size),
            "cached": _samples_per_s(train, keys, b.warmup, cfg.data.batch_size),
            "cached_cpu_normalize": _samples_per_s(with_cpu_normalize, keys, b.warmup, cfg.data.batch_size),
        }
        for name, dataset in uncached.items():
            position = {index: k for k, index in enumerate(timed)}
            rates[name] = _samples_per_s(
                dataset, [(position[i], seed) for i, seed in keys], b.warmup, cfg.data.batch_size
            )
        whole = sum(_shorter_side(train.root / train.paths[i]) <= train.stored_side for i in timed)
        return rates, source, train.stored_side, round(whole / len(timed), 3)


def _uncached(train: FileImages, timed: list[int], pack_folder: Path) -> dict[str, FileImages]:
    """The timed images without the decoded-image cache: decoded from their files, and from a pack of them."""
    names, labels = [train.paths[i] for i in timed], [train.labels[i] for i in timed]
    listing = Listing(train.root, [str(k) for k in range(max(labels) + 1)], names, labels, [None] * len(names))
    pack_listing(listing, pack_folder, files_per_shard=5000, workers=1)
    pack = read_pack(pack_folder)
    files = FileImages(train.root, names, labels, train.transform, train.stored_side)
    return {
        "files": files,
        "packed": PackedImages(pack.locations(names), names, labels, train.transform, train.stored_side),
    }


def _shorter_side(path: Path) -> int:
    with Image.open(path) as image:  # reads the header only
        return min(image.size)


def format_pipeline(result: dict, cpu: str) -> str:
    rates = result["samples_per_s"]
    per_core = f"per core ({result['threads']} thread{'s' if result['threads'] > 1 else ''}, no workers)"
    return "\n".join(
        [
            f"input pipeline, training samples/s {per_core}, {result['train_size']} px, {cpu}",
            f"data: {result['data']}; cached at shorter side <= {result['cache_side']} px ({result['cached_at_full_size']:.0%} at full size)",
            f"  reference (PIL decode + RandomResizedCrop + ToTensor + Normalize) {rates['reference']:8.1f}",
            f"  cached (uint8 cache + RandomResizedCrop + flip)                  {rates['cached']:8.1f}  x{result['ratio_cached_vs_reference']:.2f}",
            f"  cached, normalised on the CPU too                                {rates['cached_cpu_normalize']:8.1f}  x{result['ratio_cached_cpu_normalize_vs_reference']:.2f}",
            f"  uncached: files (decode at the cache's side + crop + flip)       {rates['files']:8.1f}  x{rates['files'] / rates['reference']:.2f}",
            f"  uncached: a pack's shards (task=pack; the same decode)           {rates['packed']:8.1f}  x{rates['packed'] / rates['reference']:.2f}",
        ]
    )


class SeedPipeline:
    """The seed project's training input: PIL decode, then torchvision.transforms on the PIL image."""

    def __init__(self, files: FileImages, size: int, mean, std):
        self.files = files
        self.transform = v1.Compose(
            [v1.RandomResizedCrop(size), v1.RandomHorizontalFlip(), v1.ToTensor(), v1.Normalize(list(mean), list(std))]
        )

    def __getitem__(self, index: int):
        image = Image.open(self.files.root / self.files.paths[index]).convert("RGB")
        return self.transform(image), self.files.labels[index]


class NormalizedAfter:
    def __init__(self, files: FileImages, mean, std):
        self.files, self.mean, self.std = files, list(mean), list(std)

    def __getitem__(self, key):
        image, label = self.files[key]
        return normalize(image, self.mean, self.std), label


def _samples_per_s(dataset, keys: list, warmup: int, batch_size: int) -> float:
    """Items fetched and collated into batches, as a loader without workers would, per second."""

    def run(chunk: list) -> None:
        for start in range(0, len(chunk), batch_size):
            default_collate([dataset[key] for key in chunk[start : start + batch_size]])

    run(keys[:warmup])
    start = time.perf_counter()
    run(keys[warmup:])
    return (len(keys) - warmup) / (time.perf_counter() - start)


def _file_data(data_cfg: DictConfig, tmp: Path, count: int) -> tuple[DictConfig, str]:
    """The configured data set when it is file-based; else photo-like JPEGs written into `tmp`."""
    name = value(data_cfg.name)
    if name in FILE_BASED:
        return data_cfg, f"data={name}"
    folder = tmp / "images"
    write_photo_like_jpegs(folder, count)
    generated = OmegaConf.merge(
        data_cfg, {"name": "folder", "root": str(folder), "cache_dir": str(tmp / "cache"), "cache": True}
    )
    return generated, f"{count} generated {PHOTO_SIZE[0]}x{PHOTO_SIZE[1]} JPEGs (quality 90), data={name} has no files"


def write_photo_like_jpegs(folder: Path, count: int, seed: int = 0, classes: int = 2) -> None:
    """`count` smooth, photo-like 500x375 JPEGs (quality 90, about 61 kB: a tf_flowers photo's average):
    blurred colour fields with some fine texture and sensor noise, in `classes` class folders."""
    rng = np.random.default_rng(seed)
    width, height = PHOTO_SIZE
    for i in range(count):
        coarse = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize((width, height), Image.BICUBIC)
        detail = Image.fromarray(rng.integers(0, 256, (96, 128, 3), dtype=np.uint8)).resize(
            (width, height), Image.BICUBIC
        )
        pixels = (
            0.7 * np.asarray(coarse, np.float32)
            + 0.3 * np.asarray(detail, np.float32)
            + rng.normal(0, 4, (height, width, 3))
        )
        path = folder / f"class_{i % classes}" / f"photo_{i:05d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path, quality=90)
