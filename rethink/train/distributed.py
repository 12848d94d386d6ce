"""DDP under torchrun: `torchrun --nproc-per-node=N run.py ...` trains one run over N processes.

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; outside it a run is a world of one and nothing here
does anything. Every process trains on its shard of each epoch's order (data.batch_size per process),
gradients are averaged by DistributedDataParallel, and only rank 0 writes (checkpoints, TensorBoard,
metrics). Evaluation shards each split without padding and adds up the confusion matrices, so val
and test accuracy are those of one process scoring the whole split.
"""

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, Optional

import torch
import torch.distributed as torch_dist

from ..data.scan import Share
from ..errors import UserError
from .loop import EpochTotals, Evaluation


@dataclass(frozen=True)
class World:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def shard(self) -> tuple[int, int]:
        return self.rank, self.world_size


def torchrun_world() -> World:
    """This process's place among torchrun's processes (a world of one outside torchrun)."""
    return World(
        int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))
    )


def start(world: World, device_name: str, timeout_min: float = 60.0) -> Optional[torch.device]:
    """Join the process group: NCCL on GPUs (one per process, by local rank), gloo on the CPU, whose
    collectives wait `timeout_min` minutes (trainer.dist_timeout_min) for the other processes, not NCCL's
    default 10: set-up on a large data set (listing, scanning its share of the files) takes longer.
    Returns the process's device, or None for a world of one (the trainer picks it as usual)."""
    if not world.distributed:
        return None
    on_gpu = device_name != "cpu" and torch.cuda.is_available()
    if device_name not in ("auto", "cpu", "cuda"):
        raise UserError(
            f"trainer.device={device_name}: under torchrun each process takes the GPU of its local rank; use auto, cuda or cpu"
        )
    if device_name == "cuda" and not on_gpu:
        raise UserError("trainer.device=cuda: no CUDA device is available here; use trainer.device=cpu (gloo)")
    device = torch.device("cuda", world.local_rank) if on_gpu else torch.device("cpu")
    if on_gpu:
        torch.cuda.set_device(device)
    if not torch_dist.is_initialized():
        torch_dist.init_process_group(
            "nccl" if on_gpu else "gloo",
            device_id=device if on_gpu else None,
            timeout=timedelta(minutes=timeout_min),
        )
    return device


def stop(world: World) -> None:
    if world.distributed and torch_dist.is_initialized():
        torch_dist.destroy_process_group()


def sync_batchnorm(model: torch.nn.Module, world: World, sync_bn: bool, device: torch.device) -> torch.nn.Module:
    """`model`, with BatchNorm statistics computed over every process's batch when `sync_bn` (DDP on GPUs)."""
    if not (sync_bn and world.distributed):
        return model
    if device.type != "cuda":
        raise UserError(
            "trainer.sync_bn=true needs GPUs (NCCL); on the CPU each process keeps its own BatchNorm statistics"
        )
    return torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)


def wrap(model: torch.nn.Module, world: World, device: torch.device) -> torch.nn.Module:
    """The module that trains: `model` itself, or under DDP, wrapped (after torch.compile, as PyTorch
    advises). DDP starts every process from rank 0's weights and keeps them equal, so the EMA each
    process keeps of them is the same too (rank 0 saves it)."""
    if not world.distributed:
        return model
    return torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None
    )


def rank_0_buffers(world: World, module: torch.nn.Module) -> None:
    """Make `module`'s buffers (BatchNorm's running statistics) rank 0's on every process. DDP broadcasts them
    at each training forward, and each process then updates them with its own batch: without this each would
    validate its own statistics, and the logged scores would be no saved model's (rank 0 saves its own)."""
    if world.distributed:
        for buffer in module.buffers():
            torch_dist.broadcast(buffer, src=0)


def agreed(stop: Callable[[], bool], world: World, device: torch.device) -> Callable[[], bool]:
    """`stop`, asked of every process at once: they all stop at the same step."""
    return stop if not world.distributed else (lambda: any_process(world, stop(), device))


def data_share(world: World) -> Share:
    """This process's share of the data's set-up (data.scan.Share): rank 0 downloads first, the scan is shared."""
    return Share(world.rank, world.world_size, lambda: barrier(world))


def gather(world: World, value: Any) -> list:
    """`value` of every process, by rank."""
    if not world.distributed:
        return [value]
    values = [None] * world.world_size
    torch_dist.all_gather_object(values, value)
    return values


def any_process(world: World, flag: bool, device: torch.device) -> bool:
    """True on every process when it is true on any (a stop signal reaches them at different times)."""
    if not world.distributed:
        return flag
    value = torch.tensor([int(flag)], device=device)
    torch_dist.all_reduce(value, op=torch_dist.ReduceOp.MAX)
    return bool(value.item())


def barrier(world: World) -> None:
    if world.distributed:
        torch_dist.barrier()


def sum_totals(world: World, totals: EpochTotals, device: torch.device) -> EpochTotals:
    """An epoch's running sums over every process (its batches and time are the same on each)."""
    if not world.distributed:
        return totals
    sums = torch.tensor([totals.loss_sum, totals.correct, totals.images], dtype=torch.float64, device=device)
    torch_dist.all_reduce(sums)
    loss_sum, correct, images = sums.tolist()
    return EpochTotals(
        loss_sum, int(correct), int(images), totals.batches, totals.seconds, totals.lr, totals.interrupted
    )


def own_share(world: World, totals: EpochTotals) -> EpochTotals:
    """A resumed epoch's saved sums (over every process) restart on rank 0 alone, so that summing
    over the processes again counts them once."""
    if world.is_main:
        return totals
    return EpochTotals(batches=totals.batches, seconds=totals.seconds, lr=totals.lr)


def sum_evaluation(world: World, result: Evaluation) -> Evaluation:
    """One process's evaluation of its shard, made that of the whole split."""
    if not world.distributed:
        return result
    confusion = result.confusion.to(torch.float64)
    loss_sum = torch.tensor([result.loss * result.images], dtype=torch.float64)
    if torch_dist.get_backend() == "nccl":
        confusion, loss_sum = confusion.cuda(), loss_sum.cuda()
    torch_dist.all_reduce(confusion)
    torch_dist.all_reduce(loss_sum)
    confusion = confusion.cpu().round().to(torch.int64)
    images = int(confusion.sum())
    labels, predicted = (
        interleaved(gather_objects(part)) if part is not None else None for part in (result.labels, result.predicted)
    )
    return Evaluation(
        loss=loss_sum.item() / max(1, images),
        acc=confusion.diag().sum().item() / max(1, images),
        images=images,
        confusion=confusion,
        labels=labels,
        predicted=predicted,
    )


def gather_objects(part: torch.Tensor) -> list[torch.Tensor]:
    """Every process's `part` (a small CPU tensor), in rank order."""
    parts = [None] * torch_dist.get_world_size()
    torch_dist.all_gather_object(parts, part.cpu())
    return parts


def interleaved(parts: list[torch.Tensor]) -> torch.Tensor:
    """The per-image values of a split in its order, from the shards of evaluation (rank r scored images r, r + N, ...)."""
    whole = torch.zeros(sum(len(p) for p in parts), dtype=parts[0].dtype)
    for rank, part in enumerate(parts):
        whole[rank :: len(parts)] = part
    return whole
