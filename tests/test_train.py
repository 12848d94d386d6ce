"""task=train on the CPU at 32 px with synthetic data: files, scalars, checkpoints, resume, failures."""

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.backend.event_processing.plugin_event_accumulator import EventAccumulator as PluginAccumulator

from rethink.errors import UserError
from rethink.hydra_app import compose_config
from rethink.tasks.train import train
from rethink.train.checkpoint import load_checkpoint
from rethink.train.optim import RMSpropTF, lr_factor

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_a_short_run_leaves_every_file_and_scalar(tmp_path, scalars, tiny):
    metrics = train(tiny(), tmp_path)
    for name in ["metrics.json", "classes.json", "checkpoints/last.pt", "checkpoints/best.pt"]:
        assert (tmp_path / name).is_file(), name
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved == pytest.approx(metrics)
    for key in [
        "best_val_acc",
        "best_epoch",
        "final_val_acc",
        "final_train_loss",
        "test_acc",
        "epochs",
        "params",
        "gmacs",
        "train_time_s",
        "train_img_s",
        "peak_memory_mb",
    ]:
        assert key in saved, key
    assert saved["epochs"] == 2 and isinstance(saved["test_acc"], float)
    logged = scalars(tmp_path)
    for tag in [
        "train/loss",
        "train/acc",
        "val/loss",
        "val/acc",
        "val/acc_best",
        "lr",
        "time/epoch_s",
        "throughput/train_img_s",
    ]:
        assert [step for step, _ in logged[tag]] == [1, 2], tag
    assert logged["test/acc"][0][1] == pytest.approx(saved["test_acc"])
    plugins = PluginAccumulator(str(tmp_path))
    plugins.Reload()
    assert "_hparams_/session_start_info" in plugins.PluginTagToContent("hparams")
    assert "_hparams_/session_end_info" in plugins.PluginTagToContent("hparams")
    images = EventAccumulator(str(tmp_path))
    images.Reload()
    assert {"train/images", "test/confusion_matrix"} <= set(images.Tags()["images"])
    ckpt = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    assert ckpt["epoch"] == 2 and ckpt["classes"] == json.loads((tmp_path / "classes.json").read_text())
    assert {"model", "optimizer", "scheduler", "config", "ema"} <= set(ckpt)
    assert ckpt["config"]["model"]["name"] == "b0"


@pytest.mark.slow
def test_same_seed_same_loss_curve(tmp_path, tiny):
    first = train(tiny("trainer.epochs=1"), tmp_path / "a")
    second = train(tiny("trainer.epochs=1"), tmp_path / "b")

    def curve(run):
        return load_checkpoint(tmp_path / run / "checkpoints" / "last.pt")["history"]

    assert [r["train_loss"] for r in curve("a")] == [r["train_loss"] for r in curve("b")]
    assert first["test_acc"] == second["test_acc"]
    third = train(tiny("trainer.epochs=1", "seed=4"), tmp_path / "c")
    assert [r["train_loss"] for r in curve("c")] != [r["train_loss"] for r in curve("a")]
    del third


@pytest.mark.slow
def test_freeze_backbone_trains_only_the_head_from_a_pretrained_file(tmp_path, tiny):
    from rethink.models import create_model

    source = create_model("b0", 4)
    torch.save(source.state_dict(), tmp_path / "weights.pt")
    train(
        tiny("trainer.epochs=1", f"model.pretrained={tmp_path / 'weights.pt'}", "model.freeze=backbone"),
        tmp_path / "run",
    )
    after = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["model"]
    before = source.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k].cpu())}
    assert changed == {"classifier.weight", "classifier.bias"}


@pytest.mark.slow
def test_ema_is_evaluated_and_checkpointed(tmp_path, scalars, tiny):
    train(tiny("trainer.ema=true", "trainer.ema_decay=0.5"), tmp_path)
    ckpt = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    assert ckpt["ema"] is not None and ckpt["ema_updates"] == 8
    assert "val_ema/acc" in scalars(tmp_path)


