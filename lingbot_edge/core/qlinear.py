"""The runtime quantized Linear and its kernels (int8 / float8 weights, optional 8-bit activations).

Math only: `lingbot_edge.io.quantized` owns the checkpoint format that stores these modules. Every
backend's weights are plain tensors (int8 or float8 data plus one fp32 scale per output channel),
computed by the small kernels below, which compile with `torch.compile(fullgraph=True)` without
graph breaks and do not depend on a library's tensor-subclass internals.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

FP8_MIN_CAPABILITY = (8, 9)  # float8 tensor cores (RTX 4090 = sm89, H100 = sm90)
WEIGHT_DTYPES = {"int8": torch.int8, "float8_e4m3fn": torch.float8_e4m3fn}
ACTIVATIONS = ("none", "dynamic", "static", "llm_int8")
_QMAX = {torch.int8: 127.0, torch.float8_e4m3fn: float(torch.finfo(torch.float8_e4m3fn).max)}
_SCALE_EPS = torch.finfo(torch.float32).eps


class QuantizedCheckpointError(ValueError):
    """A quantized checkpoint folder is incomplete, corrupted or from an unknown format version."""


class UnsupportedSchemeError(RuntimeError):
    """The target hardware cannot run a quantization format."""


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


# The kernel computing each runtime format, per device kind (docs/benchmarks.md "Kernels"; bench/kernels.py
# times them on the CPU). Weight-only formats read 1 byte per weight: they win where a forward is
# memory-bound (the 16-token action forwards), and only with a GEMM that reads the 8-bit weight itself.
# `F.linear(x, w.to(x.dtype))` does not: under torch.compile (no max-autotune template) inductor writes a
# dense bf16 copy of the weight every forward and runs the bf16 GEMM on it, slower than bf16 weights.
# sm80 = A100 / RTX 30xx, sm89 = RTX 40xx, sm90 = H100.
KERNELS: dict[str, dict[str, str]] = {
    "int8 weight-only": {
        "cpu": "torch._int_mm on two int8 limbs of the activations (bf16/fp16; fp32: dequant + F.linear)",
        "cuda": "torch._int_mm on two int8 limbs of the activations (cuBLASLt int8; 2M rows padded to >= 24)",
    },
    "fp8 weight-only": {
        "cpu": "dequant + F.linear (reference speed: the CPU's float8 GEMM is a slow reference kernel)",
        "cuda": "torch._scaled_mm on two float8 limbs of the activations (sm >= 8.9); below: dequant + F.linear",
    },
    "int8 W8A8 (dynamic / static)": {
        "cpu": "torch._int_mm (oneDNN, VNNI where present)",
        "cuda": "torch._int_mm (cuBLASLt int8; rows padded to > 16 and a multiple of 8)",
    },
    "fp8 W8A8 (dynamic / static)": {
        "cpu": "not supported (float8 GEMM needs CUDA sm >= 8.9)",
        "cuda": "torch._scaled_mm row-wise scales (fp8 tensor cores, sm >= 8.9 only)",
    },
    "llm_int8": {
        "cpu": "torch._int_mm + masked high-precision outlier matmul (reference scheme)",
        "cuda": "torch._int_mm + masked high-precision outlier matmul (reference scheme)",
    },
}
LIMBS_MAX_K = 2**31 // (128 * 128)  # int32 accumulation of K products of two int8 values cannot overflow
_INT_MM_MIN_ROWS = 24  # cuBLAS int8 GEMM: M > 16; multiples of 8 keep the padded rows aligned


def int8_weight_only_limbs(x: Tensor, qdata: Tensor, scale: Tensor) -> Tensor:
    """x [M, K] (bf16/fp16) @ (qdata [N, K] int8 * scale [N, 1]).T on the int8 GEMM (oneDNN VNNI, cuBLASLt).

    The activations become 16-bit fixed point per row, split into two int8 limbs stacked as 2M rows
    of one `_int_mm` (one pass over the weight, exact int32 accumulation): x / s = hi + lo / 256 with
    s = row absmax / 127, |error| <= s / 512 per element, ~100x below bf16's own rounding of the row's
    large entries, so the result keeps weight-only numerics (47.4 dB vs 47.3 for
    `_weight_int8pack_mm` at 3072 -> 14336) at about twice bf16's speed (bench/results/cpu/kernels.md)."""
    m = x.shape[0]
    xf = x.float()
    x_scale = xf.abs().amax(dim=-1, keepdim=True).clamp(min=_SCALE_EPS) / 127.0
    u = xf / x_scale
    hi = u.round()
    lo = ((u - hi) * 256.0).round().clamp(-128, 127)
    y = int8_matmul(torch.cat([hi, lo]).to(torch.int8), qdata.t()).float()
    return ((y[:m] + y[m:] * (1.0 / 256.0)) * (x_scale * scale)).to(x.dtype)


