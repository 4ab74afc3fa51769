"""Calibration capture: streaming statistics (buckets, histogram percentiles), bit-identical
repeated captures, constant memory in the number of episodes, resumable after a crash, and the
calibration data sources (recorded .npz episodes, LeRobot v2.1 and v3.0 dataset folders)."""

import hashlib
import json

import numpy as np
import pytest
import torch

from calib.capture import capture
from calib.data import SyntheticEpisodes, open_source
from calib.stats import CLEAN, PROMPT, ActivationStats, bucket_label, histogram
from lingbot_edge.core.config import get_policy_config
from lingbot_edge.io.checkpoint import build_model
from lingbot_edge.io.episodes import (
    LeRobotEpisodes,
    RecordedEpisode,
    RecordedEpisodes,
    actions_needed,
    encode_episode,
    encode_episodes,
    frames_needed,
)

# Fewer denoising steps than the tiny preset: the same code paths (pinned first frame, transient,
# predicted and history forwards), a third of the forwards.
CFG = get_policy_config("tiny").replace(num_inference_steps=2, action_num_inference_steps=3)


@pytest.fixture(scope="module")
def model():
    return build_model(CFG.model_config, seed=3)


def _sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _data_bytes(path) -> int:
    """Size of a safetensors file's tensor data (after the 8-byte length and the JSON header)."""
    header = int.from_bytes(path.read_bytes()[:8], "little")
    return path.stat().st_size - 8 - header


def test_bucket_labels():
    assert bucket_label(0.0) == CLEAN
    assert bucket_label(24.4) == "t0-250"
    assert bucket_label(250.0) == "t0-250"
    assert bucket_label(833.3) == "t750-1000"
    assert bucket_label(1000.0) == "t750-1000"
    assert bucket_label(600, edges=(500, 1000)) == "t500-1000"


def test_histogram_percentiles_within_a_bin():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(20000, 16, generator=g)
    x[:, 3] *= 50  # one outlier channel
    stats = ActivationStats()
    stats.update("m", "g", x[:10000])
    stats.update("m", "g", x[10000:])  # streaming: two updates = one
    s = stats.summary("m")
    assert s.count == 20000
    assert s.absmax == pytest.approx(float(x.abs().max()))
    assert torch.equal(s.channel_absmax, x.abs().amax(0))
    assert s.rms == pytest.approx(float(x.pow(2).mean().sqrt()), rel=1e-6)
    assert int(s.hist.sum()) == x.numel() and torch.equal(s.hist, histogram(x.abs()))
    for q in (50, 99, 99.9):
        exact = float(x.abs().flatten().quantile(q / 100))
        assert exact <= s.percentile(q) <= exact * 2 ** (1 / 8) * 1.0001  # upper edge of its 1/8-octave bin
    assert s.channel_outlier_ratio > 30
    zeros = ActivationStats()
    zeros.update("m", "g", torch.zeros(4, 8))
    assert zeros.summary("m").percentile(99) == 0.0


def test_capture_groups_by_stream_and_timestep(model):
    stats = capture(model, CFG, SyntheticEpisodes(CFG, 1))
    # Video steps t = 1000, 833 then the t = 0 cache write; action steps 1000, 91, 24 then 0.
    assert stats.groups("blocks.0.attn1.to_q") == ["action/clean", "action/t0-250", "action/t750-1000",
                                                    "video/clean", "video/t750-1000"]
    assert stats.groups("blocks.1.attn2.to_k") == [PROMPT]  # prompt context only
    assert stats.groups("condition_embedder.time_proj") == ["video/clean", "video/t750-1000"]
    # Video tokens: 8 per frame, 2 frames, CFG rows 2. Chunk 0: frame 0 pinned (clean) in the 2
    # denoising forwards, both frames clean in the last forward and the history write; chunk 1:
    # no pinned frame. Rows: (2 steps x 8 + 2 writes x 16) x 2 rows for chunk 0, (2 x 16) x 2 + ...
    q = {g: stats.summary("blocks.0.attn1.to_q", [g]).count for g in stats.groups("blocks.0.attn1.to_q")}
    assert q["video/t750-1000"] == (2 * 8 + 2 * 16) * 2
    assert q["video/clean"] == (2 * 8 + 2 * 16 + 2 * 16) * 2
    assert stats.episodes == ["synthetic-0"]


