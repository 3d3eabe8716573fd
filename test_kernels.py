"""
Rungs 1-2 of the equivalence ladder: paged reference attention == dense causal attention,
whatever the block size, the block order, the GQA ratio and the ragged lengths.
"""
import torch
from hypothesis import given, strategies as st

import kernels


def dense_oracle(q, k, v):
    """Independent oracle, written out: softmax(Q K^T / sqrt(D) + causal mask) V over K/V
    repeated per query head, the last Tq of S positions. q (Tq, H, D), k/v (S, K, D)."""
    n_q, n_head, d = q.shape
    n_ctx, n_kv, _ = k.shape
    g = n_head // n_kv
    kr = k.repeat_interleave(g, dim=1).transpose(0, 1)  # (H, S, D)
    vr = v.repeat_interleave(g, dim=1).transpose(0, 1)
    scores = q.transpose(0, 1) @ kr.transpose(1, 2) / d ** 0.5  # (H, Tq, S)
    allowed = torch.ones(n_q, n_ctx, dtype=torch.bool).tril(diagonal=n_ctx - n_q)
    scores = scores.masked_fill(~allowed, float("-inf"))
    return (scores.softmax(-1) @ vr).transpose(0, 1)


@st.composite
def paged_batches(draw):
    """A random ragged batch over a randomly ordered paged pool, float64."""
    n_kv = draw(st.sampled_from([1, 2, 3]))
    group = draw(st.sampled_from([1, 2, 3, 4]))
    d = draw(st.sampled_from([4, 8, 16]))
    block_size = draw(st.sampled_from([1, 2, 4, 16]))
    n_seq = draw(st.integers(1, 4))
    ctx = [draw(st.integers(1, 40)) for _ in range(n_seq)]
    new = [draw(st.integers(1, c)) for c in ctx]  # prefix = ctx - new, may be 0
    seed = draw(st.integers(0, 2 ** 16))
    return n_kv, group, d, block_size, ctx, new, seed


def build(n_kv, group, d, block_size, ctx, new, seed):
    g = torch.Generator().manual_seed(seed)
    n_blocks_each = [-(-c // block_size) for c in ctx]
    n_blocks = sum(n_blocks_each) + 3  # a few blocks nobody owns
    perm = torch.randperm(n_blocks, generator=g).tolist()  # tables in random physical order
    tables, slots_all, i = [], [], 0
    for c, nb in zip(ctx, n_blocks_each):
        t = perm[i:i + nb]
        i += nb
        tables.append(t)
        slots_all.append([t[j // block_size] * block_size + j % block_size for j in range(c)])
    k_cache = torch.randn(n_kv, n_blocks, block_size, d, generator=g, dtype=torch.float64)
    v_cache = torch.randn(n_kv, n_blocks, block_size, d, generator=g, dtype=torch.float64)
    ks = [torch.randn(c, n_kv, d, generator=g, dtype=torch.float64) for c in ctx]
    vs = [torch.randn(c, n_kv, d, generator=g, dtype=torch.float64) for c in ctx]
    for k, v, s in zip(ks, vs, slots_all):
        m = kernels.AttnMeta(torch.tensor(s), None, None, None, block_size=block_size)
        kernels.store_kv(k, v, k_cache, v_cache, m)
    qs = [torch.randn(n, n_kv * group, d, generator=g, dtype=torch.float64) for n in new]
    width = max(len(t) for t in tables)
    bt = torch.tensor([t + [0] * (width - len(t)) for t in tables])
    starts = [0]
    for n in new:
        starts.append(starts[-1] + n)
    new_slots = [s for sl, n in zip(slots_all, new) for s in sl[len(sl) - n:]]
    meta = kernels.AttnMeta(torch.tensor(new_slots), bt, torch.tensor(ctx), torch.tensor(starts),
                            tuple(ctx), tuple(starts), block_size)
    return k_cache, v_cache, ks, vs, qs, meta


def assert_matches_oracle(attention, case):
    k_cache, v_cache, ks, vs, qs, meta = build(*case)
    d = qs[0].shape[-1]
    out = attention(torch.cat(qs), k_cache, v_cache, meta, d ** -0.5)
    want = torch.cat([dense_oracle(q, k, v) for q, k, v in zip(qs, ks, vs)])
    torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-10)
    return meta


@given(paged_batches())
def test_paged_prefill_attention_matches_dense(case):
    assert_matches_oracle(kernels.prefill_attention, case)


@given(paged_batches())
def test_decode_attention_matches_dense(case):
    n_kv, group, d, block_size, ctx, _, seed = case
    one_new_token = (n_kv, group, d, block_size, ctx, [1] * len(ctx), seed)
    assert assert_matches_oracle(kernels.paged_attention, one_new_token).is_decode


@given(paged_batches())
def test_dense_causal_attention_matches_oracle(case):
    n_kv, group, d, block_size, ctx, _, seed = case
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(sum(ctx), n_kv * group, d, generator=g, dtype=torch.float64)
    k = torch.randn(sum(ctx), n_kv, d, generator=g, dtype=torch.float64)
    v = torch.randn(sum(ctx), n_kv, d, generator=g, dtype=torch.float64)
    starts = [0]
    for c in ctx:
        starts.append(starts[-1] + c)
    out = kernels.dense_causal_attention(q, k, v, starts, d ** -0.5)
    for s, e in zip(starts, starts[1:]):
        torch.testing.assert_close(out[s:e], dense_oracle(q[s:e], k[s:e], v[s:e]))


def test_store_kv_writes_only_its_slots():
    k_cache = torch.zeros(2, 4, 2, 3)  # (K, N, P, D)
    v_cache = torch.zeros(2, 4, 2, 3)
    k = torch.arange(12.).view(2, 2, 3) + 1  # (T, K, D)
    meta = kernels.AttnMeta(torch.tensor([5, 0]), None, None, None, block_size=2)
    kernels.store_kv(k, -k, k_cache, v_cache, meta)
    flat_k = k_cache.view(2, 8, 3)  # (K, slots, D)
    assert torch.equal(flat_k[:, 5], k[0]) and torch.equal(flat_k[:, 0], k[1])
    assert torch.equal(v_cache.view(2, 8, 3)[:, 5], -k[0])
    untouched = [i for i in range(8) if i not in (0, 5)]
    assert flat_k[:, untouched].abs().sum() == 0
