"""Distillation settings: a cheap module (no torch), so the CLI's defaults come from here without importing torch."""

from __future__ import annotations

from dataclasses import dataclass

# How the student learns to reach the teacher's endpoint in `action_steps` Euler steps (train/distill.py):
# - endpoint: the student's own N steps, unrolled from the sampler's start, against the teacher's endpoint
#   (backpropagated through all N steps; the student's intermediate states are its own, as at inference).
# - trajectory: each student step alone, from the teacher's state at the student's sigma, against the teacher's
#   state 10/N teacher steps later (progressive distillation's target, all rounds at once; N must divide 10).
# - consistency: from the teacher's state at any of its sigmas, one Euler step to sigma 0 lands on the teacher's
#   endpoint (consistency distillation with the teacher's own ODE endpoint as the target).
METHODS = ("endpoint", "trajectory", "consistency")


@dataclass(frozen=True)
class DistillConfig:
    """The recipe of `lingbot-edge train distill`; the defaults are the 2-step student measured in
    bench/results/task_success/so100_grasp_steps.md."""

    action_steps: int = 2  # the student's action_num_inference_steps
    method: str = "endpoint"  # one of METHODS; endpoint: the lowest endpoint error at equal steps

    # --- the teacher's targets
    # Samples per episode: each its own video noise (the chunk's PREDICTED video the actions attend to) and its own
    # noise level on the action history, from 0 (the executed actions as at inference) to history_action_noise.
    draws: int = 2
    history_action_noise: float = 0.5  # the largest std (normalized units) of the history noise of a draw

    # --- optimization (AdamW, betas 0.9 / 0.99), from the teacher's weights
    steps: int = 300  # optimizer steps
    batch_size: int = 8  # samples (episode x draw) per step
    lr: float = 5e-4  # peak learning rate: linear warmup to it, then a cosine decay to a tenth of it
    warmup: int = 20  # steps of the linear warmup
    weight_decay: float = 0.0  # AdamW weight decay of the matrices: none, the student stays near the teacher
    grad_clip: float = 1.0  # the gradients' global norm is clipped to this

    # --- the loss (mean squared error in normalized action units, used channels, like the teacher's)
    # Weight of the grounded lookahead's copy (every chunk's actions as `infer(ahead=True)` denoises them) next to
    # the synchronous copy's; 0 distils the synchronous order alone.
    grounded_weight: float = 1.0
    # Weight of the video term: the student's video velocity at the sampler's video input against the teacher's,
    # so the shared blocks keep the video stream where it was (it runs one forward already and is not distilled).
    video_weight: float = 1.0

    # --- run
    seed: int = 0  # the draws' noise and the batch order
    save_every: int = 100  # steps between saved training states (a run resumes from the last one)
