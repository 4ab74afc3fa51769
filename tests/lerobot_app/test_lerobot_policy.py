"""The LeRobot adapter's framework-free parts (lingbot_edge.lerobot.adapter); no LeRobot needed.

The lazy-import error, the step <-> chunk bookkeeping (a fake policy returning real `Chunk`s, and the real
tiny policy against the direct loop), the env/dataset -> channel and camera mapping, image / prompt
conversion, the torchvision fallback kernel. With LeRobot: tests/lerobot_app/test_lerobot_adapter.py and
tests/lerobot_app/test_lerobot_eval.py (`make test-lerobot`).
"""

import importlib
import sys

import numpy as np
import pytest
import torch

from lingbot_edge.core.config import VAE_TEMPORAL, get_policy_config
from lingbot_edge.core.episode import Chunk
from lingbot_edge.io.torchvision_compat import nms_cpu
from lingbot_edge.lerobot import adapter as lp

# --------------------------------------------------------------------------------------------------
# Without LeRobot
# --------------------------------------------------------------------------------------------------


def test_missing_lerobot_raises_import_error_naming_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "lerobot", None)  # `import lerobot` fails, as when not installed
    monkeypatch.setattr(lp, "_CACHE", {})
    for name in ("LingBotEdgePolicy", "LingBotEdgeConfig"):
        with pytest.raises(ImportError, match=r"pip install 'lingbot-edge\[robot\]'"):
            getattr(lp, name)
    with pytest.raises(ImportError, match=r"pip install 'lingbot-edge\[robot\]'"):
        lp.register_with_lerobot()
    monkeypatch.delitem(sys.modules, "lingbot_edge_lerobot", raising=False)
    with pytest.raises(ImportError, match=r"lingbot-edge\[robot\]"):
        importlib.import_module("lingbot_edge_lerobot")
    with pytest.raises(AttributeError):
        lp.NoSuchThing  # noqa: B018
    # What needs no LeRobot keeps working.
    assert lp.batch_prompt({"task": ["x"]}) == "x"


def _stamp(t: int, cam: int, hw=(8, 8)) -> np.ndarray:
    """An observation whose pixels say which step it was taken at."""
    return np.full((*hw, 3), (t + 50 * cam) % 256, np.uint8)


class FakePolicy:
    """Stands in for LingBotPolicy: returns real `Chunk`s, checks the call protocol, records the feedback.

    Action [step, 0] = 100 * chunk + step, so the order actions are handed out is visible.
    """

    supports_lookahead = False
    takes_executing_keyframes = False

    def __init__(self, action_per_frame: int):
        self.cfg = get_policy_config("tiny").replace(action_per_frame=action_per_frame)
        self.feedbacks: list[tuple[dict, np.ndarray]] = []
        self.prompts: list[str] = []
        self.chunk_index = 0

    def reset(self, prompt: str) -> None:
        self.prompts.append(prompt)
        self.chunk_index, self.pending, self.feedbacks = 0, None, []

    def infer(self, obs, ahead=False) -> Chunk:
        assert self.pending is None, "infer twice without feedback"
        first = self.chunk_index == 0
        assert set(obs) == (set(self.cfg.obs_cam_keys) if first else set())
        steps = (self.cfg.frame_chunk_size - first) * self.cfg.action_per_frame
        a = np.zeros((steps, len(self.cfg.used_action_channel_ids)), np.float32)
        a[:, 0] = 100 * self.chunk_index + np.arange(steps)
        self.pending = Chunk(a, index=self.chunk_index, first=first, keyframe_stride=self.cfg.keyframe_stride,
                             cameras=self.cfg.obs_cam_keys)
        return self.pending

    def feedback(self, chunk):
        assert chunk is self.pending
        frames, executed = chunk.feedback_inputs()
        # Independent of Chunk: 4 keyframes per latent frame, F - 1 latent frames in the first chunk.
        want_t = VAE_TEMPORAL * (self.cfg.frame_chunk_size - (self.chunk_index == 0))
        assert all(frames[k].shape[0] == want_t for k in self.cfg.obs_cam_keys)
        self.feedbacks.append(({k: np.array(v) for k, v in frames.items()}, np.array(executed)))
        self.chunk_index += 1
        self.pending = None
        return {}

    def cancel(self):
        pass


