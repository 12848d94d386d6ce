"""TensorBoard: one writer per run directory, an HPARAMS session per run, and clean resumes.

`SummaryWriter.add_hparams` writes into a new sub-run, which splits a run in two and breaks the
comparison across a sweep; we write the session's start and end summaries into the run's own
events instead. TensorBoard then infers the HPARAMS table (hyperparameters from the session starts,
metrics from the scalar tags) across every run under `--logdir outputs`.
"""

import time
from pathlib import Path
from typing import Mapping

from tensorboard.backend.event_processing.event_file_loader import RawEventFileLoader
from tensorboard.compat.proto import event_pb2
from tensorboard.compat.proto.summary_pb2 import Summary, SummaryMetadata
from tensorboard.plugins.hparams import api_pb2, metadata, plugin_data_pb2
from tensorboard.summary.writer.record_writer import RecordWriter
from torch.utils.tensorboard import SummaryWriter

# What a run writes when it ends, and its HPARAMS session's start: a resumed run writes them again, its start
# with the config it continues with.
END_OF_RUN_TAGS = ("test/", metadata.SESSION_END_INFO_TAG, metadata.SESSION_START_INFO_TAG)


def open_writer(run_dir: Path, resume_step: int | None = None) -> SummaryWriter:
    """A writer for `run_dir`. When resuming after epoch `resume_step`, events logged after that
    step (an epoch that was logged but not checkpointed before a crash), the end of the earlier
    session (its test scores, its HPARAMS session end) and its HPARAMS session start are dropped first,
    so the continued run has exactly one point per step, one session and one end."""
    if resume_step is not None:
        truncate_events(run_dir, resume_step)
    return SummaryWriter(log_dir=str(run_dir), flush_secs=3600)  # we flush at the end of every epoch


def truncate_events(run_dir: Path, last_step: int) -> int:
    """Rewrite the run's event files without events whose step is beyond `last_step`, without
    END_OF_RUN_TAGS, and without a record cut short by a hard kill. Returns how many events were
    dropped or cut."""
    dropped = 0
    for path in sorted(run_dir.glob("events.out.tfevents.*")):
        kept, total, changed = [], 0, 0
        for record in RawEventFileLoader(str(path)).Load():
            total += 1
            event = event_pb2.Event.FromString(record)
            if event.step > last_step:
                continue
            if event.HasField("summary") and any(v.tag.startswith(END_OF_RUN_TAGS) for v in event.summary.value):
                values = [v for v in event.summary.value if not v.tag.startswith(END_OF_RUN_TAGS)]
                if not values:
                    continue
                changed += 1
                del event.summary.value[:]
                event.summary.value.extend(values)
                record = event.SerializeToString()
            kept.append(record)
        if len(kept) == total and not changed:
            continue
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as f:
            writer = RecordWriter(f)
            for record in kept:
                writer.write(record)
            writer.flush()
        tmp.replace(path)
        dropped += total - len(kept) + changed
    return dropped


class _SilentWriter:
    """What DDP processes other than rank 0 write to: nothing (any method, any attribute)."""

    def __getattr__(self, name):
        return self

    def __call__(self, *args, **kwargs):
        return None


SILENT_WRITER = _SilentWriter()


def log_session_start(writer: SummaryWriter, hparams: Mapping[str, bool | int | float | str]) -> None:
    info = plugin_data_pb2.SessionStartInfo(start_time_secs=time.time())
    for name, value in hparams.items():
        if isinstance(value, bool):
            info.hparams[name].bool_value = value
        elif isinstance(value, (int, float)):
            info.hparams[name].number_value = value
        else:
            info.hparams[name].string_value = str(value)
    writer.file_writer.add_summary(_hparams_summary(metadata.SESSION_START_INFO_TAG, session_start_info=info))


def log_session_end(writer: SummaryWriter, ok: bool = True) -> None:
    status = api_pb2.Status.Value("STATUS_SUCCESS" if ok else "STATUS_FAILURE")
    info = plugin_data_pb2.SessionEndInfo(status=status, end_time_secs=time.time())
    writer.file_writer.add_summary(_hparams_summary(metadata.SESSION_END_INFO_TAG, session_end_info=info))


def hparams_config_summary(experiment: api_pb2.Experiment) -> Summary:
    """An hparams config (TensorBoard's `Experiment`: the HPARAMS columns and metrics, in place of those it would
    infer from every session), as TensorBoard's `hparams_config` summary writes it."""
    return _hparams_summary(metadata.EXPERIMENT_TAG, experiment=experiment)


def _hparams_summary(tag: str, **data) -> Summary:
    """A summary the HPARAMS plugin reads (what tensorboard.plugins.hparams.summary builds, without
    its TensorFlow import)."""
    content = plugin_data_pb2.HParamsPluginData(version=metadata.PLUGIN_DATA_VERSION, **data).SerializeToString()
    meta = SummaryMetadata(plugin_data=SummaryMetadata.PluginData(plugin_name=metadata.PLUGIN_NAME, content=content))
    return Summary(value=[Summary.Value(tag=tag, metadata=meta)])
