"""Few-step action sampling: a student DiT that reaches the teacher's action endpoint in N Euler steps.

    <out>/targets.pt        the teacher's action trajectories on the run's latents (reused on resume)
    <out>/train_state.pt    resumable training state;  <out>/loss.png  the loss curves
    <out>/checkpoint/       the student, in the teacher's layout: its text_encoder/ tokenizer/ vae/ copied, new
                            transformer/ weights, policy_config.json with action_num_inference_steps = N
    <out>/report.json       settings, losses, endpoint errors, timings

Every action forward reads all the DiT's weights for a few tokens, so the action stream's step count sets most of
a chunk's time (docs/distillation.md). The teacher's targets come from its own sampler, run over every chunk of
an episode at once: the teacher-forced forward (`train.teacher`) gives every chunk's action velocity given its
true history in one pass, so replacing the noisy action copies by the current states and stepping them with the
action schedule's Euler factors, `action_num_inference_steps` times, is the sampler's action pass for every chunk
(the history and the chunk's PREDICTED video are the same in every step, as in the cache). Both copies the
layout holds are integrated: the synchronous one and the grounded lookahead's (`GROUNDED_SEGMENTS`).
`tests/train/test_train_distill.py` checks the endpoint against `ReferenceSampler`, chunk by chunk through its cache.

The video stream is not distilled: under `video_exec_step` 1 it runs one forward already, and the chunk's
PREDICTED video is that forward's input (noise at t = 1000), drawn per sample here as the policy draws it.
The blocks are shared by the two streams, so a video term keeps the student's video velocity at the teacher's.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor

from lingbot_edge.core.config import PolicyConfig
from lingbot_edge.core.scheduler import FlowMatchSchedule
from lingbot_edge.io.checkpoint import save_transformer
from lingbot_edge.io.files import check_output_folder, write_folder, write_text
from lingbot_edge.io.loading import checkpoint_folder
from train.distill_config import METHODS, DistillConfig
from train.pipeline import load_checkpoint_policy
from train.teacher import EpisodeLayout, SegmentInputs, episode_layout, teacher_forced_forward
from train.trainer import (
    EpisodeTensors,
    adamw,
    atomic_torch_save,
    loss_summary,
    open_run,
    read_latents,
    run_steps,
)

log = logging.getLogger(__name__)

TARGETS_NAME = "targets.pt"
REPORT_NAME = "report.json"
CHECKPOINT_NAME = "checkpoint"
FROZEN_PARTS = ("text_encoder", "tokenizer", "vae")  # copied from the teacher's folder unchanged


def load_teacher(teacher: str | Path) -> tuple[Path, torch.nn.Module, PolicyConfig]:
    """(folder, DiT in fp32, policy settings) of a checkpoint folder or an embedded checkpoint's name."""
    folder = Path(checkpoint_folder(teacher))
    policy = load_checkpoint_policy(folder, dtype="float32", sampler="reference")
    cfg = policy.cfg
    if cfg.video_exec_step != 1:
        raise ValueError(f"{folder}: video_exec_step {cfg.video_exec_step}; distillation needs 1 (the chunk's "
                         f"PREDICTED video is then the video noise, drawn here as the policy draws it)")
    if cfg.use_cfg and cfg.action_guidance_scale > 1:
        raise ValueError(f"{folder}: action_guidance_scale {cfg.action_guidance_scale}; distillation needs 1 "
                         f"(no CFG on the action stream)")
    return folder, policy.model.float().eval().requires_grad_(False), cfg