@pytest.mark.parametrize("apf", [4, 8])  # keyframe stride 1 and 2
def test_runner_keyframes_feedback_and_action_order(apf):
    fake = FakePolicy(apf)
    cams = fake.cfg.obs_cam_keys
    stride = apf // VAE_TEMPORAL
    runner = lp.EpisodeRunner(fake)
    steps = [(fake.cfg.frame_chunk_size - (c == 0)) * apf for c in range(4)]  # 4 chunks
    handed, built = [], []
    for t in range(sum(steps) + 1):  # the last call triggers the 5th chunk

        def images(t=t):
            built.append(t)
            return {k: _stamp(t, i) for i, k in enumerate(cams)}

        handed.append(runner.step(images, prompt="stack")[0])
    assert fake.prompts == ["stack"] and runner.chunks == 5 and fake.chunk_index == 4
    expected = [100 * c + i for c, n in enumerate(steps) for i in range(n)] + [400]
    np.testing.assert_array_equal(handed, expected)
    start = 0  # global step at the start of chunk c; observation t follows the t-th executed action
    keyframe_t = [0]
    for c, (frames, executed) in enumerate(fake.feedbacks):
        want_t = [start + j for j in range(stride, steps[c] + 1, stride)]
        keyframe_t += want_t
        for i, k in enumerate(cams):
            np.testing.assert_array_equal(frames[k][:, 0, 0, 0], [(t + 50 * i) % 256 for t in want_t])
        np.testing.assert_array_equal(executed[:, 0], 100 * c + np.arange(steps[c]))
        start += steps[c]
    assert built == keyframe_t  # images are only converted for the first observation and keyframes
    runner.reset()  # a new episode starts from the next step's images
    runner.step({k: _stamp(0, 0) for k in cams}, prompt="other")
    assert fake.prompts == ["stack", "other"] and fake.chunk_index == 0 and runner.chunks == 1


def test_runner_chunk_level_calls_and_errors():
    fake = FakePolicy(8)
    cams = fake.cfg.obs_cam_keys
    runner = lp.EpisodeRunner(fake)
    with pytest.raises(RuntimeError, match="no episode"):
        runner.observe(None)
    with pytest.raises(ValueError, match="missing cameras"):
        runner.start({cams[0]: _stamp(0, 0)}, prompt="p")
    with pytest.raises(ValueError, match="HxWx3 uint8"):
        runner.start({k: np.zeros((8, 8, 3), np.float32) for k in cams}, prompt="p")
    chunk = runner.start({k: _stamp(0, 0) for k in cams}, prompt="p")
    runner.observe(None)  # step 1 is no keyframe (stride 2)
    with pytest.raises(ValueError, match="keyframe"):
        runner.observe(None)
    runner.observe(lambda: {k: _stamp(2, 0) for k in cams})  # images only built when needed
    with pytest.raises(RuntimeError, match=r"2 of the chunk's 8 steps were observed"):
        runner.next_chunk()
    # Keyframes recorded elsewhere, and what the robot really executed, can be fed back directly.
    frames = {k: np.zeros((4, 8, 8, 3), np.uint8) for k in cams}
    runner.next_chunk(executed_actions=chunk + 1, frames=frames)
    np.testing.assert_array_equal(fake.feedbacks[0][1], chunk + 1)
    assert runner.remaining == 16 and runner.chunks == 2


