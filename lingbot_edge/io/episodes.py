"""Recorded episodes as fixed sampler inputs: `.npz` recordings and LeRobot datasets, through a policy's own encoders.

Every source yields `Episode`s (prompt embeddings, first observation latent, and per chunk the noise, the
observed latents and the executed actions fed back), so calibration, training and plan verification all run
the same fixed inputs through the static sampler.

- `RecordedEpisodes`: recorded observation / prompt files (`.npz`, format below), encoded with a
  policy's own observation encoder (streaming VAE), prompt encoder and action codec.
- `LeRobotEpisodes`: a LeRobot dataset folder (v2.0 / v2.1: per-episode parquet and mp4 files; v3.0:
  meta/episodes/*.parquet indexing files of many episodes; see the class). Reading the parquet tables
  needs `pyarrow` (the `calib` extra: pip install "lingbot-edge[calib]"); videos are decoded with
  imageio-ffmpeg (the `frozen` extra).

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
from torch import Tensor

from lingbot_edge.core.config import SO100_MOTORS, PolicyConfig
from lingbot_edge.core.episode import Chunk, chunk_steps, episode_frames, episode_steps
from lingbot_edge.core.policy import orient_frames
from lingbot_edge.io.datasets import load_action_quantiles
from lingbot_edge.io.files import read_json

log = logging.getLogger(__name__)


@dataclass
class Episode:
    """Fixed inputs of an episode: prompt embeddings, first observation, and per chunk the noise,
    the observed latents and the executed actions (normalized) fed back afterwards."""

    text: Tensor
    negative_text: Tensor
    first_latent: Tensor
    chunks: list[dict[str, Tensor]]


class EpisodeSource(Protocol):
    def episode_ids(self) -> list[str]: ...
    def load(self, episode_id: str) -> Episode: ...
    def describe(self) -> dict[str, Any]: ...


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
    return encode_episodes([rec], policy, [seed], max_chunks)[0]


def encode_episodes(recs: Sequence[RecordedEpisode], policy, seeds: Sequence[int],
                    max_chunks: int | None = None) -> list[Episode]:
    """`encode_episode` of several recordings at once: each recording is its own stream of the VAE (its own batch
    rows, `VAEObservationEncoder.encode_batch`; one batch per episode length), so the numbers are those of one at a
    time, several times faster on a CPU. Layouts other than width_concat encode one recording after the other."""
    cfg = policy.cfg
    if len(recs) != len(seeds):
        raise ValueError(f"seeds: expected one per recording ({len(recs)}), got {len(seeds)}")
    batched = policy.obs_encoder.layout == "width_concat"
    if not batched and len(recs) > 1:
        return [encode_episodes([r], policy, [s], max_chunks)[0] for r, s in zip(recs, seeds, strict=True)]
    lengths = [min(r.num_chunks(cfg), max_chunks) if max_chunks is not None else r.num_chunks(cfg) for r in recs]
    if len(set(lengths)) > 1:  # one batch per length
        out: list[Episode | None] = [None] * len(recs)
        for n in set(lengths):
            idx = [i for i, m in enumerate(lengths) if m == n]
            for i, ep in zip(idx, encode_episodes([recs[i] for i in idx], policy, [seeds[i] for i in idx],
                                                  max_chunks), strict=True):
                out[i] = ep
        return out
    chunks = lengths[0]
    if chunks == 0:
        raise ValueError(f"recording too short for one chunk of {cfg.name!r}: needs {frames_needed(cfg, 1)} frames "
                         f"and {actions_needed(cfg, 1)} actions")
    frames = []
    for rec in recs:
        missing = [k for k in cfg.obs_cam_keys if k not in rec.frames]
        if missing:
            raise ValueError(f"recording: no frames for cameras {missing} (has {sorted(rec.frames)})")
        frames.append(orient_frames({k: rec.frames[k] for k in cfg.obs_cam_keys}, cfg.image_transform))

    def encode(lo: int, hi: int) -> torch.Tensor:  # [E, z, T', h, w] of frames lo..hi of every recording
        window = [{k: v[lo:hi] for k, v in f.items()} for f in frames]
        if batched:
            return policy.obs_encoder.encode_batch(window).float().cpu()
        return policy.obs_encoder.encode(window[0]).float().cpu()

    prompts: dict[str, tuple] = {}
    with torch.no_grad():
        for rec in recs:
            if rec.prompt not in prompts:
                prompts[rec.prompt] = policy.prompt_encoder.encode_pair(rec.prompt, cfg.use_cfg)
        policy.obs_encoder.reset()
        first = encode(0, 1)
        observed, frame = [], 1
        for c in range(chunks):
            n_frames = frames_needed(cfg, c + 1) - frame
            observed.append(encode(frame, frame + n_frames))
            frame += n_frames
    episodes = []
    for e, (rec, seed) in enumerate(zip(recs, seeds, strict=True)):
        g = torch.Generator().manual_seed(seed)
        steps, step = [], 0
        for c in range(chunks):
            n_actions = actions_needed(cfg, c + 1) - step
            obs = observed[c][e:e + 1]
            if c == 0:
                obs = torch.cat([first[e:e + 1], obs], dim=2)
            executed = policy.codec.from_robot(rec.actions[step:step + n_actions], first_chunk=c == 0)
            steps.append(dict(
                noise_video=torch.randn(1, *obs.shape[1:], generator=g),
                noise_action=torch.randn(executed.shape, generator=g),
                observed=obs,
                executed=executed,
            ))
            step += n_actions
        cond, uncond = prompts[rec.prompt]
        negative = uncond if uncond is not None else torch.zeros_like(cond)
        episodes.append(Episode(cond.float().cpu(), negative.float().cpu(), first[e:e + 1], steps))
    return episodes


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


def read_parquet_columns(path: Path, columns: Sequence[str] | None = None) -> dict[str, np.ndarray]:
    """Columns of a parquet table (default: all) as numpy arrays (list columns stacked to [rows, n])."""
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise ImportError("reading a LeRobot dataset's parquet tables needs pyarrow: "
                          "pip install 'lingbot-edge[calib]'") from e
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: no such parquet file (the dataset's info.json points there)")
    table = pq.read_table(path, columns=None if columns is None else list(columns))
    missing = sorted(set(columns or ()) - set(table.column_names))
    if missing:
        raise ValueError(f"{path}: no columns {missing} (has {table.column_names})")
    return {c: np.asarray(table.column(c).to_pylist()) for c in table.column_names}


def read_video(path: Path, start: int = 0, stop: int | None = None) -> np.ndarray:
    """Frames [start, stop) of an mp4 as uint8 [N, H, W, 3] (imageio-ffmpeg); decoding ends at `stop`."""
    import imageio.v2 as imageio

    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: no such video (the dataset's info.json points there)")
    frames = []
    with imageio.get_reader(str(path), format="ffmpeg") as reader:  # type: ignore[attr-defined]
        for i, frame in enumerate(reader):
            if stop is not None and i >= stop:
                break
            if i >= start:
                frames.append(np.asarray(frame)[..., :3])
    if stop is not None and len(frames) < stop - start:
        raise ValueError(f"{path}: expected frames {start}..{stop - 1}, the video ends after {start + len(frames)}")
    return np.stack(frames)


def keyframe_indices(cfg: PolicyConfig, chunks: int) -> list[int]:
    """Dataset frame indices of an episode's first observation and keyframes (`episode_frames` of them).
    Dataset frame i is the observation before action i, so the keyframe the episode protocol records
    after executed step s (`Chunk.is_keyframe`) is frame s + 1."""
    indices, start = [0], 0
    for c in range(chunks):
        steps = chunk_steps(cfg, c)
        chunk = Chunk(np.zeros((steps, 0)), index=c, first=c == 0, keyframe_stride=cfg.keyframe_stride, cameras=())
        indices += [start + s + 1 for s in chunk.keyframe_steps]
        start += steps
    return indices[: episode_frames(cfg, chunks)]


LEROBOT_VERSIONS = ("v2.0", "v2.1", "v3.0")


@dataclass(frozen=True)
class LeRobotEpisodes:
    """Episodes of a LeRobot dataset as recordings: the task string is the prompt, `action_key` holds the
    executed actions (robot units, `len(used_action_channel_ids)` wide), frame i of a video is the
    observation before action i; the whole chunks that fit are kept, their frames at the keyframe cadence.
    Camera keys are the dataset's video keys; `camera_map` renames them to the preset's.

    Layouts (`codebase_version` of meta/info.json, paths from its `data_path` / `video_path`):
    - v2.0 / v2.1: meta/episodes.jsonl; one parquet per episode (data/chunk-000/episode_000000.parquet) and
      one mp4 per camera and episode (videos/chunk-000/<key>/episode_000000.mp4).
    - v3.0: meta/episodes/chunk-000/file-000.parquet, one row per episode with its data file
      (`data/chunk_index`, `data/file_index`) and per camera its video file and time span
      (`videos/<key>/chunk_index`, `file_index`, `from_timestamp`, `to_timestamp`); data/chunk-000/file-000.parquet
      and videos/<key>/chunk-000/file-000.mp4 hold many episodes each.
    For an SO-100 policy the action names of info.json must be its motors in order (`check_action_names`)."""

    root: Path
    policy: Any = field(repr=False)
    action_key: str = "action"
    camera_map: Mapping[str, str] = field(default_factory=dict)
    max_chunks: int | None = None
    max_episodes: int | None = None
    seed: int = 0
    info: dict[str, Any] = field(init=False, repr=False, compare=False)  # meta/info.json

    def __post_init__(self):
        path = Path(self.root) / "meta" / "info.json"
        info = read_json(path, "a LeRobot dataset's meta/info.json")
        version = str(info.get("codebase_version", ""))
        if version not in LEROBOT_VERSIONS:
            raise ValueError(f"{path}: LeRobot codebase_version {version!r} not supported (expected one of "
                             f"{list(LEROBOT_VERSIONS)})")
        if self.action_key not in info.get("features", {}):
            raise ValueError(f"{path}: no {self.action_key!r} feature (features: {sorted(info.get('features', {}))})")
        object.__setattr__(self, "info", info)
        if self.policy.cfg.name.split("-")[0] == "so100":  # also "so100-tiny": the arm's motor order
            load_action_quantiles(self.root, SO100_MOTORS, self.action_key)  # size and names in the motor order

    @property
    def version(self) -> str:
        return self.info["codebase_version"]

    def _episodes(self) -> list[dict[str, Any]]:
        meta = Path(self.root) / "meta"
        if self.version.startswith("v2"):
            lines = (meta / "episodes.jsonl").read_text().splitlines()
            episodes = [json.loads(line) for line in lines if line.strip()]
        else:
            files = sorted((meta / "episodes").glob("chunk-*/file-*.parquet"))
            if not files:
                raise FileNotFoundError(f"{meta / 'episodes'}: no chunk-*/file-*.parquet (a v3.0 dataset's episodes)")
            episodes = []
            for f in files:
                columns = read_parquet_columns(f)
                columns = {k: v for k, v in columns.items() if not k.startswith("stats/")}
                episodes += [{k: v[i] for k, v in columns.items()} for i in range(len(columns["episode_index"]))]
            episodes.sort(key=lambda e: int(e["episode_index"]))
        return episodes[: self.max_episodes] if self.max_episodes is not None else episodes

    def episode_ids(self) -> list[str]:
        return [f"episode_{int(e['episode_index']):06d}" for e in self._episodes()]

    def _data_path(self, meta: Mapping[str, Any], video_key: str | None = None) -> Path:
        info, index = self.info, int(meta["episode_index"])
        template = info["video_path"] if video_key is not None else info["data_path"]
        if self.version.startswith("v2"):
            return Path(self.root) / template.format(episode_chunk=index // info.get("chunks_size", 1000),
                                                     episode_index=index, video_key=video_key)
        prefix = f"videos/{video_key}/" if video_key is not None else "data/"
        return Path(self.root) / template.format(chunk_index=int(meta[prefix + "chunk_index"]),
                                                 file_index=int(meta[prefix + "file_index"]), video_key=video_key)

    def recording(self, episode_id: str) -> RecordedEpisode:
        cfg = self.policy.cfg
        meta = next((e for e in self._episodes() if f"episode_{int(e['episode_index']):06d}" == episode_id), None)
        if meta is None:
            raise ValueError(f"{self.root}: no episode {episode_id!r}")
        index = int(meta["episode_index"])
        path = self._data_path(meta)
        columns = read_parquet_columns(path, [self.action_key, "episode_index", "frame_index"]
                                       if self.version == "v3.0" else [self.action_key])
        actions = columns[self.action_key].astype(np.float32)
        if self.version == "v3.0":  # a file of many episodes: this one's rows, in frame order
            rows = np.flatnonzero(columns["episode_index"] == index)
            actions = actions[rows[np.argsort(columns["frame_index"][rows], kind="stable")]]
        length = len(actions)  # frames per camera = rows (frame i before action i)
        chunks = 0  # whole chunks: their actions and the observation after the last one are recorded
        while episode_steps(cfg, chunks + 1) < length and (self.max_chunks is None or chunks < self.max_chunks):
            chunks += 1
        if chunks == 0:
            raise ValueError(f"{path}: episode {index} has {length} frames, too short for one chunk of {cfg.name!r} "
                             f"({episode_steps(cfg, 1) + 1} frames)")
        picked = keyframe_indices(cfg, chunks)
        frames = {}
        for key, feature in self.info["features"].items():
            if feature.get("dtype") != "video":
                continue
            start = 0 if self.version.startswith("v2") else round(float(meta[f"videos/{key}/from_timestamp"])
                                                                  * self.info["fps"])
            video = read_video(self._data_path(meta, key), start, start + picked[-1] + 1)
            frames[self.camera_map.get(key, key)] = video[picked]
        tasks = list(meta.get("tasks", [])) or [""]
        return RecordedEpisode(str(tasks[0]), frames, actions[: episode_steps(cfg, chunks)])

    def load(self, episode_id: str) -> Episode:
        return self.load_many([episode_id])[0]

    def load_many(self, episode_ids: Sequence[str]) -> list[Episode]:
        """`load` of several episodes, encoded together (`encode_episodes`): the same numbers, faster."""
        ids = self.episode_ids()
        seeds = [self.seed + ids.index(e) if e in ids else self.seed for e in episode_ids]  # unknown: recording raises
        return encode_episodes([self.recording(e) for e in episode_ids], self.policy, seeds, self.max_chunks)

    def describe(self) -> dict[str, Any]:
        return {"source": "lerobot", "root": str(self.root), "action_key": self.action_key,
                "camera_map": dict(self.camera_map), "max_chunks": self.max_chunks, "seed": self.seed}
