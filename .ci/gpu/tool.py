"""The GPU check's helpers (.ci/gpu/check calls them; run from the project root with the project importable).

    python .ci/gpu/tool.py settings CUDNN            the one line: torch, the GPU, the capture mode, the cuDNN setting
    python .ci/gpu/tool.py photos DIR COUNT          COUNT photo-like 500x375 JPEGs in 5 class folders (made once)
    python .ci/gpu/tool.py figures PART RUNS RESULTS  the part's figures against its targets, from its runs' files;
                                                     keeps their small files (metrics, benchmark, run.log) in RESULTS

Targets (issue 12): CUDA graphs at batch 16 at least 3x eager; torch.compile at batch 256 at least 1.3x
torchvision's best eager, at no more peak memory than ours eager; the first epoch (with the images' decode) at
most 2x a steady one; training from images on the GPU at batch 128 within 10% of the model-only rate.
"""

import json
import os
import re
import shutil
import statistics
import sys
from multiprocessing import Pool
from pathlib import Path


def settings(cudnn: str) -> None:
    import torch

    from rethink.train.cuda_graphs import capture_route

    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU (a dry run)"
    print(
        f"torch {torch.__version__} on {gpu}; CUDA graphs capture {capture_route()}; "
        f"cuDNN benchmark {'on' if cudnn == 'true' else 'off'} (trainer.cudnn_benchmark={cudnn} in every run and benchmark)"
    )


