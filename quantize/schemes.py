"""Quantization schemes: one frozen dataclass per backend, and the named schemes the CLI offers.

A scheme knows three things:
- how its library quantizes a Linear's weight (`quantize_weight`: the int8 / float8 data and the
  per-output-channel scales, computed by torchao / optimum-quanto / bitsandbytes themselves);
- which runtime kernel computes the result (`runtime_format`, a `lingbot_edge.io.quantized.QuantFormat`);
- how to build the library's own quantized module (`native_linear`): the reference the runtime
  kernels are tested against.

Libraries are imported inside the methods: importing this module costs nothing.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import torch
from torch import Tensor, nn

from lingbot_edge.core.qlinear import QuantFormat, QuantizedLinear


class Scheme(Protocol):
    backend: ClassVar[str]

    @property
    def label(self) -> str: ...
    def runtime_format(self) -> QuantFormat: ...
    def quantize_weight(self, weight: Tensor) -> tuple[Tensor, Tensor]: ...
    def native_linear(self, linear: nn.Linear) -> nn.Module: ...
    def to_dict(self) -> dict[str, Any]: ...


def quantize_linear(scheme: Scheme, linear: nn.Linear) -> QuantizedLinear:
    """The runtime module for `linear` under `scheme` (weights quantized by the scheme's library)."""
    qdata, scale = scheme.quantize_weight(linear.weight.detach())
    dtype = linear.bias.dtype if linear.bias is not None else linear.weight.dtype
    return QuantizedLinear.from_components(qdata, scale, linear.bias, scheme.runtime_format(), dtype)


def _copy_linear(linear: nn.Linear) -> nn.Linear:
    return copy.deepcopy(linear).requires_grad_(False)


@dataclass(frozen=True)
class TorchAOScheme:
    """torchao: symmetric int8 / float8 (e4m3) weights, one scale per output channel (PerRow), with
    optional dynamic per-token activations of the same type (W8A8)."""

    weight: str = "int8"  # "int8" | "float8"
    dynamic_activations: bool = False
    backend: ClassVar[str] = "torchao"

    def __post_init__(self):
        if self.weight not in ("int8", "float8"):
            raise ValueError(f"torchao weight: expected 'int8' or 'float8', got {self.weight!r}")

    @property
    def label(self) -> str:
        kind = "dynamic W8A8" if self.dynamic_activations else "weight-only"
        return f"{'int8' if self.weight == 'int8' else 'fp8'} {kind} (torchao)"

    def runtime_format(self) -> QuantFormat:
        return QuantFormat(weight="int8" if self.weight == "int8" else "float8_e4m3fn",
                           activation="dynamic" if self.dynamic_activations else "none")

    def quantize_weight(self, weight: Tensor) -> tuple[Tensor, Tensor]:
        # The weight halves of Int8{WeightOnly,DynamicActivationInt8Weight}Config and
        # Float8{WeightOnly,DynamicActivationFloat8Weight}Config with PerRow granularity.
        from torchao.quantization import Float8Tensor, Int8Tensor, PerRow

        if self.weight == "int8":
            t = Int8Tensor.from_hp(weight, granularity=PerRow())
        else:
            t = Float8Tensor.from_hp(weight, float8_dtype=torch.float8_e4m3fn, granularity=PerRow())
        return t.qdata, t.scale.reshape(-1).float()

    def native_config(self):
        from torchao.quantization import (
            Float8DynamicActivationFloat8WeightConfig,
            Float8WeightOnlyConfig,
            Int8DynamicActivationInt8WeightConfig,
            Int8WeightOnlyConfig,
            PerRow,
        )

        # set_inductor_config=False: torchao would otherwise change global inductor flags for everyone.
        if self.weight == "int8":
            cls = Int8DynamicActivationInt8WeightConfig if self.dynamic_activations else Int8WeightOnlyConfig
            return cls(set_inductor_config=False)
        if self.dynamic_activations:
            return Float8DynamicActivationFloat8WeightConfig(granularity=PerRow(), set_inductor_config=False)
        return Float8WeightOnlyConfig(set_inductor_config=False)

    def native_linear(self, linear: nn.Linear) -> nn.Module:
        from torchao.quantization import quantize_

        module = _copy_linear(linear)
        quantize_(module, self.native_config())
        return module.eval()

    def to_dict(self) -> dict[str, Any]:
        return {"backend": self.backend, **dataclasses.asdict(self)}


_QUANTO_FORMAT_WEIGHT = {"qint8": "int8", "qfloat8": "float8_e4m3fn"}


@dataclass(frozen=True)
class QuantoScheme:
    """optimum-quanto: qint8 / qfloat8 weights (absmax per output channel) with optional activations
    of the same type, quantized per tensor with a scale calibrated on representative forwards
    (quanto's Calibration: absmax with momentum 0.9)."""

    weights: str = "qint8"  # "qint8" | "qfloat8"
    activations: str | None = None  # None | same as weights
    backend: ClassVar[str] = "quanto"

    def __post_init__(self):
        if self.weights not in _QUANTO_FORMAT_WEIGHT:
            raise ValueError(f"quanto weights: expected one of {sorted(_QUANTO_FORMAT_WEIGHT)}, got {self.weights!r}")
        if self.activations not in (None, self.weights):
            raise ValueError(f"quanto activations: expected None or {self.weights!r} (the weights' type: the "
                             f"runtime multiplies int8 x int8 or fp8 x fp8), got {self.activations!r}")

    @property
    def label(self) -> str:
        acts = f" + {self.activations} activations" if self.activations else ""
        return f"{self.weights} weights{acts} (quanto)"

    def runtime_format(self) -> QuantFormat:
        return QuantFormat(weight=_QUANTO_FORMAT_WEIGHT[self.weights],
                           activation="static" if self.activations else "none")

    def _qtype(self, name: str):
        from optimum.quanto import qfloat8, qint8

        return {"qint8": qint8, "qfloat8": qfloat8}[name]

    def quantize_weight(self, weight: Tensor) -> tuple[Tensor, Tensor]:
        from optimum.quanto import QLinear

        out_features, in_features = weight.shape
        linear = nn.Linear(in_features, out_features, bias=False, device="meta", dtype=weight.dtype)
        linear.weight = nn.Parameter(weight, requires_grad=False)
        qlinear = QLinear.from_module(linear, weights=self._qtype(self.weights))
        qlinear.freeze()
        state = qlinear.state_dict()  # quanto's serialized components
        return state["weight._data"], state["weight._scale"].reshape(-1).float()

    def native_linear(self, linear: nn.Linear) -> nn.Module:
        """quanto's QLinear (frozen weights); with activations it still needs Calibration."""
        from optimum.quanto import QLinear

        acts = self._qtype(self.activations) if self.activations else None
        qlinear = QLinear.from_module(_copy_linear(linear), weights=self._qtype(self.weights), activations=acts)
        qlinear.freeze()
        return qlinear.eval()

    def to_dict(self) -> dict[str, Any]:
        return {"backend": self.backend, **dataclasses.asdict(self)}


@dataclass(frozen=True)
class BitsAndBytesScheme:
    """bitsandbytes LLM.int8: int8 weights (absmax per output channel, from fp16), per-token int8
    activations, and activation columns with any |x| >= threshold computed in high precision."""

    threshold: float = 6.0
    backend: ClassVar[str] = "bitsandbytes"

    def __post_init__(self):
        if not self.threshold > 0:
            raise ValueError(f"bitsandbytes threshold: must be > 0 (0 is plain int8 W8A8: use int8_dynamic), "
                             f"got {self.threshold}")

    @property
    def label(self) -> str:
        return f"LLM.int8 threshold {self.threshold:g} (bitsandbytes)"

    def runtime_format(self) -> QuantFormat:
        return QuantFormat(weight="int8", activation="llm_int8", outlier_threshold=float(self.threshold))

    def quantize_weight(self, weight: Tensor) -> tuple[Tensor, Tensor]:
        import bitsandbytes.functional as bnb_functional

        data, absmax, _ = bnb_functional.int8_vectorwise_quant(weight.to(torch.float16))
        return data, absmax.float() / 127.0

    def native_linear(self, linear: nn.Linear) -> nn.Module:
        import bitsandbytes as bnb

        module = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                     has_fp16_weights=False, threshold=self.threshold, device="meta")
        module.weight = bnb.nn.Int8Params(linear.weight.detach().clone(), requires_grad=False,
                                          has_fp16_weights=False)
        if linear.bias is not None:
            module.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        # Int8Params quantizes when moved; eval(): in training mode bitsandbytes runs a dequantized
        # fp matmul on CPU instead of LLM.int8.
        return module.to(linear.weight.device).eval()

    def to_dict(self) -> dict[str, Any]:
        return {"backend": self.backend, **dataclasses.asdict(self)}


