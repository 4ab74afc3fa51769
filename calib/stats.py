"""Streaming activation statistics of the DiT's Linears, per module, stream and timestep bucket.

`ActivationRecorder` hooks every selected nn.Linear (forward pre-hooks: the Linear's input) and a
forward pre-hook on the model itself, which tells the Linear hooks which stream runs (video or
action) and the timestep of each token's frame. Each (module, group) keeps, in constant memory:

- `count`: rows (tokens) seen;
- `channel_absmax` [in_features] fp32: max |x| per input channel (what SmoothQuant needs);
- `sum_sq` fp64: sum of x^2 (for the RMS);
- `hist` [HIST_BINS] int64: counts of |x| in log2-spaced bins (8 per octave from 2^-32 to 2^32,
  plus an underflow bin holding zeros and an overflow bin): percentiles to ~9% relative precision.

Groups: `video/<bucket>` and `action/<bucket>` for tokens inside a denoising forward, where the
bucket comes from the token's frame timestep (`clean` = t 0: history writes, the predicted-cache
write, the pinned first frame; then `t0-250`, `t250-500`, ... for the default 4 buckets over
(0, 1000]); `prompt` for the Linears that only ever read the prompt (attn2.to_k / to_v, the text
embedder), which run once per prompt outside the denoising forwards in the static sampler.

Every update is integer counts, maxima and an fp64 sum in a fixed order, so two captures of the
same episodes give bit-identical statistics, and a capture resumed from a saved file equals an
uninterrupted one. Nothing is stored per activation: the state's size depends on the modules and
groups only, never on the number of episodes.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lingbot_edge.io.files import write_file

STATS_FORMAT = "lingbot-edge-activation-stats"
STATS_VERSION = 1
BINS_PER_OCTAVE = 8
MIN_EXP, MAX_EXP = -32, 32
HIST_BINS = (MAX_EXP - MIN_EXP) * BINS_PER_OCTAVE + 2  # + underflow (zeros) and overflow bins
_HIST_LAYOUT = {"bins": HIST_BINS, "bins_per_octave": BINS_PER_OCTAVE, "min_exp": MIN_EXP}
FIELDS = ("count", "channel_absmax", "sum_sq", "hist")
CLEAN = "clean"
PROMPT = "prompt"
# Linears whose input is the prompt context, never tokens of a denoising forward.
PROMPT_LINEARS = r"(.+\.attn2\.to_[kv]|condition_embedder(_action)?\.text_embedder\..+)"
DEFAULT_BUCKET_EDGES = (250.0, 500.0, 750.0, 1000.0)


def bucket_label(t: float, edges: Sequence[float] = DEFAULT_BUCKET_EDGES) -> str:
    """`clean` for t = 0, else `t{lo}-{hi}` of the first edge >= t (t above the last edge: the last)."""
    if t <= 0:
        return CLEAN
    lo = 0.0
    for hi in edges:
        if t <= hi:
            break
        lo = hi
    return f"t{lo:g}-{hi:g}"


def bin_edges() -> Tensor:
    """Upper edge of every histogram bin (underflow: 2^MIN_EXP; overflow: inf), fp64."""
    exps = torch.arange(1, HIST_BINS - 1, dtype=torch.float64) / BINS_PER_OCTAVE + MIN_EXP
    return torch.cat([torch.tensor([2.0**MIN_EXP], dtype=torch.float64), 2.0**exps,
                      torch.tensor([math.inf], dtype=torch.float64)])


def histogram(x: Tensor) -> Tensor:
    """Counts [HIST_BINS] int64 of |x| (x already absolute) in the log2 bins."""
    tiny = 2.0**MIN_EXP
    idx = ((torch.log2(x.clamp_min(tiny)) - MIN_EXP) * BINS_PER_OCTAVE).floor().long() + 1
    idx = torch.where(x < tiny, 0, idx.clamp(max=HIST_BINS - 1))
    return torch.bincount(idx.flatten(), minlength=HIST_BINS)


@dataclass(frozen=True)
class ModuleStats:
    """Summary of one (module, group) or of a module over several groups."""

    count: int
    absmax: float
    rms: float
    channel_absmax: Tensor  # [in_features] fp32
    hist: Tensor  # [HIST_BINS] int64

    def percentile(self, q: float) -> float:
        """Upper bin edge where the cumulative count reaches q (0..100) percent, capped at absmax."""
        total = int(self.hist.sum())
        if total == 0:
            return 0.0
        rank = math.ceil(q / 100 * total)
        i = int(torch.searchsorted(self.hist.cumsum(0), torch.tensor(max(rank, 1))))
        return min(float(bin_edges()[i]), self.absmax)

    @property
    def channel_outlier_ratio(self) -> float:
        """Largest channel absmax over the median channel absmax: ~1-3 for benign inputs."""
        median = float(self.channel_absmax.median())
        return float(self.channel_absmax.max()) / median if median > 0 else math.inf


class ActivationStats:
    """The accumulated statistics plus the ids of the episodes they cover (a mutable accumulator)."""

    def __init__(self, bucket_edges: Sequence[float] = DEFAULT_BUCKET_EDGES, meta: dict[str, Any] | None = None):
        self.bucket_edges = tuple(float(e) for e in bucket_edges)
        self.meta = dict(meta or {})  # what was captured (model, preset, data source): checked on resume
        self.episodes: list[str] = []
        self.tensors: dict[tuple[str, str], dict[str, Tensor]] = {}

    # -- accumulation ----------------------------------------------------------------------

    def update(self, module: str, group: str, x: Tensor) -> None:
        """Add rows x [N, in_features] to (module, group)."""
        a = x.detach().float().abs()
        entry = self.tensors.get((module, group))
        if entry is None:
            entry = self.tensors[(module, group)] = {
                "count": torch.zeros((), dtype=torch.int64, device=a.device),
                "channel_absmax": torch.zeros(a.shape[-1], dtype=torch.float32, device=a.device),
                "sum_sq": torch.zeros((), dtype=torch.float64, device=a.device),
                "hist": torch.zeros(HIST_BINS, dtype=torch.int64, device=a.device),
            }
        elif entry["hist"].device != a.device:  # loaded from a file (CPU), capturing on a GPU
            entry = self.tensors[(module, group)] = {k: v.to(a.device) for k, v in entry.items()}
        entry["count"] += a.shape[0]
        torch.maximum(entry["channel_absmax"], a.amax(dim=0), out=entry["channel_absmax"])
        entry["sum_sq"] += a.double().pow(2).sum()
        entry["hist"] += histogram(a)

    # -- queries ---------------------------------------------------------------------------

    @property
    def modules(self) -> list[str]:
        return sorted({m for m, _ in self.tensors})

    def groups(self, module: str | None = None) -> list[str]:
        return sorted({g for m, g in self.tensors if module is None or m == module})

    def summary(self, module: str, groups: Sequence[str] | None = None) -> ModuleStats:
        """Statistics of `module` over `groups` (default: all of its groups)."""
        keys = [(module, g) for g in (groups or self.groups(module)) if (module, g) in self.tensors]
        if not keys:
            raise KeyError(f"no statistics for {module!r} (groups {list(groups or [])})")
        entries = [self.tensors[k] for k in keys]
        count = sum(int(e["count"]) for e in entries)
        channel = torch.stack([e["channel_absmax"].cpu() for e in entries]).amax(dim=0)
        sum_sq = sum(float(e["sum_sq"]) for e in entries)
        hist = torch.stack([e["hist"].cpu() for e in entries]).sum(dim=0)
        rms = math.sqrt(sum_sq / (count * channel.numel())) if count else 0.0
        return ModuleStats(count, float(channel.max()), rms, channel, hist)

    @property
    def nbytes(self) -> int:
        """Bytes held by the statistics tensors (constant in the number of episodes)."""
        return sum(t.numel() * t.element_size() for e in self.tensors.values() for t in e.values())

    # -- files -----------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Tensor]:
        return {f"{m}::{g}::{f}": self.tensors[(m, g)][f].detach().cpu().contiguous()
                for m, g in sorted(self.tensors) for f in FIELDS}

    def save(self, path: str | Path) -> Path:
        """Write atomically (temp file in the same folder, fsync, rename): a reader, or a capture
        resumed after a crash, sees the previous complete file or the new one, never a partial one."""
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        header = {
            "format": STATS_FORMAT,
            "version": STATS_VERSION,
            "bucket_edges": list(self.bucket_edges),
            "hist": _HIST_LAYOUT,
            "episodes": self.episodes,
            "meta": self.meta,
        }
        # One metadata key: safetensors writes several in a random order, and the file's bytes must
        # not depend on it (two captures of the same data are byte-identical).
        metadata = {STATS_FORMAT: json.dumps(header, sort_keys=True)}
        return write_file(path, lambda tmp: save_file(self.state_dict(), str(tmp), metadata=metadata))

    @classmethod
    def load(cls, path: str | Path) -> ActivationStats:
        from safetensors import safe_open

        path = Path(path)
        with safe_open(str(path), framework="pt", device="cpu") as f:
            try:
                header = json.loads((f.metadata() or {})[STATS_FORMAT])
            except (KeyError, json.JSONDecodeError) as e:
                raise ValueError(f"{path}: not a {STATS_FORMAT} file") from e
            if header.get("version") != STATS_VERSION:
                raise ValueError(f"{path}: {STATS_FORMAT} version {header.get('version')!r} not supported")
            if header["hist"] != _HIST_LAYOUT:
                raise ValueError(f"{path}: histogram layout {header['hist']} differs from this version's")
            stats = cls(header["bucket_edges"], header["meta"])
            stats.episodes = list(header["episodes"])
            for key in f.keys():  # noqa: SIM118 (safe_open has no __iter__)
                module, group, field = key.split("::")
                stats.tensors.setdefault((module, group), {})[field] = f.get_tensor(key)
        return stats


# ----------------------------------------------------------------------------- recording


class ActivationRecorder:
    """Hooks that feed the inputs of `model`'s Linears (those whose name fully matches `pattern`;
    default all) into `stats`. Use as a context manager around eager forwards."""

    def __init__(self, model: nn.Module, stats: ActivationStats, pattern: str | None = None):
        self.model = model
        self.stats = stats
        self.names = [name for name, m in model.named_modules()
                      if isinstance(m, nn.Linear) and (pattern is None or re.fullmatch(pattern, name))]
        self._runs: list[tuple[str, int, int]] | None = None  # (group, first frame, end frame) of this forward
        self._frames = self._tokens = self._tokens_per_frame = 0
        self._handles: list = []

    def __enter__(self) -> ActivationRecorder:
        self._handles.append(self.model.register_forward_pre_hook(self._enter_forward, with_kwargs=True))
        self._handles.append(self.model.register_forward_hook(self._exit_forward, always_call=True))
        for name in self.names:
            self._handles.append(self.model.get_submodule(name).register_forward_pre_hook(self._observer(name)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _enter_forward(self, module, args, kwargs):
        x, t_frames = args[0], args[1]
        stream = "action" if kwargs.get("action") else "video"
        frames = x.shape[2]
        if stream == "action":
            tokens_per_frame = x.shape[3] * x.shape[4]
        else:
            _, ph, pw = module.config.patch_size
            tokens_per_frame = (x.shape[3] // ph) * (x.shape[4] // pw)
        labels = [f"{stream}/{bucket_label(t, self.stats.bucket_edges)}" for t in t_frames.tolist()]
        runs: list[tuple[str, int, int]] = []
        for i, label in enumerate(labels):  # frames of one bucket are contiguous: merge them
            if runs and runs[-1][0] == label:
                runs[-1] = (label, runs[-1][1], i + 1)
            else:
                runs.append((label, i, i + 1))
        self._runs, self._frames, self._tokens_per_frame = runs, frames, tokens_per_frame
        self._tokens = frames * tokens_per_frame

    def _exit_forward(self, module, args, out):
        self._runs = None

    def _observer(self, name: str):
        prompt_only = re.fullmatch(PROMPT_LINEARS, name) is not None

        def hook(module, args):
            x = args[0]
            for group, rows in self._split(x, prompt_only):
                self.stats.update(name, group, rows)

        return hook

    def _split(self, x: Tensor, prompt_only: bool) -> Iterator[tuple[str, Tensor]]:
        """(group, rows [N, in]) of one Linear input: by token (x [B, L, in] with L the forward's
        tokens) or by frame (x [F, in]: the timestep embedders); prompt context: one group."""
        if prompt_only or self._runs is None:
            yield PROMPT, x.reshape(-1, x.shape[-1])
        elif x.dim() == 3 and x.shape[1] == self._tokens:
            tpf = self._tokens_per_frame
            for group, a, b in self._runs:
                yield group, x[:, a * tpf: b * tpf].reshape(-1, x.shape[-1])
        elif x.dim() == 2 and x.shape[0] == self._frames:
            for group, a, b in self._runs:
                yield group, x[a:b]
        else:
            raise ValueError(f"unexpected Linear input shape {tuple(x.shape)} in a forward of "
                             f"{self._frames} frames / {self._tokens} tokens")


@contextmanager
def recording(model: nn.Module, stats: ActivationStats, pattern: str | None = None):
    with ActivationRecorder(model, stats, pattern) as recorder:
        yield recorder
