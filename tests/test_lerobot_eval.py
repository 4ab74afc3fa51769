"""The LeRobot adapter end to end with LeRobot 0.3.2's own tools (`make test-lerobot`, its own venv).

- `lingbot-edge-lerobot eval` (LeRobot's `lerobot.scripts.eval` behind the torchvision fix) plays a real
  gym-pusht episode with the embedded tiny policy, as a LeRobot user types it;
- LeRobot's own `rollout` on gym-pusht: the actions the env received equal a replay of the recorded
  observations through the episode protocol written out by hand (infer, record, feedback);
- a v2.1 dataset recorded with LeRobot's own `LeRobotDataset` API: `lingbot_edge.io.datasets` reads its
  action bounds and names, and the adapter takes its stats through `make_policy(ds_meta=...)`.
"""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from lingbot_edge.core.config import VAE_TEMPORAL, get_policy_config
from lingbot_edge.lerobot import adapter as lp

HAS_LEROBOT = importlib.util.find_spec("lerobot") is not None and importlib.util.find_spec("gym_pusht") is not None
pytestmark = [pytest.mark.lerobot,
              pytest.mark.skipif(not HAS_LEROBOT, reason="LeRobot 0.3.2 + gym-pusht not installed (make test-lerobot)")]

EPISODE_STEPS = 24  # first chunk 4 steps, then 8 per chunk on the tiny model: 3 feedbacks, a 4th chunk begun
SO100_MOTORS = ("shoulder_pan", "shoulder_lift", "elbow_flex", "wrist_flex", "wrist_roll", "gripper")