def test_runner_drives_the_tiny_policy_like_the_direct_loop():
    """EpisodeRunner.step on the real tiny policy = the README's loop written out (infer, execute, feedback)."""
    from lingbot_edge.io.loading import load_policy
    from lingbot_edge.testing.toy import ToyScene

    policy = load_policy("tiny", device="cpu", dtype="fp32", compile=False)
    cfg = policy.cfg
    first, later = (cfg.frame_chunk_size - 1) * cfg.action_per_frame, cfg.frame_chunk_size * cfg.action_per_frame
    stride = cfg.action_per_frame // VAE_TEMPORAL
    scene = ToyScene(cfg.obs_cam_keys, seed=0)
    policy.reset(prompt="push")
    direct = [policy.infer(scene.render()).actions]
    frames = {k: [] for k in cfg.obs_cam_keys}
    for i, a in enumerate(direct[-1]):
        scene.step(a)
        if (i + 1) % stride == 0:
            for k, img in scene.render().items():
                frames[k].append(img)
    policy.feedback({k: np.stack(v) for k, v in frames.items()}, direct[-1])
    direct = np.concatenate([direct[0], policy.infer({}).actions])
    assert len(direct) == first + later

    # The same policy again: reset() restarts the episode with the same noise seed.
    runner, scene = lp.EpisodeRunner(policy), ToyScene(cfg.obs_cam_keys, seed=0)
    stepped = []
    for _ in range(len(direct)):
        a = runner.step(scene.render, prompt="push")
        stepped.append(a)
        scene.step(a)
    np.testing.assert_allclose(np.stack(stepped), direct, atol=1e-6, rtol=0)
    assert runner.chunks == 2 and policy.chunk_index == 1


def test_action_settings_map_the_env_action_onto_model_channels(caplog):
    tiny = get_policy_config("tiny")  # 6 used channels (0, 1, 2, 3, 5, 6) of 8
    assert lp.action_settings(tiny, 6) == {}  # same size: the checkpoint's channels and quantiles
    # The tiny model adapts to a 2-d env action: channels 0, 1 with their quantiles (-1, 1), (-0.5, 0.5).
    assert lp.action_settings(tiny, 2, adaptable=True) == {"used_action_channel_ids": (0, 1)}
    ch = lp.action_settings(tiny, 2, adaptable=True, q01=[0, 10], q99=[512, 20])
    assert ch["used_action_channel_ids"] == (0, 1)
    assert ch["action_q01"][:2] == (0.0, 10.0) and ch["action_q99"][:2] == (512.0, 20.0)
    assert ch["action_q01"][2:] == tiny.action_q01[2:]
    ch = lp.action_settings(tiny, 3, channels=[7, 2, 4], q01=[1, 2, 3], q99=[4, 5, 6])
    assert ch["used_action_channel_ids"] == (7, 2, 4)
    assert [ch["action_q01"][i] for i in (7, 2, 4)] == [1, 2, 3]
    assert [ch["action_q99"][i] for i in (7, 2, 4)] == [4, 5, 6]
    # Dataset stats: q01/q99 where present, else min/max with a warning.
    stats = {"min": torch.tensor([-3.0, -4.0]), "max": torch.tensor([3.0, 4.0]), "q01": np.array([-2.0, -1.0]),
             "q99": np.array([2.0, 1.0])}
    ch = lp.action_settings(tiny, 2, adaptable=True, stats=stats)
    assert ch["action_q01"][:2] == (-2.0, -1.0) and ch["action_q99"][:2] == (2.0, 1.0)
    with caplog.at_level("WARNING"):
        ch = lp.action_settings(tiny, 2, adaptable=True, stats={"min": [-3, -4], "max": [3, 4]})
    assert ch["action_q01"][:2] == (-3.0, -4.0) and ch["action_q99"][:2] == (3.0, 4.0)
    assert "no q01/q99" in caplog.text
    # A trained checkpoint's channels are not guessed; bad input names the field.
    with pytest.raises(ValueError, match=r"action has 2 values.*set action_channels"):
        lp.action_settings(tiny, 2)
    with pytest.raises(ValueError, match="action_channels: 1 channel ids"):
        lp.action_settings(tiny, 2, channels=[0])
    with pytest.raises(ValueError, match="set both"):
        lp.action_settings(tiny, 2, adaptable=True, q01=[0, 0])
    with pytest.raises(ValueError, match="expected 2 values each"):
        lp.action_settings(tiny, 2, adaptable=True, q01=[0], q99=[1])
    with pytest.raises(ValueError, match=r"channels \[7\] have no range"):  # tiny q01[7] = -1, q99[7] = 1: set 0, 0
        lp.action_settings(tiny, 1, channels=[7], q01=[0], q99=[0])
    with pytest.raises(ValueError, match="do not fit"):
        lp.action_settings(tiny, 9, adaptable=True)


