"""Configuration dataclasses: the DiT architecture and the per-robot policy presets.

Cheap to import (no torch). Field names follow upstream `transformer/config.json` and the
LeRobot `LingBotVAConfig` so released files and configs map one to one.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

# Keys upstream writes into transformer/config.json that do not change the math we run.
_IGNORED_MODEL_KEYS = {"_class_name", "_diffusers_version", "_name_or_path", "attn_mode", "pos_embed_seq_len"}


@dataclass(frozen=True)
class ModelConfig:
    """The dual-stream Wan DiT (docs/design.md section 1). Defaults are the released ~5B model."""

    patch_size: tuple[int, int, int] = (1, 2, 2)
    num_attention_heads: int = 24
    attention_head_dim: int = 128
    in_channels: int = 48
    out_channels: int = 48
    action_dim: int = 30
    text_dim: int = 4096
    freq_dim: int = 256
    ffn_dim: int = 14336
    num_layers: int = 30
    cross_attn_norm: bool = True
    eps: float = 1e-6
    rope_max_seq_len: int = 1024

    def __post_init__(self):
        object.__setattr__(self, "patch_size", tuple(int(p) for p in self.patch_size))
        if len(self.patch_size) != 3 or self.patch_size[0] != 1:
            raise ValueError(f"patch_size: expected (1, ph, pw), got {self.patch_size}")
        if self.attention_head_dim % 2:
            raise ValueError(f"attention_head_dim: must be even for RoPE, got {self.attention_head_dim}")
        if not self.cross_attn_norm:
            raise ValueError("cross_attn_norm: LingBot-VA checkpoints use cross_attn_norm=true")

    @property
    def dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def patch_dim(self) -> int:
        return self.in_channels * self.patch_size[0] * self.patch_size[1] * self.patch_size[2]

    @classmethod
    def from_dict(cls, d: dict, source: str = "config") -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known - _IGNORED_MODEL_KEYS
        if unknown:
            raise ValueError(f"{source}: unknown transformer config keys {sorted(unknown)}; expected {sorted(known)}")
        kwargs = {k: v for k, v in d.items() if k in known}
        try:
            return cls(**kwargs)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{source}: invalid transformer config: {e}") from e

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["patch_size"] = list(self.patch_size)
        return {"_class_name": "WanTransformer3DModel", **d}


MODEL_PRESETS: dict[str, ModelConfig] = {
    "full": ModelConfig(),
    # docs/design.md section 4: 2 blocks, 2 heads x 24, ffn 64, text_dim 32, latent ch 16, action_dim 8.
    "tiny": ModelConfig(
        num_attention_heads=2,
        attention_head_dim=24,
        in_channels=16,
        out_channels=16,
        action_dim=8,
        text_dim=32,
        ffn_dim=64,
        num_layers=2,
    ),
}
# The tiny model's inputs and outputs with a deeper, wider trunk (4 blocks, 2 heads x 32, ffn 256): a DiT for
# `lingbot-edge train --model tiny-grasp`, still CPU-trainable.
MODEL_PRESETS["tiny-grasp"] = dataclasses.replace(MODEL_PRESETS["tiny"], attention_head_dim=32, ffn_dim=256,
                                                  num_layers=4)
# Models that share the tiny model's inputs (latent channels, action width, text width): a policy preset's
# robot side goes onto any of them through `tiny_variant`.
TINY_MODELS = ("tiny", "tiny-grasp")

# Spatial / temporal compression of the Wan2.2 VAE (and of the tiny stand-in).
VAE_SPATIAL = 16
VAE_TEMPORAL = 4

# PolicyConfig.image_transform: applied to every camera frame before resizing (policy.orient_frames).
IMAGE_TRANSFORMS = ("none", "vflip", "hflip", "rot180")
ASYNC_MODES = ("grounded", "naive")


@dataclass(frozen=True)
class PolicyConfig:
    """Sampler + observation settings of one robot setup (docs/design.md sections 3-4)."""

    # --- identity
    name: str  # the preset's name (POLICY_PRESETS key), shown in logs and in the server's metadata
    model: str  # key of MODEL_PRESETS the policy was trained with

    # --- cameras
    height: int  # every camera frame is resized to height x width pixels before the VAE
    width: int  # (both multiples of 16 x the patch size, twice that for robotwin_tshape's half-size wrists)
    obs_cam_keys: tuple[str, ...]  # the cameras, in the order their latents are laid out
    # How the cameras' latents form one frame: "width_concat" (side by side, same size) or
    # "robotwin_tshape" (the two half-size wrist cameras side by side above the head camera).
    camera_layout: str = "width_concat"

    # --- chunk geometry and memory
    action_per_frame: int = 4  # robot steps per latent video frame (a multiple of 4: the VAE's 4 frames per latent)
    frame_chunk_size: int = 4  # latent frames per chunk: a chunk is frame_chunk_size * action_per_frame steps
    attn_window: int = 30  # attention window: the KV cache keeps attn_window // 2 chunks of history per block

    # --- denoising (flow matching, Euler steps; the defaults are upstream's LIBERO settings)
    num_inference_steps: int = 20  # Euler steps of the video stream
    # Partial video denoising (upstream's name): -1 runs every video step; k runs only the first k
    # forwards of the padded timestep list, each followed by its Euler step (the k-th writes the cache).
    video_exec_step: int = -1
    action_num_inference_steps: int = 50  # Euler steps of the action stream
    # Classifier-free guidance of the video and the action stream; the unconditional pass (a second batch
    # row) runs only when one of them is > 1.
    guidance_scale: float = 5.0
    action_guidance_scale: float = 1.0
    snr_shift: float = 5.0  # timestep shift of the video schedule, s*sigma / (1 + (s - 1)*sigma); 1 = unshifted
    action_snr_shift: float = 1.0  # the same shift for the action schedule
    # Scale of the action stream's initial noise (not an upstream setting; 1.0 = upstream's N(0, 1)). 0 starts
    # every action flow at zero: the sampler's ODE then gives one deterministic chunk per context instead of a
    # draw from the spread a small, under-trained policy has learned (bench/results/task_success/so100_grasp.md).
    action_noise_scale: float = 1.0
    # How `infer(obs, ahead=True)` conditions the chunk after the one executing (docs/design.md section 7):
    # "grounded" writes the real history up to the chunk before it, then the executing chunk's imagined video
    # and its known actions as temporary entries; "naive" continues from the model's own stale forecast of the
    # executing chunk (kept for comparison: it loses the task, bench/results/task_success/so100_grasp_async.md).
    async_mode: str = "grounded"

    # --- action space (robot units <-> the model's action_dim channels in [-1, 1])
    used_action_channel_ids: tuple[int, ...] = tuple(range(7))  # the model channels this robot drives, in order
    # Quantiles over the full action_dim space (unused channels included, as upstream stores them): channel i's
    # [action_q01[i], action_q99[i]] maps to [-1, 1].
    action_q01: tuple[float, ...] = ()
    action_q99: tuple[float, ...] = ()

    # --- prompt and robot side
    max_sequence_length: int = 512  # prompt tokens (UMT5), zero past the prompt's own length
    state_dim: int | None = None  # robot-side state/action size; defaults to len(used_action_channel_ids)

    # --- incoming frames
    # Orientation fix for incoming camera frames, applied before resizing (first observation and
    # feedback keyframes): "none", "vflip" (rows), "hflip" (columns), "rot180" (both). Set it so that
    # what the model sees has the orientation its checkpoint was trained with (see the libero preset).
    image_transform: str = "none"
    # Other names under which clients may send a camera: (alias, key of obs_cam_keys) pairs. The libero
    # preset accepts LeRobot's `observation.images.image` / `image2` for upstream's agentview / eye_in_hand.
    camera_aliases: tuple[tuple[str, str], ...] = ()

    def __post_init__(self):
        for name in ("obs_cam_keys", "used_action_channel_ids", "action_q01", "action_q99"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        aliases = dict(self.camera_aliases.items() if isinstance(self.camera_aliases, dict) else self.camera_aliases)
        object.__setattr__(self, "camera_aliases", tuple(sorted(aliases.items())))
        stray = sorted(k for k in aliases.values() if k not in self.obs_cam_keys)
        if stray:
            raise ValueError(f"camera_aliases: {stray} are not cameras of obs_cam_keys {list(self.obs_cam_keys)}")
        action_dim = MODEL_PRESETS[self.model].action_dim if self.model in MODEL_PRESETS else None
        if action_dim is None:
            raise ValueError(f"model: unknown preset {self.model!r}; expected one of {sorted(MODEL_PRESETS)}")
        if len(self.action_q01) != action_dim or len(self.action_q99) != action_dim:
            raise ValueError(
                f"action_q01/action_q99: expected {action_dim} values each (the model's action_dim), "
                f"got {len(self.action_q01)}/{len(self.action_q99)}"
            )
        ids = self.used_action_channel_ids
        if len(set(ids)) != len(ids) or not all(0 <= i < action_dim for i in ids):
            raise ValueError(f"used_action_channel_ids: expected distinct ids in [0, {action_dim}), got {ids}")
        if self.camera_layout not in ("width_concat", "robotwin_tshape"):
            raise ValueError(f"camera_layout: expected 'width_concat' or 'robotwin_tshape', got {self.camera_layout!r}")
        if self.camera_layout == "robotwin_tshape" and len(self.obs_cam_keys) != 3:
            raise ValueError("obs_cam_keys: robotwin_tshape needs exactly 3 cameras (head, left wrist, right wrist)")
        ph, pw = MODEL_PRESETS[self.model].patch_size[1:]
        step = VAE_SPATIAL * (2 if self.camera_layout == "robotwin_tshape" else 1)
        if self.height % (step * ph) or self.width % (step * pw):
            raise ValueError(
                f"height/width: {self.height}x{self.width} must be multiples of {step * ph}x{step * pw} "
                "(VAE downsampling x patch size)"
            )
        if self.action_per_frame % VAE_TEMPORAL:
            # Feedback records one keyframe every action_per_frame / 4 steps (4 frames per latent).
            raise ValueError(f"action_per_frame: must be a multiple of {VAE_TEMPORAL}, got {self.action_per_frame}")
        if self.image_transform not in IMAGE_TRANSFORMS:
            raise ValueError(f"image_transform: expected one of {list(IMAGE_TRANSFORMS)}, "
                             f"got {self.image_transform!r}")
        if self.video_exec_step != -1 and not 1 <= self.video_exec_step <= self.num_inference_steps:
            # k = N + 1 would feed the padded t = 0 to upstream's scheduler lookup (a second Euler step
            # from sigma_N): not a setting anyone trains for, so it is refused rather than guessed.
            raise ValueError(f"video_exec_step: expected -1 (all steps) or 1..num_inference_steps "
                             f"({self.num_inference_steps}), got {self.video_exec_step}")
        if not (math.isfinite(self.action_noise_scale) and self.action_noise_scale >= 0):
            raise ValueError(f"action_noise_scale: expected a finite value >= 0, got {self.action_noise_scale}")
        if self.async_mode not in ASYNC_MODES:
            raise ValueError(f"async_mode: expected one of {list(ASYNC_MODES)}, got {self.async_mode!r}")
        if self.attn_window < 2:
            raise ValueError(f"attn_window: must be >= 2 (the cache holds attn_window // 2 chunks), "
                             f"got {self.attn_window}")

    def camera_key(self, key: str) -> str:
        """The obs_cam_keys name of a camera sent as `key` (itself, or the camera an alias stands for)."""
        return dict(self.camera_aliases).get(key, key)

    def canonical_cameras(self, frames):
        """{camera: value} with aliases renamed to obs_cam_keys names (other keys pass through)."""
        return {self.camera_key(k): v for k, v in frames.items()}

    @property
    def model_config(self) -> ModelConfig:
        return MODEL_PRESETS[self.model]

    @property
    def latent_hw(self) -> tuple[int, int]:
        """Latent height/width after the camera layout (cameras concatenated on width)."""
        h, w = self.height // VAE_SPATIAL, self.width // VAE_SPATIAL
        if self.camera_layout == "robotwin_tshape":
            return (h * 3) // 2, w  # half-size wrists side by side on top of the head camera
        return h, w * len(self.obs_cam_keys)

    @property
    def video_tokens_per_frame(self) -> int:
        h, w = self.latent_hw
        _, ph, pw = self.model_config.patch_size
        return (h // ph) * (w // pw)

    @property
    def video_tokens_per_chunk(self) -> int:
        return self.frame_chunk_size * self.video_tokens_per_frame

    @property
    def action_tokens_per_chunk(self) -> int:
        return self.frame_chunk_size * self.action_per_frame

    @property
    def cache_capacity(self) -> int:
        """Self-attention KV slots per block and CFG row (docs/design.md section 2)."""
        return (self.attn_window // 2) * (self.video_tokens_per_chunk + self.action_tokens_per_chunk)

    @property
    def use_cfg(self) -> bool:
        return self.guidance_scale > 1 or self.action_guidance_scale > 1

    @property
    def cfg_batch(self) -> int:
        return 2 if self.use_cfg else 1

    @property
    def keyframe_stride(self) -> int:
        """Robot steps between recorded keyframes (4 keyframes per latent frame)."""
        return self.action_per_frame // VAE_TEMPORAL

    def replace(self, **changes) -> PolicyConfig:
        return dataclasses.replace(self, **changes)


# Upstream `wan_va/configs/va_libero_cfg.py` (the released LIBERO checkpoint's config), `norm_stat`: 30 values,
# channels 0-5 (end effector), zeros, then the gripper at 28 and a zero at 29.
_LIBERO_Q01 = (-0.6589285731315613, -0.84375, -0.9375, -0.12107142806053162, -0.15964286029338837,
               -0.26571428775787354) + (0.0,) * 22 + (-1.0, 0.0)
_LIBERO_Q99 = (0.8999999761581421, 0.8544642925262451, 0.9375, 0.17142857611179352, 0.1842857152223587,
               0.34392857551574707) + (0.0,) * 22 + (1.0, 0.0)
# Upstream stores zeros for unused channels; quantile normalization maps them to -1 (see actions.py).
_ROBOTWIN_Q01 = (
    -0.06172713458538055, -3.6716461181640625e-05, -0.08783501386642456, -1, -1, -1, -1,
    -0.3547105032205582, -1.3113021850585938e-06, -0.11975435614585876, -1, -1, -1, -1,
) + (0.0,) * 16
_ROBOTWIN_Q99 = (
    0.3462600058317184, 0.39966784834861746, 0.14745532035827624, 1, 1, 1, 1,
    0.034201726913452024, 0.39142737388610793, 0.1792279863357542, 1, 1, 1, 1,
) + (0.0,) * 14 + (1.0, 1.0)


def _pad30(values: tuple[float, ...], fill: float) -> tuple[float, ...]:
    return tuple(values) + (fill,) * (30 - len(values))


# The SO-100 arm's motors in the order of the so100 preset's used action channels (a LeRobot dataset's action
# names must be these, in this order).
SO100_MOTORS = ("shoulder_pan", "shoulder_lift", "elbow_flex", "wrist_flex", "wrist_roll", "gripper")

POLICY_PRESETS: dict[str, PolicyConfig] = {
    # Upstream's va_libero_cfg.py. LeRobot's port (its converter and config) differs: channels 0-6 and action
    # shift 0.05; a LeRobot-converted checkpoint keeps its own config.json values (io.loading warns).
    "libero": PolicyConfig(
        name="libero",
        model="full",
        height=128,
        width=128,
        obs_cam_keys=("observation.images.agentview_rgb", "observation.images.eye_in_hand_rgb"),
        camera_aliases=(("observation.images.image", "observation.images.agentview_rgb"),
                        ("observation.images.image2", "observation.images.eye_in_hand_rgb")),
        action_per_frame=4,
        frame_chunk_size=4,
        attn_window=30,
        num_inference_steps=20,
        action_num_inference_steps=50,
        guidance_scale=5.0,
        action_guidance_scale=1.0,
        snr_shift=5.0,
        action_snr_shift=1.0,
        used_action_channel_ids=(0, 1, 2, 3, 4, 5, 28),
        action_q01=_LIBERO_Q01,
        action_q99=_LIBERO_Q99,
        # The preset takes frames as LeRobot's LIBERO env delivers them: rotated 180 degrees from the
        # raw render. Upstream's LIBERO client (the released checkpoint's training orientation) flips
        # the raw render vertically only, so LeRobot's frames carry one extra horizontal flip, which
        # "hflip" undoes. Frames already in upstream's orientation (e.g. from upstream's own client
        # through `serve`): "none"; raw LIBERO renders: "vflip"; a checkpoint fine-tuned on frames in
        # LeRobot's orientation: "none" (LeRobot's own lingbot_va equivalent: image_hflip=True/False).
        image_transform="hflip",
    ),
    "robotwin": PolicyConfig(
        name="robotwin",
        model="full",
        height=256,
        width=320,
        obs_cam_keys=(
            "observation.images.cam_high",
            "observation.images.cam_left_wrist",
            "observation.images.cam_right_wrist",
        ),
        camera_layout="robotwin_tshape",
        action_per_frame=16,
        frame_chunk_size=2,
        attn_window=72,
        num_inference_steps=25,
        action_num_inference_steps=50,
        guidance_scale=5.0,
        action_guidance_scale=1.0,
        snr_shift=5.0,
        action_snr_shift=1.0,
        used_action_channel_ids=tuple(range(7)) + (28,) + tuple(range(7, 14)) + (29,),
        action_q01=_ROBOTWIN_Q01,
        action_q99=_ROBOTWIN_Q99,
    ),
    # SO-100: 5 joints + gripper on the first 6 channels. 96x128 keeps the cameras' 3:4 aspect
    # (480x640 in) at LIBERO's token budget (3 cameras -> 144 video tokens per chunk). The
    # quantiles are placeholders over LeRobot's default SO-100 ranges until a dataset's
    # meta/stats.json replaces them.
    "so100": PolicyConfig(
        name="so100",
        model="full",
        height=96,
        width=128,
        obs_cam_keys=(
            "observation.images.camera_top",
            "observation.images.camera_wrist_left",
            "observation.images.camera_wrist_right",
        ),
        action_per_frame=4,
        frame_chunk_size=4,
        attn_window=30,
        num_inference_steps=20,
        action_num_inference_steps=50,
        guidance_scale=5.0,
        action_guidance_scale=1.0,
        snr_shift=5.0,
        action_snr_shift=1.0,
        used_action_channel_ids=tuple(range(6)),
        action_q01=_pad30((-100.0, -100.0, -100.0, -100.0, -100.0, 0.0), 0.0),
        action_q99=_pad30((100.0, 100.0, 100.0, 100.0, 100.0, 100.0), 0.0),
    ),
    # Tests and the embedded demo: small enough for CPU, and the cache (2 chunks) wraps after
    # the second chunk so eviction is exercised in every long run.
    "tiny": PolicyConfig(
        name="tiny",
        model="tiny",
        height=64,
        width=64,
        obs_cam_keys=("observation.images.image", "observation.images.image2"),
        action_per_frame=4,
        frame_chunk_size=2,
        attn_window=4,
        num_inference_steps=4,
        action_num_inference_steps=5,
        guidance_scale=5.0,
        action_guidance_scale=1.0,
        snr_shift=5.0,
        action_snr_shift=0.05,
        used_action_channel_ids=(0, 1, 2, 3, 5, 6),
        action_q01=(-1.0, -0.5, -2.0, -0.1, -3.0, -0.2, 0.0, -1.0),
        action_q99=(1.0, 0.5, 2.0, 0.3, 3.0, 0.2, 1.0, 1.0),
    ),
}


def get_policy_config(name: str, **overrides) -> PolicyConfig:
    if name not in POLICY_PRESETS:
        raise ValueError(f"preset: unknown {name!r}; expected one of {sorted(POLICY_PRESETS)}")
    cfg = POLICY_PRESETS[name]
    return cfg.replace(**overrides) if overrides else cfg


# --------------------------------------------------------------------------------------------------
# Policy settings from a checkpoint's policy config (upstream's names) and from `--set key=value`
# --------------------------------------------------------------------------------------------------

# Upstream config names (wan_va/configs/va_*_cfg.py) that are PolicyConfig fields of the same meaning.
UPSTREAM_POLICY_FIELDS = (
    "height", "width", "obs_cam_keys", "action_per_frame", "frame_chunk_size", "attn_window",
    "num_inference_steps", "video_exec_step", "action_num_inference_steps", "guidance_scale",
    "action_guidance_scale", "snr_shift", "action_snr_shift", "used_action_channel_ids",
)
# Upstream keys about the server, training or derived values: accepted; the checked ones must agree.
UPSTREAM_IGNORED = ("__name__", "host", "port", "param_dtype", "save_root", "wan22_pretrained_model_name_or_path",
                    "infer_mode")
UPSTREAM_CHECKED = ("action_dim", "patch_size", "inverse_used_action_channel_ids", "action_norm_method")
_ENV_TYPES = {"none": "width_concat", "robotwin_tshape": "robotwin_tshape"}


def _policy_field_names() -> set[str]:
    return {f.name for f in dataclasses.fields(PolicyConfig)} - {"name", "model"}


def policy_fields_from_upstream(d: dict, source: str, model: ModelConfig) -> dict:
    """PolicyConfig changes from a policy config in upstream's names (plus PolicyConfig's own names for what
    upstream has no key for: image_transform, camera_aliases, state_dim, max_sequence_length). Unknown keys
    and values that disagree with the model are errors naming the key and `source`."""
    if not isinstance(d, dict):
        raise ValueError(f"{source}: expected a JSON object of policy settings")
    own = _policy_field_names()
    changes: dict = {}
    for key, value in d.items():
        if key in UPSTREAM_IGNORED:
            continue
        if key == "norm_stat":
            if not isinstance(value, dict) or not {"q01", "q99"} <= set(value):
                raise ValueError(f"{source}: norm_stat: expected {{'q01': [...], 'q99': [...]}} (quantiles)")
            changes["action_q01"], changes["action_q99"] = tuple(value["q01"]), tuple(value["q99"])
        elif key == "env_type":
            if value not in _ENV_TYPES:
                raise ValueError(f"{source}: env_type: expected one of {sorted(_ENV_TYPES)}, got {value!r}")
            changes["camera_layout"] = _ENV_TYPES[value]
        elif key in UPSTREAM_CHECKED:
            continue  # checked below, once the rest is known
        elif key in own:
            changes[key] = tuple(value) if isinstance(value, list) else value
        elif key == "video_exec_step" and value == -1:
            continue  # upstream's "off"
        else:
            raise ValueError(f"{source}: unknown policy config key {key!r}; expected upstream's names "
                             f"{sorted(UPSTREAM_POLICY_FIELDS + ('norm_stat', 'env_type') + UPSTREAM_CHECKED)} "
                             f"or {sorted(own - set(UPSTREAM_POLICY_FIELDS))}")
    if "action_dim" in d and d["action_dim"] != model.action_dim:
        raise ValueError(f"{source}: action_dim {d['action_dim']} but the DiT has action_dim {model.action_dim}")
    if "patch_size" in d and tuple(d["patch_size"]) != model.patch_size:
        raise ValueError(f"{source}: patch_size {d['patch_size']} but the DiT has {list(model.patch_size)}")
    if d.get("action_norm_method", "quantiles") != "quantiles":
        raise ValueError(f"{source}: action_norm_method {d['action_norm_method']!r}: only 'quantiles' is supported")
    if "inverse_used_action_channel_ids" in d and "used_action_channel_ids" in d:
        used = list(d["used_action_channel_ids"])
        want = [len(used)] * model.action_dim
        for i, ch in enumerate(used):
            want[ch] = i
        if list(d["inverse_used_action_channel_ids"]) != want:
            raise ValueError(f"{source}: inverse_used_action_channel_ids does not invert used_action_channel_ids")
    return changes


def parse_overrides(items) -> dict:
    """`--set key=value` items -> PolicyConfig changes. Values are JSON (numbers, lists, true/false, strings
    in quotes) or a bare string; keys are PolicyConfig fields or upstream's names (norm_stat, env_type)."""
    import json as _json

    out: dict = {}
    own = _policy_field_names()
    for item in items or ():
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"--set {item!r}: expected key=value")
        try:
            value = _json.loads(raw)
        except ValueError:
            value = raw
        if key not in own and key not in ("norm_stat", "env_type"):
            raise ValueError(f"--set {key}: unknown policy setting; expected one of {sorted(own)}")
        out[key] = value
    return out


