"""task=summary: the model's stage table, parameters and multiply-adds, printed and in summary.json."""

import logging
from pathlib import Path

from omegaconf import DictConfig

from ..atomic import atomic_write_json
from ..models import build_model
from ..models.profile import count_gmacs, count_params, stage_table

log = logging.getLogger("rethink")


def summary(cfg: DictConfig, run_dir: Path) -> dict:
    num_classes = cfg.summary.num_classes
    model = build_model(cfg.model, num_classes)
    size = cfg.model.eval_size
    result = {
        "model": cfg.model.name,
        "num_classes": num_classes,
        "params": count_params(model),
        "gmacs": round(count_gmacs(model, size), 4),
        "image_size": size,
        "stages": stage_table(model),
    }
    print(format_summary(result))
    atomic_write_json(run_dir / "summary.json", result)
    log.info(f"wrote {run_dir / 'summary.json'}")
    return result


def format_summary(result: dict) -> str:
    head = f"{'stage':>5}  {'block':<10} {'expand':>6} {'kernel':>6} {'stride':>6} {'channels':>8} {'repeats':>7} {'SE':>5} {'params':>12}"
    lines = [f"{result['model']} ({result['num_classes']} classes)", head, "-" * len(head)]
    for r in result["stages"]:
        se = f"{r['se']:g}" if r["se"] else "-"
        lines.append(
            f"{r['stage']!s:>5}  {r['block']:<10} {r['expand']:>6g} {r['kernel']:>6} {r['stride']:>6} "
            f"{r['channels']:>8} {r['repeats']:>7} {se:>5} {r['params']:>12,}"
        )
    lines.append("-" * len(head))
    lines.append(
        f"params {result['params']:,}   GMACs {result['gmacs']:.2f} (multiply-adds at {result['image_size']} px)"
    )
    return "\n".join(lines)
