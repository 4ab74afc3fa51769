"""Quantized DiT: the checkpoint format and its loader (the module itself: `lingbot_edge.core.qlinear`).

The runtime owns the format. `quantize/` (offline, imports torchao / optimum-quanto / bitsandbytes)
produces `QuantizedLinear` modules and calls `save_quantized`; a robot needs only this module and
torch to load and run the result. Every backend's weights are stored as plain tensors (int8 or
float8 data plus one fp32 scale per output channel) and computed by the small kernels below, which
compile with `torch.compile(fullgraph=True)` without graph breaks (quanto's own activation hooks
do not) and do not depend on a library's tensor-subclass internals.

Folder layout (written under a temporary name beside the target and swapped in atomically,
`lingbot_edge.io.files.write_folder`; `save_quantized` replaces only a folder of its own):

    config.json          the DiT config (upstream transformer/config.json keys)
    quantization.json    manifest: format version, backend, per-module scheme and runtime format,
                         size + sha256 of every file, config sha256, source checkpoint hash, library versions
    model.safetensors    or model-00001-of-0000N.safetensors shards; each one's metadata holds the
                         sha256 of the manifest (all but its `files` checksums): an edited manifest is refused

Tensor names are the quantized model's state_dict keys. Kept modules keep upstream names; a
quantized Linear `X` stores `X.weight_qdata` ([out, in] int8 or float8_e4m3fn), `X.weight_scale`
([out] fp32), `X.bias` and, with calibrated activations, `X.input_scale` (fp32 scalar).

`load_quantized` checks sizes and checksums of every file and every tensor's name, shape and
dtype before any device memory is used, then reads tensor by tensor straight to the device: the
bf16 weights of the quantized Linears never exist anywhere at load time.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lingbot_edge.core.config import ModelConfig
from lingbot_edge.core.model import WanVATransformer
from lingbot_edge.core.qlinear import (
    QuantFormat,
    QuantizedCheckpointError,
    QuantizedLinear,
    check_device_support,
    quantized_linears,
)
from lingbot_edge.io.checkpoint import (
    QUANTIZED_MANIFEST,
    build_meta_model,
    open_safetensors,
    read_model_config,
    shard_state,
)
from lingbot_edge.io.files import check_output_folder, read_json, refuse_temp_path, write_folder

log = logging.getLogger(__name__)

FORMAT_NAME = "lingbot-edge-quantized-dit"
FORMAT_VERSION = 2  # 2: manifest hash in every weight file's metadata, config_sha256
MANIFEST_NAME = QUANTIZED_MANIFEST
MANIFEST_HASH_KEY = "lingbot_edge.manifest_sha256"  # safetensors metadata key
CONFIG_NAME = "config.json"
WEIGHTS_STEM = "model"
# Packages whose versions the manifest records (read from installed metadata, never imported).
RECORDED_PACKAGES = ("torch", "torchao", "optimum-quanto", "bitsandbytes", "safetensors", "lingbot-edge")

# none: weight-only; dynamic: per-token scales computed each call; static: one calibrated scale per
# tensor; llm_int8: per-token int8 with outlier columns in high precision (bitsandbytes LLM.int8).






# ----------------------------------------------------------------------------- format






# ----------------------------------------------------------------------------- kernels
















def build_quantized_skeleton(cfg: ModelConfig, formats: Mapping[str, QuantFormat],
                             dtype: torch.dtype = torch.bfloat16) -> WanVATransformer:
    """The quantized model on the meta device (no memory): for loading and for exact byte counts."""
    model = build_meta_model(cfg).to(dtype)
    for name, fmt in formats.items():
        try:
            linear = model.get_submodule(name)
        except AttributeError:
            linear = None
        if not isinstance(linear, nn.Linear):
            raise QuantizedCheckpointError(f"{name}: not a Linear of the LingBot-VA transformer")
        q = QuantizedLinear(linear.in_features, linear.out_features, linear.bias is not None, fmt, dtype, "meta")
        model.set_submodule(name, q)
    return model


# ----------------------------------------------------------------------------- files


def sha256_file(path: str | Path, chunk_bytes: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            h.update(chunk)
    return h.hexdigest()


def installed_versions(packages: tuple[str, ...] = RECORDED_PACKAGES) -> dict[str, str | None]:
    out = {}
    for pkg in packages:
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def manifest_sha256(manifest: Mapping[str, Any]) -> str:
    """Hash of everything in the manifest but `files` (the files' own checksums, computed after the
    weights are written); stored in every weight file's metadata, so any edit of the manifest shows."""
    body = {k: v for k, v in manifest.items() if k != "files"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def save_quantized(
    model: WanVATransformer,
    folder: str | Path,
    modules: Mapping[str, Mapping[str, Any]],
    source: Mapping[str, Any] | None = None,
    max_shard_bytes: int | None = None,
    *,
    replace: bool = False,
    inputs: Sequence[str | Path] = (),
) -> Path:
    """Write a quantized model atomically.

    `modules` maps every QuantizedLinear's name to its provenance: at least `scheme` (a name) and
    `backend`; any other JSON keys are kept. `source` describes the checkpoint it came from
    (e.g. {"path": ..., "sha256": ...}). `folder` must be absent or empty, or (with `replace`) a
    quantized checkpoint; never one of `inputs` (`check_quantized_output`).
    """
    from safetensors.torch import save_file

    check_quantized_output(folder, replace=replace, inputs=inputs)
    qlinears = quantized_linears(model)
    if set(qlinears) != set(modules):
        missing, extra = sorted(set(qlinears) - set(modules)), sorted(set(modules) - set(qlinears))
        raise ValueError(f"modules: must describe exactly the quantized Linears; missing {missing[:8]}, "
                         f"extra {extra[:8]}")
    entries = {}
    for name, q in sorted(qlinears.items()):
        info = dict(modules[name])
        if not {"scheme", "backend"} <= set(info):
            raise ValueError(f"modules[{name!r}]: needs 'scheme' and 'backend', got {sorted(info)}")
        entries[name] = {**info, "format": q.fmt.to_dict()}
    kept = sorted(n for n, m in model.named_modules() if isinstance(m, nn.Linear))
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    shards = shard_state(state, max_shard_bytes)
    names = [f"{WEIGHTS_STEM}.safetensors" if len(shards) == 1 else
             f"{WEIGHTS_STEM}-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    config_text = json.dumps(model.config.to_dict(), indent=2)
    manifest = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "backend": "+".join(sorted({e["backend"] for e in entries.values()})) or "none",
        "dtype": str(model.dtype).removeprefix("torch."),
        "modules": entries,
        "kept_linears": kept,
        "source": dict(source) if source is not None else None,
        "versions": installed_versions(),
        "config_sha256": hashlib.sha256(config_text.encode()).hexdigest(),
        "weight_map": {k: fname for shard, fname in zip(shards, names, strict=True) for k in shard},
    }
    metadata = {"format": "pt", MANIFEST_HASH_KEY: manifest_sha256(manifest)}

    def fill(tmp: Path) -> None:
        (tmp / CONFIG_NAME).write_text(config_text)
        for shard, fname in zip(shards, names, strict=True):
            save_file(shard, str(tmp / fname), metadata=metadata)
        manifest["files"] = {p.name: {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
                             for p in sorted(tmp.iterdir())}
        (tmp / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2))

    write_folder(folder, fill)
    log.info("saved quantized model to %s (%d quantized Linears, %d kept, %d files)", folder, len(entries),
             len(kept), len(names) + 1)
    return Path(folder)


def is_quantized_checkpoint(folder: str | Path) -> bool:
    """A folder `save_quantized` wrote and nothing else: valid manifest (sizes and manifest hash
    checked, not the file checksums) and no file it does not list."""
    folder = Path(folder)
    try:
        manifest = read_manifest(folder)
        verify_files(folder, manifest, checksums=False)
    except (QuantizedCheckpointError, OSError):
        return False
    return {p.name for p in folder.iterdir()} <= set(manifest["files"]) | {MANIFEST_NAME}


def check_quantized_output(folder: str | Path, *, replace: bool = False, inputs: Sequence[str | Path] = ()) -> None:
    """Refuse `folder` as an output unless it is absent, empty or (with `replace`: `--force`) a quantized
    checkpoint with nothing else in it; never equal to, inside or around one of `inputs`."""
    check_output_folder(folder, ours=is_quantized_checkpoint, what="a lingbot-edge quantized checkpoint",
                        replace=replace, inputs=inputs)


def read_manifest(folder: str | Path) -> dict[str, Any]:
    """Parse and validate quantization.json (structure and version; checksums: `verify_files`)."""
    refuse_temp_path(folder, QuantizedCheckpointError)
    path = Path(folder) / MANIFEST_NAME
    if not path.is_file():
        raise QuantizedCheckpointError(f"{path.parent}: no {MANIFEST_NAME} (not a quantized lingbot-edge checkpoint; "
                                       "a folder `lingbot-edge quantize` wrote always has one)")
    manifest = read_json(path, error=QuantizedCheckpointError, obj=False)
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise QuantizedCheckpointError(f"{path}: not a {FORMAT_NAME} manifest")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise QuantizedCheckpointError(f"{path}: format_version {version!r} is not supported by this runtime "
                                       f"(supports {FORMAT_VERSION}; version 1 folders carry no manifest hash: "
                                       "quantize again)")
    for key, kind in (("modules", dict), ("files", dict), ("weight_map", dict), ("kept_linears", list)):
        if not isinstance(manifest.get(key), kind):
            raise QuantizedCheckpointError(f"{path}: '{key}' missing or not a JSON {kind.__name__}")
    odd = sorted(name for name in manifest["files"] if Path(name).name != name or name == MANIFEST_NAME)
    if odd:
        raise QuantizedCheckpointError(f"{path}: 'files' may only name files of the folder itself, got {odd}")
    if CONFIG_NAME not in manifest["files"]:
        raise QuantizedCheckpointError(f"{path}: 'files' does not list {CONFIG_NAME}")
    unlisted = sorted(set(manifest["weight_map"].values()) - set(manifest["files"]))
    if unlisted:
        raise QuantizedCheckpointError(f"{path}: weight files without a checksum entry: {unlisted}")
    return manifest


def verify_files(folder: str | Path, manifest: Mapping[str, Any], checksums: bool = True) -> None:
    """Refuse missing, truncated or modified files (size first, then sha256), naming the file."""
    folder = Path(folder)
    for name, info in manifest["files"].items():
        path = folder / name
        if not path.is_file():
            raise QuantizedCheckpointError(f"{path}: missing (listed in {MANIFEST_NAME})")
        size = path.stat().st_size
        if size != info.get("bytes"):
            raise QuantizedCheckpointError(f"{path}: truncated or modified: {size} bytes, "
                                           f"manifest says {info.get('bytes')}")
        if checksums and sha256_file(path) != info.get("sha256"):
            raise QuantizedCheckpointError(f"{path}: sha256 mismatch (corrupted or modified after it was written)")
    manifest_path = folder / MANIFEST_NAME
    config = (folder / CONFIG_NAME).read_bytes()
    if hashlib.sha256(config).hexdigest() != manifest.get("config_sha256"):
        raise QuantizedCheckpointError(f"{folder / CONFIG_NAME}: modified after it was written (sha256 differs from "
                                       f"{MANIFEST_NAME}'s config_sha256)")
    expected = manifest_sha256(manifest)
    for fname in sorted(set(manifest["weight_map"].values())):
        with _open(folder / fname) as f:
            recorded = (f.metadata() or {}).get(MANIFEST_HASH_KEY)
        if recorded != expected:
            raise QuantizedCheckpointError(f"{manifest_path}: edited after it was written (its hash differs from the "
                                           f"one recorded in {fname}); quantize again instead of editing the manifest")


def load_quantized(
    folder: str | Path,
    dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device = "cpu",
    verify: bool = True,
) -> WanVATransformer:
    """Load a quantized DiT written by `save_quantized`.

    Kept modules and biases load in `dtype`; quantized payloads keep their stored dtypes. With
    `verify` (default) every file's sha256 is checked before anything is read; sizes always are.
    """
    folder = Path(folder)
    manifest = read_manifest(folder)
    verify_files(folder, manifest, checksums=verify)
    cfg = read_model_config(folder / CONFIG_NAME)
    formats = {name: QuantFormat.from_dict(e.get("format"), source=f"{MANIFEST_NAME}: {name}")
               for name, e in manifest["modules"].items()}
    for name, e in manifest["modules"].items():
        check_device_support(formats[name], device, what=f"{e.get('scheme')} ({name})")
    model = build_quantized_skeleton(cfg, formats, dtype)
    expected = model.state_dict(keep_vars=True)
    weight_map: dict[str, str] = manifest["weight_map"]
    missing, unexpected = sorted(set(expected) - set(weight_map)), sorted(set(weight_map) - set(expected))
    if missing or unexpected:
        raise QuantizedCheckpointError(f"{folder}: tensors do not match the manifest's model: missing {missing[:8]}, "
                                       f"unexpected {unexpected[:8]}")
    by_file: dict[str, list[str]] = {}
    for name, fname in weight_map.items():
        by_file.setdefault(fname, []).append(name)
    payload = {f"{q}.{b}" for q, m in quantized_linears(model).items() for b in m._buffers}
    for fname, names in by_file.items():  # headers first: nothing reaches the device from a bad file
        with _open(folder / fname) as f:
            for name in names:
                sl = f.get_slice(name)
                shape, stored = tuple(sl.get_shape()), _SAFETENSORS_DTYPES.get(sl.get_dtype())
                want = expected[name]
                if shape != tuple(want.shape):
                    raise QuantizedCheckpointError(f"{folder / fname}: {name} has shape {shape}, "
                                                   f"expected {tuple(want.shape)}")
                if name in payload and stored != want.dtype:
                    raise QuantizedCheckpointError(f"{folder / fname}: {name} is {sl.get_dtype()}, "
                                                   f"expected {want.dtype}")
    for fname, names in by_file.items():
        with _open(folder / fname) as f:
            for name in names:
                _assign(model, name, f.get_tensor(name).to(device=device, dtype=expected[name].dtype))
    log.info("loaded quantized %s (%s, %d quantized Linears) as %s on %s", folder, manifest["backend"],
             len(formats), dtype, device)
    return model.eval()


_SAFETENSORS_DTYPES = {"I8": torch.int8, "F8_E4M3": torch.float8_e4m3fn, "F32": torch.float32,
                       "BF16": torch.bfloat16, "F16": torch.float16}


def _open(path: Path):
    return open_safetensors(path, QuantizedCheckpointError)


def _assign(model: nn.Module, name: str, value: Tensor) -> None:
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name)
    if attr in module._parameters:
        module._parameters[attr] = nn.Parameter(value, requires_grad=False)
    else:
        module._buffers[attr] = value
