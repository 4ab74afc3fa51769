"""Device memory as the loaders report it (`load_policy`'s `load_report`, the prompt cache's `memory_report`)."""

from __future__ import annotations

import torch


def gpu_memory(device: torch.device | str | None) -> dict[str, int | None]:
    """`torch.cuda.memory_allocated` / `memory_reserved` of `device` in bytes; None off CUDA."""
    device = torch.device(device) if device is not None else None
    if device is None or device.type != "cuda" or not torch.cuda.is_available():
        return {"allocated": None, "reserved": None}
    return {"allocated": torch.cuda.memory_allocated(device), "reserved": torch.cuda.memory_reserved(device)}
