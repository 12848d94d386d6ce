"""User mistakes and how they are reported: one line that names what was wrong and what is allowed."""

import dataclasses
import os
import re
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence

from hydra.errors import CompactHydraException, HydraException, MissingConfigException, OverrideParseException
from omegaconf.errors import OmegaConfBaseException


class UserError(CompactHydraException):
    """A mistake in what the user asked for. It ends a single run with its message on one line and
    exit status 1; in a sweep it fails that job only and Hydra runs the others."""


@contextmanager
def one_line_errors(argv: Sequence[str]) -> Iterator[None]:
    """Around `@hydra.main`: config mistakes (unknown option, key, type or value) and UserErrors become
    one line on stderr and exit status 1. `HYDRA_FULL_ERROR=1` keeps Hydra's full report for debugging."""
    if os.environ.get("HYDRA_FULL_ERROR") == "1":
        yield
        return
    os.environ["HYDRA_FULL_ERROR"] = "1"  # makes Hydra raise instead of printing its own report
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
    except TypeError as e:  # OmegaConf raises some override mistakes (model.stages.x.block=...) as TypeError
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
        return f"{exc.override}: {_first_line(exc.message)} (see https://hydra.cc/docs/advanced/override_grammar/basic)"
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


def why_unreadable(path: Path, exc: BaseException) -> str:
    """Why `torch.load(path, weights_only=True)` raised `exc`, in a few words. Never torch's own text:
    it runs to many lines and advises weights_only=False, which would let the file run code."""
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError as e:
        return e.strerror or type(e).__name__
    if not head:
        return "an empty file"
    if not head.startswith((b"PK\x03\x04", b"\x80")):  # torch.save writes a zip archive (a pickle before torch 1.6)
        return "not a PyTorch file"
    foreign = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))
    if foreign:
        return f"it holds a {foreign[1]} object; only tensors and plain data are loaded, as anything else could run code"
    return "a truncated or corrupt PyTorch file"


def _find(exc: BaseException, kind: type) -> BaseException | None:
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


def _composition(exc: BaseException) -> dict:
    """The local variables of the Hydra config composition that raised `exc` (`cfg`, `defaults_list`),
    or {}. Hydra's exception names only the override; the config it did not fit lives only there."""
    found, tb = {}, exc.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_name == "_load_configuration_impl":
            found = tb.tb_frame.f_locals
        tb = tb.tb_next
    return found


def _stage_count(overrides: Sequence[str]) -> int | None:
    """How many stages the layout that `overrides` select has; None when they do not compose (a sweep,
    another mistake). Per-stage edits are left out: they cannot change the count, and leaving them out
    keeps a mistake in one from bringing us back here."""
    from .config import compose_config

    layout_overrides = [o for o in overrides if not o.lstrip("+~").startswith(("-", "hydra.", "hydra/", "model.stages."))]
    try:
        return len(compose_config(layout_overrides).model.stages)
    except Exception:
        return None


def _first_line(text: str) -> str:
    return next((line.strip() for line in text.splitlines() if line.strip()), text)
