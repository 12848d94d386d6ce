"""What a training run reports as it goes: TensorBoard (its HPARAMS session, a grid of training images, the
scalars of every epoch, the test scores and confusion matrix), the log's lines, and metrics.json at the end.
Rank 0 alone writes; the other processes of a torchrun report to a writer that writes nothing."""

import csv
import io
import logging
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
from omegaconf import OmegaConf
from torchvision.utils import make_grid

from ..atomic import atomic_write_json, atomic_write_text
from ..config import value, what_the_run_is
from . import progressive as progressive_learning
from . import provenance
from .checkpoint import Progress
from .metrics import confusion_figure
from .runtime import peak_memory_mb
from .session import Session
from .tensorboard import SILENT_WRITER, log_session_end, log_session_start, open_writer

log = logging.getLogger("rethink")

TEST_RESULTS = "test_predictions.csv"
TEST_RESULTS_FIELDS = ("image", "label", "predicted")


class Report:
    """One run's TensorBoard writer, and the lines and files made from what the run reached."""

    def __init__(self, session: Session, writer):
        self.session, self.writer = session, writer
        self.provenance: dict = {}  # what the run's numbers rest on (train/provenance.py), from its start

    def started(self, run, resumed: bool) -> None:
        """Every start (a resume too) records the run's effective config in run_config.yaml and opens its HPARAMS
        session with it (a resume's earlier one was dropped: train/tensorboard.py), so that a run continued for
        more epochs is filed under its new length; a new run shows its first training images; the log says where
        it starts."""
        s, cfg = self.session, self.session.cfg
        self.provenance = provenance.provenance(s.device, s.precision.name, run.data.fingerprint)
        if s.world.is_main:
            atomic_write_text(s.run_dir / "run_config.yaml", OmegaConf.to_yaml(OmegaConf.create(run.config)))
            self.provenance = provenance.record(s.run_dir, self.provenance)
        log_session_start(self.writer, {**hparams(s, run, run.layout), **provenance.hparams(self.provenance)})
        if not resumed and cfg.trainer.image_grid:
            self.writer.add_image("train/images", image_grid(run.data.train), 0)
        data = run.data
        log.info(
            f"{'resuming' if resumed else 'training'} {cfg.model.name} ({run.params:,} params, {run.gmacs:.2f} GMACs) on "
            f"{value(cfg.data.name)} ({len(data.train)}/{len(data.val)}/{len(data.test)} images, {counted(len(data.classes), 'class', 'classes')}), "
            f"{device_line(s)}, epochs {run.progress.epoch + 1}-{cfg.trainer.epochs}, run dir {s.run_dir}"
        )
        if s.device.type == "cuda":
            log.info(f"fast paths: {run.fast.line()}")

    def epoch(self, record: dict, progress: Progress) -> None:
        """An epoch's scalars, flushed before its checkpoint is written (a kill between the two re-runs the epoch,
        logged once), and its log line."""
        log_epoch(self.writer, record, progress.best_val_acc)
        self.writer.flush()

    def finished(self, run, test, best_epoch: int) -> dict:
        """The test scores in TensorBoard; metrics.json written; returns the metrics."""
        epoch, classes = run.progress.epoch, run.data.classes
        self.writer.add_scalar("test/acc", test.acc, epoch)
        self.writer.add_scalar("test/loss", test.loss, epoch)
        self.writer.add_figure(
            "test/confusion_matrix", confusion_figure(test.confusion, classes, f"test, epoch {best_epoch}"), epoch
        )
        result = {**metrics(self.session, run, test), **self.provenance}
        if self.session.world.is_main:
            atomic_write_text(self.session.run_dir / TEST_RESULTS, test_results(run.data.test_names, test))
            atomic_write_json(self.session.run_dir / "metrics.json", result)
        log.info(
            f"test acc {test.acc:.4f} (best checkpoint, epoch {run.progress.best_epoch}); wrote {self.session.run_dir / 'metrics.json'}"
        )
        return result


@contextmanager
def open_report(session: Session, resumed_at: int | None) -> Iterator[Report]:
    """A Report for the run; `resumed_at`: the epoch a resume continues after (its later events are dropped,
    its earlier metrics.json set aside). On the way out the HPARAMS session ends as finished or failed."""
    main = session.world.is_main
    if resumed_at is not None and main:
        set_aside_earlier_metrics(session.run_dir, resumed_at)
    writer = open_writer(session.run_dir, resume_step=resumed_at) if main else SILENT_WRITER
    ok = False
    try:
        yield Report(session, writer)
        ok = True
    finally:
        log_session_end(writer, ok)
        writer.close()


def set_aside_earlier_metrics(run_dir: Path, epochs: int) -> None:
    """A run continued past the epochs it was scored at: its old metrics.json and test_predictions.csv (kept as
    metrics.epoch<N>.json, test_predictions.epoch<N>.csv) no longer describe the run, which gets new ones when it
    finishes."""
    for name in ("metrics.json", TEST_RESULTS):
        scored = run_dir / name
        if scored.is_file():
            scored.replace(scored.with_name(f"{scored.stem}.epoch{epochs}{scored.suffix}"))


