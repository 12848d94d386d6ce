"""GPU fast paths: what every `auto` decides (trainer.compile, cuda_graphs, cudnn_benchmark, data.on_gpu), the
CUDA-graph wrapper on the CPU (eager stand-ins for torch.cuda.make_graphed_callables, this torch's and an older
one's, capturing inside an emulated torch.cuda.graph, with a pin-memory thread that a "global" capture breaks),
and on a GPU, graph-replayed training against the plain path: its losses, its masks bit for bit, a failed
capture, and a run with the CPU loader's pin thread."""

import copy
import os
import re
import signal
import threading
from contextlib import contextmanager

import pytest
import torch
from torch import nn

from rethink.config import validate
from rethink.errors import UserError
from rethink.hydra_app import compose_config
from rethink.models.blocks import DropPath
from rethink.tasks.train import train
from rethink.train import fast_paths
from rethink.train.checkpoint import load_checkpoint
from rethink.train.cuda_graphs import MAX_CAPTURES, GraphedForward, capture_route
from rethink.train.fast_paths import compile_choice, cuda_graphs_choice, cudnn_benchmark_choice, data_on_gpu_choice
from rethink.train.loop import Inputs, Learner
from rethink.train.optim import build_optimizer, build_scheduler
from rethink.train.runtime import Precision

# --- what auto decides ---------------------------------------------------------------------------------


def test_compile_auto_compiles_only_gpu_runs_long_enough_to_repay_it():
    assert not compile_choice("auto", "cpu", 10**9).on
    assert not compile_choice("auto", "cuda", fast_paths.COMPILE_PAYS_AFTER_IMAGES - 1).on
    assert compile_choice("auto", "cuda", fast_paths.COMPILE_PAYS_AFTER_IMAGES).on
    assert compile_choice(True, "cpu", 1).on and not compile_choice(False, "cuda", 10**9).on


def test_cuda_graphs_auto_takes_small_batches_in_one_process_and_true_names_what_it_lacks():
    ok = dict(device_type="cuda", batch=16, world_size=1, grad_accumulation=1, grad_checkpointing=False, compiled=False)
    assert cuda_graphs_choice("auto", **ok).on
    for change in (
        dict(device_type="cpu"),
        dict(batch=fast_paths.GRAPHS_BATCH_MAX + 1),
        dict(world_size=2),
        dict(grad_accumulation=2),
        dict(grad_checkpointing=True),
        dict(compiled=True),
    ):
        choice = cuda_graphs_choice("auto", **{**ok, **change})
        assert not choice.on and choice.why.startswith("auto: "), change
    assert cuda_graphs_choice(True, **{**ok, "batch": 256}).on  # true: whatever the batch
    assert "reduce-overhead" in cuda_graphs_choice(True, **{**ok, "compiled": True}).why  # torch.compile's own graphs
    assert not cuda_graphs_choice(False, **ok).on
    with pytest.raises(UserError, match=r"trainer\.cuda_graphs=true needs a CUDA device and one process \(not DDP\)"):
        cuda_graphs_choice(True, **{**ok, "device_type": "cpu", "world_size": 2})
    with pytest.raises(UserError, match=r"trainer\.grad_checkpointing=false"):
        cuda_graphs_choice(True, **{**ok, "grad_checkpointing": True})


def test_cudnn_benchmark_auto_searches_only_for_long_gpu_runs_and_never_when_deterministic():
    assert not cudnn_benchmark_choice("auto", "cuda", False, fast_paths.CUDNN_PAYS_AFTER_STEPS - 1).on
    assert cudnn_benchmark_choice("auto", "cuda", False, fast_paths.CUDNN_PAYS_AFTER_STEPS).on
    assert not cudnn_benchmark_choice(True, "cuda", True, 10**6).on  # deterministic wins
    assert not cudnn_benchmark_choice(True, "cpu", False, 10**6).on
    assert cudnn_benchmark_choice(True, "cuda", False, 1).on


