"""The LeRobot classes of the adapter; import through `lingbot_edge.lerobot.adapter` (needs LeRobot).

Written against LeRobot 0.3.2's `PreTrainedConfig` / `PreTrainedPolicy` (Python 3.11, torch 2.13).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from lerobot.configs.policies import PreTrainedConfig
from lerobot.configs.types import FeatureType, NormalizationMode, PolicyFeature
from lerobot.optim.optimizers import AdamWConfig
from lerobot.policies.pretrained import PreTrainedPolicy
from torch import Tensor

from lingbot_edge.core.config import POLICY_PRESETS, PolicyConfig, get_policy_config
from lingbot_edge.core.policy import LingBotPolicy
from lingbot_edge.io.tiny import build_tiny_policy
from lingbot_edge.lerobot.adapter import POLICY_TYPE, EpisodeRunner, batch_prompt, lerobot_image_to_uint8

ACTION = "action"


@PreTrainedConfig.register_subclass(POLICY_TYPE)
@dataclass
class LingBotEdgeConfig(PreTrainedConfig):
    """LeRobot config of the lingbot-edge policy (`--policy.type=lingbot_edge`).

    The sampler / camera / action settings come from the lingbot-edge `preset` (config.py);
    only what LeRobot needs to wire the policy to a robot or an env lives here.
    """

    # lingbot-edge policy preset: libero, robotwin, so100, tiny. Only `tiny` is built in-process
    # today; the others need released weights: set `builder`, or pass `policy=LingBotPolicy(...)`.
    preset: str = "tiny"
    # "package.module:function" called as function(config) -> LingBotPolicy (e.g. a checkpoint loader).
    builder: str | None = None
    sampler: str = "static"  # "static" (ring cache, compiled) or "reference" (upstream loop, eager)
    compile: bool = True  # torch.compile the static sampler (off for quick CPU runs)
    seed: int = 0  # noise seed of every episode (LingBotPolicy.reset)
    # Policy camera key (preset.obs_cam_keys) -> batch key, for cameras named otherwise in LeRobot.
    # Unlisted cameras are read from the batch under their own key.
    image_key_map: dict[str, str] = field(default_factory=dict)
    # Flip images horizontally before the wrapped policy sees them (an env that flips relative to the
    # training data). The policy preset's own `image_transform` applies after this: the libero preset
    # already undoes LeRobot's LIBERO orientation ("hflip"), so leave this False there.
    image_hflip: bool = False

    # Actions leave the wrapped policy in robot units and images are encoded inside it.
    normalization_mapping: dict[str, NormalizationMode] = field(
        default_factory=lambda: {
            "VISUAL": NormalizationMode.IDENTITY,
            "STATE": NormalizationMode.IDENTITY,
            "ACTION": NormalizationMode.IDENTITY,
        }
    )

    def __post_init__(self):
        super().__post_init__()
        if self.preset not in POLICY_PRESETS:
            raise ValueError(f"preset: unknown {self.preset!r}; expected one of {sorted(POLICY_PRESETS)}")
        if self.sampler not in ("static", "reference"):
            raise ValueError(f"sampler: expected 'static' or 'reference', got {self.sampler!r}")
        unknown = sorted(set(self.image_key_map) - set(self.policy_config.obs_cam_keys))
        if unknown:
            raise ValueError(
                f"image_key_map: {unknown} are not cameras of preset {self.preset!r}; "
                f"its cameras: {list(self.policy_config.obs_cam_keys)}"
            )

    @property
    def policy_config(self) -> PolicyConfig:
        return get_policy_config(self.preset)

    @property
    def camera_batch_keys(self) -> dict[str, str]:
        """Policy camera key -> the batch key it is read from."""
        return {k: self.image_key_map.get(k, k) for k in self.policy_config.obs_cam_keys}

    @property
    def action_dim(self) -> int:
        return len(self.policy_config.used_action_channel_ids)

    @property
    def chunk_size(self) -> int:
        """Actions per chunk (the first chunk of an episode has `action_per_frame` fewer)."""
        pc = self.policy_config
        return pc.frame_chunk_size * pc.action_per_frame

    @property
    def n_action_steps(self) -> int:
        return self.chunk_size

    def validate_features(self) -> None:
        """Check the env / dataset features LeRobot filled in against the preset."""
        images = {k for k, ft in self.input_features.items() if ft.type is FeatureType.VISUAL}
        if self.input_features:
            missing = [b for b in self.camera_batch_keys.values() if b not in images]
            if missing:
                raise ValueError(
                    f"input_features: preset {self.preset!r} reads cameras {missing}, not among the image "
                    f"features {sorted(images)}; map them with --policy.image_key_map"
                )
        want = (self.action_dim,)
        feat = self.output_features.get(ACTION)
        if feat is None:
            self.output_features[ACTION] = PolicyFeature(type=FeatureType.ACTION, shape=want)
        elif tuple(feat.shape) != want:
            raise ValueError(
                f"output_features['action']: shape {tuple(feat.shape)}, but preset {self.preset!r} "
                f"produces {want} (used_action_channel_ids {list(self.policy_config.used_action_channel_ids)})"
            )

    # Inference only: one observation per call, no training-time delta windows.
    @property
    def observation_delta_indices(self) -> None:
        return None

    @property
    def action_delta_indices(self) -> None:
        return None

    @property
    def reward_delta_indices(self) -> None:
        return None

    def get_optimizer_preset(self) -> AdamWConfig:
        return AdamWConfig()

    def get_scheduler_preset(self) -> None:
        return None


def build_policy(config: LingBotEdgeConfig) -> LingBotPolicy:
    """The `LingBotPolicy` a config describes: `config.builder(config)`, else the in-process `tiny` preset."""
    if config.builder:
        module, sep, attr = config.builder.partition(":")
        if not sep or not module or not attr:
            raise ValueError(f"builder: expected 'package.module:function', got {config.builder!r}")
        policy = getattr(importlib.import_module(module), attr)(config)
        if not isinstance(policy, LingBotPolicy):
            raise TypeError(f"builder {config.builder!r}: returned {type(policy).__name__}, expected a LingBotPolicy")
        return policy
    if config.preset != "tiny":
        raise ValueError(
            f"preset {config.preset!r}: needs released weights, which this adapter does not load itself; set "
            "--policy.builder=module:function (returns the LingBotPolicy) or pass LingBotEdgePolicy(config, policy=...)"
        )
    return build_tiny_policy(sampler=config.sampler, compile=config.compile, seed=config.seed, device=config.device)


class LingBotEdgePolicy(PreTrainedPolicy):
    """LeRobot policy wrapping `LingBotPolicy`: one action per `select_action`, keyframe feedback inside.

    Runs one episode at a time (batch size 1: `lerobot eval --eval.batch_size=1`). Actions come out
    as float32 CPU tensors in robot units. The executed actions fed back are the ones handed out
    (LeRobot does not tell the policy what a robot's safety clipping changed).
    """

    config_class = LingBotEdgeConfig
    name = POLICY_TYPE

    def __init__(
        self,
        config: LingBotEdgeConfig,
        dataset_stats: dict[str, dict[str, Tensor]] | None = None,
        policy: LingBotPolicy | None = None,
        **kwargs: Any,
    ):
        # dataset_stats: unused; action quantiles come from the preset (LeRobot 0.3.2 stats have none).
        super().__init__(config)
        config.validate_features()
        if policy is None:
            policy = build_policy(config)
        elif policy.cfg.name != config.preset:
            raise ValueError(f"policy: built for preset {policy.cfg.name!r}, config says {config.preset!r}")
        if policy.device.type != torch.device(config.device).type:
            raise ValueError(f"policy: lives on {policy.device}, config.device is {config.device!r}")
        self.lingbot = policy
        # Registers the DiT's parameters: LeRobot reads the device from them, save_pretrained writes them.
        self.model = policy.model
        self.runner = EpisodeRunner(policy)
        # Camera keys of the policy actually wrapped (an injected one may use a modified preset).
        self._batch_keys = {k: config.image_key_map.get(k, k) for k in policy.cfg.obs_cam_keys}

    # ---------------------------------------------------------------- LeRobot API

    def get_optim_params(self) -> dict:
        raise NotImplementedError("lingbot_edge is inference only (train LingBot-VA upstream)")

    def forward(self, batch: dict[str, Tensor]) -> tuple[Tensor, dict | None]:
        raise NotImplementedError("lingbot_edge is inference only: use select_action / predict_action_chunk")

    def reset(self) -> None:
        """New episode: the next select_action / predict_action_chunk starts from its batch."""
        self.runner.reset()

    @torch.no_grad()
    def select_action(self, batch: dict[str, Any], **kwargs: Any) -> Tensor:
        """Next action `[1, n_used]`; the batch is the observation the previous action led to."""
        action = self.runner.step(lambda: self._images(batch), prompt=batch_prompt(batch))
        return torch.from_numpy(np.array(action, dtype=np.float32))[None]

    @torch.no_grad()
    def predict_action_chunk(self, batch: dict[str, Any] | None = None, **kwargs: Any) -> Tensor:
        """A whole chunk `[1, steps, n_used]`.

        The first call of an episode starts it from `batch` (prompt + images). Later calls feed
        back the previous chunk first: either each of its executed steps was reported with
        `observe(batch)` (as `select_action` does), or pass `frames={camera: [T, H, W, 3] uint8}` and
        optionally `executed_actions=[steps, n_used]`.
        """
        if not self.runner.started:
            if batch is None:
                raise ValueError("predict_action_chunk: the first chunk of an episode needs a batch (images + task)")
            chunk = self.runner.start(lambda: self._images(batch), prompt=batch_prompt(batch))
        else:
            chunk = self.runner.next_chunk(kwargs.get("executed_actions"), kwargs.get("frames"))
        return torch.from_numpy(np.array(chunk, dtype=np.float32))[None]

    def observe(self, batch: dict[str, Any]) -> None:
        """Report the observation after one more executed action (chunk-level use)."""
        keyframe = self.runner.next_observation_is_keyframe
        self.runner.observe(self._images(batch) if keyframe else None)

    # ---------------------------------------------------------------- helpers

    def _images(self, batch: dict[str, Any]) -> dict[str, np.ndarray]:
        out = {}
        for cam, key in self._batch_keys.items():
            if key not in batch:
                images = sorted(k for k in batch if "image" in k)
                raise KeyError(f"batch: no camera {key!r} (policy camera {cam!r}); image keys in the batch: {images}")
            out[cam] = lerobot_image_to_uint8(batch[key], hflip=self.config.image_hflip, key=key)
        return out
