"""`lingbot-edge serve`: the policy behind an openpi-style websocket (msgpack-numpy frames).

Protocol `lingbot-edge/1` (one policy, one episode at a time; all maps have str keys)
------------------------------------------------------------------------------------
Transport: websocket, binary frames, msgpack with the numpy encoding of `lingbot_edge.serve.msgpack_numpy`
(`{b"__ndarray__": True, b"data", b"dtype", b"shape"}`; object / void / complex dtypes refused).
HTTP `GET /healthz` answers `200 OK` (no key needed). With `--api-key`, the websocket handshake needs the
header `Authorization: Api-Key <key>` (compared in constant time), else `401`.

1. On connect the server sends one metadata map: `protocol`, `preset`, `model`, `camera_keys`
   (`observation.images.<camera>`), `image_size` [H, W] the model resizes to, `state_dim`, `action_dim`,
   `action_keys`, `action_per_frame`, `frame_chunk_size`, `keyframe_stride`, `first_chunk_steps`,
   `chunk_steps`, `first_feedback_keyframes`, `feedback_keyframes`, `max_message_bytes`.
2. Each request is a map:
   - `prompt` (or LeRobot's `task`): str. A request carrying a prompt that differs from the running
     episode's, or the first request of a connection, starts a new episode. `{"reset": True, "prompt": ..}`
     starts one explicitly (with images in the same map it also returns the first chunk; without, the
     reply is `{"reset": True, "server_timing": ..}`).
   - `observation.images.<camera>` for every camera in `camera_keys`, uint8 RGB, any H x W (resized):
     * first request of an episode: the current frame, `H x W x 3`;
     * every later request: the keyframes recorded while the previous chunk was executed, `T x H x W x 3`
       with T = the previous reply's `keyframes_next` (one frame per camera after every
       `keyframe_stride` executed steps; `first_feedback_keyframes` after the first chunk,
       `feedback_keyframes` after the others). A single `H x W x 3` frame is accepted too (clients that
       only send the current observation) and repeated T times: it runs, but the model then sees a static
       chunk; send the keyframes for full quality. Frames may be downscaled to `image_size` to save bandwidth.
   - `observation.state`: float, `state_dim` values (or T x state_dim); must be finite. Checked and logged;
     the model conditions on images and on the actions it sent.
   - `executed_actions` (optional): `steps x action_dim` actions really executed for the previous chunk
     (after the client's own clamping); default: the chunk the server sent.
3. The reply is a map: `action` (`steps x action_dim` float32, robot units, execute in order),
   `chunk`, `frame_start`, `keyframes_next` (T expected in the next request), `server_timing`
   (`infer_ms`, `feedback_ms`, `total_ms`, `prev_total_ms`, per-phase policy timings).
   The server remembers the chunk it sent: the next request of the episode feeds it back (keyframes +
   executed actions) before inferring the following chunk, so a client is just: send observation, get
   `action`, execute it while recording keyframes, send them, repeat.
4. Errors: a request that is not valid (bad msgpack, unknown or missing camera, wrong image shape or dtype,
   NaN state, ...) gets a text frame `error: <what and why>`; nothing of the episode changed, the
   connection stays usable. A failure inside the policy gets `internal error: ..` (traceback in the server
   log), ends the episode (the next request with a prompt starts a new one) and keeps the connection.
   A message over `max_message_bytes` closes the connection with code 1009 (message too big); reconnect.
   If another connection starts an episode, the earlier one gets `error: ..episode was taken over..` until it
   sends a prompt or reset again.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hmac
import http
import itertools
import logging
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from lingbot_edge.core.config import VAE_TEMPORAL
from lingbot_edge.serve.msgpack_numpy import DecodeError, packb, unpackb

log = logging.getLogger(__name__)

PROTOCOL = "lingbot-edge/1"
IMAGE_PREFIX = "observation.images."
DEFAULT_MAX_MESSAGE_BYTES = 64 * 2**20  # 16 keyframes x 3 cameras x 480x640x3 = 44 MB fits
MAX_IMAGE_SIDE = 4096


class ProtocolError(ValueError):
    """A request the protocol does not allow; the text goes back to the client."""


@dataclass
class _Episode:
    owner: int
    prompt: str
    pending: np.ndarray | None = None  # the chunk sent, awaiting its keyframes
    chunks: int = 0
    warned_single_frame: bool = False


def _text(value: Any, name: str) -> str:
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    if isinstance(value, list | tuple) and len(value) == 1:  # upstream's RoboTwin client sends [prompt]
        value = value[0]
    if isinstance(value, np.ndarray) and value.dtype.kind in "US" and value.size == 1:
        value = str(value.reshape(())[()])
    if not isinstance(value, str):
        raise ProtocolError(f"{name}: expected a string, got {type(value).__name__}")
    return value


class EpisodeServer:
    """The protocol's state machine over one policy, transport-free (thread-safe, one call at a time)."""

    def __init__(self, policy, state_dim: int | None = None, action_keys: tuple[str, ...] | None = None):
        self.policy = policy
        self.cfg = policy.cfg
        self.cam_keys = tuple(self.cfg.obs_cam_keys)
        self.n_act = len(self.cfg.used_action_channel_ids)
        self.state_dim = state_dim or self.cfg.state_dim or self.n_act
        self.action_keys = action_keys
        self.episode: _Episode | None = None
        self._taken_over: set[int] = set()
        self._lock = threading.Lock()

    def steps(self, first: bool) -> int:
        return (self.cfg.frame_chunk_size - (1 if first else 0)) * self.cfg.action_per_frame

    def keyframes(self, first: bool) -> int:
        return VAE_TEMPORAL * (self.cfg.frame_chunk_size - (1 if first else 0))

    def metadata(self, max_message_bytes: int | None = None) -> dict[str, Any]:
        cfg = self.cfg
        return {
            "protocol": PROTOCOL,
            "policy": "lingbot-va",
            "preset": cfg.name,
            "model": cfg.model,
            "camera_keys": list(self.cam_keys),
            "image_size": [cfg.height, cfg.width],
            "state_dim": self.state_dim,
            "action_dim": self.n_act,
            "action_keys": list(self.action_keys) if self.action_keys else None,
            "action_per_frame": cfg.action_per_frame,
            "frame_chunk_size": cfg.frame_chunk_size,
            "keyframe_stride": cfg.keyframe_stride,
            "first_chunk_steps": self.steps(True),
            "chunk_steps": self.steps(False),
            "first_feedback_keyframes": self.keyframes(True),
            "feedback_keyframes": self.keyframes(False),
            "max_message_bytes": max_message_bytes,
        }

    # ---------------------------------------------------------------- validation (no state touched)

    def _images(self, req: Mapping[str, Any]) -> dict[str, np.ndarray]:
        given = {k for k in req if k.startswith(IMAGE_PREFIX)}
        unknown = sorted(given - set(self.cam_keys))
        if unknown:
            raise ProtocolError(f"unknown camera key(s) {unknown}; this policy takes {list(self.cam_keys)}")
        images = {}
        for key in sorted(given):
            img = req[key]
            desc = f"shape {list(np.shape(img))} {getattr(img, 'dtype', type(img).__name__)}"
            if (not isinstance(img, np.ndarray) or img.dtype != np.uint8 or img.ndim not in (3, 4)
                    or img.shape[-1] != 3 or 0 in img.shape or max(img.shape[-3:-1]) > MAX_IMAGE_SIDE):
                raise ProtocolError(f"{key}: expected an H x W x 3 uint8 image (or T x H x W x 3 keyframes, "
                                    f"sides <= {MAX_IMAGE_SIDE}), got {desc}")
            images[key] = img
        if images:
            missing = [k for k in self.cam_keys if k not in images]
            if missing:
                raise ProtocolError(f"missing camera image(s) {missing}; every request with images needs all of "
                                    f"{list(self.cam_keys)}")
            counts = {k: (v.shape[0] if v.ndim == 4 else 1) for k, v in images.items()}
            if len(set(counts.values())) != 1:
                raise ProtocolError(f"cameras carry different frame counts {counts}; send the same T for each")
        return images

    def _floats(self, value: Any, name: str, last_dim: int, rows: int | None = None) -> np.ndarray:
        if not isinstance(value, np.ndarray) or value.dtype.kind not in "fiu":
            raise ProtocolError(f"{name}: expected a numeric array, got {type(value).__name__}")
        arr = value.astype(np.float32)
        ok_shape = arr.shape == (last_dim,) or (arr.ndim == 2 and arr.shape[1] == last_dim)
        if rows is not None:
            ok_shape = arr.shape == (rows, last_dim)
        if not ok_shape:
            want = f"({rows}, {last_dim})" if rows is not None else f"({last_dim},) or (T, {last_dim})"
            raise ProtocolError(f"{name}: expected shape {want}, got {list(arr.shape)}")
        if not np.isfinite(arr).all():
            raise ProtocolError(f"{name}: contains NaN or inf")
        return arr

    # ---------------------------------------------------------------- requests

    def handle(self, conn: int, req: Any) -> dict[str, Any]:
        """One request -> reply map. ProtocolError: bad request (state unchanged)."""
        t_start = time.perf_counter()
        if not isinstance(req, Mapping):
            raise ProtocolError(f"request: expected a map of observation keys, got {type(req).__name__}")
        req = {k.decode("utf-8", "replace") if isinstance(k, bytes) else k: v for k, v in req.items()}
        prompt = req.get("prompt", req.get("task"))
        prompt = None if prompt is None else _text(prompt, "prompt")
        reset = bool(req.get("reset", False))
        images = self._images(req)
        state = req.get("observation.state")
        if state is not None:
            state = self._floats(state, "observation.state", self.state_dim)
        executed = req.get("executed_actions")
        with self._lock:
            ep = self.episode
            new_episode = reset or ep is None or ep.owner != conn or (prompt is not None and prompt != ep.prompt)
            first_chunk = new_episode or ep.pending is None
            if new_episode and prompt is None:
                if conn in self._taken_over:
                    raise ProtocolError("your episode was taken over by another client; send prompt/task "
                                        "(or reset) to start a new one")
                raise ProtocolError("no episode yet: the first request needs `prompt` (or `task`) and images")
            if first_chunk:
                if not images and not reset:
                    raise ProtocolError(f"an episode's first request needs the current images {list(self.cam_keys)}")
                if any(v.ndim == 4 and v.shape[0] != 1 for v in images.values()):
                    raise ProtocolError("an episode starts from one frame per camera (H x W x 3), got keyframes")
                first_imgs = {k: v if v.ndim == 3 else v[0] for k, v in images.items()}
            else:
                t_want = self.keyframes(ep.chunks == 1)
                if not images:
                    raise ProtocolError(f"request needs the keyframes of the chunk just executed for "
                                        f"{list(self.cam_keys)} (T = {t_want})")
                frames, single = {}, False
                for k, v in images.items():
                    if v.ndim == 3 or v.shape[0] == 1:
                        frames[k] = np.repeat(v.reshape((1, *v.shape[-3:])), t_want, axis=0)
                        single = True
                    elif v.shape[0] == t_want:
                        frames[k] = v
                    else:
                        raise ProtocolError(f"{k}: expected {t_want} keyframes (T x H x W x 3) for the chunk just "
                                            f"executed, got {v.shape[0]}")
                if executed is not None:
                    executed = self._floats(executed, "executed_actions", self.n_act, rows=len(ep.pending))
            # -- validated: from here on the episode changes
            timing: dict[str, float] = {}
            try:
                if new_episode:
                    if ep is not None and ep.owner != conn:
                        self._taken_over.add(ep.owner)
                        log.warning("connection %d takes over the episode of connection %d", conn, ep.owner)
                    self._taken_over.discard(conn)
                    t = time.perf_counter()
                    self.policy.reset(prompt)
                    timing["reset_ms"] = (time.perf_counter() - t) * 1e3
                    ep = self.episode = _Episode(conn, prompt)
                    log.info("connection %d: new episode %r", conn, prompt)
                    if not images:
                        timing["total_ms"] = (time.perf_counter() - t_start) * 1e3
                        return {"reset": True, "server_timing": timing}
                if first_chunk:
                    t = time.perf_counter()
                    out = self.policy.infer(first_imgs)
                else:
                    if single and not ep.warned_single_frame:
                        log.warning("connection %d sends single frames, not the keyframes of each chunk: repeating "
                                    "the frame (works, but lowers the policy's quality)", conn)
                        ep.warned_single_frame = True
                    t = time.perf_counter()
                    fb = self.policy.feedback(frames, ep.pending if executed is None else executed)
                    timing["feedback_ms"] = (time.perf_counter() - t) * 1e3
                    timing.update({f"feedback_{k}": v for k, v in fb.items()})
                    t = time.perf_counter()
                    out = self.policy.infer({})
            except Exception:
                self.episode = None  # the policy state is unknown now: the next request starts over
                raise
            timing["infer_ms"] = (time.perf_counter() - t) * 1e3
            timing.update({f"infer_{k}": v for k, v in out.get("timing", {}).items()})
            actions = np.ascontiguousarray(out["actions"], dtype=np.float32)
            ep.pending = actions
            ep.chunks += 1
            if state is not None:
                log.debug("connection %d chunk %d state %s", conn, ep.chunks - 1, state)
            timing["total_ms"] = (time.perf_counter() - t_start) * 1e3
            return {
                "action": actions,
                "chunk": int(out.get("chunk", ep.chunks - 1)),
                "frame_start": int(out.get("frame_start", 0)),
                "keyframes_next": self.keyframes(ep.chunks == 1),
                "server_timing": {k: float(v) for k, v in timing.items()},
            }

    def disconnect(self, conn: int) -> None:
        with self._lock:
            self._taken_over.discard(conn)
            if self.episode is not None and self.episode.owner == conn:
                log.info("connection %d closed: its episode ends", conn)
                self.episode = None