def test_capture_is_deterministic_and_memory_flat(model, tmp_path):
    a = capture(model, CFG, SyntheticEpisodes(CFG, 2), tmp_path / "a.safetensors")
    b = capture(model, CFG, SyntheticEpisodes(CFG, 2), tmp_path / "b.safetensors")
    assert _sha256(tmp_path / "a.safetensors") == _sha256(tmp_path / "b.safetensors")
    assert a.state_dict().keys() == b.state_dict().keys()
    assert all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())

    eight = capture(model, CFG, SyntheticEpisodes(CFG, 8), tmp_path / "c.safetensors")
    assert len(eight.episodes) == 8
    assert eight.nbytes == a.nbytes > 0  # the state: modules x groups, not episodes
    # On disk too: the tensor data section has the same size (only the header's episode list grows).
    assert _data_bytes(tmp_path / "c.safetensors") == _data_bytes(tmp_path / "a.safetensors") == a.nbytes
    key = ("blocks.0.ffn.net.2", "video/clean")
    assert int(eight.tensors[key]["count"]) == 4 * int(a.tensors[key]["count"])  # same-shape episodes


class _CrashError(RuntimeError):
    pass


class _CrashErroringSource(SyntheticEpisodes):
    """Stops the run while loading episode `crash_at` (an interrupted capture)."""

    crash_at = 2

    def load(self, episode_id):
        if episode_id == f"synthetic-{self.crash_at}":
            raise _CrashError(episode_id)
        return super().load(episode_id)


def test_capture_resumes_after_a_crash_to_the_same_bytes(model, tmp_path):
    full = tmp_path / "full.safetensors"
    capture(model, CFG, SyntheticEpisodes(CFG, 4), full)

    resumed = tmp_path / "resumed.safetensors"
    with pytest.raises(_CrashError):
        capture(model, CFG, _CrashErroringSource(CFG, 4), resumed)
    assert ActivationStats.load(resumed).episodes == ["synthetic-0", "synthetic-1"]  # complete episodes only
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []  # nothing half-written
    stats = capture(model, CFG, SyntheticEpisodes(CFG, 4), resumed)
    assert stats.episodes == [f"synthetic-{i}" for i in range(4)]
    assert _sha256(resumed) == _sha256(full)

    with pytest.raises(ValueError, match="other settings"):
        capture(model, CFG, SyntheticEpisodes(CFG, 4, chunks=3), resumed)


def test_failed_save_keeps_the_previous_file(model, tmp_path, monkeypatch):
    path = tmp_path / "stats.safetensors"
    capture(model, CFG, SyntheticEpisodes(CFG, 1), path)
    before = _sha256(path)

    def broken_save(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr("safetensors.torch.save_file", broken_save)
    with pytest.raises(OSError, match="disk full"):
        capture(model, CFG, SyntheticEpisodes(CFG, 2), path)
    assert _sha256(path) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stats.safetensors"]


# ----------------------------------------------------------------------------- data sources


@pytest.fixture(scope="module")
def tiny_policy():
    from lingbot_edge.io.loading import load_policy

    return load_policy("tiny", compile=False, seed=0, device="cpu", dtype="fp32")


def _recording(cfg, chunks: int, seed: int = 0) -> RecordedEpisode:
    rng = np.random.default_rng(seed)
    n = frames_needed(cfg, chunks)
    frames = {k: rng.integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8) for k in cfg.obs_cam_keys}
    actions = rng.uniform(-1, 1, size=(actions_needed(cfg, chunks), len(cfg.used_action_channel_ids)))
    return RecordedEpisode("pick up the cube", frames, actions.astype(np.float32))


