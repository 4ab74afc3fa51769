"""Data-parallel training through torchrun and FSDP2, for when one GPU (or one CPU process) is not enough.

    torchrun --nproc-per-node N -m train.commands fit --out runs/grasp --distributed [train fit flags]

Every process (rank) holds a shard of the DiT (`torch.distributed.fsdp.fully_shard` per block, then the
root); each step, all ranks draw the same batch of episode indices from the shared generator and each trains
on its share of them, so N ranks at `--batch-size B` see the episodes one process would see at B (B must be a
multiple of N). The gradients are averaged across ranks by FSDP's reduce-scatter: with equal shares, the
gradient of the batch's mean loss. The noise each rank draws comes from its own generator, re-seeded per step
from (seed, rank, step), so a resumed run draws the same noise. Rank 0 alone writes: the training state
(gathered to full tensors, atomically), the loss curve, the checkpoint and the report.

On CUDA the process group is NCCL and each rank takes the GPU `LOCAL_RANK`; on the CPU it is gloo
(the tests run 2 gloo processes on 127.0.0.1).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor, nn

log = logging.getLogger(__name__)


_ROOT = "model."  # the DiT's prefix inside the sharded unit


def _unprefixed(name: str) -> str:
    return name[len(_ROOT):] if name.startswith(_ROOT) else name


def _strip(state: dict) -> dict:
    return {_unprefixed(k): v for k, v in state.items()}


class _ObjectiveModule(nn.Module):
    """The FSDP unit: the DiT as its child `model`, the trainer's objective as its forward."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.objective = None

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

    def shard(self, model: nn.Module) -> None:
        """FSDP2 over the DiT: its parameters, gradients and AdamW states are sharded across ranks between steps,
        gathered for the forward and the backward pass. The whole DiT is one unit: the trainer's objective
        computes the prompt K/V of every block outside the blocks' forwards, so a block cannot be a unit of its
        own. The unit's forward is the objective (`objective`), which is what FSDP hooks."""
        from torch.distributed.fsdp import fully_shard

        self.root = _ObjectiveModule(model)
        fully_shard(self.root)

    def objective(self, objective):
        """`objective(model, ...)` run through the sharded unit (call it with the model as the trainer does)."""
        self.root.objective = objective
        return lambda model, *args: self.root(*args)

    def local_share(self, indices: Tensor) -> Tensor:
        """This rank's contiguous share of the batch's episode indices."""
        if len(indices) % self.world:
            raise ValueError(f"batch_size: {len(indices)} episodes do not split evenly over {self.world} ranks; "
                             "use a multiple of the number of processes")
        per = len(indices) // self.world
        return indices[self.rank * per:(self.rank + 1) * per]

    def noise_generator(self, seed: int, step: int) -> torch.Generator:
        """This rank's noise for `step` (independent of the ranks' history: a resumed run draws the same)."""
        return torch.Generator().manual_seed(((seed * 1_000_003 + self.rank) * 1_000_003 + step) % 2**63)

    def mean(self, values: dict[str, float]) -> dict[str, float]:
        """The mean over ranks of per-rank scalars (the batch's loss parts, for the log)."""
        keys = sorted(values)
        t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64)
        dist.all_reduce(t)
        return {k: float(v) / self.world for k, v in zip(keys, t, strict=True)}

    def full_model_state(self) -> dict:
        """The DiT's state as full CPU tensors on rank 0 (empty elsewhere), keys as `model.state_dict()`'s; every
        rank must call it."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(self.root, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return _strip(state)

    def full_state(self, model: nn.Module, opt: torch.optim.Optimizer) -> tuple[dict, dict]:
        """Model and optimizer state as full CPU tensors on rank 0 (empty elsewhere); every rank must call it.
        The optimizer's state is keyed by parameter name (torch.distributed.checkpoint's full state dict)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        opt_state = get_optimizer_state_dict(self.root, opt, options=options)
        if opt_state:
            opt_state = {"state": _strip(opt_state["state"]),
                         "param_groups": [{**g, "params": [_unprefixed(p) for p in g["params"]]}
                                          for g in opt_state["param_groups"]]}
        return self.full_model_state(), opt_state

    def load_state(self, model: nn.Module, opt: torch.optim.Optimizer, model_state: dict, opt_state: dict) -> None:
        """Full model / optimizer state (as `full_state` saved it) into the sharded model on every rank."""
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        options = StateDictOptions(full_state_dict=True)
        set_model_state_dict(self.root, {_ROOT + k: v for k, v in model_state.items()}, options=options)
        opt_state = {"state": {_ROOT + k: v for k, v in opt_state["state"].items()},
                     "param_groups": [{**g, "params": [_ROOT + p for p in g["params"]]}
                                      for g in opt_state["param_groups"]]}
        set_optimizer_state_dict(self.root, opt, opt_state, options=options)

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


def fit(out: str | Path, tc, threads: int | None = None, **fit_kwargs) -> dict | None:
    """`train fit` on every rank of a torchrun job: rank 0 prepares the run folder (records and encodes the
    dataset, writes the checkpoint skeleton: `train.pipeline.fit` at 0 steps), all ranks train on its latents,
    rank 0 exports the trained DiT and writes the report. Returns the report on rank 0, None elsewhere."""
    from lingbot_edge.io.checkpoint import build_model, save_transformer
    from lingbot_edge.io.files import write_text
    from train.pipeline import fit as pipeline_fit
    from train.pipeline import load_checkpoint_policy, normalize_latents
    from train.trainer import read_latents, train

    parallel = init_from_env(threads)
    out = Path(out)
    try:
        report = None
        if parallel.is_writer:
            report = pipeline_fit(out, tc=dataclasses.replace(tc, steps=0), threads=threads, **fit_kwargs)
        parallel.barrier()
        ckpt = out / "checkpoint"
        cfg = load_checkpoint_policy(ckpt).cfg
        data, raw, _ = read_latents(out / "latents.pt")
        if raw:
            data = normalize_latents(data, ckpt / "vae")
        model = build_model(cfg.model_config, seed=tc.seed)
        losses = train(model, cfg, data, out, tc, progress=parallel.is_writer, parallel=parallel)
        state = parallel.full_model_state()
        if not parallel.is_writer:
            return None
        trained = build_model(cfg.model_config, seed=tc.seed)
        trained.load_state_dict(state)
        save_transformer(trained.eval().requires_grad_(False), ckpt / "transformer", replace=True)
        report.update(
            processes=parallel.world, train_config=dataclasses.asdict(tc),
            final_loss={k: sum(r[k] for r in losses[-50:]) / max(1, len(losses[-50:])) for k in ("video", "action")},
            first_loss={k: sum(r[k] for r in losses[:20]) / max(1, len(losses[:20])) for k in ("video", "action")})
        write_text(out / "report.json", json.dumps(report, indent=2))  # as train.pipeline writes it
        return report
    finally:
        dist.destroy_process_group()
