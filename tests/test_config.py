"""Every config composes; the command line's mistakes get one clear line; task=summary."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from rethink.hydra_app import CONF_DIR, compose_config

ROOT = Path(__file__).resolve().parent.parent


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def run(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "run.py"), *args], cwd=cwd, capture_output=True, text=True, timeout=300
    )


@pytest.mark.parametrize("group", ["model", "data", "optimizer", "scheduler", "trainer"])
def test_every_option_of_every_group_composes(group):
    for option in options(group):
        cfg = compose_config([f"{group}={option}"] + (["data.root=/tmp/x"] if option == "folder" else []))
        assert cfg[group] is not None


@pytest.mark.slow
def test_every_stage_layout_composes_and_builds():
    import torch

    from rethink.models import build_model

    for layout in options("stages"):
        model = "v2_" + layout.split("_")[1] if layout.startswith("v2_") else "b0"
        cfg = compose_config([f"model={model}", f"stages={layout}"])
        with torch.device("meta"):
            model = build_model(cfg.model, 10)
        assert len(model.stages) == len(cfg.model.stages), layout
        built = [type(block).__name__ for stage in model.stages for block in stage]
        wanted = [
            {"mbconv": "MBConv", "fused": "FusedMBConv"}[s.block] for s in model.spec.stages for _ in range(s.repeats)
        ]
        assert built == wanted and {s.block.value for s in cfg.model.stages} == {s.block for s in model.spec.stages}, (
            layout
        )


def test_every_experiment_composes():
    for experiment in options("experiment"):
        cfg = compose_config([f"experiment={experiment}"])
        assert cfg.model.stages


def test_model_picks_its_own_layout():
    assert len(compose_config(["model=v2_l"]).model.stages) == 7
    assert len(compose_config(["model=v2_s"]).model.stages) == 6
    b3 = compose_config(["model=b3"]).model
    assert b3.width == 1.2 and [s.out for s in b3.stages] == [16, 24, 40, 80, 112, 192, 320]


def test_compose_inside_a_running_app_leaves_it_untouched():
    from hydra.core.global_hydra import GlobalHydra

    compose_config(["model=b1"])
    assert not GlobalHydra.instance().is_initialized()


@pytest.mark.slow
def test_summary_task_writes_summary_json(tmp_path):
    result = run("task=summary", "model=v2_l", "model.stages.3.block=fused", f"hydra.run.dir={tmp_path}")
    assert result.returncode == 0, result.stderr
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["params"] == 128_657_024 and summary["num_classes"] == 1000
    assert [row["stage"] for row in summary["stages"]][:2] == ["stem", 0]
    assert summary["stages"][4]["block"] == "fused"  # stage index 3
    assert "GMACs" in result.stdout and "128,657,024" in result.stdout
    run("task=summary", "model=b0", f"hydra.run.dir={tmp_path / 'b0'}")
    assert json.loads((tmp_path / "b0" / "summary.json").read_text())["gmacs"] == pytest.approx(0.39, abs=0.005)


@pytest.mark.parametrize(
    "args, words",
    [
        (["model=b9"], ["model=b9", "v2_s"]),
        (["model.stages.1.block=fusd"], ["model.stages.1.block", "mbconv", "fused"]),
        (["model=v2_s", "model.stages.9.block=fused"], ["stage 9", "0-5"]),
        (["trainer.epochs=many"], ["trainer.epochs", "Integer"]),
        (["stages=nosuch"], ["stages=nosuch", "v2_l_shallow_fused"]),
        (["model.nosuch=1"], ["model.nosuch", "allowed keys"]),
        (["model.stages.0.stride=3"], ["model.stages.0.stride", "1 or 2"]),
    ],
)
@pytest.mark.slow
def test_bad_input_is_one_clear_line(tmp_path, args, words):
    result = run("task=summary", f"hydra.run.dir={tmp_path}", *args)
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert "Traceback" not in output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    for word in words:
        assert word in lines[0]


@pytest.mark.parametrize(
    "args, words",
    [
        (["trainer.limit_train_batches=0"], "trainer.limit_train_batches=0: must be null or at least 1"),
        (["optimizer.lr=-1"], "optimizer.lr=-1.0: must be positive"),
        (["data.batch_size=0"], "data.batch_size=0: must be at least 1"),
        (["trainer.ema_decay=1.5"], "trainer.ema_decay=1.5: must be in [0, 1)"),
        (["data.split=[0.5"], "data.split=[0.5: no viable alternative"),
        (["model.stages.x.block=fused"], "model.stages.x.block=fused: Index 'x'"),
        (["eval.split=train"], "eval.split=train: Invalid value 'train', expected one of [val, test]"),
    ],
)
def test_out_of_range_values_are_one_clear_line(tmp_path, args, words):
    result = run("task=summary", f"hydra.run.dir={tmp_path}", *args)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert words in result.stderr


@pytest.mark.slow
def test_a_wrong_resume_path_creates_nothing(tmp_path):
    result = run(f"resume={tmp_path / 'nope'}")
    assert result.returncode != 0 and "no checkpoints/last.pt" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "nope").exists()


@pytest.mark.slow
def test_help_names_every_task_and_the_keys_most_runs_touch_without_dumping_the_config():
    out = run("--help")
    assert out.returncode == 0, out.stderr[-2000:]
    for task in ("train", "eval", "predict", "export", "summary", "benchmark", "compare"):
        assert task in out.stdout.split("== Groups")[0]
    for key in ("model.stages.N.block", "seed=", "trainer.epochs", "data.batch_size", "resume="):
        assert key in out.stdout
    assert "== Config ==" not in out.stdout and len(out.stdout.splitlines()) < 60
