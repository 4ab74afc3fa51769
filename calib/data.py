"""Calibration episodes: where the inputs of the calibration runs come from.

Every source yields `quantize.metrics.Episode`s (prompt embeddings, first observation latent, and
per chunk the noise, the observed latents and the executed actions fed back), so capture,
sensitivity and plan verification all run the same fixed inputs through the static sampler.

- `SyntheticEpisodes`: random prompt embeddings, latents and actions (tests; no data at hand).
- `RecordedEpisodes`: recorded observation / prompt files (`.npz`, format below), encoded with a
  policy's own observation encoder (streaming VAE), prompt encoder and action codec.
- `LeRobotEpisodes`: a LeRobot dataset folder (v2.x layout: meta/info.json, meta/episodes.jsonl,
  meta/tasks.jsonl, data/chunk-*/episode_*.parquet, videos/chunk-*/<camera>/episode_*.mp4). Reading
  the parquet tables needs `pyarrow` (the `calib` extra: pip install "lingbot-edge[calib]"); videos
  are decoded with imageio-ffmpeg (the `frozen` extra).

Recorded episode `.npz` (`RecordedEpisode.save` / `.load`):

    prompt              0-d unicode array: the task instruction
    frames:<camera>     uint8 [N, H, W, 3] per camera key: frame 0 is the first observation, then
                        the keyframes in order (one every `keyframe_stride` control steps, as the
                        policy's `feedback` receives them)
    actions             float32 [steps, used channels]: the executed actions, robot units

An episode of k chunks needs 1 + 4 (F - 1) + 4 F (k - 1) frames and (F - 1) apf + F apf (k - 1)
actions (F = frame_chunk_size, apf = action_per_frame); longer recordings are cut to whole chunks.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from lingbot_edge.core.config import PolicyConfig
from lingbot_edge.core.episode import episode_frames, episode_steps
from quantize.metrics import Episode, make_episode

log = logging.getLogger(__name__)


class EpisodeSource(Protocol):
    def episode_ids(self) -> list[str]: ...
    def load(self, episode_id: str) -> Episode: ...
    def describe(self) -> dict[str, Any]: ...


# ----------------------------------------------------------------------------- synthetic


@dataclass(frozen=True)
class SyntheticEpisodes:
    """`count` random-input episodes of `chunks` chunks (quantize.metrics.make_episode, seeds seed..)."""

    cfg: PolicyConfig
    count: int
    chunks: int = 2
    seed: int = 0

    def episode_ids(self) -> list[str]:
        return [f"synthetic-{self.seed + i}" for i in range(self.count)]

    def load(self, episode_id: str) -> Episode:
        return make_episode(self.cfg, self.chunks, seed=int(episode_id.removeprefix("synthetic-")))

    def describe(self) -> dict[str, Any]:
        # How episodes are made, not how many: a capture may be extended with more episodes.
        return {"source": "synthetic", "chunks": self.chunks, "seed": self.seed}


# ----------------------------------------------------------------------------- recorded


def frames_needed(cfg: PolicyConfig, chunks: int) -> int:
    """Frames (first observation + keyframes) of a `chunks`-chunk episode (the episode protocol's count)."""
    return episode_frames(cfg, chunks)


def actions_needed(cfg: PolicyConfig, chunks: int) -> int:
    return episode_steps(cfg, chunks)


@dataclass(frozen=True)
class RecordedEpisode:
    prompt: str
    frames: Mapping[str, np.ndarray]  # camera -> uint8 [N, H, W, 3]: first observation + keyframes
    actions: np.ndarray  # [steps, used channels] executed, robot units

    def __post_init__(self):
        lengths = {k: v.shape[0] for k, v in self.frames.items()}
        for k, v in self.frames.items():
            if v.dtype != np.uint8 or v.ndim != 4 or v.shape[-1] != 3:
                raise ValueError(f"frames[{k!r}]: expected uint8 [N, H, W, 3], got {v.dtype} {list(v.shape)}")
        if len(set(lengths.values())) > 1:
            raise ValueError(f"frames: every camera needs the same number of frames, got {lengths}")
        if self.actions.ndim != 2:
            raise ValueError(f"actions: expected [steps, channels], got shape {list(self.actions.shape)}")

    def num_chunks(self, cfg: PolicyConfig) -> int:
        frames = next(iter(self.frames.values())).shape[0]
        n = 0
        while frames_needed(cfg, n + 1) <= frames and actions_needed(cfg, n + 1) <= len(self.actions):
            n += 1
        return n

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        arrays = {f"frames:{k}": v for k, v in self.frames.items()}
        np.savez(path, prompt=np.array(self.prompt), actions=self.actions.astype(np.float32), **arrays)
        return path

    @classmethod
    def load(cls, path: str | Path) -> RecordedEpisode:
        with np.load(path, allow_pickle=False) as z:
            missing = {"prompt", "actions"} - set(z.files)
            if missing:
                raise ValueError(f"{path}: missing arrays {sorted(missing)} (see calib.data for the format)")
            frames = {k.removeprefix("frames:"): z[k] for k in z.files if k.startswith("frames:")}
            return cls(str(z["prompt"]), frames, z["actions"].astype(np.float32))


def encode_episode(rec: RecordedEpisode, policy, seed: int, max_chunks: int | None = None) -> Episode:
    """A recording as fixed sampler inputs, through the policy's own encoders: the prompt pair, the
    first observation and each chunk's keyframes (streaming VAE, in order), the executed actions
    (normalized, channel-mapped) and seeded noise."""
    from lingbot_edge.core.policy import orient_frames

    cfg = policy.cfg
    chunks = rec.num_chunks(cfg)
    if max_chunks is not None:
        chunks = min(chunks, max_chunks)
    if chunks == 0:
        raise ValueError(f"recording too short for one chunk of {cfg.name!r}: needs {frames_needed(cfg, 1)} frames "
                         f"and {actions_needed(cfg, 1)} actions")
    missing = [k for k in cfg.obs_cam_keys if k not in rec.frames]
    if missing:
        raise ValueError(f"recording: no frames for cameras {missing} (has {sorted(rec.frames)})")
    frames = orient_frames({k: rec.frames[k] for k in cfg.obs_cam_keys}, cfg.image_transform)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        cond, uncond = policy.prompt_encoder.encode_pair(rec.prompt, cfg.use_cfg)
        policy.obs_encoder.reset()
        first = policy.obs_encoder.encode({k: v[0] for k, v in frames.items()}).float().cpu()
        steps, frame, step = [], 1, 0
        for c in range(chunks):
            n_frames, n_actions = (frames_needed(cfg, c + 1) - frame), (actions_needed(cfg, c + 1) - step)
            observed = policy.obs_encoder.encode({k: v[frame:frame + n_frames] for k, v in frames.items()})
            observed = observed.float().cpu()
            if c == 0:
                observed = torch.cat([first, observed], dim=2)
            executed = policy.codec.from_robot(rec.actions[step:step + n_actions], first_chunk=c == 0)
            steps.append(dict(
                noise_video=torch.randn(1, *observed.shape[1:], generator=g),
                noise_action=torch.randn(executed.shape, generator=g),
                observed=observed,
                executed=executed,
            ))
            frame, step = frame + n_frames, step + n_actions
    negative = uncond if uncond is not None else torch.zeros_like(cond)
    return Episode(cond.float().cpu(), negative.float().cpu(), first, steps)


@dataclass(frozen=True)
class RecordedEpisodes:
    """`.npz` recordings (files, or folders of them) encoded by `policy`; noise seeded per episode."""

    paths: Sequence[Path]
    policy: Any = field(repr=False)
    max_chunks: int | None = None
    seed: int = 0

    @classmethod
    def from_paths(cls, paths: Sequence[str | Path], policy, max_chunks: int | None = None,
                   seed: int = 0) -> RecordedEpisodes:
        files: list[Path] = []
        for p in map(Path, paths):
            files.extend(sorted(p.glob("*.npz")) if p.is_dir() else [p])
        if not files:
            raise FileNotFoundError(f"no .npz recordings in {[str(p) for p in paths]}")
        stems = [f.stem for f in files]
        if len(set(stems)) != len(stems):
            raise ValueError("recordings: file names must be unique (they are the episode ids)")
        return cls(tuple(files), policy, max_chunks, seed)

    def episode_ids(self) -> list[str]:
        return [p.stem for p in self.paths]

    def load(self, episode_id: str) -> Episode:
        index = self.episode_ids().index(episode_id)
        rec = RecordedEpisode.load(self.paths[index])
        return encode_episode(rec, self.policy, seed=self.seed + index, max_chunks=self.max_chunks)

    def describe(self) -> dict[str, Any]:
        return {"source": "recorded", "max_chunks": self.max_chunks, "seed": self.seed}


# ----------------------------------------------------------------------------- LeRobot datasets


def read_parquet_columns(path: Path, columns: Sequence[str]) -> dict[str, np.ndarray]:
    """Columns of a parquet table as numpy arrays (list columns stacked to [rows, n])."""
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise ImportError("reading a LeRobot dataset's parquet tables needs pyarrow: "
                          "pip install 'lingbot-edge[calib]'") from e
    table = pq.read_table(path, columns=list(columns))
    return {c: np.asarray(table.column(c).to_pylist()) for c in columns}


def read_video(path: Path) -> np.ndarray:
    """All frames of an mp4 as uint8 [N, H, W, 3] (imageio-ffmpeg)."""
    import imageio.v2 as imageio

    with imageio.get_reader(str(path), format="ffmpeg") as reader:  # type: ignore[attr-defined]
        return np.stack([np.asarray(f)[..., :3] for f in reader])


@dataclass(frozen=True)
class LeRobotEpisodes:
    """Episodes of a LeRobot dataset (codebase v2.x) as recordings: the task string is the prompt,
    one frame every `keyframe_stride` steps is a keyframe (frame i is the observation before action
    i), `action_key` holds the executed actions (robot units, `len(used_action_channel_ids)` wide).
    Camera keys are the dataset's video keys; `camera_map` renames them to the preset's."""

    root: Path
    policy: Any = field(repr=False)
    action_key: str = "action"
    camera_map: Mapping[str, str] = field(default_factory=dict)
    max_chunks: int | None = None
    max_episodes: int | None = None
    seed: int = 0

    @property
    def info(self) -> dict[str, Any]:
        info = json.loads((Path(self.root) / "meta" / "info.json").read_text())
        version = str(info.get("codebase_version", ""))
        if not version.startswith("v2"):
            raise ValueError(f"{self.root}: LeRobot codebase_version {version!r} not supported (v2.x only: "
                             f"per-episode parquet and mp4 files)")
        return info

    def _episodes(self) -> list[dict[str, Any]]:
        lines = (Path(self.root) / "meta" / "episodes.jsonl").read_text().splitlines()
        episodes = [json.loads(line) for line in lines if line.strip()]
        return episodes[: self.max_episodes] if self.max_episodes is not None else episodes

    def episode_ids(self) -> list[str]:
        return [f"episode_{e['episode_index']:06d}" for e in self._episodes()]

    def recording(self, episode_id: str) -> RecordedEpisode:
        info = self.info
        cfg = self.policy.cfg
        meta = next(e for e in self._episodes() if f"episode_{e['episode_index']:06d}" == episode_id)
        index = meta["episode_index"]
        chunk = index // info.get("chunks_size", 1000)
        data = Path(self.root) / info["data_path"].format(episode_chunk=chunk, episode_index=index)
        actions = read_parquet_columns(data, [self.action_key])[self.action_key].astype(np.float32)
        stride = cfg.keyframe_stride
        frames = {}
        for key, feature in info["features"].items():
            if feature.get("dtype") != "video":
                continue
            video = Path(self.root) / info["video_path"].format(episode_chunk=chunk, video_key=key,
                                                                episode_index=index)
            frames[self.camera_map.get(key, key)] = read_video(video)[::stride]
        tasks = meta.get("tasks") or [""]
        return RecordedEpisode(str(tasks[0]), frames, actions)

    def load(self, episode_id: str) -> Episode:
        seed = self.seed + self.episode_ids().index(episode_id)
        return encode_episode(self.recording(episode_id), self.policy, seed=seed, max_chunks=self.max_chunks)

    def describe(self) -> dict[str, Any]:
        return {"source": "lerobot", "root": str(self.root), "action_key": self.action_key,
                "camera_map": dict(self.camera_map), "max_chunks": self.max_chunks, "seed": self.seed}


def open_source(paths: Sequence[str | Path], policy, max_chunks: int | None = None,
                max_episodes: int | None = None, camera_map: Mapping[str, str] | None = None) -> EpisodeSource:
    """A LeRobot dataset root (has meta/info.json), or `.npz` recordings / folders of them."""
    if len(paths) == 1 and (Path(paths[0]) / "meta" / "info.json").is_file():
        return LeRobotEpisodes(Path(paths[0]), policy, camera_map=dict(camera_map or {}), max_chunks=max_chunks,
                               max_episodes=max_episodes)
    source = RecordedEpisodes.from_paths(paths, policy, max_chunks=max_chunks)
    if max_episodes is not None:
        source = RecordedEpisodes(source.paths[:max_episodes], policy, max_chunks, source.seed)
    return source
