"""Quantization of the LingBot-VA DiT: int8 / fp8 via torchao, optimum-quanto and bitsandbytes.

    from quantize import SCHEMES, quantize_, quantize_checkpoint, QuantPlan

    quantize_(model, SCHEMES["int8_weight_only"])             # default plan: the block Linears
    quantize_(model, QuantPlan.from_json("plan.json"))          # per-FQN / regex plan
    quantize_checkpoint("ckpt/transformer", SCHEMES["fp8_weight_only"], "ckpt-fp8")

Backends only quantize (compute the 8-bit data and scales); the runtime `lingbot_edge.io.quantized`
owns the stored format, the kernels and the loader (`load_quantized`), so deployed models need
none of these libraries. Import direction: `calib -> quantize -> lingbot_edge`, never back.
"""

from .api import (
    QuantizeResult,
    SummaryRow,
    calibrate_input_scales,
    format_summary,
    plan_summary,
    provenance,
    quantize_,
    quantize_checkpoint,
)
from .plan import KEEP, QuantPlan, default_plan
from .schemes import SCHEMES, BitsAndBytesScheme, QuantoScheme, Scheme, TorchAOScheme, get_scheme, scheme_name

__all__ = [
    "KEEP",
    "SCHEMES",
    "BitsAndBytesScheme",
    "QuantPlan",
    "QuantizeResult",
    "QuantoScheme",
    "Scheme",
    "SummaryRow",
    "TorchAOScheme",
    "calibrate_input_scales",
    "default_plan",
    "format_summary",
    "get_scheme",
    "plan_summary",
    "provenance",
    "quantize_",
    "quantize_checkpoint",
    "scheme_name",
]
