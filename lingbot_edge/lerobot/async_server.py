"""A policy server for LeRobot 0.4's asynchronous robot client (`lerobot.async_inference.robot_client`).

LeRobot's own policy server serves a fixed list of policy types (`SUPPORTED_POLICIES`: act, smolvla, pi0, ...)
and runs every chunk from one observation alone. LingBot-VA is a world model that must be told what happened
during a chunk (the keyframes after its executed steps) before it predicts the next one. This server speaks
LeRobot's gRPC service (`lerobot.transport.services_pb2_grpc.AsyncInferenceServicer`) and drives the policy
through the episode protocol (`EpisodeRunner`, the `Chunk`s of `lingbot_edge.core.episode`):

- the robot client must send an observation after every executed action, i.e. run with
  `--chunk_size_threshold=1.0`; each `TimedObservation` carries the timestep of the last executed action;
- the first chunk's actions are numbered 1..n, so timestep 0 is the observation before anything moved and
  timestep k the one after action k; a later copy of a timestep (sent while the client waits) is ignored;
- a chunk's actions go out whole, once, clipped to the SO-100's joint limits (the client sends them to the arm
  as they are) and fed back as executed: when the observations after all of them have arrived, they are recorded
  (images at the chunk's keyframes), fed back, and the next chunk follows with the next timesteps. Chunks never
  overlap, so the client's aggregation never mixes two of them. The robot waits at each chunk boundary while the
  next chunk is inferred (the synchronous order of `run-so100 --sync`).

The client pickles what it sends. This server never unpickles with the standard unpickler: `safe_loads` admits
LeRobot's two message classes (`TimedObservation`, `RemotePolicyConfig`), numpy arrays of numeric dtypes and plain
Python values, and refuses every other global. The policy is the server's (its command-line flags); the client's
`pretrained_name_or_path` is logged and never loaded. Bind to 127.0.0.1 unless the network is trusted: gRPC here
runs without TLS or authentication, as LeRobot's own server does.

    lingbot-edge-lerobot policy-server --checkpoint tiny --preset so100 --camera camera_top --port 8080
    python -m lerobot.async_inference.robot_client --robot.type=so100_follower --robot.port=/dev/ttyACM0 \\
        --robot.cameras="{camera_top: {type: opencv, index_or_path: 0, width: 640, height: 480, fps: 30}}" \\
        --policy_type=lingbot_edge --pretrained_name_or_path=served --actions_per_chunk=64 \\
        --chunk_size_threshold=1.0 --server_address=127.0.0.1:8080 --task="put the cube in the bowl"
"""

from __future__ import annotations

import argparse
import io
import logging
import pickle
import threading
import time
from collections.abc import Mapping
from concurrent import futures
from typing import Any

import numpy as np

from lingbot_edge.flags import add_policy_args, build_policy, parse_cameras, robot_overrides
from lingbot_edge.lerobot.adapter import POLICY_TYPE, EpisodeRunner
from lingbot_edge.robot.so100 import SO100_LOWER, SO100_UPPER, camera_name

log = logging.getLogger(__name__)

_HELPERS = "lerobot.async_inference.helpers"
# (module, name) globals a client's message may name: LeRobot's two message classes and numpy's array pickling
# (numpy 1.x and 2.x module paths). Nothing else resolves, so a payload cannot call anything else.
ALLOWED_GLOBALS = frozenset({
    (_HELPERS, "TimedObservation"), (_HELPERS, "RemotePolicyConfig"),
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
})
_PLAIN = (str, int, float, bool, type(None))


