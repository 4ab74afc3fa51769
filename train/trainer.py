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
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor

from lingbot_edge.core.config import PolicyConfig
from lingbot_edge.core.scheduler import NUM_TRAIN_TIMESTEPS, FlowMatchSchedule
from lingbot_edge.io.files import write_file
from train.config import TrainConfig
from train.teacher import EpisodeLayout, episode_layout, teacher_forced_forward

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
    """A LeRobot dataset through the policy's own encoders (`calib.data.LeRobotEpisodes`: streaming VAE,
    prompt encoder, action codec), `batch` episodes at a time (the same latents as one by one),
    episodes cut to the same number of whole chunks."""
    from tqdm import tqdm

    from calib.data import LeRobotEpisodes

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


class FlowMatchingLoss:
    """Noising, pinning and masking of one batch, and the two streams' losses."""

    def __init__(self, cfg: PolicyConfig, chunks: int, grounded_weight: float = 0.0):
        self.cfg = cfg
        # grounded_weight > 0: the grounded lookahead's copy of every chunk's actions trains too (its loss
        # times grounded_weight is added to the action loss).
        self.grounded_weight = grounded_weight
        self.layout: EpisodeLayout = episode_layout(cfg, chunks, grounded=grounded_weight > 0)
        self.video_sigmas = FlowMatchSchedule(NUM_TRAIN_TIMESTEPS, cfg.snr_shift).sigmas()
        self.action_sigmas = FlowMatchSchedule(NUM_TRAIN_TIMESTEPS, cfg.action_snr_shift).sigmas()
        # The sigma of the sampler's PREDICTED write: the input of its video_exec_step-th forward (0: full steps).
        self.sampler_predicted_sigma = 0.0 if cfg.video_exec_step == -1 else float(
            FlowMatchSchedule(cfg.num_inference_steps, cfg.snr_shift).sigmas()[cfg.video_exec_step - 1])
        mask = torch.zeros(cfg.model_config.action_dim, dtype=torch.bool)
        mask[list(cfg.used_action_channel_ids)] = True
        self.channel_mask = mask

    def __call__(self, model, video: Tensor, action: Tensor, text: Tensor, generator: torch.Generator,
                 noisy_predicted: bool = False, history_action_noise: float = 0.0,
                 change_weight: float = 0.0,
                 predicted_at_sampler_sigma: bool = False) -> tuple[Tensor, dict[str, float]]:
        b, k, _, f = video.shape[:4]
        g = generator
        sv = self.video_sigmas[torch.randint(len(self.video_sigmas), (b, k), generator=g)]
        sa = self.action_sigmas[torch.randint(len(self.action_sigmas), (b, k), generator=g)]
        cmask = self.channel_mask.view(1, 1, -1, 1, 1, 1).to(action.dtype)
        action = action * cmask
        noise_v = torch.randn(video.shape, generator=g)
        noise_a = torch.randn(action.shape, generator=g) * cmask
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
        if noisy_predicted:  # as the sampler's PREDICTED write under video_exec_step: x at sigma, t = 1000 sigma
            sp = self.video_sigmas[torch.randint(len(self.video_sigmas), (b, k), generator=g)]
            if predicted_at_sampler_sigma:  # drawn anyway: the RNG stream stays that of a random-sigma run
                sp = torch.full_like(sp, self.sampler_predicted_sigma)
            xp = (1 - sp.view(b, k, 1, 1, 1, 1)) * video + sp.view(b, k, 1, 1, 1, 1) * torch.randn(video.shape,
                                                                                                  generator=g)
            tp = (sp * NUM_TRAIN_TIMESTEPS)[..., None].expand(b, k, f).clone()
            xp[:, 0, :, 0] = video[:, 0, :, 0]  # the first chunk's pinned frame stays the observation
            tp[:, 0, 0] = 0
        history = action
        if history_action_noise:
            history = action + history_action_noise * torch.randn(action.shape, generator=g) * cmask
        xg = tg = xgv = tgv = None
        if self.grounded_weight:  # the lookahead's copy: its own sigma and noise
            sg = self.action_sigmas[torch.randint(len(self.action_sigmas), (b, k), generator=g)]
            noise_g = torch.randn(action.shape, generator=g) * cmask
            xg = (1 - sg.view(b, k, 1, 1, 1, 1)) * action + sg.view(b, k, 1, 1, 1, 1) * noise_g
            tg = (sg * NUM_TRAIN_TIMESTEPS)[..., None].expand(b, k, f).clone()
            xgv, tgv = self.grounded_video(video, g)
        text_kv = model.text_kv(text)
        pv, pa, *pg = teacher_forced_forward(model, self.layout, video, history, xv, xa, tv, ta, text_kv, xp, tp,
                                             xg, tg, xgv, tgv)
        wv = frame_w.view(1, k, 1, f, 1, 1)
        wa = frame_w.view(1, k, 1, f, 1, 1) * cmask
        if change_weight:
            wa = wa * (1 + change_weight * action_change(action)).view(b, k, 1, 1, 1, 1)
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
        sigma = self.sampler_predicted_sigma
        x = (1 - sigma) * video + sigma * torch.randn(video.shape, generator=generator)
        observed = torch.arange(f).view(1, 1, f) < torch.randint(f, (b, k, 1), generator=generator)  # [B, K, F]
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


