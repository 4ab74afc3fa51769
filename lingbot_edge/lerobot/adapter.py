"""LeRobot adapter: `LingBotPolicy` behind LeRobot's `PreTrainedPolicy` interface.

LeRobot drives a policy one step at a time (`reset()`, then `select_action(batch)` once per
control step, the batch holding the observation the previous action led to); LingBot-VA works a
chunk at a time and must be told what really happened (`infer` -> execute -> `feedback`). The
adapter bridges the two:

- first `select_action` of an episode: `LingBotPolicy.reset(batch["task"])`, then `infer` on the
  batch's camera images (the conditioning frame); the chunk's actions are queued;
- every later call: the batch is the observation after one more executed action; every
  `keyframe_stride` executed steps its camera images are kept as a keyframe. When the queue is
  empty, the keyframes and the executed actions go to `LingBotPolicy.feedback`, then `infer({})`
  predicts the next chunk;
- one action per call: a `[1, n_used]` float32 CPU tensor in robot units (the wrapped policy
  unnormalizes itself, so LeRobot's normalization is IDENTITY).

This module imports without LeRobot. `EpisodeRunner` (the step/chunk bookkeeping, numpy in and
out) and the image conversion need nothing but numpy/torch; `LingBotEdgeConfig` and
`LingBotEdgePolicy` are created on first access and raise `ImportError` naming
`pip install 'lingbot-edge[robot]'` when LeRobot is missing.

From LeRobot's own tools (0.3.2 hard-codes its policy list, so the plugin package
`lingbot_edge_lerobot` registers the config type and teaches `make_policy` the new class):

    python -m lerobot.scripts.eval --policy.discover_packages_path=lingbot_edge_lerobot \\
        --policy.type=lingbot_edge --policy.preset=tiny --eval.batch_size=1 ...
    python -m lingbot_edge_lerobot eval ...     # same, and works where torchvision is a CUDA build
    python -m lingbot_edge_lerobot record --robot.type=so100_follower ... --policy.type=lingbot_edge \\
        --policy.preset=so100 --policy.builder=my_pkg.load:build_so100   # function(config) -> LingBotPolicy

From Python:

    from lingbot_edge.lerobot.adapter import LingBotEdgeConfig, LingBotEdgePolicy
    policy = LingBotEdgePolicy(LingBotEdgeConfig(preset="tiny", device="cpu", compile=False))
    policy = LingBotEdgePolicy(config, policy=my_lingbot_policy)   # any already-built LingBotPolicy
"""

from __future__ import annotations

import importlib
import threading
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:  # pragma: no cover
    from lingbot_edge.core.policy import LingBotPolicy
    from lingbot_edge.lerobot.classes import LingBotEdgeConfig, LingBotEdgePolicy

__all__ = [
    "INSTALL_HINT",
    "POLICY_TYPE",
    "EpisodeRunner",
    "LingBotEdgeConfig",
    "LingBotEdgePolicy",
    "batch_prompt",
    "lerobot_image_to_uint8",
    "register_with_lerobot",
    "require_lerobot",
]

POLICY_TYPE = "lingbot_edge"
INSTALL_HINT = "pip install 'lingbot-edge[robot]'"

_LAZY_CLASSES = ("LingBotEdgeConfig", "LingBotEdgePolicy")
_LOCK = threading.RLock()
_CACHE: dict[str, Any] = {}


# --------------------------------------------------------------------------------------------------
# Lazy LeRobot classes
# --------------------------------------------------------------------------------------------------


def require_lerobot() -> Any:
    """Import LeRobot (after making a broken CUDA torchvision importable); ImportError names the extra."""
    from lingbot_edge.io.torchvision_compat import ensure_torchvision_importable

    try:
        ensure_torchvision_importable()
        lerobot = importlib.import_module("lerobot")
        importlib.import_module("lerobot.configs.policies")
        importlib.import_module("lerobot.policies.pretrained")
    except ImportError as e:
        raise ImportError(
            f"The LeRobot adapter needs LeRobot (tested with 0.3.2): {INSTALL_HINT}  [import failed: {e}]"
        ) from e
    return lerobot