class RestrictedUnpickler(pickle.Unpickler):
    """`pickle.Unpickler` that resolves only `ALLOWED_GLOBALS`."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in ALLOWED_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refused: {module}.{name} is not an allowed type")


def _check_value(value: Any, where: str) -> None:
    if isinstance(value, _PLAIN):
        return
    if isinstance(value, np.ndarray | np.generic):
        if value.dtype.kind not in "biuf":
            raise pickle.UnpicklingError(f"{where}: numpy dtype {value.dtype} refused (numbers only)")
        return
    if isinstance(value, list | tuple):
        for i, v in enumerate(value):
            _check_value(v, f"{where}[{i}]")
        return
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str):
                raise pickle.UnpicklingError(f"{where}: key {k!r} refused (str keys only)")
            _check_value(v, f"{where}[{k!r}]")
        return
    raise pickle.UnpicklingError(f"{where}: {type(value).__name__} refused")


def safe_loads(data: bytes, expected: type) -> Any:
    """Unpickle one client message of class `expected` with `RestrictedUnpickler`; its fields must be plain values,
    numeric numpy arrays, and lists / str-keyed dicts of them."""
    obj = RestrictedUnpickler(io.BytesIO(data)).load()
    if type(obj) is not expected:
        raise pickle.UnpicklingError(f"expected a {expected.__name__}, got {type(obj).__name__}")
    _check_value(dict(vars(obj)), expected.__name__)
    return obj


class AsyncEpisode:
    """The robot client's observation stream -> the episode protocol of one `LingBotPolicy` (see the module doc).

    `add(timestep, observation)` stores the first observation of each timestep (thread-safe, never blocks on
    inference); `next_actions(timeout)` returns the next chunk as (first timestep, actions [steps, n]) once it can
    be predicted, or None after `timeout` seconds without.
    """

    def __init__(self, policy, cameras: Mapping[str, str], limits: tuple[Any, Any] | None = None):
        self.runner = EpisodeRunner(policy)
        self.cameras = dict(cameras)  # policy camera key -> the robot's camera name
        # (low, high) per action value: what goes out is clipped to them, and fed back as executed (LeRobot's
        # client sends the actions to the arm as they are: no safety filter of ours runs on its side).
        self.limits = None if limits is None else (np.asarray(limits[0], np.float32), np.asarray(limits[1], np.float32))
        self._cond = threading.Condition()
        self._infer = threading.Lock()  # one chunk prediction at a time
        self.reset()

    def reset(self) -> None:
        with self._cond:
            self.runner.reset()
            self.observations: dict[int, dict] = {}
            self.first = 1  # timestep of the current chunk's first action
            self.chunks = 0
            self.sent: list[np.ndarray] = []  # the chunks handed out, as sent (clipped)

    def add(self, timestep: int, observation: Mapping[str, Any]) -> None:
        with self._cond:
            if timestep >= self.first - 1 and timestep not in self.observations:
                self.observations[timestep] = dict(observation)
                self._cond.notify_all()

    def _images(self, obs: Mapping[str, Any]) -> dict[str, np.ndarray]:
        missing = [name for name in self.cameras.values() if name not in obs]
        if missing:
            raise ValueError(f"observation: no cameras {missing} (has {sorted(obs)})")
        return {key: np.asarray(obs[name]) for key, name in self.cameras.items()}

    def _ready(self) -> list[dict] | None:
        """The observations the next prediction needs, if they are all there."""
        if not self.runner.started:
            return [self.observations[0]] if 0 in self.observations else None
        steps = range(self.first, self.first + self.runner.chunk.steps)
        if all(t in self.observations for t in steps):
            return [self.observations[t] for t in steps]
        return None

    def next_actions(self, timeout: float) -> tuple[int, np.ndarray] | None:
        with self._infer:
            deadline = time.monotonic() + timeout
            with self._cond:
                while (needed := self._ready()) is None:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        return None
                    self._cond.wait(left)
            if not self.runner.started:
                task = needed[0].get("task", "")
                actions = self.runner.start(self._images(needed[0]), prompt=task if isinstance(task, str) else "")
                first = 1
            else:
                for obs in needed:  # the executed steps in order; images are converted at keyframes only
                    self.runner.observe(lambda obs=obs: self._images(obs))
                first = self.first + len(needed)
                actions = self.runner.next_chunk(executed_actions=self.sent[-1])
            actions = np.asarray(actions, dtype=np.float32)
            if self.limits is not None:
                actions = np.clip(actions, *self.limits)
            with self._cond:
                self.first, self.chunks = first, self.chunks + 1
                self.sent.append(actions)
                self.observations = {t: o for t, o in self.observations.items() if t >= first - 1}
            return first, actions


def make_servicer(policy, cameras: Mapping[str, str], fps: float = 30.0, obs_timeout: float = 2.0,
                  limits: tuple[Any, Any] | None = None):
    """The gRPC servicer of `policy` (needs LeRobot 0.4's `async` extra: grpcio)."""
    import torch
    from lerobot.async_inference.helpers import RemotePolicyConfig, TimedAction, TimedObservation
    from lerobot.transport import services_pb2, services_pb2_grpc
    from lerobot.transport.utils import receive_bytes_in_chunks

    n_actions = len(policy.cfg.used_action_channel_ids)

    class Servicer(services_pb2_grpc.AsyncInferenceServicer):
        def __init__(self):
            self.episode = AsyncEpisode(policy, cameras, limits)
            self.shutdown = threading.Event()
            self.refused = 0

        def Ready(self, request, context):  # noqa: N802  (gRPC method names)
            log.info("client %s ready: new episode", context.peer())
            self.episode.reset()
            return services_pb2.Empty()

        def SendPolicyInstructions(self, request, context):  # noqa: N802
            import grpc

            try:
                spec = safe_loads(request.data, RemotePolicyConfig)
            except (pickle.UnpicklingError, EOFError, ValueError) as e:
                self.refused += 1
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"policy instructions refused: {e}")
            if spec.policy_type != POLICY_TYPE:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"this server serves --policy_type={POLICY_TYPE}, "
                                                                f"not {spec.policy_type!r}")
            features = spec.lerobot_features or {}
            missing = [n for n in cameras.values() if f"observation.images.{n}" not in features]
            if missing:
                context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"the robot has no cameras {missing}; the policy "
                                                                  f"reads {list(cameras.values())}")
            log.info("client %s: policy %s (pretrained_name_or_path %r is the server's own here), actions per "
                     "chunk %s ignored: whole chunks are sent", context.peer(), spec.policy_type,
                     spec.pretrained_name_or_path, spec.actions_per_chunk)
            return services_pb2.Empty()

        def SendObservations(self, request_iterator, context):  # noqa: N802
            data = receive_bytes_in_chunks(request_iterator, None, self.shutdown, "lingbot-edge policy server")
            if data is None:
                return services_pb2.Empty()
            try:
                obs = safe_loads(data, TimedObservation)
            except (pickle.UnpicklingError, EOFError, ValueError) as e:
                import grpc

                self.refused += 1
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"observation refused: {e}")
            self.episode.add(int(obs.timestep), obs.observation)
            return services_pb2.Empty()

        def GetActions(self, request, context):  # noqa: N802
            got = self.episode.next_actions(obs_timeout)
            if got is None:
                return services_pb2.Empty()
            first, actions = got
            if actions.shape[1] != n_actions:
                raise RuntimeError(f"chunk of {actions.shape[1]} values per action, expected {n_actions}")
            now = time.time()
            timed = [TimedAction(timestamp=now + i / fps, timestep=first + i, action=torch.from_numpy(a.copy()))
                     for i, a in enumerate(actions)]
            log.info("chunk %d: actions %d..%d", self.episode.chunks - 1, first, first + len(timed) - 1)
            return services_pb2.Actions(data=pickle.dumps(timed))

    return Servicer()