def load_latents(run_dir: str | Path, teacher_dir: Path, cfg: PolicyConfig) -> EpisodeTensors:
    """`RUN_DIR/latents.pt` as `train fit` wrote it, normalized with the teacher VAE's latent statistics when it
    holds the identity VAE's raw latents (`identity_vae`), checked against the teacher's shapes."""
    path = Path(run_dir) / "latents.pt"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no encoded latents (a `lingbot-edge train fit` run folder holds them)")
    data, raw, _ = read_latents(path)
    if raw:
        vae = json.loads((teacher_dir / "vae" / "config.json").read_text())
        mean, std = torch.tensor(vae["latents_mean"]), torch.tensor(vae["latents_std"])
        data = EpisodeTensors((data.video - mean.view(1, 1, -1, 1, 1, 1)) / std.view(1, 1, -1, 1, 1, 1), data.action,
                              data.text)
    mc = cfg.model_config
    video = (mc.in_channels, cfg.frame_chunk_size, *cfg.latent_hw)
    action = (mc.action_dim, cfg.frame_chunk_size, cfg.action_per_frame, 1)
    if tuple(data.video.shape[2:]) != video or tuple(data.action.shape[2:]) != action:
        raise ValueError(f"{path}: video {tuple(data.video.shape)} / action {tuple(data.action.shape)} per episode "
                         f"and chunk do not match the teacher's [E, K, {', '.join(map(str, video))}] / "
                         f"[E, K, {', '.join(map(str, action))}]")
    return data


def file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def teacher_digest(folder: Path) -> str:
    """The teacher's DiT weights and settings, hashed: a run's saved targets and state belong to one teacher."""
    files = sorted((folder / "transformer").glob("*.safetensors")) + [folder / "policy_config.json"]
    return hashlib.sha256("".join(file_digest(p) for p in files if p.is_file()).encode()).hexdigest()[:16]


def action_schedule(cfg: PolicyConfig, steps: int) -> tuple[Tensor, Tensor, Tensor]:
    """(timesteps [N], Euler factors [N], sigmas [N + 1] ending at 0) of the action pass in `steps` steps: the
    sampler's loop without its last, cache-write-only forward (its output is unused)."""
    sched = FlowMatchSchedule(steps, cfg.action_snr_shift)
    return sched.timesteps()[:steps], sched.sigma_deltas()[:steps], torch.cat([sched.sigmas(), torch.zeros(1)])


class ActionFlow:
    """The action pass of every chunk of a batch of episodes, through the teacher-forced forward: the inputs
    that stay fixed over the steps (history, PREDICTED video, prompt) and one forward of both action copies."""

    def __init__(self, cfg: PolicyConfig, chunks: int, grounded: bool):
        self.cfg = cfg
        self.layout: EpisodeLayout = episode_layout(cfg, chunks, grounded=grounded)
        self.grounded = grounded
        mask = torch.zeros(cfg.model_config.action_dim)
        mask[list(cfg.used_action_channel_ids)] = 1
        self.channel_mask = mask.view(1, 1, -1, 1, 1, 1)
        # The sampler's one video forward: its input (noise, the first chunk's frame 0 pinned to the observation)
        # at the first video timestep, written PREDICTED (video_exec_step 1).
        self.video_t = float(FlowMatchSchedule(cfg.num_inference_steps, cfg.snr_shift).timesteps()[0])

    def inputs(self, video: Tensor, history: Tensor, noise_video: Tensor, text: Tensor, model) -> dict:
        b, k, _, f = video.shape[:4]
        xv = noise_video.clone()
        xv[:, 0, :, 0] = video[:, 0, :, 0]
        tv = torch.full((b, k, f), self.video_t)
        tv[:, 0, 0] = 0
        return {"video": video, "history": history * self.channel_mask, "xv": xv, "tv": tv,
                "text_kv": model.text_kv(text)}

    def pin(self, x: Tensor) -> Tensor:
        """The synchronous copy as the sampler holds it: unused channels zero, the first chunk's frame 0 zero."""
        x = x * self.channel_mask
        x[:, 0, :, 0] = 0
        return x

    def timesteps(self, t: Tensor, shape: tuple[int, ...]) -> tuple[Tensor, Tensor]:
        """Per-row action timesteps t [B] -> ([B, K, F] of the synchronous copy (first frame pinned at 0), of the
        lookahead copy)."""
        b, k, f = shape
        tg = t.view(b, 1, 1).expand(b, k, f).clone()
        ta = tg.clone()
        ta[:, 0, 0] = 0
        return ta, tg

    def forward(self, model, inp: dict, xa: Tensor, xg: Tensor | None, t: Tensor) -> tuple[Tensor, ...]:
        """(video velocity, synchronous action velocity[, lookahead action velocity]) with the action copies at
        xa / xg and timestep t [B] (per row)."""
        b, k, _, f = inp["video"].shape[:4]
        ta, tg = self.timesteps(t, (b, k, f))
        xa = self.pin(xa)
        if self.grounded:
            xg = xg * self.channel_mask
        segments = SegmentInputs(video_predicted=inp["xv"], t_predicted=inp["tv"])
        if self.grounded:
            segments.action_noisy_async, segments.t_action_async = xg, tg
        return teacher_forced_forward(model, self.layout, inp["video"], inp["history"], inp["xv"], xa, inp["tv"],
                                      ta, inp["text_kv"], segments)

    def sample(self, model, inp: dict, start: Tensor, steps: int) -> tuple[list[Tensor], list[Tensor], Tensor]:
        """The sampler's action pass in `steps` Euler steps from `start` (differentiable when grads are on):
        (synchronous states [steps + 1], lookahead states [steps + 1], the first forward's video velocity)."""
        ts, ds, _ = action_schedule(self.cfg, steps)
        b = start.shape[0]
        xa, xg = self.pin(start), start * self.channel_mask
        states, states_g, video_v = [xa], [xg], None
        for i in range(steps):
            out = self.forward(model, inp, xa, xg, ts[i].expand(b))
            video_v = out[0] if video_v is None else video_v
            xa = self.pin(xa + out[1].float() * ds[i])
            states.append(xa)
            if self.grounded:
                xg = (xg + out[2].float() * ds[i]) * self.channel_mask
            states_g.append(xg)
        return states, states_g, video_v


