"""The interfaces the rest of the code relies on: a policy, its prompt encoder, its observation encoder.

- `Policy`: what the control loop (`robot.control.AsyncController`) and the server
  (`serve.server.EpisodeServer`) drive. Implementations: `core.policy.LingBotPolicy` (local) and
  `serve.client.RemotePolicy` (a policy behind `lingbot-edge serve`).
- `PromptEncoder`: prompt -> text embeddings for `LingBotPolicy`. Implementations:
  `io.prompt_cache.PromptCache` (memory and disk tiers, UMT5 loaded on a miss) and
  `core.policy.PromptMemo` over an `io.encoders.UMT5PromptEncoder` (UMT5 kept loaded, results kept per prompt).
- `ObservationEncoder`: camera frames -> video latents for `LingBotPolicy`. Implementations:
  `io.encoders.VAEObservationEncoder` (the streaming VAE) and `testing.libero.RecordedObservations`.

Every implementation has every member (no `getattr` / `hasattr` probes at the call sites): a policy
without lookahead says `supports_lookahead = False` (and `takes_executing_keyframes = False`), one with
nothing to interrupt has a `cancel` that does nothing.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Protocol

from lingbot_edge.core.episode import Chunk

if TYPE_CHECKING:  # the robot side (control loop, remote policy) runs without torch
    from torch import Tensor


class Policy(Protocol):
    """One policy, one episode at a time: `reset(prompt)`, then `infer` / `feedback` per chunk.

    `cfg` is the policy's `PolicyConfig` (or, for a remote policy, the part of it the server's metadata
    gives): callers read `obs_cam_keys`, `keyframe_stride`, `action_per_frame`, `frame_chunk_size` and
    `used_action_channel_ids` from it.
    """

    cfg: Any
    # Whether `infer(obs, ahead=True)` works: infer the chunk after the one awaiting feedback while that
    # one executes (the control loop's lookahead schedule, docs/design.md sections 2-3).
    supports_lookahead: bool
    # Whether `infer(obs, ahead=True)` takes the executing chunk's keyframes recorded so far in `obs`
    # ({camera: [T, H, W, 3]}, whole latent frames): the loop may then request the next chunk later in
    # the executing chunk, once the frames it still has time for are in (`robot.control.AsyncController`).
    takes_executing_keyframes: bool

    def reset(self, prompt: str) -> None:
        """Start an episode with `prompt` (any earlier episode is dropped)."""
        ...

    def infer(self, obs: Mapping[str, Any], ahead: bool = False) -> Chunk:
        """The next chunk. The episode's first call needs one frame per camera in `obs` ({camera key:
        H x W x 3 uint8}); later calls take `{}` (the keyframes come with `feedback`), or, ahead with
        `takes_executing_keyframes`, the executing chunk's keyframes so far."""
        ...

    def feedback(self, chunk: Chunk) -> Mapping[str, float]:
        """The executed `chunk` (its recorded keyframes and executed actions); returns timings in ms."""
        ...

    def cancel(self) -> None:
        """Unblock a call running on another thread (it then raises), or do nothing when calls cannot
        block; the control loop calls it on exit while a policy call is still running."""
        ...


class PromptEncoder(Protocol):
    """Prompt -> (cond, uncond) text embeddings, each [1, max_sequence_length, text_dim].

    `LingBotPolicy.reset` calls `encode_pair` at every episode start and keeps nothing itself: an
    encoder that runs the text model at each call belongs in a `core.policy.PromptMemo`.
    """

    @property
    def memory_report(self) -> Mapping[str, Any] | None:
        """What running the text encoder cost (`PromptCache.memory_report`), for `LingBotPolicy.memory_report`;
        None when not measured."""
        ...

    def encode_pair(self, prompt: str, use_cfg: bool) -> tuple[Tensor, Tensor | None]:
        """(cond, uncond): uncond is the negative prompt's embedding when `use_cfg`, else None."""
        ...


class ObservationEncoder(Protocol):
    """Camera frames -> video latents [1, C, T', h, w], streaming over one episode."""

    @property
    def latent_hw(self) -> tuple[int, int]:
        """(h, w) of the latents it produces; must equal the policy config's `latent_hw`."""
        ...

    def reset(self) -> None:
        """Start a new episode (drop the streaming state)."""
        ...

    def encode(self, frames: Mapping[str, Any]) -> Tensor:
        """{camera key: [H, W, 3] or [T, H, W, 3] frames} -> latents (the next frames of the stream)."""
        ...
