"""Training settings: a cheap module (no torch), so the CLI's defaults come from here without importing the trainer."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TrainConfig:
    """The recipe of `lingbot-edge train fit`; the defaults train the embedded so100-grasp checkpoint
    (bench/results/task_success/so100_grasp.md)."""

    # --- optimization (AdamW, betas 0.9 / 0.99)
    steps: int = 2600  # optimizer steps
    batch_size: int = 8  # episodes per step, drawn at random from the encoded dataset
    lr: float = 2e-3  # peak learning rate: linear warmup to it, then a cosine decay to a tenth of it
    warmup: int = 50  # steps of the linear warmup
    weight_decay: float = 0.01  # AdamW weight decay of the matrices (biases and norms: none)
    grad_clip: float = 1.0  # the gradients' global norm is clipped to this

    # --- the action loss and what the actions learn from
    # The action loss's weight next to the video loss: the video loss is the larger and the gradient is clipped, so
    # at weight 1 the video stream takes most of each step (the figures: bench/results/train_recipes.md).
    action_weight: float = 4.0
    # Noise on the chunk's PREDICTED video (what its actions attend to), sigma from the video training grid.
    # Without it the actions learn to read the ground-truth future frames, which the sampler never has.
    noisy_predicted: bool = True
    # With noisy_predicted: the PREDICTED copy at the sigma the policy's sampler writes it at (the input of its
    # `video_exec_step`-th video forward: sigma 1, pure noise, at video_exec_step 1; the clean video at full steps)
    # instead of a random one, so the actions train on what they attend to at inference.
    predicted_at_sampler_sigma: bool = True
    # Gaussian noise (normalized units) on the executed actions written as HISTORY: the expert's past actions
    # predict its next ones so well that a policy can copy them and never look at the cube.
    history_action_noise: float = 0.5
    # Extra weight on the chunks where the expert changes what it does (starts, stops, phase changes), where a
    # copy of the past actions is wrong and only the images tell: chunk weight 1 + change_weight * (the chunk's
    # summed |second difference| of the actions) / (its mean over the batch). 0 = every chunk alike.
    change_weight: float = 0.0
    # Weight of the grounded lookahead's action loss (the chunk's actions denoised while the chunk before it
    # executes, `train.teacher.GROUNDED_SEGMENTS`) next to the synchronous action loss; 0 trains the synchronous
    # order alone, and `infer(ahead=True)` then acts on an order it never saw.
    grounded_weight: float = 1.0

    # --- run
    seed: int = 0  # the DiT's initial weights and the batch and noise draws
    save_every: int = 100  # steps between saved training states (a run resumes from the last one)