def _load() -> dict[str, Any]:
    with _LOCK:
        if not _CACHE:
            require_lerobot()
            mod = importlib.import_module("._lerobot_classes", __package__)
            _CACHE.update({name: getattr(mod, name) for name in _LAZY_CLASSES})
        return _CACHE


def __getattr__(name: str) -> Any:
    if name in _LAZY_CLASSES:
        return _load()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def register_with_lerobot() -> None:
    """Register `lingbot_edge` with LeRobot's config registry and its policy factory (idempotent).

    `PreTrainedConfig.register_subclass` happens when the classes are created; LeRobot 0.3.2's
    `get_policy_class` / `make_policy_config` are hard-coded if-chains, so they are wrapped to
    answer `lingbot_edge` too (every other name goes to the original functions).
    """
    classes = _load()
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


# --------------------------------------------------------------------------------------------------
# LeRobot batch -> numpy
# --------------------------------------------------------------------------------------------------


def lerobot_image_to_uint8(img: torch.Tensor | np.ndarray, hflip: bool = False, key: str = "image") -> np.ndarray:
    """One LeRobot camera image -> HxWx3 uint8 (what `LingBotPolicy` takes).

    LeRobot hands images channel-first, float32 in [0, 1] (`uint8 / 255`), with a batch dim of 1:
    `[1, 3, H, W]` or `[3, H, W]`. Float values are scaled by 255 and rounded (exact for images
    that came from uint8); uint8 tensors pass through.
    """
    t = img if isinstance(img, torch.Tensor) else torch.as_tensor(np.asarray(img))
    if t.dim() == 4:
        if t.shape[0] != 1:
            raise ValueError(f"{key}: batch size {t.shape[0]}; the adapter runs one episode at a time (batch size 1)")
        t = t[0]
    if t.dim() != 3 or t.shape[0] != 3 or 0 in t.shape:
        raise ValueError(f"{key}: expected a LeRobot image [1, 3, H, W] or [3, H, W], got shape {list(img.shape)}")
    if t.dtype == torch.uint8:
        out = t
    elif t.is_floating_point():
        out = (t.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)
    else:
        raise ValueError(f"{key}: expected float in [0, 1] or uint8, got dtype {t.dtype}")
    out = out.permute(1, 2, 0)
    if hflip:
        out = out.flip(1)
    return out.cpu().contiguous().numpy()


def batch_prompt(batch: Mapping[str, Any]) -> str:
    """The episode's language instruction from `batch["task"]` (str, or a list of one str); "" if absent."""
    task = batch.get("task")
    if isinstance(task, list | tuple):
        if len(task) > 1:
            raise ValueError(f"task: batch of {len(task)} prompts; the adapter runs one episode at a time")
        task = task[0] if task else None
    if task is None:
        return ""
    if not isinstance(task, str):
        raise TypeError(f"task: expected str or a list of one str, got {type(task).__name__}")
    return task


# --------------------------------------------------------------------------------------------------
# The step <-> chunk bookkeeping (framework-free)
# --------------------------------------------------------------------------------------------------

Images = Mapping[str, np.ndarray]