@pytest.mark.slow
def test_non_finite_loss_stops_cleanly_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch, tiny):
    import rethink.train.loop as loop

    real = loop.F.cross_entropy
    calls = {"n": 0}

    class PoisonedF:
        def __getattr__(self, name):
            return getattr(torch.nn.functional, name)

        @staticmethod
        def cross_entropy(*args, **kwargs):
            loss = real(*args, **kwargs)
            if kwargs.get("reduction") == "sum":  # evaluation
                return loss
            calls["n"] += 1
            return loss * float("nan") if calls["n"] > 4 else loss  # the second epoch diverges

    monkeypatch.setattr(loop, "F", PoisonedF())
    with pytest.raises(UserError, match="non-finite.*epoch 2.*last.pt \\(epoch 1\\)"):
        train(tiny("trainer.epochs=3", "trainer.log_every_n_steps=2"), tmp_path)
    ckpt = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    assert ckpt["epoch"] == 1
    assert all(torch.isfinite(t).all() for t in ckpt["model"].values() if t.is_floating_point())
    assert not (tmp_path / "metrics.json").exists()


@pytest.mark.slow
def test_a_used_run_directory_is_not_overwritten(tmp_path, tiny):
    train(tiny("trainer.epochs=1"), tmp_path)
    with pytest.raises(UserError, match="already holds a run"):
        train(tiny("trainer.epochs=1"), tmp_path)


@pytest.mark.slow
def test_the_command_line_cannot_overwrite_a_runs_record(tmp_path, tiny_overrides):
    base = [*tiny_overrides, "trainer.epochs=1", f"hydra.run.dir={tmp_path}"]
    assert subprocess.run([sys.executable, str(ROOT / "run.py"), *base], cwd=ROOT, capture_output=True).returncode == 0
    record = {p.name: p.read_bytes() for p in (tmp_path / ".hydra").iterdir()}
    again = subprocess.run(
        [sys.executable, str(ROOT / "run.py"), *base, "optimizer.lr=0.5"], cwd=ROOT, capture_output=True, text=True
    )
    assert again.returncode != 0 and "already holds a run" in again.stderr and "Traceback" not in again.stderr
    assert {p.name: p.read_bytes() for p in (tmp_path / ".hydra").iterdir()} == record


@pytest.mark.slow
def test_resume_keeps_the_runs_split_when_files_are_added(tmp_path, tiny_overrides):
    from PIL import Image

    data = tmp_path / "photos"
    rng = torch.Generator().manual_seed(0)

    def add(cls, i):
        (data / cls).mkdir(parents=True, exist_ok=True)
        pixels = torch.randint(0, 255, (24, 24, 3), generator=rng, dtype=torch.uint8).numpy()
        Image.fromarray(pixels).save(data / cls / f"{i:03d}.png")

    for i in range(12):
        add("cat", i), add("dog", i)
    folder = ["data=folder", f"data.root={data}", f"data.cache_dir={tmp_path / 'cache'}", "data.batch_size=4"]
    first = compose_config([*tiny_overrides, *folder, "trainer.epochs=1", "trainer.limit_train_batches=null"])
    train(first, tmp_path / "run")
    split = (tmp_path / "run" / "splits.csv").read_text()
    add("cat", 12)  # one more file reshuffles a recomputed split of its class
    resumed = compose_config(
        [*tiny_overrides, *folder, "trainer.epochs=2", "trainer.limit_train_batches=null", f"resume={tmp_path / 'run'}"]
    )
    train(resumed, tmp_path / "ignored")
    assert (tmp_path / "run" / "splits.csv").read_text() == split
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["epochs"] == 2
    for i in range(13, 20):  # enough to change the number of steps per epoch
        add("dog", i)
    (tmp_path / "run" / "splits.csv").unlink()  # without the run's split, the data set is split anew
    with pytest.raises(UserError, match="steps, the run had"):
        train(
            compose_config(
                [
                    *tiny_overrides,
                    *folder,
                    "trainer.epochs=3",
                    "trainer.limit_train_batches=null",
                    f"resume={tmp_path / 'run'}",
                ]
            ),
            tmp_path / "x",
        )