def test_console_script_runs_a_lerobot_eval_episode_on_pusht(tmp_path):
    """The documented command: LeRobot's eval entry point, `--policy.type=lingbot_edge`, a real env."""
    script = Path(sys.executable).with_name("lingbot-edge-lerobot")
    out = tmp_path / "eval"
    cmd = [str(script), "eval", "--env.type=pusht", f"--env.episode_length={EPISODE_STEPS}",
           "--policy.type=lingbot_edge", "--policy.checkpoint=tiny", "--policy.device=cpu",
           "--policy.action_q01=[0,0]", "--policy.action_q99=[512,512]",
           "--eval.batch_size=1", "--eval.n_episodes=1", f"--output_dir={out}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    info = json.loads((out / "eval_info.json").read_text())
    assert len(info["per_episode"]) == 1 and info["aggregated"]["pc_success"] == 0.0  # random tiny weights
    assert np.isfinite(info["per_episode"][0]["sum_reward"])
    assert (out / "videos" / "eval_episode_0.mp4").stat().st_size > 0
    assert "policy: embedded tiny model" in log  # built by load_policy
    assert "the env's 2 values on model channels [0, 1]" in log


def _uint8(obs: torch.Tensor, t: int) -> np.ndarray:
    """Frame t of a recorded rollout observation [1, T + 1, 3, H, W] (float in [0, 1]) as HxWx3 uint8."""
    return (obs[0, t].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


def test_lerobot_rollout_on_pusht_equals_the_protocol_replayed_by_hand():
    lp.register_with_lerobot()
    from lerobot.envs.configs import PushtEnv
    from lerobot.envs.factory import make_env
    from lerobot.policies.factory import make_policy, make_policy_config
    from lerobot.scripts.eval import rollout

    env_cfg = PushtEnv(episode_length=EPISODE_STEPS)
    env = make_env(env_cfg, n_envs=1)
    try:
        def make():
            cfg = make_policy_config("lingbot_edge", device="cpu", compile=False, action_q01=[0.0, 0.0],
                                     action_q99=[512.0, 512.0])
            return make_policy(cfg, env_cfg=env_cfg)

        policy = make()
        data = rollout(env, policy, seeds=[0], return_observations=True)
    finally:
        env.close()
    actions = data["action"][0].numpy()
    assert actions.shape == (EPISODE_STEPS, 2) and np.isfinite(actions).all()
    # Feedback at every chunk boundary; the sizes from the preset, not from Chunk.
    pc = get_policy_config("tiny")
    first, later = (pc.frame_chunk_size - 1) * pc.action_per_frame, pc.frame_chunk_size * pc.action_per_frame
    feedbacks = 1 + (EPISODE_STEPS - 1 - first) // later
    assert policy.lingbot.chunk_index == feedbacks and policy.runner.chunks == feedbacks + 1
    assert policy.lingbot.cfg.obs_cam_keys == ("observation.image",)  # pusht's one camera

    # Replay: the same policy settings, driven step by step with the observations the env produced.
    images = data["observation"]["observation.image"]
    stride = pc.action_per_frame // VAE_TEMPORAL
    direct = make().lingbot
    direct.reset(prompt="")  # pusht has no task: LeRobot sends ""
    chunk, replayed, t = direct.infer({"observation.image": _uint8(images, 0)}), [], 0
    while True:
        for step in range(len(chunk.actions)):
            replayed.append(chunk.actions[step])
            t += 1
            if t == EPISODE_STEPS:
                break
            keyframe = (step + 1) % stride == 0
            chunk.record(step, images={"observation.image": _uint8(images, t)} if keyframe else None)
        if t == EPISODE_STEPS:
            break
        direct.feedback(chunk)
        chunk = direct.infer({})
    np.testing.assert_allclose(actions, np.stack(replayed), atol=1e-5, rtol=0)
    assert direct.chunk_index == feedbacks


def _record_dataset(root: Path, episodes=(5, 7), seed=0) -> np.ndarray:
    """A tiny v2.1 SO-100 dataset recorded with LeRobot's own API; returns all its actions."""
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    names = [f"{m}.pos" for m in SO100_MOTORS]
    features = {
        "action": {"dtype": "float32", "shape": (6,), "names": names},
        "observation.state": {"dtype": "float32", "shape": (6,), "names": names},
        "observation.images.top": {"dtype": "image", "shape": (16, 16, 3), "names": ["height", "width", "channels"]},
    }
    ds = LeRobotDataset.create("local/lingbot_edge_v21", fps=30, root=root, robot_type="so100_follower",
                               features=features, use_videos=False)
    rng = np.random.default_rng(seed)
    actions = []
    for n in episodes:
        for _ in range(n):
            a = rng.uniform(-90, 90, 6).astype(np.float32)
            actions.append(a)
            ds.add_frame({"action": a, "observation.state": a * 0.5,
                          "observation.images.top": rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)}, task="pick")
        ds.save_episode()
    return np.stack(actions)


def test_v21_dataset_recorded_by_lerobot_stats_read_and_used(tmp_path, caplog):
    from lerobot.datasets.lerobot_dataset import LeRobotDatasetMetadata
    from lerobot.policies.factory import make_policy, make_policy_config

    from lingbot_edge.io import datasets  # the dataset stats reader (read_action_stats, check_action_names)

    root = tmp_path / "ds"
    actions = _record_dataset(root)
    info = json.loads((root / "meta" / "info.json").read_text())
    assert info["codebase_version"] == "v2.1" and (root / "meta" / "episodes_stats.jsonl").exists()
    assert not (root / "meta" / "stats.json").exists()  # what broke `--stats` before

    stats = datasets.read_action_stats(root)
    assert stats.version == "v2.1" and stats.bounds == "min/max"  # 0.3.2 records no quantiles
    np.testing.assert_allclose(stats.low, actions.min(0), rtol=0, atol=1e-5)
    np.testing.assert_allclose(stats.high, actions.max(0), rtol=0, atol=1e-5)
    assert stats.names == tuple(f"{m}.pos" for m in SO100_MOTORS)
    datasets.check_action_names(stats, SO100_MOTORS)
    with pytest.raises(ValueError, match="motor order"):
        datasets.check_action_names(stats, SO100_MOTORS[::-1])

    # The adapter, as `lerobot.record` builds it from this dataset: the tiny model's 6 channels moved to 0-5
    # take the dataset's bounds (min/max, with the warning).
    lp.register_with_lerobot()
    meta = LeRobotDatasetMetadata("local/lingbot_edge_v21", root=root)
    cfg = make_policy_config("lingbot_edge", device="cpu", compile=False, action_channels=list(range(6)))
    with caplog.at_level("WARNING"):
        policy = make_policy(cfg, ds_meta=meta)
    pc = policy.lingbot.cfg
    assert pc.used_action_channel_ids == tuple(range(6)) and pc.obs_cam_keys == ("observation.images.top",)
    np.testing.assert_allclose(pc.action_q01[:6], actions.min(0), rtol=0, atol=1e-5)
    np.testing.assert_allclose(pc.action_q99[:6], actions.max(0), rtol=0, atol=1e-5)
    assert "no q01/q99" in caplog.text