def serve(policy, cameras: Mapping[str, str], host: str = "127.0.0.1", port: int = 8080, fps: float = 30.0,
          obs_timeout: float = 2.0, limits: tuple[Any, Any] | None = None):
    """Start the gRPC server (returns (server, servicer, bound port); `server.stop(None)` ends it)."""
    import grpc
    from lerobot.transport import services_pb2_grpc
    from lerobot.transport.utils import grpc_channel_options

    servicer = make_servicer(policy, cameras, fps=fps, obs_timeout=obs_timeout, limits=limits)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), options=grpc_channel_options())
    services_pb2_grpc.add_AsyncInferenceServicer_to_server(servicer, server)
    bound = server.add_insecure_port(f"{host}:{port}")
    server.start()
    log.info("lingbot-edge policy server for LeRobot's robot client on %s:%d", host, bound)
    return server, servicer, bound


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="lingbot-edge-lerobot policy-server", description=__doc__.split("\n")[0])
    add_policy_args(p, default_checkpoint="tiny", default_preset="so100")
    p.add_argument("--camera", action="append", default=[], metavar="NAME",
                   help="a robot camera the policy reads (repeatable; the policy's camera set and order)")
    p.add_argument("--stats", default=None, help="a LeRobot dataset whose action quantiles the policy takes")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--fps", type=float, default=30.0)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    policy = build_policy(args, **robot_overrides(args, parse_cameras(args)))
    cameras = {key: camera_name(key) for key in policy.cfg.obs_cam_keys}
    if len(policy.cfg.used_action_channel_ids) != len(SO100_LOWER):
        raise SystemExit(f"policy-server: the policy has {len(policy.cfg.used_action_channel_ids)} action channels, "
                         f"the SO-100 {len(SO100_LOWER)}")
    server, _, port = serve(policy, cameras, args.host, args.port, fps=args.fps, limits=(SO100_LOWER, SO100_UPPER))
    print(f"serving --policy_type={POLICY_TYPE} on {args.host}:{port}; cameras {list(cameras.values())}; run the "
          "robot client with --chunk_size_threshold=1.0", flush=True)
    try:
        server.wait_for_termination()
    except KeyboardInterrupt:
        server.stop(None)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