def test_camera_settings_map_the_env_images():
    tiny = get_policy_config("tiny")
    a, b = tiny.obs_cam_keys
    assert lp.camera_settings(tiny, [b, a, "observation.images.extra"], {}) == ({}, {a: a, b: b})
    mapped = {a: "observation.images.top", b: "observation.images.wrist"}
    assert lp.camera_settings(tiny, ["observation.images.wrist", "observation.images.top"], mapped) == ({}, mapped)
    assert lp.camera_settings(tiny, [], {a: "x"}) == ({}, {a: "x", b: b})  # features unknown: keys as given
    # The tiny model takes the env's cameras (pusht has one).
    assert lp.camera_settings(tiny, ["observation.image"], {}, adaptable=True) == (
        {"obs_cam_keys": ("observation.image",)}, {"observation.image": "observation.image"})
    with pytest.raises(ValueError, match=r"reads cameras \['observation.images.image', 'observation.images.image2'\]"):
        lp.camera_settings(tiny, ["observation.image"], {})
    with pytest.raises(ValueError, match="image_key_map"):
        lp.camera_settings(tiny, [a, b], {"observation.images.nope": a})
    libero = get_policy_config("libero")  # upstream's names, LeRobot's as aliases
    keys = ["observation.images.image", "observation.images.image2"]
    assert lp.camera_settings(libero, keys, {})[1] == dict(zip(libero.obs_cam_keys, keys, strict=True))


def test_image_conversion_and_prompt():
    img = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    lerobot_float = torch.from_numpy(img).permute(2, 0, 1)[None].float() / 255  # what LeRobot hands over
    np.testing.assert_array_equal(lp.lerobot_image_to_uint8(lerobot_float), img)
    np.testing.assert_array_equal(lp.lerobot_image_to_uint8(lerobot_float[0]), img)
    np.testing.assert_array_equal(lp.lerobot_image_to_uint8(torch.from_numpy(img).permute(2, 0, 1)), img)
    np.testing.assert_array_equal(lp.lerobot_image_to_uint8(lerobot_float, hflip=True), img[:, ::-1])
    with pytest.raises(ValueError, match="batch size 2"):
        lp.lerobot_image_to_uint8(lerobot_float.repeat(2, 1, 1, 1))
    with pytest.raises(ValueError, match=r"\[1, 3, H, W\]"):
        lp.lerobot_image_to_uint8(torch.from_numpy(img)[None])  # channel-last
    assert lp.batch_prompt({"task": "a"}) == lp.batch_prompt({"task": ["a"]}) == "a"
    assert lp.batch_prompt({}) == ""
    with pytest.raises(ValueError, match="one episode"):
        lp.batch_prompt({"task": ["a", "b"]})


def test_cpu_nms_fallback_kernel_matches_brute_force():
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(60, 2, generator=g) * 10
    boxes = torch.cat([xy, xy + 1 + torch.rand(60, 2, generator=g) * 3], 1)
    scores = torch.rand(60, generator=g)

    def iou(a, b):
        w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
        h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
        inter = w * h
        return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)

    keep = []
    for i in sorted(range(60), key=lambda i: -scores[i].item()):
        if all(iou(boxes[i].tolist(), boxes[j].tolist()) <= 0.3 for j in keep):
            keep.append(i)
    assert nms_cpu(boxes, scores, 0.3).tolist() == keep
    assert nms_cpu(torch.zeros(0, 4), torch.zeros(0), 0.5).numel() == 0
