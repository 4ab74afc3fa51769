"""LoRA adapters over a frozen DiT, and their merge into a plain bf16 DiT.

The base is frozen in bf16 (`nn.Linear`: PEFT's own LoRA layer) or in the runtime's int8 weight-only
format (`core.qlinear.QuantizedLinear`, made by `quantize.quantize_` as `lingbot-edge quantize` makes it:
QLoRA-style). PEFT has no LoRA layer for that module, so `LoraQuantizedLinear` is registered through
PEFT's custom-module mechanism (`LoraConfig._register_custom_module`): PEFT still finds the targets,
creates, initializes, scales and names the adapters. Its base matmul runs the runtime's int8 kernel
forward; backward, the gradient flows through the frozen int8 weight, dequantized on the fly, into the
adapters of the layers before it (`_frozen_weight_only`); the int8 weights get no gradient.

Adapters are injected in place (`peft.inject_adapter_in_model`): the model stays a `WanVATransformer`,
which the trainer's teacher-forced forward calls block by block. `merge` folds them into a new dense
`WanVATransformer`: W = base weight (the dequantized int8 weight for an int8 base: the weight the
adapters were trained against) + (alpha / rank) B A.
"""

from __future__ import annotations

import functools
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from lingbot_edge.core.qlinear import QuantizedLinear, weight_only_matmul
from lingbot_edge.io.checkpoint import build_model
from lingbot_edge.io.files import write_file, write_text

log = logging.getLogger(__name__)

# The block Linears of both streams (the blocks are shared by the video and action tokens): self- and
# cross-attention q/k/v/out and the FFN. PEFT's matching: a module whose name is, or ends with "." + an entry.
DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "ffn.net.0.proj", "ffn.net.2")
BASE_DTYPES = ("bfloat16", "float32", "int8")
ADAPTER_NAME = "default"


@dataclass(frozen=True)
class AdapterConfig:
    """LoRA over a frozen base DiT (`lingbot-edge train fit --base ... --lora-rank R`)."""

    rank: int = 32  # r: the adapters' inner size (the tiny DiT is 48 wide: a new task needs a large share of it)
    alpha: float = 32.0  # the update is scaled by alpha / rank
    targets: tuple[str, ...] = DEFAULT_TARGETS  # module names (or name suffixes) that get adapters
    dropout: float = 0.0  # dropout on the adapters' input
    # The frozen base: bfloat16 Linears, float32 ones (the fast path of the tiny DiT on a CPU:
    # bench/results/train_recipes.md), or the runtime's int8 weight-only format.
    base_dtype: str = "bfloat16"
    # Modules trained in full next to the adapters (e.g. action_proj_out, action_embedder); empty: none
    train_modules: tuple[str, ...] = ()

    def __post_init__(self):
        if self.rank < 1:
            raise ValueError(f"lora rank: expected >= 1, got {self.rank}")
        if self.base_dtype not in BASE_DTYPES:
            raise ValueError(f"base dtype: expected one of {BASE_DTYPES}, got {self.base_dtype!r}")
        if not self.targets:
            raise ValueError("lora targets: expected at least one module name")


class _FrozenWeightOnly(torch.autograd.Function):
    """x [M, K] @ (int8 data [N, K] * scale [N]).T with the runtime's kernel; the backward gives x its
    gradient through the dequantized weight and the frozen weight none."""

    @staticmethod
    def forward(ctx, x: Tensor, qdata: Tensor, scale: Tensor) -> Tensor:
        ctx.save_for_backward(qdata, scale)
        return weight_only_matmul(x, qdata, scale)

    @staticmethod
    def backward(ctx, grad: Tensor):
        qdata, scale = ctx.saved_tensors
        weight = (qdata.to(torch.float32) * scale[:, None]).to(grad.dtype)  # dequantized for this matmul only
        return grad @ weight, None, None


def frozen_quantized_linear(layer: QuantizedLinear, x: Tensor) -> Tensor:
    """`layer(x)` with gradients to x (weight-only formats: the frozen base of QLoRA-style training)."""
    if layer.fmt.activation != "none":
        raise ValueError(f"{layer}: only weight-only formats can be a frozen LoRA base (activations "
                         f"{layer.fmt.activation!r} are quantized with no gradient)")
    y = _FrozenWeightOnly.apply(x.reshape(-1, x.shape[-1]), layer.weight_qdata, layer.weight_scale)
    if layer.bias is not None:
        y = y + layer.bias
    return y.reshape(*x.shape[:-1], layer.out_features)


def _peft_lora_layer():
    from peft.tuners.lora import LoraLayer

    class LoraQuantizedLinear(nn.Module, LoraLayer):
        """PEFT LoRA layer over a runtime `QuantizedLinear` (registered as a PEFT custom module)."""

        def __init__(self, base_layer: nn.Module, adapter_name: str, config, r: int = 0, lora_alpha: int = 1,
                     **kwargs):
            super().__init__()
            LoraLayer.__init__(self, base_layer)
            self.fan_in_fan_out = False
            self._active_adapter = adapter_name
            self.update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config)

        def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
            result = frozen_quantized_linear(self.get_base_layer(), x)
            if self.disable_adapters:
                return result
            for name in self.active_adapters:
                if name not in self.lora_A:
                    continue
                a, b = self.lora_A[name], self.lora_B[name]
                h = self.lora_dropout[name](x.to(a.weight.dtype))
                result = result + (b(a(h)) * self.scaling[name]).to(result.dtype)
            return result

    return LoraQuantizedLinear


