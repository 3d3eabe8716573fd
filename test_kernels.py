"""
Rungs 1-2 of the equivalence ladder: paged reference attention == dense causal attention,
whatever the block size, the block order, the GQA ratio and the ragged lengths.
Rung 5: the Triton kernels == the reference, compiled on a GPU or interpreted on a CPU.
"""
import dataclasses
import functools

import pytest
import torch
from hypothesis import given, settings, strategies as st

from model import kernels


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
        m = kernels.AttnMeta.for_store(torch.tensor(s), block_size)
        kernels.store_kv(k, v, k_cache, v_cache, m)
    qs = [torch.randn(n, n_kv * group, d, generator=g, dtype=torch.float64) for n in new]
    width = max(len(t) for t in tables)
    bt = torch.tensor([t + [0] * (width - len(t)) for t in tables])
    starts = [0]
    for n in new:
        starts.append(starts[-1] + n)
    new_slots = [s for sl, n in zip(slots_all, new) for s in sl[len(sl) - n:]]
    meta = kernels.AttnMeta.paged(new_slots, bt, ctx, starts, k_cache.shape[:3])
    return k_cache, v_cache, ks, vs, qs, meta


def assert_matches_oracle(attention, case):
    k_cache, v_cache, ks, vs, qs, meta = build(*case)
    d = qs[0].shape[-1]
    out = attention(torch.cat(qs), k_cache, v_cache, meta, d ** -0.5)
    want = torch.cat([kernels.attention_spec(q, k, v) for q, k, v in zip(qs, ks, vs)])
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


@settings(max_examples=max(40, settings.default.max_examples))
@given(n_kv=st.sampled_from([1, 3]), group=st.sampled_from([1, 3]),
       block_size=st.sampled_from([1, 4, 16]),
       ctx=st.lists(st.integers(1, 150), min_size=1, max_size=5),
       window=st.sampled_from([0, 1, 5, 40]), seed=st.integers(0, 2 ** 16))