def test_results(names: list[str], test) -> str:
    """test_predictions.csv: each test image (named as in splits.csv), its true class and the predicted one, in
    the test split's order; task=compare bootstraps over them."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(TEST_RESULTS_FIELDS)
    writer.writerows(zip(names, test.labels.tolist(), test.predicted.tolist()))
    return out.getvalue()


def epoch_line(record: dict, progress: Progress, epochs: int) -> str:
    ema = f" (ema {record['val_ema_acc']:.4f})" if "val_ema_acc" in record else ""
    return (
        f"epoch {record['epoch']}/{epochs}  train loss {record['train_loss']:.4f} acc {record['train_acc']:.4f}  "
        f"val loss {record['val_loss']:.4f} acc {record['val_acc']:.4f}{ema}  best {progress.best_val_acc:.4f} @{progress.best_epoch}  "
        f"lr {record['lr']:.3g}  {record['train_img_s']:.0f} img/s  {record['epoch_s']:.1f}s" + unsettled_note(record)
    )


def unsettled_note(record: dict) -> str:
    """Why a val loss can be far above the train loss early on (1847 against 0.83 after 8 steps of B0 on 32 images): the
    network validates in eval mode, normalised by BatchNorm's running statistics, and after few steps those are still
    far from the batches' own (training normalises by them); through every layer the mismatch compounds."""
    if record["val_loss"] > 10 and record["val_loss"] > 10 * record["train_loss"]:
        return "  (val loss >> train loss: validation uses BatchNorm's running statistics, not settled after few steps yet)"
    return ""


def log_epoch(writer, record: dict, best_val_acc: float) -> None:
    step = record["epoch"]
    writer.add_scalar("train/loss", record["train_loss"], step)
    writer.add_scalar("train/acc", record["train_acc"], step)
    writer.add_scalar("val/loss", record["val_loss"], step)
    writer.add_scalar("val/acc", record["val_acc"], step)
    writer.add_scalar("val/acc_best", best_val_acc, step)
    if "val_ema_acc" in record:
        writer.add_scalar("val_ema/loss", record["val_ema_loss"], step)
        writer.add_scalar("val_ema/acc", record["val_ema_acc"], step)
    writer.add_scalar("lr", record["lr"], step)
    writer.add_scalar("time/epoch_s", record["epoch_s"], step)
    writer.add_scalar("throughput/train_img_s", record["train_img_s"], step)
    for key in progressive_learning.SCALARS:  # with progressive learning: the epoch's image size and regularisation
        if key in record:
            writer.add_scalar(f"train/{key}", record[key], step)


def metrics(session: Session, run, test) -> dict:
    """metrics.json: what the run reached, what it cost, and where it ran."""
    progress, world = run.progress, session.world
    peak_mb, peak_kind = peak_memory_mb(session.device)
    last = progress.history[-1]
    return dict(
        best_val_acc=progress.best_val_acc,
        best_epoch=progress.best_epoch,
        final_val_acc=last.get("val_ema_acc", last["val_acc"]),
        final_train_loss=last["train_loss"],
        test_acc=test.acc,
        test_loss=test.loss,
        test_images=test.images,
        val_images=last.get("val_images"),
        weights="ema" if run.learner.ema is not None else "model",
        epochs=progress.epoch,
        params=run.params,
        gmacs=round(run.gmacs, 4),
        train_time_s=round(progress.train_time_s, 2),
        train_img_s=round(progress.train_images / progress.train_time_s, 1) if progress.train_time_s else 0.0,
        peak_memory_mb=round(peak_mb, 1),
        peak_memory=peak_kind,
        device=str(session.device),
        precision=session.precision.name,
        cpu_threads=session.cpu_threads,
        **run.fast_paths_used().record(),
        world_size=world.world_size,
        global_batch=session.cfg.data.batch_size * world.world_size,
        model=session.cfg.model.name,
        seed=session.cfg.seed,
    )


def hparams(session: Session, run, layout: str) -> dict:
    """What the run is, for TensorBoard's HPARAMS table: each what-key of its config and its seed under the names
    the command line and task=compare use (`model.name`, `model.stages.3.block`, `optimizer.lr`, `seed`; None as
    "null"), so that the hparams config a comparison writes (tasks/compare_tensorboard.py) names them; then what
    follows from them: the stage layout's name (`stages`, `+edits` when the command line changed its stages), one
    column per stage as built (`stage_1 = mbconv e6 k3 s2 c24 x2 se0.25`: block, expansion, kernel, stride, output
    channels, repeats, squeeze-excite ratio, after width and depth scaling), the processes and the global batch, params, GMACs and
    the progressive schedule's spans."""
    cfg, world, spec = session.cfg, session.world, run.network.model.spec
    keys = {name: "null" if v is None else v for name, v in what_the_run_is(cfg).items()}
    stages = {
        f"stage_{i}": f"{s.block} e{s.expand:g} k{s.kernel} s{s.stride} c{s.out} x{s.repeats} se{s.se:g}"
        for i, s in enumerate(spec.stages)
    }
    return {
        **keys,
        "stages": layout,
        **stages,
        "world_size": world.world_size,
        "global_batch": cfg.data.batch_size * world.world_size,
        "params": run.params,
        "gmacs": round(run.gmacs, 4),
        **progressive_learning.hparams(cfg),
    }


def device_line(session: Session) -> str:
    if session.device.type == "cpu":
        return f"cpu ({counted(session.cpu_threads, 'thread')}), {session.precision.name}"
    return f"{session.device}, {session.precision.name}"


def counted(n: int, noun: str, plural: str = "") -> str:
    """`1 thread`, `2 threads`; `plural` where it is not noun + s."""
    return f"{n} {noun if n == 1 else plural or noun + 's'}"


def image_grid(dataset, count: int = 16) -> torch.Tensor:
    """The first augmented training images, as the model sees them before normalisation."""
    images = [dataset[i][0] for i in range(min(count, len(dataset)))]
    return make_grid(torch.stack(images), nrow=8)