def test_data_on_gpu_auto_needs_a_gpu_the_batched_augmentation_and_room_beside_the_training_step():
    gib = 2**30

    def needs(n):
        return lambda: n

    def unasked():
        raise AssertionError("a size was read where nothing depends on it")

    step = needs(2 * gib)
    assert data_on_gpu_choice("auto", "cuda", "flip_crop", needs(1 * gib), 10 * gib, step).on
    assert data_on_gpu_choice("auto", "cuda", "none", needs(1 * gib), 10 * gib, step).on
    assert not data_on_gpu_choice(
        "auto", "cuda", "flip_crop", needs(6 * gib), 10 * gib, step
    ).on  # over half the free memory
    # within half, but the step's activations (twice with graphs), gradients and optimizer state need the rest
    crowded = data_on_gpu_choice("auto", "cuda", "flip_crop", needs(4 * gib), 10 * gib, needs(7 * gib))
    assert not crowded.on and crowded.why.endswith("beside the training step's 7.0 GiB")
    assert not data_on_gpu_choice("auto", "cuda", "randaugment", unasked, 10 * gib, unasked).on
    assert not data_on_gpu_choice("auto", "cpu", "flip_crop", unasked, None, unasked).on
    assert not data_on_gpu_choice(False, "cuda", "flip_crop", unasked, 10 * gib, unasked).on
    assert data_on_gpu_choice(True, "cuda", "flip_crop", unasked, 10 * gib, unasked).on
    with pytest.raises(
        UserError,
        match=r"data\.on_gpu=true needs a CUDA device and data\.augment=flip_crop or none \(not randaugment\)",
    ):
        data_on_gpu_choice(True, "cpu", "randaugment", unasked, None, unasked)


def test_the_training_steps_memory_is_counted_without_running_it():
    from rethink.models import build_model

    model = build_model(compose_config(["model=b0", "model.width=0.5", "model.depth=0.5"]).model, 5)
    state, rng = copy.deepcopy(model.state_dict()), torch.get_rng_state()
    plain = fast_paths.step_reserve(model, 8, 64, channels_last=True, graphs=False)
    weights = sum(p.numel() * 4 for p in model.parameters())
    activations = plain - 3 * weights
    assert fast_paths.step_reserve(model, 8, 64, channels_last=True, graphs=True) == 2 * activations + 3 * weights
    assert fast_paths.step_reserve(model, 16, 64, channels_last=True, graphs=False) - 3 * weights == pytest.approx(
        2 * activations, rel=0.01
    )
    assert torch.equal(torch.get_rng_state(), rng)  # nothing drawn, nothing updated
    assert all(torch.equal(value, model.state_dict()[key]) for key, value in state.items())
    # what the forward pass saves for the backward, as autograd counts it on the CPU (a few tensors saved twice)
    x = torch.randn(8, 3, 64, 64).contiguous(memory_format=torch.channels_last)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        model.to(memory_format=torch.channels_last)(x)
    counted = sum(
        t.numel() * t.element_size()
        for t in {t.data_ptr(): t for t in saved if not isinstance(t, nn.Parameter)}.values()
    )
    assert 0.8 * counted < activations < 1.5 * counted


def test_a_cpu_run_takes_no_fast_path_and_the_keys_take_only_auto_true_false(tiny_overrides):
    cfg = compose_config(tiny_overrides)
    fast = fast_paths.choose(cfg, "cpu", 1, steps_per_epoch=100, store_bytes=lambda: 1)
    assert fast.record() == {"compile": False, "cuda_graphs": False, "cudnn_benchmark": False, "data_on_gpu": False}
    assert "compile off (auto: not on a GPU)" in fast.line()
    for key in ("trainer.compile", "trainer.cuda_graphs", "trainer.cudnn_benchmark", "data.on_gpu"):
        with pytest.raises(UserError, match=re.escape(f"{key}=maybe: must be auto, true or false")):
            validate(compose_config([*tiny_overrides, f"{key}=maybe"]))


def test_compiled_code_is_cached_in_one_folder_every_job_shares(monkeypatch, tmp_path):
    import torch._inductor.config

    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    saved = torch._inductor.config.fx_graph_cache
    try:
        assert fast_paths.share_compiled_code() == tmp_path / "rethink" / "inductor"
        assert torch._inductor.config.fx_graph_cache is True
        monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))  # the user's own choice wins
        assert fast_paths.share_compiled_code() == tmp_path / "mine"
    finally:
        torch._inductor.config.fx_graph_cache = saved