@dataclass
class TeacherTargets:
    """The teacher's action pass on every sample (episode e, draw j = sample index e * draws + j)."""

    trajectory: Tensor  # [S, T + 1, K, A, F, apf, 1] the synchronous copy's states at the teacher's sigmas
    trajectory_async: Tensor  # [S, T + 1, K, A, F, apf, 1] the lookahead copy's (chunk 0 unused)
    video_velocity: Tensor  # [S, K, C, F, h, w] the teacher's video velocity at the sampler's video input
    key: dict  # what they were computed from (teacher digest, data, draws, noise, seed)


def sample_inputs(data: EpisodeTensors, samples: Tensor, dc: DistillConfig) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(video, history actions, video noise, text) of samples (episode e = s // draws, draw j = s % draws): the
    draw's noise from its own generator (seed, s), so a sample is the same in the targets and in training; draw j's
    history noise std is history_action_noise * j / (draws - 1) (draw 0: the clean history)."""
    episodes = samples // dc.draws
    videos, histories = [], []
    for s in samples.tolist():
        g = torch.Generator().manual_seed(dc.seed * 1_000_003 + s)
        videos.append(torch.randn(data.video.shape[1:], generator=g))
        j = s % dc.draws
        std = dc.history_action_noise * j / max(1, dc.draws - 1)
        histories.append(data.action[s // dc.draws] + std * torch.randn(data.action.shape[1:], generator=g))
    return data.video[episodes], torch.stack(histories), torch.stack(videos), data.text[episodes]


@torch.no_grad()
def teacher_targets(teacher, cfg: PolicyConfig, data: EpisodeTensors, dc: DistillConfig, key: dict,
                    batch: int = 8, progress: bool = True) -> TeacherTargets:
    """The teacher's own action pass (its `action_num_inference_steps` Euler steps from the policy's start, zero
    under `action_noise_scale` 0) on every sample, both copies, keeping every intermediate state."""
    from tqdm import tqdm

    flow = ActionFlow(cfg, data.video.shape[1], grounded=True)
    n = len(data) * dc.draws
    steps = cfg.action_num_inference_steps
    trajectory, trajectory_async, video_velocity = [], [], []
    with tqdm(total=n, desc="teacher", unit="sample", disable=not progress) as bar:
        for lo in range(0, n, batch):
            samples = torch.arange(lo, min(n, lo + batch))
            video, history, noise, text = sample_inputs(data, samples, dc)
            inp = flow.inputs(video, history, noise, text, teacher)
            start = start_actions(cfg, samples, data, dc)
            states, states_g, video_v = flow.sample(teacher, inp, start, steps)
            trajectory.append(torch.stack(states, 1))
            trajectory_async.append(torch.stack(states_g, 1))
            video_velocity.append(video_v.float())
            bar.update(len(samples))
    return TeacherTargets(torch.cat(trajectory), torch.cat(trajectory_async), torch.cat(video_velocity), key)


def start_actions(cfg: PolicyConfig, samples: Tensor, data: EpisodeTensors, dc: DistillConfig) -> Tensor:
    """The action flow's start of each sample: the policy's N(0, 1) noise times `action_noise_scale` (zeros for the
    embedded checkpoint, whose action pass is then one deterministic function of the context)."""
    shape = (len(samples), *data.action.shape[1:])
    if cfg.action_noise_scale == 0:
        return torch.zeros(shape)
    noise = [torch.randn(shape[1:], generator=torch.Generator().manual_seed(dc.seed * 1_000_003 + s + 7_919_000))
             for s in samples.tolist()]
    return torch.stack(noise) * cfg.action_noise_scale


class DistillLoss:
    """The student's loss on a batch of samples, per `DistillConfig.method` (train/distill_config.py)."""

    def __init__(self, cfg: PolicyConfig, chunks: int, dc: DistillConfig, teacher_steps: int):
        if dc.method not in METHODS:
            raise ValueError(f"method: expected one of {list(METHODS)}, got {dc.method!r}")
        if dc.action_steps < 1:
            raise ValueError(f"action_steps: expected >= 1, got {dc.action_steps}")
        if dc.method == "trajectory" and teacher_steps % dc.action_steps:
            raise ValueError(f"action_steps {dc.action_steps}: the trajectory method needs a divisor of the "
                             f"teacher's {teacher_steps} action steps (its sigmas must hold the student's)")
        self.cfg, self.dc, self.teacher_steps = cfg, dc, teacher_steps
        self.flow = ActionFlow(cfg, chunks, grounded=dc.grounded_weight > 0)
        frame = torch.ones(chunks, cfg.frame_chunk_size)
        frame[0, 0] = 0  # the first chunk's pinned frame carries no loss
        self.weight_sync = frame.view(1, chunks, 1, -1, 1, 1) * self.flow.channel_mask
        later = (torch.arange(chunks) > 0).float()  # chunk 0 is never inferred ahead
        self.weight_async = later.view(1, chunks, 1, 1, 1, 1) * self.flow.channel_mask
        self.teacher_t, _, self.teacher_sigmas = action_schedule(cfg, teacher_steps)

    @staticmethod
    def _mse(x: Tensor, target: Tensor, weight: Tensor) -> Tensor:
        w = weight.expand_as(x)
        return ((x - target).pow(2) * w).sum() / w.sum()

    def __call__(self, model, inp: dict, targets: dict, start: Tensor,
                 generator: torch.Generator) -> tuple[Tensor, dict[str, float]]:
        """inp: `ActionFlow.inputs` of the batch; targets: its rows of `TeacherTargets` ("trajectory",
        "trajectory_async", "video_velocity")."""
        dc, flow, n = self.dc, self.flow, self.dc.action_steps
        traj, traj_g = targets["trajectory"], targets["trajectory_async"]
        b = traj.shape[0]
        if dc.method == "endpoint":
            states, states_g, video_v = flow.sample(model, inp, start, n)
            xa, xg, target, target_g = states[-1], states_g[-1], traj[:, -1], traj_g[:, -1]
        else:
            if dc.method == "trajectory":  # student step i: teacher state i*r -> (i+1)*r
                r = self.teacher_steps // n
                first = torch.arange(n).repeat_interleave(b) * r
                last = first + r
            else:  # consistency: from any of the teacher's states, straight to its endpoint
                first = torch.randint(self.teacher_steps, (n * b,), generator=generator)
                last = torch.full_like(first, self.teacher_steps)
            rows = torch.arange(n * b) % b
            x_in, xg_in = traj[rows, first], traj_g[rows, first]
            big = {"video": inp["video"].repeat(n, *[1] * (inp["video"].dim() - 1)),
                   "history": inp["history"].repeat(n, *[1] * (inp["history"].dim() - 1)),
                   "xv": inp["xv"].repeat(n, *[1] * (inp["xv"].dim() - 1)),
                   "tv": inp["tv"].repeat(n, 1, 1),
                   "text_kv": [(k.repeat(n, 1, 1, 1), v.repeat(n, 1, 1, 1)) for k, v in inp["text_kv"]]}
            out = flow.forward(model, big, x_in, xg_in, self.teacher_t[first])
            step = (self.teacher_sigmas[last] - self.teacher_sigmas[first]).view(-1, 1, 1, 1, 1, 1)
            video_v = out[0][:b]  # the video copy does not depend on the actions
            xa = flow.pin(x_in + out[1].float() * step)
            xg = (xg_in + out[2].float() * step) * flow.channel_mask if flow.grounded else None
            target, target_g = traj[rows, last], traj_g[rows, last]
        loss_a = self._mse(xa, target, self.weight_sync)
        parts = {"action": loss_a.item()}
        loss = loss_a
        if flow.grounded:
            loss_g = self._mse(xg, target_g, self.weight_async)
            parts["action_grounded"] = loss_g.item()
            loss = loss + dc.grounded_weight * loss_g
        loss_v = (video_v.float() - targets["video_velocity"]).pow(2).mean()
        parts["video"] = loss_v.item()
        return loss + dc.video_weight * loss_v, parts


