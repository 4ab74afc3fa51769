"""Load / save the DiT in upstream's `transformer/` folder layout.

    transformer/config.json                                   (diffusers-style config)
    transformer/diffusion_pytorch_model.safetensors           (single file), or
    transformer/diffusion_pytorch_model.safetensors.index.json + shards

The model is built on the meta device and each tensor is read from safetensors straight into
the target dtype and device, one at a time: a full fp32 (or even full bf16 CPU) copy of the
model never exists.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

from lingbot_edge.core.config import ModelConfig
from lingbot_edge.core.model import WanVATransformer

log = logging.getLogger(__name__)

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
INDEX_SUFFIX = ".safetensors.index.json"


def build_model(cfg: ModelConfig, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                seed: int | None = 0) -> WanVATransformer:
    """A randomly initialised model (tests, the tiny demo, full-size memory/speed runs).

    Built on the meta device; every parameter is then drawn in fp32 into one reused scratch buffer, in
    the constructor's RNG order, and copied into its own tensor in `dtype` on `device`: the same values
    as `WanVATransformer(cfg).to(dtype)`, with a peak of the model in `dtype` plus one fp32 layer."""
    model = build_meta_model(cfg)
    device = torch.device(device)
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    scratch = torch.empty(largest, device=device)
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        _materialise(model, scratch, dtype)
    return model


def _materialise(module: nn.Module, scratch: torch.Tensor, dtype: torch.dtype) -> None:
    """Post-order, like construction: a module's children are initialised before its own parameters."""
    for child in module.children():
        _materialise(child, scratch, dtype)
    own = dict(module.named_parameters(recurse=False))
    if not own:
        return
    draws, offset = {}, 0
    for name, p in own.items():  # fp32 views of the scratch buffer, one per parameter
        draws[name] = scratch[offset:offset + p.numel()].view(p.shape)
        offset += p.numel()
    if hasattr(module, "reset_parameters") and not list(module.children()):  # Linear / LayerNorm / RMSNorm
        fresh = copy.deepcopy(module)  # still on meta: free
        for name, view in draws.items():
            setattr(fresh, name, nn.Parameter(view, requires_grad=False))
        with torch.no_grad():
            fresh.reset_parameters()  # torch's own init, in fp32
    elif set(own) == {"scale_shift_table"}:  # the modulation tables: torch.randn(...) / dim ** 0.5
        view = draws["scale_shift_table"]
        view.normal_().div_(view.shape[-1] ** 0.5)
    else:
        raise TypeError(f"build_model: no initialisation rule for {type(module).__name__} parameters {sorted(own)}")
    for name, view in draws.items():
        value = torch.empty(view.shape, dtype=dtype, device=scratch.device).copy_(view)
        setattr(module, name, nn.Parameter(value, requires_grad=False))


def build_meta_model(cfg: ModelConfig) -> WanVATransformer:
    """Shapes only, no memory: for loading and for byte counts of the full model."""
    with torch.device("meta"):
        return WanVATransformer(cfg).eval().requires_grad_(False)


def weight_files(folder: Path, what: str = f"{WEIGHTS_NAME} or a sharded index",
                 error: type[Exception] = ValueError) -> dict[str, Path]:
    """Map every tensor name to the safetensors file holding it (a single file, or an index +
    shards); reads headers only. Problems raise `error` naming the file and `what` was expected."""
    indexes = sorted(folder.glob(f"*{INDEX_SUFFIX}"))
    if indexes:
        index = indexes[0]
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise error(f"{index}: expected a JSON object with a 'weight_map' of tensor name -> shard file") from e
        if not isinstance(weight_map, dict) or not weight_map:
            raise error(f"{index}: expected a non-empty 'weight_map' of tensor name -> shard file")
        files = {name: folder / fname for name, fname in weight_map.items()}
        missing = sorted({p.name for p in files.values() if not p.is_file()})
        if missing:
            raise error(f"{index}: shard files missing: {missing} (expected {what})")
        return files
    singles = sorted(folder.glob("*.safetensors"))
    if not singles:
        raise error(f"{folder}: no *.safetensors weights (expected {what})")
    if len(singles) > 1:
        raise error(f"{folder}: several .safetensors files {[p.name for p in singles]} but no *{INDEX_SUFFIX} "
                    f"to map tensors to them (expected {what})")
    return tensor_files(singles[0], error)


def tensor_files(path: Path, error: type[Exception] = ValueError) -> dict[str, Path]:
    """Every tensor name of one safetensors file -> that file (headers only)."""
    with open_safetensors(path, error) as f:
        return dict.fromkeys(f.keys(), path)


