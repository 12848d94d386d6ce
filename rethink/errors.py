"""User mistakes and how they are reported: one line that names what was wrong and what is allowed."""

import dataclasses
import os
import re
import sys
from contextlib import contextmanager
from typing import Iterator, Sequence

from hydra.errors import CompactHydraException, HydraException, MissingConfigException, OverrideParseException
from omegaconf.errors import OmegaConfBaseException


class UserError(CompactHydraException):
    """A mistake in what the user asked for. It ends a single run with its message on one line and
    exit status 1; in a sweep it fails that job only and Hydra runs the others."""


@contextmanager
def one_line_errors(argv: Sequence[str]) -> Iterator[None]:
    """Around `@hydra.main`: config mistakes (unknown option, key, type or value) become one line on
    stderr and exit status 1. `HYDRA_FULL_ERROR=1` keeps Hydra's full report for debugging."""
    if os.environ.get("HYDRA_FULL_ERROR") == "1":
        yield
        return
    os.environ["HYDRA_FULL_ERROR"] = "1"  # makes Hydra raise instead of printing its own report
    try:
        yield
    except (HydraException, OmegaConfBaseException) as e:
        print(f"error: {explain(e, argv)}", file=sys.stderr)
        sys.exit(1)
    except TypeError as e:  # OmegaConf raises some override mistakes (model.stages.x.block=...) as TypeError
        if not _raised_in(e, "omegaconf"):
            raise
        print(f"error: {_override_for(e, argv)}{e}", file=sys.stderr)
        sys.exit(1)


def explain(exc: BaseException, argv: Sequence[str] = ()) -> str:
    user_error = _find(exc, UserError)
    if user_error is not None:  # raised by a resolver while the config was resolved
        return str(user_error)
    if isinstance(exc, OverrideParseException):
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
        return f"{where}: there is no stage {stage[1]}; {_stage_range(argv, override)}"
    message = _first_line(str(cause.msg))
    if re.match(r"Key '.*' not in '", message) and dataclasses.is_dataclass(cause.object_type):
        keys = ", ".join(f.name for f in dataclasses.fields(cause.object_type))
        message += f"; allowed keys: {keys}"
    return f"{where}: {message}" if where else message


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


def _stage_range(argv: Sequence[str], failing: str) -> str:
    """'stages are numbered 0-5 (0-based)' for the layout the other overrides select."""
    from .config import compose_config

    others = [a for a in argv if a != failing and not a.startswith(("-", "hydra.", "hydra/"))]
    try:
        count = len(compose_config(others).model.stages)
    except Exception:
        return "stage indices are 0-based; `task=summary` lists the stages of a model"
    return f"this layout's stages are numbered 0-{count - 1} (0-based, after the stem)"


def _first_line(text: str) -> str:
    return next((line.strip() for line in text.splitlines() if line.strip()), text)
