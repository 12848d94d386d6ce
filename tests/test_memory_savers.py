"""Memory savers: gradient accumulation (trainer.grad_accumulation) and per-stage gradient checkpointing
(trainer.grad_checkpointing) compute what the plain step computes."""

import copy
import itertools

import pytest
import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from rethink.errors import UserError
from rethink.hydra_app import compose_config
from rethink.models import create_model
from rethink.tasks.benchmark_step import saved_for_backward_mb
from rethink.tasks.train import train
from rethink.train.checkpoint import load_checkpoint
from rethink.train.fit import batches_per_epoch
from rethink.train.loop import EpochTotals, Inputs, Learner, train_epoch
from rethink.train.optim import build_scheduler
from rethink.train.runtime import Precision

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def learner(model, accumulation: int, ema: bool = False) -> Learner:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    scheduler = build_scheduler(
        optimizer, 10, 3, dict(name="cosine", warmup_epochs=0.0, warmup_start_ratio=0.1, min_lr_ratio=0.01)
    )
    average = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.9), use_buffers=True) if ema else None
    inputs = Inputs(torch.device("cpu"), MEAN, STD, channels_last=False)
    return Learner(
        model,
        optimizer,
        scheduler,
        inputs,
        Precision(None, "cpu"),
        ema=average,
        label_smoothing=0.1,
        grad_clip=1.0,
        grad_accumulation=accumulation,
    )


def batch(n: int, size: int = 32, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=generator), torch.randint(
        0, 5, (n,), generator=generator
    )


@pytest.mark.slow
@pytest.mark.parametrize("accumulation", [2, 4])
def test_accumulating_n_batches_of_b_is_one_batch_of_n_times_b(accumulation):
    """With BatchNorm on its running statistics (eval mode; in training it normalises each micro-batch by
    its own statistics, as documented) the loss, the gradients and the step agree with one big batch."""
    torch.manual_seed(0)
    big = create_model("b0", 5).eval()
    small = copy.deepcopy(big)
    whole, accumulated = learner(big, 1, ema=True), learner(small, accumulation, ema=True)
    images, labels = batch(4 * accumulation)

    loss, correct = whole.forward_backward(images, labels)
    losses, hits = zip(
        *(accumulated.forward_backward(x, y) for x, y in zip(images.chunk(accumulation), labels.chunk(accumulation)))
    )
    assert torch.allclose(torch.stack(losses).mean(), loss, rtol=1e-5) and sum(hits) == correct
    for p, q in zip(big.parameters(), small.parameters()):
        assert torch.allclose(p.grad, q.grad, rtol=1e-4, atol=1e-7)

    whole.optimizer_step()
    accumulated.optimizer_step()  # the accumulated gradient, clipped as a whole
    for p, q in zip(big.parameters(), small.parameters()):
        assert torch.allclose(p, q, rtol=1e-4, atol=1e-6)
    assert accumulated.scheduler.last_epoch == whole.scheduler.last_epoch == 1
    assert int(accumulated.ema.n_averaged) == int(whole.ema.n_averaged) == 1


@pytest.mark.slow
def test_step_steps_the_optimizer_schedule_and_ema_once_per_group():
    model = create_model("b0", 5).eval()
    trainer = learner(model, 3, ema=True)
    images, labels = batch(2)
    lrs, before = [], [p.detach().clone() for p in model.parameters()]
    for i in range(6):
        trainer.step(images, labels)
        lrs.append(trainer.optimizer.param_groups[0]["lr"])
        moved = any(not torch.equal(p, q) for p, q in zip(before, model.parameters()))
        assert moved == (i >= 2) and trainer.between_steps == (i % 3 == 2)
    assert trainer.scheduler.last_epoch == 2 and int(trainer.ema.n_averaged) == 2
    assert lrs[0] == lrs[1] != lrs[2] == lrs[3] == lrs[4] != lrs[5]


@pytest.mark.slow
def test_a_stop_waits_for_the_end_of_the_group_and_leftovers_are_dropped():
    model = create_model("b0", 5)
    trainer = learner(model, 2)
    images, labels = batch(2)
    asked = itertools.count()
    totals = train_epoch(trainer, [(images, labels)] * 6, 6, EpochTotals(), should_stop=lambda: next(asked) >= 1)
    assert (
        totals.interrupted and totals.batches == 2 and trainer.scheduler.last_epoch == 1
    )  # asked at batches 0 and 2 only
    totals = train_epoch(trainer, [(images, labels)] * 3, 3, EpochTotals())  # one and a half groups
    assert totals.batches == 3 and trainer.scheduler.last_epoch == 2 and trainer.between_steps
    assert all(p.grad is None for p in model.parameters())  # the half group's gradients are gone


def test_an_epoch_is_whole_groups_of_batches():
    class Loader:
        batch_size = 8

        def __init__(self, n):
            self.n = n

        def __len__(self):
            return self.n

    trainer_cfg = compose_config(["trainer.grad_accumulation=4"]).trainer
    assert batches_per_epoch(Loader(10), trainer_cfg) == 8 and batches_per_epoch(Loader(4), trainer_cfg) == 4
    trainer_cfg.limit_train_batches = 7
    assert batches_per_epoch(Loader(10), trainer_cfg) == 4
    with pytest.raises(
        UserError, match=r"trainer.grad_accumulation=4: an epoch has only 3 batches of data.batch_size=8"
    ):
        batches_per_epoch(Loader(3), compose_config(["trainer.grad_accumulation=4"]).trainer)


