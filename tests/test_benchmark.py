"""task=benchmark's training step at a tiny size: what benchmark.json holds, and its one-line errors
(not the speed: speed claims live in the benchmark's own ratios, README "Performance")."""

import json

import pytest
import torch

from rethink.errors import UserError
from rethink.hydra_app import compose_config
from rethink.tasks.benchmark import benchmark
from rethink.tasks.benchmark_step import batch_size, variant_config

TINY = [
    "task=benchmark",
    "data=synthetic",
    "model.train_size=32",
    "model.eval_size=32",
    "data.batch_size=4",
    "benchmark.rounds=2",
    "benchmark.steps=1",
    "benchmark.warmup_steps=1",
    "benchmark.images=4",
    "benchmark.warmup=1",
    "trainer.cpu_threads=1",
    "trainer.device=cpu",
]
RUN_FIELDS = {
    "settings",
    "img_s",
    "img_s_min",
    "img_s_max",
    "img_s_rounds",
    "img_per_cpu_s",
    "peak_memory_mb",
    "held_mb",
    "saved_for_backward_mb",
    "first_step_s",
}
SETTINGS = {
    "model",
    "loop",
    "memory_format",
    "precision",
    "compile",
    "cuda_graphs",
    "ema",
    "grad_accumulation",
    "grad_checkpointing",
}


@pytest.mark.slow
def test_benchmark_times_ours_torchvision_and_variants_and_writes_them(tmp_path, capsys):
    cfg = compose_config([*TINY, "benchmark.variants=[grad_checkpointing:true,grad_accumulation:2+ema:true]"])
    result = benchmark(cfg, tmp_path)
    assert json.loads((tmp_path / "benchmark.json").read_text()) == result
    assert {"cpu", "torch", "torchvision", "training", "input_pipeline"} <= set(result)
    rates = result["input_pipeline"]["samples_per_s"]
    assert set(rates) == {"reference", "cached", "cached_cpu_normalize", "files", "packed"}
    assert all(rate > 0 for rate in rates.values())
    training = result["training"]
    assert (training["model"], training["image_size"], training["batch_size"], training["device"]) == (
        "b0",
        32,
        4,
        "cpu",
    )
    assert (training["rounds"], training["steps_per_round"], training["cpu_threads"], training["torchvision"]) == (
        2,
        1,
        1,
        "timed",
    )
    assert training["cudnn_benchmark"] is False  # what cuDNN's search was (never on the CPU)
    runs = training["runs"]
    assert list(runs) == [
        "ours",
        "torchvision",
        "torchvision_our_settings",
        "ours+grad_checkpointing:true",
        "ours+grad_accumulation:2+ema:true",
    ]
    for run in runs.values():
        assert set(run) == RUN_FIELDS and set(run["settings"]) == SETTINGS
        assert (
            run["img_s"] > 0 and len(run["img_s_rounds"]) == 2 and run["img_s_min"] <= run["img_s"] <= run["img_s_max"]
        )
        assert run["peak_memory_mb"] is None  # no peak on the CPU
    assert runs["ours"]["settings"] == dict(
        model="rethink",
        loop="Learner",
        memory_format="channels_last",
        precision="fp32",
        compile=False,
        cuda_graphs=False,
        ema=False,
        grad_accumulation=1,
        grad_checkpointing=False,
    )
    assert (
        runs["torchvision"]["settings"]["loop"] == "plain"
        and runs["torchvision"]["settings"]["memory_format"] == "NCHW"
    )
    assert runs["torchvision_our_settings"]["settings"]["memory_format"] == "channels_last"
    assert runs["ours+grad_checkpointing:true"]["settings"]["grad_checkpointing"] is True
    assert (
        runs["ours+grad_accumulation:2+ema:true"]["settings"]["grad_accumulation"] == 2
        and runs["ours+grad_accumulation:2+ema:true"]["settings"]["ema"]
    )
    assert set(training["ratios"]) == {
        "ours/torchvision",
        "ours/torchvision_our_settings",
        "ours+grad_checkpointing:true/ours",
        "ours+grad_accumulation:2+ema:true/ours",
    }
    assert all(ratio["speed"] > 0 for ratio in training["ratios"].values())
    if runs["ours"]["saved_for_backward_mb"] is not None:  # glibc's allocation count (Linux)
        assert training["ratios"]["ours+grad_checkpointing:true/ours"]["saved_for_backward"] < 0.5
        assert training["ratios"]["ours+grad_accumulation:2+ema:true/ours"]["saved_for_backward"] < 0.75
    printed = capsys.readouterr().out
    assert "a pack's shards" in printed
    assert (
        "training step: b0, 32 px" in printed and "torchvision_our_settings" in printed and "input pipeline" in printed
    )


