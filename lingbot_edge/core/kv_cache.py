"""Self-attention KV caches (docs/design.md section 2).

Semantics, shared by both caches: every self-attention forward first inserts its own K/V,
then attends (no causal mask) over everything valid, then
  TRANSIENT: its entries are dropped;   PREDICTED: kept, marked predicted;   HISTORY: kept.
Predicted entries are all dropped when the next HISTORY (real observation) write starts.
An insert that does not fit evicts the oldest entries first, token by token (also for a
TRANSIENT insert, so a query never sees more than `capacity` keys).

`ListKVCache` is the oracle: a plain age-ordered list, obviously correct, dynamic shapes.
`RingKVCache` is the runtime cache: fixed buffers, write pointer, boolean masks; its
bookkeeping is tensor arithmetic on the device, so nothing syncs to the host and shapes never
change. Token order inside an insert is the eviction order (first token evicted first).
"""

from __future__ import annotations

import enum

import torch
from torch import Tensor, nn

from lingbot_edge.core.model import sdpa


class CacheMode(enum.IntEnum):
    TRANSIENT = 0  # upstream update_cache=0
    PREDICTED = 1  # upstream update_cache=1
    HISTORY = 2  # upstream update_cache=2


class ListKVCache:
    """Reference cache: per layer a list of K/V tensors in insertion (age) order."""

    def __init__(self, num_layers: int, capacity: int):
        self.capacity = capacity
        self.num_layers = num_layers
        self.reset()

    def reset(self) -> None:
        self.k: list[Tensor | None] = [None] * self.num_layers  # [B, N, H, D], oldest first
        self.v: list[Tensor | None] = [None] * self.num_layers
        self.predicted: Tensor | None = None  # [N] bool, same for every layer
        self.mode = CacheMode.TRANSIENT
        self.n_new = 0

    def __len__(self) -> int:
        return 0 if self.predicted is None else int(self.predicted.numel())

    def begin(self, mode: CacheMode, n_new: int) -> None:
        if n_new > self.capacity:
            raise ValueError(f"insert of {n_new} tokens exceeds the cache capacity {self.capacity}")
        if mode == CacheMode.HISTORY and self.predicted is not None:
            self._keep(~self.predicted)  # a real observation replaces the predicted future
        self.mode, self.n_new = mode, n_new

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        old_k, old_v = self.k[layer], self.v[layer]
        if old_k is not None:
            evict = max(0, old_k.shape[1] + k.shape[1] - self.capacity)
            k = torch.cat([old_k[:, evict:], k], dim=1)
            v = torch.cat([old_v[:, evict:], v], dim=1)
        out = sdpa(q, k, v)
        if self.mode != CacheMode.TRANSIENT:
            self.k[layer], self.v[layer] = k, v
        elif old_k is not None:
            self.k[layer], self.v[layer] = k[:, : k.shape[1] - self.n_new], v[:, : v.shape[1] - self.n_new]
        return out

    def end(self, mode: CacheMode) -> None:
        n_old = len(self)
        evict = max(0, n_old + self.n_new - self.capacity)
        pred = self.predicted[evict:] if self.predicted is not None else torch.zeros(0, dtype=torch.bool)
        if self.mode != CacheMode.TRANSIENT:
            pred = torch.cat([pred, torch.full((self.n_new,), self.mode == CacheMode.PREDICTED)])
        self.predicted = pred

    def _keep(self, keep: Tensor) -> None:
        for i in range(self.num_layers):
            if self.k[i] is not None:
                self.k[i], self.v[i] = self.k[i][:, keep], self.v[i][:, keep]
        self.predicted = self.predicted[keep]


