"""Prompt embeddings computed once, kept in memory and on disk; UMT5 loaded only on a miss and released.

docs/design.md section 3 ("Prompt"): a prompt's embedding is UMT5's `last_hidden_state` over the T5 tokens
padded to 512, zero past the real length, and the empty negative prompt is encoded the same way under
CFG. Nothing else in the policy needs UMT5 (5.7B parameters, ~11 GB in bf16), so:

- every text (a prompt, or the negative "") is one cache entry, looked up in memory, then on disk
  (`<cache_dir>/<key>.safetensors`), and only then encoded;
- the text encoder is built by a caller-supplied factory on the first miss (it is never loaded when
  every text hits), encodes what is missing, and is released at once: the last reference is dropped,
  `gc.collect()` runs and, on CUDA, `torch.cuda.empty_cache()` returns its memory to the driver;
  `memory_report` records what the allocator held before and after;
- the disk entry stores the real positions only ([seq_len, d_model] in the encoder's output dtype);
  re-padding with zeros gives back the exact tensor, so a warm start is bit-identical to a cold one.

The key is a sha256 over the cleaned text, `max_sequence_length`, the encoder's output dtype and a
fingerprint of the tokenizer and text-encoder files (`tokenizer_fingerprint`, `weights_fingerprint`):
another tokenizer, other weights or another length can never be served a stale entry.
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import os
import re
import struct
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lingbot_edge.io.device_memory import gpu_memory
from lingbot_edge.io.encoders import UMT5PromptEncoder, clean_prompt
from lingbot_edge.io.files import is_temp_path, write_file

log = logging.getLogger(__name__)

CACHE_ENV = "LINGBOT_EDGE_CACHE"
FORMAT = "lingbot_edge.prompt_embeds/1"
# Bytes read from the start and from the end of every tensor by `weights_fingerprint`.
SAMPLE_BYTES = 4096


def default_cache_dir() -> Path:
    """`$LINGBOT_EDGE_CACHE/prompts` if that variable is set, else `~/.cache/lingbot_edge/prompts`."""
    root = os.environ.get(CACHE_ENV)
    return (Path(root).expanduser() if root else Path.home() / ".cache" / "lingbot_edge") / "prompts"


ENTRY_PATTERN = re.compile(r"[0-9a-f]{64}\.safetensors")


def check_cache_dir(folder: Path) -> None:
    """A prompt-cache folder is absent, empty or holds cache entries only (and this tool's temp files):
    the cache writes its entries into it and never into a folder of other files."""
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"prompt cache_dir {folder}: exists and is not a folder")
    if folder.is_dir():
        foreign = sorted(p.name for p in folder.iterdir() if not ENTRY_PATTERN.fullmatch(p.name)
                         and not is_temp_path(p))
        if foreign:
            raise ValueError(f"prompt cache_dir {folder}: holds files that are not prompt-cache entries "
                             f"({', '.join(foreign[:5])}{', ...' if len(foreign) > 5 else ''}); give it a folder of "
                             "its own (default: ~/.cache/lingbot_edge/prompts)")
    folder.mkdir(parents=True, exist_ok=True)


# --------------------------------------------------------------------------------------------------
# Fingerprints of the frozen files
# --------------------------------------------------------------------------------------------------


def tokenizer_fingerprint(folder: str | Path) -> str:
    """sha256 over the name, size and full content of every file in a tokenizer folder.

    Tokenizer folders are small (UMT5's: ~20 MB, ~20 ms to hash), so all bytes are hashed."""
    folder = Path(folder)
    h = hashlib.sha256(b"tokenizer/1\0")
    for path in sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")):
        h.update(f"{path.name}\0{path.stat().st_size}\0".encode())
        with path.open("rb") as f:
            for block in iter(lambda f=f: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def weights_fingerprint(folder: str | Path) -> str:
    """sha256 identifying a text-encoder folder without reading its weights.

    Hashing all bytes of UMT5-XXL (~11 GB bf16) would read the whole model at every start, about as
    slow as loading it: the very cost the cache avoids. Instead this hashes, per `*.safetensors` file:
    its name and size, the full JSON header (every tensor's name, dtype, shape and byte offsets), and
    the first and last `SAMPLE_BYTES` bytes of every tensor (~2 MB read for UMT5-XXL); plus every
    `*.json` (config.json, the shard index) in full. Any change of architecture, dtype, layout or size
    changes the key, and so does any retraining or fine-tune (it changes every tensor's leading and
    trailing values). What it can miss is an in-place edit that only touches the middle of tensors
    and keeps every size: swap such weights under a new folder, or clear the cache. mtimes are left
    out on purpose: a copied checkpoint keeps its cache entries.
    """
    folder = Path(folder)
    h = hashlib.sha256(b"weights/1\0")
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in (".json", ".safetensors"))
    for path in files:
        size = path.stat().st_size
        h.update(f"{path.name}\0{size}\0".encode())
        with path.open("rb") as f:
            if path.suffix == ".json":
                h.update(f.read())
                continue
            (n,) = struct.unpack("<Q", f.read(8))
            header_bytes = f.read(n)
            h.update(header_bytes)
            header = json.loads(header_bytes)
            base = 8 + n
            for name in sorted(k for k in header if k != "__metadata__"):
                start, end = header[name]["data_offsets"]
                for offset, length in ((start, min(SAMPLE_BYTES, end - start)),
                                       (max(start, end - SAMPLE_BYTES), min(SAMPLE_BYTES, end - start))):
                    f.seek(base + offset)
                    h.update(f.read(length))
    return h.hexdigest()


# --------------------------------------------------------------------------------------------------
# The cache
# --------------------------------------------------------------------------------------------------


class PromptCache:
    """Prompt -> embedding [1, max_sequence_length, text_dim] with a memory and a disk tier: the
    `core.protocols.PromptEncoder` that `loading.load_policy` gives the policy.

    `encoder_factory()` returns a `UMT5PromptEncoder` (tokenizer + UMT5 on its device, output dtype
    `encoder_dtype`); it is called only on a miss, and the encoder is released after the texts that
    missed are encoded (`release_after_encode`). `fingerprint` identifies tokenizer + weights (see
    `tokenizer_fingerprint` / `weights_fingerprint`); `cache_dir=None` keeps the memory tier only.
    Results are returned on `device` in `dtype` (the DiT's); the disk keeps the encoder's output.

    `memory_report` (all sizes in bytes, None where not measured / not on CUDA):
      `text_encoder_loads`: how many times the factory ran; `text_encoder_device`;
      `gpu_allocated_before_release` / `gpu_allocated_after_release`, `gpu_reserved_before_release` /
      `gpu_reserved_after_release`: `torch.cuda.memory_allocated` / `memory_reserved` of the encoder's
      device just before and after the last release; `gpu_freed_bytes`: allocated before - after.
    `stats`: `memory_hits`, `disk_hits`, `misses` (texts encoded), `disk_writes`, `disk_rejects`.
    """

    def __init__(
        self,
        encoder_factory: Callable[[], UMT5PromptEncoder],
        *,
        fingerprint: str,
        text_dim: int,
        max_sequence_length: int = 512,
        encoder_dtype: torch.dtype = torch.bfloat16,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        cache_dir: str | Path | None = None,
        negative_prompt: str = "",
        release_after_encode: bool = True,
    ) -> None:
        if max_sequence_length < 1:
            raise ValueError(f"max_sequence_length: expected >= 1, got {max_sequence_length}")
        self.encoder_factory = encoder_factory
        self.fingerprint = fingerprint
        self.text_dim = int(text_dim)
        self.max_sequence_length = int(max_sequence_length)
        self.encoder_dtype = encoder_dtype
        self.device = torch.device(device)
        self.dtype = dtype
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir is not None else None
        if self.cache_dir is not None and self.cache_dir.exists():
            check_cache_dir(self.cache_dir)  # at start, not at the first miss mid-episode
        self.negative_prompt = negative_prompt
        self.release_after_encode = release_after_encode
        self._memory: dict[str, Tensor] = {}
        self._encoder: UMT5PromptEncoder | None = None
        self.stats = {"memory_hits": 0, "disk_hits": 0, "misses": 0, "disk_writes": 0, "disk_rejects": 0}
        self.memory_report: dict[str, Any] = {
            "text_encoder_loads": 0,
            "text_encoder_device": None,
            "gpu_allocated_before_release": None,
            "gpu_allocated_after_release": None,
            "gpu_reserved_before_release": None,
            "gpu_reserved_after_release": None,
            "gpu_freed_bytes": None,
        }

    @classmethod
    def from_encoder(cls, encoder: UMT5PromptEncoder, device: str | torch.device | None = None,
                     dtype: torch.dtype | None = None) -> PromptCache:
        """Memory-only cache around an already-built encoder, which is kept (it cannot be rebuilt)."""
        cache = cls(
            lambda: encoder,
            fingerprint=f"in-process-{id(encoder)}",
            text_dim=int(encoder.text_encoder.config.d_model),
            max_sequence_length=encoder.max_sequence_length,
            encoder_dtype=encoder.dtype,
            device=device if device is not None else encoder.device,
            dtype=dtype if dtype is not None else encoder.dtype,
            release_after_encode=False,
        )
        return cache

    # ------------------------------------------------------------------ keys and files

    def key(self, prompt: str) -> str:
        """sha256 hex of (format, cleaned text, max length, encoder output dtype, fingerprint)."""
        if not isinstance(prompt, str):
            raise TypeError(f"prompt: expected str, got {type(prompt).__name__}")
        payload = json.dumps(
            [FORMAT, clean_prompt(prompt), self.max_sequence_length, str(self.encoder_dtype), self.fingerprint]
        )
        return hashlib.sha256(payload.encode()).hexdigest()

    def path(self, prompt: str) -> Path | None:
        return self.cache_dir / f"{self.key(prompt)}.safetensors" if self.cache_dir is not None else None

    def _read(self, key: str) -> Tensor | None:
        """The stored [seq_len, text_dim] tensor, or None when absent or not what this key expects."""
        from safetensors import safe_open

        path = self.cache_dir / f"{key}.safetensors"
        if not path.is_file():
            return None
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                meta = f.metadata() or {}
                emb = f.get_tensor("embeds") if "embeds" in f.keys() else None  # noqa: SIM118
        except Exception as e:  # any unreadable entry is a miss, then overwritten
            problem = f"unreadable ({e})"
        else:
            expected = f"[1..{self.max_sequence_length}, {self.text_dim}] {self.encoder_dtype}"
            problem = None
            if meta.get("format") != FORMAT or meta.get("key") != key:
                problem = f"metadata format/key {meta.get('format')!r}/{meta.get('key')!r} != {FORMAT!r}/{key!r}"
            elif emb is None:
                problem = "no 'embeds' tensor"
            elif (emb.ndim != 2 or not 1 <= emb.shape[0] <= self.max_sequence_length
                  or emb.shape[1] != self.text_dim or emb.dtype != self.encoder_dtype):
                problem = f"'embeds' is {list(emb.shape)} {emb.dtype}, expected {expected}"
            elif not torch.isfinite(emb).all():
                problem = "'embeds' has non-finite values"
        if problem is not None:
            self.stats["disk_rejects"] += 1
            log.warning("prompt cache: ignoring %s: %s; re-encoding", path, problem)
            return None
        return emb

    def _write(self, key: str, prompt: str, emb: Tensor) -> Path:
        """Atomic: a temporary file in the cache folder, then os.replace (readers see old or new)."""
        from safetensors.torch import save_file

        check_cache_dir(self.cache_dir)
        path = self.cache_dir / f"{key}.safetensors"
        meta = {
            "format": FORMAT,
            "key": key,
            "prompt": clean_prompt(prompt),
            "max_sequence_length": str(self.max_sequence_length),
            "encoder_dtype": str(self.encoder_dtype),
            "fingerprint": self.fingerprint,
        }
        data = {"embeds": emb.detach().contiguous().cpu()}
        write_file(path, lambda tmp: save_file(data, str(tmp), metadata=meta))  # also sweeps stale temp files
        self.stats["disk_writes"] += 1
        return path

    # ------------------------------------------------------------------ encoder lifetime

    def _get_encoder(self) -> UMT5PromptEncoder:
        if self._encoder is None:
            log.info("prompt cache miss: loading the text encoder")
            self._encoder = self.encoder_factory()
            self.memory_report["text_encoder_loads"] += 1
            self.memory_report["text_encoder_device"] = str(self._encoder.device)
            enc = self._encoder
            if enc.max_sequence_length != self.max_sequence_length or enc.dtype != self.encoder_dtype:
                raise ValueError(
                    f"encoder_factory: built an encoder with max_sequence_length={enc.max_sequence_length}"
                    f" dtype={enc.dtype}, expected {self.max_sequence_length} / {self.encoder_dtype}"
                )
        return self._encoder

    def release_encoder(self) -> None:
        """Free the text encoder: drop every reference, collect, and give CUDA memory back."""
        if self._encoder is None:
            return
        device = self._encoder.device
        before = gpu_memory(device)
        self._encoder.release()
        self._encoder = None
        gc.collect()
        if device.type == "cuda" and torch.cuda.is_available():
            torch.cuda.empty_cache()
        after = gpu_memory(device)
        freed = None if before["allocated"] is None else before["allocated"] - after["allocated"]
        self.memory_report.update(
            gpu_allocated_before_release=before["allocated"],
            gpu_allocated_after_release=after["allocated"],
            gpu_reserved_before_release=before["reserved"],
            gpu_reserved_after_release=after["reserved"],
            gpu_freed_bytes=freed,
        )
        if before["allocated"] is None:
            log.info("released the text encoder (it ran on %s: no GPU memory involved)", device)
        else:
            log.info("released the text encoder on %s: GPU memory allocated %.1f -> %.1f MiB (reserved %.1f -> %.1f)",
                     device, before["allocated"] / 2**20, after["allocated"] / 2**20,
                     before["reserved"] / 2**20, after["reserved"] / 2**20)

    # ------------------------------------------------------------------ lookups

    def _pad(self, emb: Tensor) -> Tensor:
        out = torch.zeros(1, self.max_sequence_length, self.text_dim, dtype=emb.dtype)
        out[0, : emb.shape[0]] = emb
        return out.to(self.device, self.dtype)

    def _lookup(self, prompt: str) -> tuple[Tensor, str]:
        """(embedding, source) with source in {'memory', 'disk', 'encoded'}; never releases."""
        key = self.key(prompt)
        if key in self._memory:
            self.stats["memory_hits"] += 1
            return self._memory[key], "memory"
        emb = self._read(key) if self.cache_dir is not None else None
        source = "disk"
        if emb is None:
            emb = self._get_encoder().encode_trimmed(prompt).cpu()
            source = "encoded"
            if emb.dtype != self.encoder_dtype or emb.ndim != 2 or emb.shape[1] != self.text_dim:
                raise ValueError(
                    f"text encoder: produced {list(emb.shape)} {emb.dtype}, expected [seq_len, {self.text_dim}] "
                    f"{self.encoder_dtype}"
                )
            self.stats["misses"] += 1
            if self.cache_dir is not None:
                self._write(key, prompt, emb)
        else:
            self.stats["disk_hits"] += 1
        self._memory[key] = self._pad(emb)
        return self._memory[key], source

    def _done(self) -> None:
        if self.release_after_encode:
            self.release_encoder()

    def get(self, prompt: str) -> Tensor:
        """[1, max_sequence_length, text_dim] on `device` in `dtype`."""
        try:
            return self._lookup(prompt)[0]
        finally:
            self._done()

    def encode_pair(self, prompt: str, use_cfg: bool) -> tuple[Tensor, Tensor | None]:
        """(cond, uncond): uncond is the negative prompt's embedding under CFG, else None.

        Both are looked up before the encoder is released, so one load serves a double miss."""
        try:
            cond = self._lookup(prompt)[0]
            uncond = self._lookup(self.negative_prompt)[0] if use_cfg else None
        finally:
            self._done()
        return cond, uncond

    def precompute(self, prompts: Iterable[str], negative: bool = True) -> list[tuple[str, str, Path | None]]:
        """Encode what is missing among `prompts` (+ the negative prompt) with one encoder load.

        Returns (text, source, path) per text, source in {'memory', 'disk', 'encoded'}."""
        texts = list(prompts) + ([self.negative_prompt] if negative else [])
        out = []
        try:
            for text in dict.fromkeys(texts):
                _, source = self._lookup(text)
                out.append((text, source, self.path(text)))
        finally:
            self._done()
        return out
