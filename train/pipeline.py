"""From nothing to a trained tiny SO-100 checkpoint: record -> checkpoint skeleton -> encode -> train -> export.

    <out>/dataset/             expert demonstrations, LeRobot v2.1 layout (unless --dataset is given)
    <out>/checkpoint/          the released layout: transformer/ vae/ text_encoder/ tokenizer/ +
                               policy_config.json (upstream's names); loads with load_policy(<dir>)
    <out>/latents.pt           the dataset through the checkpoint's encoders (reused on resume); their
                               per-channel statistics go into vae/config.json (latents_mean / latents_std)
    <out>/train_state.pt       resumable training state;  <out>/loss.png  the loss curves
    <out>/report.json          settings, losses, timings (and the evaluation when asked)

The frozen parts (tiny Wan2.2-family VAE, UMT5, tokenizer) are the ones `io.tiny.save_tiny_frozen_parts` writes
(fixed seed): the latents trained on and the latents seen at inference come from the same files.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, is_dataclass
from pathlib import Path
from typing import Any

import torch

from lingbot_edge.core.config import get_policy_config
from lingbot_edge.eval.task_success import checkpoint_loader
from lingbot_edge.io.checkpoint import build_model, save_transformer
from lingbot_edge.io.datasets import load_action_quantiles
from lingbot_edge.io.loading import read_policy_config
from lingbot_edge.robot.so100 import camera_name
from train import posttrain
from train.lora import AdapterConfig, checkpoint_blocks
from train.scenes import get_train_scene
from train.skeleton import policy_config_json, write_checkpoint_skeleton, write_json
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


@dataclass(frozen=True)
class DataSettings:
    """Where a run's training episodes come from."""

    scene: str = "grasp"  # the task recorded (`train.scenes.TRAIN_SCENES`)
    dataset: str | Path | None = None  # an existing LeRobot dataset (None: record one into <out>/dataset)
    episodes: int = 200  # episodes to record / use
    episode_frames: int | None = None  # recorded frames per episode (None: the scene's)
    # the scene's recording options (an instance of its `TrainScene.options`: the scripted expert's settings of the
    # SO-100 scenes, the tasks of LIBERO's); None: their defaults
    options: Any = None
    latents: str | Path | None = None  # an earlier run's latents.pt of the same dataset and VAE (skips encoding)


@dataclass(frozen=True)
class ModelSettings:
    """What a run trains: a new tiny policy, or a post-training of a checkpoint (`train.posttrain`)."""

    model: str = "tiny"  # DiT preset of a run without a base: tiny or tiny-grasp
    cameras: tuple[str, ...] | None = None  # the policy's robot cameras (None: POLICY_SETTINGS')
    height: int | None = None  # policy image height per camera (None: POLICY_SETTINGS')
    width: int | None = None  # policy image width per camera (None: POLICY_SETTINGS')
    base: str | Path | None = None  # a checkpoint folder or embedded name to post-train from
    adapters: AdapterConfig | None = None  # LoRA over the base's frozen DiT (None: all of it trains)
    from_scratch: bool = False  # with base: a random DiT on the base's frozen parts (the post-training baseline)
    checkpointing: bool = False  # per-block activation checkpointing


