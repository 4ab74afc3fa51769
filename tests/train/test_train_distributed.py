"""`train fit --distributed` (train/distributed.py): 2 gloo processes under torchrun against the single-process fit.

Each step every rank draws the batch's episodes and noise from the shared generator and trains on its half of the
rows; DDP averages the gradients. So the two processes take the steps the single-process fit takes on the whole
batch: with the same flags (post-training LoRA adapters over so100-grasp, or a random DiT on its frozen parts) the
logged losses and the trained weights agree to 1e-5 relative, and rank 0 alone writes one merged checkpoint.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lingbot_edge.io.loading import read_policy_config
from lingbot_edge.robot.so100 import camera_name
from train.commands import main
from train.dataset import record_dataset
from train.distributed import DataParallel
from train.trainer import STATE_NAME

FRAMES = 21  # 3 chunks of the tiny so100 policy


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(args: list[str], cwd: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(_free_port()), "-m", "train.commands", *args]
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]


def _relative_difference(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.float() - want.float()).abs().max() / want.float().abs().max().clamp(min=1e-12))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("dp") / "dataset"
    keys = read_policy_config("so100-grasp").obs_cam_keys
    return record_dataset(root, [0, 1, 2, 3], FRAMES, cameras=[camera_name(k) for k in keys], progress=False)


@pytest.mark.slow
@pytest.mark.parametrize("recipe", [["--lora-rank", "8", "--lora-alpha", "16"], ["--from-scratch"]],
                         ids=["lora", "from-scratch"])
def test_two_gloo_ranks_fit_as_one_process(dataset, tmp_path, recipe):
    flags = ["fit", "--dataset", str(dataset), "--episodes", "4", "--steps", "3", "--batch-size", "4",
             "--save-every", "2", "--threads", "1", "--base", "so100-grasp", *recipe]
    single, parallel = tmp_path / "single", tmp_path / "parallel"
    assert main([*flags, "--out", str(single)]) == 0
    _torchrun([*flags, "--out", str(parallel), "--latents", str(single / "latents.pt"), "--distributed"],
              Path(__file__).resolve().parents[2])

    one = torch.load(single / STATE_NAME, weights_only=False)
    two = torch.load(parallel / STATE_NAME, weights_only=False)
    assert [r["step"] for r in two["losses"]] == [1, 2, 3]
    worst = {}
    for got, want in zip(two["losses"], one["losses"], strict=True):
        for key in ("video", "action", "action_grounded"):
            assert got[key] == pytest.approx(want[key], rel=1e-5), key
            worst["loss"] = max(worst.get("loss", 0.0), abs(got[key] - want[key]) / abs(want[key]))
    trained = [n for n in one["model"] if ".lora_" in n] if "--lora-rank" in recipe else list(one["model"])
    assert trained and set(two["model"]) == set(one["model"])
    worst["weights"] = max(_relative_difference(two["model"][n], one["model"][n]) for n in trained)
    assert worst["weights"] <= 1e-5, worst
    # The run trained what was asked: adapters over the base (rank 8, alpha 16), or a random DiT of its shape.
    assert two["run"] == one["run"] and two["run"]["base"].endswith("so100-grasp-tiny")
    if "--lora-rank" in recipe:
        assert two["run"]["lora"]["rank"] == 8 and two["run"]["lora"]["alpha"] == 16
    else:
        assert two["run"]["from_scratch"] is True

    # Rank 0 alone wrote: the single process's files (but the latents it shared), one merged checkpoint equal to its.
    def files(root: Path) -> list[str]:
        return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and "dataset" not in p.parts)

    assert files(parallel) == [f for f in files(single) if f != "latents.pt"], files(parallel)
    name = "checkpoint/transformer/diffusion_pytorch_model.safetensors"
    merged_one, merged_two = load_file(single / name), load_file(parallel / name)
    worst["merged"] = max(_relative_difference(merged_two[k], merged_one[k]) for k in merged_one)
    assert worst["merged"] <= 1e-2 if "--lora-rank" in recipe else worst["merged"] <= 1e-5, worst  # bf16 merge
    print(f"{recipe}: max relative difference {worst}")


def test_local_share_splits_the_batch_evenly():
    ranks = [DataParallel.__new__(DataParallel) for _ in range(2)]
    for r, dp in enumerate(ranks):
        dp.rank, dp.world = r, 2
    idx = torch.tensor([5, 1, 4, 2])
    assert torch.cat([idx[dp.local_share(len(idx))] for dp in ranks]).tolist() == idx.tolist()
    with pytest.raises(ValueError, match="batch_size"):
        ranks[0].local_share(3)
