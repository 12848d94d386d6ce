"""task=eval, predict and export from a checkpoint alone, and their bad inputs."""

import csv
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from rethink.errors import UserError
from rethink.hydra_app import compose_config
from rethink.tasks.evaluate import evaluate
from rethink.tasks.export import export
from rethink.tasks.predict import predict
from rethink.tasks.train import train

ROOT = Path(__file__).resolve().parent.parent
TINY = [
    "data=synthetic",
    "data.images_per_class=30",
    "data.image_size=40",
    "data.num_workers=0",
    "data.batch_size=8",
    "model.train_size=32",
    "model.eval_size=32",
    "trainer.device=cpu",
    "trainer.epochs=2",
    "trainer.limit_train_batches=3",
    "trainer.limit_val_batches=2",
]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("run")
    train(compose_config(TINY), run_dir)
    return run_dir


def task_cfg(*overrides: str):
    return compose_config([*TINY, *overrides])


def image_folder(root: Path, count: int = 5) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        Image.fromarray(rng.integers(0, 255, (48, 40, 3), dtype=np.uint8)).save(root / f"img_{i}.png")
    (root / "sub").mkdir(exist_ok=True)
    Image.fromarray(rng.integers(0, 255, (30, 30), dtype=np.uint8)).save(root / "sub" / "grey.jpg")
    (root / "notes.txt").write_text("not an image")
    return root


@pytest.mark.slow
def test_eval_matches_the_trainers_test_accuracy(trained, tmp_path):
    ckpt = trained / "checkpoints" / "best.pt"
    report = evaluate(task_cfg("task=eval", f"ckpt={ckpt}"), tmp_path)
    metrics = json.loads((trained / "metrics.json").read_text())
    assert report["test_acc"] == metrics["test_acc"]
    assert report["test_loss"] == pytest.approx(metrics["test_loss"])
    saved = json.loads((tmp_path / "eval.json").read_text())
    assert saved["images"] == metrics["test_images"] == sum(map(sum, saved["confusion_matrix"]))
    assert [row["cls"] for row in saved["per_class"]] == saved["classes"]
    assert {"precision", "recall", "f1", "support"} <= set(saved["per_class"][0])
    assert (tmp_path / "confusion_matrix.png").stat().st_size > 1000


@pytest.mark.slow
def test_eval_from_a_run_directory_and_export_with_a_batch_of_one(trained, tmp_path):
    report = evaluate(task_cfg("task=eval", f"ckpt={trained}"), tmp_path / "eval")
    assert report["test_acc"] == json.loads((trained / "metrics.json").read_text())["test_acc"]
    assert export(
        task_cfg("task=export", f"ckpt={trained}", "export.batch_size=1", "export.onnx=false"), tmp_path / "export"
    )["ok"]


def test_eval_on_another_split(trained, tmp_path):
    report = evaluate(task_cfg("task=eval", f"ckpt={trained / 'checkpoints' / 'best.pt'}", "eval.split=val"), tmp_path)
    assert report["split"] == "val" and "val_acc" in report


@pytest.mark.slow
def test_predict_a_folder_skips_non_images(trained, tmp_path, caplog):
    inputs = image_folder(tmp_path / "in")
    rows = predict(
        task_cfg(
            "task=predict",
            f"ckpt={trained / 'checkpoints' / 'best.pt'}",
            f"inputs={inputs}",
            "predict.topk=3",
            "predict.grid=true",
        ),
        tmp_path / "out",
    )
    assert len(rows) == 6
    assert "notes.txt" in caplog.text
    with open(tmp_path / "out" / "predictions.csv") as f:
        table = list(csv.DictReader(f))
    assert len(table) == 6
    classes = json.loads((trained / "classes.json").read_text())
    for row in table:
        assert row["top1_class"] in classes and row["top1_class"] == row["top1_class"]
        probs = [float(row[f"top{k}_prob"]) for k in (1, 2, 3)]
        assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1.0001
    assert (tmp_path / "out" / "predictions.png").is_file()


