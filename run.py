"""The one entry point: `python run.py [task=train|eval|predict|export|summary|benchmark|compare] [overrides]`.

Hydra composes conf/ (typed by rethink/config.py) with the command line; `-m` sweeps, and
`-m ... --dry-run` lists a sweep's jobs without running them.
"""

import signal
import sys

import hydra
from omegaconf import DictConfig

from rethink.hydra_app import one_line_errors, register_configs
from rethink.tasks import run_task
from rethink.train.runtime import exit_on_signal

register_configs()


@hydra.main(config_path="conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig):
    return run_task(cfg)


if __name__ == "__main__":
    for stop_signal in (signal.SIGINT, signal.SIGTERM):  # a run stopped by one saves first, then exits as here
        signal.signal(stop_signal, exit_on_signal)
    with one_line_errors(sys.argv[1:]):
        if "--dry-run" in sys.argv:
            from rethink.tasks.sweep import list_jobs

            sys.exit(list_jobs([a for a in sys.argv[1:] if a not in ("--dry-run", "-m", "--multirun")]))
        main()