def test_cuda_graphs_true_on_the_cpu_is_refused_with_one_line_before_training(tmp_path, tiny_overrides):
    with pytest.raises(UserError, match=r"trainer\.cuda_graphs=true needs a CUDA device"):
        train(compose_config([*tiny_overrides, "trainer.cuda_graphs=true"]), tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoints").exists()


# --- the wrapper, with an eager stand-in for the capture ---------------------------------------------------


class EmulatedCuda:
    """What a capture involves of CUDA, on the CPU: torch.cuda.graph's context (its signature and capture modes),
    and host allocations from other threads (the DataLoader's pin-memory thread), which fail while another thread
    holds a "global" capture open, as CUDA's do (cudaErrorStreamCaptureUnsupported); `during_capture` is work
    other threads do while a capture is open."""

    def __init__(self):
        self.modes, self.during_capture = [], []
        self.open = None  # (mode, thread) of the capture in progress

    def graph(self, cuda_graph, pool=None, stream=None, capture_error_mode="global"):
        self.modes.append(capture_error_mode)
        return self._capture(capture_error_mode)

    @contextmanager
    def _capture(self, mode):
        self.open = (mode, threading.get_ident())
        try:
            for work in self.during_capture:
                work()
            yield
        finally:
            self.open = None

    def host_alloc(self) -> None:
        if self.open and self.open[0] == "global" and self.open[1] != threading.get_ident():
            raise RuntimeError(
                "CUDA error: operation not permitted when stream is capturing (cudaErrorStreamCaptureUnsupported)"
            )


@pytest.fixture
def cuda(monkeypatch):
    """torch.cuda.graph replaced by an EmulatedCuda's, whose capture modes the test reads."""
    emulated = EmulatedCuda()
    monkeypatch.setattr(torch.cuda, "graph", emulated.graph)
    return emulated


class PinThread:
    """The DataLoader's pin-memory thread as far as a capture is concerned: it pins the next batch (a host
    allocation, in a thread of its own) while the main thread captures, and an error there comes out at the next
    batch, as DataLoader re-raises its pin thread's."""

    def __init__(self, cuda: EmulatedCuda):
        self.cuda, self.error = cuda, None
        cuda.during_capture.append(self.pin)

    def pin(self) -> None:
        def allocate():
            try:
                self.cuda.host_alloc()
            except RuntimeError as e:
                self.error = e

        thread = threading.Thread(target=allocate)
        thread.start()
        thread.join()

    def batches(self, images, labels):
        for batch in zip(images, labels):
            if self.error is not None:
                raise self.error
            self.pin()  # (outside a capture: always fine)
            yield batch


class EagerGraphs:
    """torch.cuda.make_graphed_callables' contract without a GPU, as torch runs it: warm-up passes (forward and
    autograd.grad, which update BatchNorm's statistics and draw random numbers as the real ones do), the forward
    and the backward each captured inside torch.cuda.graph (the `cuda` fixture's), then the module's forward
    swapped for one that 'replays' (runs the original forward) in the training mode it was captured in."""

    def __init__(self):
        self.captures, self.replays = [], 0

    def __call__(
        self, module, sample_args, num_warmup_iters=3, allow_unused_input=False, pool=None, capture_error_mode="global"
    ):
        return self.graphed(module, sample_args, num_warmup_iters, dict(capture_error_mode=capture_error_mode))

    def graphed(self, module, sample_args, num_warmup_iters, mode: dict):
        assert not (torch.is_autocast_enabled() and torch.is_autocast_cache_enabled())  # as torch requires
        params = [p for p in module.parameters() if p.requires_grad]
        self.captures.append(tuple(sample_args[0].shape))
        for _ in range(num_warmup_iters):
            out = module(*sample_args)
            torch.autograd.grad(out.sum(), params)
        with torch.cuda.graph(object(), pool=None, **mode):
            out = module(*sample_args)
        with torch.cuda.graph(object(), pool=None, **mode):
            torch.autograd.grad(out.sum(), params)
        original, training = module.forward, module.training

        def replay(*args):
            if module.training != training:
                return original(*args)
            self.replays += 1
            return original(*args)

        module.forward = replay
        return module


class OlderTorchGraphs(EagerGraphs):
    """make_graphed_callables as torch had it before capture_error_mode came to it (2.7 to 2.13): it captures in
    torch.cuda.graph's default mode."""

    def __call__(self, module, sample_args, num_warmup_iters=3, allow_unused_input=False, pool=None):
        return self.graphed(module, sample_args, num_warmup_iters, {})


TORCHES = {"torch with capture_error_mode": EagerGraphs, "older torch": OlderTorchGraphs}


class Residual(nn.Module):
    def __init__(self, channels, drop_path):
        super().__init__()
        self.conv, self.drop_path = nn.Conv2d(channels, channels, 1), DropPath(drop_path)

    def forward(self, x):
        return self.drop_path.add_to(x, self.conv(x))


def tiny_net(dropout=0.2, drop_path=0.0):
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        Residual(8, drop_path),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Dropout(dropout),
        nn.Linear(8, 4),
    )