@pytest.mark.slow
def test_training_with_accumulation_schedules_optimizer_steps(tmp_path):
    overrides = [
        "data=synthetic",
        "data.images_per_class=20",
        "data.image_size=32",
        "data.num_workers=0",
        "data.batch_size=4",
        "model.train_size=32",
        "model.eval_size=32",
        "trainer.epochs=2",
        "trainer.limit_train_batches=5",
        "trainer.limit_val_batches=1",
        "trainer.device=cpu",
        "trainer.cpu_threads=1",
        "trainer.image_grid=false",
        "trainer.grad_accumulation=2",
        "trainer.grad_checkpointing=true",
        "trainer.ema=true",
        "scheduler.warmup_epochs=0",
    ]
    metrics = train(compose_config(overrides), tmp_path)
    state = load_checkpoint(tmp_path / "checkpoints" / "last.pt", key="test")
    assert (
        state["steps_per_epoch"] == 4 and state["scheduler"]["last_epoch"] == 4 and state["ema_updates"] == 4
    )  # 2 epochs x 2 steps
    assert metrics["train_img_s"] > 0 and state["history"][0]["lr"] == pytest.approx(0.01)


@pytest.mark.slow
def test_a_signal_mid_group_stops_after_it_and_the_resume_is_exact(tmp_path, monkeypatch, stop_exits):
    import os
    import signal

    import rethink.train.loop as loop

    overrides = [
        "data=synthetic",
        "data.images_per_class=20",
        "data.image_size=32",
        "data.num_workers=0",
        "data.batch_size=4",
        "model.train_size=32",
        "model.eval_size=32",
        "trainer.epochs=2",
        "trainer.limit_train_batches=4",
        "trainer.limit_val_batches=1",
        "trainer.device=cpu",
        "trainer.cpu_threads=1",
        "trainer.image_grid=false",
        "trainer.grad_accumulation=2",
        "trainer.grad_checkpointing=true",
    ]
    train(compose_config(overrides), tmp_path / "whole")
    real_step, calls = loop.Learner.step, {"n": 0}

    def step_then_signal(self, images, labels):
        calls["n"] += 1
        if calls["n"] == 5:  # the first micro-batch of epoch 2's first group
            os.kill(os.getpid(), signal.SIGTERM)
        return real_step(self, images, labels)

    monkeypatch.setattr(loop.Learner, "step", step_then_signal)
    with pytest.raises(SystemExit):
        train(compose_config(overrides), tmp_path / "cut")
    stopped = load_checkpoint(tmp_path / "cut" / "checkpoints" / "last.pt", key="test")
    assert stopped["partial"]["batches"] == 2 and stopped["scheduler"]["last_epoch"] == 3  # after the group, not in it
    monkeypatch.setattr(loop.Learner, "step", real_step)
    train(compose_config([*overrides, f"resume={tmp_path / 'cut'}"]), tmp_path / "ignored")
    whole = load_checkpoint(tmp_path / "whole" / "checkpoints" / "last.pt", key="test")
    resumed = load_checkpoint(tmp_path / "cut" / "checkpoints" / "last.pt", key="test")
    assert resumed["scheduler"]["last_epoch"] == whole["scheduler"]["last_epoch"] == 4
    assert all(torch.equal(whole["model"][k], resumed["model"][k]) for k in whole["model"])


@pytest.mark.slow
@pytest.mark.parametrize("name", ["b0", "v2_s"])
def test_checkpointed_stages_give_the_same_gradients_statistics_and_random_stream(name):
    torch.manual_seed(0)
    plain = create_model(
        name, 5, ["model.drop_path_rate=0.5"]
    ).train()  # drop path draws masks: the same in the recomputation
    checkpointed = copy.deepcopy(plain)
    checkpointed.set_grad_checkpointing()
    x = torch.randn(3, 3, 48, 48)
    after = []
    for model in (plain, checkpointed):
        torch.manual_seed(1)
        model(x).logsumexp(1).sum().backward()
        after.append(torch.rand(4))
    for p, q in zip(plain.parameters(), checkpointed.parameters()):
        assert torch.equal(p.grad, q.grad)
    ours, theirs = plain.state_dict(), checkpointed.state_dict()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)  # BatchNorm statistics updated once, not twice
    assert torch.equal(*after)  # the rest of the run draws the same random numbers
    checkpointed.eval()
    with torch.no_grad():
        assert torch.equal(checkpointed(x), plain.eval()(x))  # eval: no checkpointing at all


def test_checkpointing_keeps_a_fraction_of_the_activations():
    model = create_model("b0", 5).train()
    x = torch.randn(4, 3, 96, 96)
    plain = saved_for_backward_mb(lambda: model(x), torch.device("cpu"))
    model.set_grad_checkpointing()
    checkpointed = saved_for_backward_mb(lambda: model(x), torch.device("cpu"))
    if plain != plain:
        pytest.skip("no glibc allocation count on this system")
    assert checkpointed < plain / 4


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_checkpointing_on_the_gpu_same_gradients_less_memory():
    torch.manual_seed(0)
    plain = create_model("b0", 5).cuda().train().to(memory_format=torch.channels_last)
    checkpointed = copy.deepcopy(plain)
    checkpointed.set_grad_checkpointing()
    x = torch.randn(8, 3, 128, 128, device="cuda").contiguous(memory_format=torch.channels_last)
    peaks = []
    for model in (plain, checkpointed):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        torch.manual_seed(1)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(x).float().logsumexp(1).sum()
        loss.backward()
        torch.cuda.synchronize()
        peaks.append(torch.cuda.max_memory_allocated() - start)
    for p, q in zip(plain.parameters(), checkpointed.parameters()):
        assert torch.allclose(p.grad, q.grad, rtol=1e-3, atol=1e-5)
    assert peaks[1] < 0.6 * peaks[0]