# The schemes `--scheme NAME` accepts. The first four follow torchao's config names.
SCHEMES: dict[str, Scheme] = {
    "int8_weight_only": TorchAOScheme("int8"),
    "int8_dynamic": TorchAOScheme("int8", dynamic_activations=True),
    "fp8_weight_only": TorchAOScheme("float8"),
    "fp8_dynamic": TorchAOScheme("float8", dynamic_activations=True),
    "quanto_int8": QuantoScheme("qint8"),
    "quanto_fp8": QuantoScheme("qfloat8"),
    "quanto_int8_a8": QuantoScheme("qint8", "qint8"),
    "quanto_fp8_a8": QuantoScheme("qfloat8", "qfloat8"),
    "llm_int8": BitsAndBytesScheme(),
}
_BACKENDS = {cls.backend: cls for cls in (TorchAOScheme, QuantoScheme, BitsAndBytesScheme)}


def scheme_name(scheme: Scheme) -> str:
    """The registered name of a scheme, or its label for a custom one."""
    return next((name for name, s in SCHEMES.items() if s == scheme), scheme.label)


def get_scheme(spec: str | Mapping[str, Any], source: str = "scheme", keep: bool = False) -> Scheme:
    """A scheme from a registered name or a dict {"backend": ..., <fields>}. `keep`: the caller also
    accepts "keep" (plans), so the error offers it."""
    if isinstance(spec, str):
        if spec not in SCHEMES:
            also = " or 'keep'" if keep else ""
            raise ValueError(f"{source}: unknown scheme {spec!r}; expected one of {sorted(SCHEMES)}{also}")
        return SCHEMES[spec]
    if not isinstance(spec, Mapping) or spec.get("backend") not in _BACKENDS:
        raise ValueError(f"{source}: expected a scheme name or an object with 'backend' in {sorted(_BACKENDS)}, "
                         f"got {spec!r}")
    cls = _BACKENDS[spec["backend"]]
    fields = {k: v for k, v in spec.items() if k != "backend"}
    known = {f.name for f in dataclasses.fields(cls)}
    if set(fields) - known:
        raise ValueError(f"{source}: unknown {spec['backend']} fields {sorted(set(fields) - known)}; "
                         f"expected {sorted(known)}")
    try:
        return cls(**fields)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{source}: {e}") from e