@torch.no_grad()
def endpoint_error(model, cfg: PolicyConfig, data: EpisodeTensors, targets: TeacherTargets, dc: DistillConfig,
                   steps: int, samples: Tensor) -> dict[str, float]:
    """RMS (normalized units, used channels, the chunks' sampled frames) between `model`'s action pass in `steps`
    steps and the teacher's endpoint, per copy, on `samples`."""
    loss = DistillLoss(cfg, data.video.shape[1], DistillConfig(**{**asdict(dc), "action_steps": steps,
                                                                  "method": "endpoint"}),
                       targets.trajectory.shape[1] - 1)
    sums = {"sync": 0.0, "grounded": 0.0}
    for lo in range(0, len(samples), 8):
        batch = samples[lo:lo + 8]
        video, history, noise, text = sample_inputs(data, batch, dc)
        inp = loss.flow.inputs(video, history, noise, text, model)
        states, states_g, _ = loss.flow.sample(model, inp, start_actions(cfg, batch, data, dc), steps)
        sync = DistillLoss._mse(states[-1], targets.trajectory[batch, -1], loss.weight_sync)
        sums["sync"] += sync.item() * len(batch)
        sums["grounded"] += DistillLoss._mse(states_g[-1], targets.trajectory_async[batch, -1],
                                             loss.weight_async).item() * len(batch)
    return {k: (v / len(samples)) ** 0.5 for k, v in sums.items()}


