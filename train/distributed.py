"""Data parallelism for `train fit --distributed` under torchrun: DDP over the trained parameters.

    torchrun --nproc-per-node N -m train.commands fit --out runs/grasp --distributed [train fit flags]

`train.pipeline.fit` runs the same stages with or without it; this module holds what differs. Every rank
builds the same model (the base with its adapters, or the whole DiT) and `DistributedDataParallel` averages
the gradients of the parameters that train (the adapters under LoRA: the frozen base is replicated and never
communicated). Each step all ranks draw the batch's episode indices and noise from the shared generator, as
one process does, and each trains on its contiguous share of the rows, so N ranks take the step one process
takes on the whole batch (`--batch-size` a multiple of N). Rank 0 alone writes. Why DDP and not FSDP2:
docs/training_memory.md.

On CUDA the process group is NCCL and each rank takes the GPU `LOCAL_RANK`; on the CPU it is gloo
(the tests run 2 gloo processes on 127.0.0.1).
"""

from __future__ import annotations

import logging
import os

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

log = logging.getLogger(__name__)


class _ObjectiveModule(nn.Module):
    """The DDP unit: the DiT as its child `model`, the trainer's objective as its forward (the objective runs the
    DiT block by block, never through its own forward, which is what DDP hooks)."""

    def __init__(self, model: nn.Module, objective):
        super().__init__()
        self.model = model
        self.objective = objective

    def forward(self, *args):
        return self.objective(self.model, *args)


class DataParallel:
    """The trainer's hooks for data parallelism over an initialized process group (`train.trainer.train`'s
    `parallel`)."""

    def __init__(self):
        if not dist.is_initialized():
            raise RuntimeError("DataParallel: no process group; start under torchrun (or call init_from_env())")
        self.rank = dist.get_rank()
        self.world = dist.get_world_size()

    @property
    def is_writer(self) -> bool:
        return self.rank == 0

    def wrap(self, model: nn.Module, objective):
        """`objective(model, ...)` run through DDP: the returned callable takes the trainer's arguments, and the
        backward of its loss averages the trainable parameters' gradients over the ranks."""
        device_ids = [torch.cuda.current_device()] if next(model.parameters()).is_cuda else None
        # Some DiT parameters take no part in the teacher-forced objective (the trainer's forward is not the DiT's):
        # DDP is told to expect them, and leaves their gradients None as one process would.
        self.unit = DistributedDataParallel(_ObjectiveModule(model, objective), device_ids=device_ids,
                                            find_unused_parameters=True)
        return lambda model, *args: self.unit(*args)

    def local_share(self, batch_size: int) -> slice:
        """This rank's contiguous rows of a batch of `batch_size` episodes."""
        if batch_size % self.world:
            raise ValueError(f"batch_size: {batch_size} episodes do not split evenly over {self.world} ranks; "
                             "use a multiple of the number of processes")
        per = batch_size // self.world
        return slice(self.rank * per, (self.rank + 1) * per)

    def mean(self, values: dict[str, float]) -> dict[str, float]:
        """The mean over ranks of per-rank scalars (the batch's loss parts, for the log)."""
        keys = sorted(values)
        t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64)
        dist.all_reduce(t)
        return {k: float(v) / self.world for k, v in zip(keys, t, strict=True)}

    def barrier(self) -> None:
        dist.barrier()


def init_from_env(threads: int | None = None) -> DataParallel:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT): NCCL with one
    GPU per rank where CUDA is present, gloo on the CPU."""
    missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise RuntimeError(f"--distributed: {', '.join(missing)} not set; start it with "
                           "`torchrun --nproc-per-node N -m train.commands fit ... --distributed`")
    if threads:
        torch.set_num_threads(threads)
    if not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
            dist.init_process_group("nccl")
        else:
            dist.init_process_group("gloo")
    return DataParallel()


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
