"""Time to the first training step and peak memory against the number of files: the folder path and the packed
path (task=pack), first and later runs, one process and torchrun with 2 (gloo on the CPU), extrapolated to
ImageNet-1k's 1,281,167 training photos. The figures in README "Large data sets" come from this script.

    python .ci/data_scale.py [--sizes 1000 10000 50000] [--out data_scale.json]

Each run is `run.py` training b0 at 32 px on generated 96x72 JPEGs (100 classes), stopped (SIGTERM) as soon as
its log says when its first training step came; peak memory is the largest process's maximum resident set
(GNU time's %M). Everything is written under a temporary folder and removed at the end.
"""

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
IMAGENET_FILES = 1_281_167
FIRST_STEP = re.compile(r"first training step ([\d.]+) s after the process started")
TRAIN = [
    "model=b0",
    "model.train_size=32",
    "model.eval_size=32",
    "data.batch_size=8",
    "data.num_workers=0",
    "trainer.device=cpu",
    "trainer.epochs=1",
    "trainer.image_grid=false",
]


def make_folder(root: Path, files: int) -> None:
    classes = max(2, min(100, files // 20))
    rng = np.random.default_rng(files)
    for i in range(files):
        folder = root / f"class{i % classes:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        coarse = rng.integers(0, 256, (3, 4, 3), dtype=np.uint8)
        Image.fromarray(coarse).resize((96, 72), Image.BICUBIC).save(folder / f"{i:07d}.jpg", quality=90)


def first_step(args: list[str], processes: int, cache: Path, run_dir: Path) -> dict:
    """Start a training run, wait for its first step, stop it; (seconds to the first step, peak RSS in MB)."""
    command = [sys.executable, str(ROOT / "run.py")]
    if processes > 1:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}"]
        command += [str(ROOT / "run.py")]
    command = ["/usr/bin/time", "-f", "PEAK_KB %M", *command, *TRAIN, *args, f"hydra.run.dir={run_dir}"]
    env = {**os.environ, "RETHINK_CACHE": str(cache), "OMP_NUM_THREADS": "1"}
    started = time.monotonic()
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seconds, lines = None, []
    for line in process.stdout:
        lines.append(line)
        found = FIRST_STEP.search(line)
        if found and seconds is None:
            seconds = float(found.group(1))
            wall = time.monotonic() - started
            _stop(process)
    process.wait()
    peak = next((int(line.split()[1]) for line in lines if line.startswith("PEAK_KB")), None)
    if seconds is None:
        raise SystemExit(f"no first step in {' '.join(command)}:\n{''.join(lines[-30:])}")
    return {
        "first_step_s": round(seconds, 2),
        "wall_s": round(wall, 2),
        "peak_mb": round(peak / 1024) if peak else None,
    }


def _stop(process: subprocess.Popen) -> None:
    """SIGTERM to /usr/bin/time's child (run.py, or torchrun, which passes it on), so that time reports."""
    subprocess.run(["pkill", "-TERM", "-P", str(process.pid)], check=False)


def pack(folder: Path, out: Path, cache: Path, run_dir: Path) -> dict:
    env = {**os.environ, "RETHINK_CACHE": str(cache)}
    started = time.monotonic()
    subprocess.run(
        [sys.executable, str(ROOT / "run.py"), "task=pack", "data=folder", f"data.root={folder}", f"pack.out={out}",
         f"hydra.run.dir={run_dir}"],
        env=env, check=True, capture_output=True,
    )  # fmt: skip
    description = json.loads((out / "pack.json").read_text())
    return {"wall_s": round(time.monotonic() - started, 2), "ms_per_file": description["ms_per_file"]}


def measure(files: int, work: Path) -> dict:
    folder, packed = work / f"folder{files}", work / f"pack{files}"
    started = time.monotonic()
    make_folder(folder, files)
    result = {"files": files, "generate_s": round(time.monotonic() - started, 1)}
    runs = work / f"runs{files}"
    for processes in (1, 2):
        cache = work / f"cache{files}-{processes}"
        on_folder = ["data=folder", f"data.root={folder}"]
        result[f"folder_first_{processes}p"] = first_step(on_folder, processes, cache, runs / f"f1-{processes}")
        result[f"folder_later_{processes}p"] = first_step(on_folder, processes, cache, runs / f"f2-{processes}")
    result["pack"] = pack(folder, packed, work / "packcache", runs / "pack")
    for processes in (1, 2):
        cache = work / f"packcache{files}-{processes}"
        on_pack = ["data=folder", f"data.root={packed}"]
        result[f"packed_first_{processes}p"] = first_step(on_pack, processes, cache, runs / f"p1-{processes}")
        result[f"packed_later_{processes}p"] = first_step(on_pack, processes, cache, runs / f"p2-{processes}")
    print(json.dumps(result), flush=True)
    return result


def growth(results: list[dict], key: str, field: str = "first_step_s") -> dict:
    """Least squares of `field` (seconds, or MB for peak_mb) on the number of files: the cost per file (us or KB),
    the fixed cost, and the fit at ImageNet-1k's number of files."""
    x = np.array([r["files"] for r in results], dtype=float)
    y = np.array([r[key][field] for r in results], dtype=float)
    slope, intercept = np.polyfit(x, y, 1) if len(x) > 1 else (0.0, y[0])
    unit, per_file = ("kb", slope * 1024) if field == "peak_mb" else ("us", slope * 1e6)
    return {
        f"per_file_{unit}": round(per_file, 2),
        "fixed": round(intercept, 2),
        "imagenet": round(intercept + slope * IMAGENET_FILES, 1),
    }


def tiled_pack(source: Path, out: Path, files: int) -> None:
    """A pack of `files` entries made from `source`'s: its index repeated (each copy under other names and content
    hashes), pointing at its shards. What a run reads before its first step, at ImageNet's number of files."""
    index = dict(np.load(source / "index.npz"))
    copies = -(-files // len(index["names"]))
    tiled = {name: np.tile(column, copies)[:files] for name, column in index.items()}
    copy_of = np.repeat(np.arange(copies), len(index["names"]))[:files]
    tiled["names"] = np.array([b"c%04d/%s" % (int(c), n) for c, n in zip(copy_of, tiled["names"])])
    rng = np.random.default_rng(0)
    tiled["digests"] = np.array([d and rng.bytes(16).hex().encode() for d in tiled["digests"]], dtype="S32")
    out.mkdir(parents=True)
    (out / "shards").symlink_to(source / "shards")
    np.savez(out / "index.npz", **tiled)
    description = json.loads((source / "pack.json").read_text())
    description["unusable"] = {
        f"c{c:04d}/{name}": why for c in range(copies) for name, why in description["unusable"].items()
    }
    (out / "pack.json").write_text(json.dumps(description))


def imagenet_sized(largest: int, work: Path) -> dict:
    """The packed start-up at ImageNet-1k's 1,281,167 files, on a pack tiled from the largest one measured."""
    out = work / "pack-imagenet"
    tiled_pack(work / f"pack{largest}", out, IMAGENET_FILES)
    result = {"files": IMAGENET_FILES, "tiled_from": largest}
    for processes in (1, 2):
        on_pack = ["data=folder", f"data.root={out}"]
        cache = work / f"cache-imagenet-{processes}"
        result[f"packed_first_{processes}p"] = first_step(
            on_pack, processes, cache, work / f"runs-imagenet-{processes}"
        )
    print(json.dumps(result), flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000, 50000])
    parser.add_argument("--out", type=Path, default=Path("data_scale.json"))
    parser.add_argument("--imagenet", action="store_true", help="also a packed start at 1,281,167 files (tiled)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="rethink-data-scale-") as tmp:
        results = [measure(files, Path(tmp)) for files in args.sizes]
        imagenet = imagenet_sized(max(args.sizes), Path(tmp)) if args.imagenet else None
    keys = [k for k in results[0] if k.endswith("p")]
    summary = {
        "machine": f"{os.cpu_count()} CPUs",
        "date": time.strftime("%Y-%m-%d"),
        "results": results,
        "imagenet_sized_pack": imagenet,
        "growth_first_step": {k: growth(results, k) for k in keys},
        "growth_peak_mb": {k: growth(results, k, "peak_mb") for k in keys},
    }
    args.out.write_text(json.dumps(summary, indent=1) + "\n")
    print(json.dumps(summary["growth_first_step"], indent=1))


if __name__ == "__main__":
    main()
