"""task=export ckpt=PATH: the model as `model.pt2` (torch.export) and, with the `onnx` extra installed,
`model.onnx`; each checked against the PyTorch model on a sample batch, with `preprocess.json`
saying how to feed them: step by step, what the run's val/test splits and task=predict do to a file."""

import importlib.util
import logging
from pathlib import Path

import torch
from omegaconf import DictConfig

from ..atomic import atomic_write_json
from ..data import describe_eval_preprocessing
from ..errors import UserError
from ..train.checkpoint import load_checkpoint, model_from_checkpoint
from .restore import inference_config

log = logging.getLogger("rethink")


def export(cfg: DictConfig, run_dir: Path) -> dict:
    if not cfg.ckpt:
        raise UserError("task=export needs ckpt=PATH, a checkpoint such as <run dir>/checkpoints/best.pt")
    state = load_checkpoint(cfg.ckpt)
    run_cfg, _ = inference_config(state, cfg)
    model = model_from_checkpoint(state, use_ema=cfg.eval.ema)
    size = run_cfg.model.eval_size
    torch.manual_seed(0)
    # a batch of at least 2 to trace with: torch.export would specialise a batch of 1 to a fixed size
    sample = torch.randn(max(2, cfg.export.batch_size), 3, size, size)
    with torch.no_grad():
        expected = model(sample)

    run_dir.mkdir(parents=True, exist_ok=True)
    checks = {}
    batch = torch.export.Dim("batch", min=1, max=4096)
    program = torch.export.export(model, (sample,), dynamic_shapes={"x": {0: batch}})
    pt2 = run_dir / "model.pt2"
    torch.export.save(program, pt2)
    with torch.no_grad():
        checks["model.pt2"] = _max_diff(torch.export.load(pt2).module()(sample), expected)

    if cfg.export.onnx and importlib.util.find_spec("onnx") and importlib.util.find_spec("onnxscript"):
        onnx_path = run_dir / "model.onnx"
        torch.onnx.export(
            model,
            (sample,),
            str(onnx_path),
            input_names=["images"],
            output_names=["logits"],
            dynamic_shapes={"x": {0: batch}},
            dynamo=True,
            verbose=False,
        )
        if importlib.util.find_spec("onnxruntime"):
            import onnxruntime

            session = onnxruntime.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
            checks["model.onnx"] = _max_diff(
                torch.from_numpy(session.run(None, {"images": sample.numpy()})[0]), expected
            )
        else:
            checks["model.onnx"] = None
            log.warning(
                "model.onnx written but not checked: install onnxruntime (pip install -e '.[onnx]') to check it"
            )
    elif cfg.export.onnx:
        log.info("no model.onnx: the onnx extra is not installed (pip install -e '.[onnx]')")

    preprocess = {
        **describe_eval_preprocessing(run_cfg.model, run_cfg.data),
        "input": "the cropped uint8 RGB image as float32 NCHW, values scaled to [0, 1], then (x - mean) / std",
        "mean": list(run_cfg.model.mean),
        "std": list(run_cfg.model.std),
        "classes": list(state["classes"]),
        "output": "logits, one per class in the order of `classes`",
    }
    atomic_write_json(run_dir / "preprocess.json", preprocess)
    failed = {name: diff for name, diff in checks.items() if diff is not None and diff > cfg.export.atol}
    report = {
        "checkpoint": str(cfg.ckpt),
        "files": sorted(checks),
        "max_abs_diff": checks,
        "atol": cfg.export.atol,
        "ok": not failed,
    }
    atomic_write_json(run_dir / "export.json", report)
    for name, diff in checks.items():
        print(
            f"{run_dir / name}: "
            + ("not checked" if diff is None else f"max |difference| {diff:.2e} on a batch of {len(sample)}")
        )
    if failed:
        raise UserError(f"export: outputs differ from the PyTorch model beyond export.atol={cfg.export.atol}: {failed}")
    return report


def _max_diff(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return (actual.float() - expected.float()).abs().max().item()
