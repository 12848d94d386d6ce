"""Everything Hydra-facing: the schema and resolvers registered, configs composed outside a run, the running
app's own facts (its command line, choices, job number, run folder), sweeps expanded into jobs, and Hydra's and
OmegaConf's errors turned into one line. Nothing else in rethink imports Hydra (tasks/sweep.py's callback
subclasses Hydra's public Callback).

Checked against hydra-core 1.3.8 and omegaconf 2.3.1. It relies on these, each pinned by a test in
tests/test_hydra_app.py, so that a Hydra release that changes one fails there first:
  1. `hydra._internal.core_plugins.basic_sweeper.BasicSweeper.split_arguments`: a sweep's jobs, expanded exactly
     as the basic sweeper does (for job folder names, `--dry-run` and the count the sweep callback waits for).
  2. The locals `cfg` and `defaults_list` of the frame of `ConfigLoaderImpl._load_configuration_impl` in the
     traceback of a failed composition: the config an override did not fit (to explain a stage index).
  3. `GlobalHydra.instance().hydra`: the running app's Hydra, put back after composing inside it.
  4. `HYDRA_FULL_ERROR=1` makes `hydra.main` raise a job's or a composition's exception instead of printing it.
  5. Hydra resolves `hydra.run.dir`, `hydra.sweep.dir` and `hydra.output_subdir` through our resolvers before it
     writes anything, more than once (the resolvers remember their answer; rundir.py).
  6. Hydra skips `on_multirun_end` after a failed job (tasks/sweep.py counts the jobs itself).
  7. OmegaConf raises some override mistakes (`model.stages.x.block=...`) as a TypeError from its own code.
"""

import dataclasses
import os
import re
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

from hydra import compose, initialize_config_dir
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.config_store import ConfigStore
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException, MissingConfigException, OverrideParseException
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from . import rundir
from .config import RethinkConfig, changed_keys, value
from .errors import UserError

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


# Configs ------------------------------------------------------------------------------------------------


def register_configs() -> None:
    """Make the schema and the resolvers available to conf/config.yaml (run.py calls this first)."""
    ConfigStore.instance().store(name="rethink_schema", node=RethinkConfig)
    OmegaConf.register_new_resolver("rethink.value", value, replace=True)
    OmegaConf.register_new_resolver("rethink.run_dir", rundir.FOLDERS.run_dir, replace=True)
    OmegaConf.register_new_resolver("rethink.record_dir", rundir.FOLDERS.record_dir, replace=True)
    # cached: a sweep's jobs (copies of its config, in this process or another) all get the folder it claimed
    OmegaConf.register_new_resolver("rethink.claim", rundir.FOLDERS.claim, replace=True, use_cache=True)
    OmegaConf.register_new_resolver("rethink.job_dir", rundir.job_dir, replace=True)


def compose_config(overrides: Sequence[str] = (), with_hydra: bool = False) -> DictConfig:
    """The config `python run.py OVERRIDES...` would run with (with its `hydra` node only if asked), for
    notebooks, tests and tasks. Safe to call inside a running Hydra app: the app's global state is put back
    after (reliance 3). A mistake in `overrides` is a UserError with the one line `python run.py` would print."""
    if not (CONF_DIR / "config.yaml").is_file():
        raise FileNotFoundError(
            f"{CONF_DIR} holds no config.yaml; install rethink from its repository (pip install -e .)"
        )
    register_configs()
    global_hydra = GlobalHydra.instance()
    running = global_hydra.hydra
    global_hydra.clear()
    with user_errors(overrides):  # outside the try: explaining may compose again, after the state is put back
        try:
            with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
                return compose(config_name="config", overrides=list(overrides), return_hydra_config=with_hydra)
        finally:
            GlobalHydra.instance().clear()
            if running is not None:
                GlobalHydra.instance().initialize(running)


def override_keys(overrides: Sequence[str]) -> list[str]:
    """The config keys a command line's overrides set (`stages=...` sets model.stages)."""
    keys = []
    for override in OverridesParser.create().parse_overrides(list(overrides)):
        key = override.key_or_group
        if not key.startswith("hydra"):
            keys.append("model.stages" if key == "stages" else key)
    return keys


def is_sweep_argument(argument: str) -> bool:
    return OverridesParser.create().parse_overrides([argument])[0].is_sweep_override()


# The running app --------------------------------------------------------------------------------------


def in_app() -> bool:
    return HydraConfig.initialized()


