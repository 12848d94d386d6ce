"""GPU fast paths: what every `auto` decides (trainer.compile, cuda_graphs, cudnn_benchmark, data.on_gpu), the
CUDA-graph wrapper's bookkeeping on the CPU (with an eager stand-in for torch.cuda.make_graphed_callables),
and on a GPU, graph-replayed training against the plain path step by step."""

import copy
import re

import pytest
import torch
from torch import nn

from rethink.config import validate
from rethink.errors import UserError
from rethink.hydra_app import compose_config
from rethink.tasks.train import train
from rethink.train import fast_paths
from rethink.train.cuda_graphs import MAX_CAPTURES, GraphedForward
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
    for change in (dict(device_type="cpu"), dict(batch=fast_paths.GRAPHS_BATCH_MAX + 1), dict(world_size=2),
                   dict(grad_accumulation=2), dict(grad_checkpointing=True), dict(compiled=True)):
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


def test_data_on_gpu_auto_needs_a_gpu_the_batched_augmentation_and_room():
    gib = 2**30

    def needs(n):
        return lambda: n

    def unasked():
        raise AssertionError("the store's size was read where nothing depends on it")

    assert data_on_gpu_choice("auto", "cuda", "flip_crop", needs(1 * gib), 10 * gib).on
    assert data_on_gpu_choice("auto", "cuda", "none", needs(1 * gib), 10 * gib).on
    assert not data_on_gpu_choice("auto", "cuda", "flip_crop", needs(6 * gib), 10 * gib).on  # over half the free memory
    assert not data_on_gpu_choice("auto", "cuda", "randaugment", unasked, 10 * gib).on
    assert not data_on_gpu_choice("auto", "cpu", "flip_crop", unasked, None).on
    assert not data_on_gpu_choice(False, "cuda", "flip_crop", unasked, 10 * gib).on
    assert data_on_gpu_choice(True, "cuda", "flip_crop", unasked, 10 * gib).on
    with pytest.raises(UserError, match=r"data\.on_gpu=true needs a CUDA device and data\.augment=flip_crop or none \(not randaugment\)"):
        data_on_gpu_choice(True, "cpu", "randaugment", unasked, None)


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

class EagerGraphs:
    """torch.cuda.make_graphed_callables' contract without a GPU: warm-up passes (forward and autograd.grad,
    which update BatchNorm's statistics as the real ones do), then the module's forward swapped for one that
    'replays' (here: runs the original forward) in the training mode it was captured in."""

    def __init__(self):
        self.captures, self.replays = [], 0

    def __call__(self, module, sample_args, num_warmup_iters=3, capture_error_mode="global"):
        assert not (torch.is_autocast_enabled() and torch.is_autocast_cache_enabled())  # as torch requires
        assert capture_error_mode == "thread_local"  # the pin-memory thread may call CUDA meanwhile
        self.captures.append(tuple(sample_args[0].shape))
        for _ in range(num_warmup_iters):
            out = module(*sample_args)
            torch.autograd.grad(out.sum(), [p for p in module.parameters() if p.requires_grad])
        original, training = module.forward, module.training

        def replay(*args):
            if module.training != training:
                return original(*args)
            self.replays += 1
            return original(*args)

        module.forward = replay
        return module


def tiny_net(dropout=0.2):
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Dropout(dropout), nn.Linear(8, 4))


def learner_for(module, model):
    optimizer = build_optimizer(model, dict(name="sgd", lr=0.1, momentum=0.9, nesterov=False, weight_decay=1e-4,
                                            decay_norm_and_bias=False))
    scheduler = build_scheduler(optimizer, 10, 2, dict(name="cosine", warmup_epochs=0.5, warmup_start_ratio=0.1, min_lr_ratio=0.0))
    inputs = Inputs(torch.device("cpu"), (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), channels_last=False)
    return Learner(module, optimizer, scheduler, inputs, Precision(None, "cpu"), label_smoothing=0.1)