def photos(folder: str, count: str) -> None:
    """Made in a folder of their own, then moved in place: a part stopped halfway leaves no partial set."""
    root, n = Path(folder), int(count)
    if root.is_dir():
        return
    tmp = root.with_name(root.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    procs = max(1, min(16, n // 20))
    with Pool(procs) as pool:
        pool.starmap(_photo_part, [(tmp, k, n // procs) for k in range(procs)])
    for part in list(tmp.glob("part*")):
        for f in part.glob("*/*.jpg"):  # part<k>/<class>/<file> -> <class>/<k>_<file>
            dest = tmp / f.parent.name / f"{part.name}_{f.name}"
            dest.parent.mkdir(parents=True, exist_ok=True)
            f.rename(dest)
        shutil.rmtree(part)
    tmp.rename(root)
    print(f"{sum(1 for _ in root.rglob('*.jpg'))} photo-like JPEGs in {root}")


def _photo_part(root: Path, k: int, count: int) -> None:
    from rethink.tasks.benchmark import write_photo_like_jpegs

    write_photo_like_jpegs(root / f"part{k}", count, seed=k, classes=5)


# --- what each part's runs left ------------------------------------------------------------------------------


def bench(runs: Path, name: str, results: Path) -> dict:
    """The training part of a benchmark run's benchmark.json (kept in RESULTS as NAME.json)."""
    path = runs / name / "benchmark.json"
    if not path.is_file():
        raise Missing(f"{name}: no benchmark.json (see {runs / name}.out)")
    shutil.copy(path, results / f"{name}.json")
    return json.loads(path.read_text())["training"]


def training(runs: Path, name: str, results: Path) -> dict:
    """A training run's figures: its metrics, its epochs' seconds and rates, what run.log says of graphs and the
    GPU store (kept in RESULTS as NAME.json and NAME.log)."""
    from rethink.train.checkpoint import load_checkpoint

    run = runs / name
    if not (run / "metrics.json").is_file():
        raise Missing(f"{name}: the run did not finish (see {runs / name}.out)")
    shutil.copy(run / "metrics.json", results / f"{name}.json")
    shutil.copy(run / "run.log", results / f"{name}.log")
    metrics = json.loads((run / "metrics.json").read_text())
    history = load_checkpoint(run / "checkpoints" / "last.pt")["history"]
    log = (run / "run.log").read_text()
    decode = re.search(r"decoded and stored in ([\d.]+) s", log)
    captures = re.findall(r"CUDA graphs: captured .* \((.*)\)$", log, flags=re.M)
    return dict(
        metrics=metrics,
        epoch_s=[r["epoch_s"] for r in history],
        img_s=[r["train_img_s"] for r in history],
        decode_s=float(decode[1]) if decode else 0.0,
        captures=sorted(set(captures)),
        fallbacks=re.findall(
            r"CUDA graphs: capturing the training step failed.*$|data.on_gpu: the training images do not fit.*$",
            log,
            flags=re.M,
        ),
    )


class Missing(Exception):
    pass


def steady(values: list) -> float:
    """An epoch's figure once warm: the median over the epochs after the first."""
    return statistics.median(values[1:]) if len(values) > 1 else values[0]


def verdict(value: float, target: float, at_least: bool = True) -> str:
    met = value >= target if at_least else value <= target
    return f"{value:.2f}x, target {'>=' if at_least else '<='} {target:g}x: {'met' if met else 'MISSED'}"


def fast(run: dict) -> str:
    m = run["metrics"]
    on = [k for k in ("compile", "cuda_graphs", "cudnn_benchmark", "data_on_gpu") if m.get(k)]
    captured = f"; {', '.join(run['captures'])}" if run["captures"] else ""
    fell = f"; FELL BACK: {run['fallbacks'][0][:120]}" if run["fallbacks"] else ""
    return f"fast paths on: {', '.join(on) or 'none'}{captured}{fell}"


def figures(part: str, runs: Path, results: Path) -> list[str]:
    if part == "tests":
        out = (runs / "pytest.out").read_text()
        summary = [line for line in out.splitlines() if re.search(r"\d+ (passed|failed|skipped|error)", line)]
        failed = [line for line in out.splitlines() if line.startswith(("FAILED", "ERROR"))]
        return (summary[-1:] or ["pytest printed no summary"]) + failed[:8]
    if part == "graphs":
        r = bench(runs, "graphs16", results)["runs"]
        graphs, eager = r["ours"], r["ours+cuda_graphs:false"]
        return [
            f"B0 {bench_shape(runs, 'graphs16', results)}: ours {graphs['img_s']:.0f} img/s (CUDA graphs "
            f"{'on' if graphs['settings']['cuda_graphs'] else 'off'}), without graphs {eager['img_s']:.0f} img/s",
            f"graphs / eager: {verdict(graphs['img_s'] / eager['img_s'], 3)}",
        ]
    if part == "compile":
        r = bench(runs, "compile256", results)["runs"]
        compiled, ours = r["ours+compile:true"], r["ours"]
        references = {k: v for k, v in r.items() if k.startswith("torchvision") and "img_s" in v}
        best = max(references, key=lambda k: references[k]["img_s"]) if references else None
        lines = [
            f"B0 {bench_shape(runs, 'compile256', results)}: compiled {compiled['img_s']:.0f} img/s (first step "
            f"{compiled['first_step_s']:.0f} s), ours eager {ours['img_s']:.0f}"
            + (f", best torchvision eager ({best}) {references[best]['img_s']:.0f}" if best else "")
        ]
        if best:
            lines.append(
                f"compiled / best torchvision eager: {verdict(compiled['img_s'] / references[best]['img_s'], 1.3)}"
            )
        if compiled.get("peak_memory_mb") and ours.get("peak_memory_mb"):
            lines.append(
                f"peak memory compiled / ours eager: {verdict(compiled['peak_memory_mb'] / ours['peak_memory_mb'], 1.0, at_least=False)}"
                f" ({compiled['peak_memory_mb']:.0f} / {ours['peak_memory_mb']:.0f} MiB)"
            )
        return lines
    if part == "recipe":
        cold, plain = training(runs, "b16-cold", results), training(runs, "b16-plain", results)
        first = cold["decode_s"] + cold["epoch_s"][0]
        return [
            f"cold cache, auto: decode {cold['decode_s']:.1f} s + epoch 1 {cold['epoch_s'][0]:.1f} s, steady epoch "
            f"{steady(cold['epoch_s']):.1f} s ({steady(cold['img_s']):.0f} img/s); {fast(cold)}",
            f"first epoch with the decode / steady: {verdict(first / steady(cold['epoch_s']), 2, at_least=False)}",
            f"all fast paths off: steady epoch {steady(plain['epoch_s']):.1f} s ({steady(plain['img_s']):.0f} img/s); "
            f"auto / off: {steady(cold['img_s']) / steady(plain['img_s']):.2f}x",
        ]
    if part == "b128":
        model = bench(runs, "model128", results)["runs"]["ours"]
        gpu, cpu = training(runs, "b128-gpu-data", results), training(runs, "b128-cpu-data", results)
        return [
            f"model only {model['img_s']:.0f} img/s; training, images on the GPU {steady(gpu['img_s']):.0f} img/s ({fast(gpu)}), "
            f"from the CPU loader {steady(cpu['img_s']):.0f} img/s",
            f"images on the GPU / model only: {verdict(steady(gpu['img_s']) / model['img_s'], 0.9)}",
        ]
    if part == "graphs-cpu-loader":
        lines = []
        for name in ("cpu-loader", "randaugment"):
            run = training(runs, name, results)
            lines.append(
                f"{name}: {run['metrics']['epochs']} epochs, steady {steady(run['img_s']):.0f} img/s; {fast(run)}"
            )
        return lines
    if part == "decode":
        gpu, cpu = training(runs, "gpu-decode", results), training(runs, "cpu-decode", results)
        return [
            f"from a pack, uncached: decoded on the GPU {steady(gpu['img_s']):.0f} img/s, by the CPU loader "
            f"{steady(cpu['img_s']):.0f} img/s ({os.cpu_count()} CPUs)",
            f"GPU decode / CPU loader: {steady(gpu['img_s']) / steady(cpu['img_s']):.2f}x",
        ]
    raise SystemExit(f"unknown part {part}")


def bench_shape(runs: Path, name: str, results: Path) -> str:
    t = bench(runs, name, results)
    return f"{t['image_size']} px, batch {t['batch_size']}, {t['device_name']}"


def main(argv: list[str]) -> int:
    command, *args = argv
    if command == "settings":
        settings(*args)
    elif command == "photos":
        photos(*args)
    elif command == "figures":
        part, runs, results = args[0], Path(args[1]), Path(args[2])
        try:
            lines = figures(part, runs, results)
        except Missing as e:
            print(f"  {e}")
            return 1
        print("\n".join(f"  {line}" for line in lines))
        (results / "figures.txt").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