def app_output_dir() -> Path:
    """The running app's run folder (a single run's or this sweep job's)."""
    return Path(HydraConfig.get().runtime.output_dir)


def app_is_sweep() -> bool:
    return in_app() and HydraConfig.get().mode == RunMode.MULTIRUN


def command_line_keys(cfg: DictConfig) -> list[str]:
    """The keys the command line set; called from Python (no Hydra app), the keys in which `cfg`
    differs from the default config."""
    if in_app():
        return override_keys(HydraConfig.get().overrides.task)
    return changed_keys(cfg, compose_config([]))


def hydra_choice(group: str) -> str:
    """Which option of a config group this run uses ('' outside a Hydra app)."""
    return str(HydraConfig.get().runtime.choices.get(group, "")) if in_app() else ""


def hydra_job() -> Optional[int]:
    """This run's job number in a sweep (None for a single run or outside a Hydra app)."""
    return int(HydraConfig.get().job.num) if app_is_sweep() else None


# Sweeps -----------------------------------------------------------------------------------------------


def sweep_jobs(arguments: Sequence[str], params: Optional[dict]) -> tuple[list[str], list[list[str]]]:
    """The keys a sweep varies and each job's overrides, as Hydra's basic sweeper makes them (reliance 1) from
    the config's `hydra.sweeper.params` and the command line (which wins for a key set in both)."""
    lines = [f"{k}={v}" for k, v in (params or {}).items()] + list(arguments)
    overrides = OverridesParser.create().parse_overrides(lines)
    jobs = BasicSweeper.split_arguments(overrides, None)[0]
    swept = [o.get_key_element() for o in overrides if o.is_sweep_override()]
    return list(dict.fromkeys(swept)), jobs


def sweep_of(config: DictConfig) -> tuple[list[str], list[list[str]]]:
    """A running sweep's swept keys and jobs, from its config (with its `hydra` node)."""
    arguments = OmegaConf.to_container(config.hydra.overrides.task)
    params = OmegaConf.to_container(config.hydra.sweeper.params) if config.hydra.sweeper.get("params") else None
    return sweep_jobs(arguments, params)


def planned_sweep(arguments: Sequence[str]) -> tuple[list[str], list[list[str]]]:
    """The swept keys and jobs that `python run.py -m ARGUMENTS` would run, without running it."""
    base = compose_config([a for a in arguments if not is_sweep_argument(a)], with_hydra=True)
    params = OmegaConf.to_container(base.hydra.sweeper.params) if base.hydra.sweeper.get("params") else None
    return sweep_jobs(arguments, params)


# Errors -----------------------------------------------------------------------------------------------


@contextmanager
def one_line_errors(argv: Sequence[str]) -> Iterator[None]:
    """Around `@hydra.main`: config mistakes (unknown option, key, type or value) and UserErrors become
    one line on stderr and exit status 1. `HYDRA_FULL_ERROR=1` keeps Hydra's full report for debugging."""
    if os.environ.get("HYDRA_FULL_ERROR") == "1":
        yield
        return
    os.environ["HYDRA_FULL_ERROR"] = "1"  # makes Hydra raise instead of printing its own report (reliance 4)
    try:
        with user_errors(argv):
            yield
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


@contextmanager
def user_errors(overrides: Sequence[str]) -> Iterator[None]:
    """Config mistakes raised inside become a UserError whose message is the line that
    `python run.py OVERRIDES...` prints for them."""
    try:
        yield
    except UserError:
        raise
    except (HydraException, OmegaConfBaseException) as e:
        raise UserError(explain(e, overrides)) from None
    except TypeError as e:  # reliance 7
        if not _raised_in(e, "omegaconf"):
            raise
        raise UserError(f"{_override_for(e, overrides)}{e}") from None


