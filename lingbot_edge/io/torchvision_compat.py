"""Keep a broken torchvision from breaking `import transformers` / `diffusers` / `lerobot`.

Next to the CPU torch wheel, `pip install lerobot` brings a CUDA build of torchvision whose C++
ops library cannot load. torchvision then dies at import time (`operator torchvision::nms does
not exist`: its fake-tensor registrations need the op), and since transformers, diffusers and
LeRobot import torchvision whenever it is installed, they all fail too.

`ensure_torchvision_importable()` imports torchvision; only if that fails with exactly this error
does it define the two ops torchvision's import needs (`nms` with a small CPU kernel, `qnms` as a
schema only), drop the half-imported modules and import again. A working torchvision is never
touched. Call it before anything imports torchvision (the LeRobot adapter does); doing it here in
the package, not in a sitecustomize, keeps torch out of every interpreter start.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import sys
import threading

import torch
from torch import Tensor

log = logging.getLogger(__name__)

_LOCK = threading.Lock()
_STATE: dict[str, object] = {}  # "lib": the torch.library fragment (must stay alive), "done": bool

_MISSING_OP = "torchvision::nms"


def nms_cpu(boxes: Tensor, scores: Tensor, iou_threshold: float) -> Tensor:
    """Greedy non-maximum suppression (torchvision semantics): kept indices by decreasing score.

    Boxes are (x1, y1, x2, y2); a box is dropped when its IoU with a kept higher-scoring box is
    greater than `iou_threshold`.
    """
    if boxes.numel() == 0:
        return torch.empty(0, dtype=torch.long, device=boxes.device)
    boxes = boxes.float()
    x1, y1, x2, y2 = boxes.unbind(1)
    areas = (x2 - x1) * (y2 - y1)
    order = torch.argsort(scores.float(), descending=True, stable=True)
    suppressed = torch.zeros(boxes.shape[0], dtype=torch.bool, device=boxes.device)
    keep = []
    for i in order.tolist():
        if suppressed[i]:
            continue
        keep.append(i)
        w = (torch.minimum(x2[i], x2) - torch.maximum(x1[i], x1)).clamp(min=0)
        h = (torch.minimum(y2[i], y2) - torch.maximum(y1[i], y1)).clamp(min=0)
        inter = w * h
        iou = inter / (areas[i] + areas - inter)
        suppressed |= iou > iou_threshold
    return torch.tensor(keep, dtype=torch.long, device=boxes.device)


def _purge_torchvision_modules() -> None:
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]


def _register_fallback_ops() -> None:
    lib = torch.library.Library("torchvision", "FRAGMENT")
    lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    lib.impl("nms", nms_cpu, "CPU")
    _STATE["lib"] = lib


def fallback_installed() -> bool:
    """True when this process runs torchvision on the CPU fallback ops."""
    return "lib" in _STATE


def ensure_torchvision_importable() -> bool:
    """Make `import torchvision` work; returns True if the CPU fallback ops had to be registered.

    No-op when torchvision is not installed or already imported. Other import errors propagate.
    torchvision's own `torchvision.ops.*` wrappers still report their C++ ops as missing (they
    check a flag set at load time); `torch.ops.torchvision.nms` runs the CPU kernel above.
    """
    with _LOCK:
        if _STATE.get("done"):
            return fallback_installed()
        if "torchvision" in sys.modules or importlib.util.find_spec("torchvision") is None:
            _STATE["done"] = True
            return False
        try:
            importlib.import_module("torchvision")
        except RuntimeError as e:
            if _MISSING_OP not in str(e):
                raise
            _purge_torchvision_modules()
            _register_fallback_ops()
            importlib.import_module("torchvision")
            log.warning(
                "torchvision %s has no loadable C++ ops for torch %s (a CUDA build next to CPU torch?): "
                "registered a CPU fallback for torchvision::nms so that transformers / diffusers / lerobot import",
                sys.modules["torchvision"].__version__, torch.__version__,
            )
        _STATE["done"] = True
        return fallback_installed()