class RingKVCache(nn.Module):
    """Static ring-buffer cache for all blocks: per layer one k and one v buffer [B, capacity, H, D].

    Each layer's K/V live in tensors of their own, written with `index_copy_` (every CFG row) or
    `index_put_` with row and slot indices (the leading rows): whole-tensor in-place writes, which
    inductor keeps in place. A write through a view of one shared [layers, ...] buffer is lowered to
    scatters into a full-size copy of that buffer plus a copy back (tests/core/test_kv_cache_inplace.py).

    Invariant: valid slots form one arc ending just before `ptr` (oldest first), so writing
    at `ptr` fills free slots first and then overwrites the oldest entries. Predicted entries
    are always the newest part of the arc (a HISTORY write drops them before writing), so
    dropping them is a rewind of `ptr` to `pred_start`.
    """

    def __init__(
        self,
        num_layers: int,
        batch: int,
        capacity: int,
        heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ):
        super().__init__()
        self.capacity = capacity
        shape = (batch, capacity, heads, head_dim)
        # Registered as buffers (k0, v0, k1, ...) for `buffers()`, indexed through these lists. The cache is
        # built on its device and never moved, so the lists and the buffers stay the same tensors.
        self.k: list[Tensor] = []
        self.v: list[Tensor] = []
        for i in range(num_layers):
            for name, store in (("k", self.k), ("v", self.v)):
                store.append(torch.zeros(shape, dtype=dtype, device=device))
                self.register_buffer(f"{name}{i}", store[-1], persistent=False)
        self.register_buffer("rows", torch.arange(batch, device=device), persistent=False)
        self.register_buffer("valid", torch.zeros(capacity, dtype=torch.bool, device=device), persistent=False)
        self.register_buffer("predicted", torch.zeros(capacity, dtype=torch.bool, device=device), persistent=False)
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long, device=device), persistent=False)
        self.register_buffer("pred_start", torch.zeros((), dtype=torch.long, device=device), persistent=False)
        # Per-forward scratch set by begin(): the slots this insert writes and the keys it sees.
        self._slots: Tensor | None = None
        self._written: Tensor | None = None
        self._key_mask: Tensor | None = None

    def reset(self) -> None:
        """Empty the cache in place (buffers keep their addresses: compiled graphs stay valid)."""
        self.valid.zero_()
        self.predicted.zero_()
        self.ptr.zero_()
        self.pred_start.zero_()

    def begin(self, mode: Tensor, n_new: int) -> None:
        """Prepare an insert of n_new tokens. `mode` is a 0-d int tensor (a CacheMode value) so one
        compiled graph serves every mode."""
        if n_new > self.capacity:
            raise ValueError(f"insert of {n_new} tokens exceeds the cache capacity {self.capacity}")
        history = mode == CacheMode.HISTORY.value
        self.ptr.copy_(torch.where(history & self.predicted.any(), self.pred_start, self.ptr))
        self.valid.copy_(self.valid & ~(self.predicted & history))
        self.predicted.copy_(self.predicted & ~history)
        self._slots = (self.ptr + torch.arange(n_new, device=self.ptr.device)) % self.capacity
        self._written = torch.zeros_like(self.valid).index_fill(0, self._slots, True)
        # Same for every block: computed once per forward, not once per layer.
        self._key_mask = (self.valid | self._written).view(1, 1, 1, -1)

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        # A forward may cover only the leading CFG rows (the cond row alone): rows are independent.
        b = q.shape[0]
        kc, vc = self.k[layer], self.v[layer]
        if b == kc.shape[0]:
            kc.index_copy_(1, self._slots, k)
            vc.index_copy_(1, self._slots, v)
        else:  # index the whole buffer, never a view of it: a view's write becomes a scatter into a copy
            rows_slots = (self.rows[:b, None], self._slots[None])
            kc.index_put_(rows_slots, k)
            vc.index_put_(rows_slots, v)
        return sdpa(q, kc[:b], vc[:b], mask=self._key_mask)

    def end(self, mode: Tensor) -> None:
        keep = mode != CacheMode.TRANSIENT.value
        is_pred = mode == CacheMode.PREDICTED.value
        # The first predicted insert after a history write marks where the predicted arc starts.
        self.pred_start.copy_(torch.where(is_pred & ~self.predicted.any(), self.ptr, self.pred_start))
        # Written slots are kept or (transient) freed; whatever old entry they held is evicted.
        self.valid.copy_(torch.where(self._written, keep, self.valid))
        self.predicted.copy_(torch.where(self._written, is_pred, self.predicted))
        self.ptr.copy_(torch.where(keep, (self.ptr + self._slots.numel()) % self.capacity, self.ptr))
