"""LeRobot dataset metadata (v2.0 / v2.1 / v3.0): action bounds, the min/max fallback, the action names."""

import argparse
import json
import logging

import numpy as np
import pytest

from lingbot_edge.core.config import get_policy_config
from lingbot_edge.io.datasets import load_action_quantiles, quantile_overrides, read_action_stats
from lingbot_edge.robot.so100 import SO100_ACTION_KEYS, SO100_MOTORS

RNG = np.random.default_rng(0)


def _info(meta, version, names=SO100_ACTION_KEYS):
    feature = {"dtype": "float32", "shape": [6]}
    if names is not None:
        feature["names"] = list(names)
    (meta / "info.json").write_text(json.dumps({"codebase_version": version, "fps": 30,
                                                "features": {"action": feature}}))


def v21_dataset(root, episodes=3, names=SO100_ACTION_KEYS):
    """What LeRobot 0.3.2 records: per-episode stats in episodes_stats.jsonl, no stats.json."""
    meta = root / "meta"
    meta.mkdir(parents=True)
    _info(meta, "v2.1", names)
    actions = [RNG.uniform(-80, 80, (int(RNG.integers(20, 60)), 6)) for _ in range(episodes)]
    with open(meta / "episodes_stats.jsonl", "w") as f:
        for i, a in enumerate(actions):
            stats = {"min": a.min(0).tolist(), "max": a.max(0).tolist(), "mean": a.mean(0).tolist(),
                     "std": a.std(0).tolist(), "count": [len(a)]}
            f.write(json.dumps({"episode_index": i, "stats": {"action": stats}}) + "\n")
    return root, np.concatenate(actions)


def test_v21_episode_stats_are_aggregated_with_the_min_max_fallback_named(tmp_path, caplog):
    root, actions = v21_dataset(tmp_path / "ds")
    with caplog.at_level(logging.WARNING, logger="lingbot_edge.io.datasets"):
        q01, q99 = load_action_quantiles(root, SO100_MOTORS)
    np.testing.assert_allclose(q01, actions.min(0))  # over all frames of all episodes
    np.testing.assert_allclose(q99, actions.max(0))
    assert "falling back to min/max" in caplog.text and "episodes_stats.jsonl" in caplog.text
    stats = read_action_stats(root / "meta" / "episodes_stats.jsonl")
    assert stats.version == "v2.1" and stats.bounds == "min/max"


def test_v30_and_v20_stats_json_prefer_q01_q99(tmp_path, caplog):
    q01, q99 = [-50.0, -40, -30, -20, -10, 0], [50.0, 40, 30, 20, 10, 90]
    for version in ("v3.0", "v2.0"):
        meta = tmp_path / version / "meta"
        (meta / "episodes" / "chunk-000").mkdir(parents=True)  # v3.0 keeps per-episode stats in parquet here
        _info(meta, version)
        (meta / "stats.json").write_text(json.dumps({"action": {"q01": q01, "q99": q99, "min": [-99] * 6,
                                                                "max": [99] * 6}}))
        with caplog.at_level(logging.WARNING, logger="lingbot_edge.io.datasets"):
            assert load_action_quantiles(tmp_path / version, SO100_MOTORS) == (q01, q99)
        assert read_action_stats(meta).version == version
    assert "min/max" not in caplog.text
    (meta / "stats.json").write_text(json.dumps({"action": {"min": q01, "max": q99}}))
    with caplog.at_level(logging.WARNING, logger="lingbot_edge.io.datasets"):
        assert load_action_quantiles(meta / "stats.json", SO100_MOTORS) == (q01, q99)
    assert "falling back to min/max" in caplog.text


def test_action_names_and_sizes_are_checked(tmp_path, caplog):
    swapped = list(SO100_ACTION_KEYS)
    swapped[0], swapped[1] = swapped[1], swapped[0]
    root, _ = v21_dataset(tmp_path / "swapped", names=swapped)
    with pytest.raises(ValueError, match=r"action names \['shoulder_lift.pos', 'shoulder_pan.pos'.*motor order"):
        load_action_quantiles(root, SO100_MOTORS)
    old, _ = v21_dataset(tmp_path / "old", names=[f"main_{m}" for m in SO100_MOTORS])  # LeRobot < 0.2 names
    assert len(load_action_quantiles(old, SO100_MOTORS)[0]) == 6
    unnamed, _ = v21_dataset(tmp_path / "unnamed", names=None)
    with caplog.at_level(logging.WARNING, logger="lingbot_edge.io.datasets"):
        load_action_quantiles(unnamed, SO100_MOTORS)
    assert "no action names" in caplog.text
    with pytest.raises(ValueError, match="expected 5"):
        load_action_quantiles(root, SO100_MOTORS[:5])
    with pytest.raises(ValueError, match="no stats.json .* no episodes_stats.jsonl"):
        (tmp_path / "empty" / "meta").mkdir(parents=True)
        _info(tmp_path / "empty" / "meta", "v2.1")
        read_action_stats(tmp_path / "empty")
    with pytest.raises(ValueError, match="no such dataset"):
        read_action_stats(tmp_path / "nowhere")


def test_stats_flag_puts_the_quantiles_on_the_used_channels(tmp_path):
    from lingbot_edge.flags import add_policy_args, build_policy, robot_overrides

    root, actions = v21_dataset(tmp_path / "ds")
    p = argparse.ArgumentParser()
    add_policy_args(p, default_preset="so100")
    p.add_argument("--stats")
    args = p.parse_args(["--stats", str(root), "--device", "cpu"])
    policy = build_policy(args, **robot_overrides(args, []))
    cfg = policy.cfg
    assert cfg.used_action_channel_ids == tuple(range(6)) and len(cfg.action_q01) == 8  # the tiny model's width
    np.testing.assert_allclose(cfg.action_q01[:6], actions.min(0))
    np.testing.assert_allclose(cfg.action_q99[:6], actions.max(0))
    full = quantile_overrides(get_policy_config("so100"), [-1.0] * 6, [2.0] * 6)  # the full model: 30 wide
    assert len(full["action_q01"]) == 30 and full["action_q01"][:7] == (-1.0,) * 6 + (0.0,)
