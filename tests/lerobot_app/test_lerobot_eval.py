"""The LeRobot adapter end to end with the installed LeRobot release's own tools (`make test-lerobot`: 0.4.4,
`make test-lerobot-0.3`: 0.3.2; each in its own venv).

- LeRobot's own `lerobot-eval` entry point (0.4.4; with 0.3.2 next to CPU torch it dies importing its CUDA
  torchvision, so `lingbot-edge-lerobot eval` runs the same module behind the torchvision fix) plays a real
  gym-pusht episode with the embedded tiny policy, as a LeRobot user types it;
- LeRobot's own `rollout` on gym-pusht: the actions the env received equal a replay of the recorded
  observations through the episode protocol written out by hand (infer, record, feedback);
- a dataset recorded with the release's own `LeRobotDataset` (v2.1 with 0.3.2, v3.0 with 0.4.4): `--stats`
  reads its action bounds (0.4.4: the quantiles of LeRobot's own meta/stats.json), the adapter takes its stats
  through `make_policy(ds_meta=...)`, and calibration and training read its episodes.
"""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from lingbot_edge.core.config import VAE_TEMPORAL, get_policy_config
from lingbot_edge.io import lerobot_compat as compat
from lingbot_edge.lerobot import adapter as lp

HAS_LEROBOT = importlib.util.find_spec("lerobot") is not None and importlib.util.find_spec("gym_pusht") is not None
pytestmark = [pytest.mark.lerobot]

EPISODE_STEPS = 24  # first chunk 4 steps, then 8 per chunk on the tiny model: 3 feedbacks, a 4th chunk begun
SO100_MOTORS = ("shoulder_pan", "shoulder_lift", "elbow_flex", "wrist_flex", "wrist_roll", "gripper")


def test_the_expected_lerobot_release_and_pusht_are_installed():
    """The make target names the release and torch it installs (LINGBOT_EXPECT_LEROBOT / _TORCH); a venv with
    others fails here."""
    assert HAS_LEROBOT, "LeRobot and gym-pusht (LeRobot's `pusht` extra) must be installed: make test-lerobot"
    expected = os.environ.get("LINGBOT_EXPECT_LEROBOT")
    got = compat.version_string()
    print(f"LeRobot {got}, torch {torch.__version__}")
    assert got == expected if expected else got in compat.TESTED, (got, expected)
    torch_expected = os.environ.get("LINGBOT_EXPECT_TORCH")
    if torch_expected:  # lingbot-edge[robot] was installed after LeRobot: it must have kept LeRobot's torch
        assert torch.__version__.split("+")[0] == torch_expected, (torch.__version__, torch_expected)


def _eval_summary(info: dict) -> tuple[list[dict], dict]:
    """(episodes, aggregate) of an eval_info.json: 0.3.2 writes per_episode/aggregated, 0.4 per_task/overall."""
    if "overall" in info:
        episodes = []
        for task in info["per_task"]:
            metrics = task["metrics"]
            episodes += [{"sum_reward": s, "max_reward": m, "success": ok} for s, m, ok in
                         zip(metrics["sum_rewards"], metrics["max_rewards"], metrics["successes"], strict=True)]
        return episodes, info["overall"]
    return info["per_episode"], info["aggregated"]


def eval_command(out: Path) -> list[str]:
    """LeRobot's own `lerobot-eval` where it imports (0.4.4), else the console script (0.3.2, see module doc)."""
    bin_dir = Path(sys.executable).parent
    if compat.at_least(0, 4):
        entry = [str(bin_dir / "lerobot-eval"), "--policy.discover_packages_path=lingbot_edge_lerobot"]
    else:
        entry = [str(bin_dir / "lingbot-edge-lerobot"), "eval"]
    return [*entry, "--env.type=pusht", f"--env.episode_length={EPISODE_STEPS}", "--policy.type=lingbot_edge",
            "--policy.checkpoint=tiny", "--policy.device=cpu", "--policy.action_q01=[0,0]",
            "--policy.action_q99=[512,512]", "--eval.batch_size=1", "--eval.n_episodes=1", f"--output_dir={out}"]