def learner_for(module, model):
    optimizer = build_optimizer(
        model, dict(name="sgd", lr=0.1, momentum=0.9, nesterov=False, weight_decay=1e-4, decay_norm_and_bias=False)
    )
    scheduler = build_scheduler(
        optimizer, 10, 2, dict(name="cosine", warmup_epochs=0.5, warmup_start_ratio=0.1, min_lr_ratio=0.0)
    )
    inputs = Inputs(torch.device("cpu"), (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), channels_last=False)
    return Learner(module, optimizer, scheduler, inputs, Precision(None, "cpu"), label_smoothing=0.1)


@pytest.mark.parametrize("torch_version", TORCHES)
def test_graphed_training_draws_the_masks_eager_training_draws_and_the_warm_up_leaves_no_trace(cuda, torch_version):
    images = torch.randint(0, 256, (6, 8, 3, 12, 12), dtype=torch.uint8)
    labels = torch.randint(0, 4, (6, 8))
    for seed in range(3):  # dropout and drop path on: the warm-up passes' draws must not shift the replays'
        plain, graphed_model = tiny_net(dropout=0.3, drop_path=0.3), tiny_net(dropout=0.3, drop_path=0.3)
        graphs = TORCHES[torch_version]()
        wrapper = GraphedForward(graphed_model, Precision(torch.bfloat16, "cpu").autocast, make_graphed=graphs)
        runs = []
        for module, model in ((plain, plain), (wrapper, graphed_model)):
            learner = learner_for(module, model)
            module.train()
            torch.manual_seed(seed)
            losses = [learner.step(x, y)[0].item() for x, y in zip(images, labels)]
            runs.append((losses, model.state_dict(), torch.rand(1)))
        assert graphs.captures == [(8, 3, 12, 12)] and graphs.replays == 6  # one capture, then every step replays it
        assert runs[0][0] == runs[1][0], seed  # the same losses, step by step
        for key, value in runs[0][1].items():  # weights and BatchNorm statistics: the warm-up passes were undone
            assert torch.equal(value, runs[1][1][key]), key
        assert torch.equal(runs[0][2], runs[1][2])  # and the random stream goes on where eager training's does


