"""From nothing to a trained tiny SO-100 checkpoint: record -> checkpoint skeleton -> encode -> train -> export.

    <out>/dataset/             expert demonstrations, LeRobot v2.1 layout (unless --dataset is given)
    <out>/checkpoint/          the released layout: transformer/ vae/ text_encoder/ tokenizer/ +
                               policy_config.json (upstream's names); loads with load_policy(<dir>)
    <out>/latents.pt           the dataset through the checkpoint's encoders (reused on resume); their
                               per-channel statistics go into vae/config.json (latents_mean / latents_std)
    <out>/train_state.pt       resumable training state;  <out>/loss.png  the loss curves
    <out>/report.json          settings, losses, timings (and the evaluation when asked)

The frozen parts (tiny Wan2.2-family VAE, UMT5, tokenizer) are the ones `save_tiny_checkpoint` writes
(fixed seed): the latents trained on and the latents seen at inference come from the same files.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import torch

from lingbot_edge.core.config import get_policy_config
from lingbot_edge.eval.task_success import checkpoint_loader
from lingbot_edge.io.checkpoint import build_model, save_transformer
from lingbot_edge.io.datasets import load_action_quantiles
from lingbot_edge.io.loading import read_policy_config
from lingbot_edge.robot.so100 import SO100_MOTORS, camera_name
from train import posttrain
from train.dataset import record_dataset
from train.expert import RECORDING_CARTESIAN_SPEED, RECORDING_DETOUR
from train.libero_data import LIBERO_ACTION_NAMES, LIBERO_EPISODE_FRAMES, LiberoTasks, record_libero_dataset
from train.lora import AdapterConfig, checkpoint_blocks
from train.skeleton import (
    base_policy_config,
    libero_policy_config,
    policy_config_json,
    write_checkpoint_skeleton,
    write_json,
)
from train.trainer import (
    EpisodeTensors,
    TrainConfig,
    atomic_torch_save,
    encode_dataset,
    loss_summary,
    open_run,
    read_latents,
    train,
)

log = logging.getLogger(__name__)

# LeRobot frames per episode: 13 whole chunks of the tiny so100 policy (8 k - 3). The expert holds the cube lifted
# by tick 70 (median; 83 at most over seeds 0-199), so every episode ends with the cube held for a few chunks;
# 11-chunk episodes (85 frames, a chunk or two of holding) trained to 2/20 where 13 chunks gave 14/20
# (bench/results/task_success/so100_grasp.md, "Recipes tried").
EPISODE_FRAMES = 101
# Recorded frames per episode of each `--scene` (8 k - 3: whole chunks). place: 18 chunks; its expert has the cube
# in the box by tick 104-134 (seeds 0-39 and the first 20 held-out and validation seeds).
SCENE_EPISODE_FRAMES = {"grasp": EPISODE_FRAMES, "place": 141}
def vae_is_identity(vae_dir: Path) -> bool:
    config = json.loads((vae_dir / "config.json").read_text())
    return all(m == 0.0 for m in config["latents_mean"]) and all(s == 1.0 for s in config["latents_std"])


def normalize_latents(data: EpisodeTensors, vae_dir: Path) -> EpisodeTensors:
    """Per-channel latent statistics into `vae/config.json` (`latents_mean` / `latents_std`, the fields a real
    Wan2.2 VAE carries) and the encoded data normalized with them. The tiny VAE's raw latents have a std of
    ~0.2: next to unit noise the video stream's flow target would be almost all noise. A VAE config that
    has statistics already (a resumed run) gives them. `data`: latents encoded with identity statistics."""
    path = vae_dir / "config.json"
    config = json.loads(path.read_text())
    if vae_is_identity(vae_dir):
        dims = (0, 1, 3, 4, 5)  # all but the channel of [E, K, C, F, h, w]
        mean, std = data.video.mean(dims), data.video.std(dims).clamp(min=1e-3)
        config["latents_mean"], config["latents_std"] = mean.tolist(), std.tolist()
        write_json(path, config)
        log.info("latent statistics written to %s (std %.3f..%.3f)", path, float(std.min()), float(std.max()))
    mean, std = torch.tensor(config["latents_mean"]), torch.tensor(config["latents_std"])
    video = (data.video - mean.view(1, 1, -1, 1, 1, 1)) / std.view(1, 1, -1, 1, 1, 1)
    return EpisodeTensors(video, data.action, data.text)


def load_checkpoint_policy(folder: str | Path, dtype: str = "float32", transformer: str | Path | None = None,
                           sampler: str = "static", **overrides):
    return checkpoint_loader(folder, dtype)(sampler=sampler, transformer=transformer, **overrides)


def fit(out: str | Path, dataset: str | Path | None = None, episodes: int = 200, tc: TrainConfig | None = None,
        progress: bool = True, threads: int | None = None, episode_frames: int | None = None,
        model: str = "tiny", expert_gain: float = 0.0, expert_cartesian_speed: float = RECORDING_CARTESIAN_SPEED,
        expert_detour: float = RECORDING_DETOUR, cameras: Sequence[str] | None = None, height: int | None = None,
        width: int | None = None, scene: str = "grasp", base: str | Path | None = None,
        adapters: AdapterConfig | None = None, checkpointing: bool = False, latents: str | Path | None = None,
        from_scratch: bool = False, parallel=None, libero: LiberoTasks | None = None) -> dict | None:
    """The whole run; every stage is skipped when its output is already there (resume).

    `scene`: the task recorded (`robot.place.SCENES`). `base`: a checkpoint folder or embedded name to post-train
    from (`train.posttrain`), with LoRA `adapters` over its frozen DiT, or all of it trained when None.
    `from_scratch` (with `base`): a random DiT on the base's frozen parts, the post-training baseline.
    `checkpointing`: per-block activation checkpointing. `latents`: an earlier run's latents.pt of the same dataset
    and VAE, used instead of encoding again. `parallel` (`train.distributed.DataParallel`, under torchrun): rank 0
    records, encodes and writes the checkpoint skeleton while the others wait, every rank trains its share of each
    batch, rank 0 exports and reports; returns the report on rank 0, None on the others. `libero`: record and train
    on these LIBERO tasks instead of an SO-100 scene (`episodes` split evenly over them; no `base`)."""
    tc = tc or TrainConfig()
    writer = parallel is None or parallel.is_writer
    out = open_run(out, threads)
    timings: dict[str, float] = {}
    dataset = Path(dataset) if dataset is not None else out / "dataset"
    latents = Path(latents) if latents is not None else out / "latents.pt"
    ckpt = out / "checkpoint"
    if base is not None:
        base = posttrain.base_folder(base)
    if writer:  # the run folder: dataset, checkpoint skeleton, latents (each kept when there)
        t = time.perf_counter()
        if libero is not None and base is not None:
            raise ValueError("base: post-training a LIBERO policy is not supported; train it from nothing")
        if libero is not None and not (dataset / "meta" / "info.json").is_file():
            if episodes % len(libero.task_ids):
                raise ValueError(f"episodes: {episodes} do not split evenly over the tasks {list(libero.task_ids)}")
            record_libero_dataset(dataset, libero, episodes // len(libero.task_ids),
                                  LIBERO_EPISODE_FRAMES if episode_frames is None else episode_frames,
                                  progress=progress)
        elif not (dataset / "meta" / "info.json").is_file():
            keys = (read_policy_config(base) if base is not None else base_policy_config(model, cameras)).obs_cam_keys
            frames = SCENE_EPISODE_FRAMES[scene] if episode_frames is None else episode_frames
            record_dataset(dataset, list(range(episodes)), frames, cameras=[camera_name(k) for k in keys],
                           progress=progress, expert_gain=expert_gain, expert_cartesian_speed=expert_cartesian_speed,
                           expert_detour=expert_detour, scene=scene)
        timings["record_s"] = time.perf_counter() - t
        q01, q99 = load_action_quantiles(dataset, SO100_MOTORS if libero is None else LIBERO_ACTION_NAMES)
        dim = get_policy_config("tiny").model_config.action_dim
        size = {k: v for k, v in (("height", height), ("width", width)) if v is not None}
        q01, q99 = tuple(q01) + (0.0,) * (dim - len(q01)), tuple(q99) + (0.0,) * (dim - len(q99))
        if base is not None:
            posttrain.write_skeleton(ckpt, base, posttrain.base_policy_config(base, q01, q99))
        elif libero is not None:
            write_checkpoint_skeleton(ckpt, libero_policy_config(model, action_q01=q01, action_q99=q99, **size))
        else:
            write_checkpoint_skeleton(ckpt, base_policy_config(model, cameras, action_q01=q01, action_q99=q99, **size))
        t = time.perf_counter()
        if latents.is_file():
            _, raw, source = read_latents(latents)
            if source is not None and Path(source).resolve() != dataset.resolve():
                raise ValueError(f"{latents}: encoded from {source}, not {dataset}; drop --latents or use that "
                                 "dataset")
            if raw != vae_is_identity(ckpt / "vae"):
                raise ValueError(f"{latents}: encoded through another VAE normalization than {ckpt / 'vae'}")
        else:
            raw = vae_is_identity(ckpt / "vae")
            preset = "so100" if libero is None else "libero"
            data = encode_dataset(dataset, load_checkpoint_policy(ckpt, preset=preset), max_episodes=episodes,
                                  progress=progress)
            atomic_torch_save({**asdict(data), "identity_vae": raw, "dataset": str(dataset)}, latents)  # as encoded
        if raw:
            normalize_latents(read_latents(latents)[0], ckpt / "vae")  # writes the statistics once
        timings["encode_s"] = time.perf_counter() - t
    if parallel is not None:
        parallel.barrier()
    cfg = read_policy_config(ckpt)
    data, raw, _ = read_latents(latents)
    if raw:
        data = normalize_latents(data, ckpt / "vae")
    log.info("training on %d episodes x %d chunks (policy %s, %dx%d, cache %d tokens%s)", len(data),
             data.video.shape[1], cfg.name, cfg.height, cfg.width, cfg.cache_capacity,
             "" if parallel is None else f", {parallel.world} processes")

    t = time.perf_counter()
    if base is None:
        dit, trainable, run = build_model(cfg.model_config, seed=tc.seed), None, None
    else:
        dit, trainable, run = posttrain.prepare_model(base, adapters, seed=tc.seed, from_scratch=from_scratch)
    if checkpointing:
        checkpoint_blocks(dit)
    losses = train(dit, cfg, data, out, tc, progress=progress, trainable=trainable, run=run, parallel=parallel)
    timings["train_s"] = time.perf_counter() - t
    if not writer:
        return None
    if base is not None and not from_scratch:
        dit = posttrain.export(dit, adapters, out)
    save_transformer(dit, ckpt / "transformer", replace=True)  # the skeleton's DiT -> the trained one
    report = {"dataset": str(dataset), "episodes": len(data), "chunks": int(data.video.shape[1]),
              "scene": scene if libero is None else f"libero {libero.suite} tasks {list(libero.task_ids)}",
              "base": None if base is None else str(base), "from_scratch": from_scratch,
              "lora": None if adapters is None else asdict(adapters),
              "processes": 1 if parallel is None else parallel.world,
              "train_config": asdict(tc), "policy_config": policy_config_json(cfg), "timings": timings,
              **loss_summary(losses)}
    write_json(out / "report.json", report)
    log.info("checkpoint written to %s", ckpt)
    return report
