"""Scripted demonstrations recorded in LeRobot's dataset layout (codebase v2.1), and read back.

    <root>/meta/info.json            features, fps, path templates (LeRobot v2.1)
    <root>/meta/episodes.jsonl       {"episode_index", "tasks", "length", "seed"} per episode
    <root>/meta/tasks.jsonl          {"task_index", "task"}
    <root>/meta/stats.json           per feature: min / max / mean / std / count / q01 / q99
    <root>/data/chunk-000/episode_000000.parquet   action, observation.state, timestamp, frame_index, ...
    <root>/videos/chunk-000/observation.images.<camera>/episode_000000.mp4

Frame i holds the observation before action i (LeRobot's convention), so reading it back with
`lingbot_edge.io.episodes.LeRobotEpisodes` (the reader calibration uses for real SO-100 datasets) gives the
policy's first observation and, after it, one keyframe per executed step. Videos are H.264 at crf 0,
yuv444p: near-lossless, so the latents trained on are the ones the simulator's frames give.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
from tqdm import tqdm

from lingbot_edge.robot.scenes import get_scene
from lingbot_edge.robot.so100 import SO100_ACTION_KEYS, SO100_CAMERAS
from train.expert import RECORDING_CARTESIAN_SPEED, RECORDING_DETOUR, recording_expert, run_expert
from train.expert_place import place_expert

EXPERTS = {"grasp": recording_expert, "place": place_expert}  # the scripted expert of each `--scene`

log = logging.getLogger(__name__)

FPS = 30
CODEBASE_VERSION = "v2.1"
DATA_PATH = "data/chunk-{episode_chunk:03d}/episode_{episode_index:06d}.parquet"
VIDEO_PATH = "videos/chunk-{episode_chunk:03d}/{video_key}/episode_{episode_index:06d}.mp4"
CHUNKS_SIZE = 1000
IMAGE_PREFIX = "observation.images."


def record_episode(seed: int, steps: int, height: int = 96, width: int = 128,
                   cameras: Sequence[str] = SO100_CAMERAS, expert_gain: float = 0.0,
                   expert_cartesian_speed: float = RECORDING_CARTESIAN_SPEED,
                   expert_detour: float = RECORDING_DETOUR, scene: str = "grasp") -> dict:
    """One expert episode of `scene` (`robot.scenes.SCENES`): {"state", "action": [steps, 6] float32, "frames":
    {camera: [steps, H, W, 3]}, "success"}; the actions are what the safety filter let through (what the motors
    got). The expert flags shape the grasp expert; the place expert takes `expert_cartesian_speed` only."""
    sim = get_scene(scene).cls(seed, cameras=cameras, height=height, width=width)
    expert = EXPERTS[scene](sim, seed, gain=expert_gain, cartesian_speed=expert_cartesian_speed,
                            detour=expert_detour)
    states, actions, frames = [], [], {c: [] for c in cameras}

    def record(obs, q, sent):
        states.append(q)
        actions.append(sent)
        for c in cameras:
            frames[c].append(obs[c])

    run_expert(sim, expert, steps, record)
    return {"state": np.asarray(states, np.float32), "action": np.asarray(actions, np.float32),
            "frames": {c: np.stack(v) for c, v in frames.items()}, "success": sim.success}


def _write_video(path: Path, frames: np.ndarray, fps: int) -> None:
    import imageio.v2 as imageio

    path.parent.mkdir(parents=True, exist_ok=True)
    with imageio.get_writer(str(path), fps=fps, codec="libx264", pixelformat="yuv444p", macro_block_size=1,
                            output_params=["-crf", "0"], format="FFMPEG") as w:  # type: ignore[call-arg]
        for f in frames:
            w.append_data(f)


def _write_parquet(path: Path, columns: dict[str, np.ndarray]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    arrays = {}
    for name, values in columns.items():
        if values.ndim == 2:  # fixed-size vectors as list<float32>, like LeRobot
            arrays[name] = pa.array(list(values), type=pa.list_(pa.float32()))
        else:
            arrays[name] = pa.array(values)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(arrays), str(path))


def feature_stats(values: np.ndarray) -> dict[str, list[float]]:
    """LeRobot-style per-dimension stats of [N, D] values, with the q01 / q99 quantiles the policy's
    action normalization uses."""
    v = np.asarray(values, dtype=np.float64)
    return {"min": v.min(0).tolist(), "max": v.max(0).tolist(), "mean": v.mean(0).tolist(),
            "std": v.std(0).tolist(), "count": [int(v.shape[0])],
            "q01": np.quantile(v, 0.01, axis=0).tolist(), "q99": np.quantile(v, 0.99, axis=0).tolist()}


def dataset_features(action_names: Sequence[str], state_names: Sequence[str], height: int, width: int,
                     cameras: Sequence[str], fps: int = FPS) -> dict:
    """LeRobot v2.1 `features` of a dataset: action, observation.state, one video per camera (`cameras`: names
    after `observation.images.`), and the index columns."""
    feats: dict = {
        "action": {"dtype": "float32", "shape": [len(action_names)], "names": list(action_names)},
        "observation.state": {"dtype": "float32", "shape": [len(state_names)], "names": list(state_names)},
    }
    for c in cameras:
        feats[IMAGE_PREFIX + c] = {
            "dtype": "video", "shape": [height, width, 3], "names": ["height", "width", "channels"],
            "info": {"video.height": height, "video.width": width, "video.codec": "h264",
                     "video.pix_fmt": "yuv444p", "video.is_depth_map": False, "video.fps": fps,
                     "video.channels": 3, "has_audio": False},
        }
    for name, dtype in (("timestamp", "float32"), ("frame_index", "int64"), ("episode_index", "int64"),
                        ("index", "int64"), ("task_index", "int64")):
        feats[name] = {"dtype": dtype, "shape": [1], "names": None}
    return feats


def write_dataset(root: str | Path, episodes: Iterable[dict], features: dict, robot_type: str,
                  fps: int = FPS) -> Path:
    """A new LeRobot v2.1 dataset at `root` from `episodes`, each {"task": prompt, "seed", "success", "action":
    [n, A], "state": [n, S], "frames": {camera: uint8 [n, H, W, 3]}} (frame i: the observation before action i).
    Written in a temporary folder next to `root` and moved into place at the end; an existing `root` is refused."""
    root = Path(root)
    if root.exists():
        raise FileExistsError(f"{root}: exists; recording writes a new dataset (pick another folder)")
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.", dir=root.parent))
    try:
        metas, tasks, all_actions, all_states, index, failed = [], {}, [], [], 0, 0
        for ep, rec in enumerate(episodes):
            failed += not rec["success"]
            task_index = tasks.setdefault(rec["task"], len(tasks))
            chunk = ep // CHUNKS_SIZE
            n = len(rec["action"])
            _write_parquet(tmp / DATA_PATH.format(episode_chunk=chunk, episode_index=ep), {
                "action": rec["action"], "observation.state": rec["state"],
                "timestamp": (np.arange(n) / fps).astype(np.float32), "frame_index": np.arange(n),
                "episode_index": np.full(n, ep), "index": np.arange(index, index + n),
                "task_index": np.full(n, task_index),
            })
            for c, frames in rec["frames"].items():
                _write_video(tmp / VIDEO_PATH.format(episode_chunk=chunk, video_key=IMAGE_PREFIX + c,
                                                     episode_index=ep), frames, fps)
            metas.append({"episode_index": ep, "tasks": [rec["task"]], "length": n, "seed": int(rec["seed"]),
                          "expert_success": bool(rec["success"])})
            all_actions.append(rec["action"])
            all_states.append(rec["state"])
            index += n
        if failed:
            log.warning("the expert failed %d of %d episodes (kept: the dataset records what happened)",
                        failed, len(metas))
        cameras = [k for k, f in features.items() if f["dtype"] == "video"]
        meta = tmp / "meta"
        meta.mkdir()
        info = {"codebase_version": CODEBASE_VERSION, "robot_type": robot_type, "total_episodes": len(metas),
                "total_frames": index, "total_tasks": len(tasks), "total_videos": len(metas) * len(cameras),
                "total_chunks": len(metas) // CHUNKS_SIZE + 1, "chunks_size": CHUNKS_SIZE, "fps": fps,
                "splits": {"train": f"0:{len(metas)}"}, "data_path": DATA_PATH, "video_path": VIDEO_PATH,
                "features": features}
        (meta / "info.json").write_text(json.dumps(info, indent=2))
        (meta / "episodes.jsonl").write_text("".join(json.dumps(e) + "\n" for e in metas))
        (meta / "tasks.jsonl").write_text("".join(json.dumps({"task_index": i, "task": t}) + "\n"
                                                  for t, i in tasks.items()))
        stats = {"action": feature_stats(np.concatenate(all_actions)),
                 "observation.state": feature_stats(np.concatenate(all_states))}
        (meta / "stats.json").write_text(json.dumps(stats, indent=2))
        tmp.chmod(0o755)
        tmp.rename(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("recorded %d episodes (%d frames) into %s", len(metas), index, root)
    return root


def record_dataset(root: str | Path, seeds: Sequence[int], steps: int, height: int = 96, width: int = 128,
                   cameras: Sequence[str] = SO100_CAMERAS, task: str | None = None, progress: bool = True,
                   expert_gain: float = 0.0, expert_cartesian_speed: float = RECORDING_CARTESIAN_SPEED,
                   expert_detour: float = RECORDING_DETOUR, scene: str = "grasp") -> Path:
    """Record one expert episode of `scene` per seed into a new LeRobot v2.1 dataset at `root` (`write_dataset`).
    `task`: the prompt (default: the scene's)."""
    task = get_scene(scene).task if task is None else task

    def episodes():
        for seed in tqdm(seeds, desc="record", unit="episode", disable=not progress):
            rec = record_episode(seed, steps, height, width, cameras, expert_gain, expert_cartesian_speed,
                                 expert_detour, scene)
            yield {**rec, "task": task, "seed": seed}

    features = dataset_features(SO100_ACTION_KEYS, SO100_ACTION_KEYS, height, width, cameras)
    return write_dataset(root, episodes(), features, robot_type="so100")


def dataset_seeds(root: str | Path) -> list[int]:
    """The seeds a dataset recorded by `record_dataset` was made from (to hold them out of evaluation)."""
    lines = (Path(root) / "meta" / "episodes.jsonl").read_text().splitlines()
    return [int(json.loads(line)["seed"]) for line in lines if line.strip() and "seed" in json.loads(line)]