def test_predict_a_single_file_and_a_glob(trained, tmp_path):
    inputs = image_folder(tmp_path / "in")
    ckpt = trained / "checkpoints" / "best.pt"
    one = predict(task_cfg("task=predict", f"ckpt={ckpt}", f"inputs={inputs / 'img_0.png'}"), tmp_path / "a")
    assert len(one) == 1 and len(one[0]["classes"]) == 4  # topk 5 capped at the 4 classes
    globbed = predict(task_cfg("task=predict", f"ckpt={ckpt}", f"inputs={inputs}/img_*.png"), tmp_path / "b")
    assert len(globbed) == 5


@pytest.mark.slow
def test_predict_inputs_matching_nothing(trained, tmp_path):
    with pytest.raises(UserError, match="inputs=.*matches no file"):
        predict(
            task_cfg("task=predict", f"ckpt={trained / 'checkpoints' / 'best.pt'}", f"inputs={tmp_path}/*.jpg"),
            tmp_path,
        )
    only_text = tmp_path / "text"
    only_text.mkdir()
    (only_text / "a.txt").write_text("x")
    with pytest.raises(UserError, match="none of the 1 matching files"):
        predict(
            task_cfg("task=predict", f"ckpt={trained / 'checkpoints' / 'best.pt'}", f"inputs={only_text}"), tmp_path
        )


@pytest.mark.slow
def test_export_matches_the_pytorch_model(trained, tmp_path):
    report = export(task_cfg("task=export", f"ckpt={trained / 'checkpoints' / 'best.pt'}"), tmp_path)
    assert report["ok"] and report["max_abs_diff"]["model.pt2"] < 1e-4
    program = torch.export.load(tmp_path / "model.pt2").module()
    assert program(torch.randn(3, 3, 32, 32)).shape == (3, 4)  # any batch size
    preprocess = json.loads((tmp_path / "preprocess.json").read_text())
    assert preprocess["crop"] == 32 and preprocess["classes"] == json.loads((trained / "classes.json").read_text())
    assert len(preprocess["mean"]) == 3 and len(preprocess["std"]) == 3
    if importlib.util.find_spec("onnxruntime") and importlib.util.find_spec("onnxscript"):
        assert report["max_abs_diff"]["model.onnx"] < 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("task", ["eval", "predict", "export"])
def test_bad_checkpoints_are_one_clear_line(trained, tmp_path, task):
    good = (trained / "checkpoints" / "best.pt").read_bytes()
    (tmp_path / "truncated.pt").write_bytes(good[: len(good) // 3])
    torch.save({"state_dict": {"w": torch.zeros(1)}}, tmp_path / "foreign.pt")
    (tmp_path / "text.pt").write_text("hello")
    cases = {
        "missing.pt": "no such file",
        "truncated.pt": "not a readable checkpoint",
        "foreign.pt": "not a rethink checkpoint",
        "text.pt": "not a readable checkpoint",
    }
    for name, words in cases.items():
        result = subprocess.run(
            [
                sys.executable,
                str(ROOT / "run.py"),
                f"task={task}",
                f"ckpt={tmp_path / name}",
                f"inputs={trained}",
                f"hydra.run.dir={tmp_path / 'out'}",
            ],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert result.returncode != 0, name
        assert "Traceback" not in result.stderr + result.stdout, name
        errors = [line for line in result.stderr.splitlines() if "error" in line.lower()]
        assert len(errors) == 1 and words in errors[0] and name in errors[0], result.stderr


def test_a_checkpoint_cannot_run_code(tmp_path):
    import os

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    torch.save({"format": "rethink-checkpoint", "evil": Payload()}, tmp_path / "evil.pt")
    from rethink.train.checkpoint import load_checkpoint

    with pytest.raises(UserError, match="not a readable checkpoint"):
        load_checkpoint(tmp_path / "evil.pt")
    assert not (tmp_path / "pwned").exists()


def test_tasks_need_their_arguments(tmp_path):
    with pytest.raises(UserError, match="needs ckpt=PATH"):
        evaluate(task_cfg("task=eval"), tmp_path)
    with pytest.raises(UserError, match="inputs=PATH"):
        predict(task_cfg("task=predict", "ckpt=/x.pt"), tmp_path)
