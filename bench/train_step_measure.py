"""One LoRA training step of the full-size DiT on the CPU, measured (the check of `bench.train_memory`).

    nice -n 19 env OMP_NUM_THREADS=1 python -m bench.train_step_measure --chunks 2 --json out/step.json

What runs: the 5B `full` DiT with random weights, built block by block straight into bf16 (never a full fp32
copy); its block Linears quantized to the runtime's int8 weight-only format by `quantize.quantize_` (or kept
in bf16 with `--base bf16`); rank-r LoRA adapters (`LoRALinear`, below: a minimal adapter, not PEFT) on the
block Linears of attention, cross-attention and FFN; per-block activation checkpointing; then one training
step of a synthetic so100 episode of `--chunks` chunks through `train.trainer.FlowMatchingLoss` (the
trainer's own objective: `teacher_forced_forward` on the grounded layout), its backward and an AdamW step over
the adapters.

What it counts:
- `rss_*`: the process's resident set (/proc/self/status VmRSS, and VmHWM for the peak), in bytes;
- `live_peak_bytes`: the peak of live tensor bytes during the step (`LiveTensorBytes`), what a GPU's
  `max_memory_allocated` would report for the same tensors;
- `step_peak_above_baseline`: VmHWM during the step minus the RSS before the model was built (the
  interpreter, torch and the imports excluded), the number compared with the memory model's CPU prediction.
  glibc's mmap threshold is fixed at `--mmap-threshold` (64 KiB) first, so freed tensors leave the RSS:
  with glibc's dynamic default, freed heap memory below 32 MiB stays resident and the RSS peak measures the
  allocator's fragmentation as much as the step.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import logging
import math
import time
import weakref
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.weak import WeakIdKeyDictionary

from bench.train_memory import model_prediction
from lingbot_edge.core.config import MODEL_PRESETS, ModelConfig, PolicyConfig, get_policy_config
from lingbot_edge.core.model import WanVATransformer
from lingbot_edge.core.qlinear import QuantizedLinear
from lingbot_edge.io.files import write_text
from quantize import SCHEMES, quantize_
from train.config import TrainConfig
from train.trainer import EpisodeTensors, FlowMatchingLoss, LossSettings

log = logging.getLogger(__name__)

# The Linears of every block that take adapters: self-attention, cross-attention (its K/V project the prompt),
# FFN. Both streams run through the same blocks, so these adapt the video and the action stream alike.
LORA_TARGETS = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0",
                "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0",
                "ffn.net.0.proj", "ffn.net.2")


# ----------------------------------------------------------------------------- adapters


class _FrozenQuantizedMatmul(torch.autograd.Function):
    """y = x @ W.T through a frozen `QuantizedLinear` (its own kernel), with the input's gradient
    grad_x = (grad_y * scale) @ qdata: the runtime kernels cast to int8 inside (no autograd through them)."""

    @staticmethod
    def forward(ctx, x: Tensor, base: QuantizedLinear) -> Tensor:
        ctx.base = base
        with torch.no_grad():
            return base(x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        base = ctx.base
        grad = grad * base.weight_scale.to(grad.dtype)
        return grad @ base.weight_qdata.to(grad.dtype), None


class LoRALinear(nn.Module):
    """A frozen Linear (nn.Linear or the runtime's int8 `QuantizedLinear`) plus a trainable low-rank update,
    y = base(x) + (alpha / rank) * x A.T B.T. The adapter's parameters are stored in `dtype` (fp32 master
    weights or bf16) and computed in the activations' dtype, so the only activation it adds is x A.T
    ([tokens, rank]); B starts at zero (the adapted model starts as the base)."""

    def __init__(self, base: nn.Module, rank: int, alpha: float | None = None, dtype: torch.dtype = torch.float32):
        super().__init__()
        if rank < 1:
            raise ValueError(f"rank: expected >= 1, got {rank}")
        self.base = base.requires_grad_(False)
        self.rank = rank
        self.scaling = (alpha if alpha is not None else rank) / rank
        device = base.weight_qdata.device if isinstance(base, QuantizedLinear) else base.weight.device
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, dtype=dtype, device=device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, dtype=dtype, device=device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def forward(self, x: Tensor) -> Tensor:
        y = _FrozenQuantizedMatmul.apply(x, self.base) if isinstance(self.base, QuantizedLinear) else self.base(x)
        low = F.linear(x, self.lora_A.to(x.dtype))
        return y + F.linear(low, (self.lora_B * self.scaling).to(x.dtype))


def add_lora(model: WanVATransformer, rank: int, alpha: float | None = None,
             dtype: torch.dtype = torch.float32) -> list[nn.Parameter]:
    """Freeze `model` and put a `LoRALinear` on every `LORA_TARGETS` Linear of every block; returns the
    adapters' parameters (the only trainable ones)."""
    model.requires_grad_(False)
    params = []
    for blk in model.blocks:
        for name in LORA_TARGETS:
            adapter = LoRALinear(blk.get_submodule(name), rank, alpha, dtype)
            blk.set_submodule(name, adapter)
            params += [adapter.lora_A, adapter.lora_B]
    return params