def test_recorded_episodes_encode_through_the_policy(tiny_policy, tmp_path, model):
    cfg = tiny_policy.cfg
    for i in range(2):
        _recording(cfg, chunks=2, seed=i).save(tmp_path / f"ep{i}.npz")
    rec = RecordedEpisode.load(tmp_path / "ep0.npz")
    assert rec.prompt == "pick up the cube" and rec.num_chunks(cfg) == 2
    source = open_source([tmp_path], tiny_policy)
    assert isinstance(source, RecordedEpisodes) and source.episode_ids() == ["ep0", "ep1"]
    ep = source.load("ep0")
    assert len(ep.chunks) == 2
    assert tuple(ep.first_latent.shape) == (1, 16, 1, *cfg.latent_hw)
    assert torch.equal(ep.chunks[0]["observed"][:, :, :1], ep.first_latent)  # chunk 0 starts at the observation
    # Executed actions: normalized, the first chunk's frame 0 pinned to zero, unused channels zero.
    executed = ep.chunks[0]["executed"]
    assert executed[:, :, 0].abs().max() == 0
    unused = [c for c in range(8) if c not in cfg.used_action_channel_ids]
    assert executed[:, unused].abs().max() == 0
    expected = tiny_policy.codec.from_robot(rec.actions[: actions_needed(cfg, 1)], first_chunk=True)
    assert torch.equal(executed, expected)
    # Deterministic: the same episode twice (streaming VAE reset, seeded noise).
    again = source.load("ep0")
    assert all(torch.equal(a[k], b[k]) for a, b in zip(ep.chunks, again.chunks, strict=True) for k in a)
    stats = capture(tiny_policy.model, cfg.replace(num_inference_steps=2, action_num_inference_steps=3), source)
    assert stats.episodes == ["ep0", "ep1"] and "video/t750-1000" in stats.groups("blocks.0.attn1.to_q")


def test_recording_too_short_is_refused(tiny_policy):
    rec = _recording(tiny_policy.cfg, chunks=1)
    short = RecordedEpisode(rec.prompt, {k: v[:3] for k, v in rec.frames.items()}, rec.actions)
    with pytest.raises(ValueError, match="too short"):
        encode_episode(short, tiny_policy, seed=0)


def test_recordings_encoded_together_equal_one_by_one(tiny_policy):
    """`encode_episodes` (every recording its own VAE stream, as batch rows; one batch per length) gives what
    `encode_episode` gives one recording at a time: latents to float rounding, noise and actions exactly."""
    cfg = tiny_policy.cfg
    recs = [_recording(cfg, chunks=n, seed=i) for i, n in enumerate((2, 3, 2))]
    together = encode_episodes(recs, tiny_policy, seeds=[5, 6, 7])
    for rec, seed, ep in zip(recs, (5, 6, 7), together, strict=True):
        alone = encode_episode(rec, tiny_policy, seed=seed)
        assert len(ep.chunks) == len(alone.chunks) == rec.num_chunks(cfg)
        torch.testing.assert_close(ep.first_latent, alone.first_latent, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ep.text, alone.text)
        for a, b in zip(ep.chunks, alone.chunks, strict=True):
            torch.testing.assert_close(a["observed"], b["observed"], atol=1e-5, rtol=1e-5)
            assert all(torch.equal(a[k], b[k]) for k in ("noise_video", "noise_action", "executed"))
    # Different recordings give different latents (the rows are not mixed up or shared).
    assert (together[0].first_latent - together[1].first_latent).abs().max() > 1e-2
    with pytest.raises(ValueError, match="one per recording"):
        encode_episodes(recs, tiny_policy, seeds=[0])


# ----------------------------------------------------------------------------- LeRobot datasets

SO100_NAMES = ["shoulder_pan.pos", "shoulder_lift.pos", "elbow_flex.pos", "wrist_flex.pos", "wrist_roll.pos",
               "gripper.pos"]  # LeRobot 0.3's so100_follower action names, in its motor order