def fit(out: str | Path, data: DataSettings = DataSettings(), model: ModelSettings = ModelSettings(),
        tc: TrainConfig | None = None, progress: bool = True, threads: int | None = None,
        parallel=None) -> dict | None:
    """The whole run; every stage is skipped when its output is already there (resume). `parallel`
    (`train.distributed.DataParallel`, under torchrun): rank 0 records, encodes and writes the checkpoint skeleton
    while the others wait, every rank trains its share of each batch, rank 0 exports and reports; returns the
    report on rank 0, None on the others."""
    tc = tc or TrainConfig()
    writer = parallel is None or parallel.is_writer
    out = open_run(out, threads)
    timings: dict[str, float] = {}
    scene = get_train_scene(data.scene)
    options = scene.options() if data.options is None else data.options
    if model.base is not None and not scene.post_training:
        raise ValueError(f"base: post-training on scene {scene.name!r} is not supported; train its policy from nothing")
    dataset = Path(data.dataset) if data.dataset is not None else out / "dataset"
    latents = Path(data.latents) if data.latents is not None else out / "latents.pt"
    ckpt = out / "checkpoint"
    base = None if model.base is None else posttrain.base_folder(model.base)
    if writer:  # the run folder: dataset, checkpoint skeleton, latents (each kept when there)
        t = time.perf_counter()
        if not (dataset / "meta" / "info.json").is_file():
            keys = (read_policy_config(base) if base is not None
                    else scene.policy_config(model.model, model.cameras)).obs_cam_keys
            frames = scene.episode_frames if data.episode_frames is None else data.episode_frames
            scene.record(dataset, list(range(data.episodes)), frames, [camera_name(k) for k in keys], progress,
                         options)
        timings["record_s"] = time.perf_counter() - t
        q01, q99 = load_action_quantiles(dataset, scene.action_names)
        dim = get_policy_config("tiny").model_config.action_dim
        size = {k: v for k, v in (("height", model.height), ("width", model.width)) if v is not None}
        q01, q99 = tuple(q01) + (0.0,) * (dim - len(q01)), tuple(q99) + (0.0,) * (dim - len(q99))
        if base is not None:
            posttrain.write_skeleton(ckpt, base, posttrain.base_policy_config(base, q01, q99))
        else:
            write_checkpoint_skeleton(ckpt, scene.policy_config(model.model, model.cameras, action_q01=q01,
                                                                action_q99=q99, **size))
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
            encoded = encode_dataset(dataset, load_checkpoint_policy(ckpt, preset=scene.preset),
                                     max_episodes=data.episodes, progress=progress)
            atomic_torch_save({**asdict(encoded), "identity_vae": raw, "dataset": str(dataset)}, latents)  # as encoded
        if raw:
            normalize_latents(read_latents(latents)[0], ckpt / "vae")  # writes the statistics once
        timings["encode_s"] = time.perf_counter() - t
    if parallel is not None:
        parallel.barrier()
    cfg = read_policy_config(ckpt)
    episodes, raw, _ = read_latents(latents)
    if raw:
        episodes = normalize_latents(episodes, ckpt / "vae")
    log.info("training on %d episodes x %d chunks (policy %s, %dx%d, cache %d tokens%s)", len(episodes),
             episodes.video.shape[1], cfg.name, cfg.height, cfg.width, cfg.cache_capacity,
             "" if parallel is None else f", {parallel.world} processes")

    t = time.perf_counter()
    if base is None:
        dit, trainable, run = build_model(cfg.model_config, seed=tc.seed), None, None
    else:
        dit, trainable, run = posttrain.prepare_model(base, model.adapters, seed=tc.seed,
                                                      from_scratch=model.from_scratch)
    if model.checkpointing:
        checkpoint_blocks(dit)
    losses = train(dit, cfg, episodes, out, tc, progress=progress, trainable=trainable, run=run, parallel=parallel)
    timings["train_s"] = time.perf_counter() - t
    if not writer:
        return None
    if base is not None and not model.from_scratch:
        dit = posttrain.export(dit, model.adapters, out)
    save_transformer(dit, ckpt / "transformer", replace=True)  # the skeleton's DiT -> the trained one
    report = {"dataset": str(dataset), "episodes": len(episodes), "chunks": int(episodes.video.shape[1]),
              "scene": scene.name, "scene_options": asdict(options) if is_dataclass(options) else options,
              "base": None if base is None else str(base), "from_scratch": model.from_scratch,
              "lora": None if model.adapters is None else asdict(model.adapters),
              "processes": 1 if parallel is None else parallel.world,
              "train_config": asdict(tc), "policy_config": policy_config_json(cfg), "timings": timings,
              **loss_summary(losses)}
    write_json(out / "report.json", report)
    log.info("checkpoint written to %s", ckpt)
    return report