def checkpoint_blocks(model: WanVATransformer) -> None:
    """Per-block activation checkpointing: each block keeps only its inputs and recomputes its activations
    in the backward pass (torch.utils.checkpoint, non-reentrant). State-dict keys do not change."""
    for blk in model.blocks:
        blk.forward = functools.partial(torch.utils.checkpoint.checkpoint, blk.forward, use_reentrant=False)


# ----------------------------------------------------------------------------- the full-size model, built lean


def _init_random_(module: nn.Module, generator: torch.Generator) -> None:
    """Random weights that keep activations O(1): Linears N(0, 1/in), zero biases; norms as built."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=m.in_features ** -0.5, generator=generator)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.LayerNorm, nn.RMSNorm)) and m.weight is not None:
            nn.init.ones_(m.weight)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)
    for name, p in module.named_parameters(recurse=False):
        if name == "scale_shift_table":
            nn.init.normal_(p, std=p.shape[-1] ** -0.5, generator=generator)


def _in_block(index: int, module: nn.Module, fqn: str) -> bool:
    return fqn.startswith(f"blocks.{index}.")


def build_random_model(mc: ModelConfig, base: str = "int8", seed: int = 0) -> WanVATransformer:
    """The DiT of `mc` with random weights, built on the meta device and materialized one block at a time in
    bf16; with `base` "int8" each block's Linears are quantized (`quantize.quantize_`, int8 weight-only) before
    the next block exists, so the peak is the int8 model plus one bf16 block."""
    if base not in ("int8", "bf16"):
        raise ValueError(f"base: expected 'int8' or 'bf16', got {base!r}")
    gen = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        model = WanVATransformer(mc).to(torch.bfloat16)
    for name, child in model.named_children():
        if name != "blocks":
            child.to_empty(device="cpu")
            _init_random_(child, gen)
    model.scale_shift_table = nn.Parameter(torch.randn(model.scale_shift_table.shape, generator=gen).to(
        torch.bfloat16) * mc.dim ** -0.5)
    for i, blk in enumerate(model.blocks):
        blk.to_empty(device="cpu")
        _init_random_(blk, gen)
        if base == "int8":
            quantize_(model, SCHEMES["int8_weight_only"], filter_fn=functools.partial(_in_block, i), device="cpu")
    return model.eval().requires_grad_(False)


def synthetic_episode(cfg: PolicyConfig, chunks: int, batch: int = 1, seed: int = 0):
    """Random latents, actions and prompt embeddings shaped as `train.trainer.EpisodeTensors` holds them."""
    mc = cfg.model_config
    g = torch.Generator().manual_seed(seed)
    h, w = cfg.latent_hw
    video = torch.randn(batch, chunks, mc.in_channels, cfg.frame_chunk_size, h, w, generator=g)
    action = torch.randn(batch, chunks, mc.action_dim, cfg.frame_chunk_size, cfg.action_per_frame, 1, generator=g)
    text = torch.randn(batch, cfg.max_sequence_length, mc.text_dim, generator=g)
    return EpisodeTensors(video, action.clamp(-1, 1), text)


# ----------------------------------------------------------------------------- measuring


def set_mmap_threshold(nbytes: int) -> bool:
    """glibc: serve every allocation of `nbytes` or more by mmap, so a freed tensor leaves the RSS at once (the
    default threshold grows to 32 MiB, and freed heap memory below it stays resident). False where no glibc."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(-3, int(nbytes)))  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        return False


def status_bytes(key: str) -> int:
    """VmRSS / VmHWM (peak RSS) of this process in bytes (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {key}: this measurement needs Linux")


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux: write 5 to /proc/self/clear_refs); False where not allowed."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


class LiveTensorBytes(TorchDispatchMode):
    """The bytes of live tensor storages while it is active, and their peak: every storage an op returns
    (and every tensor given to `track`) counts once, until it is freed. What `torch.cuda.max_memory_allocated`
    reports on a GPU, without the caching allocator's rounding."""

    def __init__(self):
        super().__init__()
        self._sizes = WeakIdKeyDictionary()
        self._refs = {}
        self.now = self.peak = 0
        self.peak_op = ""  # the op that allocated the peak's last bytes

    def track(self, *tensors: Tensor) -> None:
        for t in tensors:
            if isinstance(t, Tensor) and t.device.type != "meta" and not t.is_sparse:
                st = t.untyped_storage()
                if st in self._sizes:
                    continue
                n = st.nbytes()
                key = id(st)
                self._sizes[st] = n
                self._refs[key] = weakref.ref(st, functools.partial(self._freed, key, n))
                self.now += n
                self.peak = max(self.peak, self.now)

    def _freed(self, key: int, n: int, _ref) -> None:
        self._refs.pop(key, None)
        self.now -= n

    def reset_peak(self) -> None:
        self.peak = self.now

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        before = self.peak
        self.track(*torch.utils._pytree.tree_leaves(out))
        if self.peak > before:
            self.peak_op = str(func)
        return out


