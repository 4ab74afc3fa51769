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
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from lingbot_edge.core.config import ModelConfig
from lingbot_edge.core.model import WanVATransformer
from lingbot_edge.io.files import check_output_folder, read_json, refuse_temp_path, write_folder

log = logging.getLogger(__name__)

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
INDEX_SUFFIX = ".safetensors.index.json"
QUANTIZED_MANIFEST = "quantization.json"  # lingbot_edge.io.quantized: its manifest and payload names
QUANTIZED_WEIGHT_SUFFIX = ".weight_qdata"


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
    refuse_temp_path(folder, error)
    files = _weight_files(folder, what, error)
    if any(name.endswith(QUANTIZED_WEIGHT_SUFFIX) for name in files):
        if (folder / QUANTIZED_MANIFEST).is_file():
            raise error(f"{folder}: a quantized checkpoint (has {QUANTIZED_MANIFEST}): load it with "
                        "lingbot_edge.io.quantized.load_quantized (or as load_policy's transformer=)")
        raise error(f"{folder}: holds quantized weights (*{QUANTIZED_WEIGHT_SUFFIX}) but no {QUANTIZED_MANIFEST}: "
                    "the manifest of this `lingbot-edge quantize` folder is missing (restore it, or quantize again)")
    return files


def _weight_files(folder: Path, what: str, error: type[Exception]) -> dict[str, Path]:
    indexes = sorted(folder.glob(f"*{INDEX_SUFFIX}"))
    if indexes:
        index = indexes[0]
        weight_map = read_json(index, "a 'weight_map' of tensor name -> shard file", error=error).get("weight_map")
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


def read_model_config(path: str | Path) -> ModelConfig:
    """A transformer config.json (diffusers-style) -> ModelConfig; errors name the file."""
    path = Path(path)
    return ModelConfig.from_dict(read_json(path, "the transformer config"), source=str(path))


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
    cfg = read_model_config(folder / "config.json")
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


def is_transformer_folder(folder: Path) -> bool:
    """Only what `save_transformer` writes: config.json + the weights (one file, or an index + shards)."""
    names = {p.name for p in folder.iterdir()}
    weights = {n for n in names if n.startswith(WEIGHTS_NAME.removesuffix(".safetensors"))
               and (n.endswith(".safetensors") or n.endswith(INDEX_SUFFIX))}
    return "config.json" in names and bool(weights) and names == {"config.json"} | weights


def save_transformer(model: WanVATransformer, folder: str | Path, max_shard_bytes: int | None = None, *,
                     replace: bool = False, inputs: Sequence[str | Path] = ()) -> Path:
    """Write `folder` (config.json + safetensors, sharded above max_shard_bytes) atomically.

    `folder` must be absent or empty, or (with `replace`) a transformer folder; never one of `inputs`."""
    from safetensors.torch import save_file

    folder = Path(folder)
    check_output_folder(folder, ours=is_transformer_folder, what="a transformer/ checkpoint folder",
                        replace=replace, inputs=inputs, replace_hint="pass replace=True to replace it")
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}

    def fill(tmp: Path) -> None:
        (tmp / "config.json").write_text(json.dumps(model.config.to_dict(), indent=2))
        shards = shard_state(state, max_shard_bytes)
        if len(shards) == 1:
            save_file(shards[0], str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
            return
        stem = WEIGHTS_NAME.removesuffix(".safetensors")
        weight_map = {}
        for i, shard in enumerate(shards):
            fname = f"{stem}-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(tmp / fname), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(shard, fname))
        total = sum(v.numel() * v.element_size() for v in state.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (tmp / (WEIGHTS_NAME + ".index.json")).write_text(json.dumps(index, indent=2))

    return write_folder(folder, fill)


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