@pytest.mark.parametrize("torch_version", TORCHES)
def test_captures_are_thread_local_on_every_torch_so_the_pin_thread_may_allocate_meanwhile(cuda, torch_version, caplog):
    images = torch.randint(0, 256, (4, 8, 3, 12, 12), dtype=torch.uint8)
    labels = torch.randint(0, 4, (4, 8))
    # the emulation first: after a "global" capture (what older torch did) the loader fails at the next batch
    pins, model = PinThread(cuda), tiny_net()
    batches = pins.batches(images, labels)
    next(batches)
    EagerGraphs()(model, (torch.randn(8, 3, 12, 12),))
    with pytest.raises(RuntimeError, match="cudaErrorStreamCaptureUnsupported"):
        next(batches)
    cuda.modes.clear(), cuda.during_capture.clear()

    model, graphs = tiny_net(), TORCHES[torch_version]()
    wrapper = GraphedForward(model, Precision(None, "cpu").autocast, make_graphed=graphs)
    learner, pins = learner_for(wrapper, model), PinThread(cuda)
    wrapper.train()
    with caplog.at_level("INFO", logger="rethink"):
        losses = [learner.step(x, y)[0] for x, y in pins.batches(images, labels)]
    assert len(losses) == 4 and graphs.replays == 4 and not wrapper.failed
    assert cuda.modes == ["thread_local", "thread_local"]  # the forward's capture and the backward's
    assert "captured the training step for batches of (8, 3, 12, 12) (thread_local capture)" in caplog.text
    route = "make_graphed_callables(" if torch_version != "older torch" else "torch.cuda.graph("
    assert capture_route(graphs).startswith(f"thread_local, through {route}")


def test_a_failure_before_the_capture_is_a_warning_and_training_goes_on_eagerly(cuda, caplog):
    def failing(module, sample_args, **kwargs):
        module(*sample_args)  # a warm-up pass (BatchNorm updates) ...
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore detail")  # ... runs out

    model, plain, x = tiny_net(dropout=0), tiny_net(dropout=0).train(), torch.randn(4, 3, 12, 12)
    wrapper = GraphedForward(model, Precision(None, "cpu").autocast, make_graphed=failing).train()
    with caplog.at_level("WARNING", logger="rethink"):
        out = wrapper(x)
    assert torch.equal(out, plain(x)) and wrapper.failed and "forward" not in vars(model)  # as if never tried
    assert (
        "failed before the capture began (OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB)"
        in caplog.text
    )
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in plain.state_dict().items())  # the warm-up undone
    wrapper(torch.randn(4, 3, 12, 12))  # no second attempt


def test_a_failure_inside_the_capture_stops_the_run_with_one_line(cuda):
    class SyncsInTheForward(nn.Module):  # fine eagerly; a capture cannot wait for the GPU
        def forward(self, x):
            if cuda.open:
                raise RuntimeError("CUDA error: operation not permitted when stream is capturing\nmore detail")
            return x

    model = nn.Sequential(SyncsInTheForward(), nn.Flatten(), nn.Linear(3 * 12 * 12, 4))
    wrapper = GraphedForward(model, Precision(None, "cpu").autocast, make_graphed=EagerGraphs()).train()
    with pytest.raises(UserError) as failed:
        wrapper(torch.randn(4, 3, 12, 12))
    assert str(failed.value) == (
        "CUDA graphs: capturing the training step for batches of (4, 3, 12, 12) failed inside the capture (RuntimeError: "
        "CUDA error: operation not permitted when stream is capturing), which leaves CUDA in an undefined state: the run "
        "stops here; trainer.cuda_graphs=false trains without graphs"
    )
    assert torch.cuda.graph == cuda.graph  # torch's own again


def test_graphs_capture_once_per_shape_and_dropout_never_for_a_smaller_batch_or_evaluation(cuda):
    model, graphs = tiny_net(), EagerGraphs()
    wrapper = GraphedForward(model, Precision(None, "cpu").autocast, make_graphed=graphs).train()

    def forward(batch, size=12):
        return wrapper(torch.randn(batch, 3, size, size))

    forward(8), forward(8)
    forward(5)  # an epoch's last, smaller batch: eager
    assert graphs.captures == [(8, 3, 12, 12)] and graphs.replays == 2
    forward(8, size=16)  # a progressive-learning stage: a new image size
    model[6].p = 0.3  # ... and its dropout
    forward(8, size=16)
    assert graphs.captures == [(8, 3, 12, 12), (8, 3, 16, 16), (8, 3, 16, 16)]
    wrapper.eval()
    with torch.no_grad():
        forward(8, size=16), forward(3, size=20)
    assert len(graphs.captures) == 3 and graphs.replays == 4  # evaluation never captures or replays
    assert type(model).forward is nn.Sequential.forward and "forward" not in vars(model)  # the model's own forward back


