"""`RemotePolicy`: the `lingbot-edge/1` protocol (docs/serving.md) behind `core.protocols.Policy`.

`run-so100 --policy ws://HOST:PORT` drives any arm (sim, MuJoCo, LeRobot) from a policy on a GPU box with
the same loop as a local policy: `reset(prompt)`, `infer(obs[, ahead]) -> episode.Chunk`,
`feedback(chunk)`, and lookahead when the server supports it (`feedback(k)` only keeps chunk k's keyframes;
they travel with the next `infer`, so one round trip per chunk). Frames are resized here to the policy's
`image_size` before sending (`frames.resize_frames`, the server's own resize), so a chunk's request is
T x cameras x H x W x 3 bytes, not full camera frames, or one JPEG per frame with `jpeg_quality`
(so100 preset: 16 keyframes x 3 cameras x 96x128 = 1.77 MB raw per chunk); `request_bytes` keeps each
request's size.

Every call has a timeout. A server that is dead (connection refused / closed), absent or frozen (no reply
in time) raises `robot.control.PolicyUnavailableError`: the loop then holds the arm until the run ends.
After a timeout the connection is dropped at once (a late reply would otherwise answer the next request),
and `close` waits at most `CLOSE_TIMEOUT_S` for the server's side of the closing handshake, so a frozen
server cannot delay the end of a run.
"""

from __future__ import annotations

import contextlib
import logging
import socket
from collections.abc import Mapping
from types import SimpleNamespace
from typing import Any

import numpy as np

from lingbot_edge.core.episode import Chunk
from lingbot_edge.robot.control import PolicyUnavailableError
from lingbot_edge.serve.frames import check_float_image, encode_jpeg, resize_frames
from lingbot_edge.serve.msgpack_numpy import packb, unpackb

log = logging.getLogger(__name__)

CLOSE_TIMEOUT_S = 0.25  # the closing handshake; a server that does not answer it in time is just cut off


