"""Flow-matching training of the dual-stream DiT on recorded episodes (both streams, teacher forced).

Per step, for a batch of whole episodes and independently per chunk and stream: a sigma drawn from
the scheduler's shifted training grid (`FlowMatchSchedule(1000, shift).sigmas()`, video shift
`snr_shift`, action shift `action_snr_shift`), x_t = (1 - sigma) x0 + sigma noise at timestep
1000 sigma, and the velocity target noise - x0 (what the sampler's Euler step integrates). As at
inference: the action channels outside `used_action_channel_ids` are zero in every action input and
carry no loss; at the episode's first chunk, latent frame 0 is pinned to the observation and action
frame 0 to zeros, both at t = 0 and without loss. `teacher.teacher_forced_forward` gives every
token the keys the KV cache would give it.

State (model, optimizer, step, losses, RNG) is written atomically to `train_state.pt` every
`save_every` steps and at the end; `fit` resumes from it. The loss curve goes to `loss.png`.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from torch import Tensor, nn

from lingbot_edge.core.config import PolicyConfig
from lingbot_edge.core.scheduler import NUM_TRAIN_TIMESTEPS, FlowMatchSchedule
from lingbot_edge.io.episodes import LeRobotEpisodes
from lingbot_edge.io.files import write_file
from train.config import TrainConfig
from train.teacher import EpisodeLayout, SegmentInputs, episode_layout, teacher_forced_forward

log = logging.getLogger(__name__)

STATE_NAME = "train_state.pt"
LOSS_PNG = "loss.png"
ENCODE_BATCH = 8  # episodes through the VAE at once (3x faster per frame than one on a CPU)


@dataclass
class EpisodeTensors:
    """Encoded episodes: the model-space inputs of every chunk (see `encode_dataset`)."""

    video: Tensor  # [E, K, C, F, h, w] observed latents (chunk 0's frame 0 = the first observation)
    action: Tensor  # [E, K, A, F, apf, 1] executed actions, normalized, unused channels zero
    text: Tensor  # [E, Lt, text_dim] prompt embeddings

    def __len__(self) -> int:
        return self.video.shape[0]


def read_latents(path: str | Path) -> tuple[EpisodeTensors, bool, str | None]:
    """A run's `latents.pt` as `train.pipeline.fit` writes it: (the encoded episodes, whether they are the identity
    VAE's raw latents, the dataset folder they were encoded from: None in files that predate that key)."""
    saved = torch.load(path)
    raw = saved.pop("identity_vae", False)
    source = saved.pop("dataset", None)
    return EpisodeTensors(**saved), raw, source


def encode_dataset(root: str | Path, policy, max_episodes: int | None = None, progress: bool = True,
                   batch: int = ENCODE_BATCH) -> EpisodeTensors:
    """A LeRobot dataset through the policy's own encoders (`lingbot_edge.io.episodes.LeRobotEpisodes`: streaming VAE,
    prompt encoder, action codec), `batch` episodes at a time (the same latents as one by one),
    episodes cut to the same number of whole chunks."""
    from tqdm import tqdm


    source = LeRobotEpisodes(Path(root), policy, max_episodes=max_episodes)
    ids = source.episode_ids()
    encoded = []
    with tqdm(total=len(ids), desc="encode", unit="episode", disable=not progress) as bar:
        for i in range(0, len(ids), batch):
            encoded += source.load_many(ids[i:i + batch])
            bar.update(len(ids[i:i + batch]))
    videos, actions, texts = [], [], []
    for episode in encoded:
        videos.append(torch.stack([c["observed"][0] for c in episode.chunks]))
        actions.append(torch.stack([c["executed"][0] for c in episode.chunks]))
        texts.append(episode.text[0])
    chunks = min(v.shape[0] for v in videos)
    if any(v.shape[0] != chunks for v in videos):
        log.warning("episodes have different lengths: every one is cut to %d chunks", chunks)
    return EpisodeTensors(torch.stack([v[:chunks] for v in videos]), torch.stack([a[:chunks] for a in actions]),
                          torch.stack(texts))