def explain(exc: BaseException, argv: Sequence[str] = ()) -> str:
    user_error = _find(exc, UserError)
    if user_error is not None:  # raised by a resolver while the config was resolved
        return str(user_error)
    if isinstance(exc, OverrideParseException):
        negative = re.match(r"[+~]*model\.stages\.(-\d+)[.=]", exc.override or "")
        if negative:
            count = _stage_count(argv)
            numbered = f" (0-{count - 1} for this layout)" if count else ""
            return f"{exc.override}: stage indices are 0-based{numbered}; {negative[1]} is not allowed"
        return f"{exc.override}: {_first_line(exc.message)}{_quoting_hint(exc.override)} (see https://hydra.cc/docs/advanced/override_grammar/basic)"
    if isinstance(exc, MissingConfigException) and exc.missing_cfg_file:
        group, _, choice = str(exc.missing_cfg_file).rpartition("/")
        if exc.options:
            return f"{group}={choice}: no such option; available: {', '.join(exc.options)}"
        return _first_line(str(exc))
    cause = exc.__cause__ if isinstance(exc.__cause__, OmegaConfBaseException) else None
    if isinstance(exc, OmegaConfBaseException):
        cause = exc
    if cause is None:
        return _first_line(str(exc))
    override = _override_in(str(exc))
    where = override or str(cause.full_key or "")
    stage = re.fullmatch(r"model\.stages\[(\d+)\]", str(cause.full_key or ""))
    if stage and "StageConfig" in str(cause.msg):
        return f"{where}: {_no_such_stage(stage[1], exc)}"
    message = _first_line(str(cause.msg))
    if re.match(r"Key '.*' not in '", message) and dataclasses.is_dataclass(cause.object_type):
        keys = ", ".join(f.name for f in dataclasses.fields(cause.object_type))
        message += f"; allowed keys: {keys}"
    return f"{where}: {message}" if where else message


def _quoting_hint(override: Optional[str]) -> str:
    """For a value that Hydra's grammar reads as more than a string (a glob's `[0-1]` is a list to it): how to pass
    it as one, quoted for Hydra inside the shell's quotes."""
    key, sep, text = (override or "").partition("=")
    if not sep or not text or text[0] in "'\"" or not re.search(r"[\[\]{}(),:=\s]", text) or "'" in text:
        return ""
    return f"; to pass it as it is, quote it for Hydra inside the shell's quotes: \"{key}='{text}'\""


def _find(exc: BaseException, kind: type) -> Optional[BaseException]:
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, kind):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def _raised_in(exc: BaseException, package: str) -> bool:
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and tb.tb_frame.f_globals.get("__name__", "").startswith(package + ".")


def _override_for(exc: BaseException, argv: Sequence[str]) -> str:
    """The command-line override an OmegaConf error is about ('' when it cannot tell)."""
    text = str(exc)
    for arg in argv:
        key = arg.split("=", 1)[0].lstrip("+~")
        if "=" in arg and any(part and part in text for part in key.split(".")):
            return f"{arg}: "
    return ""


def _override_in(message: str) -> str:
    m = re.search(r"(?:Error merging override |Could not override ')([^'\s]+)", message)
    return m[1] if m else ""


def _no_such_stage(index: str, exc: BaseException) -> str:
    """'there is no stage 9 in model=v2_s; its stages are numbered 0-5 ...', about the config whose
    composition raised `exc`: in a sweep, the failing job's (the command line holds every job's choices)."""
    composition = _composition(exc)
    cfg, defaults = composition.get("cfg"), composition.get("defaults_list")
    if cfg is None or defaults is None:
        return f"there is no stage {index}; stage indices are 0-based; `task=summary model=NAME` lists a model's stages"
    choices = defaults.overrides.known_choices
    layout = f"model={choices.get('model')}"
    if choices.get("stages") != choices.get("model"):
        layout += f" stages={choices.get('stages')}"
    return f"there is no stage {index} in {layout}; its stages are numbered 0-{len(cfg.model.stages) - 1} (0-based, after the stem)"


def _composition(exc: BaseException) -> dict[str, Any]:
    """The local variables of the Hydra config composition that raised `exc` (`cfg`, `defaults_list`),
    or {} (reliance 2). Hydra's exception names only the override; the config it did not fit lives only there."""
    found, tb = {}, exc.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_name == "_load_configuration_impl":
            found = tb.tb_frame.f_locals
        tb = tb.tb_next
    return found


def _stage_count(overrides: Sequence[str]) -> Optional[int]:
    """How many stages the layout that `overrides` select has; None when they do not compose (a sweep,
    another mistake). Per-stage edits are left out: they cannot change the count, and leaving them out
    keeps a mistake in one from bringing us back here."""
    layout_overrides = [
        o for o in overrides if not o.lstrip("+~").startswith(("-", "hydra.", "hydra/", "model.stages."))
    ]
    try:
        return len(compose_config(layout_overrides).model.stages)
    except Exception:
        return None


def _first_line(text: str) -> str:
    return next((line.strip() for line in text.splitlines() if line.strip()), text)
