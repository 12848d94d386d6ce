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
first (cuDNN's and cuBLAS's set-up stays out of the graph); BatchNorm's running statistics are put back
afterwards, so the warm-up leaves no trace in the model. At most MAX_CAPTURES captures per run: beyond that
the module runs eagerly (with a warning), never a capture per batch. A capture that fails (an operation the
GPU or this PyTorch cannot capture) is a warning, and the run trains on without graphs.

Not with DDP (its gradient hooks), gradient accumulation (a replay overwrites the gradients the last one left)
or gradient checkpointing (its recomputation reads the RNG state, which a capture may not): fast_paths refuses
those combinations.
"""

import gc
import inspect
import logging
from typing import Callable, Optional

import torch
from torch import nn

log = logging.getLogger("rethink")

MAX_CAPTURES = 16
# Only this thread's CUDA calls may break a capture: the DataLoader's pin-memory thread goes on allocating
# pinned memory meanwhile (a "global" capture, the default, fails on that now and then).
_THREAD_LOCAL = ({"capture_error_mode": "thread_local"}
                 if "capture_error_mode" in inspect.signature(torch.cuda.make_graphed_callables).parameters else {})


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
        except Exception as e:  # a capture this module or this GPU cannot make: train without graphs, as it would
            self.module.__dict__.pop("forward", None)
            self.release()
            self.failed = True
            log.warning(f"CUDA graphs: capturing the training step failed ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                        "training without them (trainer.cuda_graphs=false avoids the attempt)")
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
        try:
            with self.autocast(cache_enabled=False):
                graphed = self.make_graphed(self.module, (x.detach(),), **_THREAD_LOCAL)
            # make_graphed_callables swaps the module's forward for one that replays in training mode; keep that
            # function here and give the module its own forward back (eager for other shapes, and for the EMA)
            self._graphed = graphed.forward
            del self.module.forward
        finally:
            with torch.no_grad():
                for buffer, value in zip(self.module.buffers(), saved):
                    buffer.copy_(value)
        self.captures += 1
        log.info(f"CUDA graphs: captured the training step for batches of {tuple(x.shape)}")
