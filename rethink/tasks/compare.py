"""task=compare: runs grouped across seeds, confidence intervals, a verdict, plots (being built)."""

from pathlib import Path

from omegaconf import DictConfig

from ..errors import UserError


def compare(cfg: DictConfig, run_dir: Path) -> dict:
    raise UserError("task=compare is not built yet")