def fp8_weight_only_limbs(x: Tensor, qdata: Tensor, scale: Tensor) -> Tensor:
    """x [M, K] (bf16/fp16) @ (qdata [N, K] float8_e4m3fn * scale [N, 1]).T on the float8 GEMM.

    Like `int8_weight_only_limbs` with float8 limbs: u = x / s (s = row absmax / 448), hi = fp8(u),
    lo = fp8(u - hi); hi + lo carries ~8 significant bits, bf16's own precision, so the result keeps
    weight-only numerics (31.9 dB vs 31.8 for dequant + F.linear at 3072 -> 14336, bench/kernels.py). Both
    limbs are the 2M rows of one `_scaled_mm` with row-wise scales: one pass over the 8-bit weight."""
    m = x.shape[0]
    xf = x.float()
    x_scale = xf.abs().amax(dim=-1, keepdim=True).clamp(min=_SCALE_EPS) / _QMAX[torch.float8_e4m3fn]
    u = xf / x_scale
    hi = u.to(torch.float8_e4m3fn)
    lo = (u - hi.float()).to(torch.float8_e4m3fn)
    y = torch._scaled_mm(torch.cat([hi, lo]), qdata.t(), scale_a=torch.cat([x_scale, x_scale]),
                         scale_b=scale.float().view(1, -1), out_dtype=torch.bfloat16)
    return (y[:m].float() + y[m:].float()).to(x.dtype)


@torch.compiler.assume_constant_result
def _cuda_fp8_gemm(device_index: int) -> bool:
    return torch.cuda.get_device_capability(device_index) >= FP8_MIN_CAPABILITY


def weight_only_matmul(x: Tensor, qdata: Tensor, scale: Tensor) -> Tensor:
    """x [M, K] @ (qdata [N, K] * scale [N, 1]).T in x's dtype, for int8 / float8 weights (`KERNELS`).

    bf16/fp16 activations: a GEMM that reads the 8-bit weight, on two 8-bit limbs of the activations
    (`int8_weight_only_limbs` on any device; `fp8_weight_only_limbs` on CUDA sm >= 8.9). Otherwise (fp32
    activations: exact parity with torchao's int8 weight-only; float8 on a CPU or an older GPU) dequant +
    F.linear, which materializes the weight in x's dtype at every call."""
    if x.dtype in (torch.bfloat16, torch.float16):
        if qdata.dtype == torch.int8 and x.shape[-1] <= LIMBS_MAX_K:
            return int8_weight_only_limbs(x, qdata, scale)
        if qdata.dtype == torch.float8_e4m3fn and x.is_cuda and _cuda_fp8_gemm(x.get_device()):
            return fp8_weight_only_limbs(x, qdata, scale)
    return F.linear(x, qdata.to(x.dtype)) * scale.to(x.dtype)


def int8_matmul(a: Tensor, b_t: Tensor) -> Tensor:
    """a [M, K] int8 @ b_t [K, N] int8 -> int32 [M, N] (b_t is usually a weight's transpose view)."""
    if not a.is_cuda:
        return torch._int_mm(a, b_t)
    k, n = b_t.shape
    if k % 8 or n % 8:
        raise ValueError(f"int8 W8A8 on CUDA: in/out features must be multiples of 8 (cuBLAS int8), got "
                         f"K={k}, N={n}")
    m = a.shape[0]
    rows = max(_INT_MM_MIN_ROWS, -(-m // 8) * 8)
    if rows != m:  # pad the rows (static shapes: a compile-time decision), drop them after
        return torch._int_mm(F.pad(a, (0, 0, 0, rows - m)), b_t)[:m]
    return torch._int_mm(a, b_t)


def scaled_matmul(xq: Tensor, wq: Tensor, x_scale: Tensor, w_scale: Tensor, out_dtype: torch.dtype) -> Tensor:
    """(xq * x_scale) @ (wq * w_scale[:, None]).T with xq [M, K], wq [N, K] of the same 8-bit dtype,
    x_scale [M, 1] (or scalar) and w_scale [N] fp32. Accumulates in int32 / fp32.

    float8: `torch._scaled_mm` with row-wise scales (scale_a [M, 1], scale_b [1, N], both fp32) on a
    row-major A and the column-major view of the [N, K] weight, as cuBLASLt / CUTLASS want it;
    K and N must be multiples of 16 (every full-model Linear is)."""
    if wq.dtype == torch.int8:
        return (int8_matmul(xq, wq.t()).float() * x_scale * w_scale).to(out_dtype)
    x_scale = x_scale.float().expand(xq.shape[0], 1).contiguous()
    return torch._scaled_mm(xq.contiguous(), wq.t(), scale_a=x_scale, scale_b=w_scale.float().view(1, -1),
                            out_dtype=out_dtype)


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
            y = weight_only_matmul(x2, self.weight_qdata, self.weight_scale)
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

