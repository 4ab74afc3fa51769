"""The LeRobot adapter (lingbot_edge.lerobot.adapter).

Unmarked tests run everywhere (no LeRobot needed): the lazy-import error, the step <-> chunk
bookkeeping against a recording fake policy, image / prompt conversion, the torchvision fallback
kernel. Tests marked `lerobot` need LeRobot 0.3.2 (`make test-lerobot`, a separate venv): they go
through LeRobot's own registry / factory / CLI parser and compare `select_action` with driving
`LingBotPolicy` directly.
"""

import importlib.util
import sys

import numpy as np
import pytest
import torch

from lingbot_edge.core.config import VAE_TEMPORAL, get_policy_config
from lingbot_edge.core.episode import Chunk
from lingbot_edge.io.torchvision_compat import nms_cpu
from lingbot_edge.lerobot import adapter as lp

HAS_LEROBOT = importlib.util.find_spec("lerobot") is not None
needs_lerobot = pytest.mark.skipif(not HAS_LEROBOT, reason="LeRobot not installed (make test-lerobot)")


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

    def __init__(self, action_per_frame: int):
        self.cfg = get_policy_config("tiny").replace(action_per_frame=action_per_frame)
        self.feedbacks: list[tuple[dict, np.ndarray]] = []
        self.prompts: list[str] = []
        self.chunk_index = 0

    def reset(self, prompt: str) -> None:
        self.prompts.append(prompt)
        self.chunk_index, self.pending, self.feedbacks = 0, None, []

    def infer(self, obs) -> Chunk:
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


# --------------------------------------------------------------------------------------------------
# With LeRobot (make test-lerobot)
# --------------------------------------------------------------------------------------------------

PROMPT = "put the cube in the bowl"


class Scene:
    """A toy two-camera scene whose images depend on the time step and the executed actions."""

    def __init__(self, cams, seed=0, hw=(64, 64)):
        rng = np.random.default_rng(seed)
        self.cams = cams
        self.base = {k: rng.integers(0, 256, (*hw, 3), dtype=np.uint8) for k in cams}
        self.t, self.pos = 0, 0.0

    def render(self) -> dict[str, np.ndarray]:
        shift = 3 * self.t + int(10 * np.tanh(self.pos))
        return {k: np.roll(img, shift, axis=1) for k, img in self.base.items()}

    def step(self, action: np.ndarray) -> None:
        self.pos += float(np.sum(action))
        self.t += 1


def lerobot_batch(images: dict[str, np.ndarray]) -> dict:
    """What `lerobot.scripts.eval` hands `select_action` (preprocess_observation + add_envs_task)."""
    batch = {k: torch.from_numpy(v).permute(2, 0, 1)[None].float() / 255 for k, v in images.items()}
    batch["observation.state"] = torch.zeros(1, 8)
    batch["task"] = [PROMPT]
    return batch


def reference_chunks(policy, n_chunks: int, seed: int = 0) -> list[np.ndarray]:
    """Drive LingBotPolicy directly (the README's loop), executing every chunk in the scene."""
    cfg = policy.cfg
    stride = cfg.action_per_frame // VAE_TEMPORAL
    scene = Scene(cfg.obs_cam_keys, seed)
    policy.reset(prompt=PROMPT)
    chunks = [policy.infer(scene.render()).actions]
    for _ in range(n_chunks - 1):
        frames = {k: [] for k in cfg.obs_cam_keys}
        for i, a in enumerate(chunks[-1]):
            scene.step(a)
            if (i + 1) % stride == 0:
                for k, img in scene.render().items():
                    frames[k].append(img)
        policy.feedback({k: np.stack(v) for k, v in frames.items()}, chunks[-1])
        chunks.append(policy.infer({}).actions)
    return chunks


@pytest.fixture(scope="module")
def lerobot_api():
    if not HAS_LEROBOT:
        pytest.skip("LeRobot not installed")
    lp.register_with_lerobot()
    from lerobot.policies import factory

    return factory


@pytest.fixture(scope="module")
def adapter(lerobot_api):
    factory = lerobot_api
    cfg = factory.make_policy_config("lingbot_edge", device="cpu", compile=False)
    return factory.get_policy_class("lingbot_edge")(cfg)


@pytest.fixture(scope="module")
def reference():
    from lingbot_edge.io.loading import load_policy

    return reference_chunks(load_policy("tiny", device="cpu", compile=False), 5)  # the adapter's defaults


def _features(cams, n_action, hw=(64, 64)):
    """A dataset's `features` as `lerobot.record` writes them (ds_meta.features)."""
    features = {k: {"dtype": "video", "shape": (*hw, 3), "names": ["height", "width", "channels"]} for k in cams}
    features["observation.state"] = {"dtype": "float32", "shape": (n_action,), "names": None}
    features["action"] = {"dtype": "float32", "shape": (n_action,), "names": None}
    return features