def test_lerobot_eval_entry_point_runs_an_episode_on_pusht(tmp_path):
    """The documented command: LeRobot's eval entry point, `--policy.type=lingbot_edge`, a real env."""
    out = tmp_path / "eval"
    cmd = eval_command(out)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    print(" ".join(cmd))
    info = json.loads((out / "eval_info.json").read_text())
    episodes, aggregate = _eval_summary(info)
    print(json.dumps(aggregate))
    assert len(episodes) == 1 and aggregate["pc_success"] == 0.0  # random tiny weights
    assert np.isfinite(episodes[0]["sum_reward"])
    videos = sorted(out.glob("videos/**/eval_episode_0.mp4"))
    assert len(videos) == 1 and videos[0].stat().st_size > 0
    assert "policy: embedded tiny model" in log  # built by load_policy
    assert "the env's 2 values on model channels [0, 1]" in log


def _uint8(obs: torch.Tensor, t: int) -> np.ndarray:
    """Frame t of a recorded rollout observation [1, T + 1, 3, H, W] (float in [0, 1]) as HxWx3 uint8."""
    return (obs[0, t].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


def test_lerobot_rollout_on_pusht_equals_the_protocol_replayed_by_hand():
    lp.register_with_lerobot()
    from lerobot.envs.configs import PushtEnv
    from lerobot.policies.factory import make_policy, make_policy_config

    env_cfg = PushtEnv(episode_length=EPISODE_STEPS)
    env = compat.make_env(env_cfg, n_envs=1)
    try:
        def make():
            cfg = make_policy_config("lingbot_edge", device="cpu", compile=False, action_q01=[0.0, 0.0],
                                     action_q99=[512.0, 512.0])
            return make_policy(cfg, env_cfg=env_cfg)

        policy = make()
        data = compat.rollout(env, policy, env_cfg, seeds=[0], return_observations=True)
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


CAMERA = "observation.images.camera_top"
FRAMES = 29  # per episode: 4 whole chunks of the tiny so100 policy (8 k - 3 frames), as train's own tests
HEIGHT, WIDTH = 64, 128
TASK = "put the cube in the bowl"


@pytest.fixture(scope="module")
def recorded(tmp_path_factory) -> tuple[Path, np.ndarray]:
    """An SO-100 dataset recorded with the installed release's own `LeRobotDataset` (v2.1 with 0.3.2, v3.0 with
    0.4.4): two episodes of FRAMES frames, the actions named as the follower names its motors, one camera as
    video (what calibration and training read). Returns its root and all its actions."""
    lp.require_lerobot()  # 0.3.2 next to CPU torch: torchvision made importable before LeRobot imports it
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    root = tmp_path_factory.mktemp("lerobot_dataset") / "so100"
    names = [f"{m}.pos" for m in SO100_MOTORS]
    features = {
        "action": {"dtype": "float32", "shape": (6,), "names": names},
        "observation.state": {"dtype": "float32", "shape": (6,), "names": names},
        CAMERA: {"dtype": "video", "shape": (HEIGHT, WIDTH, 3), "names": ["height", "width", "channels"]},
    }
    ds = LeRobotDataset.create("local/lingbot_edge_so100", fps=30, root=root, robot_type="so100_follower",
                               features=features, use_videos=True)
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8)
    actions = []
    for _ in range(2):
        for t in range(FRAMES):
            a = np.concatenate([rng.uniform(-90, 90, 5), rng.uniform(0, 100, 1)]).astype(np.float32)
            actions.append(a)
            compat.add_frame(ds, {"action": a, "observation.state": a * 0.5, CAMERA: np.roll(base, 3 * t, axis=1)},
                             task=TASK)
        ds.save_episode()
    compat.finalize_dataset(ds)
    return root, np.stack(actions)