def load_transformer(
    folder: str | Path,
    dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device = "cpu",
    prefix: str = "",
) -> WanVATransformer:
    """Load a LingBot-VA DiT from a `transformer/` folder (or a checkpoint root containing one).

    `prefix` strips a key prefix (LeRobot-converted policies store `transformer.` keys).
    """
    folder = Path(folder)
    if (folder / "transformer").is_dir() and not (folder / "config.json").is_file():
        folder = folder / "transformer"
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder}: no config.json (expected upstream's transformer/ layout)")
    cfg = ModelConfig.from_json(folder / "config.json")
    files = {k[len(prefix):]: p for k, p in weight_files(folder).items() if k.startswith(prefix)}

    model = build_meta_model(cfg)
    expected = dict(model.named_parameters())
    missing = sorted(set(expected) - set(files))
    unexpected = sorted(set(files) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"{folder}: checkpoint keys do not match the LingBot-VA transformer: "
            f"missing {missing[:8]}{'...' if len(missing) > 8 else ''}, "
            f"unexpected {unexpected[:8]}{'...' if len(unexpected) > 8 else ''}"
        )

    by_file: dict[Path, list[str]] = {}
    for name, path in files.items():
        by_file.setdefault(path, []).append(name)
    # Check every shape from the headers first, so a bad file fails before any device memory is used.
    for path, names in by_file.items():
        with open_safetensors(path) as f:
            for name in names:
                shape = tuple(f.get_slice(prefix + name).get_shape())
                if shape != tuple(expected[name].shape):
                    raise ValueError(f"{path}: {name} has shape {shape}, expected {tuple(expected[name].shape)}")
    for path, names in by_file.items():
        with open_safetensors(path) as f:
            for name in names:
                _set_param(model, name, f.get_tensor(prefix + name).to(device=device, dtype=dtype))
    log.info("loaded %s (%d tensors) as %s on %s", folder, len(files), dtype, device)
    return model


@contextlib.contextmanager
def open_safetensors(path: Path, error: type[Exception] = ValueError):
    """`safe_open` on the CPU; a damaged file raises `error` naming it."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            yield f
    except (SafetensorError, OSError) as e:
        raise error(f"{path}: unreadable safetensors file ({e}); expected a complete safetensors file "
                    "(truncated download?)") from e


def _set_param(model: nn.Module, name: str, value: torch.Tensor) -> None:
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name)
    setattr(module, attr, nn.Parameter(value, requires_grad=False))


def save_transformer(model: WanVATransformer, folder: str | Path, max_shard_bytes: int | None = None) -> Path:
    """Write `folder` (config.json + safetensors, sharded above max_shard_bytes) atomically."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        (tmp / "config.json").write_text(json.dumps(model.config.to_dict(), indent=2))
        state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
        shards = shard_state(state, max_shard_bytes)
        if len(shards) == 1:
            save_file(shards[0], str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        else:
            stem = WEIGHTS_NAME.removesuffix(".safetensors")
            weight_map = {}
            for i, shard in enumerate(shards):
                fname = f"{stem}-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                save_file(shard, str(tmp / fname), metadata={"format": "pt"})
                weight_map.update(dict.fromkeys(shard, fname))
            total = sum(v.numel() * v.element_size() for v in state.values())
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (tmp / (WEIGHTS_NAME + ".index.json")).write_text(json.dumps(index, indent=2))
        chmod_like_new_files(tmp)
        replace_dir(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def shard_state(state: dict[str, torch.Tensor], max_shard_bytes: int | None) -> list[dict[str, torch.Tensor]]:
    """Split a state dict, in order, into shards of at most max_shard_bytes (None: one shard)."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for k, v in state.items():
        nbytes = v.numel() * v.element_size()
        if max_shard_bytes and shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = v
        size += nbytes
    return shards


def chmod_like_new_files(folder: Path) -> None:
    """mkdtemp makes a private (0700) folder: give it and its files the modes the umask allows."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for p in folder.iterdir():
        p.chmod(0o666 & ~umask)


def replace_dir(tmp: Path, folder: Path) -> None:
    """Move tmp to folder; an existing folder is swapped out first and removed only on success."""
    old = None
    if folder.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{folder.name}.old.", dir=folder.parent))
        os.replace(folder, old / folder.name)
    try:
        os.replace(tmp, folder)
    except BaseException:
        if old is not None:
            os.replace(old / folder.name, folder)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
