"""Issue 15: every user mistake is one clear line, from the command line and from Python alike."""

import logging
import subprocess
import sys
from pathlib import Path
from urllib.error import URLError

import pytest
import torch

from rethink.errors import UserError
from rethink.models import create_model
from rethink.models.pretrained import fetch_torchvision_weights, load_pretrained
from rethink.train.checkpoint import load_checkpoint, save_checkpoint

ROOT = Path(__file__).resolve().parent.parent
B0_WEIGHTS = "EfficientNet_B0_Weights.IMAGENET1K_V1"


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "run.py"), *args], cwd=ROOT, capture_output=True, text=True, timeout=300
    )


def error_line(result: subprocess.CompletedProcess) -> str:
    """The one line run.py printed for a mistake, without its `error: ` prefix."""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 1 and len(lines) == 1 and lines[0].startswith("error: "), result.stdout + result.stderr
    return lines[0].removeprefix("error: ")


@pytest.mark.slow
def test_create_model_raises_the_command_lines_one_line(tmp_path):
    with pytest.raises(UserError) as raised:
        create_model("b9")
    assert str(raised.value) == error_line(run("task=summary", f"hydra.run.dir={tmp_path}", "model=b9"))
    assert str(raised.value).startswith("model=b9: no such option; available: b0, b1")


def test_create_model_names_the_stages_a_layout_has():
    with pytest.raises(UserError) as raised:
        create_model("v2_l", overrides=["model.stages.9.block=fused"])
    assert (
        str(raised.value)
        == "model.stages.9.block=fused: there is no stage 9 in model=v2_l; its stages are numbered 0-6 (0-based, after the stem)"
    )
    with pytest.raises(
        UserError,
        match=r"^model.stages.7.block=fused: there is no stage 7 in model=v2_l stages=v2_l_shallow_fused; .* 0-6 ",
    ):
        create_model("v2_l", overrides=["stages=v2_l_shallow_fused", "model.stages.7.block=fused"])


@pytest.mark.slow
def test_a_negative_stage_index_says_indices_are_0_based(tmp_path):
    expected = "model.stages.-1.block=fused: stage indices are 0-based (0-5 for this layout); -1 is not allowed"
    assert (
        error_line(run("task=summary", f"hydra.run.dir={tmp_path}", "model=v2_s", "model.stages.-1.block=fused"))
        == expected
    )
    with pytest.raises(UserError) as raised:
        create_model("v2_s", overrides=["model.stages.-1.block=fused"])
    assert str(raised.value) == expected


@pytest.mark.slow
@pytest.mark.parametrize("sweep", [False, True], ids=["run", "sweep"])
def test_a_missing_stage_names_the_model_that_lacks_it(tmp_path, sweep):
    """In a sweep the command line holds every job's model: the line must name the failing job's."""
    models = ["-m", "model=v2_s,b0"] if sweep else ["model=v2_s"]
    result = run(
        *models,
        "task=summary",
        f"hydra.run.dir={tmp_path}",
        f"hydra.sweep.dir={tmp_path}",
        "model.stages.6.block=fused",
    )
    assert (
        error_line(result)
        == "model.stages.6.block=fused: there is no stage 6 in model=v2_s; its stages are numbered 0-5 (0-based, after the stem)"
    )


def _png(path: Path) -> Path:
    from PIL import Image

    Image.new("RGB", (4, 4)).save(path, format="PNG")
    return path


def _truncated_checkpoint(path: Path) -> Path:
    save_checkpoint({"model": {"w": torch.zeros(1000)}}, path)
    path.write_bytes(path.read_bytes()[:-100])
    return path


@pytest.mark.parametrize(
    "make, reason",
    [
        (_png, "not a PyTorch file"),
        (lambda p: p.write_text("epoch 3: loss 0.1\n") and p, "not a PyTorch file"),
        (lambda p: p.write_bytes(b"") or p, "an empty file"),
        (_truncated_checkpoint, "a truncated or corrupt PyTorch file"),
    ],
    ids=["png", "text", "empty", "truncated"],
)
def test_a_file_that_is_no_checkpoint_is_one_clear_line(tmp_path, make, reason):
    path = make(tmp_path / "file.pt")
    with pytest.raises(UserError) as raised:
        load_checkpoint(path)
    message = str(raised.value)
    assert message.startswith(f"ckpt={path}: not a readable checkpoint ({reason}); ")
    assert "\n" not in message and "weights_only" not in message


@pytest.mark.slow
def test_ckpt_a_png_from_the_command_line(tmp_path):
    png = _png(tmp_path / "flower.png")
    message = error_line(run("task=eval", f"ckpt={png}", f"hydra.run.dir={tmp_path / 'run'}"))
    assert (
        message.startswith(f"ckpt={png}: not a readable checkpoint (not a PyTorch file)")
        and "weights_only" not in message
    )


def test_pretrained_a_png_is_one_clear_line(tmp_path):
    png = _png(tmp_path / "flower.png")
    with pytest.raises(
        UserError, match=r"^model.pretrained=.*flower.png: not a readable state_dict \(not a PyTorch file\)$"
    ):
        load_pretrained(torch.nn.Linear(1, 1), str(png), None)


@pytest.fixture
def empty_hub(tmp_path, monkeypatch):
    """Downloads allowed, and a torch hub cache without torchvision's weights."""
    monkeypatch.delenv("RETHINK_NO_DOWNLOAD", raising=False)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    return tmp_path / "hub" / "checkpoints"


def test_pretrained_offline_prints_nothing_before_its_error(empty_hub, monkeypatch, capsys):
    def no_network(*args, **kwargs):
        raise URLError("no network")

    monkeypatch.setattr(torch.hub, "urlopen", no_network)
    with pytest.raises(UserError) as raised:
        fetch_torchvision_weights(B0_WEIGHTS)
    assert capsys.readouterr() == ("", "")
    assert str(raised.value).startswith(
        f"model.pretrained=true: could not fetch {B0_WEIGHTS} (no network); offline, copy "
    )
    assert "\n" not in str(raised.value)


def test_pretrained_download_is_one_line_saying_what_and_where(empty_hub, monkeypatch, capsys, caplog):
    monkeypatch.setattr(
        torch.hub, "download_url_to_file", lambda url, dst, *args, **kwargs: torch.save({"w": torch.ones(2)}, dst)
    )
    with caplog.at_level(logging.INFO, logger="rethink"):
        state_dict, _, _ = fetch_torchvision_weights(B0_WEIGHTS)
    assert torch.equal(state_dict["w"], torch.ones(2))
    assert "Downloading" not in capsys.readouterr().out
    cached = empty_hub / "efficientnet_b0_rwightman-7f5810bc.pth"
    assert caplog.messages == [f"model.pretrained=true: downloaded {B0_WEIGHTS} to {cached}"]


def test_a_glob_with_brackets_is_told_how_to_quote_it_for_hydra(tmp_path):
    from rethink.hydra_app import compose_config

    with pytest.raises(UserError) as raised:
        compose_config(["task=predict", "inputs=/x/*_00[0-1].jpg"])
    assert "quote it for Hydra inside the shell's quotes: \"inputs='/x/*_00[0-1].jpg'\"" in str(raised.value)
    quoted = compose_config(
        ["task=predict", "inputs='/x/*_00[0-1].jpg'"]
    )  # what the shell passes on for "inputs='...'"
    assert quoted.inputs == "/x/*_00[0-1].jpg"