def load_or_make_targets(out: Path, teacher, cfg, data, dc, key: dict, progress: bool) -> TeacherTargets:
    path = out / TARGETS_NAME
    if path.is_file():
        saved = torch.load(path)
        if saved["key"] == key:
            log.info("teacher targets from %s", path)
            return TeacherTargets(**saved)
        raise ValueError(f"{path}: made from another teacher, dataset or draw setting ({saved['key']} vs {key}); use "
                         f"another --out or delete it")
    targets = teacher_targets(teacher, cfg, data, dc, key, progress=progress)
    atomic_torch_save(asdict(targets), path)
    return targets


def write_student(folder: Path, teacher_dir: Path, student, action_steps: int) -> Path:
    """The student as a checkpoint folder in the teacher's layout (atomically): the teacher's frozen parts copied,
    the student's transformer/, the teacher's policy_config.json with `action_num_inference_steps` = N."""
    config = json.loads((teacher_dir / "policy_config.json").read_text())
    config["action_num_inference_steps"] = action_steps
    check_output_folder(folder, ours=lambda p: (p / "policy_config.json").is_file() and (p / "transformer").is_dir(),
                        what="a checkpoint folder", replace=True, inputs=[teacher_dir])

    def fill(tmp: Path) -> None:
        for part in FROZEN_PARTS:
            if (teacher_dir / part).is_dir():
                shutil.copytree(teacher_dir / part, tmp / part)
        save_transformer(student, tmp / "transformer")
        write_text(tmp / "policy_config.json", json.dumps(config, indent=2))

    return write_folder(folder, fill)


