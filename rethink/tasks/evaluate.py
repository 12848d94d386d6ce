"""task=eval ckpt=PATH: a checkpoint's accuracy on its test split (or `eval.split`), with per-class
scores and the confusion matrix, rebuilt from the checkpoint alone."""

import logging
from pathlib import Path

import matplotlib.pyplot as plt
from omegaconf import DictConfig

from ..atomic import atomic_write_json
from ..data import build_data, make_loader
from ..errors import UserError
from ..train.checkpoint import load_checkpoint
from ..train.loop import evaluate as run_evaluation
from ..train.metrics import confusion_figure, per_class_scores
from .restore import restore

log = logging.getLogger("rethink")


def evaluate(cfg: DictConfig, run_dir: Path) -> dict:
    if not cfg.ckpt:
        raise UserError("task=eval needs ckpt=PATH, a checkpoint such as <run dir>/checkpoints/best.pt")
    state = load_checkpoint(cfg.ckpt)
    restored = restore(state, cfg, use_ema=cfg.eval.ema)
    run_cfg = restored.config
    classes = list(state["classes"])
    data = build_data(run_cfg.data, run_cfg.model, manifest=_run_manifest(cfg.ckpt, restored.overridden))
    if list(data.classes) != classes:
        raise UserError(
            f"data: its classes {data.classes} are not the checkpoint's {classes}; evaluate on data with the same class folders"
        )
    split = cfg.eval.split.value
    loader = make_loader(
        getattr(data, split),
        run_cfg.data,
        train=False,
        seed=run_cfg.seed,
        pin_memory=restored.inputs.device.type == "cuda",
    )
    result = run_evaluation(restored.model, loader, restored.inputs, restored.precision, len(classes))
    scores = per_class_scores(result.confusion, classes)
    used_ema = bool(cfg.eval.ema and state.get("ema"))
    report = {
        f"{split}_acc": result.acc,
        f"{split}_loss": result.loss,
        "split": split,
        "images": result.images,
        "per_class": scores,
        "confusion_matrix": result.confusion.tolist(),
        "classes": classes,
        "checkpoint": str(Path(str(cfg.ckpt)).expanduser().resolve()),
        "checkpoint_epoch": state.get("epoch"),
        "weights": "ema" if used_ema else "model",
        "model": run_cfg.model.name,
        "data": run_cfg.data.name.value,
    }
    atomic_write_json(run_dir / "eval.json", report)
    figure = confusion_figure(result.confusion, classes, f"{split} split, {result.images} images, acc {result.acc:.4f}")
    figure.savefig(run_dir / "confusion_matrix.png", dpi=120)
    plt.close(figure)
    print(format_report(report))
    log.info(f"wrote {run_dir / 'eval.json'} and {run_dir / 'confusion_matrix.png'}")
    return report


def _run_manifest(ckpt, overridden: list[str]) -> Path | None:
    """The training run's own splits.csv (beside its checkpoints/), unless the command line chose
    other data: then the split is that data's own."""
    path = Path(str(ckpt)).expanduser().resolve()
    manifest = (path if path.is_dir() else path.parent.parent) / "splits.csv"
    other_data = any(k == "data" or k.startswith(("data.name", "data.split")) for k in overridden)
    return manifest if manifest.is_file() and not other_data else None


def format_report(report: dict) -> str:
    split = report["split"]
    width = max(8, *(len(r["cls"]) for r in report["per_class"]))
    lines = [
        f"{report['model']} on {report['data']} ({split} split, {report['images']} images, {report['weights']} weights)",
        f"{'class':<{width}}  precision  recall      f1  support",
    ]
    for r in report["per_class"]:
        lines.append(
            f"{r['cls']:<{width}}  {r['precision']:>9.4f}  {r['recall']:>6.4f}  {r['f1']:>6.4f}  {r['support']:>7}"
        )
    lines.append(f"{split} acc {report[f'{split}_acc']:.4f}   {split} loss {report[f'{split}_loss']:.4f}")
    return "\n".join(lines)
