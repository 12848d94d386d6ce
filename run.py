"""The one entry point: `python run.py [task=train|eval|predict|export|summary|benchmark|compare] [overrides]`.

Hydra composes conf/ (typed by rethink/config.py) with the command line; `-m` sweeps, and
`-m ... --dry-run` lists a sweep's jobs without running them.
"""

import sys

import hydra
from omegaconf import DictConfig

from rethink.config import register_configs
from rethink.errors import one_line_errors
from rethink.tasks import run_task

register_configs()


@hydra.main(config_path="conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig):
    return run_task(cfg)


if __name__ == "__main__":
    with one_line_errors(sys.argv[1:]):
        if "--dry-run" in sys.argv:
            from rethink.tasks.sweep import list_jobs

            sys.exit(list_jobs([a for a in sys.argv[1:] if a not in ("--dry-run", "-m", "--multirun")]))
        main()
