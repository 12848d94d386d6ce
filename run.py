"""The one entry point: `python run.py [task=train|eval|predict|export|summary|benchmark] [overrides]`.

Hydra composes conf/ (typed by rethink/config.py) with the command line; `-m` sweeps.
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
        main()
