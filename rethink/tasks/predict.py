"""task=predict ckpt=PATH inputs=PATH: top-k classes for every image in a file, a folder (recursive)
or a glob, with the checkpoint's class names. Each image is preprocessed exactly as the run's val/test
splits were (`rethink.data.eval_images`: the same decode, the same eval transform), so the test
accuracy a run reports is that of the predictions made here."""

import csv
import glob
import logging
import math
from pathlib import Path

import torch
from omegaconf import DictConfig

from ..data import eval_images
from ..errors import UserError
from ..train.checkpoint import load_checkpoint
from .restore import restore

log = logging.getLogger("rethink")


def predict(cfg: DictConfig, run_dir: Path) -> list[dict]:
    if not cfg.ckpt or not cfg.inputs:
        raise UserError("task=predict needs ckpt=PATH (a checkpoint) and inputs=PATH (an image, a folder or a glob)")
    state = load_checkpoint(cfg.ckpt)
    restored = restore(state, cfg, use_ema=cfg.eval.ema)
    classes = list(state["classes"])
    topk = min(cfg.predict.topk, len(classes))
    files = find_inputs(str(cfg.inputs))
    preprocessed = eval_images(files, restored.config.model, restored.config.data)

    rows, skipped, shown = [], [], []
    for start in range(0, len(files), cfg.predict.batch_size):
        batch, paths = [], []
        for index in range(start, min(start + cfg.predict.batch_size, len(files))):
            try:
                batch.append(preprocessed[index][0])
                paths.append(files[index])
            except UserError:
                skipped.append(str(files[index]))
        if not batch:
            continue
        images = torch.stack(batch)
        with torch.no_grad(), restored.precision.autocast():
            probs = restored.model(restored.inputs(images)).float().softmax(1).cpu()
        top_p, top_i = probs.topk(topk, dim=1)
        for path, image, p, i in zip(paths, images, top_p, top_i):
            rows.append({"path": str(path), "classes": [classes[j] for j in i.tolist()], "probs": p.tolist()})
            if cfg.predict.grid and len(shown) < 64:
                shown.append(image)
    if skipped:
        log.warning(f"skipped {len(skipped)} input file(s) that are not readable images: {', '.join(skipped)}")
    if not rows:
        raise UserError(f"inputs={cfg.inputs}: none of the {len(files)} matching files is a readable image")

    run_dir.mkdir(parents=True, exist_ok=True)
    write_predictions(run_dir / "predictions.csv", rows, topk)
    for row in rows:
        tops = "  ".join(f"{c} {p:.3f}" for c, p in zip(row["classes"], row["probs"]))
        print(f"{row['path']}: {tops}")
    if cfg.predict.grid:
        save_grid(run_dir / "predictions.png", shown, rows[: len(shown)])
    log.info(f"{len(rows)} predictions in {run_dir / 'predictions.csv'}")
    return rows


def find_inputs(spec: str) -> list[Path]:
    """A file, every file under a folder (recursively), or what a glob matches; sorted."""
    path = Path(spec).expanduser()
    if path.is_file():
        return [path]
    if path.is_dir():
        files = [p for p in sorted(path.rglob("*")) if p.is_file() and not p.name.startswith(".")]
    else:
        files = [Path(p) for p in sorted(glob.glob(str(path), recursive=True)) if Path(p).is_file()]
    if not files:
        raise UserError(f"inputs={spec}: matches no file; pass an image, a folder or a glob such as 'photos/*.jpg'")
    return files


def write_predictions(path: Path, rows: list[dict], topk: int) -> None:
    """Columns: path, top1_class, top1_prob, ..., top{k}_class, top{k}_prob."""
    header = ["path"] + [f"top{k}_{what}" for k in range(1, topk + 1) for what in ("class", "prob")]
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        for row in rows:
            writer.writerow(
                [row["path"]] + [cell for c, p in zip(row["classes"], row["probs"]) for cell in (c, f"{p:.6f}")]
            )


def save_grid(path: Path, images: list[torch.Tensor], rows: list[dict]) -> None:
    """The images as the model saw them (after resize and crop), titled with top-1 class and probability."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(8, len(images))
    lines = math.ceil(len(images) / cols)
    fig, axes = plt.subplots(lines, cols, figsize=(2.2 * cols, 2.4 * lines), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, image, row in zip(axes.flat, images, rows):
        ax.imshow(image.permute(1, 2, 0).numpy())
        ax.set_title(f"{row['classes'][0]} {row['probs'][0]:.2f}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
