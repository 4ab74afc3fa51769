"""LIBERO: the tiny-LIBERO regression policy, LIBERO-shaped observation sequences, replayed episodes,
action drift between two runs, and `eval-libero` (real LIBERO episodes, success rate per DiT variant).

Orientation. LIBERO renders upside down (OpenGL rows). Upstream's LIBERO client flips the raw render
vertically and trains on that; LeRobot's LIBERO env rotates it 180 degrees, one horizontal flip more.
Everything here hands the policy frames in LeRobot's orientation, and `PolicyConfig.image_transform`
(libero preset: "hflip") turns them into upstream's; `eval-libero` rotates raw renders the way LeRobot
does, so `--image-transform` means the same thing in every path.

Regression data (`tests/libero/data`, regenerate with `python -m lingbot_edge.eval.libero ...`):

- `make-checkpoint`: a tiny released-layout checkpoint (transformer/ vae/ text_encoder/ tokenizer/,
  weights stored in bf16 like the released one): goldens do not depend on torch / diffusers /
  transformers init code, and `load_policy` (the real loader) is what builds the policy.
- `make-observations`: synthesized LIBERO-shaped episodes: two 128x128 cameras (agent view + wrist),
  one frame per control step, a scripted gripper picking a bowl and placing it on a plate. Frames are
  drawn in upstream's orientation and stored in LeRobot's (`hflip` of the drawing).
- `make-goldens`: the fp32 tiny-LIBERO policy replayed over every episode (1 thread), its actions
  and first observation latent; `tests/libero` checks them at a tolerance (`check-goldens` prints
  the differences).

`eval-libero` needs hf-libero (`import libero`), its assets and a LIBERO checkpoint; without them
`missing_requirements` says what is missing and how to get it. Quantized variants are quantized
checkpoints (`lingbot-edge quantize ... --out DIR`) loaded by the runtime loader: this module never
imports `quantize`.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import logging
import math
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lingbot_edge.core.config import VAE_TEMPORAL, PolicyConfig, get_policy_config

log = logging.getLogger(__name__)

LIBERO_CAMERAS = ("observation.images.image", "observation.images.image2")
# LIBERO's raw camera observations -> the policy's camera keys (LeRobot's mapping).
LIBERO_RAW_CAMERAS = {"agentview_image": LIBERO_CAMERAS[0], "robot0_eye_in_hand_image": LIBERO_CAMERAS[1]}
LIBERO_SUITES = ("libero_spatial", "libero_object", "libero_goal", "libero_10", "libero_90")
# Steps per episode (LeRobot's TASK_SUITE_MAX_STEPS: a margin over the longest training demo).
LIBERO_MAX_STEPS = {"libero_spatial": 280, "libero_object": 280, "libero_goal": 300, "libero_10": 520,
                    "libero_90": 400}
LIBERO_NUM_STEPS_WAIT = 10  # no-op steps after reset while objects settle (LeRobot, openvla)
LIBERO_DUMMY_ACTION = (0.0, 0.0, 0.0, 0.0, 0.0, 0.0, -1.0)  # no motion, gripper open
LIBERO_ASSET_DIRS = ("articulated_objects", "stable_scanned_objects", "turbosquid_objects", "stable_hope_objects")
LIBERO_PIP = "pip install -c constraints.txt 'hf-libero>=0.1.4,<0.2'"

DEFAULT_DATA_DIR = Path("tests/libero/data")
CHECKPOINT_DIR = "tiny_libero_ckpt"
GOLDENS_FILE = "goldens.npz"
# The committed episodes: (file stem, prompt, scene seed, chunks).
EPISODES = (("episode_bowl_plate", "put the black bowl on the plate", 0, 8),)


# --------------------------------------------------------------------------------------------------
# The tiny-LIBERO policy
# --------------------------------------------------------------------------------------------------


# The committed tiny-LIBERO checkpoint's policy settings (its goldens were made with them): the libero
# preset of the time, which followed LeRobot's port (channels 0-6, action shift 0.05), on the tiny DiT.
# The checkpoint carries them in its policy_config.json; `load_policy` reads them from there.
_TINY_LIBERO = dict(
    height=128, width=128, obs_cam_keys=["observation.images.image", "observation.images.image2"],
    action_per_frame=4, frame_chunk_size=4, attn_window=30, num_inference_steps=20, action_num_inference_steps=50,
    guidance_scale=5.0, action_guidance_scale=1.0, snr_shift=5.0, action_snr_shift=0.05,
    used_action_channel_ids=list(range(7)),
    norm_stat={"q01": [-0.6589, -0.84375, -0.9375, -0.1211, -0.1596, -0.2657, -1.0, 0.0],
               "q99": [0.9, 0.8545, 0.9375, 0.1714, 0.1843, 0.3439, 1.0, 0.0]},
    image_transform="hflip",
)


def tiny_libero_policy_config() -> dict[str, Any]:
    """policy_config.json of the tiny-LIBERO checkpoint (upstream's names)."""
    return json.loads(json.dumps(_TINY_LIBERO))


def tiny_libero_config(**overrides) -> PolicyConfig:
    """The tiny-LIBERO PolicyConfig (what `load_policy` makes of `tiny_libero_policy_config()`)."""
    from lingbot_edge.core.config import MODEL_PRESETS, policy_fields_from_upstream

    fields = policy_fields_from_upstream(tiny_libero_policy_config(), "tiny-libero", MODEL_PRESETS["tiny"])
    cfg = get_policy_config("tiny").replace(**fields)
    return cfg.replace(**overrides) if overrides else cfg


def load_tiny_libero_policy(checkpoint: str | Path, sampler: str = "static", dtype=None, **overrides):
    """The tiny-LIBERO policy from its checkpoint folder (settings from its policy_config.json) through
    `load_policy`: CPU, fp32 (the DiT in `dtype` if given; VAE and UMT5 fp32), eager, prompts in memory."""
    import torch

    from lingbot_edge.io.loading import load_policy

    return load_policy(checkpoint, device="cpu", dtype=dtype or torch.float32,
                       vae_dtype=torch.float32, text_encoder_dtype=torch.float32, compile=False,
                       prompt_cache_dir=False, sampler=sampler, **overrides)


# --------------------------------------------------------------------------------------------------
# Observation sequences
# --------------------------------------------------------------------------------------------------


def frames_per_episode(cfg: PolicyConfig, chunks: int) -> int:
    """Frames of an episode of `chunks` chunks: the first observation, then the keyframes fed back
    (4 (F - 1) after the first chunk, 4 F after the others)."""
    f = cfg.frame_chunk_size
    return 1 + VAE_TEMPORAL * (f - 1) + VAE_TEMPORAL * f * (chunks - 1) if chunks > 0 else 0


def keyframe_range(cfg: PolicyConfig, chunk: int) -> tuple[int, int]:
    """[start, stop) of the keyframes recorded while chunk `chunk` executes (frame 0 is the observation)."""
    start = frames_per_episode(cfg, chunk) if chunk > 0 else 1
    return start, frames_per_episode(cfg, chunk + 1)


@dataclass
class ObservationSequence:
    """An episode's camera frames in LeRobot's LIBERO orientation: {camera: uint8 [N, H, W, 3]}, frame 0
    the first observation, then one frame per control step (the keyframe stride is 1 for apf = 4)."""

    prompt: str
    frames: dict[str, np.ndarray]
    seed: int = 0

    def __post_init__(self):
        for k, v in self.frames.items():
            if v.dtype != np.uint8 or v.ndim != 4 or v.shape[-1] != 3:
                raise ValueError(f"frames[{k!r}]: expected uint8 [N, H, W, 3], got {v.dtype} {list(v.shape)}")
        lengths = {k: v.shape[0] for k, v in self.frames.items()}
        if len(set(lengths.values())) != 1:
            raise ValueError(f"frames: expected cameras with the same number of frames, got {lengths}")

    @property
    def num_frames(self) -> int:
        return next(iter(self.frames.values())).shape[0]

    def num_chunks(self, cfg: PolicyConfig) -> int:
        n = 0
        while frames_per_episode(cfg, n + 1) <= self.num_frames:
            n += 1
        return n

    def observation(self) -> dict[str, np.ndarray]:
        return {k: v[0] for k, v in self.frames.items()}

    def keyframes(self, cfg: PolicyConfig, chunk: int) -> dict[str, np.ndarray]:
        a, b = keyframe_range(cfg, chunk)
        if b > self.num_frames:
            raise ValueError(f"chunk {chunk}: needs frames [{a}, {b}), the sequence has {self.num_frames}")
        return {k: v[a:b] for k, v in self.frames.items()}

    def transformed(self, transform: str) -> ObservationSequence:
        """The same episode with `policy.orient_frames(frames, transform)` applied (contiguous copies)."""
        from lingbot_edge.core.policy import orient_frames

        out = orient_frames(self.frames, transform)
        return ObservationSequence(self.prompt, {k: np.ascontiguousarray(v) for k, v in out.items()}, self.seed)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        keys = list(self.frames)
        arrays = {f"cam{i}": self.frames[k] for i, k in enumerate(keys)}
        meta = {"prompt": self.prompt, "seed": self.seed, "cameras": keys, "orientation": "lerobot_libero"}
        np.savez_compressed(path, meta=np.array(json.dumps(meta)), **arrays)
        return path

    @classmethod
    def load(cls, path: str | Path) -> ObservationSequence:
        with np.load(path) as z:
            meta = json.loads(str(z["meta"]))
            frames = {k: z[f"cam{i}"] for i, k in enumerate(meta["cameras"])}
        return cls(meta["prompt"], frames, int(meta["seed"]))


def _scene_layout(seed: int) -> dict[str, Any]:
    rng = np.random.default_rng(seed)

    def near(row: float, col: float, s: float) -> np.ndarray:
        return np.array([row, col]) + rng.uniform(-s, s, size=2)

    return {
        "bowl": near(0.62, 0.30, 0.04), "plate": near(0.60, 0.68, 0.04), "box": near(0.80, 0.45, 0.03),
        "mug": near(0.72, 0.16, 0.03), "start": near(0.35, 0.22, 0.03),
        "box_color": rng.integers(150, 230, size=3) * np.array([1.0, 0.35, 0.3]),
        "mug_color": rng.integers(60, 200, size=3),
        "table": np.array([150, 105, 70]) + rng.integers(-15, 15, size=3),
    }


def _gripper_state(t: float, lay: dict[str, Any]) -> tuple[np.ndarray, float, float, bool]:
    """Scripted pick-and-place at phase t in [0, 1]: (table position (row, col), height, opening, holding)."""
    bowl, plate, start = lay["bowl"], lay["plate"], lay["start"]
    keys = [  # (phase, position, height, opening)
        (0.00, start, 0.6, 1.0), (0.30, bowl, 0.5, 1.0), (0.42, bowl, 0.05, 1.0), (0.50, bowl, 0.05, 0.0),
        (0.62, bowl, 0.55, 0.0), (0.85, plate, 0.55, 0.0), (0.93, plate, 0.15, 0.0), (1.00, plate, 0.15, 1.0),
    ]
    t = min(max(t, 0.0), 1.0)
    for (t0, p0, z0, o0), (t1, p1, z1, o1) in zip(keys, keys[1:], strict=False):
        if t <= t1:
            a = (t - t0) / (t1 - t0)
            return p0 + a * (p1 - p0), z0 + a * (z1 - z0), o0 + a * (o1 - o0), 0.46 <= t < 0.97
    raise AssertionError("unreachable")  # pragma: no cover


def _fill(img: np.ndarray, mask: np.ndarray, color) -> None:
    img[mask] = np.asarray(color, dtype=np.float64).clip(0, 255).astype(np.uint8)


def _draw_frame(t: float, lay: dict[str, Any], size: int) -> tuple[np.ndarray, np.ndarray]:
    """(agent view, wrist view) uint8 [size, size, 3] at phase t, upstream orientation (table below)."""
    yy, xx = (np.mgrid[0:size, 0:size] + 0.5) / size
    rows = np.linspace(0, 1, size)[:, None]
    pos, z, opening, holding = _gripper_state(t, lay)
    bowl = lay["plate"] if t >= 0.97 else lay["bowl"]  # where the bowl rests when not held

    def ellipse(c, ry, rx):
        return ((yy - c[0]) / ry) ** 2 + ((xx - c[1]) / rx) ** 2 < 1

    def rect(c, hy, hx):
        return (abs(yy - c[0]) < hy) & (abs(xx - c[1]) < hx)

    # Agent view: wall above the horizon, table below (both shaded by row), objects, arm, gripper.
    horizon = 0.3

    def to_img(p, h=0.0):
        return horizon + (1 - horizon) * p[0] - 0.3 * h, p[1]

    wall = (np.array([200, 200, 190]) - 60 * rows).clip(0, 255)
    table = (lay["table"] * (0.75 + 0.35 * rows)).clip(0, 255)
    agent = np.where(rows[..., None] < horizon, wall[:, None, :], table[:, None, :]).astype(np.uint8)
    agent = np.ascontiguousarray(np.broadcast_to(agent, (size, size, 3)))
    _fill(agent, ellipse(to_img(lay["plate"]), 0.05, 0.09), (235, 235, 225))
    _fill(agent, rect(to_img(lay["box"]), 0.06, 0.04), lay["box_color"])
    _fill(agent, ellipse(to_img(lay["mug"]), 0.04, 0.035), lay["mug_color"])
    _fill(agent, ellipse(to_img(pos), 0.025, 0.04), np.array(lay["table"]) * 0.55)  # gripper shadow
    bc = to_img(pos, z - 0.05) if holding else to_img(bowl)
    _fill(agent, ellipse(bc, 0.045, 0.07), (25, 25, 30))
    _fill(agent, ellipse((bc[0] - 0.01, bc[1]), 0.025, 0.045), (70, 70, 80))
    gc = np.array(to_img(pos, z + 0.12))
    base = np.array([0.0, 0.12])  # the arm comes in from the top left
    d = gc - base
    s = (((yy - base[0]) * d[0] + (xx - base[1]) * d[1]) / (d @ d)).clip(0, 1)
    _fill(agent, (yy - base[0] - s * d[0]) ** 2 + (xx - base[1] - s * d[1]) ** 2 < 0.03 ** 2, (235, 235, 240))
    _fill(agent, rect(gc, 0.025, 0.035), (60, 60, 65))
    for side in (-1, 1):
        _fill(agent, rect((gc[0] + 0.05, gc[1] + side * (0.015 + 0.025 * opening)), 0.03, 0.007), (90, 90, 95))

    # Wrist view: looking down from the gripper, the table zoomed by the height, fingers at the bottom.
    zoom = 3.0 / (0.3 + z)

    def to_wrist(p):
        return 0.45 + zoom * (p[0] - pos[0]) / 2.2, 0.5 + zoom * (p[1] - pos[1])

    wrist = np.ascontiguousarray(np.broadcast_to(
        (lay["table"] * (0.8 + 0.3 * rows))[:, None, :].clip(0, 255).astype(np.uint8), (size, size, 3)))
    _fill(wrist, ellipse(to_wrist(lay["plate"]), 0.05 * zoom, 0.09 * zoom), (235, 235, 225))
    _fill(wrist, rect(to_wrist(lay["box"]), 0.05 * zoom, 0.04 * zoom), lay["box_color"])
    _fill(wrist, ellipse(to_wrist(lay["mug"]), 0.035 * zoom, 0.035 * zoom), lay["mug_color"])
    if holding:
        _fill(wrist, ellipse((0.62, 0.5), 0.22, 0.3), (25, 25, 30))
    else:
        _fill(wrist, ellipse(to_wrist(bowl), 0.045 * zoom, 0.07 * zoom), (25, 25, 30))
    for side in (-1, 1):
        _fill(wrist, rect((0.9, 0.5 + side * (0.12 + 0.22 * opening)), 0.12, 0.05), (80, 80, 85))
    return agent, wrist


def synthesize_episode(prompt: str, seed: int, chunks: int, cfg: PolicyConfig | None = None,
                       size: int = 128) -> ObservationSequence:
    """A LIBERO-shaped episode: agent view + wrist camera at `size`, one frame per control step for
    `chunks` chunks of `cfg` (default tiny-LIBERO), drawn in upstream's orientation, stored in LeRobot's."""
    cfg = cfg or tiny_libero_config()
    n = frames_per_episode(cfg, chunks)
    lay = _scene_layout(seed)
    agent, wrist = zip(*(_draw_frame(i / max(n - 1, 1), lay, size) for i in range(n)), strict=True)
    frames = {LIBERO_CAMERAS[0]: np.stack(agent)[:, :, ::-1], LIBERO_CAMERAS[1]: np.stack(wrist)[:, :, ::-1]}
    return ObservationSequence(prompt, {k: np.ascontiguousarray(v) for k, v in frames.items()}, seed)


# --------------------------------------------------------------------------------------------------
# Replayed episodes and drift
# --------------------------------------------------------------------------------------------------


@dataclass
class ReplayResult:
    actions: list[np.ndarray]  # per chunk [steps, used channels], robot units
    first_latent: np.ndarray  # the encoded first observation [1, C, 1, h, w] (fp32)
    infer_ms: list[float] = field(default_factory=list)

    @property
    def all_actions(self) -> np.ndarray:
        return np.concatenate(self.actions)


def replay_episode(policy, seq: ObservationSequence, chunks: int | None = None,
                   executed: Sequence[np.ndarray] | None = None) -> ReplayResult:
    """Open-loop replay: the policy infers each chunk, then gets the sequence's keyframes fed back with
    `executed[c]` as the executed actions (default: its own prediction). The same frames and executed
    actions for every policy make two policies' runs comparable step by step."""
    cfg = policy.cfg
    available = seq.num_chunks(cfg)
    chunks = available if chunks is None else chunks
    if chunks > available:
        raise ValueError(f"chunks: the sequence holds {available} chunks of {cfg.name!r}, asked for {chunks}")
    if executed is not None and len(executed) < chunks:
        raise ValueError(f"executed: {len(executed)} chunks of actions for a {chunks}-chunk replay")
    policy.reset(prompt=seq.prompt)
    actions, infer_ms, first_latent = [], [], None
    for c in range(chunks):
        out = policy.infer(seq.observation() if c == 0 else {})
        if c == 0:
            first_latent = policy.init_latent.float().cpu().numpy()
        actions.append(out["actions"])
        infer_ms.append(out["timing"]["total_ms"])
        policy.feedback(seq.keyframes(cfg, c), out["actions"] if executed is None else executed[c])
    return ReplayResult(actions, first_latent, infer_ms)


def normalized_actions(actions: np.ndarray, cfg: PolicyConfig) -> np.ndarray:
    """Robot actions [steps, used] -> model-normalized units (the q01..q99 range maps to [-1, 1])."""
    from lingbot_edge.core.actions import QUANTILE_EPS

    used = list(cfg.used_action_channel_ids)
    q01, q99 = np.asarray(cfg.action_q01)[used], np.asarray(cfg.action_q99)[used]
    return (np.asarray(actions, np.float64) - q01) / (q99 - q01 + QUANTILE_EPS) * 2 - 1


def action_drift(reference: Sequence[np.ndarray], test: Sequence[np.ndarray], cfg: PolicyConfig,
                 translation: Sequence[int] = (0, 1, 2), gripper: int | None = 6) -> dict[str, Any]:
    """Step-by-step difference of two runs' actions (per chunk [steps, used channels], robot units).

    - `step_err`: per step, the largest |difference| over the used channels, in normalized units;
      `max_step_err`, `mean_step_err`, `cumulative_err` (its sum over the episode) and
      `chunk_mean_err` (its mean per chunk: does the error grow along the episode?);
    - `rms`, `cos`: over all steps and channels (normalized units);
    - `xyz_drift`: |sum over steps of the difference| of the translation channels, robot units (LIBERO
      actions are end-effector deltas: how far apart the two runs' commanded positions end up);
    - `gripper_flips`: steps whose gripper command has the other sign (open vs close)."""
    if len(reference) != len(test):
        raise ValueError(f"runs: {len(reference)} vs {len(test)} chunks")
    ref = [normalized_actions(a, cfg) for a in reference]
    tst = [normalized_actions(a, cfg) for a in test]
    for i, (r, t) in enumerate(zip(ref, tst, strict=True)):
        if r.shape != t.shape:
            raise ValueError(f"chunk {i}: action shapes {r.shape} vs {t.shape}")
    r_all, t_all = np.concatenate(ref), np.concatenate(tst)
    step_err = np.abs(t_all - r_all).max(axis=1)
    bounds = np.cumsum([0] + [len(r) for r in ref])
    raw_ref = np.concatenate(reference).astype(np.float64)
    raw_test = np.concatenate(test).astype(np.float64)
    out = {
        "steps": int(len(step_err)),
        "step_err": step_err,
        "max_step_err": float(step_err.max()),
        "mean_step_err": float(step_err.mean()),
        "cumulative_err": float(step_err.sum()),
        "chunk_mean_err": [float(step_err[a:b].mean()) for a, b in zip(bounds, bounds[1:], strict=False)],
        "rms": float(np.sqrt(((t_all - r_all) ** 2).mean())),
        "cos": float((t_all * r_all).sum() / (np.linalg.norm(t_all) * np.linalg.norm(r_all) + 1e-30)),
        "xyz_drift": float(np.linalg.norm((raw_test - raw_ref)[:, list(translation)].sum(axis=0))),
    }
    if gripper is not None:
        out["gripper_flips"] = int((np.sign(raw_ref[:, gripper]) != np.sign(raw_test[:, gripper])).sum())
    return out


def frames_digest(frames: Mapping[str, Any]) -> str:
    """sha1 over the cameras' names, shapes and bytes (numpy or torch uint8)."""
    import hashlib

    h = hashlib.sha1()
    for key in sorted(frames):
        a = np.ascontiguousarray(np.asarray(frames[key]))
        h.update(f"{key}{a.shape}{a.dtype}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


class RecordedObservations:
    """An observation encoder that replays, call by call, the latents a real one produced on the same
    frames: with `recording` set it passes calls through to `encoder` and keeps the results (a
    reference run), then it returns them in order. The VAE is not what the drift runs change, so every
    DiT variant gets exactly the reference's latents without re-encoding; other frames than recorded
    at a position raise."""

    def __init__(self, encoder):
        self.encoder = encoder
        self.latent_hw = getattr(encoder, "latent_hw", None)
        self.calls: list[tuple[str, Any]] = []
        self.recording = False
        self._next = 0

    def reset(self) -> None:
        self._next = 0
        if self.recording:
            self.calls = []
            self.encoder.reset()

    def encode(self, frames: Mapping[str, Any]):
        digest = frames_digest(frames)
        if self.recording:
            latents = self.encoder.encode(frames)
            self.calls.append((digest, latents.detach().clone()))
            return latents
        if self._next >= len(self.calls) or self.calls[self._next][0] != digest:
            raise RuntimeError(f"RecordedObservations: call {self._next} has frames that were not recorded at this "
                               f"position ({len(self.calls)} calls recorded)")
        self._next += 1
        return self.calls[self._next - 1][1]


class DriftHarness:
    """Replays one episode with a reference policy, then with other DiT variants of it under the same
    conditions: the same prompt embeddings, noise seed, observed latents and the REFERENCE run's
    executed actions fed back, so only the DiT differs and the runs compare step by step."""

    def __init__(self, policy, seq: ObservationSequence, chunks: int | None = None):
        from lingbot_edge.core.policy import LingBotPolicy

        self.seq, self.chunks = seq, chunks
        self.cfg, self.seed = policy.cfg, policy.seed
        self.model = policy.model
        self.prompt_encoder = policy.prompt_encoder
        self.real_encoder = policy.obs_encoder
        self.observations = RecordedObservations(policy.obs_encoder)
        self.observations.recording = True
        ref = LingBotPolicy(self.cfg, self.model, self.observations, self.prompt_encoder, sampler="static",
                            compile=False, seed=self.seed)
        self.reference = replay_episode(ref, seq, chunks)
        self.observations.recording = False

    def policy(self, model, real_encoder: bool = False):
        """A policy over `model` sharing the reference's prompts and seed; its observations are the
        recorded ones (or, `real_encoder=True`, encoded: for other sequences, e.g. calibration)."""
        from lingbot_edge.core.policy import LingBotPolicy

        encoder = self.real_encoder if real_encoder else self.observations
        return LingBotPolicy(self.cfg, model, encoder, self.prompt_encoder, sampler="static", compile=False,
                             seed=self.seed)

    def run(self, model, chunks: int | None = None) -> tuple[ReplayResult, dict[str, Any]]:
        """The episode (its first `chunks`) with `model`, fed the reference's executed actions, and its
        `action_drift` from the reference."""
        run = replay_episode(self.policy(model), self.seq, chunks or len(self.reference.actions),
                             executed=self.reference.actions)
        return run, action_drift(self.reference.actions[:len(run.actions)], run.actions, self.cfg)


def format_drift_table(rows: Mapping[str, Mapping[str, Any]], chunk_columns: bool = True) -> str:
    """Markdown: one row per variant of `action_drift` results (+ the mean error per chunk)."""
    head = ("| variant | max step err | mean step err | cumulative err | RMS | cosine | xyz drift | gripper flips |\n"
            "|---|---|---|---|---|---|---|---|\n")
    body = "".join(
        f"| {name} | {r['max_step_err']:.2e} | {r['mean_step_err']:.2e} | {r['cumulative_err']:.2e} "
        f"| {r['rms']:.2e} | {r['cos']:.6f} | {r['xyz_drift']:.2e} | {r.get('gripper_flips', '-')} |\n"
        for name, r in rows.items())
    if not chunk_columns or not rows:
        return head + body
    n = len(next(iter(rows.values()))["chunk_mean_err"])
    head2 = "| variant | " + " | ".join(f"chunk {i}" for i in range(n)) + " |\n|---|" + "---|" * n + "\n"
    body2 = "".join(f"| {name} | " + " | ".join(f"{e:.2e}" for e in r["chunk_mean_err"]) + " |\n"
                    for name, r in rows.items())
    return head + body + "\nMean per-step error per chunk (normalized units):\n\n" + head2 + body2


# --------------------------------------------------------------------------------------------------
# Goldens
# --------------------------------------------------------------------------------------------------


def latent_statistics(vae, seq: ObservationSequence) -> tuple[list[float], list[float]]:
    """Per latent channel mean and std of the VAE's posterior means over every camera of `seq`
    (streamed 1 + 4k frames, identity normalization): what Wan's latents_mean / latents_std are for
    its training data."""
    import torch

    from lingbot_edge.io.frozen import StreamingVAEEncoder

    enc = StreamingVAEEncoder(vae)
    enc._mean.zero_()
    enc._std.fill_(1.0)
    mus = []
    n = 1 + (seq.num_frames - 1) // VAE_TEMPORAL * VAE_TEMPORAL
    for frames in seq.frames.values():
        video = torch.from_numpy(frames[:n]).permute(3, 0, 1, 2).float()[None] / 127.5 - 1  # [1, 3, T, H, W]
        enc.reset()
        mus.append(torch.cat([enc.encode(video[:, :, :1]), enc.encode(video[:, :, 1:])], dim=2))
    mu = torch.cat(mus, dim=0).transpose(0, 1).flatten(1).double()  # [z, everything]
    return mu.mean(1).tolist(), mu.std(1).tolist()


def make_checkpoint(data_dir: str | Path = DEFAULT_DATA_DIR, seed: int = 0) -> Path:
    """Write the tiny released-layout checkpoint: weights from `seed` stored as bf16, and the VAE's
    latents_mean / latents_std set to its latent statistics on a synthesized episode (another scene
    than the committed ones). A random tiny VAE's latents are mostly a constant offset, their image
    content ~5x smaller; normalized, the image content is what the DiT sees, so what reaches the
    actions depends on where things are in the frames (the orientation tests need that)."""
    import shutil
    import tempfile

    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    from lingbot_edge.io.loading import load_vae
    from lingbot_edge.testing.checkpoints import save_tiny_checkpoint

    out = Path(data_dir) / CHECKPOINT_DIR
    with tempfile.TemporaryDirectory() as tmp:
        root = save_tiny_checkpoint(Path(tmp) / "ckpt", seed=seed)
        for path in root.rglob("*.safetensors"):
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata()
                state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open is not iterable
            state = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in state.items()}
            save_file(state, str(path), metadata=meta)
        stats_episode = synthesize_episode("calibrate the latents", seed=seed + 1000, chunks=2)
        mean, std = latent_statistics(load_vae(root / "vae"), stats_episode)
        vae_config = json.loads((root / "vae" / "config.json").read_text())
        vae_config.update(latents_mean=[round(m, 6) for m in mean], latents_std=[round(s, 6) for s in std])
        (root / "vae" / "config.json").write_text(json.dumps(vae_config, indent=2) + "\n")
        (root / "policy_config.json").write_text(json.dumps(tiny_libero_policy_config(), indent=2) + "\n")
        if out.exists():
            shutil.rmtree(out)
        shutil.copytree(root, out)
    return out


def make_observations(data_dir: str | Path = DEFAULT_DATA_DIR) -> list[Path]:
    cfg = tiny_libero_config()
    return [synthesize_episode(prompt, seed, chunks, cfg).save(Path(data_dir) / f"{stem}.npz")
            for stem, prompt, seed, chunks in EPISODES]


def load_episodes(data_dir: str | Path = DEFAULT_DATA_DIR) -> dict[str, ObservationSequence]:
    return {stem: ObservationSequence.load(Path(data_dir) / f"{stem}.npz") for stem, *_ in EPISODES}


def golden_run(data_dir: str | Path = DEFAULT_DATA_DIR, policy=None) -> dict[str, ReplayResult]:
    """Every committed episode replayed by the fp32 tiny-LIBERO policy of the committed checkpoint."""
    policy = policy or load_tiny_libero_policy(Path(data_dir) / CHECKPOINT_DIR)
    return {stem: replay_episode(policy, seq) for stem, seq in load_episodes(data_dir).items()}


def make_goldens(data_dir: str | Path = DEFAULT_DATA_DIR) -> Path:
    """Replay the committed episodes (fp32, 1 thread) and write their actions and first latents."""
    import torch

    torch.set_num_threads(1)
    arrays: dict[str, np.ndarray] = {}
    for stem, run in golden_run(data_dir).items():
        arrays[f"{stem}/actions"] = run.all_actions
        arrays[f"{stem}/chunk_steps"] = np.array([len(a) for a in run.actions])
        arrays[f"{stem}/first_latent"] = run.first_latent
    meta = {"torch": torch.__version__, "config": dataclasses.asdict(tiny_libero_config())}
    path = Path(data_dir) / GOLDENS_FILE
    np.savez_compressed(path, meta=np.array(json.dumps(meta)), **arrays)
    return path


def load_goldens(data_dir: str | Path = DEFAULT_DATA_DIR) -> dict[str, dict[str, Any]]:
    """{episode: {"actions", "chunk_steps", "first_latent", "chunks" (the actions split per chunk)}}."""
    out: dict[str, dict[str, Any]] = {}
    with np.load(Path(data_dir) / GOLDENS_FILE) as z:
        for key in z.files:
            if key != "meta":
                stem, name = key.split("/")
                out.setdefault(stem, {})[name] = z[key]
    for g in out.values():
        g["chunks"] = np.split(g["actions"], np.cumsum(g["chunk_steps"])[:-1])
    return out


def golden_mismatch(run: ReplayResult, golden: Mapping[str, Any], cfg: PolicyConfig,
                    chunks: int | None = None) -> dict[str, float]:
    """Largest |difference| to the golden run: actions (normalized units) over the first `chunks`
    chunks (inf if the shapes differ), and the encoded first observation."""
    chunks = len(golden["chunks"]) if chunks is None else chunks
    if len(run.actions) < chunks:
        raise ValueError(f"run: {len(run.actions)} chunks, the comparison needs {chunks}")
    a = [normalized_actions(x, cfg) for x in run.actions[:chunks]]
    g = [normalized_actions(x, cfg) for x in golden["chunks"][:chunks]]
    same = all(x.shape == y.shape for x, y in zip(a, g, strict=True))
    return {"actions": float(np.abs(np.concatenate(a) - np.concatenate(g)).max()) if same else math.inf,
            "first_latent": float(np.abs(run.first_latent - golden["first_latent"]).max())}


# --------------------------------------------------------------------------------------------------
# eval-libero: real LIBERO episodes
# --------------------------------------------------------------------------------------------------


def libero_config_dir() -> Path:
    """Where LIBERO reads its config.yaml (`LIBERO_CONFIG_PATH`, default ~/.libero)."""
    return Path(os.environ.get("LIBERO_CONFIG_PATH", os.path.expanduser("~/.libero")))


def _libero_package_dir() -> Path | None:
    """The installed `libero/libero` folder, found without importing it (its import asks on stdin
    for paths when config.yaml is missing)."""
    try:
        spec = importlib.util.find_spec("libero")
    except (ImportError, ValueError):
        return None
    for loc in (spec.submodule_search_locations or []) if spec is not None else []:
        if (Path(loc) / "libero" / "__init__.py").is_file():
            return Path(loc) / "libero"
    return None


def module_available(name: str) -> bool:
    """Whether `name` can be imported (found, not imported)."""
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def libero_asset_dirs(package_dir: Path | None) -> list[Path]:
    """Where hf-libero looks for its assets: inside the package, then its Hub download cache."""
    dirs = [package_dir / "assets"] if package_dir is not None else []
    return dirs + [Path(os.path.expanduser("~/.cache/libero/assets"))]


def missing_requirements(suite: str, checkpoint: str | Path | None, quantized: Mapping[str, str | Path] | None = None,
                         device: str = "cuda") -> list[str]:
    """Everything `eval-libero` needs that is not here, each with how to get it ([] when all is there)."""
    missing = []
    if suite not in LIBERO_SUITES:
        missing.append(f"suite {suite!r}: not a LIBERO suite; expected one of {list(LIBERO_SUITES)}")
    pkg = _libero_package_dir()
    if pkg is None:
        missing.append(
            "the `libero` Python package: PyPI hf-libero 0.1.4 (what LeRobot's `lerobot[libero]` extra pins; it "
            f"brings robosuite 1.4, mujoco < 3.9, bddl, robomimic): `{LIBERO_PIP}` (the constraints keep torch "
            "as it is; a separate venv is safer), and MUJOCO_GL=egl for headless rendering")
    else:
        for mod, what in (("robosuite", "robosuite 1.4 (the simulator)"), ("mujoco", "mujoco (the physics)"),
                          ("bddl", "bddl (the task language)")):
            if not module_available(mod):
                missing.append(f"{what}: one of hf-libero's dependencies (`{LIBERO_PIP}`)")
        if suite in LIBERO_SUITES:
            for what, sub in (("task definitions", "bddl_files"), ("initial states", "init_files")):
                if not (pkg / sub / suite).is_dir():
                    missing.append(f"LIBERO {what} of {suite}: no folder {pkg / sub / suite} (reinstall hf-libero)")
        if not any(all((d / s).is_dir() for s in LIBERO_ASSET_DIRS) for d in libero_asset_dirs(pkg)):
            places = " or ".join(str(d) for d in libero_asset_dirs(pkg))
            missing.append(
                f"LIBERO assets (scene meshes and textures: {', '.join(LIBERO_ASSET_DIRS)}) under {places}: "
                "hf-libero downloads them from the Hugging Face dataset lerobot/libero-assets on first use; "
                f"without Hub access, fetch that dataset elsewhere and copy it to {libero_asset_dirs(pkg)[-1]}")
    if checkpoint is None:
        missing.append("a LingBot-VA LIBERO checkpoint: --checkpoint DIR (released layout: transformer/ vae/ "
                       "text_encoder/ tokenizer/, or a LeRobot lingbot_va policy folder)")
    else:
        from lingbot_edge.io.layout import CheckpointError, resolve_checkpoint
        from lingbot_edge.io.loading import policy_config_for

        try:
            policy_config_for(resolve_checkpoint(checkpoint), "libero")
        except (CheckpointError, ValueError) as e:
            missing.append(f"a usable LIBERO checkpoint at {checkpoint}: {e}")
    if quantized:
        from lingbot_edge.core.qlinear import QuantFormat, UnsupportedSchemeError, check_device_support
        from lingbot_edge.io.quantized import QuantizedCheckpointError, read_manifest

        for name, folder in quantized.items():
            try:
                for entry in read_manifest(folder)["modules"].values():
                    check_device_support(QuantFormat.from_dict(entry.get("format")), device, what=name)
            except (QuantizedCheckpointError, UnsupportedSchemeError, OSError, ValueError, KeyError) as e:
                missing.append(f"quantized variant {name!r} at {folder}: {e} (write one with `lingbot-edge quantize "
                               f"--checkpoint CKPT --scheme SCHEME --out {folder}`)")
    return missing


def ensure_libero_config() -> None:
    """LIBERO asks on stdin for its paths when config.yaml is missing: write its defaults first."""
    path = libero_config_dir() / "config.yaml"
    pkg = _libero_package_dir()
    if path.exists() or pkg is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    paths = {"benchmark_root": pkg, "bddl_files": pkg / "bddl_files", "init_states": pkg / "init_files",
             "datasets": pkg.parent / "datasets", "assets": pkg / "assets"}
    path.write_text("".join(f"{k}: {v}\n" for k, v in paths.items()))
    log.info("wrote LIBERO's default config %s", path)


class LiberoEnv:
    """One LIBERO task in hf-libero's OffScreenRenderEnv: reset to an initial state, settle, step.

    Observations leave as {policy camera: uint8 [H, W, 3]} in LeRobot's orientation (the raw render
    rotated 180 degrees), actions enter as 7 floats clipped to LIBERO's [-1, 1]."""

    def __init__(self, suite: str, task_id: int, render_size: int = 256, seed: int = 0):
        ensure_libero_config()
        from libero.libero import benchmark, get_libero_path
        from libero.libero.envs import OffScreenRenderEnv

        bench = benchmark.get_benchmark_dict()[suite]()
        task = bench.get_task(task_id)
        self.prompt = task.language
        self.name = task.name
        self.init_states = bench.get_task_init_states(task_id)
        bddl = os.path.join(get_libero_path("bddl_files"), task.problem_folder, task.bddl_file)
        self.env = OffScreenRenderEnv(bddl_file_name=bddl, camera_heights=render_size, camera_widths=render_size)
        self.seed = seed

    @staticmethod
    def frames(raw: Mapping[str, Any]) -> dict[str, np.ndarray]:
        return {cam: np.ascontiguousarray(np.asarray(raw[key])[::-1, ::-1]) for key, cam in LIBERO_RAW_CAMERAS.items()}

    def reset(self, episode: int) -> dict[str, np.ndarray]:
        self.env.seed(self.seed)
        self.env.reset()
        raw = self.env.set_init_state(self.init_states[episode % len(self.init_states)])
        for _ in range(LIBERO_NUM_STEPS_WAIT):
            raw, _, _, _ = self.env.step(np.array(LIBERO_DUMMY_ACTION))
        return self.frames(raw)

    def step(self, action: np.ndarray) -> tuple[dict[str, np.ndarray], bool]:
        raw, _, _, _ = self.env.step(np.clip(np.asarray(action, np.float64), -1.0, 1.0))
        return self.frames(raw), bool(self.env.check_success())

    def close(self) -> None:
        self.env.close()


@dataclass
class EpisodeOutcome:
    task_id: int
    episode: int
    success: bool
    steps: int
    chunks: int
    infer_ms: float  # mean per chunk


def run_libero_episode(policy, env, episode: int, max_steps: int, task_id: int = 0) -> EpisodeOutcome:
    """Closed loop: infer a chunk, execute it step by step (recording a keyframe every `keyframe_stride`
    steps), feed the keyframes and the executed actions back, until success or `max_steps`. `env` has
    `prompt`, `reset(episode) -> frames`, `step(action) -> (frames, success)` (see `LiberoEnv`)."""
    cfg = policy.cfg
    obs = env.reset(episode)
    policy.reset(prompt=env.prompt)
    steps, chunks, infer_ms, success = 0, 0, [], False
    while steps < max_steps and not success:
        out = policy.infer(obs if chunks == 0 else {})
        infer_ms.append(out["timing"]["total_ms"])
        keyframes: dict[str, list[np.ndarray]] = {k: [] for k in cfg.obs_cam_keys}
        executed = []
        for i, action in enumerate(out["actions"]):
            obs, success = env.step(action)
            executed.append(action)
            steps += 1
            if (i + 1) % cfg.keyframe_stride == 0:
                for k in cfg.obs_cam_keys:
                    keyframes[k].append(obs[k])
            if success or steps >= max_steps:
                break
        chunks += 1
        if len(executed) < len(out["actions"]):  # the episode ended inside the chunk: nothing to feed back
            break
        policy.feedback({k: np.stack(v) for k, v in keyframes.items()}, np.stack(executed))
    return EpisodeOutcome(task_id, episode, success, steps, chunks, float(np.mean(infer_ms)))


def evaluate(variants: Mapping[str, Callable[[], Any]], env_factory: Callable[[int], Any], task_ids: Sequence[int],
             episodes: int, max_steps: int,
             progress: Callable[[str], None] | None = None) -> dict[str, list[EpisodeOutcome]]:
    """Every variant (name -> policy factory; one policy alive at a time) on the same tasks and initial
    states (episode e of a task starts from its initial state e)."""
    results: dict[str, list[EpisodeOutcome]] = {}
    for name, build in variants.items():
        policy = build()
        outcomes = results[name] = []
        for task_id in task_ids:
            env = env_factory(task_id)
            try:
                for e in range(episodes):
                    o = run_libero_episode(policy, env, e, max_steps, task_id)
                    outcomes.append(o)
                    if progress:
                        progress(f"{name} task {task_id} episode {e}: {'success' if o.success else 'failure'} "
                                 f"after {o.steps} steps ({o.infer_ms:.0f} ms/chunk)")
            finally:
                env.close()
        del policy
        _free_device_memory()
    return results


def _free_device_memory() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def success_table(results: Mapping[str, Sequence[EpisodeOutcome]], task_names: Mapping[int, str] | None = None) -> str:
    """Markdown: success rate per task and overall (+ mean inference ms per chunk), one column per variant."""
    names = list(results)

    def rate(outs: Sequence[EpisodeOutcome]) -> str:
        n = sum(o.success for o in outs)
        return f"{n / len(outs):.0%} ({n}/{len(outs)})" if outs else "-"

    lines = ["| task | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for t in sorted({o.task_id for r in results.values() for o in r}):
        label = f"{t}: {task_names[t]}" if task_names and t in task_names else str(t)
        cells = " | ".join(rate([o for o in results[n] if o.task_id == t]) for n in names)
        lines.append(f"| {label} | {cells} |")
    lines.append("| **all** | " + " | ".join(rate(results[n]) for n in names) + " |")
    lines.append("| ms / chunk | " + " | ".join(
        f"{np.mean([o.infer_ms for o in results[n]]):.0f}" if results[n] else "-" for n in names) + " |")
    return "\n".join(lines) + "\n"


class FrozenParts:
    """What every DiT variant of one checkpoint shares: the config, the prompt cache (UMT5 on the CPU,
    once per prompt) and the VAE encoder. `policy(None)` wraps the checkpoint's own DiT, `policy(folder)`
    a quantized checkpoint's (`lingbot_edge.io.quantized.load_quantized`)."""

    def __init__(self, checkpoint: str | Path, device: str, dtype, overrides: Mapping[str, Any] | None = None):
        from lingbot_edge.io.frozen import ObservationEncoder, StreamingVAEEncoder
        from lingbot_edge.io.layout import resolve_checkpoint
        from lingbot_edge.io.loading import build_prompt_cache, load_vae, policy_config_for

        self.layout = resolve_checkpoint(checkpoint)
        self.cfg = policy_config_for(self.layout, "libero", overrides=overrides)
        self.device, self.dtype = device, dtype
        self.prompts = build_prompt_cache(self.layout, max_sequence_length=self.cfg.max_sequence_length,
                                          device=device, dtype=dtype)
        vae = StreamingVAEEncoder(load_vae(self.layout.vae, dtype=dtype), device=device, dtype=dtype)
        self.obs_encoder = ObservationEncoder(vae, list(self.cfg.obs_cam_keys), self.cfg.height, self.cfg.width,
                                              layout=self.cfg.camera_layout)

    def policy(self, quantized: str | Path | None, compile: bool, seed: int = 0):
        from lingbot_edge.core.policy import LingBotPolicy
        from lingbot_edge.io.loading import load_dit
        from lingbot_edge.io.quantized import load_quantized

        if quantized is None:
            model = load_dit(self.layout, self.dtype, self.device)
        else:
            model = load_quantized(quantized, dtype=self.dtype, device=self.device)
        return LingBotPolicy(self.cfg, model, self.obs_encoder, self.prompts, compile=compile, seed=seed)


def run_eval_libero(args: argparse.Namespace) -> int:
    """`lingbot-edge eval-libero`: success rate per DiT variant, side by side; exit 2 if something is missing."""
    quantized = dict(args.quantized or [])
    device = args.device or _default_device()
    missing = missing_requirements(args.suite, args.checkpoint, quantized, device=device)
    if missing:
        print(f"eval-libero {args.suite}: cannot run LIBERO episodes here; missing:", file=sys.stderr)
        for m in missing:
            print(f"  - {m}", file=sys.stderr)
        print("Without LIBERO: `pytest tests/libero` checks the tiny-LIBERO policy against committed goldens and "
              "bounds quantized-vs-reference drift; `python -m bench.libero_drift` writes the drift table.",
              file=sys.stderr)
        return 2

    import torch

    dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[args.dtype]
    compile = {"auto": device.startswith("cuda"), "on": True, "off": False}[args.compile]
    overrides = {"image_transform": args.image_transform} if args.image_transform else {}
    parts = FrozenParts(args.checkpoint, device, dtype, overrides)
    variants: dict[str, Callable[[], Any]] = {}
    if not args.no_baseline:
        variants[args.dtype] = lambda: parts.policy(None, compile=compile, seed=args.seed)
    for name, folder in quantized.items():
        variants[name] = lambda folder=folder: parts.policy(folder, compile=compile, seed=args.seed)
    if not variants:
        print("eval-libero: nothing to evaluate (--no-baseline and no --quantized)", file=sys.stderr)
        return 2
    task_ids = args.task_ids or list(range(_suite_size(args.suite)))
    max_steps = args.max_steps or LIBERO_MAX_STEPS[args.suite]
    names: dict[int, str] = {}

    def make_env(task_id: int) -> LiberoEnv:
        env = LiberoEnv(args.suite, task_id, args.render_size, args.seed)
        names[task_id] = env.prompt
        return env

    t0 = time.perf_counter()
    results = evaluate(variants, make_env, task_ids, args.episodes, max_steps, progress=lambda s: log.info("%s", s))
    table = success_table(results, names)
    print(f"LIBERO {args.suite}: {args.episodes} episode(s) per task, {len(task_ids)} task(s), max {max_steps} steps, "
          f"image_transform {parts.cfg.image_transform}, {time.perf_counter() - t0:.0f} s\n")
    print(table)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"eval_{args.suite}.md").write_text(table)
        (out / f"eval_{args.suite}.json").write_text(json.dumps(
            {k: [dataclasses.asdict(o) for o in v] for k, v in results.items()}, indent=1))
    return 0


def _suite_size(suite: str) -> int:
    ensure_libero_config()
    from libero.libero import benchmark

    return benchmark.get_benchmark_dict()[suite]().n_tasks


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def parse_variant(spec: str) -> tuple[str, str]:
    """`--quantized NAME=DIR` -> (NAME, DIR)."""
    name, sep, folder = spec.partition("=")
    if not sep or not name or not folder:
        raise argparse.ArgumentTypeError(f"expected NAME=DIR, got {spec!r}")
    return name, folder


# --------------------------------------------------------------------------------------------------
# python -m lingbot_edge.eval.libero make-checkpoint | make-observations | make-goldens | check-goldens
# --------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lingbot_edge.eval.libero",
                                     description="Regenerate / check the LIBERO regression data of tests/libero.")
    parser.add_argument("command", choices=("make-checkpoint", "make-observations", "make-goldens", "check-goldens"))
    parser.add_argument("--data", default=str(DEFAULT_DATA_DIR), help=f"data folder (default {DEFAULT_DATA_DIR})")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    if args.command == "make-checkpoint":
        print(make_checkpoint(args.data))
    elif args.command == "make-observations":
        print("\n".join(str(p) for p in make_observations(args.data)))
    elif args.command == "make-goldens":
        print(make_goldens(args.data))
    else:
        import torch

        torch.set_num_threads(1)
        goldens, cfg = load_goldens(args.data), tiny_libero_config()
        for stem, run in golden_run(args.data).items():
            print(stem, golden_mismatch(run, goldens[stem], cfg))
    return 0


if __name__ == "__main__":
    sys.exit(main())