def tiny_variant(cfg: PolicyConfig, model: str = "tiny") -> PolicyConfig:
    """`cfg` on the embedded tiny model (or another of `TINY_MODELS`): its robot-facing fields (cameras,
    aliases, orientation, state size) with the tiny preset's image size, chunking and step counts. The used
    channels are packed into the first channels of the tiny model's 8-wide action space, their quantiles
    with them."""
    if model not in TINY_MODELS:
        raise ValueError(f"model: {model!r} is not one of the tiny models {TINY_MODELS}")
    if cfg.model in TINY_MODELS:
        return cfg if cfg.model == model else cfg.replace(model=model)
    tiny = POLICY_PRESETS["tiny"]
    dim = MODEL_PRESETS["tiny"].action_dim
    used = cfg.used_action_channel_ids
    if len(used) > dim:
        raise ValueError(f"used_action_channel_ids: {len(used)} channels do not fit the tiny model's {dim}")
    q01 = tuple(cfg.action_q01[c] for c in used) + (0.0,) * (dim - len(used))
    q99 = tuple(cfg.action_q99[c] for c in used) + (0.0,) * (dim - len(used))
    keep = {f: getattr(tiny, f) for f in ("height", "width", "frame_chunk_size", "attn_window",
                                           "num_inference_steps", "action_num_inference_steps")}
    return cfg.replace(name=f"{cfg.name}-tiny", model=model, used_action_channel_ids=tuple(range(len(used))),
                       action_q01=q01, action_q99=q99, state_dim=cfg.state_dim or len(used), **keep)
