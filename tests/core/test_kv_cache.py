"""Ring-buffer cache vs the plain list cache (docs/design.md section 2 text, written plainly)."""

import random

import pytest
import torch

from lingbot_edge.core.kv_cache import CacheMode, ListKVCache, RingKVCache

T, P, H = CacheMode.TRANSIENT, CacheMode.PREDICTED, CacheMode.HISTORY


def _ring(capacity, layers=1, batch=1, heads=1, dim=1):
    return RingKVCache(layers, batch, capacity, heads, dim, torch.float32, "cpu")


def _insert(cache, mode, ids):
    """Insert tokens whose value is their id; returns the ids the query saw (from attention
    with a zero query: uniform weights -> output = mean of visible values; also count)."""
    n = len(ids)
    v = torch.tensor(ids, dtype=torch.float32).view(1, n, 1, 1)
    k = torch.zeros_like(v)
    q = torch.zeros_like(v)
    m = torch.tensor(int(mode)) if isinstance(cache, RingKVCache) else mode
    cache.begin(m, n)
    out = cache.attend(0, q, k, v)
    cache.end(m)
    return out[0, 0, 0, 0].item()


def _list_ids(cache: ListKVCache):
    return [] if cache.v[0] is None else [round(x) for x in cache.v[0].flatten().tolist()]


def _ring_ids(cache: RingKVCache):
    return sorted(round(x) for x in cache.v[0][0, cache.valid, 0, 0].tolist())


def test_list_cache_follows_the_text_by_hand():
    c = ListKVCache(num_layers=1, capacity=4)
    _insert(c, H, [1, 2])
    assert _list_ids(c) == [1, 2]
    _insert(c, P, [3])
    assert _list_ids(c) == [1, 2, 3] and c.predicted.tolist() == [False, False, True]
    # transient insert of 2 into 1 free slot evicts the oldest token (1) for good
    seen = _insert(c, T, [4, 5])
    assert seen == pytest.approx((2 + 3 + 4 + 5) / 4)
    assert _list_ids(c) == [2, 3]
    # a real observation drops every predicted entry before it is written
    seen = _insert(c, H, [6])
    assert seen == pytest.approx((2 + 6) / 2)
    assert _list_ids(c) == [2, 6]
    # an insert larger than the free space evicts oldest-first, token by token
    _insert(c, H, [7, 8, 9])
    assert _list_ids(c) == [6, 7, 8, 9]
    with pytest.raises(ValueError, match="capacity"):
        _insert(c, T, [1, 2, 3, 4, 5])


def test_ring_matches_hand_example():
    r = _ring(4)
    for mode, ids in [(H, [1, 2]), (P, [3]), (T, [4, 5]), (H, [6]), (H, [7, 8, 9])]:
        _insert(r, mode, ids)
    assert _ring_ids(r) == [6, 7, 8, 9]


@pytest.mark.parametrize("seed", range(6))
def test_ring_matches_list_cache_on_random_sequences(seed):
    """Random inserts in the sampler's pattern and outside it; every attention output and the
    kept set must agree, with many evictions (small capacity)."""
    rng = random.Random(seed)
    cap, heads, dim, batch = rng.choice([5, 8, 13]), 2, 4, 2
    ring = RingKVCache(1, batch, cap, heads, dim, torch.float32, "cpu")
    ref = ListKVCache(1, cap)
    g = torch.Generator().manual_seed(seed)
    evictions = 0
    for step in range(150):
        mode = rng.choice([T, T, T, P, H])
        n = rng.randint(1, cap)
        q, k, v = (torch.randn(batch, n, heads, dim, generator=g) for _ in range(3))
        evictions += max(0, len(ref) + n - cap)
        ref.begin(mode, n)
        out_ref = ref.attend(0, q, k, v)
        ref.end(mode)
        m = torch.tensor(int(mode))
        ring.begin(m, n)
        out_ring = ring.attend(0, q, k, v)
        ring.end(m)
        torch.testing.assert_close(out_ring, out_ref, atol=1e-6, rtol=1e-6, msg=f"step {step} mode {mode.name}")
        assert int(ring.valid.sum()) == len(ref), f"step {step}"
        assert int((ring.valid & ring.predicted).sum()) == int(ref.predicted.sum())
    assert evictions > 50


def test_ring_reset_keeps_buffers():
    r = _ring(6)
    addr = r.k[0].data_ptr()
    _insert(r, H, [1, 2, 3])
    r.reset()
    assert _ring_ids(r) == [] and r.k[0].data_ptr() == addr
