"""Camera frames to the policy's size, the same way on the arm side (before sending) and on the server.

Bilinear, `align_corners=False`, like `io.frozen.ObservationEncoder`, so a frame resized here is not
resized again by the encoder (the only difference is the rounding back to uint8). Each channel of each
frame is converted to float on its own: the float copy never exceeds 4/9 of one 3-camera frame set,
whatever T and the input size are (the server's memory bound per request).
"""

from __future__ import annotations

import numpy as np

__all__ = ["check_float_image", "resize_frames"]


def check_float_image(frames: np.ndarray, name: str) -> None:
    """Float images are accepted when already scaled to 0..255 (clients that send `255 * img`)."""
    lo, hi = (float(frames.min()), float(frames.max())) if frames.size else (0.0, 0.0)
    if not (np.isfinite(lo) and np.isfinite(hi)) or lo < 0.0 or hi > 255.0:
        raise ValueError(f"{name}: float images must be finite and in 0..255 (send 255 * img), got {lo}..{hi}")


def resize_frames(frames: np.ndarray, height: int, width: int) -> np.ndarray:
    """uint8 (or float 0..255) [H, W, 3] or [T, H, W, 3] -> the same rank at (height, width), uint8.
    uint8 frames already at that size are returned as they are."""
    if frames.shape[-3:-1] == (height, width):
        return frames if frames.dtype == np.uint8 else np.rint(frames).clip(0, 255).astype(np.uint8)
    import torch
    import torch.nn.functional as F

    single = frames.ndim == 3
    src = frames[None] if single else frames
    out = np.empty((src.shape[0], height, width, src.shape[-1]), dtype=np.uint8)
    for t in range(src.shape[0]):
        for c in range(src.shape[-1]):
            x = torch.from_numpy(np.ascontiguousarray(src[t, :, :, c])).float()[None, None]
            y = F.interpolate(x, size=(height, width), mode="bilinear", align_corners=False)
            out[t, :, :, c] = y[0, 0].round_().clamp_(0, 255).to(torch.uint8).numpy()
    return out[0] if single else out