def test_recorded_dataset_stats_read_by_stats_flag_and_used_by_the_adapter(recorded, caplog):
    """`--stats DATASET` (run-so100 / serve) on the release's own recording: 0.4.4's meta/stats.json quantiles
    exactly; 0.3.2 records per-episode min/max only (episodes_stats.jsonl), aggregated with a warning."""
    import argparse

    lp.register_with_lerobot()  # before the factory's names are imported (0.3.2's are wrapped)
    from lerobot.datasets.lerobot_dataset import LeRobotDatasetMetadata
    from lerobot.policies.factory import make_policy, make_policy_config

    from lingbot_edge.flags import resolved_config, robot_overrides
    from lingbot_edge.io import datasets

    root, actions = recorded
    info = json.loads((root / "meta" / "info.json").read_text())
    assert info["codebase_version"] == compat.dataset_version()
    stats = datasets.read_action_stats(root)
    assert stats.version == compat.dataset_version() and stats.names == tuple(f"{m}.pos" for m in SO100_MOTORS)
    if compat.dataset_version() == "v3.0":
        own = json.loads((root / "meta" / "stats.json").read_text())["action"]  # LeRobot's own aggregate
        assert stats.bounds == "q01/q99"
        assert stats.low == tuple(own["q01"]) and stats.high == tuple(own["q99"])
        # LeRobot aggregates per-episode quantile estimates: inside the recorded range, not its extremes.
        assert (np.asarray(stats.low) >= actions.min(0)).all() and (np.asarray(stats.high) <= actions.max(0)).all()
        assert (np.asarray(stats.low) > actions.min(0)).any() and (np.asarray(stats.high) < actions.max(0)).any()
        expected = (np.asarray(own["q01"]), np.asarray(own["q99"]))
    else:
        assert not (root / "meta" / "stats.json").exists() and (root / "meta" / "episodes_stats.jsonl").exists()
        assert stats.bounds == "min/max"  # 0.3.2 records no quantiles
        np.testing.assert_allclose(stats.low, actions.min(0), rtol=0, atol=1e-5)
        np.testing.assert_allclose(stats.high, actions.max(0), rtol=0, atol=1e-5)
        expected = (actions.min(0), actions.max(0))
    datasets.check_action_names(stats, SO100_MOTORS)

    # What `lingbot-edge run-so100 --stats DATASET` puts on the policy's used channels.
    args = argparse.Namespace(checkpoint="tiny", preset="so100", transformer=None, settings=[], stats=str(root))
    overrides = robot_overrides(args, [])
    used = resolved_config(args)[0].used_action_channel_ids
    np.testing.assert_allclose([overrides["action_q01"][c] for c in used], expected[0], rtol=0, atol=1e-5)
    np.testing.assert_allclose([overrides["action_q99"][c] for c in used], expected[1], rtol=0, atol=1e-5)

    # The adapter, as `lerobot-record` builds it from this dataset: the tiny model's channels 0-5 take its bounds.
    meta = LeRobotDatasetMetadata("local/lingbot_edge_so100", root=root)
    cfg = make_policy_config("lingbot_edge", device="cpu", compile=False, action_channels=list(range(6)))
    with caplog.at_level("WARNING"):
        policy = make_policy(cfg, ds_meta=meta)
    pc = policy.lingbot.cfg
    assert pc.used_action_channel_ids == tuple(range(6)) and pc.obs_cam_keys == (CAMERA,)
    np.testing.assert_allclose(pc.action_q01[:6], expected[0], rtol=0, atol=1e-4)
    np.testing.assert_allclose(pc.action_q99[:6], expected[1], rtol=0, atol=1e-4)
    assert ("no q01/q99" in caplog.text) == (compat.dataset_version() == "v2.1")


def test_recorded_dataset_trains_and_calibrates(recorded, tmp_path, capsys):
    """`lingbot-edge train fit --dataset` and `lingbot-edge calibrate capture --data` read the release's recording
    (its parquet episodes and videos) through lingbot_edge.io.episodes.LeRobotEpisodes."""
    from lingbot_edge.cli.main import main
    from lingbot_edge.io.episodes import LeRobotEpisodes
    from lingbot_edge.io.loading import load_policy

    root, actions = recorded
    assert main(["train", "fit", "--out", str(tmp_path / "fit"), "--dataset", str(root), "--episodes", "2",
                 "--steps", "3", "--batch-size", "2", "--save-every", "3", "--camera", "camera_top",
                 "--height", str(HEIGHT), "--width", str(WIDTH)]) == 0
    report = json.loads((tmp_path / "fit" / "report.json").read_text())
    assert report["dataset"] == str(root) and report["episodes"] == 2 and report["chunks"] == 4
    assert all(np.isfinite(v) for v in report["final_loss"].values())
    ckpt = tmp_path / "fit" / "checkpoint"

    policy = load_policy(ckpt, device="cpu", compile=False)
    source = LeRobotEpisodes(root, policy)
    assert source.version == compat.dataset_version() and source.episode_ids() == ["episode_000000", "episode_000001"]
    rec = source.recording("episode_000001")
    assert rec.prompt == TASK and rec.frames[CAMERA].shape[1:] == (HEIGHT, WIDTH, 3)
    np.testing.assert_allclose(rec.actions, actions[FRAMES:FRAMES + len(rec.actions)], rtol=0, atol=1e-6)

    out = tmp_path / "calib"
    assert main(["calibrate", "capture", "--out", str(out), "--checkpoint", str(ckpt), "--data", str(root),
                 "--chunks", "2", "--device", "cpu", "--compile", "off"]) == 0
    assert "2 episodes" in capsys.readouterr().out and (out / "stats.safetensors").stat().st_size > 0