def distill(teacher: str | Path, data_dir: str | Path, out: str | Path, dc: DistillConfig | None = None,
            threads: int | None = None, progress: bool = True) -> dict:
    """The whole run: targets, training (resuming from `out/train_state.pt`), the student's checkpoint, the report."""
    dc = dc or DistillConfig()
    out = open_run(out, threads)
    timings: dict[str, float] = {}
    teacher_dir, teacher_model, cfg = load_teacher(teacher)
    data = load_latents(data_dir, teacher_dir, cfg)
    digest = teacher_digest(teacher_dir)
    key = {"teacher": digest, "latents": file_digest(Path(data_dir) / "latents.pt"), "draws": dc.draws,
           "history_action_noise": dc.history_action_noise, "seed": dc.seed}
    t = time.perf_counter()
    targets = load_or_make_targets(out, teacher_model, cfg, data, dc, key, progress)
    timings["targets_s"] = time.perf_counter() - t
    teacher_steps = cfg.action_num_inference_steps
    objective = DistillLoss(cfg, data.video.shape[1], dc, teacher_steps)
    probe = torch.arange(0, len(data) * dc.draws, max(1, len(data) * dc.draws // 32))[:32]  # spread over episodes

    student = copy.deepcopy(teacher_model).train().requires_grad_(True)
    opt = adamw(list(student.parameters()), dc.lr, dc.weight_decay)
    gen = torch.Generator().manual_seed(dc.seed)
    identity = {"distill_config": asdict(dc), "key": key}
    n_samples = len(data) * dc.draws

    def batch_loss(step: int) -> tuple[Tensor, dict[str, float]]:
        samples = torch.randint(n_samples, (dc.batch_size,), generator=gen)
        video, history, noise, text = sample_inputs(data, samples, dc)
        inp = objective.flow.inputs(video, history, noise, text, student)
        rows = {"trajectory": targets.trajectory[samples], "trajectory_async": targets.trajectory_async[samples],
                "video_velocity": targets.video_velocity[samples]}
        return objective(student, inp, rows, start_actions(cfg, samples, data, dc), gen)

    t = time.perf_counter()
    losses = run_steps(student, opt, gen, batch_loss, dc, out, identity, f"distill {dc.method} -> {dc.action_steps}",
                       progress)
    timings["train_s"] = time.perf_counter() - t
    student.eval().requires_grad_(False)

    errors = {f"teacher_{n}_steps": endpoint_error(teacher_model, cfg, data, targets, dc, n, probe)
              for n in sorted({dc.action_steps, 1, 2, 5} & set(range(1, teacher_steps + 1)), reverse=True)}
    errors[f"student_{dc.action_steps}_steps"] = endpoint_error(student, cfg, data, targets, dc, dc.action_steps,
                                                                probe)
    ckpt = write_student(out / CHECKPOINT_NAME, teacher_dir, student, dc.action_steps)

    report = {"teacher": str(teacher_dir), "teacher_digest": digest, "data": str(data_dir), "episodes": len(data),
              "chunks": int(data.video.shape[1]), "teacher_action_steps": teacher_steps,
              "distill_config": asdict(dc), "threads": torch.get_num_threads(), "timings": timings,
              **loss_summary(losses, ("action", "video")),
              "endpoint_rms": errors, "checkpoint": str(ckpt)}
    write_text(out / REPORT_NAME, json.dumps(report, indent=2))
    log.info("student written to %s; endpoint RMS %s", ckpt, errors)
    return report
