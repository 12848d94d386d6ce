"""trainer.cuda_graphs: the training forward and backward replayed as CUDA graphs.

At the study's batch sizes (16, 8) a large GPU mostly waits for the CPU to launch kernels; a CUDA graph
launches a whole pass at once. `GraphedForward` wraps the module that trains and hands its training-mode
calls to `torch.cuda.make_graphed_callables` (PyTorch's partial-network capture): the forward and its
backward are each one graph, captured on the first batch; the loss, the optimizer step, the schedule, the
EMA and the fp16 gradient scaler stay eager (a handful of kernels each), so they behave exactly as without
graphs, and the learning rate may change every step.

A capture holds its input's shape and memory layout and the model's dropout probabilities. A batch of another
shape or a new dropout (progressive learning's next stage: a new image size) captures again; a smaller batch
of the same images (an epoch's last, partial one) runs eagerly instead. Evaluation (eval mode) always runs the
module eagerly, so validation and the EMA never capture. Capturing runs the forward and backward a few times
first (cuDNN's and cuBLAS's set-up stays out of the graph); BatchNorm's running statistics and the random
generators' states are put back afterwards, so the warm-up leaves no trace: the replays draw the dropout and
drop-path masks that eager steps would draw, and a resumed epoch that captures again continues exactly. At
most MAX_CAPTURES captures per run: beyond that the module runs eagerly (with a warning), never a capture per
batch.

Captures are thread-local on every torch this project supports: only the capturing thread's CUDA calls may
break one, so the DataLoader's pin-memory thread may go on allocating pinned memory meanwhile (in torch's
default "global" mode that allocation fails, and the DataLoader re-raises it at the next batch). Where
make_graphed_callables takes `capture_error_mode` it is passed; older torch captures through
`torch.cuda.graph`, which has taken the keyword since 2.1 and gets it for the duration of the capture
(`capture_route` says which, for the run log).

A failure before anything was captured (the warm-up passes, a module torch cannot capture) is a warning, and
the run trains on without graphs. A failure inside a capture leaves CUDA in an undefined state (torch restores
neither the current stream nor the graph's memory pool then): the current stream is put back here, and the
run stops with one line instead of training on.

Not with DDP (its gradient hooks), gradient accumulation (a replay overwrites the gradients the last one left)
or gradient checkpointing (its recomputation reads the RNG state, which a capture may not): fast_paths refuses
those combinations.
"""

import gc
import inspect
import logging
from contextlib import contextmanager
from typing import Callable, Iterator, Optional

import torch
from torch import nn

from ..errors import UserError

log = logging.getLogger("rethink")

MAX_CAPTURES = 16
# torch.cuda.graph's capture_error_mode: only this thread's CUDA calls may break a capture
CAPTURE_MODE = "thread_local"


def takes_capture_mode(make_graphed: Callable) -> bool:
    """Whether this make_graphed_callables takes `capture_error_mode` itself (torch's since mid-2026)."""
    try:
        return "capture_error_mode" in inspect.signature(make_graphed).parameters
    except (TypeError, ValueError):
        return False


def capture_route(make_graphed: Optional[Callable] = None) -> str:
    """How captures become thread-local with this torch (one phrase, for the run log and the GPU check)."""
    if takes_capture_mode(make_graphed or torch.cuda.make_graphed_callables):
        return f"{CAPTURE_MODE}, through make_graphed_callables(capture_error_mode=)"
    return f"{CAPTURE_MODE}, through torch.cuda.graph(capture_error_mode=) (this torch's make_graphed_callables has no such keyword)"


class CaptureWatch:
    """While `installed`, `torch.cuda.graph` (the context every make_graphed_callables captures in) captures
    thread-locally unless told otherwise, and this records each capture's mode and the first error raised
    inside one (its start, its body or its end)."""

    def __init__(self):
        self.modes: list[str] = []
        self.failed_inside: Optional[BaseException] = None

    @contextmanager
    def installed(self) -> Iterator["CaptureWatch"]:
        original = torch.cuda.graph

        def graph(*args, **kwargs):
            kwargs.setdefault("capture_error_mode", CAPTURE_MODE)
            self.modes.append(kwargs["capture_error_mode"])
            return _Watched(self, original(*args, **kwargs))

        torch.cuda.graph = graph
        try:
            yield self
        finally:
            torch.cuda.graph = original

    def failed(self, error: BaseException) -> None:
        if self.failed_inside is None:
            self.failed_inside = error


class _Watched:
    """A torch.cuda.graph context whose errors the watch sees."""

    def __init__(self, watch: CaptureWatch, capture):
        self.watch, self.capture = watch, capture

    def __enter__(self):
        try:
            return self.capture.__enter__()
        except BaseException as e:
            self.watch.failed(e)
            raise

    def __exit__(self, kind, error, traceback):
        if error is not None:
            self.watch.failed(error)
        try:
            return self.capture.__exit__(kind, error, traceback)
        except BaseException as e:
            self.watch.failed(e)
            raise