def test_graphed_training_equals_plain_training_and_the_warm_up_leaves_no_trace():
    images = torch.randint(0, 256, (6, 8, 3, 12, 12), dtype=torch.uint8)
    labels = torch.randint(0, 4, (6, 8))
    plain, graphed_model = tiny_net(dropout=0), tiny_net(dropout=0)  # (the warm-up passes draw random numbers)
    graphs = EagerGraphs()
    wrapper = GraphedForward(graphed_model, Precision(torch.bfloat16, "cpu").autocast, make_graphed=graphs)
    runs = []
    for module, model in ((plain, plain), (wrapper, graphed_model)):
        learner = learner_for(module, model)
        module.train()
        torch.manual_seed(1)
        losses = [learner.step(x, y)[0].item() for x, y in zip(images, labels)]
        runs.append((losses, model.state_dict()))
    assert graphs.captures == [(8, 3, 12, 12)] and graphs.replays == 6  # one capture, then every step replays it
    assert runs[0][0] == runs[1][0]  # the same losses, step by step
    for key, value in runs[0][1].items():  # weights and BatchNorm statistics: the warm-up passes were undone
        assert torch.equal(value, runs[1][1][key]), key


def test_graphs_capture_once_per_shape_and_dropout_never_for_a_smaller_batch_or_evaluation():
    model, graphs = tiny_net(), EagerGraphs()
    wrapper = GraphedForward(model, Precision(None, "cpu").autocast, make_graphed=graphs).train()

    def forward(batch, size=12):
        return wrapper(torch.randn(batch, 3, size, size))

    forward(8), forward(8)
    forward(5)  # an epoch's last, smaller batch: eager
    assert graphs.captures == [(8, 3, 12, 12)] and graphs.replays == 2
    forward(8, size=16)  # a progressive-learning stage: a new image size
    model[5].p = 0.3  # ... and its dropout
    forward(8, size=16)
    assert graphs.captures == [(8, 3, 12, 12), (8, 3, 16, 16), (8, 3, 16, 16)]
    wrapper.eval()
    with torch.no_grad():
        forward(8, size=16), forward(3, size=20)
    assert len(graphs.captures) == 3 and graphs.replays == 4  # evaluation never captures or replays
    assert type(model).forward is nn.Sequential.forward and "forward" not in vars(model)  # the model's own forward back


def test_a_failed_capture_is_a_warning_and_training_goes_on_eagerly(caplog):
    def failing(module, sample_args, **kwargs):
        EagerGraphs()(module, sample_args, **kwargs)  # warm-up passes (BatchNorm updates), forward swapped ...
        raise RuntimeError("operation not permitted when stream is capturing\nmore detail")  # ... then the capture fails

    model, plain, x = tiny_net(dropout=0), tiny_net(dropout=0).train(), torch.randn(4, 3, 12, 12)
    wrapper = GraphedForward(model, Precision(None, "cpu").autocast, make_graphed=failing).train()
    with caplog.at_level("WARNING", logger="rethink"):
        out = wrapper(x)
    assert torch.equal(out, plain(x)) and wrapper.failed and "forward" not in vars(model)  # as if never tried
    assert "capturing the training step failed (RuntimeError: operation not permitted when stream is capturing)" in caplog.text
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in plain.state_dict().items())  # the warm-up undone
    wrapper(torch.randn(4, 3, 12, 12))  # no second attempt


def test_at_most_max_captures_then_eager():
    graphs = EagerGraphs()
    wrapper = GraphedForward(tiny_net(), Precision(None, "cpu").autocast, make_graphed=graphs).train()
    for size in range(8, 8 + MAX_CAPTURES + 4):
        wrapper(torch.randn(2, 3, size, size))
    assert len(graphs.captures) == MAX_CAPTURES


def test_a_run_with_cuda_graphs_captures_once_per_progressive_stage(tmp_path, monkeypatch, tiny_overrides):
    graphs = EagerGraphs()
    monkeypatch.setattr(torch.cuda, "make_graphed_callables", graphs)
    monkeypatch.setattr(fast_paths, "cuda_graphs_choice", lambda *a: fast_paths.Choice(True, "test: on the CPU"))
    metrics = train(compose_config([*tiny_overrides, "progressive=v2", "progressive.stages=2", "progressive.min_size=16",
                                    "trainer.epochs=4"]), tmp_path / "run")
    assert metrics["cuda_graphs"] is True
    assert graphs.captures == [(8, 3, 24, 24), (8, 3, 32, 32)]  # one per stage (24 px, then 32), none per batch
    assert graphs.replays == 4 * 4  # every training step of the 4 epochs replayed; validation never


# --- on a GPU ----------------------------------------------------------------------------------------

@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
def test_on_a_gpu_graph_replayed_steps_match_eager_steps_within_bf16_tolerance():
    from rethink.models import build_model

    cfg = compose_config(["model=b0", "model.width=0.5", "model.depth=0.5"])
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