@dataclass
class FlowNoise:
    """One batch's random draws, made from one generator in one order (`FlowMatchingLoss.draw`). Rows are the
    batch's episodes: a data-parallel rank takes its share's rows and trains on what one process would."""

    video_sigma: Tensor  # [B, K] the noisy video copy's sigma per chunk
    action_sigma: Tensor  # [B, K] the noisy action copy's sigma per chunk
    video: Tensor  # [B, K, C, F, h, w] the noisy video copy's noise
    action: Tensor  # [B, K, A, F, apf, 1] the noisy action copy's noise (every channel; masked in the loss)
    predicted_sigma: Tensor | None  # [B, K] the PREDICTED copy's sigma (noisy_predicted)
    predicted: Tensor | None  # [B, K, C, F, h, w] the PREDICTED copy's noise (noisy_predicted)
    history: Tensor | None  # [B, K, A, F, apf, 1] noise on the action history (history_action_noise)
    grounded_sigma: Tensor | None  # [B, K] the lookahead copy's sigma (grounded_weight)
    grounded_action: Tensor | None  # [B, K, A, F, apf, 1] the lookahead copy's noise (grounded_weight)
    grounded_video: Tensor | None  # [B, K, C, F, h, w] the grounded video's noise (grounded_weight)
    grounded_observed: Tensor | None  # [B, K, 1] observed frames of the grounded video (grounded_weight)
    change: Tensor | None  # [B, K] chunk weights of `action_change` over the whole batch (change_weight)

    def rows(self, index) -> FlowNoise:
        """The draws of the episodes `index` (a slice or indices into the batch)."""
        return FlowNoise(*(None if v is None else v[index] for v in (getattr(self, f.name) for f in fields(self))))


@dataclass(frozen=True)
class LossSettings:
    """What `FlowMatchingLoss` trains on besides the episodes (the loss fields of `TrainConfig`, which says why)."""

    # > 0: the grounded lookahead's copy of every chunk's actions trains too, its loss times this added to the
    # action loss
    grounded_weight: float = 0.0
    noisy_predicted: bool = False  # the PREDICTED video copy noised (else the clean future video)
    predicted_at_sampler_sigma: bool = False  # with noisy_predicted: at the sampler's sigma (else a random one)
    history_action_noise: float = 0.0  # Gaussian noise std (normalized units) on the action history
    change_weight: float = 0.0  # extra action-loss weight on chunks where the expert's motion changes

    @classmethod
    def of(cls, tc: TrainConfig) -> LossSettings:
        return cls(tc.grounded_weight, tc.noisy_predicted, tc.predicted_at_sampler_sigma, tc.history_action_noise,
                   tc.change_weight)


