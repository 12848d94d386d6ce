"""One source for what a key means (rethink/keys.py, declared on config.py's fields): every key has a role, and
resume, compare's grouping, sweep job names and the benchmark's variants all follow it, key by key."""

from dataclasses import dataclass

import pytest

from rethink.config import BENCHMARK_VARIANTS, COMPARE_IGNORED, KEYS, RANGES, RESUMABLE, RethinkConfig
from rethink.keys import HOW, SEED, TASK, WHAT, KeyTable, KeyWithoutRole, key
from rethink.rundir import SWEPT_KEYS_ENV, job_dir
from rethink.tasks.compare import Run, group_runs, is_ignored
from rethink.tasks.train import _may_change

EVERY_KEY = sorted(KEYS.keys.items())


@pytest.fixture(autouse=True)
def outside_a_sweep(monkeypatch):
    monkeypatch.delenv(SWEPT_KEYS_ENV, raising=False)  # job names from the command line's keys


def test_every_key_of_the_schema_has_a_role():
    assert len(KEYS.keys) > 100 and KeyTable(RethinkConfig).keys == KEYS.keys


def test_a_key_without_a_role_fails_naming_it():
    @dataclass
    class Group:
        fine: int = key(WHAT, 1)
        forgotten: int = 2

    @dataclass
    class Schema:
        group: Group = None

    with pytest.raises(KeyWithoutRole, match=r"Group.forgotten \(group.forgotten\) has no role"):
        KeyTable(Schema)


def runs_differing_in(name: str) -> list[Run]:
    base = {"model.name": "b0", "seed": 0, name: "a"}
    other = {**base, name: "b"}
    return [Run(None, {}, flat, "done", {}, {}) for flat in (base, other)]


@pytest.mark.parametrize("name,declared", EVERY_KEY, ids=[name for name, _ in EVERY_KEY])
def test_each_key_is_resumed_grouped_and_named_as_its_role_says(name, declared):
    resumable = _may_change(name)
    pooled = len(group_runs(runs_differing_in(name), ["seed", *COMPARE_IGNORED])) == 1
    named = f"{name.removeprefix('model.')}=" in job_dir(0, "b0", [f"{name}=x"])
    if declared.role is HOW:
        assert resumable and pooled and not named
    elif declared.role is WHAT:
        assert resumable == declared.resumable and not pooled and named
    elif declared.role is SEED:  # compare repeats over it (seed is always ignored there), it is never resumed across
        assert not resumable and named and len(group_runs(runs_differing_in(name), ["seed"])) == 1
    else:
        assert declared.role is TASK and pooled and not resumable and named == declared.named
    assert (name.removeprefix("trainer.") in BENCHMARK_VARIANTS) == (declared.variant and name.startswith("trainer."))
    assert (name in RANGES) == (declared.allowed is not None)


def test_the_keys_the_lists_used_to_disagree_on():
    for how in ("trainer.cuda_graphs", "data.on_gpu", "data.cache", "trainer.amp", "data.root"):
        assert KEYS.keys[how].role is HOW and is_ignored(how, COMPARE_IGNORED) and _may_change(how)
    assert not _may_change("trainer.sync_bn") and not is_ignored("trainer.grad_accumulation", COMPARE_IGNORED)
    assert _may_change("trainer.epochs") and not is_ignored("trainer.epochs", COMPARE_IGNORED)


def test_a_stage_edit_and_a_group_choice_are_what_keys():
    assert not _may_change("model.stages.3.block") and not is_ignored("model.stages.3.block", COMPARE_IGNORED)
    assert (
        job_dir(3, "v2_s", ["model.stages.3.block=fused", "data=folder", "trainer.device=cpu"])
        == "3_v2_s_stages.3.block=fused_data=folder"
    )
    assert "eval" in COMPARE_IGNORED and "trainer.device" in RESUMABLE  # whole groups are written as the group
