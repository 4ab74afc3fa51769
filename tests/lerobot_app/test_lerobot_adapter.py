"""The LeRobot adapter through the installed LeRobot release's own registry, factory, CLI parser, processors and
record helpers (0.4.4: `make test-lerobot`; 0.3.2: `make test-lerobot-0.3`; each in its own venv).

Marked `lerobot`. `select_action` / `predict_action_chunk` are compared
with driving `LingBotPolicy` directly.
"""

import importlib.util
import sys

import numpy as np
import pytest
import torch

from lingbot_edge.core.config import VAE_TEMPORAL, get_policy_config
from lingbot_edge.io import lerobot_compat as compat
from lingbot_edge.lerobot import adapter as lp

HAS_LEROBOT = importlib.util.find_spec("lerobot") is not None
needs_lerobot = pytest.mark.skipif(not HAS_LEROBOT, reason="LeRobot not installed (make test-lerobot)")


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
def test_registration_follows_the_release(lerobot_api):
    """0.4 finds the plugin's classes by itself (nothing patched); 0.3.2's hard-coded factory is taught them."""
    from lingbot_edge.lerobot.adapter import LingBotEdgeConfig, LingBotEdgePolicy

    factory = lerobot_api
    patched = getattr(factory.get_policy_class, "_lingbot_edge", False)
    assert patched is not compat.factory_finds_plugins()
    assert factory.get_policy_class("lingbot_edge") is LingBotEdgePolicy
    assert type(factory.make_policy_config("lingbot_edge", device="cpu")) is LingBotEdgeConfig
    if compat.has_processors():
        pre, post = factory.make_pre_post_processors(factory.make_policy_config("lingbot_edge", device="cpu"))
        assert [type(s).__name__ for s in pre.steps] == ["RenameObservationsProcessorStep",
                                                          "AddBatchDimensionProcessorStep", "DeviceProcessorStep"]
        assert [type(s).__name__ for s in post.steps] == ["DeviceProcessorStep"]


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
    processors = compat.make_processors(policy.config)  # 0.4: what lerobot-record builds around the policy
    rng = np.random.default_rng(0)
    for _ in range(13):  # chunks of 4 + 8 steps, then the first action of the third chunk
        robot_obs = {k: float(rng.uniform(-50, 50)) for k in motors}  # SO100Follower.get_observation()
        robot_obs |= {k: rng.integers(0, 256, shape, dtype=np.uint8) for k, shape in cams.items()}
        frame = build_dataset_frame(features, robot_obs, prefix="observation")
        values = compat.predict_action(frame, policy, torch.device("cpu"), processors, task="pick",
                                       robot_type="so100_follower").reshape(-1)
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
    if compat.has_processors():  # 0.4: lerobot-eval --policy.path / the async server load them from the folder
        from lerobot.policies.factory import make_pre_post_processors

        assert (tmp_path / "policy_preprocessor.json").is_file() and (tmp_path / "policy_postprocessor.json").is_file()
        pre, post = make_pre_post_processors(
            loaded.config, pretrained_path=str(tmp_path),
            preprocessor_overrides={"device_processor": {"device": "cpu"},
                                    "rename_observations_processor": {"rename_map": {"observation.images.cam":
                                                                                     "observation.images.top"}}},
            postprocessor_overrides={"device_processor": {"device": "cpu"}})
        batch = pre({"observation.images.cam": torch.rand(3, 48, 64), "observation.images.wrist": torch.rand(3, 48, 64),
                     "observation.state": torch.zeros(6), "task": "pick"})
        assert batch["observation.images.top"].shape == (1, 3, 48, 64)  # renamed, batched
        loaded.reset()
        action = post(loaded.select_action(batch))
        assert action.shape == (1, 6) and action.device.type == "cpu"


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
    """LeRobot's torchvision must not break the frozen encoders' libraries."""
    from lingbot_edge.io.torchvision_compat import ensure_torchvision_importable, fallback_installed

    ensure_torchvision_importable()
    import torchvision  # noqa: F401
    from diffusers import AutoencoderKLWan  # noqa: F401
    from transformers import UMT5EncoderModel  # noqa: F401

    if fallback_installed():
        boxes = torch.tensor([[0.0, 0, 2, 2], [0.1, 0, 2, 2], [5, 5, 6, 6]])
        assert torch.ops.torchvision.nms(boxes, torch.tensor([0.9, 0.8, 0.7]), 0.5).tolist() == [0, 2]