class FlowMatchingLoss:
    """Noising, pinning and masking of one batch, and the two streams' losses."""

    def __init__(self, cfg: PolicyConfig, chunks: int, settings: LossSettings = LossSettings()):
        self.cfg = cfg
        self.settings = settings
        self.grounded_weight = settings.grounded_weight
        self.layout: EpisodeLayout = episode_layout(cfg, chunks, grounded=settings.grounded_weight > 0)
        self.video_sigmas = FlowMatchSchedule(NUM_TRAIN_TIMESTEPS, cfg.snr_shift).sigmas()
        self.action_sigmas = FlowMatchSchedule(NUM_TRAIN_TIMESTEPS, cfg.action_snr_shift).sigmas()
        # The sigma of the sampler's PREDICTED write: the input of its video_exec_step-th forward (0: full steps).
        self.sampler_predicted_sigma = 0.0 if cfg.video_exec_step == -1 else float(
            FlowMatchSchedule(cfg.num_inference_steps, cfg.snr_shift).sigmas()[cfg.video_exec_step - 1])
        mask = torch.zeros(cfg.model_config.action_dim, dtype=torch.bool)
        mask[list(cfg.used_action_channel_ids)] = True
        self.channel_mask = mask

    def draw(self, video_shape: torch.Size, action: Tensor, generator: torch.Generator) -> FlowNoise:
        """Every random draw of a batch of episodes (`video_shape` [B, K, C, F, h, w], `action` the batch's actions),
        in the order the training has always made them, so a run's generator stream is the same whoever draws."""
        b, k, _, f = video_shape[:4]
        g, s = generator, self.settings
        sv = self.video_sigmas[torch.randint(len(self.video_sigmas), (b, k), generator=g)]
        sa = self.action_sigmas[torch.randint(len(self.action_sigmas), (b, k), generator=g)]
        noise_v = torch.randn(video_shape, generator=g)
        noise_a = torch.randn(action.shape, generator=g)
        sp = noise_p = history = sg = noise_g = noise_gv = observed = None
        if s.noisy_predicted:
            sp = self.video_sigmas[torch.randint(len(self.video_sigmas), (b, k), generator=g)]
            noise_p = torch.randn(video_shape, generator=g)
        if s.history_action_noise:
            history = torch.randn(action.shape, generator=g)
        if self.grounded_weight:
            sg = self.action_sigmas[torch.randint(len(self.action_sigmas), (b, k), generator=g)]
            noise_g = torch.randn(action.shape, generator=g)
            noise_gv = torch.randn(video_shape, generator=g)
            observed = torch.randint(f, (b, k, 1), generator=g)
        change = action_change(action * self.channel_mask.view(1, 1, -1, 1, 1, 1)) if s.change_weight else None
        return FlowNoise(sv, sa, noise_v, noise_a, sp, noise_p, history, sg, noise_g, noise_gv, observed, change)

    def __call__(self, model, video: Tensor, action: Tensor, text: Tensor,
                 noise: torch.Generator | FlowNoise) -> tuple[Tensor, dict[str, float]]:
        """The batch's losses; `noise`: a generator to draw from, or the batch's draws (`draw`)."""
        if isinstance(noise, torch.Generator):
            noise = self.draw(video.shape, action, noise)
        s = self.settings
        b, k, _, f = video.shape[:4]
        sv, sa = noise.video_sigma, noise.action_sigma
        cmask = self.channel_mask.view(1, 1, -1, 1, 1, 1).to(action.dtype)
        action = action * cmask
        noise_v = noise.video
        noise_a = noise.action * cmask
        xv = (1 - sv.view(b, k, 1, 1, 1, 1)) * video + sv.view(b, k, 1, 1, 1, 1) * noise_v
        xa = (1 - sa.view(b, k, 1, 1, 1, 1)) * action + sa.view(b, k, 1, 1, 1, 1) * noise_a
        tv = (sv * NUM_TRAIN_TIMESTEPS)[..., None].expand(b, k, f).clone()
        ta = (sa * NUM_TRAIN_TIMESTEPS)[..., None].expand(b, k, f).clone()
        # First chunk: frame 0 pinned (observation / zero actions) at t = 0, no loss on it.
        xv[:, 0, :, 0] = video[:, 0, :, 0]
        xa[:, 0, :, 0] = 0
        tv[:, 0, 0] = 0
        ta[:, 0, 0] = 0
        frame_w = torch.ones(k, f)
        frame_w[0, 0] = 0
        xp = tp = None
        if s.noisy_predicted:  # as the sampler's PREDICTED write under video_exec_step: x at sigma, t = 1000 sigma
            sp = noise.predicted_sigma
            if s.predicted_at_sampler_sigma:  # drawn anyway: the RNG stream stays that of a random-sigma run
                sp = torch.full_like(sp, self.sampler_predicted_sigma)
            xp = (1 - sp.view(b, k, 1, 1, 1, 1)) * video + sp.view(b, k, 1, 1, 1, 1) * noise.predicted
            tp = (sp * NUM_TRAIN_TIMESTEPS)[..., None].expand(b, k, f).clone()
            xp[:, 0, :, 0] = video[:, 0, :, 0]  # the first chunk's pinned frame stays the observation
            tp[:, 0, 0] = 0
        history = action
        if s.history_action_noise:
            history = action + s.history_action_noise * noise.history * cmask
        xg = tg = xgv = tgv = None
        if self.grounded_weight:  # the lookahead's copy: its own sigma and noise
            sg = noise.grounded_sigma
            noise_g = noise.grounded_action * cmask
            xg = (1 - sg.view(b, k, 1, 1, 1, 1)) * action + sg.view(b, k, 1, 1, 1, 1) * noise_g
            tg = (sg * NUM_TRAIN_TIMESTEPS)[..., None].expand(b, k, f).clone()
            xgv, tgv = self._grounded_video(video, noise.grounded_video, noise.grounded_observed)
        text_kv = model.text_kv(text)
        pv, pa, *pg = teacher_forced_forward(model, self.layout, video, history, xv, xa, tv, ta, text_kv,
                                             SegmentInputs(xp, tp, xg, tg, xgv, tgv))
        wv = frame_w.view(1, k, 1, f, 1, 1)
        wa = frame_w.view(1, k, 1, f, 1, 1) * cmask
        if s.change_weight:
            wa = wa * (1 + s.change_weight * noise.change).view(b, k, 1, 1, 1, 1)
        err_v = (pv.float() - (noise_v - video)).pow(2)
        err_a = (pa.float() - (noise_a - action)).pow(2)
        loss_v = (err_v * wv).sum() / (wv.expand_as(err_v)).sum()
        loss_a = (err_a * wa).sum() / (wa.expand_as(err_a)).sum()
        parts = {"video": loss_v.item(), "action": loss_a.item()}
        if pg:  # chunk 0 is never inferred ahead: no loss on its lookahead copy
            wg = (wa * (torch.arange(k) > 0).view(1, k, 1, 1, 1, 1)).expand_as(err_a)
            loss_g = ((pg[0].float() - (noise_g - action)).pow(2) * wg).sum() / wg.sum()
            parts["action_grounded"] = loss_g.item()
            loss_a = loss_a + self.grounded_weight * loss_g
        return loss_v, {**parts, "_action": loss_a}

    def grounded_video(self, video: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """The executing chunk's grounded video as the lookahead writes it: its first j latent frames observed
        (clean, t = 0), the others at the sampler's PREDICTED write (x at `sampler_predicted_sigma`), j drawn
        uniformly from 0 .. F-1 per episode and chunk: j = 0 is the request at the chunk's start, j > 0 one made
        after j of its frames were observed (`core.policy.LingBotPolicy.infer`). Returns (x [B, K, C, F, h, w],
        t [B, K, F])."""
        b, k, _, f = video.shape[:4]
        noise = torch.randn(video.shape, generator=generator)
        return self._grounded_video(video, noise, torch.randint(f, (b, k, 1), generator=generator))

    def _grounded_video(self, video: Tensor, noise: Tensor, observed_frames: Tensor) -> tuple[Tensor, Tensor]:
        b, k, _, f = video.shape[:4]
        sigma = self.sampler_predicted_sigma
        x = (1 - sigma) * video + sigma * noise
        observed = torch.arange(f).view(1, 1, f) < observed_frames  # [B, K, F]
        x = torch.where(observed.view(b, k, 1, f, 1, 1), video, x)
        t = torch.where(observed, 0.0, sigma * NUM_TRAIN_TIMESTEPS)
        return x, t


def action_change(action: Tensor) -> Tensor:
    """[B, K] per chunk: summed |a_t - 2 a_(t-1) + a_(t-2)| of the episode's action sequence over the chunk's
    steps, over its mean (1 = an average chunk; 0 = constant velocity all through)."""
    b, k = action.shape[:2]
    seq = action.flatten(3).permute(0, 2, 1, 3).reshape(b, action.shape[2], -1)  # [B, A, K*F*apf]
    d2 = torch.zeros_like(seq)
    d2[..., 2:] = (seq[..., 2:] - 2 * seq[..., 1:-1] + seq[..., :-2]).abs()
    per_chunk = d2.sum(1).view(b, k, -1).sum(-1)
    return per_chunk / per_chunk.mean().clamp(min=1e-8)


def lr_at(step: int, tc: TrainConfig) -> float:
    """The learning rate of `step`: linear warmup to `tc.lr`, then a cosine decay to a tenth of it (`tc`: any
    config with lr, warmup and steps; the distillation's too)."""
    if step < tc.warmup:
        return tc.lr * (step + 1) / tc.warmup
    progress = (step - tc.warmup) / max(1, tc.steps - tc.warmup)
    return tc.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def adamw(params: list[Tensor], lr: float, weight_decay: float) -> torch.optim.AdamW:
    """The trainers' optimizer: AdamW (betas 0.9 / 0.99) with weight decay on the matrices only (biases and
    norms: none)."""
    return torch.optim.AdamW([{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
                              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}],
                             lr=lr, betas=(0.9, 0.99))


def optimizer_step(opt: torch.optim.Optimizer, params: list[Tensor], loss: Tensor, lr: float,
                   grad_clip: float) -> float:
    """One update at learning rate `lr`: backward, the gradients' global norm clipped to `grad_clip`, the step.
    Returns the norm before clipping."""
    for group in opt.param_groups:
        group["lr"] = lr
    opt.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = float(torch.nn.utils.clip_grad_norm_(params, grad_clip))
    opt.step()
    return grad_norm


def open_run(out: str | Path, threads: int | None) -> Path:
    """A run's output folder (created) after setting the torch CPU threads (`threads` None: torch's default)."""
    if threads:
        torch.set_num_threads(threads)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    return out


def read_run_state(path: Path, identity: dict) -> dict | None:
    """The training state saved at `path`, None when there is none. `identity`: the settings that make a run what
    it is, saved with its state; a state saved under other ones is refused, so a run never resumes another's."""
    if not path.is_file():
        return None
    state = torch.load(path, weights_only=False)
    saved = {k: state.get(k) for k in identity}
    if saved != identity:
        raise ValueError(f"{path}: saved by a different run ({saved}); use another --out or delete it")
    log.info("resumed %s at step %d", path, state["step"])
    return state


def atomic_torch_save(obj, path: Path) -> None:
    write_file(path, lambda tmp: torch.save(obj, tmp))


def plot_losses(losses: list[dict[str, float]], path: Path) -> Path:
    """Video / action / total loss per step (raw and smoothed) as a PNG, written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    steps = [r["step"] for r in losses]
    for key, color in (("video", "tab:blue"), ("action", "tab:orange")):
        y = torch.tensor([r[key] for r in losses])
        ax.plot(steps, y, color=color, alpha=0.25, linewidth=0.8)
        win = max(1, len(y) // 30)
        smooth = torch.nn.functional.avg_pool1d(y[None, None], win, 1, padding=0)[0, 0] if len(y) >= win else y
        ax.plot(steps[win - 1:], smooth, color=color, label=f"{key} (mean of {win})")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("flow-matching MSE")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    try:
        write_file(path, lambda tmp: fig.savefig(tmp, dpi=100), suffix=".png")
    finally:
        plt.close(fig)
    return path


def loss_summary(losses: list[dict[str, float]], keys: tuple[str, ...] = ("video", "action")) -> dict:
    """The report's losses: the mean of the first 20 steps and of the last 50, per part."""

    def mean(rows: list[dict[str, float]], key: str) -> float:
        return sum(r[key] for r in rows) / max(1, len(rows))

    return {"first_loss": {k: mean(losses[:20], k) for k in keys},
            "final_loss": {k: mean(losses[-50:], k) for k in keys}}


def run_steps(model: nn.Module, opt: torch.optim.Optimizer, gen: torch.Generator,
              batch_loss: Callable[[int], tuple[Tensor, dict[str, float]]], schedule, out: Path, identity: dict,
              desc: str = "train", progress: bool = True, parallel=None) -> list[dict[str, float]]:
    """The one step loop of every trainer (`train`, `train.distill.distill`): resume from `out/train_state.pt`
    (refused when saved under another `identity`), then per step `batch_loss(step)` -> (loss, parts to log), the
    optimizer update at `lr_at(step, schedule)`, the progress bar, and the state (model, optimizer, generator,
    losses) with its loss curve saved every `schedule.save_every` steps and at the end. `schedule`: steps, lr,
    warmup, grad_clip, save_every (a TrainConfig or a DistillConfig). `parallel` (`train.distributed.DataParallel`):
    the logged parts are averaged over ranks and rank 0 alone writes; the ranks hold the same weights (DDP)."""
    from tqdm import tqdm

    params = [p for group in opt.param_groups for p in group["params"]]
    losses: list[dict[str, float]] = []
    step = 0
    state_path = out / STATE_NAME
    state = read_run_state(state_path, identity)
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        gen.set_state(state["generator"])
        losses, step = state["losses"], state["step"]
    writer = parallel is None or parallel.is_writer

    def save() -> None:
        if not writer:
            return
        atomic_torch_save({"model": model.state_dict(), "optimizer": opt.state_dict(), "generator": gen.get_state(),
                           "losses": losses, "step": step, **identity}, state_path)
        if losses:
            plot_losses(losses, out / LOSS_PNG)

    bar = tqdm(total=schedule.steps, initial=step, desc=desc, unit="step", disable=not (progress and writer))
    t0 = time.perf_counter()
    while step < schedule.steps:
        loss, parts = batch_loss(step)
        grad_norm = optimizer_step(opt, params, loss, lr_at(step, schedule), schedule.grad_clip)
        step += 1
        if parallel is not None:
            parts = parallel.mean(parts)
        losses.append({"step": step, **parts, "grad_norm": grad_norm})
        bar.update(1)
        bar.set_postfix({k: f"{v:.3g}" for k, v in parts.items() if k in ("video", "action")})
        if step % schedule.save_every == 0 or step == schedule.steps:
            save()
    bar.close()
    log.info("%s: %d steps in %.0f s", desc, schedule.steps, time.perf_counter() - t0)
    return losses


def train(model, cfg: PolicyConfig, data: EpisodeTensors, out: str | Path, tc: TrainConfig,
          progress: bool = True, trainable=None, run: dict | None = None,
          parallel=None) -> list[dict[str, float]]:
    """Train `model` in place for `tc.steps` steps (resuming from `out/train_state.pt` when present);
    returns the per-step losses. `trainable(name)`: which parameters train (default: all; e.g. the adapters of
    `train.lora`); `run`: more settings that identify the run (a resumed state must have the same).
    `parallel` (`train.distributed.DataParallel`, under torchrun): every rank draws the batch's episodes and noise
    from the shared generator and trains on its share of the rows; DDP averages the gradients, so the ranks take
    the step one process takes on the whole batch."""
    out = open_run(out, None)
    model.train()
    for name, param in model.named_parameters():
        param.requires_grad_(trainable is None or trainable(name))
    objective = FlowMatchingLoss(cfg, data.video.shape[1], LossSettings.of(tc))
    step_loss = objective if parallel is None else parallel.wrap(model, objective)
    opt = adamw([p for p in model.parameters() if p.requires_grad], tc.lr, tc.weight_decay)
    gen = torch.Generator().manual_seed(tc.seed)
    identity = {"train_config": asdict(tc), "policy": cfg.name, "chunks": data.video.shape[1], "run": run}

    def batch_loss(step: int) -> tuple[Tensor, dict[str, float]]:
        idx = torch.randint(len(data), (tc.batch_size,), generator=gen)
        noise = objective.draw(torch.Size((len(idx), *data.video.shape[1:])), data.action[idx], gen)
        if parallel is not None:
            share = parallel.local_share(len(idx))
            idx, noise = idx[share], noise.rows(share)
        loss_v, parts = step_loss(model, data.video[idx], data.action[idx], data.text[idx], noise)
        return loss_v + tc.action_weight * parts.pop("_action"), parts

    losses = run_steps(model, opt, gen, batch_loss, tc, out, identity, "train", progress, parallel)
    model.eval().requires_grad_(False)
    return losses