@pytest.mark.slow
def test_at_most_max_captures_then_eager(cuda):
    graphs = EagerGraphs()
    wrapper = GraphedForward(tiny_net(), Precision(None, "cpu").autocast, make_graphed=graphs).train()
    for size in range(8, 8 + MAX_CAPTURES + 4):
        wrapper(torch.randn(2, 3, size, size))
    assert len(graphs.captures) == MAX_CAPTURES


def graphs_on(monkeypatch, graphs) -> None:
    """The run's CUDA graphs on, on the CPU, captured by `graphs`."""
    monkeypatch.setattr(torch.cuda, "make_graphed_callables", graphs)
    monkeypatch.setattr(fast_paths, "cuda_graphs_choice", lambda *a: fast_paths.Choice(True, "test: on the CPU"))


@pytest.mark.slow
def test_a_run_with_cuda_graphs_captures_once_per_progressive_stage(tmp_path, monkeypatch, cuda, tiny_overrides):
    graphs = EagerGraphs()
    graphs_on(monkeypatch, graphs)
    stages = ["progressive=v2", "progressive.stages=2", "progressive.min_size=16", "trainer.epochs=4"]
    metrics = train(compose_config([*tiny_overrides, *stages]), tmp_path / "run")
    assert metrics["cuda_graphs"] is True
    assert graphs.captures == [(8, 3, 24, 24), (8, 3, 32, 32)]  # one per stage (24 px, then 32), none per batch
    assert graphs.replays == 4 * 4  # every training step of the 4 epochs replayed; validation never


@pytest.mark.slow
def test_a_resumed_epoch_with_cuda_graphs_trains_exactly_what_an_uninterrupted_run_does(
    tmp_path, monkeypatch, cuda, tiny, stop_exits
):
    import rethink.train.loop as loop

    settings = ("trainer.epochs=2", "trainer.limit_train_batches=5")  # B0's dropout and drop path on
    graphs_on(monkeypatch, EagerGraphs())
    whole = train(tiny(*settings), tmp_path / "whole")
    real_step, steps = loop.Learner.step, {"n": 0}

    def step_then_signal(self, images, labels):  # SIGTERM before the third batch of epoch 2
        steps["n"] += 1
        if steps["n"] == 8:
            os.kill(os.getpid(), signal.SIGTERM)
        return real_step(self, images, labels)

    monkeypatch.setattr(loop.Learner, "step", step_then_signal)
    with pytest.raises(SystemExit):
        train(tiny(*settings), tmp_path / "cut")
    monkeypatch.setattr(loop.Learner, "step", real_step)
    graphs = EagerGraphs()
    graphs_on(monkeypatch, graphs)
    resumed = train(tiny(*settings, f"resume={tmp_path / 'cut'}"), tmp_path / "ignored")
    assert graphs.captures == [(8, 3, 32, 32)]  # the resumed run captured again, mid-epoch
    a, b = (load_checkpoint(tmp_path / run / "checkpoints" / "last.pt") for run in ("whole", "cut"))
    assert [r["train_loss"] for r in a["history"]] == [r["train_loss"] for r in b["history"]]
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert resumed["test_acc"] == whole["test_acc"]


# --- on a GPU ----------------------------------------------------------------------------------------

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")


@requires_cuda
def test_on_a_gpu_graph_replayed_steps_match_eager_steps_within_bf16_tolerance():
    from rethink.models import build_model

    cfg = compose_config(["model=b0", "model.width=0.5", "model.depth=0.5"])  # dropout and drop path on
    device = torch.device("cuda")
    torch.manual_seed(0)
    base = build_model(cfg.model, 5).to(device).to(memory_format=torch.channels_last)
    images = torch.randint(0, 256, (8, 16, 3, 64, 64), dtype=torch.uint8, device=device)
    labels = torch.randint(0, 5, (8, 16), device=device)
    losses = []
    for graphed in (False, True):
        model = copy.deepcopy(base)
        precision = Precision(torch.bfloat16, "cuda")
        module = GraphedForward(model, precision.autocast) if graphed else model
        learner = learner_for(module, model)
        learner.inputs = Inputs(device, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), channels_last=True)
        learner.precision = precision
        module.train()
        torch.manual_seed(1)
        losses.append(torch.stack([learner.step(x, y)[0] for x, y in zip(images, labels)]).cpu())
    assert torch.allclose(losses[0], losses[1], rtol=0.05, atol=0.05), losses