def start_run_py(*args, **kwargs):
    return subprocess.Popen(
        [sys.executable, str(ROOT / "run.py"), *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **kwargs,
    )


@pytest.mark.slow
def test_resume_after_kill_9_ends_at_the_asked_epochs_with_one_point_per_epoch(
    tmp_path, scalars, tiny_overrides, wait_for_checkpoint_writes
):
    args = [*tiny_overrides, "trainer.epochs=5", "trainer.limit_train_batches=6", f"hydra.run.dir={tmp_path}"]
    process = start_run_py(*args)
    wait_for_checkpoint_writes(tmp_path / "checkpoints" / "last.pt", process, writes=2)
    process.kill()
    process.wait()
    resumed = subprocess.run(
        [sys.executable, str(ROOT / "run.py"), *args, f"resume={tmp_path}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["epochs"] == 5
    steps = [step for step, _ in scalars(tmp_path)["val/acc"]]
    assert sorted(steps) == [1, 2, 3, 4, 5]
    assert (tmp_path / ".hydra" / "config.yaml").is_file()  # the first invocation's record is kept
    assert list((tmp_path / ".hydra").glob("resumed-*/config.yaml"))


@pytest.mark.slow
def test_sigterm_saves_mid_epoch_and_resume_finishes_the_epoch(tmp_path, monkeypatch, scalars, tiny, stop_exits):
    import rethink.train.loop as loop

    real_step, steps = loop.Learner.step, {"n": 0}

    def step_then_signal(self, images, labels):
        steps["n"] += 1
        if steps["n"] == 6:  # the second of epoch 2's four batches
            os.kill(os.getpid(), signal.SIGTERM)
        return real_step(self, images, labels)

    monkeypatch.setattr(loop.Learner, "step", step_then_signal)
    with pytest.raises(SystemExit) as stopped:
        train(tiny("trainer.epochs=3"), tmp_path)
    assert stopped.value.code == 128 + signal.SIGTERM
    ckpt = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    assert ckpt["epoch"] == 1 and ckpt["partial"]["batches"] == 2
    assert ckpt["scheduler"]["last_epoch"] == 6
    monkeypatch.setattr(loop.Learner, "step", real_step)
    train(tiny("trainer.epochs=3", f"resume={tmp_path}"), tmp_path / "ignored")
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["epochs"] == 3
    assert sorted(step for step, _ in scalars(tmp_path)["val/acc"]) == [1, 2, 3]
    history = load_checkpoint(tmp_path / "checkpoints" / "last.pt")["history"]
    assert (
        load_checkpoint(tmp_path / "checkpoints" / "last.pt")["scheduler"]["last_epoch"] == 12
    )  # 3 epochs x 4 steps, none repeated
    assert [round(r["epoch"]) for r in history] == [1, 2, 3]


@pytest.mark.slow
def test_resume_refuses_to_change_what_the_run_is(tmp_path, tiny_overrides):
    base = [*tiny_overrides, "trainer.epochs=1", f"hydra.run.dir={tmp_path}"]
    assert subprocess.run([sys.executable, str(ROOT / "run.py"), *base], cwd=ROOT, capture_output=True).returncode == 0
    changed = subprocess.run(
        [sys.executable, str(ROOT / "run.py"), *base, "optimizer.lr=0.5", f"resume={tmp_path}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert changed.returncode != 0 and "optimizer.lr" in changed.stderr and "Traceback" not in changed.stderr
    missing = subprocess.run(
        [sys.executable, str(ROOT / "run.py"), *base, f"resume={tmp_path / 'nope'}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert missing.returncode != 0 and "no checkpoints/last.pt" in missing.stderr and "Traceback" not in missing.stderr


@pytest.mark.slow
def test_sweep_over_all_eleven_models(tmp_path, scalars, tiny_overrides):
    models = "b0,b1,b2,b3,b4,b5,b6,b7,v2_s,v2_m,v2_l"
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "run.py"),
            "-m",
            f"model={models}",
            *tiny_overrides,
            "trainer.epochs=1",
            "trainer.limit_train_batches=2",
            "trainer.limit_val_batches=1",
            "data.batch_size=4",
            "trainer.image_grid=false",
            f"hydra.sweep.dir={tmp_path}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=1500,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    jobs = sorted(tmp_path.glob("*/metrics.json"))
    assert [p.parent.name for p in jobs] == sorted(f"{i:02d}_{m}" for i, m in enumerate(models.split(",")))
    params = {}
    for path in jobs:
        logged = scalars(path.parent)
        assert {"train/loss", "train/acc", "val/loss", "val/acc", "lr"} <= set(logged)
        assert (path.parent / "checkpoints" / "last.pt").is_file()
        params[path.parent.name.split("_", 1)[1]] = json.loads(path.read_text())["params"]
    assert params["b0"] == 4_012_672 and params["v2_l"] == 117_239_396  # 4-class heads


@pytest.mark.slow
def test_a_failing_job_does_not_stop_the_sweep(tmp_path, tiny_overrides):
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "run.py"),
            "-m",
            "model.pretrained=/nonexistent.pt,false",
            *tiny_overrides,
            "trainer.epochs=1",
            f"hydra.sweep.dir={tmp_path}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode != 0
    assert "model.pretrained=/nonexistent.pt" in result.stderr and "no such file" in result.stderr
    assert (tmp_path / "1_b0_pretrained=false" / "metrics.json").is_file()
    assert (
        tmp_path / "0_b0_pretrained=-nonexistent.pt" / "run.log"
    ).is_file()  # the failed job keeps its folder and log
    assert not (tmp_path / "0_b0_pretrained=-nonexistent.pt" / "metrics.json").exists()


def test_rmsprop_tf_matches_tensorflows_update_rule():
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    opt = RMSpropTF([p], lr=0.1, alpha=0.9, eps=1e-3, momentum=0.9)
    ms, mom, value = torch.ones(2), torch.zeros(2), p.detach().clone()
    for _ in range(3):
        p.grad = 2 * p.detach().clone()
        grad = 2 * value
        ms = 0.9 * ms + 0.1 * grad * grad
        mom = 0.9 * mom + 0.1 * grad / torch.sqrt(ms + 1e-3)
        value = value - mom
        opt.step()
        assert torch.allclose(p.detach(), value)


def test_schedules():
    cosine = dict(
        name="cosine", warmup_epochs=1, warmup_start_ratio=0.01, min_lr_ratio=0.01, decay_rate=0.97, decay_epochs=2.4
    )
    assert lr_factor(0, 10, 5, cosine) == pytest.approx(0.01)
    assert lr_factor(5, 10, 5, cosine) == pytest.approx(0.01 + 0.99 * 0.5)
    assert lr_factor(10, 10, 5, cosine) == pytest.approx(1.0)
    assert lr_factor(49, 10, 5, cosine) == pytest.approx(0.01, abs=2e-3)
    study = dict(cosine, name="study_cosine", warmup_epochs=0)
    for step in (0, 9, 10, 35):
        e = step // 10
        assert lr_factor(step, 10, 5, study) == pytest.approx(((1 + math.cos(math.pi * e / 5)) / 2) * 0.99 + 0.01)
    decay = dict(cosine, name="step", warmup_epochs=0)
    assert lr_factor(23, 10, 30, decay) == 1.0 and lr_factor(24, 10, 30, decay) == pytest.approx(0.97)
    assert lr_factor(100, 10, 30, decay) == pytest.approx(0.97**4)


@requires_cuda
@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_amp_training_on_gpu(tmp_path, amp, tiny):
    metrics = train(tiny(f"trainer.amp={amp}", "trainer.device=cuda"), tmp_path)
    assert metrics["precision"] == amp and math.isfinite(metrics["final_train_loss"])
    ckpt = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    assert (ckpt["scaler"] is not None) == (amp == "fp16")