def test_decode_step_attention_matches_dense(n_kv, group, block_size, ctx, window, seed):
    """The compiled decode step's attention (run eagerly here): it writes each sequence's new
    K/V into its slot of the pool, and nothing else, then attends over the sequence's keys
    as attention_spec does, one sequence (keys gathered whole) or several (in chunks of
    CHUNK_BLOCKS blocks merged per sequence: contexts here end inside, at the end of and
    beyond a chunk; windows mask whole chunks)."""
    g = torch.Generator().manual_seed(seed)
    d, n_layer, layer = 8, 2, 1
    n_blocks_each = [-(-c // block_size) for c in ctx]
    per_head = sum(n_blocks_each) + 2
    perm = torch.randperm(per_head, generator=g).tolist()
    tables = [perm[sum(n_blocks_each[:b]):sum(n_blocks_each[:b + 1])] for b in range(len(ctx))]
    pool = torch.randn(n_layer * 2 * n_kv * per_head, block_size, d, generator=g)
    ks = [torch.randn(c, n_kv, d, generator=g) for c in ctx]
    vs = [torch.randn(c, n_kv, d, generator=g) for c in ctx]
    for t, k, v in zip(tables, ks, vs):  # the cached keys, all but each sequence's last
        for pos in range(len(k) - 1):
            for kv, x in enumerate((k, v)):
                for h in range(n_kv):
                    row = ((layer * 2 + kv) * n_kv + h) * per_head + t[pos // block_size]
                    pool[row, pos % block_size] = x[pos, h]
    before = pool.clone()
    slots = [t[(c - 1) // block_size] * block_size + (c - 1) % block_size
             for t, c in zip(tables, ctx)]
    width = max(map(len, tables))
    step = kernels.DecodeBatch.build(slots, [t + [0] * (width - len(t)) for t in tables], ctx,
                                     block_size)
    q = torch.randn(len(ctx), n_kv * group, d, generator=g)
    out = kernels.decode_step_attention(q, torch.stack([k[-1] for k in ks]),
                                        torch.stack([v[-1] for v in vs]), pool, layer, per_head,
                                        step, d ** -0.5, window)
    for b in range(len(ctx)):
        want = kernels.attention_spec(q[b:b + 1], ks[b], vs[b], window)
        torch.testing.assert_close(out[b:b + 1], want, rtol=1e-5, atol=1e-5)
    written = (pool != before).any(-1)  # (rows, P): slots the step wrote
    wanted = torch.zeros_like(written)
    for b, s in enumerate(slots):
        for kv in range(2):
            for h in range(n_kv):
                wanted[((layer * 2 + kv) * n_kv + h) * per_head + s // block_size,
                       s % block_size] = True
    assert torch.equal(written, wanted)


def test_decode_batch_chunks_cover_each_context_once():
    """DecodeBatch's chunks: each sequence's blocks in order, CHUNK_BLOCKS to a chunk, the
    last one padded; every table at least two wide or long (no dimension of size 1 but the
    batch's, on which a compiler would specialize)."""
    c = kernels.CHUNK_BLOCKS
    tables = [list(range(100, 100 + 2 * c + 1)), [7]]
    step = kernels.DecodeBatch.build([0, 0], [tables[0], [7] + [0] * 2 * c], [2 * c * 4 + 3, 2],
                                     block_size=4)
    assert step.chunk_tables.tolist() == [tables[0][:c], tables[0][c:2 * c],
                                          [tables[0][2 * c]] * c, [7] * c]
    assert step.chunk_seq.tolist() == [0, 0, 0, 1]
    assert step.chunk_start.tolist() == [0, 4 * c, 8 * c, 0]
    assert step.seq_chunks.tolist() == [[0, 1, 2], [3, 4, 4]]
    one = kernels.DecodeBatch.build([0], [[7]], [1], block_size=4)
    assert one.block_tables.shape == (1, 2) and one.seq_chunks.tolist() == [[0, 2]]
    assert one.chunk_tables.shape == (2, c)  # the second one read by no sequence


@given(paged_batches())
def test_invariant_attention_matches_dense(case):
    assert_matches_oracle(kernels.invariant_attention_ref, case)


@st.composite
def long_batches(draw):
    """Contexts over several tiles of the invariant attention, bf16-sized."""
    n_kv, group, d, block_size, _, _, seed = draw(paged_batches())
    n_seq = draw(st.integers(1, 4))
    ctx = [draw(st.integers(1, 3 * kernels.INVARIANT_TILE)) for _ in range(n_seq)]
    new = [draw(st.integers(1, min(c, 40))) for c in ctx]
    return n_kv, group, d, block_size, ctx, new, seed


@settings(max_examples=max(25, settings.default.max_examples))
@given(case=long_batches(), dtype=st.sampled_from([torch.bfloat16, torch.float16, torch.float32]))
def test_invariant_attention_bits_do_not_depend_on_the_batch(case, dtype):
    """Each query's output is the same bits computed in the whole batch, with its sequence
    alone, or one query at a time as decode steps (the context ending at the query): what
    makes cached == uncached == chunked == batched hold bitwise in invariant mode."""
    check_invariant_bits(kernels.invariant_attention_ref, case, dtype, "cpu")


def check_invariant_bits(attend, case, dtype, device, window=0):
    """Each query's output from `attend` the same bits in the batch, with its sequence alone,
    and one query at a time as decode steps."""
    k_cache, v_cache, _, _, qs, meta = build(*case)
    k_cache, v_cache = k_cache.to(device, dtype), v_cache.to(device, dtype)
    qs = [q.to(device, dtype) for q in qs]
    scale = qs[0].shape[-1] ** -0.5
    tables = meta.block_tables.tolist()
    starts, ctx = meta.query_start_host, meta.context_lens_host
    meta = kernels.AttnMeta.paged(meta.slot_mapping.tolist(), tables, ctx, starts,
                                  k_cache.shape[:3], device)
    whole = attend(torch.cat(qs), k_cache, v_cache, meta, scale, window=window)
    for b, q in enumerate(qs):
        n = len(q)
        alone = kernels.AttnMeta.paged([0] * n, [tables[b]], [ctx[b]], [0, n], k_cache.shape[:3],
                                       device)
        got = attend(q, k_cache, v_cache, alone, scale, window=window)
        assert torch.equal(got, whole[starts[b]:starts[b + 1]])
        for i in range(n):  # as a decode step
            step = kernels.AttnMeta.paged([0], [tables[b]], [ctx[b] - n + i + 1], [0, 1],
                                          k_cache.shape[:3], device)
            one = attend(q[i:i + 1], k_cache, v_cache, step, scale, window=window)
            assert torch.equal(one, got[i:i + 1]), (b, i)


def test_the_usual_attention_paths_do_differ_in_bf16():
    """The negative control of the test above: the default paths (SDPA for one sequence,
    batched matmuls for many, the causal prefill) give other bits for the same queries."""
    case = (3, 3, 64, 16, [150, 170, 90, 120], [40, 1, 30, 1], 7)
    k_cache, v_cache, _, _, qs, meta = build(*case)
    k_cache, v_cache = k_cache.to(torch.bfloat16), v_cache.to(torch.bfloat16)
    qs = [q.to(torch.bfloat16) for q in qs]
    whole = kernels.paged_attention(torch.cat(qs), k_cache, v_cache, meta, 0.125)
    tables, starts, ctx = meta.block_tables.tolist(), meta.query_start_host, meta.context_lens_host
    differ = 0
    for b, q in enumerate(qs):
        n = len(q)
        for i in range(n):
            step = kernels.AttnMeta.paged([0], [tables[b]], [ctx[b] - n + i + 1], [0, 1],
                                          k_cache.shape[:3])
            one = kernels.paged_attention(q[i:i + 1], k_cache, v_cache, step, 0.125)
            differ += not torch.equal(one, whole[starts[b] + i:starts[b] + i + 1])
    assert differ > 0


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
        torch.testing.assert_close(out[s:e], kernels.attention_spec(q[s:e], k[s:e], v[s:e]))


def test_store_kv_writes_only_its_slots():
    k_cache = torch.zeros(2, 4, 2, 3)  # (K, N, P, D)
    v_cache = torch.zeros(2, 4, 2, 3)
    k = torch.arange(12.).view(2, 2, 3) + 1  # (T, K, D)
    meta = kernels.AttnMeta.for_store(torch.tensor([5, 0]), 2)
    kernels.store_kv(k, -k, k_cache, v_cache, meta)
    flat_k = k_cache.view(2, 8, 3)  # (K, slots, D)
    assert torch.equal(flat_k[:, 5], k[0]) and torch.equal(flat_k[:, 0], k[1])
    assert torch.equal(v_cache.view(2, 8, 3)[:, 5], -k[0])
    untouched = [i for i in range(8) if i not in (0, 5)]
    assert flat_k[:, untouched].abs().sum() == 0


# ------------------------------------------------------------------------------------------
# Rung 5: the Triton kernels == the reference. Compiled on a GPU; on a CPU in Triton's
# interpreter (conftest.py sets TRITON_INTERPRET=1), on smaller shapes. bf16 arithmetic does
# not work in the interpreter, so bf16 is checked on a GPU only.

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ON_GPU = DEVICE == "cuda"
MAX_CTX = 600 if ON_GPU else 80
KERNEL_DTYPES = [torch.float32, torch.float16, torch.bfloat16]
TOLERANCE = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}
needs_triton = pytest.mark.skipif(kernels.triton is None, reason="triton is not installed (no "
                                  "wheel for this platform): the engine runs its torch reference")


def kernel_dtype(dtype):
    if dtype == torch.bfloat16 and not ON_GPU:
        pytest.skip("bf16 arithmetic does not run in Triton's interpreter; checked on a GPU")
    return dtype


@st.composite
def kernel_batches(draw):
    """The shapes the kernels serve: head dims 64 and 128, GQA groups 1, 3, 4 and 8, block
    sizes 16 and 32, ragged lengths that often sit on a block boundary, prefixes of every
    kind (none, partial, all but the last token as after a whole-prompt hit)."""
    block_size = draw(st.sampled_from([16, 32]))
    # lengths and prefixes one either side of a block or key-tile boundary are the risky ones
    edges = [e + i for e in (16, 32, 64) for i in (-2, -1, 0, 1)]
    length = st.one_of(st.integers(1, MAX_CTX), st.sampled_from([1] + edges))
    n_seq = draw(st.integers(1, 4))
    ctx = [draw(length) for _ in range(n_seq)]
    prefix = [draw(st.one_of(st.just(0), st.just(c - 1), st.integers(0, c - 1),
                             st.sampled_from([e for e in edges if e < c] or [0]))) for c in ctx]
    new = [c - p for c, p in zip(ctx, prefix)]
    return (draw(st.sampled_from([1, 2])), draw(st.sampled_from([1, 3, 4, 8])),
            draw(st.sampled_from([64, 128])), block_size, ctx, new, draw(st.integers(0, 2 ** 16)))


# tiles of keys (block_n) and of query rows (block_m) smaller than the defaults put more
# tile edges, and more diagonal-crossing tiles, inside the small shapes of the tests
tiles = st.fixed_dictionaries({"block_n": st.sampled_from([16, 32, 64]),
                               "block_m": st.sampled_from([16, 32, 64])})


def kernel_inputs(case, dtype, window=0):
    """The case of `build` in dtype on DEVICE, with every cache slot that belongs to no
    sequence's context set to NaN (a kernel that reads one poisons its output); plus the
    float64 oracle of the rounded inputs (with a sliding window, if given)."""
    k_cache, v_cache, ks, vs, qs, meta = build(*case)
    owned = torch.zeros(k_cache.shape[1:3], dtype=torch.bool)  # (N, P)
    for b, n_ctx in enumerate(meta.context_lens_host):
        for j in range(n_ctx):
            owned[meta.block_tables[b, j // meta.block_size], j % meta.block_size] = True
    k_cache[:, ~owned] = float("nan")
    v_cache[:, ~owned] = float("nan")
    rounded = [[t.to(dtype).double() for t in ts] for ts in (qs, ks, vs)]
    want = torch.cat([kernels.attention_spec(q, k, v, window) for q, k, v in zip(*rounded)])
    meta = dataclasses.replace(meta, **{f: getattr(meta, f).to(DEVICE) for f in
                                        ("slot_mapping", "block_tables", "context_lens",
                                         "query_start")})
    to = lambda t: t.to(DEVICE, dtype)  # noqa: E731
    return to(torch.cat(qs)), to(k_cache), to(v_cache), meta, want


def assert_kernel_matches(launch, case, dtype, window=0):
    q, k_cache, v_cache, meta, want = kernel_inputs(case, dtype, window)
    out = torch.full_like(q, float("nan"))  # poisoned: every element must be written
    launch(q, k_cache, v_cache, meta, q.shape[-1] ** -0.5, out=out,
           **({"window": window} if window else {}))
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(out.cpu().double(), want, rtol=tol, atol=tol)


@needs_triton
@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@settings(max_examples=max(25, settings.default.max_examples))
@given(case=kernel_batches(), tile=tiles)
def test_triton_prefill_attention_matches_reference(dtype, case, tile):
    launch = functools.partial(kernels.prefill_attention_triton, **tile)
    assert_kernel_matches(launch, case, kernel_dtype(dtype))


@needs_triton
@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@settings(max_examples=max(25, settings.default.max_examples))
@given(case=kernel_batches(), n_splits=st.sampled_from([None, 1, 2, 3, 8]),
       block_n=st.sampled_from([16, 64]))
def test_triton_decode_attention_matches_reference(dtype, case, n_splits, block_n):
    """Split-K over 1..8 slices, some of them empty when the context is short."""
    n_kv, group, d, block_size, ctx, _, seed = case
    decode_case = (n_kv, group, d, block_size, ctx, [1] * len(ctx), seed)
    launch = functools.partial(kernels.decode_attention_triton, n_splits=n_splits,
                               block_n=block_n)
    assert_kernel_matches(launch, decode_case, kernel_dtype(dtype))


@needs_triton
@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@settings(max_examples=max(10, settings.default.max_examples // 2))
@given(case=kernel_batches(), window=st.sampled_from([0, 1, 7, 40]))
def test_triton_invariant_attention_matches_and_keeps_its_bits(dtype, case, window):
    """The invariant attention's Triton kernel: within rounding of the dense oracle (over a
    poisoned pool), and each query the same bits in a batch, alone or as a decode step."""
    assert_kernel_matches(kernels.invariant_attention_triton, case, kernel_dtype(dtype), window)
    n_kv, group, d, block_size, ctx, new, seed = case
    short = (n_kv, group, d, block_size, ctx, [min(n, 6) for n in new], seed)
    check_invariant_bits(kernels.invariant_attention_triton, short, dtype, DEVICE, window)


@needs_triton
@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@settings(max_examples=max(25, settings.default.max_examples))
@given(case=kernel_batches(), window=st.integers(1, MAX_CTX), decode=st.booleans(),
       tile=tiles, n_splits=st.sampled_from([None, 1, 3]))
def test_triton_sliding_window_matches_reference(dtype, case, window, decode, tile, n_splits):
    """A sliding window (keys in (p - window, p]) of any width against the context and the
    tiles: the window's edge inside a tile, on one, before the first; prefill tiles whose rows
    start their windows in different tiles; decode split over the window's keys only."""
    n_kv, group, d, block_size, ctx, new, seed = case
    if decode:
        launch = functools.partial(kernels.decode_attention_triton, n_splits=n_splits,
                                   block_n=tile["block_n"])
        case = (n_kv, group, d, block_size, ctx, [1] * len(ctx), seed)
    else:
        launch = functools.partial(kernels.prefill_attention_triton, **tile)
    assert_kernel_matches(launch, case, kernel_dtype(dtype), window)


@needs_triton
@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@given(n_tok=st.integers(1, 40), n_kv=st.integers(1, 5), d=st.sampled_from([16, 64, 80, 128]),
       block_size=st.sampled_from([1, 16, 32]), seed=st.integers(0, 2 ** 16),
       n_pad=st.integers(0, 3))
def test_triton_store_kv_writes_exactly_its_slots(dtype, n_tok, n_kv, d, block_size, seed,
                                                  n_pad):
    """Any number of KV heads, head dims that are not powers of two: the written slots equal
    the reference's, and every other slot keeps its poison; a static batch's padding rows
    (slot -1) are written nowhere."""
    dtype = kernel_dtype(dtype)
    g = torch.Generator().manual_seed(seed)
    n_blocks = n_tok // block_size + 3
    slots = torch.randperm(n_blocks * block_size, generator=g)[:n_tok]
    slots = torch.cat([slots, torch.full((n_pad,), -1)])[torch.randperm(n_tok + n_pad,
                                                                        generator=g)].to(DEVICE)
    # k, v as the model makes them: head-strided views of one fused projection
    qkv = torch.randn(n_tok + n_pad, 3 * n_kv, d, generator=g).to(DEVICE, dtype)
    k, v = qkv[:, :n_kv], qkv[:, 2 * n_kv:]
    meta = dataclasses.replace(kernels.AttnMeta.for_store(slots, block_size), padded=n_pad > 0)
    caches = [torch.full((n_kv, n_blocks, block_size, d), float("nan"), dtype=dtype,
                         device=DEVICE) for _ in range(4)]
    kernels.store_kv_triton(k, v, caches[0], caches[1], meta)
    kernels.store_kv_ref(k, v, caches[2], caches[3], meta)
    for got, want in zip(caches[:2], caches[2:]):
        torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)
        assert (~got.isnan()).all(-1).sum() == n_tok * n_kv  # every vector written once


@needs_triton
@pytest.mark.parametrize("arch, kv_dtype", [("llama", None), ("gpt2", None), ("llama", "int8"),
                                            ("mistral", None)])
def test_greedy_generation_triton_equals_reference(tiny_dir, monkeypatch, arch, kv_dtype):
    """The whole engine through the Triton kernels (prefill, a prefix hit, chunked prefill,
    batched decode), with an exact or an int8 cache, and a sliding window of 12 whose blocks
    are released (Mistral), gives the reference path's greedy tokens."""
    from generate import LLM, SamplingParams
    extra = {"sliding_window": 12} if arch == "mistral" else {}
    llm = LLM(str(tiny_dir(arch, **extra)), device=DEVICE, dtype="float32", block_size=16,
              max_batch_tokens=24, kv_dtype=kv_dtype)
    prompts = [list(range(3, 40)), list(range(3, 40)) + [7, 8], [5] * 17, [9, 10]]
    params = SamplingParams(max_new_tokens=12, ignore_eos=True)
    runs = {}
    for backend in ("ref", "triton"):
        monkeypatch.setenv("KVCACHE_KERNELS", backend)
        llm.cache.forget_cached()
        runs[backend] = [c.token_ids for c in llm.generate(prompts, params)]
    assert runs["triton"] == runs["ref"]


# ------------------------------------------------------------------------------------------
# the invariant mode's weight product (Triton): each row's bits whatever its company

# on a GPU the real weight shapes (test_model.py's list: SmolLM2, GPT-2, Qwen2, Llama-3.2-1B);
# in the interpreter small ones, around the kernel's tile edges (64 rows, 64 columns, 32/64
# inner)
LINEAR_SHAPES = [(576, 960), (768, 2304), (896, 1152), (1536, 576), (2048, 3072), (8192, 2048),
                 (576, 49152)] if ON_GPU else [(8, 8), (33, 70), (64, 64), (100, 65), (130, 24)]


def rows_company_free(linear, x, w, b, n_rows):
    """Whether each row of linear(x) is the same bits computed alone, among a few others or
    in another place among them."""
    whole = linear(x, w, b)
    picks = ([n_rows - 1], [0, 1], list(range(n_rows // 3, n_rows)), [n_rows - 1, 0])
    return all(torch.equal(linear(x[rows].contiguous(), w, b), whole[rows]) for rows in picks)


@needs_triton
@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@settings(max_examples=max(10, settings.default.max_examples // 2))
@given(shape=st.sampled_from(LINEAR_SHAPES), n_rows=st.integers(2, 150), bias=st.booleans(),
       programs=st.sampled_from([None, 1, 3]), seed=st.integers(0, 2 ** 16))
def test_triton_invariant_linear_matches_and_keeps_its_bits(dtype, shape, n_rows, bias,
                                                           programs, seed):
    """The invariant product: within rounding of a float64 product, every output element
    written (the output poisoned), the same bits whatever the number of persistent programs,
    and each row the same bits alone, among others or in another place. The negative control:
    the same check catches rows that depend on their company ((x - mean) W^T + mean W^T)."""
    dtype = kernel_dtype(dtype)
    n_in, n_out = shape
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_rows, n_in, generator=g).to(DEVICE, dtype)
    w = (torch.randn(n_out, n_in, generator=g) / n_in ** 0.5).to(DEVICE, dtype)
    b = torch.randn(n_out, generator=g).to(DEVICE, dtype) if bias else None
    out = torch.full((n_rows, n_out), float("nan"), device=DEVICE, dtype=dtype)
    kernels.invariant_linear_triton(x, w, b, out=out, programs=programs)
    want = x.double() @ w.double().T + (b.double() if bias else 0)
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(out.double(), want, rtol=tol, atol=tol)
    assert torch.equal(kernels.invariant_linear_triton(x, w, b), out)
    launch = kernels.invariant_linear_triton
    assert rows_company_free(launch, x, w, b, n_rows)

    def centred(x, w, b):
        mean = x.float().mean(0, keepdim=True).to(x.dtype)
        return launch(x - mean, w, b) + launch(mean.expand_as(x).contiguous(), w)
    assert not rows_company_free(centred, x, w, b, n_rows)


# ------------------------------------------------------------------------------------------
# quantized caches: int8 and fp8 values with one scale per (token, KV head)

QUANT_DTYPES = [torch.int8, torch.float8_e4m3fn]


@pytest.mark.parametrize("qdtype", QUANT_DTYPES)
@given(n=st.integers(1, 6), d=st.sampled_from([1, 8, 64]), magnitude=st.sampled_from(
    [0.0, 1e-6, 1.0, 1e4]), seed=st.integers(0, 2 ** 16))
def test_quantize_dequantize_error_is_bounded(qdtype, n, d, magnitude, seed):
    """int8: every element within half a step (scale / 2) of the original. fp8 e4m3: within
    2^-4 of its own magnitude (3 mantissa bits), or 2^-10 of a step near zero (subnormals)."""
    x = torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    x = (x * magnitude).float()
    values, scales = kernels.quantize_ref(x, qdtype)
    err = (kernels.dequantize_ref(values, scales, torch.float64) - x.double()).abs()
    s = scales.double().unsqueeze(-1)
    if qdtype == torch.int8:
        assert values.abs().max() <= 127 and (err <= s / 2 * (1 + 1e-6) + 1e-30).all()
    else:
        assert (err <= x.double().abs() / 16 + s * 2 ** -10 + 1e-30).all()
    assert (scales == x.abs().amax(-1) / kernels.QMAX[qdtype]).all()


def quantized_pool(k_cache, v_cache, qdtype):
    """A float pool quantized as the store kernel would have written it: (values, scales)."""
    (kq, ks), (vq, vs) = (kernels.quantize_ref(c, qdtype) for c in (k_cache, v_cache))
    return kq, vq, (ks, vs)


@settings(max_examples=max(25, settings.default.max_examples))
@given(case=paged_batches())
def test_int8_attention_error_is_bounded_by_the_scales(case):
    """Attention over an int8 cache differs from attention over the exact cache by at most
    e_v + max|v| (exp(2 delta) - 1), where e_v = the largest V step / 2 and delta = the
    largest score error, sm_scale * sum_d |q_d| * (k step / 2): a score error of at most
    delta moves every softmax weight by a factor within exp(+-2 delta)."""
    k_cache, v_cache, ks, vs, qs, meta = build(*case)
    kq, vq, scales = quantized_pool(k_cache, v_cache, torch.int8)
    q = torch.cat(qs)
    sm = q.shape[-1] ** -0.5
    exact = kernels.prefill_attention_ref(q, k_cache, v_cache, meta, sm)
    quant = kernels.prefill_attention_ref(q, kq, vq, meta, sm, scales)
    g = q.shape[1] // k_cache.shape[0]
    for b, (s, e) in enumerate(zip(meta.query_start_host, meta.query_start_host[1:])):
        step_k = gather_scales(scales[0], meta, b).repeat_interleave(g, 0)  # (H, S)
        step_v = gather_scales(scales[1], meta, b).repeat_interleave(g, 0)
        v_max = vs[b].abs().amax(dim=(0, 2)).repeat_interleave(g, 0)        # (H,)
        delta = sm * q[s:e].abs().sum(-1) * step_k.amax(-1) / 2             # (Tq, H)
        bound = step_v.amax(-1) / 2 + v_max * torch.expm1(2 * delta)
        err = (quant[s:e] - exact[s:e]).abs().amax(-1)                      # (Tq, H)
        assert (err <= bound * (1 + 1e-9) + 1e-12).all()


def gather_scales(scales, meta, b):
    """(K, S) scales of sequence b's context."""
    n_ctx, p = meta.context_lens_host[b], meta.block_size
    blocks = meta.block_tables[b, :-(-n_ctx // p)]
    return scales[:, blocks].flatten(1)[:, :n_ctx]


@needs_triton
@pytest.mark.parametrize("qdtype", QUANT_DTYPES)
@given(n_tok=st.integers(1, 30), n_kv=st.integers(1, 4), d=st.sampled_from([16, 64, 80]),
       seed=st.integers(0, 2 ** 16))
def test_triton_store_quantizes_like_the_reference(qdtype, n_tok, n_kv, d, seed):
    if qdtype == torch.float8_e4m3fn and not ON_GPU:
        pytest.skip("the interpreter converts fp32 values that round up to a power of two "
                    "into fp8 one binade low (-127.6 -> -64); the fp8 store is checked on a GPU")
    g = torch.Generator().manual_seed(seed)
    n_blocks, block_size = n_tok // 16 + 2, 16
    slots = torch.randperm(n_blocks * block_size, generator=g)[:n_tok].to(DEVICE)
    k, v = (torch.randn(n_tok, n_kv, d, generator=g).to(DEVICE) * 3 for _ in range(2))
    k[0, 0] = 0.0  # a zero vector: scale 0
    meta = kernels.AttnMeta.for_store(slots, block_size)
    shape = (n_kv, n_blocks, block_size, d)
    pools = [[torch.zeros(shape, dtype=qdtype, device=DEVICE) for _ in range(2)] +
             [torch.full(shape[:3], float("nan"), device=DEVICE) for _ in range(2)]
             for _ in range(2)]
    for store, (kc, vc, ksc, vsc) in zip((kernels.store_kv_triton, kernels.store_kv_ref), pools):
        store(k, v, kc, vc, meta, (ksc, vsc))
    (got_k, got_v, got_ks, got_vs), (want_k, want_v, want_ks, want_vs) = pools
    for got, want in ((got_ks, want_ks), (got_vs, want_vs)):  # unwritten scales stay NaN
        torch.testing.assert_close(got, want, rtol=1e-6, atol=0, equal_nan=True)
    for got, want in ((got_k, want_k), (got_v, want_v)):
        # a compiled division may land a value on the other side of a rounding boundary:
        # one int8 step, or one fp8 step (2^-3 of the value); the interpreter matches exactly
        slack = 1.0 if qdtype == torch.int8 else want.float().abs() / 8
        assert ((got.float() - want.float()).abs() <= slack * ON_GPU).all()


@needs_triton
@pytest.mark.parametrize("qdtype", QUANT_DTYPES)
@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@settings(max_examples=max(15, settings.default.max_examples))
@given(case=kernel_batches(), decode=st.booleans())
def test_triton_attention_over_a_quantized_cache_matches_reference(qdtype, dtype, case, decode):
    """Prefill and split-K decode over int8 / fp8 values: the oracle attends over the
    dequantized context in float64; every scale of a slot outside all contexts is NaN."""
    dtype = kernel_dtype(dtype)
    n_kv, group, d, block_size, ctx, new, seed = case
    if decode:
        new = [1] * len(ctx)
    k_cache, v_cache, _, _, qs, meta = build(n_kv, group, d, block_size, ctx, new, seed)
    kq, vq, (ks, vs) = quantized_pool(k_cache, v_cache, qdtype)
    want = []
    for b, (q_b, n_ctx) in enumerate(zip(qs, ctx)):
        k, v = kernels.gather_context(kq, vq, meta.block_tables[b], n_ctx, (ks, vs),
                                      torch.float64)
        want.append(kernels.attention_spec(q_b.to(dtype).double(), k.transpose(0, 1),
                                           v.transpose(0, 1)))
    owned = torch.zeros(ks.shape[1:], dtype=torch.bool)
    for b, n_ctx in enumerate(ctx):
        for j in range(n_ctx):
            owned[meta.block_tables[b, j // block_size], j % block_size] = True
    ks[:, ~owned] = vs[:, ~owned] = float("nan")
    dev = dataclasses.replace(meta, **{f: getattr(meta, f).to(DEVICE) for f in (
        "slot_mapping", "block_tables", "context_lens", "query_start")})
    q = torch.cat(qs).to(DEVICE, dtype)
    out = torch.full_like(q, float("nan"))
    launch = kernels.decode_attention_triton if decode else kernels.prefill_attention_triton
    launch(q, kq.to(DEVICE), vq.to(DEVICE), dev, d ** -0.5, (ks.to(DEVICE), vs.to(DEVICE)),
           out=out)
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(out.cpu().double(), torch.cat(want), rtol=tol, atol=tol)


# ------------------------------------------------------------------------------------------
# ahead of time: the kernels compiled for real GPUs, without one


@needs_triton
def test_every_kernel_compiles_for_gpus_ahead_of_time(tmp_path):
    """bench.py's quick compile sweep: every kernel, as its launcher really calls it, compiled
    for sm_80 and sm_90 (bf16, KV in bf16 / int8 / fp8, GPT-class shapes) by the compiler and
    ptxas inside the triton wheel. Each compiles, fits the target's shared memory, spills no
    register, and its tl.dot is a matrix instruction (wgmma for Hopper prefill and the
    invariant weight product, mma.sync elsewhere). In a
    subprocess: this process runs Triton's interpreter, and the compiler needs real Triton."""
    import json
    import os
    import subprocess
    import sys
    here = os.path.dirname(os.path.abspath(kernels.__file__))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / "compile.json"
    run = subprocess.run([sys.executable, "bench.py", "kernels", "--compile-only", "--quick",
                          "--json", str(out)], cwd=here, env=env, capture_output=True, text=True,
                         timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    report = json.loads(out.read_text())
    rows = report["results"]
    assert report["problems"] == []
    seen = {(r["target"], r["kernel"], r["kv"]) for r in rows}
    for target in ("sm_80", "sm_90"):
        assert (target, "merge_splits_kernel", "auto") in seen  # one binary for every kv
        assert (target, "invariant_linear_kernel", "auto") in seen  # nor reads the cache
        for kernel in ("store_kv_kernel", "prefill_attention_kernel", "decode_attention_kernel",
                       "invariant_attention_kernel"):
            for kv in ("auto", "int8") + (("fp8",) if target == "sm_90" else ()):
                assert (target, kernel, kv) in seen
    assert {r["instruction"] for r in rows if r["kernel"].startswith("prefill") and
            r["target"] == "sm_90"} == {"wgmma"}
    assert {r["instruction"] for r in rows if r["kernel"].startswith("decode")} == {"mma"}
    linear = {r["target"]: r for r in rows if r["kernel"] == "invariant_linear_kernel"}
    assert linear["sm_90"]["instruction"] == "wgmma" and linear["sm_80"]["instruction"] == "mma"
    # the loads pipelined (two stages or more of a 64x64 tile of x and of W in shared memory),
    # as the JIT's 16-byte alignment facts allow: launch_signature passes them on
    assert linear["sm_90"]["shared"] >= 2 * 2 * 64 * 64 * 2
    assert not any(r["spills"] for r in linear.values())
    attention = [r for r in rows if r["kernel"].endswith("attention_kernel")]
    assert all(0 < r["shared"] <= r["shared_limit"] for r in attention)
    assert [r for r in attention if r["spills"]] == []  # attention_tiles fits every one
    from bench import compile_problems  # and a spill would be reported
    assert compile_problems([dict(attention[0], spills=8)])[0].endswith("8 bytes spilled")


# ------------------------------------------------------------------------------------------
# the GPU host path, run on the CPU: no step waits for the device

class HostSyncGuard(torch.overrides.TorchFunctionMode):
    """Fails on whatever would make the host wait for a GPU: reading a device tensor's value
    (.item(), .tolist(), truth value, int(), .cpu(), .numpy()), creating a tensor on the device
    from host data in one blocking call (torch.tensor(..., device=...)), or a host-to-device
    copy that is not non_blocking. Counts the (non_blocking) uploads."""
    READS = {"item", "tolist", "__bool__", "__int__", "__float__", "__index__", "cpu", "numpy"}

    def __init__(self):
        super().__init__()
        self.uploads = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        on_device = [a for a in args if isinstance(a, torch.Tensor) and a.device.type != "cpu"]
        if name in self.READS and on_device:
            raise AssertionError(f"{name}() of a device tensor: the host waits for the GPU")
        if name in ("tensor", "as_tensor") and torch.device(kwargs.get("device") or "cpu").type \
                != "cpu":
            raise AssertionError(f"torch.{name}(..., device=...): a blocking upload")
        out = func(*args, **kwargs)
        if name == "to" and args[0].device.type == "cpu" and isinstance(out, torch.Tensor) and \
                out.device.type != "cpu":
            assert kwargs.get("non_blocking") is True, "a blocking host-to-device copy"
            self.uploads += 1
        return out


def test_the_sync_guard_sees_each_kind_of_wait():
    """The negative control: each pattern the guard exists for is caught."""
    on_meta = torch.zeros(3, device="meta")
    for wait in (lambda: on_meta.sum().item(), lambda: on_meta.tolist(),
                 lambda: bool(on_meta[0]), lambda: on_meta.cpu(),
                 lambda: torch.tensor([1, 2], device="meta"),
                 lambda: torch.tensor([1, 2]).to("meta")):
        with pytest.raises(AssertionError, match="wait|blocking"), HostSyncGuard():
            wait()
    with HostSyncGuard() as guard:
        kernels.upload([[1, 2], [3]], "meta")
    assert guard.uploads == 1


@needs_triton
@pytest.mark.parametrize("kv_dtype, invariant", [("auto", False), ("int8", False),
                                                 ("auto", True)])
def test_a_gpu_step_never_waits_for_the_device(engine, tiny_dir, monkeypatch, kv_dtype,
                                               invariant):
    """A prefill step and a decode step of the CUDA path (Triton launchers, RoPE's GPU form),
    their host code run for real on the meta device (tensors with a shape and no data: a value
    read there fails, as it would wait on a GPU) with the kernels captured: each step is one
    non_blocking upload (two in invariant mode: its row plan), no read of a device value, and
    launches the GPU kernels (in invariant mode its attention and weight product)."""
    import bench
    from cache import KVCache, QUANTIZED_DTYPES
    from generate import Scheduler, SamplingParams, run_batch
    import model as model_mod
    monkeypatch.setenv("KVCACHE_KERNELS", "triton")
    model, _ = model_mod.load(tiny_dir("llama"), torch.bfloat16, "meta")
    model.set_invariant(invariant)
    cfg = model.cfg
    pool = KVCache(cfg.n_layer, cfg.n_kv_head, cfg.head_dim, n_blocks=32, block_size=16,
                   dtype=QUANTIZED_DTYPES.get(kv_dtype, torch.bfloat16), device="meta")
    seqs = engine("llama").make_sequences([list(range(1, 40)), list(range(5, 25))],
                                          SamplingParams())
    sched = Scheduler(pool, 256)
    sched.add(seqs)
    kernel_names = []
    for step in ("prefill", "decode"):
        with bench.kernels_captured() as launches, HostSyncGuard() as guard:
            run_batch(model, pool, sched.schedule())
        assert guard.uploads == 1 + invariant, f"{step}: {guard.uploads} uploads"
        kernel_names.append({k.__name__ for k, _, _ in launches})
        for s in seqs:
            s.tokens.append(7)  # a sampled token (sampling reads the logits: its one sync)
    if invariant:
        assert kernel_names == [{"_store_kv_kernel", "_invariant_attention_kernel",
                                 "_invariant_linear_kernel"}] * 2
    else:
        assert kernel_names == [{"_store_kv_kernel", "_prefill_attention_kernel"},
                                {"_store_kv_kernel", "_decode_attention_kernel",
                                 "_merge_splits_kernel"}]
    for s in seqs:
        pool.free(s.id)


@needs_triton
def test_a_static_decode_step_never_waits_for_the_device(engine, tiny_dir, monkeypatch):
    """generate.StaticDecode's step on the meta device (the CUDA path's host code, kernels
    captured): the buffers filled in place and copied over without a read of a device value
    or a blocking upload, the padding rows' slots -1, the store and decode kernels launched."""
    import bench
    from cache import KVCache
    from generate import Scheduler, SamplingParams, StaticDecode, run_batch
    import model as model_mod
    monkeypatch.setenv("KVCACHE_KERNELS", "triton")
    model, _ = model_mod.load(tiny_dir("llama"), torch.bfloat16, "meta")
    cfg = model.cfg
    pool = KVCache(cfg.n_layer, cfg.n_kv_head, cfg.head_dim, n_blocks=32, block_size=16,
                   dtype=torch.bfloat16, device="meta")
    seqs = engine("llama").make_sequences([list(range(1, 40)), list(range(5, 25)), [3, 4]],
                                          SamplingParams())
    sched = Scheduler(pool, 256)
    sched.add(seqs)
    with bench.kernels_captured():
        run_batch(model, pool, sched.schedule())  # the prefill
    for s in seqs:
        s.tokens.append(7)
    static = StaticDecode(model, pool, cfg.max_seq_len)
    host, dev, _, _ = static.buffers(4)  # (made once, on the bucket's first step)
    with bench.kernels_captured() as launches, HostSyncGuard() as guard:
        static(sched.schedule())
    assert guard.uploads == 0
    assert [k.__name__ for k, _, _ in launches] == \
        ["_store_kv_kernel", "_decode_attention_kernel", "_merge_splits_kernel"] * cfg.n_layer
    rows, tables = static.views(host, 4)
    assert rows[2, 3] == -1 and rows[3, 3] == 1 and tables.shape == (4, static.width)
    for s in seqs:
        pool.free(s.id)