class PolicyServer:
    """Websocket transport for an `EpisodeServer` (asyncio; the policy runs on one worker thread)."""

    def __init__(self, episodes: EpisodeServer, host: str = "127.0.0.1", port: int = 8000,
                 api_key: str | None = None, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES):
        self.episodes = episodes
        self.host, self.port = host, port
        self._expected_auth = f"Api-Key {api_key}".encode() if api_key else None
        self.max_message_bytes = max_message_bytes
        self._ids = itertools.count(1)
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="lingbot-policy")
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopped: asyncio.Event | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    def _process_request(self, connection, request):
        if request.path == "/healthz":
            return connection.respond(http.HTTPStatus.OK, "OK\n")
        if self._expected_auth is not None:
            got = (request.headers.get("Authorization") or "").encode()
            if not hmac.compare_digest(got, self._expected_auth):
                log.warning("rejected a connection from %s: missing or wrong API key", connection.remote_address)
                return connection.respond(http.HTTPStatus.UNAUTHORIZED, "missing or invalid API key\n")
        return None

    async def _handler(self, ws) -> None:
        import websockets

        conn = next(self._ids)
        log.info("connection %d from %s", conn, ws.remote_address)
        loop = asyncio.get_running_loop()
        prev_total_ms = None
        try:
            await ws.send(packb(self.episodes.metadata(self.max_message_bytes)))
            while True:
                try:
                    msg = await ws.recv()
                except websockets.ConnectionClosed as e:
                    if e.rcvd is None and e.sent is not None and e.sent.code == 1009:
                        log.warning("connection %d: message over %d bytes, connection closed", conn,
                                    self.max_message_bytes)
                    break
                t0 = time.perf_counter()
                try:
                    if isinstance(msg, str):
                        raise ProtocolError("expected a binary msgpack frame, got a text frame")
                    req = unpackb(msg)
                    reply = await loop.run_in_executor(self._executor, self.episodes.handle, conn, req)
                    if prev_total_ms is not None:
                        reply["server_timing"]["prev_total_ms"] = prev_total_ms
                    await ws.send(packb(reply))
                except (ProtocolError, DecodeError) as e:
                    log.info("connection %d: bad request: %s", conn, e)
                    await ws.send(f"error: {e}")
                except websockets.ConnectionClosed:
                    break
                except Exception as e:
                    log.exception("connection %d: policy failure", conn)
                    await ws.send(f"internal error: {type(e).__name__}: {e} (episode ended; see the server log)")
                prev_total_ms = (time.perf_counter() - t0) * 1e3
        except websockets.ConnectionClosed:
            pass
        finally:
            self.episodes.disconnect(conn)
            log.info("connection %d closed", conn)

    async def serve(self) -> None:
        """Serve until `stop()` (or cancellation)."""
        from websockets.asyncio.server import serve

        self._loop = asyncio.get_running_loop()
        self._stopped = asyncio.Event()
        async with serve(self._handler, self.host, self.port, process_request=self._process_request,
                         max_size=self.max_message_bytes, compression=None) as server:
            self.port = server.sockets[0].getsockname()[1]
            log.info("serving %s (%s) on ws://%s:%d%s", self.episodes.cfg.name, PROTOCOL, self.host, self.port,
                     " with API key" if self._expected_auth else "")
            self._ready.set()
            await self._stopped.wait()

    def serve_forever(self) -> None:
        try:
            asyncio.run(self.serve())
        finally:
            self._executor.shutdown(wait=False, cancel_futures=True)

    def start(self, timeout: float = 30.0) -> PolicyServer:
        """Serve on a background thread; returns once listening (`self.port` is the bound port)."""
        def run():
            try:
                asyncio.run(self.serve())
            except BaseException as e:  # noqa: BLE001 - reported to start()
                self._error = e
                self._ready.set()

        self._thread = threading.Thread(target=run, name="lingbot-serve", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout) or self._error is not None:
            raise RuntimeError(f"server did not start: {self._error!r}")
        return self

    def stop(self, timeout: float = 10.0) -> None:
        if self._loop is not None and self._stopped is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._stopped.set)
        if self._thread is not None:
            self._thread.join(timeout)
        self._executor.shutdown(wait=True, cancel_futures=True)


