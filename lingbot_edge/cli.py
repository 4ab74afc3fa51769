"""`lingbot-edge` command line.

    lingbot-edge demo [--chunks N] [--compile auto|on|off] [--sampler static|reference] [--device D]
    lingbot-edge encode-prompt --checkpoint DIR --prompt TEXT [--prompt TEXT ...]
    lingbot-edge quantize --checkpoint DIR (--scheme NAME | --plan plan.json) --out DIR [--dry-run]
    lingbot-edge calibrate {capture,sensitivity,plan} --out DIR [...]
    lingbot-edge serve --preset so100 --model tiny|full [--checkpoint DIR] --host 127.0.0.1 --port N
    lingbot-edge run-so100 --robot sim|mujoco|lerobot|remote [...]
    lingbot-edge eval-libero --suite libero_10 --episodes N --checkpoint DIR [--quantized NAME=DIR ...]
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Iterator
from importlib import import_module

import numpy as np
import torch

log = logging.getLogger("lingbot_edge")

# Subcommands living next to the code they drive; each module has `register(subparsers)` and
# keeps its heavy imports inside the command function, so `lingbot-edge --help` stays fast.
_COMMAND_MODULES: tuple[str, ...] = ("cli_frozen", "cli_quantize", "cli_calibrate", "cli_robot", "cli_libero")


class ToyScene:
    """A camera-only stand-in world for the tiny demo: a disk per camera that the first two
    action channels push around. It only has to produce plausible frames for the loop."""

    def __init__(self, cameras: tuple[str, ...], size: int = 96, seed: int = 0):
        self.cameras = cameras
        self.size = size
        rng = np.random.default_rng(seed)
        self.pos = rng.uniform(0.3, 0.7, size=2)
        self.colors = rng.integers(64, 255, size=(len(cameras), 3))

    def step(self, action: np.ndarray) -> None:
        self.pos = np.clip(self.pos + 0.01 * np.tanh(action[:2]), 0.05, 0.95)

    def render(self) -> dict[str, np.ndarray]:
        yy, xx = np.mgrid[0 : self.size, 0 : self.size] / self.size
        out = {}
        for i, cam in enumerate(self.cameras):
            # Each camera sees the disk from a slightly shifted viewpoint.
            cy, cx = self.pos + 0.05 * i
            disk = ((yy - cy) ** 2 + (xx - cx) ** 2) < 0.02
            img = np.full((self.size, self.size, 3), 30, dtype=np.uint8)
            img[disk] = self.colors[i]
            out[cam] = img
        return out


def toy_episode(policy, chunks: int, prompt: str, seed: int = 0) -> Iterator[dict]:
    """Closed loop on a ToyScene: infer, execute the chunk while recording a keyframe every
    keyframe_stride steps, feed back; yields each infer() output (+ "feedback_timing")."""
    cfg = policy.cfg
    scene = ToyScene(cfg.obs_cam_keys, seed=seed)
    policy.reset(prompt=prompt)
    for chunk in range(chunks):
        out = policy.infer(scene.render() if chunk == 0 else {})
        keyframes: dict[str, list[np.ndarray]] = {k: [] for k in cfg.obs_cam_keys}
        for step, action in enumerate(out["actions"]):
            scene.step(action)
            if (step + 1) % cfg.keyframe_stride == 0:
                for k, img in scene.render().items():
                    keyframes[k].append(img)
        out["feedback_timing"] = policy.feedback({k: np.stack(v) for k, v in keyframes.items()}, out["actions"])
        yield out


def run_demo(args: argparse.Namespace) -> int:
    from .policy import build_tiny_policy

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    # torch.compile pays off on a GPU; on a CPU its ~30 s cold compile outweighs the tiny model.
    compile = args.compile == "on" or (args.compile == "auto" and device.startswith("cuda"))
    policy = build_tiny_policy(sampler=args.sampler, compile=compile, seed=args.seed, device=device)
    log.info("tiny policy on %s (sampler=%s, compile=%s)%s", device, args.sampler, compile,
             "; the first chunk compiles" if compile else "")
    np.set_printoptions(precision=3, suppress=True, linewidth=120)
    for chunk, out in enumerate(toy_episode(policy, args.chunks, args.prompt, seed=args.seed)):
        actions = out["actions"]
        timing = ", ".join(f"{k[:-3]} {v:.0f}" for k, v in out["timing"].items())
        print(f"chunk {chunk}: {actions.shape[0]} actions x {actions.shape[1]} channels  [{timing} ms]")
        print(actions)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lingbot-edge", description=__doc__.split("\n")[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="run the embedded tiny policy on a toy scene and print its actions")
    demo.add_argument("--chunks", type=int, default=4)
    demo.add_argument("--prompt", default="push the disk to the left")
    demo.add_argument("--sampler", choices=("static", "reference"), default="static")
    demo.add_argument("--compile", choices=("auto", "on", "off"), default="auto",
                      help="torch.compile the static sampler (auto: only on CUDA)")
    demo.add_argument("--device", default=None, help="cpu / cuda (default: cuda if available)")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=run_demo)
    for module in _COMMAND_MODULES:
        import_module(f"lingbot_edge.{module}").register(sub)

    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if not args.verbose:  # import-time noise of optional backends (ENVIRONMENT.md: harmless)
        for name in ("bitsandbytes", "torchao", "torch.utils._pytree", "diffusers.models.modeling_utils",
                     "diffusers.quantizers"):
            logging.getLogger(name).setLevel(logging.ERROR)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
