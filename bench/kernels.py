"""Micro-benchmark of the 8-bit kernels at the full model's FFN shape (3072 -> 14336).

    python -m bench.kernels [--tokens 16 288] [--rounds 9] [--threads 1] [--out bench/results/cpu/kernels.md]

Same process, same weights, every kernel interleaved round by round (so a busy machine slows all
of them alike), median of the rounds. Each row also reports the kernel's SQNR against the fp32
matmul of the unquantized weights: the speed of a kernel that lost accuracy would mean nothing.
16 tokens = an action forward (memory-bound: every weight read for 16 rows); 288 = a CFG video
forward of the libero preset (2 x 144 tokens).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from lingbot_edge.core.qlinear import QuantFormat, QuantizedLinear, fp8_weight_only_limbs, quantize_per_row
from lingbot_edge.flags import add_threads_arg
from lingbot_edge.io.files import write_text

IN_FEATURES, OUT_FEATURES = 3072, 14336  # ffn.net.0.proj of the full model


def sqnr_db(ref: torch.Tensor, test: torch.Tensor) -> float:
    ref, test = ref.double(), test.double()
    noise = (ref - test).pow(2).sum().item()
    return float("inf") if noise == 0 else 10 * torch.log10(ref.pow(2).sum() / noise).item()


def build_kernels(weight: torch.Tensor, dtype: torch.dtype) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    """name -> x [M, K] (dtype) -> y [M, N]: the high-precision baseline and the runtime formats."""
    w_hp = weight.to(dtype)
    qdata, scale = quantize_per_row(weight, torch.int8, int8_range=127.0)
    scale = scale.view(-1)

    def module(fmt: QuantFormat, data: torch.Tensor, s: torch.Tensor) -> QuantizedLinear:
        return QuantizedLinear.from_components(data, s, None, fmt, dtype)

    int8_wo = module(QuantFormat("int8", "none"), qdata, scale)
    int8_w8a8 = module(QuantFormat("int8", "dynamic"), qdata, scale)
    fp8_data, fp8_scale = quantize_per_row(weight, torch.float8_e4m3fn)
    fp8_wo = module(QuantFormat("float8_e4m3fn", "none"), fp8_data, fp8_scale.view(-1))
    return {
        str(dtype).replace("torch.", ""): lambda x: F.linear(x, w_hp),
        "int8 weight-only (runtime dispatch)": int8_wo,
        "int8 weight-only: _weight_int8pack_mm": lambda x: torch._weight_int8pack_mm(x, qdata, scale.to(x.dtype)),
        "int8 weight-only: dequant + F.linear (old CUDA path)":
            lambda x: F.linear(x, qdata.to(x.dtype)) * scale.to(x.dtype),
        "int8 W8A8 dynamic": int8_w8a8,
        "fp8 weight-only (runtime dispatch: CPU dequant + F.linear)": fp8_wo,
        # The CUDA sm >= 8.9 kernel; the CPU's float8 GEMM is a reference implementation: SQNR only.
        "fp8 weight-only: two fp8 limbs on _scaled_mm (CUDA path)":
            lambda x: fp8_weight_only_limbs(x, fp8_data, fp8_scale.view(-1)),
    }


def run(tokens: list[int], rounds: int, dtype: torch.dtype = torch.bfloat16, seed: int = 0,
        in_features: int = IN_FEATURES, out_features: int = OUT_FEATURES) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    # nn.Linear's default init (kaiming-uniform), the distribution the schemes' SQNR floors were measured on.
    weight = (torch.rand(out_features, in_features, generator=g) * 2 - 1) / in_features**0.5
    kernels = build_kernels(weight, dtype)
    rows = []
    with torch.no_grad():
        for m in tokens:
            x = torch.randn(m, in_features, generator=g).to(dtype)
            ref = x.float() @ weight.T
            quality = {name: sqnr_db(ref, fn(x).float()) for name, fn in kernels.items()}  # also the warm-up
            times = {name: [] for name in kernels}
            for _ in range(rounds):
                for name, fn in kernels.items():
                    start = time.perf_counter()
                    fn(x)
                    times[name].append(time.perf_counter() - start)
            base = statistics.median(times[next(iter(kernels))])
            for name in kernels:
                median = statistics.median(times[name])
                rows.append({"tokens": m, "kernel": name, "median_ms": median * 1e3,
                             "speedup_vs_hp": base / median, "sqnr_db": quality[name]})
    return rows


def render(rows: list[dict], rounds: int) -> str:
    lines = [
        f"# Kernel micro-benchmark: {IN_FEATURES} -> {OUT_FEATURES}, "
        f"CPU {platform.processor() or platform.machine()} x{torch.get_num_threads()} threads, "
        f"torch {torch.__version__}",
        "",
        f"Median of {rounds} interleaved rounds, same process and weights; speedup vs the bf16 F.linear; "
        "SQNR vs the fp32 matmul of the unquantized weights (the tested floor for int8 weight-only is 42 dB).",
        "",
        "| tokens | kernel | median ms | speedup vs bf16 | SQNR dB |",
        "|---:|---|---:|---:|---:|",
    ]
    lines += [f"| {r['tokens']} | {r['kernel']} | {r['median_ms']:.2f} | {r['speedup_vs_hp']:.2f}x "
              f"| {r['sqnr_db']:.1f} |" for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[16, 288])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--out", type=Path, default=None, help="also write the markdown table here")
    add_threads_arg(parser)  # on a shared CI box 1 avoids OpenMP spin-waits on a stolen core
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    text = render(run(args.tokens, args.rounds), args.rounds)
    print(text)
    if args.out:
        write_text(args.out, text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