def build_server_policy(preset: str = "so100", model: str = "tiny", checkpoint: str | None = None,
                        stats: str | None = None, device: str = "cpu", compile: bool = False, seed: int = 0):
    """(policy, action_keys) for `serve`. preset "so100" uses the SO-100 cameras / 6-d actions (quantiles
    from `stats`, a LeRobot dataset's meta/stats.json); other presets come from config.py as they are."""
    from lingbot_edge.core.config import get_policy_config
    from lingbot_edge.robot.so100 import SO100_ACTION_KEYS, build_policy, load_dataset_quantiles, so100_policy_config

    if preset == "so100":
        q01, q99 = load_dataset_quantiles(stats) if stats else (None, None)
        cfg = so100_policy_config(model, q01=q01, q99=q99)
        keys = SO100_ACTION_KEYS
    else:
        if stats:
            raise ValueError("--stats applies to --preset so100 only")
        cfg = get_policy_config(preset)
        if model == "tiny" and cfg.model != "tiny":
            raise ValueError(f"--model tiny: preset {preset!r} is for the full model; use --preset tiny or so100")
        keys = None
    return build_policy(cfg, checkpoint=checkpoint, compile=compile, seed=seed, device=device), keys


class RemotePolicy:
    """Client of this protocol shaped like `LingBotPolicy` (`.cfg`, reset / infer / feedback), so the
    SO-100 loop can run next to the arm while the policy runs on a GPU box (`run-so100 --robot remote`).
    `feedback` only stores the keyframes: they travel with the next `infer` request (sync schedule)."""

    supports_lookahead = False

    def __init__(self, address: str, api_key: str | None = None, open_timeout: float = 30.0):
        import contextlib
        from types import SimpleNamespace

        from websockets.sync.client import connect

        uri = address if address.startswith(("ws://", "wss://")) else f"ws://{address}"
        headers = {"Authorization": f"Api-Key {api_key}"} if api_key else None
        self._exit = contextlib.ExitStack()  # websockets >= 17.1: connections are context managers
        self.ws = self._exit.enter_context(connect(uri, compression=None, max_size=None, additional_headers=headers,
                                                   open_timeout=open_timeout))
        self.metadata = unpackb(self.ws.recv())
        m = self.metadata
        self.cfg = SimpleNamespace(name=m["preset"], obs_cam_keys=tuple(m["camera_keys"]), height=m["image_size"][0],
                                   width=m["image_size"][1], keyframe_stride=m["keyframe_stride"],
                                   action_per_frame=m["action_per_frame"], frame_chunk_size=m["frame_chunk_size"])
        self.prompt: str | None = None
        self._feedback: dict[str, Any] | None = None

    def _call(self, req: dict) -> dict:
        self.ws.send(packb(req))
        reply = self.ws.recv()
        if isinstance(reply, str):
            raise RuntimeError(f"policy server: {reply}")
        return unpackb(reply)

    def reset(self, prompt: str) -> None:
        self.prompt = prompt
        self._feedback = None
        self._call({"reset": True, "prompt": prompt})

    def infer(self, obs: Mapping[str, Any], ahead: bool = False) -> dict[str, Any]:
        if ahead:
            raise RuntimeError("RemotePolicy: no lookahead over the websocket protocol")
        req: dict[str, Any] = {"prompt": self.prompt}
        req.update(self._feedback if self._feedback is not None else dict(obs))
        self._feedback = None
        r = self._call(req)
        return {"actions": np.asarray(r["action"]), "timing": r["server_timing"], "chunk": r["chunk"],
                "frame_start": r["frame_start"]}

    def feedback(self, frames: Mapping[str, Any], executed_actions: np.ndarray) -> dict[str, float]:
        self._feedback = {**{k: np.ascontiguousarray(v) for k, v in frames.items()},
                          "executed_actions": np.asarray(executed_actions, dtype=np.float32)}
        return {}

    def close(self) -> None:
        self._exit.close()
