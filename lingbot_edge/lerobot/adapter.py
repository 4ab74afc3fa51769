"""LeRobot adapter: `LingBotPolicy` behind LeRobot's `PreTrainedPolicy` interface.

LeRobot drives a policy one step at a time (`reset()`, then `select_action(batch)` once per control
step, the batch holding the observation the previous action led to); LingBot-VA works a chunk at a
time and must be told what really happened. The adapter follows the episode protocol of
`lingbot_edge.core.episode.Chunk` (which alone knows the keyframe cadence):

- first `select_action` of an episode: `LingBotPolicy.reset(batch["task"])`, then `infer` on the
  batch's camera images; the returned `Chunk` hands out one action per call;
- every later call: the batch is the observation after the last action handed out, recorded into the
  chunk (`chunk.record`, images only where `chunk.is_keyframe`); once the chunk is complete it goes to
  `LingBotPolicy.feedback(chunk)` and `infer({})` predicts the next one;
- one action per call: a `[1, n]` float32 CPU tensor in robot units, `n` = the env's / dataset's action
  size (the wrapped policy unnormalizes itself, so LeRobot's normalization is IDENTITY).

The policy is built by `lingbot_edge.io.loading.load_policy` (the one factory) from the config's
`checkpoint` (a folder, or "tiny"), `transformer`, `preset`, `dtype`, `compile`, `settings`. Which model
action channels carry the env's action comes from LeRobot's `output_features["action"]`: the
checkpoint's channels when the sizes agree, `action_channels` when given, else (the tiny model only,
random weights) the first `n` channels. Cameras likewise (`image_key_map`; the tiny model takes the
env's cameras).

This module imports without LeRobot: `EpisodeRunner`, the channel / camera mapping and the image
conversion need nothing but numpy/torch; `LingBotEdgeConfig` and `LingBotEdgePolicy` are created on
first access and raise `ImportError` naming `pip install 'lingbot-edge[robot]'` when LeRobot is missing.

From LeRobot's own tools (`lingbot_edge.io.lerobot_compat` holds what differs between the tested releases, 0.3.2
and 0.4.4). With LeRobot 0.4.4 LeRobot's own entry point loads the plugin:

    lerobot-eval --policy.discover_packages_path=lingbot_edge_lerobot --policy.type=lingbot_edge \\
        --policy.checkpoint=tiny --policy.device=cpu --env.type=pusht --eval.batch_size=1 --eval.n_episodes=1

With LeRobot 0.3.2 next to CPU torch 2.13, `lerobot-eval` dies importing its CUDA torchvision before any plugin
loads; the console script fixes that first and registers `--policy.type=lingbot_edge`:

    lingbot-edge-lerobot eval --env.type=pusht --policy.type=lingbot_edge --policy.checkpoint=tiny \\
        --policy.device=cpu --eval.batch_size=1 --eval.n_episodes=1
    lingbot-edge-lerobot record --robot.type=so100_follower ... --policy.type=lingbot_edge \\
        --policy.checkpoint=/ckpt/lingbot-va-so100 --policy.transformer=/ckpt/dit-int8

From Python:

    from lingbot_edge.lerobot.adapter import LingBotEdgeConfig, LingBotEdgePolicy
    policy = LingBotEdgePolicy(LingBotEdgeConfig(checkpoint="tiny", device="cpu"))
    policy = LingBotEdgePolicy(config, policy=my_lingbot_policy)   # an already-built LingBotPolicy (tests)
"""

from __future__ import annotations

import importlib
import logging
import threading
from typing import TYPE_CHECKING, Any

from lingbot_edge.io import lerobot_compat as compat
from lingbot_edge.io.torchvision_compat import ensure_torchvision_importable
from lingbot_edge.lerobot.bridge import (
    POLICY_TYPE,
    EpisodeRunner,
    action_settings,
    batch_prompt,
    camera_settings,
    lerobot_image_to_uint8,
)

if TYPE_CHECKING:  # pragma: no cover
    from lingbot_edge.lerobot.modeling import LingBotEdgeConfig, LingBotEdgePolicy

__all__ = [
    "INSTALL_HINT",
    "POLICY_TYPE",
    "EpisodeRunner",
    "LingBotEdgeConfig",
    "LingBotEdgePolicy",
    "action_settings",
    "batch_prompt",
    "camera_settings",
    "lerobot_image_to_uint8",
    "register_with_lerobot",
    "require_lerobot",
]

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'lingbot-edge[robot]'"
TESTED = compat.TESTED

_LAZY_CLASSES = ("LingBotEdgeConfig", "LingBotEdgePolicy")
_LOCK = threading.RLock()
_CACHE: dict[str, Any] = {}


# --------------------------------------------------------------------------------------------------
# Lazy LeRobot classes
# --------------------------------------------------------------------------------------------------


def require_lerobot() -> Any:
    """Import LeRobot (after making a broken CUDA torchvision importable); ImportError names the extra."""
    try:
        ensure_torchvision_importable()
        lerobot = importlib.import_module("lerobot")
        importlib.import_module("lerobot.configs.policies")
        importlib.import_module("lerobot.policies.pretrained")
    except ImportError as e:
        raise ImportError(
            f"The LeRobot adapter needs LeRobot (tested with {' and '.join(TESTED)}): {INSTALL_HINT}  "
            f"[import failed: {e}]"
        ) from e
    return lerobot


def _load() -> dict[str, Any]:
    with _LOCK:
        if not _CACHE:
            require_lerobot()
            mod = importlib.import_module(".modeling", __package__)
            _CACHE.update({name: getattr(mod, name) for name in _LAZY_CLASSES})
        return _CACHE


def __getattr__(name: str) -> Any:
    if name in _LAZY_CLASSES:
        return _load()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def register_with_lerobot() -> None:
    """Register `lingbot_edge` with LeRobot's config registry and its policy factory (idempotent).

    `PreTrainedConfig.register_subclass` happens when the classes are created. From LeRobot 0.4.0 that is all: the
    factory finds `LingBotEdgePolicy` and `make_lingbot_edge_pre_post_processors` next to the registered config
    class. LeRobot 0.3.x's `get_policy_class` / `make_policy_config` are hard-coded if-chains, so they are wrapped
    to answer `lingbot_edge` too (every other name goes to the original functions).
    """
    classes = _load()
    if compat.factory_finds_plugins():
        return
    factory = importlib.import_module("lerobot.policies.factory")
    with _LOCK:
        get_cls = factory.get_policy_class
        if not getattr(get_cls, "_lingbot_edge", False):

            def get_policy_class(name: str):
                return classes["LingBotEdgePolicy"] if name == POLICY_TYPE else get_cls(name)

            get_policy_class._lingbot_edge = True
            get_policy_class.__doc__ = get_cls.__doc__
            factory.get_policy_class = get_policy_class
        make_cfg = getattr(factory, "make_policy_config", None)
        if make_cfg is not None and not getattr(make_cfg, "_lingbot_edge", False):

            def make_policy_config(policy_type: str, **kwargs):
                if policy_type == POLICY_TYPE:
                    return classes["LingBotEdgeConfig"](**kwargs)
                return make_cfg(policy_type, **kwargs)

            make_policy_config._lingbot_edge = True
            factory.make_policy_config = make_policy_config