CAMERAS = ("observation.images.top", "observation.images.wrist")
FPS = 10


def _frames(episode: int, camera: int, length: int) -> np.ndarray:
    """Uniform frames that survive H.264: red marks (episode, camera), green marks the frame index (8 t)."""
    frames = np.zeros((length, 32, 32, 3), np.uint8)
    frames[..., 0] = 40 + 60 * episode + 20 * camera
    frames[..., 1] = 8 * np.arange(length)[:, None, None]
    frames[..., 2] = 128
    return frames


def write_lerobot_dataset(root, version: str, lengths, names=SO100_NAMES, episodes_per_file: int = 2) -> list:
    """A LeRobot dataset as LeRobot lays it out (utils.py DEFAULT_*_PATH / LEGACY_*): v2.1 one parquet and
    mp4 per episode, episodes.jsonl, episodes_stats.jsonl; v3.0 data/video files holding
    `episodes_per_file` episodes, indexed by meta/episodes/chunk-000/file-000.parquet, stats.json.
    Returns each episode's (task, actions)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from lingbot_edge.io.encoders import write_mp4

    root.mkdir(parents=True)
    features = {**{k: {"dtype": "video", "shape": [32, 32, 3]} for k in CAMERAS},
                "action": {"dtype": "float32", "shape": [6], "names": list(names)}}
    rng = np.random.default_rng(0)
    written = [(f"task {e}", rng.uniform(-90, 90, size=(n, 6)).astype(np.float32)) for e, n in enumerate(lengths)]

    def table(episodes, start_index):
        rows = [(e, t) for e in episodes for t in range(lengths[e])]
        return pa.table({"action": pa.array([written[e][1][t] for e, t in rows], type=pa.list_(pa.float32())),
                         "episode_index": pa.array([e for e, _ in rows], pa.int64()),
                         "frame_index": pa.array([t for _, t in rows], pa.int64()),
                         "index": pa.array(np.arange(start_index, start_index + len(rows)), pa.int64())})

    def write_parquet(t, path):
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(t, path)

    if version == "v2.1":
        info = {"codebase_version": version, "fps": FPS, "chunks_size": 1000, "features": features,
                "data_path": "data/chunk-{episode_chunk:03d}/episode_{episode_index:06d}.parquet",
                "video_path": "videos/chunk-{episode_chunk:03d}/{video_key}/episode_{episode_index:06d}.mp4"}
        (root / "meta").mkdir()
        (root / "meta" / "episodes.jsonl").write_text("\n".join(
            json.dumps({"episode_index": e, "tasks": [task], "length": lengths[e]}) for e, (task, _) in
            enumerate(written)))
        (root / "meta" / "episodes_stats.jsonl").write_text("\n".join(json.dumps(
            {"episode_index": e, "stats": {"action": {"min": a.min(0).tolist(), "max": a.max(0).tolist(),
                                                      "count": [len(a)]}}}) for e, (_, a) in enumerate(written)))
        for e in range(len(lengths)):
            write_parquet(table([e], sum(lengths[:e])), root / info["data_path"].format(episode_chunk=0,
                                                                                       episode_index=e))
            for c, key in enumerate(CAMERAS):
                write_mp4(_frames(e, c, lengths[e]), root / info["video_path"].format(
                    episode_chunk=0, video_key=key, episode_index=e), fps=FPS)
    else:
        info = {"codebase_version": version, "fps": FPS, "chunks_size": 1000, "features": features,
                "data_path": "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet",
                "video_path": "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4"}
        episodes = {k: [] for k in ("episode_index", "tasks", "length", "data/chunk_index", "data/file_index",
                                    "dataset_from_index", "dataset_to_index", "stats/action/min")}
        for key in CAMERAS:
            for col in ("chunk_index", "file_index", "from_timestamp", "to_timestamp"):
                episodes[f"videos/{key}/{col}"] = []
        groups = [list(range(len(lengths)))[i:i + episodes_per_file] for i in range(0, len(lengths),
                                                                                   episodes_per_file)]
        for file_index, group in enumerate(groups):
            start = sum(lengths[: group[0]])
            write_parquet(table(group, start), root / info["data_path"].format(chunk_index=0, file_index=file_index))
            for c, key in enumerate(CAMERAS):
                write_mp4(np.concatenate([_frames(e, c, lengths[e]) for e in group]), root / info["video_path"].format(
                    video_key=key, chunk_index=0, file_index=file_index), fps=FPS)
            offset = 0
            for e in group:
                for k, v in (("episode_index", e), ("tasks", [written[e][0]]), ("length", lengths[e]),
                             ("data/chunk_index", 0), ("data/file_index", file_index),
                             ("dataset_from_index", start + offset), ("dataset_to_index", start + offset + lengths[e]),
                             ("stats/action/min", written[e][1].min(0).tolist())):
                    episodes[k].append(v)
                for key in CAMERAS:
                    for col, v in (("chunk_index", 0), ("file_index", file_index), ("from_timestamp", offset / FPS),
                                   ("to_timestamp", (offset + lengths[e]) / FPS)):
                        episodes[f"videos/{key}/{col}"].append(v)
                offset += lengths[e]
        write_parquet(pa.table(episodes), root / "meta" / "episodes" / "chunk-000" / "file-000.parquet")
        actions = np.concatenate([a for _, a in written])
        (root / "meta" / "stats.json").write_text(json.dumps(
            {"action": {"min": actions.min(0).tolist(), "max": actions.max(0).tolist()}}))
    (root / "meta" / "info.json").write_text(json.dumps(info))
    return written


def _expected_frame_ids(cfg, chunks: int) -> list[int]:
    """The dataset frames a robot loop records, driven through the episode protocol: after executing
    step s of the episode the observation is frame s + 1; the Chunk says which of them are keyframes."""
    from lingbot_edge.core.episode import Chunk, chunk_steps

    ids, t = [0], 0
    for c in range(chunks):
        chunk = Chunk(np.zeros((chunk_steps(cfg, c), 6)), index=c, first=c == 0,
                      keyframe_stride=cfg.keyframe_stride, cameras=("frame",))
        for step in range(chunk.steps):
            t += 1
            chunk.record(step, images={"frame": np.array([t])} if chunk.is_keyframe(step) else None)
        ids += chunk.keyframes()["frame"][:, 0].tolist()
    return ids


@pytest.mark.parametrize("version", ["v2.1", "v3.0"])
def test_lerobot_dataset_reads_back_what_was_written(tmp_path, version):
    """Episodes of a v2.1 and a v3.0 folder (real parquet and mp4 files; in v3.0 two episodes share a data
    file and a video file, the third is in the next file) come back as written: task, executed actions
    (whole chunks), and per camera the frames the episode protocol records, at a keyframe stride of 2."""
    from types import SimpleNamespace

    from lingbot_edge.core.config import tiny_variant
    from lingbot_edge.core.episode import episode_frames, episode_steps

    cfg = tiny_variant(get_policy_config("so100")).replace(action_per_frame=8)  # the SO-100 arm, stride 2
    assert cfg.keyframe_stride == 2
    lengths = [episode_steps(cfg, 2) + 3, episode_steps(cfg, 1) + 5, episode_steps(cfg, 2) + 1]
    written = write_lerobot_dataset(tmp_path / "dataset", version, lengths)
    camera_map = {CAMERAS[0]: "top", CAMERAS[1]: "wrist"}
    source = open_source([tmp_path / "dataset"], SimpleNamespace(cfg=cfg), camera_map=camera_map)
    assert isinstance(source, LeRobotEpisodes) and source.version == version
    assert source.episode_ids() == ["episode_000000", "episode_000001", "episode_000002"]
    for e, ((task, actions), chunks) in enumerate(zip(written, (2, 1, 2), strict=True)):
        rec = source.recording(f"episode_{e:06d}")
        assert rec.prompt == task
        np.testing.assert_array_equal(rec.actions, actions[: episode_steps(cfg, chunks)])
        ids = _expected_frame_ids(cfg, chunks)
        assert len(ids) == episode_frames(cfg, chunks)
        for c, name in enumerate(("top", "wrist")):
            frames = rec.frames[name].astype(np.float64)
            assert frames.shape == (len(ids), 32, 32, 3)
            mean = frames.mean((1, 2))  # uniform frames; H.264 moves them by <= 3 levels here
            assert np.rint(mean[:, 1] / 8).astype(int).tolist() == ids, (e, name)  # which frame: green 8 t
            expected = _frames(e, c, lengths[e])[ids].mean((1, 2))
            assert np.abs(mean - expected).max() <= 4, (e, name)  # and which episode and camera: red
    limited = LeRobotEpisodes(tmp_path / "dataset", SimpleNamespace(cfg=cfg), max_chunks=1, max_episodes=2)
    assert limited.episode_ids() == ["episode_000000", "episode_000001"]
    assert len(limited.recording("episode_000000").actions) == episode_steps(cfg, 1)


def test_lerobot_dataset_encodes_through_the_policy(tiny_policy, tmp_path):
    """A v3.0 episode through the policy's encoders: whole chunks, the executed actions normalized."""
    root = tmp_path / "dataset"
    cfg = tiny_policy.cfg
    written = write_lerobot_dataset(root, "v3.0", [actions_needed(cfg, 2) + 2, actions_needed(cfg, 2) + 1])
    camera_map = dict(zip(CAMERAS, cfg.obs_cam_keys, strict=True))
    source = open_source([root], tiny_policy, max_chunks=2, camera_map=camera_map)
    ep = source.load("episode_000001")
    assert len(ep.chunks) == 2
    expected = tiny_policy.codec.from_robot(written[1][1][: actions_needed(cfg, 1)], first_chunk=True)
    assert torch.equal(ep.chunks[0]["executed"], expected)