@pytest.mark.lerobot
@needs_lerobot
def test_config_registered_and_round_trips(lerobot_api, tmp_path):
    factory = lerobot_api
    from lerobot.configs.policies import PreTrainedConfig

    from lingbot_edge.lerobot.adapter import LingBotEdgeConfig, LingBotEdgePolicy

    assert PreTrainedConfig.get_choice_class("lingbot_edge") is LingBotEdgeConfig
    assert factory.get_policy_class("lingbot_edge") is LingBotEdgePolicy
    assert factory.get_policy_class("act").__name__ == "ACTPolicy"  # the others still resolve
    cfg = factory.make_policy_config("lingbot_edge", device="cpu", compile=False, action_channels=[0, 1],
                                     action_q01=[0.0, 0.0], action_q99=[512.0, 512.0],
                                     settings=["num_inference_steps=2"],
                                     image_key_map={"observation.images.image": "observation.images.top"})
    assert cfg.type == "lingbot_edge" and cfg.checkpoint == "tiny"
    cfg.save_pretrained(tmp_path)  # what --policy.path=<dir> reads back
    loaded = PreTrainedConfig.from_pretrained(tmp_path)
    assert type(loaded) is LingBotEdgeConfig and loaded.compile is False
    assert loaded.image_key_map == {"observation.images.image": "observation.images.top"}
    assert loaded.action_channels == [0, 1] and loaded.action_q99 == [512.0, 512.0]
    assert loaded.settings == ["num_inference_steps=2"]
    with pytest.raises(ValueError, match="preset"):
        LingBotEdgeConfig(device="cpu", preset="nope")
    with pytest.raises(ValueError, match="dtype"):
        LingBotEdgeConfig(device="cpu", dtype="int3")
    with pytest.raises(ValueError, match="--set nope: unknown policy setting"):
        LingBotEdgeConfig(device="cpu", settings=["nope=1"])


@pytest.mark.lerobot
@needs_lerobot
def test_lerobot_cli_plugin_and_make_policy(lerobot_api, monkeypatch):
    """`--policy.discover_packages_path=lingbot_edge_lerobot --policy.type=lingbot_edge` as the CLI parses it;
    the action size comes from the dataset's action feature, the tiny model adapts its channels."""
    from dataclasses import dataclass
    from types import SimpleNamespace

    factory = lerobot_api
    from lerobot.configs import parser
    from lerobot.configs.policies import PreTrainedConfig

    from lingbot_edge.lerobot.adapter import LingBotEdgePolicy

    @dataclass
    class Pipeline:
        policy: PreTrainedConfig | None = None

    @parser.wrap()
    def main(cfg: Pipeline):
        return cfg

    monkeypatch.setattr(sys, "argv", ["record", "--policy.discover_packages_path=lingbot_edge_lerobot",
                                      "--policy.type=lingbot_edge", "--policy.device=cpu", "--policy.compile=false",
                                      "--policy.seed=3", "--policy.dtype=fp32", "--policy.action_channels=[4,0,2]",
                                      "--policy.settings=[num_inference_steps=2]"])
    cfg = main().policy
    assert cfg.type == "lingbot_edge" and cfg.seed == 3 and cfg.compile is False and cfg.dtype == "fp32"
    assert cfg.action_channels == [4, 0, 2] and cfg.settings == ["num_inference_steps=2"]

    cams = get_policy_config("tiny").obs_cam_keys
    stats = {"action": {"min": np.array([-5.0, -6.0, -7.0]), "max": np.array([5.0, 6.0, 7.0])}}
    policy = factory.make_policy(cfg, ds_meta=SimpleNamespace(features=_features(cams, 3), stats=stats))
    assert isinstance(policy, LingBotEdgePolicy) and policy.lingbot.seed == 3
    pc = policy.lingbot.cfg
    assert pc.used_action_channel_ids == (4, 0, 2) and pc.num_inference_steps == 2
    assert [pc.action_q01[c] for c in (4, 0, 2)] == [-5, -6, -7] and [pc.action_q99[c] for c in (4, 0, 2)] == [5, 6, 7]
    assert next(policy.parameters()).device.type == "cpu"  # what eval's get_device_from_parameters reads
    assert next(policy.parameters()).dtype == torch.float32

    # Without action_channels the tiny model puts a 7-d action on channels 0-6.
    cfg = factory.make_policy_config("lingbot_edge", device="cpu", compile=False)
    policy = factory.make_policy(cfg, ds_meta=SimpleNamespace(features=_features(cams, 7), stats={}))
    assert policy.lingbot.cfg.used_action_channel_ids == tuple(range(7))
    assert cfg.output_features["action"].shape == (7,)