class RemotePolicy:
    """Client of `lingbot-edge serve`: a `core.protocols.Policy` for `robot.control.AsyncController`.

    Connects at once and reads the server's metadata into `metadata`, `cfg` (the preset's name, cameras,
    image size, chunk geometry) and `supports_lookahead`.

    Args:
        address: `ws://HOST:PORT` (or `wss://`; a bare `HOST:PORT` means ws).
        api_key: sent as `Authorization: Api-Key <key>` (a server started with `--api-key` needs it).
        timeout: seconds to wait for each reply (a frozen server past it is unavailable).
        first_timeout: the same for an episode's first chunk (the server may still be compiling).
        connect_timeout: seconds for the handshake and the metadata.
        jpeg_quality: send each frame as one JPEG of this quality (1-100); None or 0: raw uint8 frames.

    Raises:
        PolicyUnavailableError: the server cannot be reached or refuses the handshake (e.g. a wrong key).

    Example:
        policy = RemotePolicy("ws://gpu-box:8000", api_key=key, jpeg_quality=90)
        log = AsyncController(robot, policy, "pick up the cube").run(duration_s=30)
        policy.close()
    """

    def __init__(self, address: str, api_key: str | None = None, timeout: float = 5.0, first_timeout: float = 60.0,
                 connect_timeout: float = 10.0, jpeg_quality: int | None = None):
        self.uri = address if address.startswith(("ws://", "wss://")) else f"ws://{address}"
        self.timeout, self.first_timeout = timeout, first_timeout
        self.jpeg_quality = jpeg_quality or None  # None / 0: raw uint8 frames
        self.request_bytes: list[int] = []  # every request
        self.feedback_bytes: list[int] = []  # the requests carrying a chunk's keyframes
        self._exit = contextlib.ExitStack()
        headers = {"Authorization": f"Api-Key {api_key}"} if api_key else None
        try:
            from websockets.sync.client import connect

            self.ws = self._exit.enter_context(connect(
                self.uri, compression=None, max_size=None, additional_headers=headers, open_timeout=connect_timeout,
                close_timeout=CLOSE_TIMEOUT_S))
            self.metadata = unpackb(self.ws.recv(timeout=connect_timeout))
        except (OSError, TimeoutError) as e:
            self._exit.close()
            raise PolicyUnavailableError(f"policy server {self.uri}: cannot connect ({type(e).__name__}: {e})") from e
        except Exception as e:  # websockets' handshake errors (InvalidStatus 401, InvalidURI, ...)
            self._exit.close()
            raise PolicyUnavailableError(f"policy server {self.uri}: {type(e).__name__}: {e}") from e
        m = self.metadata
        self.cfg = SimpleNamespace(name=m["preset"], obs_cam_keys=tuple(m["camera_keys"]), height=m["image_size"][0],
                                   width=m["image_size"][1], keyframe_stride=m["keyframe_stride"],
                                   action_per_frame=m["action_per_frame"], frame_chunk_size=m["frame_chunk_size"],
                                   used_action_channel_ids=tuple(range(m["action_dim"])),
                                   async_mode=m.get("async_mode", "naive"))  # servers without the key: naive
        self.supports_lookahead = bool(m.get("supports_lookahead", False))
        # The wire protocol carries keyframes of fed-back chunks only: a lookahead request goes out at the
        # executing chunk's start (the server's policy grounds it on the history alone).
        self.takes_executing_keyframes = False
        self.prompt: str | None = None
        self._done: Chunk | None = None  # the executed chunk whose keyframes go with the next infer

    def _call(self, req: dict, timeout: float) -> dict:
        data = packb(req)
        self.request_bytes.append(len(data))
        import websockets

        try:
            self.ws.send(data)
            reply = self.ws.recv(timeout=timeout)
        except TimeoutError as e:
            self.cancel()  # the connection is unusable now: its late reply would answer the next request
            raise PolicyUnavailableError(f"policy server {self.uri}: no reply within {timeout:g} s") from e
        except (websockets.ConnectionClosed, OSError) as e:
            raise PolicyUnavailableError(f"policy server {self.uri}: connection lost ({type(e).__name__}: {e})") from e
        if isinstance(reply, str):
            if reply.startswith("internal error"):
                raise PolicyUnavailableError(f"policy server {self.uri}: {reply}")
            raise RuntimeError(f"policy server {self.uri} refused the request: {reply}")
        return unpackb(reply)

    def _frames(self, frames: Mapping[str, np.ndarray]) -> dict[str, Any]:
        frames = {k: np.asarray(v) for k, v in frames.items()}
        for k, v in frames.items():
            if v.dtype.kind == "f":  # refused here as the server would (0..1 floats would go out as black)
                check_float_image(v, k)
        out = {k: resize_frames(v, self.cfg.height, self.cfg.width) for k, v in frames.items()}
        if self.jpeg_quality is not None:
            out = {k: encode_jpeg(v, self.jpeg_quality) for k, v in out.items()}
        return out

    def reset(self, prompt: str) -> None:
        """Start an episode with `prompt` on the server (ends the one going on there)."""
        self.prompt, self._done = prompt, None
        self._call({"reset": True, "prompt": prompt}, self.timeout)

    def infer(self, obs: Mapping[str, Any], ahead: bool = False) -> Chunk:
        """The next chunk, in one round trip that also carries the keyframes of the chunk last given to
        `feedback`.

        Args:
            obs: for the episode's first chunk, one frame per camera ({camera key: H x W x 3 uint8});
                ignored once a chunk was fed back.
            ahead: infer the chunk after the pending one (needs `supports_lookahead`).

        Returns:
            The server's chunk as an `episode.Chunk` (`timing` holds the server's timings).

        Raises:
            PolicyUnavailableError: no reply in time, connection lost, or a failure inside the server's policy.
            RuntimeError: the server refused the request (`error: ...`).
        """
        req: dict[str, Any] = {"prompt": self.prompt}
        if ahead:
            req["ahead"] = True
        if self._done is not None:
            frames, executed = self._done.feedback_inputs()
            req.update(self._frames(frames))
            req["executed_actions"] = np.asarray(executed, dtype=np.float32)
            self._done = None
        else:
            req.update(self._frames({k: obs[k] for k in self.cfg.obs_cam_keys if k in obs}))
        first = not ahead and "executed_actions" not in req
        r = self._call(req, self.first_timeout if first else self.timeout)
        if "executed_actions" in req:
            self.feedback_bytes.append(self.request_bytes[-1])
        return Chunk(r["action"], index=int(r["chunk"]), first=bool(r.get("first", r["chunk"] == 0)),
                     keyframe_stride=self.cfg.keyframe_stride, cameras=self.cfg.obs_cam_keys,
                     frame_start=int(r.get("frame_start", 0)), timing=r.get("server_timing", {}))

    def feedback(self, chunk: Chunk) -> dict[str, float]:
        """Keep the executed `chunk`: its keyframes and executed actions go with the next `infer`.
        Returns {} (nothing ran yet); raises at once if a step or keyframe is missing."""
        chunk.feedback_inputs()  # raises now, on the loop's side, if a step or keyframe is missing
        self._done = chunk
        return {}

    def cancel(self) -> None:
        """Drop the connection: a call waiting on a frozen server (in another thread) raises
        PolicyUnavailableError at once, and so does every later call."""
        with contextlib.suppress(OSError):
            self.ws.socket.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        """Close the connection (the server ends this client's episode)."""
        with contextlib.suppress(Exception):
            self._exit.close()
