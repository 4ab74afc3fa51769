"""LeRobot's config and policy classes of lingbot-edge (`--policy.type=lingbot_edge`): LingBotEdgeConfig and
LingBotEdgePolicy. Import them through `lingbot_edge.lerobot.adapter` (needs LeRobot).

One code path for LeRobot 0.3.2 and 0.4.4 (`lingbot_edge.io.lerobot_compat` names what differs). LeRobot 0.4 finds
`LingBotEdgePolicy` and `make_lingbot_edge_pre_post_processors` here, next to the registered config class.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from lerobot.configs.policies import PreTrainedConfig
from lerobot.configs.types import FeatureType, NormalizationMode, PolicyFeature
from lerobot.optim.optimizers import AdamWConfig
from lerobot.policies.pretrained import PreTrainedPolicy
from torch import Tensor

from lingbot_edge.core.config import POLICY_PRESETS, PolicyConfig, get_policy_config, parse_overrides, tiny_variant
from lingbot_edge.core.policy import LingBotPolicy
from lingbot_edge.io import lerobot_compat as compat
from lingbot_edge.io.layout import resolve_checkpoint
from lingbot_edge.io.loading import TINY, load_policy, policy_config_for, runtime_defaults
from lingbot_edge.lerobot.bridge import (
    POLICY_TYPE,
    EpisodeRunner,
    action_settings,
    batch_prompt,
    camera_settings,
    lerobot_image_to_uint8,
)

log = logging.getLogger(__name__)

ACTION = "action"


@PreTrainedConfig.register_subclass(POLICY_TYPE)
@dataclass
class LingBotEdgeConfig(PreTrainedConfig):
    """LeRobot config of the lingbot-edge policy (`--policy.type=lingbot_edge`).

    The policy comes from `lingbot_edge.io.loading.load_policy`: `checkpoint`, `transformer`, `preset`,
    `dtype`, `compile`, `sampler`, `seed`, `settings` mean what the `lingbot-edge` CLI flags of the same
    names mean (`device` is LeRobot's own field). The rest wires the policy to LeRobot's env or dataset.
    """

    # A checkpoint folder (released, LeRobot or post-trained layout) or "tiny" (the embedded tiny model).
    checkpoint: str = TINY
    transformer: str | None = None  # another DiT folder, e.g. a quantized one from `lingbot-edge quantize`
    preset: str | None = None  # default policy settings: libero, robotwin, so100, tiny (the checkpoint's first)
    dtype: str | None = None  # bf16 / fp16 / fp32 (default: load_policy's, bf16)
    compile: bool | None = None  # torch.compile the static sampler (default: on CUDA only)
    sampler: str = "static"  # "static" (ring cache) or "reference" (upstream loop, eager)
    seed: int = 0  # noise seed of every episode (LingBotPolicy.reset)
    settings: list[str] = field(default_factory=list)  # policy settings "key=value" (the CLIs' --set)
    # Model action channel of each value of the env's / dataset's action (output_features["action"]).
    # Default: the checkpoint's channels when the sizes agree; the tiny model takes channels 0 .. n-1.
    action_channels: list[int] | None = None
    # The env's action range per value (robot units) when the channels are not the checkpoint's own.
    # Default: the dataset's action stats (q01/q99, else min/max), else the checkpoint's values.
    action_q01: list[float] | None = None
    action_q99: list[float] | None = None
    # Policy camera key -> batch key, for cameras named otherwise in LeRobot. Unlisted cameras are read
    # under their own key or one of the policy's camera aliases; the tiny model takes the env's cameras.
    image_key_map: dict[str, str] = field(default_factory=dict)
    # Flip images horizontally before the wrapped policy sees them (an env that flips relative to the
    # training data). The policy's own `image_transform` applies after this: the libero preset already
    # undoes LeRobot's LIBERO orientation ("hflip"), so leave this False there.
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
        if self.preset is not None and self.preset not in POLICY_PRESETS:
            raise ValueError(f"preset: unknown {self.preset!r}; expected one of {sorted(POLICY_PRESETS)}")
        if self.sampler not in ("static", "reference"):
            raise ValueError(f"sampler: expected 'static' or 'reference', got {self.sampler!r}")
        runtime_defaults(self.device, self.dtype, self.compile)  # a bad dtype is an error naming the field
        parse_overrides(self.settings)  # unknown keys are errors naming the key

    @property
    def action_size(self) -> int | None:
        """Values of the env's / dataset's action (None until LeRobot filled the features)."""
        feat = (self.output_features or {}).get(ACTION)
        if feat is None:
            return None
        if len(feat.shape) != 1:
            raise ValueError(f"output_features['action']: expected shape (n,), got {tuple(feat.shape)}")
        return int(feat.shape[0])

    @property
    def camera_features(self) -> list[str]:
        """The env's / dataset's image keys, in feature order (LeRobot's own `image_features` is a dict)."""
        return [k for k, ft in (self.input_features or {}).items() if ft.type is FeatureType.VISUAL]

    def validate_features(self) -> None:
        """Cheap checks of what LeRobot filled in; the mapping itself happens when the policy is built."""
        self.action_size  # noqa: B018  (raises on a malformed action feature)

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


def checkpoint_policy_config(config: LingBotEdgeConfig, settings: dict[str, Any]) -> PolicyConfig:
    """The settings `load_policy` would give the checkpoint (headers only, no weights read)."""
    if config.checkpoint == TINY:
        cfg = tiny_variant(get_policy_config(config.preset or TINY))
        return cfg.replace(**settings) if settings else cfg

    layout = resolve_checkpoint(config.checkpoint, transformer=config.transformer)
    return policy_config_for(layout, config.preset, settings)


def build_policy(config: LingBotEdgeConfig, dataset_stats: dict | None = None) -> LingBotPolicy:
    """The `LingBotPolicy` of `config` for the features LeRobot filled in, through `load_policy`."""
    settings = parse_overrides(config.settings)
    base = checkpoint_policy_config(config, settings)
    adaptable = config.checkpoint == TINY  # random weights: any channel / camera mapping is as good
    changes, _ = camera_settings(base, config.camera_features, config.image_key_map, adaptable)
    n = config.action_size or len(base.used_action_channel_ids)
    stats = (dataset_stats or {}).get(ACTION)
    changes |= action_settings(base, n, channels=config.action_channels, q01=config.action_q01,
                               q99=config.action_q99, stats=stats, adaptable=adaptable)
    return load_policy(config.checkpoint, preset=config.preset, transformer=config.transformer, device=config.device,
                       dtype=config.dtype, compile=config.compile, sampler=config.sampler, seed=config.seed,
                       **{**settings, **changes})


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
        super().__init__(config)
        config.validate_features()
        if policy is None:
            policy = build_policy(config, dataset_stats)
        if policy.device.type != torch.device(config.device).type:
            raise ValueError(f"policy: lives on {policy.device}, config.device is {config.device!r}")
        n_used = len(policy.cfg.used_action_channel_ids)
        if config.action_size not in (None, n_used):
            raise ValueError(f"output_features['action']: shape ({config.action_size},), but the policy produces "
                             f"({n_used},) (used_action_channel_ids {list(policy.cfg.used_action_channel_ids)})")
        if config.output_features is None:  # LeRobot 0.4 allows None ("take them from the dataset")
            config.output_features = {}
        config.output_features.setdefault(ACTION, PolicyFeature(type=FeatureType.ACTION, shape=(n_used,)))
        _, self._batch_keys = camera_settings(policy.cfg, config.camera_features, config.image_key_map)
        self.lingbot = policy
        # Registers the DiT's parameters: LeRobot reads the device from them, save_pretrained writes them.
        self.model = policy.model
        self.runner = EpisodeRunner(policy)

    # ---------------------------------------------------------------- LeRobot API

    def _save_pretrained(self, save_directory) -> None:
        """config.json and the weights; from LeRobot 0.4 also the processor pipelines, which LeRobot's own tools
        (`lerobot-eval --policy.path=DIR`, the async policy server) load from the same folder."""
        super()._save_pretrained(save_directory)
        if compat.has_processors():
            for pipeline in make_lingbot_edge_pre_post_processors(self.config):
                pipeline.save_pretrained(save_directory)

    def get_optim_params(self) -> dict:
        raise NotImplementedError("lingbot_edge is inference only (train LingBot-VA upstream)")

    def forward(self, batch: dict[str, Tensor]) -> tuple[Tensor, dict | None]:
        raise NotImplementedError("lingbot_edge is inference only: use select_action / predict_action_chunk")

    def reset(self) -> None:
        """New episode: the next select_action / predict_action_chunk starts from its batch."""
        self.runner.reset()

    @torch.no_grad()
    def select_action(self, batch: dict[str, Any], **kwargs: Any) -> Tensor:
        """Next action `[1, n]`; the batch is the observation the previous action led to."""
        action = self.runner.step(lambda: self._images(batch), prompt=batch_prompt(batch))
        return torch.from_numpy(np.array(action, dtype=np.float32))[None]

    @torch.no_grad()
    def predict_action_chunk(self, batch: dict[str, Any] | None = None, **kwargs: Any) -> Tensor:
        """A whole chunk `[1, steps, n]`.

        The first call of an episode starts it from `batch` (prompt + images). Later calls feed back the
        previous chunk first: either each of its executed steps was reported with `observe(batch)`, or
        pass `frames={camera: [T, H, W, 3] uint8}` and optionally `executed_actions=[steps, n]`.
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
        self.runner.observe(lambda: self._images(batch))

    # ---------------------------------------------------------------- helpers

    def _images(self, batch: dict[str, Any]) -> dict[str, np.ndarray]:
        out = {}
        for cam, key in self._batch_keys.items():
            if key not in batch:
                images = sorted(k for k in batch if "image" in k)
                raise KeyError(f"batch: no camera {key!r} (policy camera {cam!r}); image keys in the batch: {images}")
            out[cam] = lerobot_image_to_uint8(batch[key], hflip=self.config.image_hflip, key=key)
        return out


def make_lingbot_edge_pre_post_processors(config: LingBotEdgeConfig, dataset_stats: dict | None = None) -> tuple:
    """LeRobot 0.4's processor pipelines of `--policy.type=lingbot_edge` (found by its factory through the name).

    Before the policy: the rename step (LeRobot's `rename_map`), a batch dimension for unbatched robot
    observations, the policy's device. After it: back to the CPU. No normalization on either side: images are
    encoded and actions unnormalized inside the wrapped policy (robot units out), `dataset_stats` reach it
    through `make_policy` instead.
    """
    from lerobot.processor import (
        AddBatchDimensionProcessorStep,
        DeviceProcessorStep,
        PolicyProcessorPipeline,
        RenameObservationsProcessorStep,
    )
    from lerobot.processor.converters import policy_action_to_transition, transition_to_policy_action

    names = compat.constants()
    pre = PolicyProcessorPipeline(
        steps=[RenameObservationsProcessorStep(rename_map={}), AddBatchDimensionProcessorStep(),
               DeviceProcessorStep(device=config.device)],
        name=names.POLICY_PREPROCESSOR_DEFAULT_NAME)
    post = PolicyProcessorPipeline(
        steps=[DeviceProcessorStep(device="cpu")], name=names.POLICY_POSTPROCESSOR_DEFAULT_NAME,
        to_transition=policy_action_to_transition, to_output=transition_to_policy_action)
    return pre, post
