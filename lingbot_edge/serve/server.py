"""`lingbot-edge serve`: a policy behind an openpi-style websocket (msgpack-numpy frames).

`EpisodeServer` is the protocol's state machine over one `core.protocols.Policy` (one episode at a time,
transport-free); `PolicyServer` carries it over websockets. The wire protocol `lingbot-edge/1` (metadata,
requests, replies, errors) is described in docs/serving.md; `serve.client.RemotePolicy` is its client.
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
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from lingbot_edge.core.actions import ActionCodec
from lingbot_edge.core.episode import Chunk
from lingbot_edge.core.protocols import Policy
from lingbot_edge.serve.frames import check_float_image, decode_images, resize_frames
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
    pending: list[Chunk] = field(default_factory=list)  # chunks sent, not fed back yet
    next_index: int = 0
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


def _flag(req: Mapping[str, Any], name: str) -> bool:
    value = req.get(name, False)
    if not isinstance(value, bool | np.bool_):
        raise ProtocolError(f"{name}: expected true or false, got {type(value).__name__} {np.shape(value)}")
    return bool(value)


class EpisodeServer:
    """The protocol's state machine over one policy, transport-free (thread-safe, one call at a time).

    Args:
        policy: the `core.protocols.Policy` served (a `LingBotPolicy`); lookahead is offered when its
            `supports_lookahead` is true.
        state_dim: values in `observation.state` (default: the config's `state_dim`, else the action
            channels).
        action_keys: one name per action channel, for the metadata (e.g. `SO100_ACTION_KEYS`).
        action_limits: (lower, upper) per action channel, robot units: every chunk is clamped before it
            leaves (the walkthrough client sends `action` straight to the motors).

    Raises:
        ValueError: `action_keys` or `action_limits` do not match the policy's action channels.

    Example:
        episodes = EpisodeServer(policy, action_keys=SO100_ACTION_KEYS, action_limits=(SO100_LOWER, SO100_UPPER))
        reply = episodes.handle(conn=1, req={"prompt": "pick up the cube", **first_images})
        reply["action"]  # steps x action_dim float32, clamped
    """

    def __init__(self, policy: Policy, state_dim: int | None = None, action_keys: Sequence[str] | None = None,
                 action_limits: tuple[Sequence[float], Sequence[float]] | None = None):
        self.policy = policy
        self.cfg = policy.cfg
        self.cam_keys = tuple(self.cfg.obs_cam_keys)
        self.n_act = len(self.cfg.used_action_channel_ids)
        self.state_dim = state_dim or self.cfg.state_dim or self.n_act
        self.action_keys = tuple(action_keys) if action_keys else None
        if self.action_keys is not None and len(self.action_keys) != self.n_act:
            raise ValueError(f"action_keys: {len(self.action_keys)} names for {self.n_act} action channels")
        self.limits = None
        if action_limits is not None:
            lo, hi = (np.asarray(v, dtype=np.float32).reshape(-1) for v in action_limits)
            if lo.shape != (self.n_act,) or hi.shape != (self.n_act,) or not (lo <= hi).all():
                raise ValueError(f"action_limits: expected lower <= upper with {self.n_act} values each, got "
                                 f"{lo.tolist()} / {hi.tolist()}")
            self.limits = (lo, hi)
        self.lookahead = bool(policy.supports_lookahead)
        self.episode: _Episode | None = None
        self._taken_over: dict[int, int] = {}  # connection -> the connection that took its episode
        self._lock = threading.Lock()

    def _chunk(self, actions: np.ndarray, index: int, **kw) -> Chunk:
        return Chunk(actions, index=index, first=index == 0, keyframe_stride=self.cfg.keyframe_stride,
                     cameras=self.cam_keys, **kw)

    def _plan(self, first: bool) -> Chunk:
        """An empty chunk of this policy's shape: the protocol's step and keyframe counts come from it."""
        return self._chunk(np.zeros((ActionCodec(self.cfg).steps(first), self.n_act), np.float32), 0 if first else 1)

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
            "action_limits": None if self.limits is None else {"lower": self.limits[0].tolist(),
                                                               "upper": self.limits[1].tolist()},
            "action_per_frame": cfg.action_per_frame,
            "frame_chunk_size": cfg.frame_chunk_size,
            "keyframe_stride": cfg.keyframe_stride,
            "first_chunk_steps": self._plan(True).steps,
            "chunk_steps": self._plan(False).steps,
            "first_feedback_keyframes": self._plan(True).num_keyframes,
            "feedback_keyframes": self._plan(False).num_keyframes,
            "supports_lookahead": self.lookahead,
            "async_mode": cfg.async_mode,
            "max_message_bytes": max_message_bytes,
        }

    # ---------------------------------------------------------------- validation (no state touched)

    def _images(self, req: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """{camera: uint8 [T, H, W, 3] at the policy's size}, resized before anything is repeated or
        converted (the request's memory stays within a few times its size)."""
        given = {k for k in req if k.startswith(IMAGE_PREFIX)}
        unknown = sorted(given - set(self.cam_keys))
        if unknown:
            raise ProtocolError(f"unknown camera key(s) {unknown}; this policy takes {list(self.cam_keys)}")
        if given and len(given) != len(self.cam_keys):
            missing = [k for k in self.cam_keys if k not in given]
            raise ProtocolError(f"missing camera image(s) {missing}; every request with images needs all of "
                                f"{list(self.cam_keys)}")
        raw, size = {}, (self.cfg.height, self.cfg.width)
        for key in self.cam_keys if given else ():
            img = req[key]
            if isinstance(img, list | tuple) and img and all(isinstance(b, bytes) for b in img):
                try:  # compressed frames: decoded one at a time straight to the policy's size
                    raw[key] = decode_images(img, key, *size, max_side=MAX_IMAGE_SIDE)
                except ValueError as e:
                    raise ProtocolError(str(e)) from e
                continue
            desc = f"shape {list(np.shape(img))} {getattr(img, 'dtype', type(img).__name__)}"
            if (not isinstance(img, np.ndarray) or (img.dtype != np.uint8 and img.dtype.kind != "f")
                    or img.ndim not in (3, 4) or img.shape[-1] != 3 or 0 in img.shape
                    or max(img.shape[-3:-1]) > MAX_IMAGE_SIDE):
                raise ProtocolError(f"{key}: expected an H x W x 3 uint8 image, or float in 0..255 (or T x H x W x 3 "
                                    f"keyframes, sides <= {MAX_IMAGE_SIDE}), got {desc}")
            if img.dtype.kind == "f":
                try:
                    check_float_image(img, key)
                except ValueError as e:
                    raise ProtocolError(str(e)) from e
            raw[key] = img
        counts = {k: (v.shape[0] if v.ndim == 4 else 1) for k, v in raw.items()}
        if len(set(counts.values())) > 1:
            raise ProtocolError(f"cameras carry different frame counts {counts}; send the same T for each")
        return {k: resize_frames(v if v.ndim == 4 else v[None], *size) for k, v in raw.items()}

    def _floats(self, value: Any, name: str, last_dim: int, rows: int | None = None) -> np.ndarray:
        want = f"({rows}, {last_dim})" if rows is not None else f"({last_dim},) or (T, {last_dim})"
        if not isinstance(value, np.ndarray) or value.dtype.kind not in "fiu":
            got = f"{value.dtype} array" if isinstance(value, np.ndarray) else type(value).__name__
            raise ProtocolError(f"{name}: expected a numeric array of shape {want}, got {got}")
        arr = value.astype(np.float32)
        ok_shape = arr.shape == (last_dim,) or (arr.ndim == 2 and arr.shape[1] == last_dim)
        if rows is not None:
            ok_shape = arr.shape == (rows, last_dim)
        if not ok_shape:
            raise ProtocolError(f"{name}: expected shape {want}, got {list(arr.shape)}")
        if not np.isfinite(arr).all():
            raise ProtocolError(f"{name}: contains NaN or inf")
        return arr

    def _keyframes(self, ep: _Episode, conn: int, images: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        index, t_want = ep.pending[0].index, ep.pending[0].num_keyframes
        frames = {}
        for k, v in images.items():
            if v.shape[0] == 1:
                if not ep.warned_single_frame:
                    log.warning("connection %d sends single frames, not the keyframes of each chunk: repeating the "
                                "frame (works, but lowers the policy's quality)", conn)
                    ep.warned_single_frame = True
                frames[k] = np.repeat(v, t_want, axis=0)  # already at the policy's size: small
            elif v.shape[0] == t_want:
                frames[k] = v
            else:
                raise ProtocolError(f"{k}: expected {t_want} keyframes (T x H x W x 3) for chunk {index} just "
                                    f"executed, got {v.shape[0]}")
        return frames

    # ---------------------------------------------------------------- requests

    def handle(self, conn: int, req: Any) -> dict[str, Any]:
        """Answer one request of connection `conn`.

        Args:
            conn: the connection's id (one episode owner at a time).
            req: the decoded request map (str or bytes keys).

        Returns:
            The reply map: a chunk (`action`, `chunk`, `first`, `frame_start`, `keyframes_next`,
            `server_timing`) or, for a reset without images, `reset` (and `episode_ended`).

        Raises:
            ProtocolError: a request the protocol does not allow; nothing of the episode changed.
            Exception: a failure inside the policy; the episode is ended.
        """
        t_start = time.perf_counter()
        if not isinstance(req, Mapping):
            raise ProtocolError(f"request: expected a map of observation keys, got {type(req).__name__}")
        req = {k.decode("utf-8", "replace") if isinstance(k, bytes) else k: v for k, v in req.items()}
        prompt = req.get("prompt", req.get("task"))
        prompt = None if prompt is None else _text(prompt, "prompt")
        reset, ahead = _flag(req, "reset"), _flag(req, "ahead")
        if ahead and not self.lookahead:
            raise ProtocolError("ahead: this policy has no lookahead (metadata supports_lookahead is false)")
        images = self._images(req)
        state = req.get("observation.state")
        if state is not None:
            state = self._floats(state, "observation.state", self.state_dim)
        with self._lock:
            ep = self.episode
            if ep is not None and ep.owner != conn and not reset:
                if conn in self._taken_over:
                    raise ProtocolError(f"your episode was taken over by connection {self._taken_over[conn]} (it "
                                        "sent reset); send reset: true to take the policy back")
                raise ProtocolError(f"the policy is serving another client's episode (connection {ep.owner}); one "
                                    "episode at a time: send reset: true to take it over")
            if reset and prompt is None:  # the walkthrough's reset(robo_name): end the episode
                self._end(conn, ep, "reset")
                return {"reset": True, "episode_ended": ep is not None,
                        "server_timing": {"total_ms": (time.perf_counter() - t_start) * 1e3}}
            new_episode = reset or ep is None or (prompt is not None and prompt != ep.prompt)
            if new_episode and prompt is None:
                raise ProtocolError("no episode yet: the first request needs `prompt` (or `task`) and images")
            if new_episode:
                if any(v.shape[0] != 1 for v in images.values()):
                    raise ProtocolError("an episode starts from one frame per camera (H x W x 3), got keyframes")
                if not images and not reset:
                    raise ProtocolError(f"an episode's first request needs the current images {list(self.cam_keys)}")
                if ahead:
                    raise ProtocolError("ahead: the first chunk of an episode needs the current images, not ahead")
                return self._start(conn, ep, prompt, images, t_start)
            return self._next(conn, ep, images, req.get("executed_actions"), ahead, t_start)

    def _end(self, conn: int, ep: _Episode | None, why: str) -> None:
        if ep is None:
            return
        if ep.owner != conn:
            self._taken_over[ep.owner] = conn
            log.warning("connection %d takes the policy over from connection %d (%s)", conn, ep.owner, why)
        else:
            log.info("connection %d: episode %r ended (%s)", conn, ep.prompt, why)
        self.episode = None

    def _start(self, conn, ep, prompt, images, t_start) -> dict[str, Any]:
        self._end(conn, ep, "new episode")
        self._taken_over.pop(conn, None)
        timing: dict[str, float] = {}
        t = time.perf_counter()
        self.policy.reset(prompt)
        timing["reset_ms"] = (time.perf_counter() - t) * 1e3
        ep = self.episode = _Episode(conn, prompt)
        log.info("connection %d: new episode %r", conn, prompt)
        if not images:
            timing["total_ms"] = (time.perf_counter() - t_start) * 1e3
            return {"reset": True, "server_timing": timing}
        return self._infer(ep, {k: v[0] for k, v in images.items()}, False, timing, t_start)

    def _next(self, conn, ep, images, executed, ahead, t_start) -> dict[str, Any]:
        if not ep.pending:  # `{reset, prompt}` without images: the episode's first chunk is still to come
            if ahead or not images or any(v.shape[0] != 1 for v in images.values()):
                raise ProtocolError(f"the episode's first request needs the current images {list(self.cam_keys)} "
                                    "(one frame per camera)")
            return self._infer(ep, {k: v[0] for k, v in images.items()}, False, {}, t_start)
        if ahead and not images:
            if len(ep.pending) != 1:
                raise ProtocolError(f"ahead: {len(ep.pending)} chunks are pending; send the keyframes of chunk "
                                    f"{ep.pending[0].index} with ahead: true")
            return self._infer(ep, {}, True, {}, t_start)
        want_pending = 2 if ahead else 1
        if len(ep.pending) != want_pending:
            raise ProtocolError(f"{len(ep.pending)} chunk(s) pending: " + (
                "send {ahead: true} without images first (lookahead)" if ahead else
                f"send the keyframes of chunk {ep.pending[0].index} with ahead: true"))
        done = ep.pending[0]
        if not images:
            raise ProtocolError(f"request needs the keyframes of chunk {done.index} just executed for "
                                f"{list(self.cam_keys)} (T = {done.num_keyframes})")
        frames = self._keyframes(ep, conn, images)
        if executed is not None:
            executed = self._floats(executed, "executed_actions", self.n_act, rows=done.steps)
        done.set_keyframes(frames, executed)  # executed default: the chunk as sent
        timing: dict[str, float] = {}
        t = time.perf_counter()
        try:
            fb = self.policy.feedback(done)
        except Exception:
            self.episode = None  # the policy state is unknown now: the next request starts over
            raise
        ep.pending.pop(0)
        timing["feedback_ms"] = (time.perf_counter() - t) * 1e3
        timing.update({f"feedback_{k}": v for k, v in fb.items()})
        return self._infer(ep, {}, ahead, timing, t_start)

    def _infer(self, ep: _Episode, obs: dict, ahead: bool, timing: dict, t_start: float) -> dict[str, Any]:
        t = time.perf_counter()
        try:
            inferred: Chunk = self.policy.infer(obs, ahead=True) if ahead else self.policy.infer(obs)
        except Exception:
            self.episode = None
            raise
        timing["infer_ms"] = (time.perf_counter() - t) * 1e3
        timing.update({f"infer_{k}": v for k, v in inferred.timing.items()})
        actions = np.ascontiguousarray(inferred.actions, dtype=np.float32)
        if self.limits is not None:
            actions = np.clip(actions, *self.limits)
        index = ep.next_index
        ep.pending.append(self._chunk(actions, index))
        ep.next_index += 1
        timing["total_ms"] = (time.perf_counter() - t_start) * 1e3
        return {
            "action": actions,
            "chunk": index,
            "first": index == 0,
            "frame_start": int(inferred.frame_start),
            "keyframes_next": ep.pending[0].num_keyframes,
            "server_timing": {k: float(v) for k, v in timing.items()},
        }

    def disconnect(self, conn: int) -> None:
        with self._lock:
            self._taken_over.pop(conn, None)
            if self.episode is not None and self.episode.owner == conn:
                log.info("connection %d closed: its episode ends", conn)
                self.episode = None


class PolicyServer:
    """Websocket transport for an `EpisodeServer` (asyncio; the policy runs on one worker thread).

    Args:
        episodes: the `EpisodeServer` over the policy served.
        host: the address to listen on (anything but localhost should have an `api_key`).
        port: the port to listen on; 0 picks a free one (`self.port` is the bound port once serving).
        api_key: when set, the websocket handshake needs `Authorization: Api-Key <key>` (else 401).
        max_message_bytes: a larger request closes its connection (code 1009).

    Example:
        server = PolicyServer(EpisodeServer(load_policy("so100-grasp")), host="0.0.0.0", api_key=key)
        server.serve_forever()  # `lingbot-edge serve`; or server.start() ... server.stop() on a thread
    """

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

    def _decode_and_handle(self, conn: int, box: list[bytes]) -> dict[str, Any]:
        req = unpackb(box.pop())  # the raw message is freed once decoded (memory per request ~2x its size)
        return self.episodes.handle(conn, req)

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
                    box, msg = [msg], None  # the worker takes the only reference
                    reply = await loop.run_in_executor(self._executor, self._decode_and_handle, conn, box)
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
        """Serve on this thread until interrupted (KeyboardInterrupt), then drop the policy's worker."""
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
        """Stop a server started with `start()` (waits up to `timeout` s for its thread)."""
        if self._loop is not None and self._stopped is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._stopped.set)
        if self._thread is not None:
            self._thread.join(timeout)
        self._executor.shutdown(wait=False, cancel_futures=True)