def peft_config(adapters: AdapterConfig):
    """The PEFT `LoraConfig` of `adapters`, with the runtime's QuantizedLinear registered."""
    from peft import LoraConfig

    config = LoraConfig(r=adapters.rank, lora_alpha=adapters.alpha, lora_dropout=adapters.dropout,
                        target_modules=list(adapters.targets), bias="none")
    config._register_custom_module({QuantizedLinear: _peft_lora_layer()})
    return config


def add_adapters(model: nn.Module, adapters: AdapterConfig, seed: int = 0) -> nn.Module:
    """Freeze `model` and inject LoRA adapters (fp32, B = 0: the model's output is unchanged) in place; the
    `train_modules` stay trainable. Returns the model."""
    import warnings

    from peft import inject_adapter_in_model

    model.requires_grad_(False)
    with torch.random.fork_rng(), warnings.catch_warnings():
        torch.manual_seed(seed)  # PEFT draws A (Kaiming uniform)
        # PEFT warns of every module type it has no layer for; QuantizedLinear's is registered above.
        warnings.filterwarnings("ignore", message="Unsupported layer type")
        inject_adapter_in_model(peft_config(adapters), model, adapter_name=ADAPTER_NAME)
    for name, param in model.named_parameters():
        if ".lora_" in name:
            param.data = param.data.float()
    for name in adapters.train_modules:
        model.get_submodule(name).float().requires_grad_(True)
    count = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log.info("LoRA rank %d (alpha %g) on %d Linears (%s base): %d trainable parameters", adapters.rank,
             adapters.alpha, len(lora_layers(model)), adapters.base_dtype, count)
    return model


def is_trainable(adapters: AdapterConfig):
    """The trainer's parameter filter: the adapters and the `train_modules`."""
    return lambda name: ".lora_" in name or any(name.startswith(m + ".") for m in adapters.train_modules)


def lora_layers(model: nn.Module) -> dict[str, nn.Module]:
    from peft.tuners.lora import LoraLayer

    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer)}


def delta_weight(layer, adapter: str = ADAPTER_NAME) -> Tensor:
    """(alpha / rank) B A of one LoRA layer, fp32 [out, in]."""
    return (layer.lora_B[adapter].weight.float() @ layer.lora_A[adapter].weight.float()) * layer.scaling[adapter]


def dense_weight(layer: nn.Module) -> Tensor:
    """The fp32 weight of a Linear or a QuantizedLinear (dequantized)."""
    if isinstance(layer, QuantizedLinear):
        return layer.dequantized_weight(torch.float32)
    return layer.weight.float()


def merge(model: nn.Module, dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """A new plain `WanVATransformer` in `dtype`: every adapter folded into its Linear, every quantized Linear
    dequantized, every other tensor copied."""
    layers = lora_layers(model)
    state: dict[str, Tensor] = {}
    for name, module in model.named_modules():
        if name in layers:
            base = module.get_base_layer()
            state[f"{name}.weight"] = dense_weight(base) + delta_weight(module)
            if base.bias is not None:
                state[f"{name}.bias"] = base.bias.float()
        elif isinstance(module, QuantizedLinear) and not any(name.startswith(k + ".") for k in layers):
            state[f"{name}.weight"] = dense_weight(module)
            if module.bias is not None:
                state[f"{name}.bias"] = module.bias.float()
        elif not any(name == k or name.startswith(k + ".") for k in layers):
            for pname, p in module.named_parameters(recurse=False):
                state[f"{name}.{pname}" if name else pname] = p.detach().float()
    merged = build_model(model.config, dtype=torch.float32)
    merged.load_state_dict(state, strict=True)
    return merged.to(dtype).eval().requires_grad_(False)


def save_adapters(model: nn.Module, adapters: AdapterConfig, folder: str | Path) -> Path:
    """The adapters alone: `adapter_model.safetensors` (fp32, PEFT's key names) and `adapter_config.json`."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {name.replace(f".{ADAPTER_NAME}.", "."): p.detach().float().contiguous()
               for name, p in model.named_parameters() if ".lora_" in name}
    write_file(folder / "adapter_model.safetensors", lambda tmp: save_file(tensors, str(tmp)))
    config = {**peft_config(adapters).to_dict(), "lingbot_edge": asdict(adapters)}
    write_text(folder / "adapter_config.json", json.dumps(config, indent=2, default=str))
    return folder


def checkpoint_blocks(model: nn.Module) -> None:
    """Per-block activation checkpointing: each block's activations are recomputed in the backward instead of
    kept (less memory, about one more forward of time)."""
    from torch.utils.checkpoint import checkpoint

    for block in model.blocks:
        block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)
