"""msgpack with NumPy arrays: the openpi wire encoding that SO-100 / LeRobot clients already speak.

An array travels as a map `{b"__ndarray__": True, b"data": <raw bytes>, b"dtype": "<f4", b"shape": [..]}`
(numpy scalars as `{b"__npgeneric__": True, b"data": <python value>, b"dtype": ..}`). Unlike
pickle-based schemes, decoding never executes code: object, void and complex dtypes are refused on
both sides (an object array would need pickle), and a map that claims a shape its bytes cannot fill
is an error, not a read past the buffer. Decoded arrays own a writable copy of their bytes.
"""

from __future__ import annotations

import math
from typing import Any

import msgpack
import numpy as np

__all__ = ["DecodeError", "Packer", "pack_array", "packb", "unpack_array", "unpackb"]

_REFUSED_KINDS = ("O", "V", "c")  # object (pickle), void/structured, complex
_MAX_NDIM = 32


class DecodeError(ValueError):
    """The message is not valid msgpack-numpy (the text says which part and why)."""


def _check_dtype(dtype: np.dtype) -> None:
    if dtype.kind in _REFUSED_KINDS or dtype.hasobject:
        raise DecodeError(f"unsupported dtype {dtype.str!r}: object, void and complex arrays are refused")


def pack_array(obj: Any) -> Any:
    """msgpack `default` hook: numpy arrays / scalars -> maps; anything else msgpack cannot pack -> TypeError."""
    if isinstance(obj, np.ndarray | np.generic) and (obj.dtype.kind in _REFUSED_KINDS or obj.dtype.hasobject):
        raise ValueError(f"unsupported dtype {obj.dtype.str!r}: object, void and complex arrays cannot be sent")
    if isinstance(obj, np.ndarray):
        return {
            b"__ndarray__": True,
            b"data": np.ascontiguousarray(obj).tobytes(),
            b"dtype": obj.dtype.str,
            b"shape": list(obj.shape),
        }
    if isinstance(obj, np.generic):
        return {b"__npgeneric__": True, b"data": obj.item(), b"dtype": obj.dtype.str}
    raise TypeError(f"cannot serialize {type(obj).__name__}")


def _get(obj: dict, key: str) -> Any:
    # Upstream writes bytes keys; accept str keys too (e.g. clients in other languages).
    if key.encode() in obj:
        return obj[key.encode()]
    if key in obj:
        return obj[key]
    raise DecodeError(f"array map without {key!r}")


def _dtype(obj: dict) -> np.dtype:
    raw = _get(obj, "dtype")
    if isinstance(raw, bytes):
        raw = raw.decode("ascii", "replace")
    if not isinstance(raw, str):
        raise DecodeError(f"dtype: expected a string like '<f4', got {type(raw).__name__}")
    try:
        dtype = np.dtype(raw)
    except (TypeError, ValueError) as e:
        raise DecodeError(f"dtype: {raw!r} is not a numpy dtype") from e
    _check_dtype(dtype)
    return dtype


def unpack_array(obj: dict) -> Any:
    """msgpack `object_hook`: array maps -> numpy; other maps unchanged."""
    if obj.get(b"__ndarray__", obj.get("__ndarray__")) is True:
        dtype = _dtype(obj)
        shape = _get(obj, "shape")
        data = _get(obj, "data")
        if not isinstance(shape, list | tuple) or len(shape) > _MAX_NDIM or not all(
            isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape
        ):
            raise DecodeError(f"shape: expected a list of non-negative ints, got {shape!r}")
        if not isinstance(data, bytes):
            raise DecodeError(f"data: expected bytes, got {type(data).__name__}")
        expected = math.prod(shape) * dtype.itemsize
        if len(data) != expected:
            raise DecodeError(
                f"data: {len(data)} bytes do not match shape {list(shape)} of dtype {dtype.str} ({expected} bytes)"
            )
        return np.frombuffer(bytearray(data), dtype=dtype).reshape(shape)  # writable (torch.from_numpy)
    if obj.get(b"__npgeneric__", obj.get("__npgeneric__")) is True:
        dtype = _dtype(obj)
        try:
            return dtype.type(_get(obj, "data"))
        except (TypeError, ValueError, OverflowError) as e:
            raise DecodeError(f"numpy scalar of dtype {dtype.str}: {e}") from e
    return obj


def Packer(**kwargs) -> msgpack.Packer:  # noqa: N802 (mirrors msgpack.Packer / upstream's partial)
    return msgpack.Packer(default=pack_array, **kwargs)


def packb(obj: Any, **kwargs) -> bytes:
    return msgpack.packb(obj, default=pack_array, **kwargs)


def unpackb(data: bytes, **kwargs) -> Any:
    """Decode one message; every failure (bad msgpack, bad array map) is a `DecodeError`."""
    try:
        return msgpack.unpackb(data, object_hook=unpack_array, **kwargs)
    except DecodeError:
        raise
    except (ValueError, TypeError, msgpack.exceptions.ExtraData, msgpack.exceptions.UnpackException,
            RecursionError) as e:
        raise DecodeError(f"not a valid msgpack message ({type(e).__name__}: {e})") from e
