"""`lingbot-edge bench`: the benchmark commands, registered from this package (entry point
`bench = "bench.commands:register"` in the `lingbot_edge.commands` group); the runtime never imports bench.

    lingbot-edge bench --plan [--gpu rtx4090] [--preset libero so100] [--all]   # latency model
    lingbot-edge bench --kernels [--tokens 16 288]                              # CPU/GPU kernel timings
    lingbot-edge bench --train-memory [--out bench/results/train_memory.md]     # LoRA training-step memory
"""

from __future__ import annotations

import argparse

from lingbot_edge.flags import add_threads_arg


def register(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("bench", help="latency plan per GPU (--plan) or the 8-bit kernel micro-benchmark",
                              description=__doc__.split("\n")[0])
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--plan", action="store_true", help="roofline chunk latency per preset x scheme x steps")
    what.add_argument("--kernels", action="store_true", help="time the 8-bit kernels at 3072 -> 14336")
    what.add_argument("--train-memory", action="store_true",
                      help="memory model of one LoRA training step of the 5B DiT (bench/train_memory.py)")
    from bench.plan import add_arguments

    add_arguments(p)
    p.add_argument("--tokens", type=int, nargs="+", default=[16, 288], help="--kernels: token counts")
    p.add_argument("--rounds", type=int, default=9, help="--kernels: interleaved rounds")
    add_threads_arg(p)  # --kernels: intra-op threads
    p.add_argument("--out", help="--train-memory: also write the table to this file (replaced atomically)")
    p.add_argument("--measured", nargs="*", default=[], metavar="JSON",
                   help="--train-memory: measured steps (bench.train_step_measure --json) to set against the model")
    p.set_defaults(func=_run)
    return p


def _run(args: argparse.Namespace) -> int:
    if args.train_memory:
        from bench.train_memory import run as train_memory

        print(train_memory(args.out, args.measured))
        return 0
    if args.plan:
        from bench.plan import run

        print(run(args.gpu, tuple(args.preset), args.all))
        return 0
    import torch

    from bench.kernels import render
    from bench.kernels import run as run_kernels

    if args.threads:
        torch.set_num_threads(args.threads)

    print(render(run_kernels(args.tokens, args.rounds), args.rounds))
    return 0