@contextmanager
def own_stream(device: torch.device) -> Iterator[None]:
    """Run the block on a side stream of `device` and make the stream that was current before it current
    again, however the block ended (a failed capture leaves its own capture stream current)."""
    if device.type != "cuda":
        yield
        return
    previous = torch.cuda.current_stream(device)
    side = torch.cuda.Stream(device)
    side.wait_stream(previous)
    try:
        with torch.cuda.stream(side):
            yield
    finally:
        torch.cuda.set_stream(previous)


def captured_in(modes: list[str]) -> str:
    """The capture mode the run log names: the one every capture used, or what was seen."""
    if not modes:
        return "capture mode unknown: this torch's make_graphed_callables did not capture through torch.cuda.graph"
    return f"{modes[0]} capture" if len(set(modes)) == 1 else f"captures in modes {sorted(set(modes))}"


class GraphedForward(nn.Module):
    """`module` whose training-mode forward (and backward) replay CUDA graphs; `make_graphed` is
    torch.cuda.make_graphed_callables (the CPU tests give a stand-in that runs eagerly)."""

    def __init__(self, module: nn.Module, autocast: Callable, make_graphed: Optional[Callable] = None):
        super().__init__()
        self.module = module
        self.autocast = autocast  # the run's torch.autocast settings, entered with cache_enabled=False around captures
        self.make_graphed = make_graphed or torch.cuda.make_graphed_callables
        self.captures = 0
        self.failed = False  # a capture failed: the rest of the run trains eagerly
        self._graphed: Optional[Callable] = None
        self._key: Optional[tuple] = None
        self._dropouts = [m for m in module.modules() if isinstance(m, nn.Dropout)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.failed:
            return self.module(x)
        key = (tuple(x.shape[1:]), x.dtype, x.stride(), tuple(m.p for m in self._dropouts))
        if self._key is not None and key == self._key and x.shape[0] == self._batch:
            return self._graphed(x)
        if self._key is not None and key == self._key and x.shape[0] < self._batch:
            return self.module(x)  # an epoch's last, smaller batch
        if self.captures >= MAX_CAPTURES:
            if self.captures == MAX_CAPTURES:
                log.warning(f"CUDA graphs: {MAX_CAPTURES} captures in this run; running eagerly from now on")
                self.captures += 1
            return self.module(x)
        try:
            self._capture(x)
        except Exception as e:  # before the capture: train without graphs, as it would; inside it: stop (CaptureFailed)
            self.module.__dict__.pop("forward", None)
            self.release()
            self.failed = True
            if isinstance(e, CaptureFailed):
                raise UserError(str(e)) from None
            log.warning(
                f"CUDA graphs: capturing the training step failed before the capture began ({_first_line(e)}); "
                "training without them (trainer.cuda_graphs=false avoids the attempt)"
            )
            return self.module(x)
        self._key, self._batch = key, x.shape[0]
        return self._graphed(x)

    def release(self) -> None:
        """Drop the captured graphs and give back their memory pool (the graphed function's static tensors
        sit in a reference cycle: only the garbage collector frees them)."""
        if self._graphed is not None:
            self._graphed, self._key = None, None
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()

    def _capture(self, x: torch.Tensor) -> None:
        self.release()
        saved = [b.detach().clone() for b in self.module.buffers()]  # the warm-up passes update BatchNorm's statistics
        watch = CaptureWatch()
        keywords = {"capture_error_mode": CAPTURE_MODE} if takes_capture_mode(self.make_graphed) else {}
        try:
            # the warm-up passes draw random numbers (dropout, drop path): the generators are put back, so the first
            # replay draws what an eager step would have
            with (
                torch.random.fork_rng(devices=[x.device] if x.is_cuda else [], device_type="cuda"),
                watch.installed(),
                own_stream(x.device),
                self.autocast(cache_enabled=False),
            ):
                graphed = self.make_graphed(self.module, (x.detach(),), **keywords)
            # make_graphed_callables swaps the module's forward for one that replays in training mode; keep that
            # function here and give the module its own forward back (eager for other shapes, and for the EMA)
            self._graphed = graphed.forward
            del self.module.forward
        except Exception as e:
            if watch.failed_inside is not None:
                raise CaptureFailed(
                    f"CUDA graphs: capturing the training step for batches of {tuple(x.shape)} failed inside the capture "
                    f"({_first_line(watch.failed_inside)}), which leaves CUDA in an undefined state: the run stops here; "
                    "trainer.cuda_graphs=false trains without graphs"
                ) from e
            raise
        finally:
            if watch.failed_inside is None:  # (after a failed capture the run stops: nothing more goes to CUDA)
                with torch.no_grad():
                    for buffer, value in zip(self.module.buffers(), saved):
                        buffer.copy_(value)
        self.captures += 1
        log.info(
            f"CUDA graphs: captured the training step for batches of {tuple(x.shape)} ({captured_in(watch.modes)})"
        )


class CaptureFailed(RuntimeError):
    """An error inside a capture (not before it): the run cannot go on."""


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0]}" if text else type(error).__name__
