"""Quantized DiT: the runtime quantized Linear, the checkpoint format and its loader.

The runtime owns the format. `quantize/` (offline, imports torchao / optimum-quanto / bitsandbytes)
produces `QuantizedLinear` modules and calls `save_quantized`; a robot needs only this module and
torch to load and run the result. Every backend's weights are stored as plain tensors (int8 or
float8 data plus one fp32 scale per output channel) and computed by the small kernels below, which
compile with `torch.compile(fullgraph=True)` without graph breaks (quanto's own activation hooks
do not) and do not depend on a library's tensor-subclass internals.

Folder layout, written atomically (temp dir + rename):

    config.json          the DiT config (upstream transformer/config.json keys)
    quantization.json    manifest: format version, backend, per-module scheme and runtime format,
                         size + sha256 of every file, source checkpoint hash, library versions
    model.safetensors    or model-00001-of-0000N.safetensors shards

Tensor names are the quantized model's state_dict keys. Kept modules keep upstream names; a
quantized Linear `X` stores `X.weight_qdata` ([out, in] int8 or float8_e4m3fn), `X.weight_scale`
([out] fp32), `X.bias` and, with calibrated activations, `X.input_scale` (fp32 scalar).

`load_quantized` checks sizes and checksums of every file and every tensor's name, shape and
dtype before any device memory is used, then reads tensor by tensor straight to the device: the
bf16 weights of the quantized Linears never exist anywhere at load time.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import json
import logging
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .checkpoint import build_meta_model, chmod_like_new_files, open_safetensors, replace_dir, shard_state
from .config import ModelConfig
from .model import WanVATransformer

log = logging.getLogger(__name__)

FORMAT_NAME = "lingbot-edge-quantized-dit"
FORMAT_VERSION = 1
MANIFEST_NAME = "quantization.json"
CONFIG_NAME = "config.json"
WEIGHTS_STEM = "model"
# Packages whose versions the manifest records (read from installed metadata, never imported).
RECORDED_PACKAGES = ("torch", "torchao", "optimum-quanto", "bitsandbytes", "safetensors", "lingbot-edge")

WEIGHT_DTYPES = {"int8": torch.int8, "float8_e4m3fn": torch.float8_e4m3fn}
# none: weight-only; dynamic: per-token scales computed each call; static: one calibrated scale per
# tensor; llm_int8: per-token int8 with outlier columns in high precision (bitsandbytes LLM.int8).
ACTIVATIONS = ("none", "dynamic", "static", "llm_int8")
_QMAX = {torch.int8: 127.0, torch.float8_e4m3fn: float(torch.finfo(torch.float8_e4m3fn).max)}
_SCALE_EPS = torch.finfo(torch.float32).eps
FP8_MIN_CAPABILITY = (8, 9)


class UnsupportedSchemeError(RuntimeError):
    """The target hardware cannot run a quantization format."""


class QuantizedCheckpointError(ValueError):
    """A quantized checkpoint folder is incomplete, corrupted or from an unknown format version."""


# ----------------------------------------------------------------------------- format


@dataclass(frozen=True)
class QuantFormat:
    """How one Linear is stored and computed at run time (the manifest's per-module `format`).

    The weight always has one fp32 scale per output channel. Activations, when quantized, use the
    weight's dtype: int8 x int8 runs on `torch._int_mm`, float8 x float8 on `torch._scaled_mm`.
    """

    weight: str = "int8"  # key of WEIGHT_DTYPES
    activation: str = "none"  # one of ACTIVATIONS
    outlier_threshold: float = 0.0  # llm_int8 only: columns with any |x| >= threshold stay in high precision

    def __post_init__(self):
        if self.weight not in WEIGHT_DTYPES:
            raise ValueError(f"weight: expected one of {sorted(WEIGHT_DTYPES)}, got {self.weight!r}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation: expected one of {ACTIVATIONS}, got {self.activation!r}")
        if self.activation == "llm_int8":
            if self.weight != "int8" or not self.outlier_threshold > 0:
                raise ValueError("llm_int8 needs int8 weights and an outlier_threshold > 0")
        elif self.outlier_threshold:
            raise ValueError(f"outlier_threshold: only used by llm_int8, got {self.outlier_threshold} "
                             f"with activation {self.activation!r}")

    @property
    def weight_dtype(self) -> torch.dtype:
        return WEIGHT_DTYPES[self.weight]

    @property
    def needs_fp8_matmul(self) -> bool:
        return self.weight == "float8_e4m3fn" and self.activation in ("dynamic", "static")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], source: str = "format") -> QuantFormat:
        known = {f.name for f in dataclasses.fields(cls)}
        if not isinstance(d, Mapping) or set(d) - known:
            raise QuantizedCheckpointError(f"{source}: expected an object with keys {sorted(known)}, got {d!r}")
        try:
            return cls(**d)
        except (TypeError, ValueError) as e:
            raise QuantizedCheckpointError(f"{source}: {e}") from e


def check_device_support(fmt: QuantFormat, device: str | torch.device, what: str | None = None) -> None:
    """Raise UnsupportedSchemeError if `device` cannot run `fmt` (float8 activations need sm >= 8.9)."""
    if not fmt.needs_fp8_matmul:
        return
    what = what or f"float8 W8A8 ({fmt.activation} activations)"
    need = f"{what} needs a CUDA GPU with compute capability >= 8.9 (Ada/Hopper)"
    device = torch.device(device)
    if device.type != "cuda":
        if torch.cuda.is_available():
            raise UnsupportedSchemeError(f"{need}; the target device is {device.type}, use a CUDA device")
        raise UnsupportedSchemeError(f"{need}; this machine has no CUDA GPU")
    index = device.index if device.index is not None else torch.cuda.current_device()
    capability = torch.cuda.get_device_capability(index)
    if capability < FP8_MIN_CAPABILITY:
        name = torch.cuda.get_device_name(index)
        raise UnsupportedSchemeError(f"{need}; this machine has {name} (compute capability "
                                     f"{capability[0]}.{capability[1]})")


# ----------------------------------------------------------------------------- kernels


def quantize_per_row(x: Tensor, qdtype: torch.dtype, int8_range: float = 127.5) -> tuple[Tensor, Tensor]:
    """Symmetric per-row (per-token) quantization of x [M, K] -> data [M, K], scale [M, 1] fp32.

    int8: scale = absmax / int8_range, values clamped to [-128, 127]; the default 127.5 is torchao's
    symmetric convention (Int8DynamicActivationInt8WeightConfig), bitsandbytes uses 127.
    float8_e4m3fn: scale = absmax / 448."""
    qmax = int8_range if qdtype == torch.int8 else _QMAX[qdtype]
    scale = x.abs().amax(dim=-1, keepdim=True).float().clamp(min=_SCALE_EPS) / qmax
    return _to_qdtype(x.float() * (1.0 / scale), qdtype), scale


def quantize_per_tensor(x: Tensor, scale: Tensor, qdtype: torch.dtype) -> Tensor:
    """Quantization with one (calibrated) scale, as quanto's activations."""
    return _to_qdtype(x.float() / scale, qdtype)


def _to_qdtype(x: Tensor, qdtype: torch.dtype) -> Tensor:
    if qdtype == torch.int8:
        return x.round().clamp(-128, 127).to(qdtype)
    return x.clamp(-_QMAX[qdtype], _QMAX[qdtype]).to(qdtype)


def int8_matmul(a: Tensor, b_t: Tensor) -> Tensor:
    """a [M, K] int8 @ b_t [K, N] int8 -> int32 [M, N] (b_t is usually a weight's transpose view)."""
    m = a.shape[0]
    if a.is_cuda and m <= 16:  # cuBLAS int8 GEMM needs M > 16: pad the rows, drop them after
        return torch._int_mm(F.pad(a, (0, 0, 0, 17 - m)), b_t)[:m]
    return torch._int_mm(a, b_t)


def scaled_matmul(xq: Tensor, wq: Tensor, x_scale: Tensor, w_scale: Tensor, out_dtype: torch.dtype) -> Tensor:
    """(xq * x_scale) @ (wq * w_scale[:, None]).T with xq [M, K], wq [N, K] of the same 8-bit dtype,
    x_scale [M, 1] (or scalar) and w_scale [N] fp32. Accumulates in int32 / fp32."""
    if wq.dtype == torch.int8:
        return (int8_matmul(xq, wq.t()).float() * x_scale * w_scale).to(out_dtype)
    x_scale = x_scale.expand(xq.shape[0], 1).contiguous()
    return torch._scaled_mm(xq, wq.t(), scale_a=x_scale, scale_b=w_scale.view(1, -1), out_dtype=out_dtype)


class QuantizedLinear(nn.Module):
    """Drop-in for nn.Linear with 8-bit weights (one fp32 scale per output channel).

    Buffers: `weight_qdata` [out, in] (int8 / float8_e4m3fn), `weight_scale` [out] fp32, and
    `input_scale` (fp32 scalar) for static activations. `bias` stays a parameter in the compute
    dtype (so `model.dtype`, which reads biases, keeps working). `.to(dtype)` moves but never casts
    the quantized payload.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool, fmt: QuantFormat,
                 dtype: torch.dtype = torch.bfloat16, device: str | torch.device | None = None):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.fmt = fmt
        self.register_buffer("weight_qdata", torch.empty(out_features, in_features, dtype=fmt.weight_dtype,
                                                         device=device))
        self.register_buffer("weight_scale", torch.ones(out_features, dtype=torch.float32, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device), requires_grad=False) \
            if bias else None
        if fmt.activation == "static":
            self.register_buffer("input_scale", torch.ones((), dtype=torch.float32, device=device))

    @classmethod
    def from_components(cls, qdata: Tensor, scale: Tensor, bias: Tensor | None, fmt: QuantFormat,
                        dtype: torch.dtype, input_scale: Tensor | None = None) -> QuantizedLinear:
        """Wrap already-quantized data [out, in] and per-channel scales [out] (any shape of out elements)."""
        out_features, in_features = qdata.shape
        if qdata.dtype != fmt.weight_dtype:
            raise ValueError(f"qdata: expected {fmt.weight_dtype} for format {fmt}, got {qdata.dtype}")
        if scale.numel() != out_features:
            raise ValueError(f"scale: expected {out_features} per-channel scales, got shape {tuple(scale.shape)}")
        module = cls(in_features, out_features, bias is not None, fmt, dtype=dtype, device="meta")
        module.weight_qdata = qdata.detach().contiguous()
        module.weight_scale = scale.detach().reshape(out_features).to(torch.float32)
        if bias is not None:
            module.bias = nn.Parameter(bias.detach().to(dtype), requires_grad=False)
        if fmt.activation == "static":
            init = torch.ones(()) if input_scale is None else input_scale.detach().reshape(())
            module.input_scale = init.to(device=qdata.device, dtype=torch.float32)
        return module

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, " \
               f"format={self.fmt}"

    def _apply(self, fn, recurse=True):
        payload = {name: buf for name, buf in self._buffers.items() if buf is not None}
        super()._apply(fn, recurse)
        for name, buf in payload.items():
            moved = self._buffers[name]
            if moved is not None and moved.dtype != buf.dtype:
                self._buffers[name] = buf.to(moved.device)  # moved, not cast
        return self

    def dequantized_weight(self, dtype: torch.dtype) -> Tensor:
        return (self.weight_qdata.to(torch.float32) * self.weight_scale[:, None]).to(dtype)

    def forward(self, x: Tensor) -> Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])
        act = self.fmt.activation
        if act == "none":
            # Weight-only, in torchao's int8 / gpt-fast's form: cast in the matmul's input, per-channel
            # scale on the output, so inductor can fuse both into the GEMM (its mixed-dtype mm on CUDA).
            y = F.linear(x2, self.weight_qdata.to(x.dtype)) * self.weight_scale.to(x.dtype)
        elif act == "llm_int8":
            y = self._llm_int8(x2)
        else:
            if act == "dynamic":
                xq, x_scale = quantize_per_row(x2, self.weight_qdata.dtype)
            else:
                x_scale = self.input_scale
                xq = quantize_per_tensor(x2, x_scale, self.weight_qdata.dtype)
            y = scaled_matmul(xq, self.weight_qdata, x_scale, self.weight_scale, x.dtype)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*lead, self.out_features)

    def _llm_int8(self, x: Tensor) -> Tensor:
        """bitsandbytes LLM.int8: activation columns holding any |x| >= threshold are multiplied in
        high precision with dequantized weights, the rest in int8 with per-token scales. The column
        split is a mask (static shapes, no host sync), so the outlier part is a dense matmul over
        masked inputs: accurate, but slower than the pure int8 kernels (a reference scheme)."""
        outliers = x.abs() >= self.fmt.outlier_threshold
        outlier_cols = outliers.any(dim=0)
        inliers = x.masked_fill(outliers, 0)  # bitsandbytes zeroes outlier values before the row absmax
        xq, x_scale = quantize_per_row(inliers, torch.int8, int8_range=127.0)
        xq = xq.masked_fill(outlier_cols, 0)
        y = scaled_matmul(xq, self.weight_qdata, x_scale, self.weight_scale, x.dtype)
        return y + F.linear(x * outlier_cols.to(x.dtype), self.dequantized_weight(x.dtype))


def quantized_linears(model: nn.Module) -> dict[str, QuantizedLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, QuantizedLinear)}


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


def save_quantized(
    model: WanVATransformer,
    folder: str | Path,
    modules: Mapping[str, Mapping[str, Any]],
    source: Mapping[str, Any] | None = None,
    max_shard_bytes: int | None = None,
) -> Path:
    """Write a quantized model atomically.

    `modules` maps every QuantizedLinear's name to its provenance: at least `scheme` (a name) and
    `backend`; any other JSON keys are kept. `source` describes the checkpoint it came from
    (e.g. {"path": ..., "sha256": ...}).
    """
    from safetensors.torch import save_file

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

    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp.", dir=folder.parent))
    try:
        (tmp / CONFIG_NAME).write_text(json.dumps(model.config.to_dict(), indent=2))
        shards = shard_state(state, max_shard_bytes)
        weight_map = {}
        for i, shard in enumerate(shards):
            fname = f"{WEIGHTS_STEM}.safetensors" if len(shards) == 1 else \
                f"{WEIGHTS_STEM}-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(tmp / fname), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(shard, fname))
        files = {p.name: {"bytes": p.stat().st_size, "sha256": sha256_file(p)} for p in sorted(tmp.iterdir())}
        manifest = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "backend": "+".join(sorted({e["backend"] for e in entries.values()})) or "none",
            "dtype": str(model.dtype).removeprefix("torch."),
            "modules": entries,
            "kept_linears": kept,
            "source": dict(source) if source is not None else None,
            "versions": installed_versions(),
            "files": files,
            "weight_map": weight_map,
        }
        (tmp / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2))
        chmod_like_new_files(tmp)
        replace_dir(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("saved quantized model to %s (%d quantized Linears, %d kept, %d files)", folder, len(entries),
             len(kept), len(files) - 1)
    return folder


def read_manifest(folder: str | Path) -> dict[str, Any]:
    """Parse and validate quantization.json (structure and version; checksums: `verify_files`)."""
    path = Path(folder) / MANIFEST_NAME
    if not path.is_file():
        raise QuantizedCheckpointError(f"{path.parent}: no {MANIFEST_NAME} (not a quantized lingbot-edge checkpoint)")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise QuantizedCheckpointError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise QuantizedCheckpointError(f"{path}: not a {FORMAT_NAME} manifest")
    version = manifest.get("format_version")
    if not isinstance(version, int) or not 1 <= version <= FORMAT_VERSION:
        raise QuantizedCheckpointError(f"{path}: format_version {version!r} is not supported by this runtime "
                                       f"(supports 1..{FORMAT_VERSION})")
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
    cfg = ModelConfig.from_json(folder / CONFIG_NAME)
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
