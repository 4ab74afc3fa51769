"""LIBERO regression fixtures: the tiny-LIBERO policy, synthesized LIBERO-shaped episodes, replays through
the episode protocol, quantized-vs-reference drift, and the makers of the data in `tests/libero/data`.

Orientation: frames are drawn in upstream's training orientation and stored in LeRobot's (one horizontal
flip more, see `lingbot_edge.eval.libero`); the libero settings' `image_transform` "hflip" undoes it.

Regenerate with `python -m lingbot_edge.testing.libero ...`:

- `make-checkpoint`: a tiny released-layout checkpoint (transformer/ vae/ text_encoder/ tokenizer/ and its
  policy_config.json, weights in bf16 like the released one), read back by `load_policy`;
- `make-observations`: one synthesized episode (agent view + wrist, 128x128, a scripted gripper placing a
  bowl on a plate, one frame per control step);
- `make-goldens`: the fp32 tiny-LIBERO policy replayed over it (1 thread): actions + first latent;
  `check-goldens` prints the differences.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lingbot_edge.core.actions import QUANTILE_EPS
from lingbot_edge.core.config import (
    MODEL_PRESETS,
    VAE_TEMPORAL,
    PolicyConfig,
    get_policy_config,
    policy_fields_from_upstream,
)
from lingbot_edge.core.episode import episode_frames
from lingbot_edge.core.policy import LingBotPolicy, orient_frames
from lingbot_edge.core.protocols import ObservationEncoder
from lingbot_edge.eval.libero import LIBERO_CAMERAS
from lingbot_edge.io.encoders import StreamingVAEEncoder
from lingbot_edge.io.loading import EncoderSettings, load_policy, load_vae
from lingbot_edge.testing.checkpoints import save_tiny_checkpoint
from lingbot_edge.testing.libero_scene import draw_frame, scene_layout

log = logging.getLogger(__name__)

DEFAULT_DATA_DIR = Path(__file__).resolve().parents[2] / "tests" / "libero" / "data"
CHECKPOINT_DIR = "tiny_libero_ckpt"
GOLDENS_FILE = "goldens.npz"
# The committed episodes: (file stem, prompt, scene seed, chunks).
EPISODES = (("episode_bowl_plate", "put the black bowl on the plate", 0, 8),)



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
    fields = policy_fields_from_upstream(tiny_libero_policy_config(), "tiny-libero", MODEL_PRESETS["tiny"])
    cfg = get_policy_config("tiny").replace(**fields)
    return cfg.replace(**overrides) if overrides else cfg


def load_tiny_libero_policy(checkpoint: str | Path, sampler: str = "static", dtype=None, **overrides):
    """The tiny-LIBERO policy from its checkpoint folder (settings from its policy_config.json) through
    `load_policy`: CPU, fp32 (the DiT in `dtype` if given; VAE and UMT5 fp32), eager, prompts in memory."""
    import torch

    return load_policy(checkpoint, device="cpu", dtype=dtype or torch.float32,
                       encoders=EncoderSettings(vae_dtype=torch.float32, text_encoder_dtype=torch.float32),
                       compile=False, prompt_cache_dir=False, sampler=sampler, **overrides)


# --------------------------------------------------------------------------------------------------
# Observation sequences
# --------------------------------------------------------------------------------------------------


def frames_per_episode(cfg: PolicyConfig, chunks: int) -> int:
    """Frames of an episode of `chunks` chunks: the first observation, then the keyframes fed back
    (4 (F - 1) after the first chunk, 4 F after the others). Sizes a sequence before any chunk exists
    (synthesizing one); replays take each chunk's `Chunk.num_keyframes`, the protocol's count."""
    return episode_frames(cfg, chunks)


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

    def transformed(self, transform: str) -> ObservationSequence:
        """The same episode with `policy.orient_frames(frames, transform)` applied (contiguous copies)."""
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










def synthesize_episode(prompt: str, seed: int, chunks: int, cfg: PolicyConfig | None = None,
                       size: int = 128) -> ObservationSequence:
    """A LIBERO-shaped episode: agent view + wrist camera at `size`, one frame per control step for
    `chunks` chunks of `cfg` (default tiny-LIBERO), drawn in upstream's orientation, stored in LeRobot's."""
    cfg = cfg or tiny_libero_config()
    n = frames_per_episode(cfg, chunks)
    lay = scene_layout(seed)
    agent, wrist = zip(*(draw_frame(i / max(n - 1, 1), lay, size) for i in range(n)), strict=True)
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
    """Open-loop replay through the episode protocol: the policy infers each chunk, which gets the
    sequence's next `chunk.num_keyframes` frames and `executed[c]` as its executed actions (default: its
    own prediction) before `policy.feedback(chunk)`. The same frames and executed actions for every
    policy make two policies' runs comparable step by step."""
    cfg = policy.cfg
    available = seq.num_chunks(cfg)
    chunks = available if chunks is None else chunks
    if chunks > available:
        raise ValueError(f"chunks: the sequence holds {available} chunks of {cfg.name!r}, asked for {chunks}")
    if executed is not None and len(executed) < chunks:
        raise ValueError(f"executed: {len(executed)} chunks of actions for a {chunks}-chunk replay")
    policy.reset(prompt=seq.prompt)
    actions, infer_ms, first_latent = [], [], None
    cursor = 1  # frame 0 is the first observation
    for c in range(chunks):
        chunk = policy.infer(seq.observation() if c == 0 else {})
        if c == 0:
            first_latent = policy.init_latent.float().cpu().numpy()
        actions.append(chunk.actions)
        infer_ms.append(chunk.timing["total_ms"])
        stop = cursor + chunk.num_keyframes
        chunk.set_keyframes(cfg.canonical_cameras({k: v[cursor:stop] for k, v in seq.frames.items()}),
                            None if executed is None else executed[c])
        policy.feedback(chunk)
        cursor = stop
    return ReplayResult(actions, first_latent, infer_ms)