class EpisodeRunner:
    """Step-wise driving of a `LingBotPolicy` with keyframe feedback; numpy in and out.

    `step(images, prompt)` is LeRobot's `select_action` without the tensor conversions: the first
    call of an episode starts it (reset + infer on `images`), every later call reports the
    observation after one more executed action and returns the next action. Chunk-level callers
    use `start` / `observe` / `next_chunk` directly.

    `images` maps the policy's camera keys (`policy.cfg.obs_cam_keys`) to HxWx3 uint8 frames, or is
    a zero-argument callable returning that mapping: it is only called when the frames are needed
    (the first observation, keyframes), so non-keyframe steps cost no image conversion.
    """

    def __init__(self, policy: LingBotPolicy):
        self.policy = policy
        self.cfg = policy.cfg
        self.camera_keys = tuple(self.cfg.obs_cam_keys)
        self.keyframe_stride = self.cfg.keyframe_stride
        self.reset()

    def reset(self) -> None:
        """Forget the episode; the next `step` / `start` begins a new one."""
        self.started = False
        self.chunk: np.ndarray | None = None  # [steps, n_used] robot units
        self.executed = 0  # steps of `chunk` executed (observed) so far
        self.frames: dict[str, list[np.ndarray]] = {k: [] for k in self.camera_keys}
        self.chunks = 0  # chunks predicted this episode

    # ---------------------------------------------------------------- state

    @property
    def remaining(self) -> int:
        """Actions of the current chunk not handed out yet."""
        return 0 if self.chunk is None else len(self.chunk) - self.executed

    @property
    def next_observation_is_keyframe(self) -> bool:
        return self.started and (self.executed + 1) % self.keyframe_stride == 0

    def _images(self, images: Images | Callable[[], Images]) -> dict[str, np.ndarray]:
        images = images() if callable(images) else images
        missing = [k for k in self.camera_keys if k not in images]
        if missing:
            raise ValueError(f"images: missing cameras {missing}; expected {list(self.camera_keys)}")
        out = {}
        for k in self.camera_keys:
            img = np.asarray(images[k])
            if img.dtype != np.uint8 or img.ndim != 3 or img.shape[-1] != 3:
                raise ValueError(f"images[{k!r}]: expected HxWx3 uint8, got shape {list(img.shape)} dtype {img.dtype}")
            out[k] = img
        return out

    def _set_chunk(self, actions: np.ndarray) -> np.ndarray:
        self.chunk = np.asarray(actions, dtype=np.float32)
        self.executed = 0
        self.frames = {k: [] for k in self.camera_keys}
        self.chunks += 1
        return self.chunk

    # ---------------------------------------------------------------- chunk level

    def start(self, images: Images | Callable[[], Images], prompt: str) -> np.ndarray:
        """Begin an episode: reset the policy with `prompt`, predict the first chunk from `images`."""
        self.reset()
        frames = self._images(images)
        self.policy.reset(prompt=prompt)
        out = self.policy.infer(frames)
        self.started = True
        return self._set_chunk(out["actions"])

    def observe(self, images: Images | Callable[[], Images] | None) -> None:
        """Report the observation after the next action of the chunk was executed.

        Every `keyframe_stride`-th one is kept as a keyframe (then `images` must not be None).
        """
        if not self.started:
            raise RuntimeError("observe: no episode running (call start / step first)")
        if self.remaining == 0:
            raise RuntimeError(f"observe: all {len(self.chunk)} steps of the chunk were observed; call next_chunk()")
        step = self.executed + 1
        if step % self.keyframe_stride == 0:
            if images is None:
                raise ValueError(f"observe: step {step} of the chunk is a keyframe; images are required")
            for k, img in self._images(images).items():
                self.frames[k].append(np.array(img, copy=True))  # camera buffers may be reused
        self.executed = step

    def next_chunk(
        self, executed_actions: np.ndarray | None = None, frames: Mapping[str, np.ndarray] | None = None
    ) -> np.ndarray:
        """Feed back what happened during the current chunk, then predict the next one.

        `executed_actions` defaults to the chunk as predicted. `frames` ({camera: [T, H, W, 3] uint8})
        overrides the keyframes gathered by `observe`; without it every step must have been observed.
        """
        if not self.started:
            raise RuntimeError("next_chunk: no episode running (call start / step first)")
        if frames is None:
            if self.remaining:
                raise RuntimeError(
                    f"next_chunk: {self.executed} of the chunk's {len(self.chunk)} steps were observed; "
                    "report each executed step with observe(...) (or pass frames=...) before the next chunk"
                )
            frames = {k: np.stack(v) for k, v in self.frames.items()}
        executed = self.chunk if executed_actions is None else executed_actions
        self.policy.feedback(frames, executed)
        out = self.policy.infer({})
        return self._set_chunk(out["actions"])

    # ---------------------------------------------------------------- step level

    def step(self, images: Images | Callable[[], Images], prompt: str = "") -> np.ndarray:
        """One control step: returns the next action [n_used] (robot units) to execute."""
        if not self.started:
            self.start(images, prompt)
        else:
            self.observe(images if self.next_observation_is_keyframe else None)
            if self.remaining == 0:
                self.next_chunk()
        return self.chunk[self.executed]
