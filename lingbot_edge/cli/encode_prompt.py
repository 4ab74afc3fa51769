"""`lingbot-edge encode-prompt`: precompute prompt embeddings into the prompt cache.

    lingbot-edge encode-prompt --checkpoint DIR --prompt "pick up the red block" [--prompt ...]
        [--cache-dir DIR] [--device cpu|cuda] [--dtype bf16|fp16|fp32]
        [--tokenizer DIR] [--text-encoder DIR] [--max-sequence-length 512] [--no-negative]

Loads the tokenizer and UMT5 only if some prompt is not cached yet, encodes what is missing (and the
empty negative prompt used under CFG), writes one safetensors file per text and releases UMT5. A
policy started later with the same checkpoint, cache folder and text-encoder dtype finds every
embedding there and never loads UMT5. Prints one line per text: source (encoded / disk), key, file.
"""

from __future__ import annotations

import argparse
import logging

from lingbot_edge.flags import add_device_arg, add_dtype_arg

log = logging.getLogger(__name__)



def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "encode-prompt",
        help="precompute prompt embeddings (UMT5) into the prompt cache",
        description="Encode prompts with the checkpoint's tokenizer + UMT5 once and store the embeddings in the "
                    "prompt cache, so a policy started later never loads UMT5 for them.",
    )
    p.add_argument("--checkpoint", required=True, metavar="DIR",
                   help="checkpoint root: released layout (tokenizer/, text_encoder/) or a LeRobot policy folder")
    p.add_argument("--prompt", action="append", required=True, metavar="TEXT",
                   help="a task prompt (repeat for several)")
    p.add_argument("--cache-dir", default=None, metavar="DIR",
                   help="prompt cache folder (default: $LINGBOT_EDGE_CACHE/prompts or ~/.cache/lingbot_edge/prompts)")
    add_device_arg(p, "where UMT5 runs")
    add_dtype_arg(p, "bf16", "UMT5 dtype, part of the cache key: use the policy's text_encoder_dtype")
    p.add_argument("--tokenizer", default=None, metavar="DIR",
                   help="tokenizer folder (default: <checkpoint>/tokenizer)")
    p.add_argument("--text-encoder", default=None, metavar="DIR",
                   help="text encoder folder (default: <checkpoint>/text_encoder)")
    p.add_argument("--max-sequence-length", type=int, default=512, help="token padding length (default 512)")
    p.add_argument("--no-negative", action="store_true", help="skip the empty negative prompt used under CFG")
    p.set_defaults(func=run_encode_prompt)
    return p


def run_encode_prompt(args: argparse.Namespace) -> int:
    import torch

    from lingbot_edge.io.layout import CheckpointError, resolve_checkpoint
    from lingbot_edge.io.loading import build_prompt_cache, runtime_defaults

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = runtime_defaults("cpu", args.dtype)[1]
    try:
        layout = resolve_checkpoint(args.checkpoint, text_encoder=args.text_encoder, tokenizer=args.tokenizer,
                                    parts=("text_encoder", "tokenizer"))
    except CheckpointError as e:
        log.error("%s", e)
        return 2
    cache = build_prompt_cache(
        layout, max_sequence_length=args.max_sequence_length, device="cpu", dtype=dtype,
        text_encoder_device=device, text_encoder_dtype=dtype,
        cache_dir=args.cache_dir,
    )
    results = cache.precompute(args.prompt, negative=not args.no_negative)
    for text, source, path in results:
        key = path.stem if path is not None else "-"
        print(f"{source:8s} {key[:16]}  {path}  {text!r}")
    report = cache.memory_report
    before, after = report["gpu_allocated_before_release"], report["gpu_allocated_after_release"]
    if before is not None:
        print(f"UMT5 on {report['text_encoder_device']}: GPU memory allocated {before / 2**20:.1f} MiB before "
              f"release, {after / 2**20:.1f} MiB after")
    print(f"{sum(s == 'encoded' for _, s, _ in results)} encoded, {sum(s != 'encoded' for _, s, _ in results)} cached"
          f" in {cache.cache_dir}")
    return 0