def train(model, cfg: PolicyConfig, data: EpisodeTensors, out: str | Path, tc: TrainConfig,
          progress: bool = True, trainable=None, run: dict | None = None,
          parallel=None) -> list[dict[str, float]]:
    """Train `model` in place for `tc.steps` steps (resuming from `out/train_state.pt` when present);
    returns the per-step losses. `trainable(name)`: which parameters train (default: all; e.g. the adapters of
    `train.lora`); `run`: more settings that identify the run (a resumed state must have the same).
    `parallel` (`train.distributed.DataParallel`, under torchrun): the model is sharded (FSDP2), each rank
    trains on its share of every batch with its own noise, rank 0 writes."""
    from tqdm import tqdm

    out = open_run(out, None)
    model.train()
    for name, param in model.named_parameters():
        param.requires_grad_(trainable is None or trainable(name))
    if parallel is not None:
        parallel.shard(model)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = adamw(params, tc.lr, tc.weight_decay)
    gen = torch.Generator().manual_seed(tc.seed)
    losses: list[dict[str, float]] = []
    step = 0
    state_path = out / STATE_NAME
    identity = {"train_config": asdict(tc), "policy": cfg.name, "chunks": data.video.shape[1], "run": run}
    state = read_run_state(state_path, identity)
    if state is not None:
        if parallel is None:
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
        else:
            parallel.load_state(model, opt, state["model"], state["optimizer"])
        gen.set_state(state["generator"])
        losses, step = state["losses"], state["step"]
    objective = FlowMatchingLoss(cfg, data.video.shape[1], tc.grounded_weight)
    step_loss = objective if parallel is None else parallel.objective(objective)

    def save() -> None:
        model_state, opt_state = (model.state_dict(), opt.state_dict()) if parallel is None else \
            parallel.full_state(model, opt)
        if parallel is not None and not parallel.is_writer:
            return
        atomic_torch_save({"model": model_state, "optimizer": opt_state, "generator": gen.get_state(),
                           "losses": losses, "step": step, **identity}, state_path)
        if losses:
            plot_losses(losses, out / LOSS_PNG)

    bar = tqdm(total=tc.steps, initial=step, desc="train", unit="step", disable=not progress)
    t0 = time.perf_counter()
    while step < tc.steps:
        idx = torch.randint(len(data), (tc.batch_size,), generator=gen)
        noise = gen
        if parallel is not None:
            idx, noise = parallel.local_share(idx), parallel.noise_generator(tc.seed, step)
        loss_v, parts = step_loss(model, data.video[idx], data.action[idx], data.text[idx], noise, tc.noisy_predicted,
                                  tc.history_action_noise, tc.change_weight, tc.predicted_at_sampler_sigma)
        loss = loss_v + tc.action_weight * parts.pop("_action")
        grad_norm = optimizer_step(opt, params, loss, lr_at(step, tc), tc.grad_clip)
        step += 1
        if parallel is not None:
            parts = parallel.mean(parts)
        losses.append({"step": step, **parts, "grad_norm": grad_norm})
        bar.update(1)
        bar.set_postfix(video=f"{parts['video']:.3f}", action=f"{parts['action']:.3f}")
        if step % tc.save_every == 0 or step == tc.steps:
            save()
    bar.close()
    log.info("trained %d steps in %.0f s", tc.steps, time.perf_counter() - t0)
    model.eval().requires_grad_(False)
    return losses