def make_objective(cfg: PolicyConfig, chunks: int):
    """The trainer's objective for `chunks`-chunk episodes, its attention backend built (once per run, as in
    `train.trainer.train`)."""
    objective = FlowMatchingLoss(cfg, chunks, LossSettings.of(TrainConfig()))
    objective.layout.attention  # noqa: B018  (built here, not inside the measured step)
    return objective


def train_step(model: WanVATransformer, params: list[nn.Parameter], objective, episode,
               lr: float = 1e-4) -> dict[str, float]:
    """One step of the trainer's objective (grounded layout, noisy PREDICTED copy at the sampler's sigma, action
    weight 4, `TrainConfig` defaults) over `params`: forward, backward, gradient clipping, AdamW."""
    tc = TrainConfig()
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.99), weight_decay=tc.weight_decay)
    gen = torch.Generator().manual_seed(0)
    loss_v, parts = objective(model, episode.video, episode.action, episode.text, gen)
    loss = loss_v + tc.action_weight * parts.pop("_action")
    loss.backward()
    grad_norm = float(torch.nn.utils.clip_grad_norm_(params, tc.grad_clip))
    opt.step()
    return {**parts, "loss": loss.item(), "grad_norm": grad_norm}


def measure(preset: str = "so100", chunks: int = 2, base: str = "int8", rank: int = 16,
            adapter_dtype: str = "float32", layers: int | None = None, checkpointing: bool = True,
            track_tensors: bool = True) -> dict:
    """Build, adapt and train one step in this process; returns the RSS and tensor figures (bytes)."""
    import torchao.quantization  # noqa: F401  (imported before the baseline: modules are not the step's memory)

    cfg = get_policy_config(preset)
    mc = MODEL_PRESETS[cfg.model]
    if layers is not None:
        mc = dataclasses.replace(mc, num_layers=layers)  # the robot side stays the preset's
    rss_baseline = status_bytes("VmRSS")
    t0 = time.perf_counter()
    model = build_random_model(mc, base)
    params = add_lora(model, rank, dtype=getattr(torch, adapter_dtype))
    if checkpointing:
        checkpoint_blocks(model)
    episode = synthetic_episode(cfg, chunks)
    objective = make_objective(cfg, chunks)
    build_s = time.perf_counter() - t0
    rss_built = status_bytes("VmRSS")
    hwm_build = status_bytes("VmHWM")
    reset_ok = reset_peak_rss()
    tracker = LiveTensorBytes()
    t1 = time.perf_counter()
    if track_tensors:
        tracker.track(*model.parameters(), *model.buffers(), episode.video, episode.action, episode.text,
                      objective.layout.mask, *(bias for *_, bias in objective.layout.attention.segments))
        start_bytes = tracker.now
        with tracker:
            result = train_step(model, params, objective, episode)
    else:
        start_bytes = 0
        result = train_step(model, params, objective, episode)
    step_s = time.perf_counter() - t1
    hwm = status_bytes("VmHWM")
    out = {
        "preset": preset, "chunks": chunks, "base": base, "rank": rank, "adapter_dtype": adapter_dtype,
        "layers": mc.num_layers, "checkpointing": checkpointing, "threads": torch.get_num_threads(),
        "adapter_params": sum(p.numel() for p in params),
        "rss_baseline": rss_baseline, "rss_built": rss_built, "rss_hwm_build": hwm_build,
        "rss_hwm_step": hwm, "peak_rss_reset": reset_ok,
        "peak_above_baseline": max(hwm, hwm_build) - rss_baseline,
        "step_peak_above_baseline": hwm - rss_baseline,
        "live_start_bytes": start_bytes, "live_peak_bytes": tracker.peak if track_tensors else None,
        "live_peak_op": tracker.peak_op if track_tensors else None,
        "build_s": build_s, "step_s": step_s, **result,
    }
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="so100", help="policy preset of the episode (default so100)")
    parser.add_argument("--chunks", type=int, default=2, help="episode length in chunks (default 2)")
    parser.add_argument("--base", default="int8", choices=("int8", "bf16"), help="frozen base weights")
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank (default 16)")
    parser.add_argument("--adapter-dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--layers", type=int, help="blocks of the DiT (default: the preset's, 30)")
    parser.add_argument("--no-checkpointing", action="store_true", help="keep every block's activations")
    parser.add_argument("--no-track", action="store_true", help="RSS only (no per-op tensor tracking)")
    parser.add_argument("--mmap-threshold", type=int, default=65536,
                        help="glibc M_MMAP_THRESHOLD in bytes (default 64 KiB: freed tensors leave the RSS; 0 keeps "
                             "glibc's dynamic default, whose freed heap memory below 32 MiB stays resident)")
    parser.add_argument("--json", help="write the figures as JSON (atomically)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    mmap_set = bool(args.mmap_threshold) and set_mmap_threshold(args.mmap_threshold)
    out = measure(args.preset, args.chunks, args.base, args.rank, args.adapter_dtype, args.layers,
                  not args.no_checkpointing, not args.no_track)
    out.update(model_prediction(out), mmap_threshold=args.mmap_threshold if mmap_set else None)
    text = json.dumps(out, indent=1)
    print(text)
    if args.json:
        write_text(args.json, text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
