"""What the LeRobot policy class (`lingbot_edge.lerobot.modeling`) and the adapter's users share, without LeRobot:
policy settings from a dataset's features and statistics, LeRobot images as the runtime's uint8 frames, the
prompt of a batch, and `EpisodeRunner`, the episode protocol behind `select_action`."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:  # pragma: no cover
    from lingbot_edge.core.config import PolicyConfig
    from lingbot_edge.core.episode import Chunk
    from lingbot_edge.core.policy import LingBotPolicy

log = logging.getLogger(__name__)

POLICY_TYPE = "lingbot_edge"


# --------------------------------------------------------------------------------------------------
# The env's / dataset's features -> policy settings (framework-free)
# --------------------------------------------------------------------------------------------------


def _stat(stats: Mapping[str, Any], key: str) -> np.ndarray | None:
    value = stats.get(key)
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    return np.asarray(value, dtype=np.float64).reshape(-1)


def action_settings(base: PolicyConfig, n_actions: int, *, channels: Sequence[int] | None = None,
                    q01: Sequence[float] | None = None, q99: Sequence[float] | None = None,
                    stats: Mapping[str, Any] | None = None, adaptable: bool = False) -> dict[str, Any]:
    """PolicyConfig changes that put an `n_actions`-wide env / dataset action on the model's channels.

    Channels: `channels` (one model channel id per action value) if given; else the checkpoint's
    `used_action_channel_ids` when their count is `n_actions`; else, when `adaptable` (the embedded tiny
    model: random weights, no trained mapping), channels 0 .. n-1; else an error asking for `channels`.
    Quantiles (robot units, one per action value): `q01` / `q99` if given; the checkpoint's when its
    channels are kept; else the dataset's action `stats` (q01/q99, or min/max with a warning); else the
    checkpoint's values of those channels, which must span a range.
    """
    used = tuple(base.used_action_channel_ids)
    dim = base.model_config.action_dim
    if channels is not None:
        channels = tuple(int(c) for c in channels)
        if len(channels) != n_actions:
            raise ValueError(f"action_channels: {len(channels)} channel ids for an action of {n_actions} values "
                             f"(output_features['action'] shape ({n_actions},)); expected one id per value")
    elif len(used) == n_actions:
        channels = used
    elif adaptable:
        if n_actions > dim:
            raise ValueError(f"output_features['action']: {n_actions} values do not fit the model's {dim} "
                             "action channels")
        channels = tuple(range(n_actions))
        log.info("action: the env's %d values on model channels %s (the checkpoint used %s)", n_actions,
                 list(channels), list(used))
    else:
        raise ValueError(
            f"output_features['action']: the env / dataset action has {n_actions} values, the checkpoint's "
            f"policy {base.name!r} produces {len(used)} (used_action_channel_ids {list(used)}); set "
            f"action_channels (--policy.action_channels='[...]', {n_actions} model channel ids in [0, {dim}))")
    if (q01 is None) != (q99 is None):
        raise ValueError("action_q01/action_q99: set both or neither")
    values, source = None, None
    if q01 is not None:
        values, source = (np.asarray(q01, np.float64).reshape(-1), np.asarray(q99, np.float64).reshape(-1)), "config"
        if values[0].shape != (n_actions,) or values[1].shape != (n_actions,):
            raise ValueError(f"action_q01/action_q99: expected {n_actions} values each (one per action value), "
                             f"got {values[0].size}/{values[1].size}")
    elif channels != used and stats:
        lo, hi = _stat(stats, "q01"), _stat(stats, "q99")
        source = "the dataset's action q01/q99"
        if lo is None or hi is None:
            lo, hi = _stat(stats, "min"), _stat(stats, "max")
            source = "the dataset's action min/max"
            if lo is not None:
                log.warning("action: the dataset stats have no q01/q99; using min/max as the quantiles")
        if lo is not None and hi is not None:
            if lo.shape != (n_actions,) or hi.shape != (n_actions,):
                raise ValueError(f"dataset_stats['action']: {lo.size}/{hi.size} values, expected {n_actions}")
            values = (lo, hi)
    full01, full99 = list(base.action_q01), list(base.action_q99)
    if values is not None:
        for i, ch in enumerate(channels):
            full01[ch], full99[ch] = float(values[0][i]), float(values[1][i])
        log.info("action: quantiles of channels %s from %s", list(channels), source)
    elif channels != used:
        log.warning("action: channels %s keep the checkpoint's quantiles; set action_q01/action_q99 to the env's "
                    "action range", list(channels))
    flat = [ch for ch in channels if not full99[ch] > full01[ch]]
    if flat:
        raise ValueError(f"action_q01/action_q99: model channels {flat} have no range (q99 <= q01); set "
                         f"--policy.action_q01/--policy.action_q99 ({n_actions} values each, the env's action range)")
    changes: dict[str, Any] = {}
    if channels != used:
        changes["used_action_channel_ids"] = channels
    if tuple(full01) != tuple(base.action_q01) or tuple(full99) != tuple(base.action_q99):
        changes.update(action_q01=tuple(full01), action_q99=tuple(full99))
    return changes


def camera_settings(base: PolicyConfig, visual_keys: Sequence[str], image_key_map: Mapping[str, str],
                    adaptable: bool = False) -> tuple[dict[str, Any], dict[str, str]]:
    """(PolicyConfig changes, {policy camera: batch key}) for the env's / dataset's image features.

    A policy camera is read from `image_key_map[camera]`, else from its own key or one of its aliases. With
    `visual_keys` unknown (no features) the keys are taken as they are. When cameras are missing, the
    `adaptable` tiny model takes the env's cameras instead (in feature order); otherwise it is an error
    listing both sides.
    """
    cams = tuple(base.obs_cam_keys)
    unknown = sorted(set(image_key_map) - set(cams))
    if unknown:
        raise ValueError(f"image_key_map: {unknown} are not cameras of the policy; its cameras: {list(cams)}")
    if not visual_keys:
        return {}, {k: image_key_map.get(k, k) for k in cams}
    visual = list(visual_keys)
    aliases: dict[str, list[str]] = {}
    for alias, key in base.camera_aliases:
        aliases.setdefault(key, []).append(alias)
    mapping, missing = {}, []
    for cam in cams:
        candidates = [image_key_map[cam]] if cam in image_key_map else [cam, *aliases.get(cam, [])]
        found = next((c for c in candidates if c in visual), None)
        if found is None:
            missing.append(candidates[0])
        mapping[cam] = found
    if not missing:
        return {}, mapping
    if adaptable and not image_key_map:
        log.info("cameras: the env's %s instead of the checkpoint's %s", visual, list(cams))
        return {"obs_cam_keys": tuple(visual)}, {k: k for k in visual}
    raise ValueError(f"input_features: the policy reads cameras {missing}, not among the image features {visual}; "
                     "map them with --policy.image_key_map='{\"<policy camera>\": \"<batch key>\"}' "
                     f"(policy cameras: {list(cams)})")


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
# Step-wise driving through the episode protocol (framework-free)
# --------------------------------------------------------------------------------------------------

Images = Mapping[str, np.ndarray]


class EpisodeRunner:
    """Step-wise driving of a `LingBotPolicy` through its `Chunk`s; numpy in and out.

    `step(images, prompt)` is LeRobot's `select_action` without the tensor conversions: the first call
    of an episode starts it (reset + infer on `images`), every later call reports the observation after
    the last action handed out and returns the next one. Chunk-level callers use `start` / `observe` /
    `next_chunk`. What is a keyframe is the chunk's business (`Chunk.is_keyframe`).

    `images` maps the policy's camera keys to HxWx3 uint8 frames, or is a zero-argument callable
    returning that mapping: it is only called when the frames are needed (the first observation,
    keyframes), so the other steps cost no image conversion.
    """

    def __init__(self, policy: LingBotPolicy):
        self.policy = policy
        self.camera_keys = tuple(policy.cfg.obs_cam_keys)
        self.reset()

    def reset(self) -> None:
        """Forget the episode; the next `step` / `start` begins a new one."""
        self.chunk: Chunk | None = None
        self.handed = 0  # actions of `chunk` handed out
        self.chunks = 0  # chunks predicted this episode

    @property
    def started(self) -> bool:
        return self.chunk is not None

    @property
    def observed(self) -> int:
        """Steps of the current chunk whose observation was recorded."""
        return 0 if self.chunk is None else self.chunk.executed_steps

    @property
    def remaining(self) -> int:
        """Steps of the current chunk not observed yet."""
        return 0 if self.chunk is None else self.chunk.steps - self.observed

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
            out[k] = np.array(img, copy=True)  # camera buffers may be reused before the chunk is fed back
        return out

    def _set_chunk(self, chunk: Chunk) -> np.ndarray:
        self.chunk, self.handed = chunk, 0
        self.chunks += 1
        return chunk.actions

    # ---------------------------------------------------------------- chunk level

    def start(self, images: Images | Callable[[], Images], prompt: str) -> np.ndarray:
        """Begin an episode: reset the policy with `prompt`, predict the first chunk from `images`."""
        self.reset()
        frames = self._images(images)
        self.policy.reset(prompt=prompt)
        return self._set_chunk(self.policy.infer(frames))

    def observe(self, images: Images | Callable[[], Images] | None) -> None:
        """Report the observation after the chunk's next step was executed (images needed at keyframes)."""
        if not self.started:
            raise RuntimeError("observe: no episode running (call start / step first)")
        step = self.observed
        if step == self.chunk.steps:
            raise RuntimeError(f"observe: all {step} steps of the chunk were observed; call next_chunk()")
        keyframe = self.chunk.is_keyframe(step)
        if keyframe and images is None:
            raise ValueError(f"observe: step {step} of the chunk is a keyframe; images are required")
        self.chunk.record(step, images=self._images(images) if keyframe else None)
        self.handed = max(self.handed, step + 1)

    def next_chunk(self, executed_actions: np.ndarray | None = None,
                   frames: Mapping[str, np.ndarray] | None = None) -> np.ndarray:
        """Feed the current chunk back, then predict the next one.

        Without `frames` every step must have been observed; `frames` ({camera: [T, H, W, 3] uint8}, the
        chunk's keyframes recorded elsewhere) replaces the observations. `executed_actions` ([steps, n],
        default: the plan) is what the robot really executed.
        """
        if not self.started:
            raise RuntimeError("next_chunk: no episode running (call start / step first)")
        chunk = self.chunk
        if frames is None:
            if not chunk.complete:
                raise RuntimeError(
                    f"next_chunk: {self.observed} of the chunk's {chunk.steps} steps were observed; report each "
                    "executed step with observe(...) (or pass frames=...) before the next chunk")
            if executed_actions is not None:
                chunk.set_keyframes(chunk.keyframes(), executed_actions)
        else:
            chunk.set_keyframes(frames, executed_actions)
        self.policy.feedback(chunk)
        return self._set_chunk(self.policy.infer({}))

    # ---------------------------------------------------------------- step level

    def step(self, images: Images | Callable[[], Images], prompt: str = "") -> np.ndarray:
        """One control step: returns the next action [n] (robot units) to execute."""
        if not self.started:
            self.start(images, prompt)
        else:
            if self.handed > self.observed:  # the observation after the last action handed out
                self.observe(images)
            if self.chunk.complete:
                self.next_chunk()
        action = self.chunk.actions[self.handed]
        self.handed += 1
        return action
