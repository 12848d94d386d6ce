"""What a config key means, declared once on its schema field (rethink/config.py), and every list derived from it.

Each leaf field of the schema carries a `Key` (`key(WHAT, 30, ...)` in place of `field(default=30)`):

    WHAT  what the run is: another value is another experiment. Compare never pools runs that differ in it, a
          resume may not change it, and a sweep's job folders are named by it.
    HOW   how the run computes: where (device, threads, workers, caches, file locations) and by which route
          (precision, compile, CUDA graphs, GPU-resident data, cuDNN's search, memory savers). Another value may
          change speed, memory and the rounding of floating-point sums, not the recipe. Compare pools runs that
          differ only in it, a resume may change it, and job folders are never named by it.
    SEED  the unit of repetition (`seed`): a what-key that compare repeats over instead of grouping by.
    TASK  a setting of the command or of another task (task, ckpt, inputs, resume, eval.*, compare.*, ...): no part of
          a training run. Compare ignores it; a resume does not apply it.

Flags: `resumable` (a what-key that a resume may still change: trainer.epochs continues a run for longer), `named`
(False: never in a job folder's name, e.g. `resume`), `variant` (task=benchmark may time it as a variant of the
training step) and `allowed` (a range the type cannot express: a predicate and its wording for the error).

This module imports nothing of the project: config.py builds the schema with `key`, and `KeyTable` reads it back.
"""

import dataclasses
import typing
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Callable, Iterator, NamedTuple, Optional


class Role(Enum):
    WHAT = "what"
    HOW = "how"
    SEED = "seed"
    TASK = "task"


WHAT, HOW, SEED, TASK = Role.WHAT, Role.HOW, Role.SEED, Role.TASK


class Allowed(NamedTuple):
    ok: Callable[[Any], bool]
    wording: str  # completes "must be ...": "at least 1"


@dataclass(frozen=True)
class Key:
    role: Role
    allowed: Optional[Allowed] = None
    resumable: bool = False
    named: bool = True
    variant: bool = False

    @property
    def may_change_on_resume(self) -> bool:
        return self.role is HOW or self.resumable

    @property
    def pooled_by_compare(self) -> bool:
        return self.role in (HOW, TASK)

    @property
    def in_job_names(self) -> bool:
        return self.role is not HOW and self.named


def key(
    role: Role,
    default: Any = dataclasses.MISSING,
    *,
    factory: Optional[Callable[[], Any]] = None,
    allowed: Optional[Allowed] = None,
    resumable: bool = False,
    named: bool = True,
    variant: bool = False,
) -> Any:
    """A schema field with its role: `epochs: int = key(WHAT, 30, resumable=True, allowed=AT_LEAST_1)`."""
    metadata = {"key": Key(role, allowed, resumable, named, variant)}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


class KeyWithoutRole(TypeError):
    pass


class KeyTable:
    """Every leaf key of a schema (dotted: `trainer.epochs`) with its `Key`, in the schema's order. A field whose
    type is a dataclass is a group (its own fields are the keys); any other field is a leaf and must have a role."""

    def __init__(self, schema: type):
        self.keys: dict[str, Key] = dict(_leaves(schema, ""))

    def role_of(self, name: str) -> Optional[Key]:
        """The Key of a leaf, or of the leaf above it (`model.stages.3.block` is `model.stages`'s); None when the
        name is no key of the schema (a group, or unknown)."""
        parts = name.split(".")
        for end in range(len(parts), 0, -1):
            found = self.keys.get(".".join(parts[:end]))
            if found is not None:
                return found
        return None

    def under(self, name: str) -> list[Key]:
        """The Keys of `name` itself or of every leaf under a group `name` (`data`)."""
        own = self.role_of(name)
        return [own] if own is not None else [k for leaf, k in self.keys.items() if leaf.startswith(name + ".")]

    def where(self, test: Callable[[Key], bool]) -> tuple[str, ...]:
        return tuple(leaf for leaf, k in self.keys.items() if test(k))

    def ranges(self) -> dict[str, Allowed]:
        return {leaf: k.allowed for leaf, k in self.keys.items() if k.allowed is not None}

    def collapsed(self, leaves: tuple[str, ...]) -> tuple[str, ...]:
        """`leaves` with every group whose leaves are all among them written as the group (`eval` for eval.split
        and eval.ema): for messages and for prefix matching."""
        chosen, shown = set(leaves), []
        for leaf in leaves:
            parts = leaf.split(".")
            name = leaf
            for end in range(1, len(parts)):
                group = ".".join(parts[:end])
                if all(other in chosen for other in self.keys if other.startswith(group + ".")):
                    name = group
                    break
            if name not in shown:
                shown.append(name)
        return tuple(shown)


def _leaves(schema: type, prefix: str) -> Iterator[tuple[str, Key]]:
    hints = typing.get_type_hints(schema)
    for f in dataclasses.fields(schema):
        name = prefix + f.name
        kind = hints[f.name]
        if dataclasses.is_dataclass(kind):
            yield from _leaves(kind, name + ".")
            continue
        declared = f.metadata.get("key")
        if not isinstance(declared, Key):
            raise KeyWithoutRole(
                f"{schema.__name__}.{f.name} ({name}) has no role: declare it with key(WHAT|HOW|SEED|TASK, default, ...) "
                "(rethink/keys.py says what each role means)"
            )
        yield name, declared
