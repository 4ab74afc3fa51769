"""Calibration capture: streaming statistics (buckets, histogram percentiles), bit-identical
repeated captures, constant memory in the number of episodes, resumable after a crash, and the
calibration data sources (recorded .npz episodes, a LeRobot v2 dataset folder)."""

import hashlib
import json
import math

import numpy as np
import pytest
import torch

from calib.capture import capture
from calib.data import (
    LeRobotEpisodes,
    RecordedEpisode,
    RecordedEpisodes,
    SyntheticEpisodes,
    actions_needed,
    encode_episode,
    frames_needed,
    open_source,
)
from calib.stats import CLEAN, PROMPT, ActivationStats, bucket_label, histogram
from lingbot_edge.core.config import get_policy_config
from lingbot_edge.io.checkpoint import build_model

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
    from lingbot_edge.io.tiny import build_tiny_policy

    return build_tiny_policy(compile=False, seed=0)


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


def test_lerobot_v2_dataset_folder(tiny_policy, tmp_path):
    """A LeRobot v2.1 folder: meta/info.json + episodes.jsonl, one mp4 per camera and episode (real
    files, decoded with imageio-ffmpeg), one parquet per episode with `action` as a list column, as
    LeRobot writes it (pyarrow: the `calib` extra)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from lingbot_edge.io.frozen import write_mp4

    cfg = tiny_policy.cfg
    steps = actions_needed(cfg, 2) + 3
    root = tmp_path / "dataset"
    (root / "meta").mkdir(parents=True)
    info = {"codebase_version": "v2.1", "fps": 10, "chunks_size": 1000,
            "data_path": "data/chunk-{episode_chunk:03d}/episode_{episode_index:06d}.parquet",
            "video_path": "videos/chunk-{episode_chunk:03d}/{video_key}/episode_{episode_index:06d}.mp4",
            "features": {"observation.images.top": {"dtype": "video", "shape": [32, 32, 3]},
                         "observation.images.wrist": {"dtype": "video", "shape": [32, 32, 3]},
                         "action": {"dtype": "float32", "shape": [6]}}}
    (root / "meta" / "info.json").write_text(json.dumps(info))
    (root / "meta" / "episodes.jsonl").write_text(
        "\n".join(json.dumps({"episode_index": i, "tasks": [f"task {i}"], "length": steps}) for i in range(2)))
    rng = np.random.default_rng(0)
    for i in range(2):
        for cam in ("observation.images.top", "observation.images.wrist"):
            video = root / info["video_path"].format(episode_chunk=0, video_key=cam, episode_index=i)
            video.parent.mkdir(parents=True, exist_ok=True)
            write_mp4(rng.integers(0, 256, size=(steps + 1, 32, 32, 3), dtype=np.uint8), video)
        data = root / info["data_path"].format(episode_chunk=0, episode_index=i)
        data.parent.mkdir(parents=True, exist_ok=True)
        actions = rng.uniform(-1, 1, size=(steps, 6)).astype(np.float32)
        if i == 1:
            expected_actions = actions
        table = pa.table({"action": pa.array(list(actions), type=pa.list_(pa.float32())),
                          "frame_index": pa.array(np.arange(steps, dtype=np.int64))})
        pq.write_table(table, data)
    camera_map = {"observation.images.top": cfg.obs_cam_keys[0], "observation.images.wrist": cfg.obs_cam_keys[1]}
    source = open_source([root], tiny_policy, max_chunks=2, camera_map=camera_map)
    assert isinstance(source, LeRobotEpisodes)
    assert source.episode_ids() == ["episode_000000", "episode_000001"]
    rec = source.recording("episode_000001")
    assert rec.prompt == "task 1"
    assert sorted(rec.frames) == sorted(cfg.obs_cam_keys)
    stride = cfg.keyframe_stride
    assert next(iter(rec.frames.values())).shape == (math.ceil((steps + 1) / stride), 32, 32, 3)
    assert rec.actions.shape == (steps, 6)
    np.testing.assert_array_equal(rec.actions, expected_actions)
    ep = source.load("episode_000001")
    assert len(ep.chunks) == 2