@requires_cuda
def test_on_a_gpu_replays_draw_the_dropout_and_drop_path_masks_eager_steps_draw_bit_for_bit():
    class Masks(nn.Module):  # its output is its input times the masks: exact in fp32
        def __init__(self):
            super().__init__()
            self.weight, self.drop_path = nn.Parameter(torch.ones(1)), DropPath(0.5)

        def forward(self, x):
            return nn.functional.dropout(self.drop_path(x * self.weight), 0.5)

    x = torch.ones(64, 3, 8, 8, device="cuda")
    outputs = []
    for module in (Masks().cuda(), GraphedForward(Masks().cuda(), Precision(None, "cuda").autocast)):
        module.train()
        torch.manual_seed(2)
        outputs.append([module(x).detach().clone() for _ in range(4)] + [torch.rand(1, device="cuda")])
    assert all(torch.equal(a, b) for a, b in zip(*outputs))


@requires_cuda
def test_on_a_gpu_a_failure_inside_the_capture_stops_the_run_and_gives_the_stream_back():
    class WaitsForTheGpu(nn.Module):  # fine eagerly; inside a capture, .item() is an error
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(8, 2)

        def forward(self, x):
            return self.linear(x) * (1 + 0 * x.sum().item())

    wrapper = GraphedForward(WaitsForTheGpu().cuda(), Precision(None, "cuda").autocast).train()
    with pytest.raises(UserError, match="failed inside the capture .* the run stops here; trainer.cuda_graphs=false"):
        wrapper(torch.randn(4, 8, device="cuda"))
    assert torch.cuda.current_stream() == torch.cuda.default_stream()


@requires_cuda
def test_on_a_gpu_a_run_with_graphs_and_the_cpu_loader_trains_on_with_its_pin_thread(tmp_path, tiny_overrides):
    overrides = [o for o in tiny_overrides if not o.startswith(("trainer.device", "data.num_workers"))]
    cpu_loader = [
        "data.on_gpu=false",
        "data.num_workers=2",
        "data.augment=randaugment",
        "trainer.limit_train_batches=null",
    ]
    run = tmp_path / "run"
    metrics = train(compose_config([*overrides, "trainer.device=cuda", "trainer.cuda_graphs=true", *cpu_loader]), run)
    assert metrics["cuda_graphs"] is True and metrics["data_on_gpu"] is False
    assert "(thread_local capture)" in (run / "run.log").read_text()


@requires_cuda
@pytest.mark.parametrize("graphs", [False, True])
def test_on_a_gpu_the_training_step_takes_no_more_than_its_reserve(graphs):
    from rethink.models import build_model

    model = build_model(compose_config(["model=b0", "model.width=0.5", "model.depth=0.5"]).model, 5)
    model = model.cuda().to(memory_format=torch.channels_last)
    reserve = fast_paths.step_reserve(model, 16, 96, channels_last=True, graphs=graphs)
    precision = Precision(torch.bfloat16, "cuda")
    module = GraphedForward(model, precision.autocast) if graphs else model
    learner = learner_for(module, model)
    learner.inputs = Inputs(torch.device("cuda"), (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), channels_last=True)
    learner.precision = precision
    module.train()
    torch.cuda.synchronize()
    held = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    images = torch.randint(0, 256, (3, 16, 3, 96, 96), dtype=torch.uint8, device="cuda")
    for x in images:  # gradients and momentum appear at the first step; with graphs, the capture's pool too
        learner.step(x, torch.zeros(16, dtype=torch.long, device="cuda"))
    torch.cuda.synchronize()
    rise = torch.cuda.max_memory_allocated() - held - images.numel()
    assert 0 < rise <= reserve, (rise, reserve)