@pytest.mark.lerobot
@needs_lerobot
def test_checkpoint_folder_and_action_channels(lerobot_api, tmp_path):
    """A checkpoint folder goes through load_policy; its trained channels are not guessed for another action."""
    from types import SimpleNamespace

    from lingbot_edge.io.loading import load_policy
    from lingbot_edge.testing.checkpoints import save_tiny_checkpoint

    factory = lerobot_api
    root = save_tiny_checkpoint(tmp_path / "ckpt", seed=5)
    cams = get_policy_config("tiny").obs_cam_keys
    cfg = factory.make_policy_config("lingbot_edge", device="cpu", compile=False, checkpoint=str(root), preset="tiny")
    policy = factory.make_policy(cfg, ds_meta=SimpleNamespace(features=_features(cams, 6), stats={}))
    direct = load_policy(root, preset="tiny", device="cpu", compile=False)
    for (k, a), (k2, b) in zip(policy.model.state_dict().items(), direct.model.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(a, b)  # the folder's weights, not the embedded tiny ones
    assert policy.lingbot.checkpoint.root == direct.checkpoint.root

    cfg = factory.make_policy_config("lingbot_edge", device="cpu", compile=False, checkpoint=str(root), preset="tiny")
    with pytest.raises(ValueError, match=r"action has 2 values.*action_channels"):
        factory.make_policy(cfg, ds_meta=SimpleNamespace(features=_features(cams, 2), stats={}))
    cfg = factory.make_policy_config("lingbot_edge", device="cpu", compile=False, checkpoint=str(root), preset="tiny",
                                     action_channels=[1, 0], action_q01=[0, 0], action_q99=[512, 96])
    policy = factory.make_policy(cfg, ds_meta=SimpleNamespace(features=_features(cams, 2), stats={}))
    assert policy.lingbot.cfg.used_action_channel_ids == (1, 0)
    assert policy.lingbot.cfg.action_q99[:2] == (96, 512)
    feats = _features(("observation.images.top",), 6)
    cfg = factory.make_policy_config("lingbot_edge", device="cpu", compile=False, checkpoint=str(root), preset="tiny")
    with pytest.raises(ValueError, match="image_key_map"):  # a trained checkpoint keeps its cameras
        factory.make_policy(cfg, ds_meta=SimpleNamespace(features=feats, stats={}))


SO100_MOTORS = ("shoulder_pan", "shoulder_lift", "elbow_flex", "wrist_flex", "wrist_roll", "gripper")


@pytest.mark.lerobot
@needs_lerobot
def test_so100_record_loop_path(lerobot_api, tmp_path):
    """`lerobot.record`'s policy path for an SO-100 follower: dataset features from the robot's
    features, `build_dataset_frame`, `predict_action`, one action dict per step; then save / load."""
    from types import SimpleNamespace

    from lerobot.datasets.utils import build_dataset_frame, hw_to_dataset_features
    from lerobot.utils.control_utils import predict_action

    from lingbot_edge.lerobot.adapter import LingBotEdgePolicy

    factory = lerobot_api
    motors = {f"{m}.pos": float for m in SO100_MOTORS}  # SO100Follower.action_features
    cams = {"top": (48, 64, 3), "wrist": (48, 64, 3)}  # robot camera names -> (h, w, 3)
    features = {**hw_to_dataset_features({**motors, **cams}, "observation"), **hw_to_dataset_features(motors, "action")}
    cfg = factory.make_policy_config(
        "lingbot_edge", device="cpu", compile=False, preset="so100", seed=1,
        image_key_map={"observation.images.camera_top": "observation.images.top",
                       "observation.images.camera_wrist_left": "observation.images.wrist",
                       "observation.images.camera_wrist_right": "observation.images.wrist"})
    policy = factory.make_policy(cfg, ds_meta=SimpleNamespace(features=features, stats={}))
    assert isinstance(policy, LingBotEdgePolicy)
    assert policy.lingbot.cfg.used_action_channel_ids == tuple(range(6))  # so100 preset on the tiny model
    policy.reset()
    rng = np.random.default_rng(0)
    for _ in range(13):  # chunks of 4 + 8 steps, then the first action of the third chunk
        robot_obs = {k: float(rng.uniform(-50, 50)) for k in motors}  # SO100Follower.get_observation()
        robot_obs |= {k: rng.integers(0, 256, shape, dtype=np.uint8) for k, shape in cams.items()}
        frame = build_dataset_frame(features, robot_obs, prefix="observation")
        values = predict_action(frame, policy, torch.device("cpu"), False, task="pick", robot_type="so100_follower")
        action = {key: values[i].item() for i, key in enumerate(motors)}  # what robot.send_action gets
        assert list(action) == list(motors) and all(np.isfinite(v) for v in action.values())
    assert policy.lingbot.chunk_index == 2 and policy.lingbot.prompt == "pick"

    with torch.no_grad():
        next(policy.model.parameters()).add_(1.0)  # weights that differ from a fresh build
    policy.save_pretrained(tmp_path)  # what --policy.path=<dir> loads
    loaded = LingBotEdgePolicy.from_pretrained(tmp_path)
    assert loaded.config.image_key_map == cfg.image_key_map and loaded.lingbot.seed == 1
    assert loaded.config.preset == "so100" and loaded.lingbot.cfg.obs_cam_keys == policy.lingbot.cfg.obs_cam_keys
    for (k, a), (k2, b) in zip(policy.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(a, b)


@pytest.mark.lerobot
@needs_lerobot
def test_select_action_feeds_back_and_matches_direct_policy(adapter, reference):
    cfg = adapter.lingbot.cfg
    n_used = len(cfg.used_action_channel_ids)
    lengths = [len(c) for c in reference]
    scene = Scene(cfg.obs_cam_keys)
    adapter.reset()
    actions, chunk_index = [], []
    for _ in range(sum(lengths[:4]) + 1):  # 4 full chunks, then the first action of the 5th
        with torch.inference_mode():  # as lerobot's eval / record loops call it
            a = adapter.select_action(lerobot_batch(scene.render()))
        assert a.shape == (1, n_used) and a.dtype == torch.float32
        actions.append(a[0].numpy())
        chunk_index.append(adapter.lingbot.chunk_index)
        scene.step(a[0].numpy())
    np.testing.assert_allclose(np.stack(actions), np.concatenate(reference)[: len(actions)], atol=1e-6, rtol=0)
    # Feedback happened at every chunk boundary: the wrapped policy's chunk counter advanced.
    assert chunk_index[0] == 0 and chunk_index[-1] == 4
    assert chunk_index[lengths[0]] == 1 and chunk_index[lengths[0] - 1] == 0

    adapter.reset()  # a new episode: same seed, same scene -> the same actions again
    scene = Scene(cfg.obs_cam_keys)
    again = []
    for _ in range(lengths[0] + 2):
        a = adapter.select_action(lerobot_batch(scene.render()))[0].numpy()
        again.append(a)
        scene.step(a)
    np.testing.assert_allclose(np.stack(again), np.stack(actions[: len(again)]), atol=1e-6, rtol=0)
    assert adapter.lingbot.chunk_index == 1 and adapter.runner.chunks == 2


@pytest.mark.lerobot
@needs_lerobot
def test_predict_action_chunk(adapter, reference):
    cfg = adapter.lingbot.cfg
    scene = Scene(cfg.obs_cam_keys)
    adapter.reset()
    first = adapter.predict_action_chunk(lerobot_batch(scene.render()))
    assert first.shape == (1, *reference[0].shape)
    np.testing.assert_allclose(first[0].numpy(), reference[0], atol=1e-6, rtol=0)
    with pytest.raises(RuntimeError, match="observe"):
        adapter.predict_action_chunk(lerobot_batch(scene.render()))
    for a in first[0].numpy():  # chunk-level caller: execute, report each observation
        scene.step(a)
        adapter.observe(lerobot_batch(scene.render()))
    second = adapter.predict_action_chunk()
    np.testing.assert_allclose(second[0].numpy(), reference[1], atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="batch size 2"):
        adapter.reset()
        batch = lerobot_batch(scene.render())
        adapter.select_action({k: v.repeat(2, 1, 1, 1) if "images" in k else v for k, v in batch.items()})
    with pytest.raises(NotImplementedError, match="inference only"):
        adapter.forward({})


@pytest.mark.lerobot
@needs_lerobot
def test_transformers_and_diffusers_import_next_to_lerobot(lerobot_api):
    """LeRobot's torchvision must not break the frozen encoders' libraries (ENVIRONMENT.md)."""
    from lingbot_edge.io.torchvision_compat import ensure_torchvision_importable, fallback_installed

    ensure_torchvision_importable()
    import torchvision  # noqa: F401
    from diffusers import AutoencoderKLWan  # noqa: F401
    from transformers import UMT5EncoderModel  # noqa: F401

    if fallback_installed():
        boxes = torch.tensor([[0.0, 0, 2, 2], [0.1, 0, 2, 2], [5, 5, 6, 6]])
        assert torch.ops.torchvision.nms(boxes, torch.tensor([0.9, 0.8, 0.7]), 0.5).tolist() == [0, 2]