@pytest.mark.parametrize("version", ["v2.1", "v3.0"])
def test_lerobot_dataset_action_names_must_be_the_so100_motor_order(tmp_path, version):
    from types import SimpleNamespace

    from lingbot_edge.core.config import tiny_variant

    so100 = SimpleNamespace(cfg=tiny_variant(get_policy_config("so100")))
    swapped = [SO100_NAMES[1], SO100_NAMES[0], *SO100_NAMES[2:]]
    write_lerobot_dataset(tmp_path / "swapped", version, [30], names=swapped)
    with pytest.raises(ValueError, match=r"action names .*shoulder_lift.pos.* are not the robot's motor order"):
        LeRobotEpisodes(tmp_path / "swapped", so100)
    write_lerobot_dataset(tmp_path / "ok", version, [30], names=[n.removesuffix(".pos") for n in SO100_NAMES])
    assert LeRobotEpisodes(tmp_path / "ok", so100).episode_ids() == ["episode_000000"]
    # Another robot's policy (the tiny LIBERO-style preset) does not check SO-100 names.
    other = SimpleNamespace(cfg=get_policy_config("tiny"))
    assert LeRobotEpisodes(tmp_path / "swapped", other).episode_ids() == ["episode_000000"]


def test_lerobot_dataset_version_is_checked(tmp_path):
    from types import SimpleNamespace

    write_lerobot_dataset(tmp_path / "d", "v3.0", [30])
    info = json.loads((tmp_path / "d" / "meta" / "info.json").read_text())
    (tmp_path / "d" / "meta" / "info.json").write_text(json.dumps({**info, "codebase_version": "v1.6"}))
    with pytest.raises(ValueError, match=r"codebase_version 'v1.6' not supported \(expected one of"):
        LeRobotEpisodes(tmp_path / "d", SimpleNamespace(cfg=get_policy_config("tiny")))
