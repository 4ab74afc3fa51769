"""The 8-bit weight-only kernels read the 8-bit weight itself: compiled by inductor, their generated code
allocates no [N, K] (or [K, N]) tensor, i.e. no high-precision copy of the weight per forward. The control,
dequant + F.linear, does allocate one (what the check would catch). The float8 kernel is the CUDA one
(sm >= 8.9), compiled here on the CPU's float8 GEMM."""

import pytest
import torch
import torch.nn.functional as F
from torch._inductor.utils import run_and_get_code

from lingbot_edge.core.qlinear import fp8_weight_only_limbs, quantize_per_row, weight_only_matmul

M, K, N = 16, 64, 96  # an action forward's 16 tokens; K != N so a weight-sized buffer is unambiguous


def _weight_sized_buffers(fn, x, qdata, scale) -> list[str]:
    torch._dynamo.reset()
    with torch._inductor.config.patch(force_disable_caches=True):
        y, codes = run_and_get_code(torch.compile(fn, fullgraph=True, dynamic=False), x, qdata, scale)
    ref = x.float() @ (qdata.float() * scale[:, None]).T
    assert (y.float() - ref).abs().max() <= 2e-2 * ref.abs().max()  # and it computes the matmul
    return [shape for shape in (f"empty_strided_cpu(({N}, {K})", f"empty_strided_cpu(({K}, {N})")
            for code in codes if shape in code]


@pytest.mark.parametrize("weight", ["int8", "float8_e4m3fn"])
def test_weight_only_kernel_reads_8bit_weights(weight):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(N, K, generator=g) / K**0.5
    qdtype = getattr(torch, weight)
    qdata, scale = quantize_per_row(w, qdtype, int8_range=127.0)
    x = torch.randn(M, K, generator=g).bfloat16()
    kernel = weight_only_matmul if qdtype == torch.int8 else fp8_weight_only_limbs
    assert _weight_sized_buffers(kernel, x, qdata, scale.view(-1)) == []
    if qdtype == torch.int8:  # the control: the dequantized weight is a buffer of the generated code
        def dequant(x, q, s):
            return F.linear(x, q.to(x.dtype)) * s.to(x.dtype)
        assert _weight_sized_buffers(dequant, x, qdata, scale.view(-1)) != []