def normalized_actions(actions: np.ndarray, cfg: PolicyConfig) -> np.ndarray:
    """Robot actions [steps, used] -> model-normalized units (the q01..q99 range maps to [-1, 1])."""
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

    def __init__(self, encoder: ObservationEncoder):
        self.encoder = encoder
        self.latent_hw = encoder.latent_hw
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
        encoder = self.real_encoder if real_encoder else self.observations
        return LingBotPolicy(self.cfg, model, encoder, self.prompt_encoder, sampler="static", compile=False,
                             seed=self.seed)

    def run(self, model, chunks: int | None = None) -> tuple[ReplayResult, dict[str, Any]]:
        """The episode (its first `chunks`) with `model`, fed the reference's executed actions, and its
        `action_drift` from the reference."""
        run = replay_episode(self.policy(model), self.seq, chunks or len(self.reference.actions),
                             executed=self.reference.actions)
        return run, action_drift(self.reference.actions[:len(run.actions)], run.actions, self.cfg)


def format_drift_table(rows: Mapping[str, Mapping[str, Any]], chunk_columns: bool = True,
                       extra: Mapping[str, Mapping[str, str]] | None = None) -> str:
    """Markdown: one row per variant of `action_drift` results (+ the mean error per chunk). `extra`: more
    columns, {title: {variant: cell}} ("-" where a variant has none)."""
    extra = extra or {}
    head = ("| variant | max step err | mean step err | cumulative err | RMS | cosine | xyz drift | gripper flips |"
            + "".join(f" {t} |" for t in extra) + "\n|---|---|---|---|---|---|---|---|" + "---|" * len(extra) + "\n")
    body = "".join(
        f"| {name} | {r['max_step_err']:.2e} | {r['mean_step_err']:.2e} | {r['cumulative_err']:.2e} "
        f"| {r['rms']:.2e} | {r['cos']:.6f} | {r['xyz_drift']:.2e} | {r.get('gripper_flips', '-')} |"
        + "".join(f" {cells.get(name, '-')} |" for cells in extra.values()) + "\n"
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
# python -m lingbot_edge.testing.libero make-checkpoint | make-observations | make-goldens | check-goldens
# --------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lingbot_edge.testing.libero",
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
