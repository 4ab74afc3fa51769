"""Data-parallel training (train/distributed.py): 2 gloo processes against one process doing the same math.

Each rank trains on its half of every batch with its own noise generator; FSDP2 averages the gradients. The
reference is one process that runs the same two halves (same episodes, same noise generators) one after the
other, averages their losses, and takes the same clipped AdamW step. In fp32 the two agree to rounding: the
logged losses and the final weights to 1e-5 relative.
"""

from __future__ import annotations

import socket
import types

import pytest
import torch
import torch.multiprocessing as mp

from lingbot_edge.core.config import get_policy_config
from lingbot_edge.io.checkpoint import build_model
from train.config import TrainConfig
from train.distributed import DataParallel
from train.trainer import STATE_NAME, EpisodeTensors, FlowMatchingLoss, lr_at, train

WORLD = 2
TC = TrainConfig(steps=3, batch_size=4, lr=2e-3, warmup=2, save_every=3, seed=0, grounded_weight=1.0)


def _data(chunks: int = 2, episodes: int = 6) -> EpisodeTensors:
    cfg = get_policy_config("tiny")
    mc = cfg.model_config
    g = torch.Generator().manual_seed(1)
    h, w = cfg.latent_hw
    return EpisodeTensors(
        torch.randn(episodes, chunks, mc.in_channels, cfg.frame_chunk_size, h, w, generator=g),
        torch.rand(episodes, chunks, mc.action_dim, cfg.frame_chunk_size, cfg.action_per_frame, 1, generator=g) * 2
        - 1,
        torch.randn(episodes, 8, mc.text_dim, generator=g))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, port: int, out: str) -> None:
    import os

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        cfg = get_policy_config("tiny")
        model = build_model(cfg.model_config, seed=TC.seed)
        losses = train(model, cfg, _data(), out, TC, progress=False, parallel=DataParallel())
        if rank == 0:
            torch.save(losses, f"{out}/losses_rank0.pt")
    finally:
        dist.destroy_process_group()


def _reference(out_losses: list) -> dict[str, torch.Tensor]:
    """One process: each step, the two ranks' shares in turn with their noise generators, the mean loss."""
    cfg = get_policy_config("tiny")
    data = _data()
    model = build_model(cfg.model_config, seed=TC.seed).train().requires_grad_(True)
    params = list(model.parameters())
    opt = torch.optim.AdamW([{"params": [p for p in params if p.dim() >= 2], "weight_decay": TC.weight_decay},
                             {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}],
                            lr=TC.lr, betas=(0.9, 0.99))
    gen = torch.Generator().manual_seed(TC.seed)
    objective = FlowMatchingLoss(cfg, data.video.shape[1], TC.grounded_weight)
    for step in range(TC.steps):
        idx = torch.randint(len(data), (TC.batch_size,), generator=gen)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, TC)
        opt.zero_grad()
        logged = {}
        per = TC.batch_size // WORLD
        for rank in range(WORLD):
            noise = DataParallel.noise_generator(types.SimpleNamespace(rank=rank), TC.seed, step)
            share = idx[rank * per:(rank + 1) * per]
            loss_v, parts = objective(model, data.video[share], data.action[share], data.text[share], noise,
                                      TC.noisy_predicted, TC.history_action_noise, TC.change_weight,
                                      TC.predicted_at_sampler_sigma)
            loss = (loss_v + TC.action_weight * parts.pop("_action")) / WORLD
            loss.backward()
            for k, v in parts.items():
                logged[k] = logged.get(k, 0.0) + v / WORLD
        torch.nn.utils.clip_grad_norm_(params, TC.grad_clip)
        opt.step()
        out_losses.append(logged)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.slow
def test_two_gloo_ranks_match_one_process(tmp_path):
    out = tmp_path / "run"
    mp.start_processes(_rank, args=(_free_port(), str(out)), nprocs=WORLD, join=True, start_method="spawn")

    ref_losses: list = []
    ref_state = _reference(ref_losses)
    losses = torch.load(out / "losses_rank0.pt")
    assert len(losses) == TC.steps
    for got, want in zip(losses, ref_losses, strict=True):
        for key in ("video", "action", "action_grounded"):
            assert got[key] == pytest.approx(want[key], rel=1e-5), key

    # Rank 0 alone wrote the training state, atomically (no temporary left), with full (gathered) tensors.
    written = sorted(p.name for p in out.iterdir())
    assert written == sorted([STATE_NAME, "loss.png", "losses_rank0.pt"]), written
    state = torch.load(out / STATE_NAME, weights_only=False)
    assert state["step"] == TC.steps
    assert set(state["model"]) == set(ref_state)
    for name, want in ref_state.items():
        got = state["model"][name]
        assert got.shape == want.shape, name
        scale = want.abs().max().clamp(min=1e-3)
        assert (got - want).abs().max() <= 1e-5 * scale, name


def test_local_share_splits_the_batch_evenly():
    ranks = [DataParallel.__new__(DataParallel) for _ in range(2)]
    for r, dp in enumerate(ranks):
        dp.rank, dp.world = r, 2
    idx = torch.tensor([5, 1, 4, 2])
    assert torch.cat([dp.local_share(idx) for dp in ranks]).tolist() == idx.tolist()
    with pytest.raises(ValueError, match="batch_size"):
        ranks[0].local_share(torch.arange(3))
    a, b = (dp.noise_generator(0, 7).initial_seed() for dp in ranks)
    assert a != b and ranks[0].noise_generator(0, 7).initial_seed() == a  # per rank, reproducible per step