def test_variant_values_are_read_as_the_command_line_reads_them():
    cfg = compose_config(TINY)
    changed = variant_config(cfg, "cuda_graphs:false+compile:true+grad_accumulation:4+amp:bf16").trainer
    assert (changed.cuda_graphs, changed.compile, changed.grad_accumulation, changed.amp.value) == (
        False,
        True,
        4,
        "bf16",
    )
    with pytest.raises(UserError, match=r"trainer\.compile=maybe: must be auto, true or false"):
        variant_config(cfg, "compile:maybe")


def test_torchvision_is_left_out_when_the_layout_differs(tmp_path):
    cfg = compose_config([*TINY, "model.stages.3.block=fused", "benchmark.pipeline=false", "benchmark.rounds=1"])
    training = benchmark(cfg, tmp_path)["training"]
    assert list(training["runs"]) == ["ours"] and training["ratios"] == {}
    assert "stage layout differs" in training["torchvision"]
    assert "input_pipeline" not in json.loads((tmp_path / "benchmark.json").read_text())


@pytest.mark.slow
def test_a_run_out_of_memory_is_reported_and_the_others_go_on(tmp_path, monkeypatch):
    from rethink.tasks import benchmark_step

    warm_up = benchmark_step._warm_up

    def no_memory_for_ema(run, steps, device):
        if run.name == "ours+ema:true":
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        warm_up(run, steps, device)

    monkeypatch.setattr(benchmark_step, "_warm_up", no_memory_for_ema)
    cfg = compose_config(
        [
            *TINY,
            "benchmark.pipeline=false",
            "benchmark.torchvision=false",
            "benchmark.variants=[ema:true,grad_checkpointing:true]",
        ]
    )
    training = benchmark(cfg, tmp_path)["training"]
    assert training["runs"]["ours+ema:true"] == {"settings": {}, "error": "out of memory"}
    assert training["runs"]["ours+grad_checkpointing:true"]["img_s"] > 0 and set(training["ratios"]) == {
        "ours+grad_checkpointing:true/ours"
    }


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            ["benchmark.variants=[nosuch:1]"],
            r"benchmark.variants: 'nosuch:1': each setting is key:value with key one of amp, channels_last, compile",
        ),
        (
            ["benchmark.variants=[grad_accumulation:many]"],
            r"'grad_accumulation:many': trainer.grad_accumulation cannot be 'many'",
        ),
        (
            ["benchmark.variants=[grad_accumulation:0]"],
            r"'grad_accumulation:0': trainer.grad_accumulation=0: must be at least 1",
        ),
        (
            ["benchmark.variants=[grad_accumulation:3]"],
            r"benchmark \(ours\+grad_accumulation:3\): a batch of 4 images does not split",
        ),
        (["benchmark.variants=[amp:fp16]"], r"benchmark \(ours\+amp:fp16\): trainer.amp=fp16 needs a CUDA device"),
        (["trainer.amp=fp16"], r"^trainer.amp=fp16 needs a CUDA device"),
        (["benchmark.training=false", "benchmark.pipeline=false"], "nothing to time"),
    ],
)
def test_mistakes_are_one_line_errors_before_anything_is_timed(tmp_path, overrides, message):
    with pytest.raises(UserError, match=message) as error:
        benchmark(compose_config([*TINY, *overrides]), tmp_path)
    assert "\n" not in str(error.value) and not (tmp_path / "benchmark.json").exists()


def test_gpu_preset_times_the_issue_set_in_one_sweep():
    for model, size, batch in (("b0", 224, 256), ("v2_s", 300, 128), ("v2_l", 384, 64)):
        cfg = compose_config(["experiment=benchmark_gpu", f"model={model}"])
        assert (cfg.task.value, cfg.trainer.device, cfg.model.train_size, batch_size(cfg)) == (
            "benchmark",
            "cuda",
            size,
            batch,
        )
        assert {"grad_checkpointing:true", "grad_accumulation:4", "compile:true", "channels_last:false"} <= set(
            cfg.benchmark.variants
        )
    assert (
        batch_size(compose_config(["experiment=benchmark_gpu", "model=v2_l", "benchmark.batch_size=16"])) == 16
    )  # the command line wins


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: peak memory is measured on GPUs only")
def test_gpu_peak_memory_and_what_checkpointing_saves(tmp_path):
    cfg = compose_config(
        [
            *TINY[:-1],
            "trainer.device=cuda",
            "benchmark.pipeline=false",
            "model.train_size=128",
            "data.batch_size=8",
            "benchmark.variants=[grad_checkpointing:true]",
        ]
    )
    training = benchmark(cfg, tmp_path)["training"]
    ours, saver = training["runs"]["ours"], training["runs"]["ours+grad_checkpointing:true"]
    assert training["memory"] == "cuda_allocated" and ours["peak_memory_mb"] > 0 and "img_per_cpu_s" not in ours
    assert (
        saver["peak_memory_mb"] < ours["peak_memory_mb"]
        and saver["saved_for_backward_mb"] < ours["saved_for_backward_mb"] / 2
    )
