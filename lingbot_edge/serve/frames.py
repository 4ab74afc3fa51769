"""Camera frames to the policy's size, the same way on the arm side (before sending) and on the server.

Bilinear with `align_corners=False` and no antialiasing, i.e. `torch.nn.functional.interpolate(...,
mode="bilinear")` as `io.encoders.VAEObservationEncoder` does it, so a frame resized here is not resized again
by the encoder (the only difference is the rounding back to uint8). Computed with numpy gathers of the
2 x 2 source pixels each output pixel needs: no float copy of the input ever exists, so a request's
memory stays within its size whatever T and the camera resolution are, and the arm side needs no torch.
"""

from __future__ import annotations

import numpy as np

__all__ = ["check_float_image", "decode_images", "encode_jpeg", "resize_frames"]


def check_float_image(frames: np.ndarray, name: str) -> None:
    """Float images are accepted when already scaled to 0..255 (clients that send `255 * img`). One whose
    largest value is in (0, 1] is refused: it is almost surely scaled to 0..1, which read as 0..255 is a
    black image the policy would act on without any error. (All zeros is black either way: accepted.)

    Raises:
        ValueError: naming `name`: values not finite, outside 0..255, or scaled to 0..1.
    """
    lo, hi = (float(frames.min()), float(frames.max())) if frames.size else (0.0, 0.0)
    if not (np.isfinite(lo) and np.isfinite(hi)) or lo < 0.0 or hi > 255.0:
        raise ValueError(f"{name}: float images must be finite and in 0..255 (send uint8, or 255 * img), got "
                         f"{lo:g}..{hi:g}")
    if 0.0 < hi <= 1.0:
        raise ValueError(f"{name}: float image with values in {lo:g}..{hi:g} looks scaled to 0..1; images are "
                         "read as 0..255, so send uint8, or 255 * img")


def _taps(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Source indices (i0, i1) and the weight of i1 per output index, torch's bilinear rule."""
    src = np.maximum((np.arange(n_out, dtype=np.float64) + 0.5) * (n_in / n_out) - 0.5, 0.0)
    i0 = np.minimum(src.astype(np.intp), n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    return i0, i1, (src - i0).astype(np.float32)


def resize_frames(frames: np.ndarray, height: int, width: int) -> np.ndarray:
    """uint8 (or float 0..255) [H, W, 3] or [T, H, W, 3] -> the same rank at (height, width), uint8.
    uint8 frames already at that size are returned as they are."""
    if frames.shape[-3:-1] == (height, width):
        return frames if frames.dtype == np.uint8 else np.rint(frames).clip(0, 255).astype(np.uint8)
    y0, y1, wy = _taps(frames.shape[-3], height)
    x0, x1, wx = _taps(frames.shape[-2], width)
    wy, wx = wy[:, None, None], wx[None, :, None]
    top, bottom = frames[..., y0, :, :], frames[..., y1, :, :]  # [.., height, W, 3]: only the rows needed
    upper = top[..., x0, :].astype(np.float32) * (1 - wx) + top[..., x1, :] * wx
    lower = bottom[..., x0, :].astype(np.float32) * (1 - wx) + bottom[..., x1, :] * wx
    out = upper * (1 - wy) + lower * wy
    return np.rint(out, out=out).clip(0, 255).astype(np.uint8)


def encode_jpeg(frames: np.ndarray, quality: int) -> list[bytes]:
    """uint8 [T, H, W, 3] (or [H, W, 3]) -> one JPEG per frame (Pillow), the protocol's compressed form."""
    from io import BytesIO

    from PIL import Image

    out = []
    for frame in frames.reshape(-1, *frames.shape[-3:]):
        buf = BytesIO()
        Image.fromarray(np.ascontiguousarray(frame), "RGB").save(buf, format="JPEG", quality=int(quality))
        out.append(buf.getvalue())
    return out


def decode_images(encoded, name: str, height: int, width: int, max_side: int) -> np.ndarray:
    """A list of JPEG / PNG frames -> uint8 [T, height, width, 3]. Each frame's header is checked before it
    is decoded (sides <= max_side) and it is resized at once, so one full-size frame exists at a time."""
    from io import BytesIO

    from PIL import Image, UnidentifiedImageError

    out = np.empty((len(encoded), height, width, 3), dtype=np.uint8)
    for t, data in enumerate(encoded):
        if not isinstance(data, bytes):
            raise ValueError(f"{name}[{t}]: expected JPEG or PNG bytes, got {type(data).__name__}")
        try:
            img = Image.open(BytesIO(data))
            if img.format not in ("JPEG", "PNG") or max(img.size) > max_side:
                raise ValueError(f"{name}[{t}]: expected a JPEG or PNG with sides <= {max_side}, got {img.format} "
                                 f"{img.size[0]}x{img.size[1]}")
            if img.format == "JPEG":
                img.draft("RGB", (width, height))  # decode at a reduced scale when the frame is much bigger
            frame = np.asarray(img.convert("RGB"))
        except (UnidentifiedImageError, OSError) as e:
            raise ValueError(f"{name}[{t}]: not a valid JPEG or PNG ({e})") from e
        out[t] = resize_frames(frame, height, width)
    return out
