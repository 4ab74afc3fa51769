"""LIBERO demonstrations from the scripted expert, in the layout of LeRobot's LIBERO datasets.

    observation.images.image    agentview camera, LeRobot's orientation (the raw render rotated 180 degrees)
    observation.images.image2   eye-in-hand camera, same orientation
    observation.state           end-effector position (3), axis-angle (3), gripper finger joints (2)
    action                      OSC_POSE deltas (3 position, 3 rotation) and the gripper (-1 open, +1 closed)

Episodes start from random placements drawn by each task's own placement rules (`LiberoEnv.reset_random`), never
from the benchmark's 50 initial states, which stay for evaluation. Each episode records a fixed number of frames
(whole chunks of the policy); the expert keeps acting after the object is in the basket (it hovers, open).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

from lingbot_edge.eval.libero import LIBERO_CAMERAS, LiberoEnv
from lingbot_edge.eval.libero_expert import PickPlaceExpert
from train.dataset import IMAGE_PREFIX, dataset_features, write_dataset

LIBERO_FPS = 20  # LIBERO's control rate
LIBERO_ACTION_NAMES = ("x", "y", "z", "roll", "pitch", "yaw", "gripper")
LIBERO_STATE_NAMES = ("eef_x", "eef_y", "eef_z", "eef_ax", "eef_ay", "eef_az", "gripper_left", "gripper_right")
# Recorded frames per episode: 8 chunks of the libero-tiny policy (12 + 7 x 16 = 124 actions) and the last
# observation. The expert has the object in the basket by step 118 on libero_object tasks 3 and 5
# (bench/results/task_success/libero.md).
LIBERO_EPISODE_FRAMES = 125


@dataclass(frozen=True)
class LiberoTasks:
    """Which LIBERO tasks a run records and trains on."""

    suite: str = "libero_object"  # the LIBERO suite
    task_ids: tuple[int, ...] = (3, 5)  # task ids of the suite (one policy for all, conditioned on the prompt)
    render_size: int = 128  # square camera size (the libero preset's input)
    antialias: bool = False  # LIBERO's 4x multisampling (off: about half the CPU render time); eval the same way


def record_libero_episode(env: LiberoEnv, seed: int, frames: int) -> dict:
    """One expert episode from the random placement `seed`: {"task", "seed", "success", "action": [frames, 7],
    "state": [frames, 8], "frames": {camera: [frames, H, W, 3]}} (frame i: the observation before action i)."""
    obs = env.reset_random(seed)
    expert = PickPlaceExpert.for_task(env.problem)
    states, actions, images = [], [], {c: [] for c in LIBERO_CAMERAS}
    success = False
    for _ in range(frames):
        for c in LIBERO_CAMERAS:
            images[c].append(obs[c])
        states.append(env.state())
        action = np.clip(expert.act(env.last_raw), env.action_low, env.action_high)
        actions.append(action)
        obs, done = env.step(action)
        success = success or done
    return {"task": env.prompt, "seed": seed, "success": success, "action": np.asarray(actions, np.float32),
            "state": np.asarray(states, np.float32), "frames": {c.removeprefix(IMAGE_PREFIX): np.stack(v)
                                                                for c, v in images.items()}}


def record_libero_dataset(root, tasks: LiberoTasks, episodes_per_task: int, frames: int = LIBERO_EPISODE_FRAMES,
                          first_seed: int = 0, progress: bool = True):
    """`episodes_per_task` expert episodes of every task (seeds first_seed, first_seed + 1, ...), interleaved by
    task, into a new LeRobot v2.1 dataset at `root`."""
    envs = {t: LiberoEnv(tasks.suite, t, render_size=tasks.render_size, antialias=tasks.antialias)
            for t in tasks.task_ids}
    order = [(t, first_seed + i) for i in range(episodes_per_task) for t in tasks.task_ids]

    def episodes():
        for task_id, seed in tqdm(order, desc="record", unit="episode", disable=not progress):
            yield record_libero_episode(envs[task_id], seed, frames)

    features = dataset_features(LIBERO_ACTION_NAMES, LIBERO_STATE_NAMES, tasks.render_size, tasks.render_size,
                                [c.removeprefix(IMAGE_PREFIX) for c in LIBERO_CAMERAS], fps=LIBERO_FPS)
    try:
        return write_dataset(root, episodes(), features, robot_type="panda", fps=LIBERO_FPS)
    finally:
        for env in envs.values():
            env.close()

