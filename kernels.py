"""
Attention and cache kernels over the paged KV cache, and the invariant mode's weight product.

Every operation has three parts side by side:
  - `<op>_ref(...)`: plain torch, the specification; it is the CPU engine and the test oracle;
  - a Triton kernel (`_<op>_kernel`) and its launcher (`<op>_triton(...)`), for CUDA;
  - `<op>(...)`: the public function the model calls. CUDA tensors go to Triton, everything
    else to the reference. The environment variable KVCACHE_KERNELS overrides that:
    `ref` forces the reference on a GPU (for bisecting), `triton` forces Triton on the CPU
    (where it runs in Triton's interpreter, TRITON_INTERPRET=1 set before triton is imported).

This file deliberately holds no model, no cache bookkeeping and no module state: it takes
tensors and an `AttnMeta` and returns tensors. The cache layout it reads, per layer, is
    k_cache, v_cache: (K, N, P, D)   K KV heads, N blocks of P slots, head dim D
and a token at slot s = block_id * P + offset lives at k_cache[:, block_id, offset].

Shapes (the alphabet of model.py): B sequences, T new tokens (packed, all sequences),
S context length, H query heads, K KV heads, G = H // K query heads per KV head, D head dim,
N blocks, P block size.

This file is loaded as the module `kvcache_kernels` (see model.py: `kernels` is also the name of
Hugging Face's hub-kernels package); the engine's copy is `from model import kernels`.

Tests: `pytest test_kernels.py`.
"""
import importlib.machinery
import importlib.util
import math
import os
import sys

if __name__ == "kernels":
    # A bare `import kernels` found this file first on sys.path, from this folder: the caller
    # may be transformers asking for Hugging Face's package. Where another `kernels` is installed
    # it takes the name (`import` returns whatever sys.modules holds once this file has run);
    # where none is, the name stays with this file, a second copy beside the engine's own.
    _here = os.path.dirname(os.path.abspath(__file__))
    _spec = importlib.machinery.PathFinder.find_spec(
        "kernels", [p for p in sys.path if os.path.abspath(p or os.curdir) != _here])
    if _spec is not None:
        sys.modules["kernels"] = importlib.util.module_from_spec(_spec)
        _spec.loader.exec_module(sys.modules["kernels"])

from dataclasses import dataclass
from functools import cache, cached_property
from typing import NamedTuple

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
    jit = triton.jit
except ImportError:  # no triton wheel for this platform (macOS, Windows): the reference only
    triton = None

    class tl:  # what the kernel signatures below name at definition; they are never launched
        constexpr = None

    def jit(fn):
        return fn


def upload(rows, device=None) -> list[torch.Tensor]:
    """Host lists of ints as int64 tensors on device, in one copy: packed into one buffer
    (pinned on a GPU's host, so that the copy is asynchronous: a copy from pageable memory
    waits for the GPU to finish the work queued before it), sent non_blocking and split."""
    host = torch.tensor([x for row in rows for x in row], dtype=torch.int64)
    device = torch.device(device or "cpu")
    if device.type != "cpu":
        host = host.pin_memory() if device.type == "cuda" else host
        host = host.to(device, non_blocking=True)
    return list(host.split([len(row) for row in rows]))


def head_rows(blocks, n_kv, n_blocks) -> torch.Tensor:
    """Rows of a layer's cache viewed as (K N, P, D) that hold each head's copy of the given
    blocks (any shape), in (head, blocks...) order: row = head * N + block."""
    heads = torch.arange(n_kv, device=blocks.device).unsqueeze(1) * n_blocks   # (K, 1)
    return (heads + blocks.reshape(1, -1)).view(-1)


@dataclass(frozen=True)
class AttnMeta:
    """What attention needs to know about one packed ragged batch. Built by the runner, passed
    as an argument (never through a global). Sequence b owns the new tokens
    query_start[b]:query_start[b+1] of the packed batch; its context (cached prefix plus the new
    tokens) is context_lens[b] tokens long, stored in the blocks block_tables[b, :]."""
    slot_mapping: torch.Tensor  # (T,) int64: cache slot of every new token
    block_tables: torch.Tensor  # (B, max_blocks) int32/int64: physical block ids, padded with 0
    context_lens: torch.Tensor  # (B,) int64: tokens in the cache after this step's writes
    query_start: torch.Tensor   # (B+1,) int64: prefix sums of the new-token counts
    # host copies, so that the reference path can slice without syncing a device
    context_lens_host: tuple = ()
    query_start_host: tuple = ()
    # the geometry of the pool the block tables index: K heads, N blocks of P slots
    n_kv_head: int = 0
    n_blocks: int = 0
    block_size: int = 0
    # a static batch (generate.StaticDecode): rows past its sequences have slot -1 (written
    # nowhere), and the decode kernel's split count is fixed (a captured graph cannot take
    # one chosen from host-side lengths); 0: chosen per step
    padded: bool = False
    n_splits: int = 0
    block_tables_host: tuple = ()  # a host copy of block_tables where the runner had one

    @classmethod
    def paged(cls, slots, block_tables, context_lens, query_start, pool_shape, device=None,
              inputs=()):
        """A batch over a paged pool of pool_shape (K, N, P), from host lists: slots (T,),
        context_lens (B,), query_start (B+1,); block_tables (B, max_blocks) (lists or a host
        tensor). Everything goes to the device in one copy (upload), along with the host
        lists `inputs` (the runner's tokens and positions); returns (meta, inputs on device)
        if inputs are given, else meta."""
        n_kv, n_blocks, block_size = pool_shape
        if isinstance(block_tables, torch.Tensor):
            block_tables = block_tables.tolist()
        *ins, slot_t, ctx_t, start_t, table_t = upload(
            [*inputs, slots, context_lens, query_start, [b for t in block_tables for b in t]],
            device)
        meta = cls(slot_t, table_t.view(len(block_tables), -1), ctx_t, start_t,
                   tuple(context_lens), tuple(query_start), n_kv, n_blocks, block_size,
                   block_tables_host=tuple(map(tuple, block_tables)))
        return (meta, ins) if inputs else meta

    @classmethod
    def dense(cls, query_start, device=None):
        """The uncached path: sequences packed at query_start (B+1 host ints), no pool."""
        return cls(None, None, None, torch.tensor(query_start, dtype=torch.int64, device=device),
                   (), tuple(query_start))

    @classmethod
    def for_store(cls, slot_mapping, block_size):
        """Only what store_kv reads: the slot (T,) of every token, in blocks of block_size."""
        return cls(slot_mapping, None, None, None, block_size=block_size)

    @property
    def is_decode(self) -> bool:
        """Every sequence has exactly one new token (the decode fast path applies)."""
        qs = self.query_start_host
        return len(qs) - 1 == qs[-1]

    @cached_property
    def slot_block_offset(self):
        """(block, offset) of every new token's slot: the same for every layer."""
        return self.slot_mapping // self.block_size, self.slot_mapping % self.block_size

    @cached_property
    def decode_gather(self):
        """(blocks (B, n_used), valid (B, n_used * P) mask or None) for the decode reference:
        the same for every layer, so computed once per step."""
        block_size = self.block_size
        n_ctx_max = max(self.context_lens_host)
        n_used = -(-n_ctx_max // block_size)
        blocks = self.block_tables[:, :n_used]
        if all(c == n_used * block_size for c in self.context_lens_host):
            return blocks, None  # no padding anywhere: SDPA needs no mask
        k_pos = torch.arange(n_used * block_size, device=blocks.device)
        valid = k_pos.unsqueeze(0) < self.context_lens.unsqueeze(1)           # (B, S)
        return blocks, valid

    @cached_property
    def head_block_rows(self) -> torch.Tensor:
        """(K * B * n_used,) rows of a layer's cache viewed as (K N, P, D) that hold each
        head's copy of every block of decode_gather, in (head, sequence, block) order. The
        same for every layer, so built once per step."""
        return head_rows(self.decode_gather[0], self.n_kv_head, self.n_blocks)

    @cached_property
    def decode_subset(self):
        """In a mixed batch, (packed rows, AttnMeta) of the sequences with one new token, for
        the batched decode path; None if fewer than two decode."""
        qs = self.query_start_host
        seqs = [b for b in range(len(qs) - 1) if qs[b + 1] - qs[b] == 1]
        if len(seqs) < 2:
            return None
        idx = torch.tensor(seqs, device=self.block_tables.device)
        rows = torch.tensor([qs[b] for b in seqs], device=self.block_tables.device)
        ctx = tuple(self.context_lens_host[b] for b in seqs)
        sub = AttnMeta(self.slot_mapping[rows], self.block_tables[idx], self.context_lens[idx],
                       torch.arange(len(seqs) + 1, device=rows.device), ctx,
                       tuple(range(len(seqs) + 1)), self.n_kv_head, self.n_blocks,
                       self.block_size)
        return rows, sub

    @cached_property
    def last_token_index(self) -> torch.Tensor:
        """(B,) position in the packed batch of each sequence's last new token."""
        return self.query_start[1:] - 1


# ------------------------------------------------------------------------------------------
# dispatch and launcher checks

def use_triton(x: torch.Tensor) -> bool:
    """CUDA tensors take the Triton kernels (where triton is installed), the rest the reference;
    the environment variable KVCACHE_KERNELS=ref|triton overrides that (read at every call, so
    a test can flip it)."""
    force = os.environ.get("KVCACHE_KERNELS", "")
    if force not in ("", "ref", "triton"):
        raise ValueError(f"KVCACHE_KERNELS={force!r}: use 'ref' or 'triton'")
    if force == "triton" and triton is None:
        raise RuntimeError("KVCACHE_KERNELS=triton: the triton package is not installed (it has "
                           "no wheel for this platform)")
    return force == "triton" or (force == "" and x.is_cuda and triton is not None)


def check_cache(k_cache, v_cache, q, kv_scales):
    """What every launcher assumes of a layer's cache before it computes addresses. Returns
    the scales' pointers and strides for a quantized cache (the cache itself, unused, else)."""
    assert k_cache.shape == v_cache.shape and k_cache.dim() == 4, "cache: (K, N, P, D) each"
    assert k_cache.stride() == v_cache.stride() and k_cache.stride(-1) == 1, \
        "k_cache and v_cache: the same strides, D contiguous"
    assert q.dtype in (torch.float32, torch.float16, torch.bfloat16), \
        f"Triton kernels take fp32, fp16 or bf16, not {q.dtype}"
    if kv_scales is None:
        assert k_cache.dtype == v_cache.dtype == q.dtype, \
            f"dtypes differ: cache {k_cache.dtype}, input {q.dtype}"
        return k_cache, v_cache, 0, 0
    k_scales, v_scales = kv_scales
    assert k_cache.dtype == v_cache.dtype and k_cache.dtype in QMAX, k_cache.dtype
    assert k_scales.shape == v_scales.shape == k_cache.shape[:3] and k_scales.stride() == \
        v_scales.stride() and k_scales.stride(-1) == 1, "scales: (K, N, P) each"
    return k_scales, v_scales, k_scales.stride(0), k_scales.stride(1)


# ptxas, left to itself, at times keeps an attention kernel to 64-128 registers per thread and
# spills the rest; allowed all 255 (what 8 warps can have on every target), it spills none
MAX_REGISTERS = 255


class Tiles(NamedTuple):
    rows: int    # query rows of a tile (queries x padded GQA group)
    keys: int    # keys of a tile
    warps: int
    stages: int  # software-pipelining depth: each stage buffers a K and a V tile


def attention_tiles(dtype, d, quant, decode=False) -> Tiles:
    """Tiles, warps and pipelining of the attention kernels: the largest that the compiled
    kernels hold in registers without spilling on sm_80 to sm_90 (the table of `python
    bench.py kernels --compile-only`; the test suite holds it to zero spills). 16-bit prefill
    keeps 64 rows (Hopper's wgmma needs 64 per warp group) and narrows the key tile at D 128;
    decode has 16 rows (one query x the GQA group padded to 16) and narrows it for a
    dequantized or masked (D 80) head. fp32 keeps full precision in tl.dot (dot_precision):
    scalar FMA, whose operands live in registers, so its tiles are the smallest a GPU tl.dot
    allows (16) and it does without pipelining."""
    wide = d > 64
    if dtype == torch.float32:
        return Tiles(16, 16, 8, 1)
    if decode:
        return Tiles(16, 32 if quant or d != dot_width(d) else 64, 8, 3)
    return Tiles(64, 16 if wide else 32, 8, 2)


def check_grid(*grid) -> tuple:
    """A launch grid within CUDA's limits: 2^31 - 1 programs along x, 65,535 along y and z."""
    assert grid[0] < 2 ** 31 and all(n <= 65535 for n in grid[1:]), f"grid {grid} too large"
    return grid


def dot_precision(dtype) -> str:
    """fp32 stays fp32 in tl.dot (TF32 would cost ~1e-3 relative error); 16-bit inputs
    ignore the setting."""
    return "ieee" if dtype == torch.float32 else "tf32"


# ------------------------------------------------------------------------------------------
# a quantized cache: int8 or fp8 values, one fp32 scale per (token, KV head), K and V alike

QMAX = {torch.int8: 127.0, torch.float8_e4m3fn: 448.0}  # the largest value of each format


def quantize_ref(x, dtype):
    """x (..., D) -> values (..., D) in dtype, scales (...) fp32. Symmetric, one scale per
    vector: scale = max|x| / QMAX, so the vector's largest element maps to the format's
    largest value; int8 rounds to nearest (halves away from zero), so |x - scale * value|
    <= scale / 2; fp8 e4m3 keeps 3 mantissa bits, a relative error of at most 2^-4.
    A zero vector gets scale 0 (and dequantizes to exactly 0)."""
    xf = x.float()
    scale = xf.abs().amax(-1) / QMAX[dtype]
    y = xf / torch.where(scale == 0, 1.0, scale).unsqueeze(-1)
    if dtype == torch.int8:
        y = (torch.floor(y.abs() + 0.5) * y.sign()).clamp(-127, 127)
    return y.to(dtype), scale


def dequantize_ref(values, scales, dtype):
    """The inverse: values (..., D) times their scales (...), in dtype."""
    return (values.float() * scales.unsqueeze(-1)).to(dtype)


# ------------------------------------------------------------------------------------------
# store K/V into slots

def store_kv_ref(k, v, k_cache, v_cache, meta: AttnMeta, kv_scales=None):
    """Write the new tokens' k, v (T, K, D) into the pool, token t at slot_mapping[t], i.e.
    block slot // P, offset slot % P. In place: the pool is the cache's own tensor, and
    writing into it is the point. kv_scales: (k_scales, v_scales), each (K, N, P), for a
    quantized pool: the vectors are quantized here, on the way in."""
    block, offset = meta.slot_block_offset
    if meta.padded:  # a static batch's padding rows (slot -1) are written nowhere
        keep = meta.slot_mapping >= 0
        k, v, block, offset = k[keep], v[keep], block[keep], offset[keep]
    for x, cache, scales in zip((k, v), (k_cache, v_cache), kv_scales or (None, None)):
        if scales is not None:
            x, s = quantize_ref(x, cache.dtype)                             # (T, K, D), (T, K)
            scales.permute(1, 2, 0).index_put_((block, offset), s)          # a (N, P, K) view
        cache.permute(1, 2, 0, 3).index_put_((block, offset), x)            # a (N, P, K, D) view


@jit
def _store_vector(x_ptr, cache_ptr, scale_ptr, d, d_ok, QMAX: tl.constexpr,
                  QUANT: tl.constexpr, IS_INT: tl.constexpr):
    """Copy one D-vector into the cache; quantized: scale by max|x| / QMAX as quantize_ref."""
    x = tl.load(x_ptr + d, mask=d_ok, other=0.0)
    if QUANT:
        x = x.to(tl.float32)
        scale = tl.max(tl.abs(x), 0) / QMAX
        x = x / tl.where(scale == 0.0, 1.0, scale)
        if IS_INT:  # round to nearest, halves away from zero (the conversion truncates)
            x = tl.minimum(tl.maximum(tl.floor(tl.abs(x) + 0.5), 0.0), QMAX) * \
                tl.where(x < 0, -1.0, 1.0)
        tl.store(scale_ptr, scale)
    tl.store(cache_ptr + d, x.to(cache_ptr.dtype.element_ty), mask=d_ok)


@jit
def _store_kv_kernel(k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, k_scales_ptr, v_scales_ptr,
                     slot_ptr,
                     s_kt, s_kh, s_vt, s_vh,  # strides of k, v (T, K, D); D's stride is 1
                     s_ch, s_cn, s_cp,        # strides of a cache (K, N, P, D); D's stride is 1
                     s_sh, s_sn,              # strides of the scales (K, N, P); P's stride is 1
                     BLOCK_SIZE: tl.constexpr, HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr,
                     QMAX: tl.constexpr, QUANT: tl.constexpr, IS_INT: tl.constexpr):
    """One program per (token, KV head): copy D elements of K and of V into the token's slot
    (quantizing them, and writing their scales, for an int8 / fp8 pool); a negative slot (a
    static batch's padding row) is written nowhere. Offsets are int64: a pool of 2^31
    elements is only 4 GiB of bf16."""
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    if slot >= 0:
        block, offset = slot // BLOCK_SIZE, slot % BLOCK_SIZE
        d = tl.arange(0, BLOCK_D)  # BLOCK_D: D rounded up to a power of two, masked
        d_ok = d < HEAD_D
        dst = h * s_ch + block * s_cn + offset * s_cp
        at = h * s_sh + block * s_sn + offset
        _store_vector(k_ptr + t * s_kt + h * s_kh, k_cache_ptr + dst, k_scales_ptr + at, d,
                      d_ok, QMAX, QUANT, IS_INT)
        _store_vector(v_ptr + t * s_vt + h * s_vh, v_cache_ptr + dst, v_scales_ptr + at, d,
                      d_ok, QMAX, QUANT, IS_INT)


def store_kv_triton(k, v, k_cache, v_cache, meta: AttnMeta, kv_scales=None):
    k_scales, v_scales, s_sh, s_sn = check_cache(k_cache, v_cache, k, kv_scales)
    n_tok, n_kv, d = k.shape
    assert v.shape == k.shape and k.stride(-1) == 1 and v.stride(-1) == 1, "k, v: (T, K, D)"
    assert k_cache.shape[0] == n_kv and k_cache.shape[-1] == d, "k/v and the cache disagree"
    _store_kv_kernel[check_grid(n_tok, n_kv)](
        k, v, k_cache, v_cache, k_scales, v_scales, meta.slot_mapping, k.stride(0), k.stride(1),
        v.stride(0), v.stride(1), *k_cache.stride()[:3], s_sh, s_sn,
        BLOCK_SIZE=k_cache.shape[2], HEAD_D=d, BLOCK_D=triton.next_power_of_2(d),
        QMAX=QMAX.get(k_cache.dtype, 0.0), QUANT=kv_scales is not None,
        IS_INT=k_cache.dtype == torch.int8)


def store_kv(k, v, k_cache, v_cache, meta: AttnMeta, kv_scales=None):
    if use_triton(k):
        return store_kv_triton(k, v, k_cache, v_cache, meta, kv_scales)
    return store_kv_ref(k, v, k_cache, v_cache, meta, kv_scales)


# ------------------------------------------------------------------------------------------
# Triton: one tile of keys for a tile of query rows (shared by prefill and decode)

@jit
def _attend_tile(q, acc, m_i, l_i, k_base, v_base, ks_base, vs_base, table_ptr, start, k_end,
                 q_pos, window, qk_scale, s_cn, s_cp, s_sn, BLOCK_N: tl.constexpr,
                 BLOCK_SIZE: tl.constexpr, HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr,
                 MASKED: tl.constexpr, QUANT: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Online softmax over the keys start..start+BLOCK_N of one sequence, one KV head.
    q (M, BLOCK_D) rows, acc (M, BLOCK_D) fp32 unnormalised output, m_i (M,) running max of
    the scores in log2 units, l_i (M,) running sum of exp2(score - m_i). Key j lives in block
    table[j // P] at offset j % P. MASKED: keys at or past k_end, after a row's own position
    q_pos, or at or before q_pos - window (a sliding window; a huge window for none) are
    left out; tiles wholly inside every row's keys skip the mask.
    QUANT: the cache holds int8 / fp8 values with one scale per key (ks_base, vs_base)."""
    kpos = start + tl.arange(0, BLOCK_N)
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_D
    k_ok = kpos < k_end  # always true on an unmasked tile
    if MASKED:
        block = tl.load(table_ptr + kpos // BLOCK_SIZE, mask=k_ok, other=0).to(tl.int64)
        kv_mask = k_ok[:, None] & d_ok[None, :]
    else:
        block = tl.load(table_ptr + kpos // BLOCK_SIZE).to(tl.int64)
        kv_mask = d_ok[None, :]
    offs = (block * s_cn + (kpos % BLOCK_SIZE) * s_cp)[:, None] + d[None, :]  # (BLOCK_N, BLOCK_D)
    scale_offs = block * s_sn + kpos % BLOCK_SIZE                              # (BLOCK_N,)
    k = tl.load(k_base + offs, mask=kv_mask, other=0.0)
    # exp(x * scale) == exp2(x * scale * log2(e)): qk_scale carries the log2(e)
    if QUANT:  # int8 / fp8 values are exact in q's dtype; each key's scale scales its column
        k_scale = tl.load(ks_base + scale_offs, mask=k_ok, other=0.0)
        qk = tl.dot(q, tl.trans(k.to(q.dtype)), input_precision=DOT_PRECISION) * \
            (k_scale * qk_scale)[None, :]                                  # (M, BLOCK_N) fp32
    else:
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
    if MASKED:
        allowed = (kpos[None, :] <= q_pos[:, None]) & (kpos[None, :] > q_pos[:, None] - window) \
            & k_ok[None, :]
        qk = tl.where(allowed, qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row that has seen no key yet
    p = tl.math.exp2(qk - m_safe[:, None])
    alpha = tl.math.exp2(m_i - m_safe)  # rescales what was summed under the old maximum
    v = tl.load(v_base + offs, mask=kv_mask, other=0.0)
    if QUANT:  # dequantize V into q's dtype, as the reference does
        v_scale = tl.load(vs_base + scale_offs, mask=k_ok, other=0.0)
        v = (v.to(tl.float32) * v_scale[:, None]).to(q.dtype)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return acc, m_new, l_i * alpha + tl.sum(p, 1)


@jit
def _query_rows(tile, n_q, kv_head, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr,
                BLOCK_Q: tl.constexpr):
    """GQA packing: the rows of a tile are BLOCK_Q query positions x GROUP_PAD query heads of
    one KV head, so the G heads that read the same K/V share one tl.dot. Padding heads
    (g >= G, when G is not a power of two or too small for a dot) are computed and dropped.
    Returns each row's query index within the sequence, its head and whether it is real."""
    r = tl.arange(0, BLOCK_Q * GROUP_PAD)
    i = tile * BLOCK_Q + r // GROUP_PAD
    g = r % GROUP_PAD
    return i, kv_head * GROUP + g, (i < n_q) & (g < GROUP)

# ------------------------------------------------------------------------------------------
# attention of new queries over each sequence's paged context (prefill, chunked prefill,
# prefix-cache hits, speculative verification all take this path)

def gather_blocks(cache, scales, rows, dtype):
    """Rows of a layer's cache viewed as (K N, P, D), each one head's copy of one block (a
    dim-0 gather), dequantized to dtype when the pool is quantized: (len(rows), P, D)."""
    n_kv, n_blocks, block_size, d = cache.shape
    x = cache.view(n_kv * n_blocks, block_size, d).index_select(0, rows)
    if scales is None:
        return x
    return dequantize_ref(x, scales.view(n_kv * n_blocks, block_size).index_select(0, rows),
                          dtype)


def gather_context(k_cache, v_cache, block_table, n_ctx, kv_scales=None, dtype=None):
    """The first n_ctx tokens of one sequence as contiguous (K, S, D) tensors (in dtype)."""
    n_kv, n_blocks, block_size, d = k_cache.shape
    n_used = -(-n_ctx // block_size)
    rows = head_rows(block_table[:n_used], n_kv, n_blocks)                 # (K n_used,)
    return [gather_blocks(c, s, rows, dtype).view(n_kv, n_used * block_size, d)[:, :n_ctx]
            for c, s in zip((k_cache, v_cache), kv_scales or (None, None))]


def causal_attention_one(q, k, v, scale, window=0):
    """Attention of the last Tq positions of a sequence over all of its S keys.
    q (Tq, H, D), k/v (K, S, D) -> (Tq, H, D). Query i sits at position S - Tq + i and sees keys
    0..S-Tq+i (the last `window` of them with a sliding window). SDPA accumulates in fp32
    (fp64 for fp64 inputs)."""
    n_q, n_head, d = q.shape
    n_kv, n_ctx, _ = k.shape
    g = n_head // n_kv
    qh = q.view(n_q, n_kv, g, d).permute(1, 2, 0, 3)                    # (K, G, Tq, D)
    # GQA: each KV head is broadcast over its G query heads with a stride-0 expand, no copy.
    # (enable_gqa=True would do the same but sends CPU SDPA down its slow math path.)
    kh = k.unsqueeze(1).expand(n_kv, g, n_ctx, d)                       # (K, G, S, D)
    vh = v.unsqueeze(1).expand(n_kv, g, n_ctx, d)
    if n_q == n_ctx and not window:  # no cached prefix: the plain causal diagonal
        out = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, scale=scale)
    else:  # a cached prefix shifts the diagonal by S - Tq; a window bounds it from below
        q_pos = torch.arange(n_ctx - n_q, n_ctx, device=q.device).unsqueeze(1)  # (Tq, 1)
        k_pos = torch.arange(n_ctx, device=q.device).unsqueeze(0)              # (1, S)
        allowed = k_pos <= q_pos
        if window:
            allowed &= k_pos > q_pos - window
        out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=allowed, scale=scale)
    return out.permute(2, 0, 1, 3).reshape(n_q, n_head, d)              # (K, G, Tq, D) -> ...


def prefill_attention_ref(q, k_cache, v_cache, meta: AttnMeta, scale, kv_scales=None,
                          window=0):
    """q (T, H, D) packed new queries -> (T, H, D). Each sequence attends over its paged context
    (cached prefix plus its new tokens, already stored), causally. In a mixed batch the
    sequences that decode (one new token) go through the batched decode path together."""
    out = torch.empty_like(q)
    qs, cl = meta.query_start_host, meta.context_lens_host
    decoding = meta.decode_subset
    if decoding is not None:
        rows, sub_meta = decoding
        out[rows] = decode_attention_ref(q[rows], k_cache, v_cache, sub_meta, scale, kv_scales,
                                         window)
    for b in range(len(cl)):
        if decoding is None or qs[b + 1] - qs[b] > 1:
            k, v = gather_context(k_cache, v_cache, meta.block_tables[b], cl[b], kv_scales,
                                  q.dtype)
            out[qs[b]:qs[b + 1]] = causal_attention_one(q[qs[b]:qs[b + 1]], k, v, scale, window)
    return out


@jit
def _prefill_attention_kernel(
        q_ptr, k_cache_ptr, v_cache_ptr, k_scales_ptr, v_scales_ptr, out_ptr, block_tables_ptr,
        context_lens_ptr, query_start_ptr, qk_scale, window,
        s_qt, s_qh, s_ot, s_oh,  # strides of q and out (T, H, D)
        s_ch, s_cn, s_cp,        # strides of a cache (K, N, P, D)
        s_sh, s_sn,              # strides of the scales (K, N, P), quantized caches only
        s_bt,                    # row stride of block_tables (B, max_blocks)
        GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, BLOCK_Q: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_SIZE: tl.constexpr, HEAD_D: tl.constexpr,
        BLOCK_D: tl.constexpr, QUANT: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Program (tile, b, kv_head): BLOCK_Q new queries of sequence b, for the G query heads of
    one KV head, over the sequence's paged context. Query i of n_q new ones sits at position
    n_ctx - n_q + i (a cached prefix shifts the diagonal) and sees keys 0..its position, or
    the last `window` of them (window: a sliding window, or one longer than any context)."""
    tile = tl.program_id(0)  # the axis without the 65,535 limit: a long prompt has many tiles
    b = tl.program_id(1)
    kv_head = tl.program_id(2).to(tl.int64)
    q_start = tl.load(query_start_ptr + b)
    n_q = tl.load(query_start_ptr + b + 1) - q_start
    if tile * BLOCK_Q < n_q:  # the grid covers the longest sequence; shorter ones stop here
        n_ctx = tl.load(context_lens_ptr + b)
        i, head, row_ok = _query_rows(tile, n_q, kv_head, GROUP, GROUP_PAD, BLOCK_Q)
        d = tl.arange(0, BLOCK_D)
        mask = row_ok[:, None] & (d < HEAD_D)[None, :]
        q = tl.load(q_ptr + ((q_start + i) * s_qt)[:, None] + (head * s_qh)[:, None] + d[None, :],
                    mask=mask, other=0.0)
        q_pos = n_ctx - n_q + i
        q_lo = n_ctx - n_q + tile * BLOCK_Q               # the tile's first query position
        k_hi = tl.minimum(q_lo + BLOCK_Q, n_ctx)          # one past the last key it sees
        n_full = (q_lo + 1) // BLOCK_N * BLOCK_N          # keys every row sees: no mask
        # a sliding window: the first tile any row sees, and the first every row sees whole
        k_start = tl.maximum(q_lo - window + 1, 0) // BLOCK_N * BLOCK_N
        lo_full = tl.cdiv(tl.maximum(k_hi - window, 0), BLOCK_N) * BLOCK_N
        u0 = tl.maximum(tl.minimum(lo_full, n_full), k_start)  # the unmasked tiles: [u0, u1)
        u1 = tl.where(lo_full < n_full, n_full, u0)
        k_base = k_cache_ptr + kv_head * s_ch
        v_base = v_cache_ptr + kv_head * s_ch
        ks_base = k_scales_ptr + kv_head * s_sh
        vs_base = v_scales_ptr + kv_head * s_sh
        table = block_tables_ptr + b.to(tl.int64) * s_bt
        m_i = tl.full([BLOCK_Q * GROUP_PAD], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_Q * GROUP_PAD], tl.float32)
        acc = tl.zeros([BLOCK_Q * GROUP_PAD, BLOCK_D], tl.float32)
        for start in range(u0, u1, BLOCK_N):
            acc, m_i, l_i = _attend_tile(q, acc, m_i, l_i, k_base, v_base, ks_base, vs_base,
                                         table, start, n_ctx, q_pos, window, qk_scale, s_cn,
                                         s_cp, s_sn, BLOCK_N, BLOCK_SIZE, HEAD_D, BLOCK_D, False,
                                         QUANT, DOT_PRECISION)
        # one masked loop for the tiles the window's edge crosses ([k_start, u0)) and those
        # the diagonal crosses ([u1, k_hi)): one copy of the tile code, as many registers as
        # without a window (a third loop spilled at D 128 over int8 on sm_80)
        n_edge = (u0 - k_start) // BLOCK_N
        for t in range(0, n_edge + tl.cdiv(k_hi - u1, BLOCK_N)):
            start = tl.where(t < n_edge, k_start + t * BLOCK_N, u1 + (t - n_edge) * BLOCK_N)
            acc, m_i, l_i = _attend_tile(q, acc, m_i, l_i, k_base, v_base, ks_base, vs_base,
                                         table, start, n_ctx, q_pos, window, qk_scale, s_cn,
                                         s_cp, s_sn, BLOCK_N, BLOCK_SIZE, HEAD_D, BLOCK_D, True,
                                         QUANT, DOT_PRECISION)
        # (a padding row past the last query may see no key under a window: l = 0, not stored)
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        tl.store(out_ptr + ((q_start + i) * s_ot)[:, None] + (head * s_oh)[:, None] + d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=mask)


def group_pad(group, min_rows=1) -> int:
    """G rounded up to a power of two (tl.arange needs one), and to at least min_rows."""
    return max(triton.next_power_of_2(group), min_rows)


def dot_width(d) -> int:
    """D rounded up to a power of two of at least 16 (a GPU tl.dot's least inner size)."""
    return max(triton.next_power_of_2(d), 16)


NO_WINDOW = 1 << 30  # what the kernels take for "no sliding window": longer than any context


def prefill_attention_triton(q, k_cache, v_cache, meta: AttnMeta, scale, kv_scales=None,
                             out=None, block_m=None, block_n=None, window=0):
    """Launcher: one program per (sequence, tile of queries, KV head); a tile packs about
    block_m rows (queries x padded GQA group); tiles and warps from attention_tiles unless
    given. out: where to write (tests pass a poisoned
    tensor, to catch elements the kernel never writes)."""
    k_scales, v_scales, s_sh, s_sn = check_cache(k_cache, v_cache, q, kv_scales)
    n_tok, n_head, d = q.shape
    n_kv, _, block_size, _ = k_cache.shape
    assert q.stride(-1) == 1 and n_head % n_kv == 0 and k_cache.shape[-1] == d
    out = torch.empty_like(q) if out is None else out
    tiles = attention_tiles(q.dtype, d, kv_scales is not None)
    block_m, block_n = block_m or tiles.rows, block_n or tiles.keys
    qs = meta.query_start_host
    max_q = max(e - s for s, e in zip(qs, qs[1:]))
    g_pad = group_pad(n_head // n_kv)
    block_q = max(1, block_m // g_pad)
    grid = check_grid(triton.cdiv(max_q, block_q), len(qs) - 1, n_kv)
    _prefill_attention_kernel[grid](
        q, k_cache, v_cache, k_scales, v_scales, out, meta.block_tables, meta.context_lens,
        meta.query_start, scale * math.log2(math.e), window or NO_WINDOW, q.stride(0),
        q.stride(1), out.stride(0),
        out.stride(1), *k_cache.stride()[:3], s_sh, s_sn, meta.block_tables.stride(0),
        GROUP=n_head // n_kv, GROUP_PAD=g_pad, BLOCK_Q=block_q, BLOCK_N=block_n,
        BLOCK_SIZE=block_size, HEAD_D=d, BLOCK_D=dot_width(d), QUANT=kv_scales is not None,
        DOT_PRECISION=dot_precision(q.dtype), num_stages=tiles.stages, num_warps=tiles.warps,
        maxnreg=MAX_REGISTERS)
    return out


def prefill_attention(q, k_cache, v_cache, meta: AttnMeta, scale, kv_scales=None, window=0):
    if use_triton(q):
        return prefill_attention_triton(q, k_cache, v_cache, meta, scale, kv_scales,
                                        window=window)
    return prefill_attention_ref(q, k_cache, v_cache, meta, scale, kv_scales, window)


# ------------------------------------------------------------------------------------------
# decode attention: one new query per sequence, all sequences in one batched computation

def decode_attention_ref(q, k_cache, v_cache, meta: AttnMeta, scale, kv_scales=None,
                         window=0):
    """q (B, H, D), one query per sequence at its last position -> (B, H, D). Gathers every
    sequence's blocks, padded to the longest context, and masks the padding. With one query
    position there is no causal mask, so the G query heads of a KV head are simply G rows."""
    n_seq, n_head, d = q.shape
    n_kv, _, block_size, _ = k_cache.shape
    blocks, valid = meta.decode_gather                                   # (B, n_used), (B, S)
    n_ctx = blocks.shape[1] * block_size
    if window:  # only the last `window` keys of each sequence: its query is at ctx - 1
        k_pos = torch.arange(n_ctx, device=q.device)
        inside = k_pos[None, :] > meta.context_lens[:, None] - 1 - window
        valid = inside if valid is None else valid & inside
    n_blocks = k_cache.shape[1]
    assert (meta.n_kv_head, meta.n_blocks, meta.block_size) == (n_kv, n_blocks, block_size), \
        "the metadata describes another pool"
    # every head's copy of every block, as rows of the (K N, P, D) view: a dim-0 gather
    rows_kn = meta.head_block_rows
    k, v = (gather_blocks(c, s, rows_kn, q.dtype).view(n_kv, n_seq, n_ctx, d)  # (K, B, S, D)
            for c, s in zip((k_cache, v_cache), kv_scales or (None, None)))
    rows = q.view(n_seq, n_kv, n_head // n_kv, d).transpose(0, 1)        # (K, B, G, D)
    if n_seq == 1:  # CPU SDPA is fastest for one sequence (and exact in fp32 accumulation)
        mask = None if valid is None else valid.view(1, 1, n_ctx)
        out = F.scaled_dot_product_attention(rows[:, 0], k[:, 0], v[:, 0], attn_mask=mask,
                                             scale=scale)                # (K, G, D)
        return out.reshape(1, n_head, d)
    # a batch: CPU SDPA tiles G = 3 query rows badly (2.6x slower at 64 x 384); two batched
    # matmuls with an fp32 softmax between them are faster
    acc = torch.promote_types(q.dtype, torch.float32)                    # fp32, or fp64
    scores = torch.matmul(rows, k.transpose(-1, -2)).to(acc) * scale    # (K, B, G, S)
    if valid is not None:
        scores = scores.masked_fill(~valid[None, :, None, :], float("-inf"))
    out = torch.matmul(torch.softmax(scores, dim=-1).to(v.dtype), v)    # (K, B, G, D)
    return out.transpose(0, 1).reshape(n_seq, n_head, d)


@jit
def _decode_attention_kernel(
        q_ptr, k_cache_ptr, v_cache_ptr, k_scales_ptr, v_scales_ptr, part_ptr, lse_ptr,
        block_tables_ptr, context_lens_ptr, qk_scale, window, s_qb, s_qh, s_ch, s_cn, s_cp, s_sh,
        s_sn, s_bt, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, N_SPLITS: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_SIZE: tl.constexpr, HEAD_D: tl.constexpr,
        BLOCK_D: tl.constexpr, QUANT: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Program (b, kv_head, split): the one query of sequence b, G query heads as the rows of
    one tl.dot, over the split-th of N_SPLITS equal slices of the keys it sees (its context,
    or the last `window` of it) (flash decoding).
    Writes the slice's normalised output part (B, H, N_SPLITS, D) and its log-sum-exp (log2
    units) lse (B, H, N_SPLITS); an empty slice writes lse = -inf, which the merge ignores."""
    b = tl.program_id(0)
    kv_head = tl.program_id(1).to(tl.int64)
    split = tl.program_id(2)
    n_ctx = tl.load(context_lens_ptr + b)
    # the slice length is a multiple of BLOCK_N, from this sequence's own length: no host sync
    k_first = tl.maximum(n_ctx - window, 0) // BLOCK_N * BLOCK_N
    per_split = tl.cdiv(tl.cdiv(n_ctx - k_first, N_SPLITS), BLOCK_N) * BLOCK_N
    k_lo = k_first + split * per_split
    k_hi = tl.minimum(k_lo + per_split, n_ctx)
    i, head, row_ok = _query_rows(0, 1, kv_head, GROUP, GROUP_PAD, 1)
    d = tl.arange(0, BLOCK_D)
    mask = row_ok[:, None] & (d < HEAD_D)[None, :]
    q = tl.load(q_ptr + b.to(tl.int64) * s_qb + (head * s_qh)[:, None] + d[None, :], mask=mask,
                other=0.0)
    m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, BLOCK_D], tl.float32)
    q_pos = n_ctx - 1 + tl.zeros([GROUP_PAD], tl.int64)  # the query is the last position
    for start in range(k_lo, k_hi, BLOCK_N):
        acc, m_i, l_i = _attend_tile(q, acc, m_i, l_i, k_cache_ptr + kv_head * s_ch,
                                     v_cache_ptr + kv_head * s_ch, k_scales_ptr + kv_head * s_sh,
                                     v_scales_ptr + kv_head * s_sh,
                                     block_tables_ptr + b.to(tl.int64) * s_bt, start, k_hi,
                                     q_pos, window, qk_scale, s_cn, s_cp, s_sn, BLOCK_N,
                                     BLOCK_SIZE,
                                     HEAD_D, BLOCK_D, True, QUANT, DOT_PRECISION)
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    row = (b * (GROUP * tl.num_programs(1)) + head) * N_SPLITS + split  # (b, head, split)
    tl.store(part_ptr + row[:, None] * HEAD_D + d[None, :], acc / l_safe[:, None], mask=mask)
    tl.store(lse_ptr + row, m_i + tl.math.log2(l_safe), mask=row_ok)


@jit
def _merge_splits_kernel(part_ptr, lse_ptr, out_ptr, s_ob, s_oh, N_SPLITS: tl.constexpr,
                         SPLITS_PAD: tl.constexpr, HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr):
    """Program (b, head): out = sum_s w_s part_s with w_s = 2^(lse_s - max lse) / sum of them,
    the softmax over the whole context rebuilt from the slices' partial softmaxes."""
    b = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    s = tl.arange(0, SPLITS_PAD)
    d = tl.arange(0, BLOCK_D)
    row = (b * tl.num_programs(1) + head) * N_SPLITS + s
    lse = tl.load(lse_ptr + row, mask=s < N_SPLITS, other=float("-inf"))
    w = tl.math.exp2(lse - tl.max(lse, 0))  # exp2(-inf) = 0: empty slices weigh nothing
    part = tl.load(part_ptr + row[:, None] * HEAD_D + d[None, :],
                   mask=(s < N_SPLITS)[:, None] & (d < HEAD_D)[None, :], other=0.0)
    out = tl.sum(part * w[:, None], 0) / tl.sum(w, 0)
    tl.store(out_ptr + b * s_ob + head * s_oh + d, out.to(out_ptr.dtype.element_ty),
             mask=d < HEAD_D)


@cache
def n_multiprocessors(device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if \
        device.type == "cuda" else 1


def decode_splits(n_seq, n_kv, max_ctx, n_sm, min_keys=256, max_splits=64) -> int:
    """Split-K factor: enough (sequence, KV head, split) programs to fill about two waves of
    the GPU's multiprocessors, with at least min_keys keys per split. From host-side numbers
    only (the batch shape and the longest context the runner already knows): no sync."""
    want = triton.cdiv(2 * n_sm, n_seq * n_kv)
    return max(1, min(want, triton.cdiv(max_ctx, min_keys), max_splits))


def decode_attention_triton(q, k_cache, v_cache, meta: AttnMeta, scale, kv_scales=None,
                            out=None, n_splits=None, block_n=None, window=0):
    """Launcher: split-K decode, then the merge. n_splits=None picks it from the batch."""
    k_scales, v_scales, s_sh, s_sn = check_cache(k_cache, v_cache, q, kv_scales)
    n_seq, n_head, d = q.shape
    n_kv, _, block_size, _ = k_cache.shape
    assert q.stride(-1) == 1 and n_head % n_kv == 0 and k_cache.shape[-1] == d
    tiles = attention_tiles(q.dtype, d, kv_scales is not None, decode=True)
    block_n = block_n or tiles.keys
    if n_splits is None:
        keys = max(meta.context_lens_host)
        n_splits = decode_splits(n_seq, n_kv, min(keys, window) if window else keys,
                                 n_multiprocessors(q.device))
    part = torch.empty(n_seq, n_head, n_splits, d, dtype=torch.float32, device=q.device)
    lse = torch.empty(n_seq, n_head, n_splits, dtype=torch.float32, device=q.device)
    # a GPU tl.dot needs 16 rows: the G query heads of a KV head are padded up to that
    g_pad = group_pad(n_head // n_kv, 16)
    _decode_attention_kernel[check_grid(n_seq, n_kv, n_splits)](
        q, k_cache, v_cache, k_scales, v_scales, part, lse, meta.block_tables,
        meta.context_lens, scale * math.log2(math.e), window or NO_WINDOW, q.stride(0),
        q.stride(1),
        *k_cache.stride()[:3], s_sh, s_sn, meta.block_tables.stride(0), GROUP=n_head // n_kv,
        GROUP_PAD=g_pad, N_SPLITS=n_splits, BLOCK_N=block_n, BLOCK_SIZE=block_size, HEAD_D=d,
        BLOCK_D=dot_width(d), QUANT=kv_scales is not None, DOT_PRECISION=dot_precision(q.dtype),
        num_stages=tiles.stages, num_warps=tiles.warps, maxnreg=MAX_REGISTERS)
    out = torch.empty_like(q) if out is None else out
    _merge_splits_kernel[check_grid(n_seq, n_head)](
        part, lse, out, out.stride(0), out.stride(1), N_SPLITS=n_splits,
        SPLITS_PAD=triton.next_power_of_2(n_splits), HEAD_D=d, BLOCK_D=triton.next_power_of_2(d))
    return out


def decode_attention(q, k_cache, v_cache, meta: AttnMeta, scale, kv_scales=None, window=0):
    if use_triton(q):
        return decode_attention_triton(q, k_cache, v_cache, meta, scale, kv_scales,
                                       n_splits=meta.n_splits or None, window=window)
    return decode_attention_ref(q, k_cache, v_cache, meta, scale, kv_scales, window)


# ------------------------------------------------------------------------------------------
# the decode step as one traceable unit (compiled whole by inductor on a CPU, see model.py)
#
# AttnMeta's host tuples and cached properties are what eager code wants and what a compiler
# cannot trace (every new context length would be a new graph). A DecodeBatch holds tensors
# only, built on the host once per step; the pool is passed whole, as (L 2 K N, P, D) blocks,
# so that the step writes its K/V into it in place (a compiled in-place write into a *view*
# of the pool copied the whole pool twice per layer: measured 2.3 s a step) and every index
# is computed in the graph from the block tables.

CHUNK_BLOCKS = 4  # blocks per chunk of keys in a batched decode step (measured: 2, 4, 8)


@dataclass(frozen=True)
class DecodeBatch:
    """B sequences, one new token each, over a pool of L x 2 x K heads x N blocks of P slots.
    slots (B,) int64: the new token's slot (block * P + offset); block_tables (B, max_blocks)
    int64, padded with any valid block (masked); context_lens (B,) int64: keys each sequence
    attends to, its new token's included.
    The same keys as chunks of CHUNK_BLOCKS blocks, for a batch of two or more (only the
    chunks a sequence has, not the batch's longest context padded for every sequence):
    chunk_tables (NC, CHUNK_BLOCKS) the blocks of each chunk (a short last chunk padded with
    its first block, masked); chunk_seq (NC,) its sequence; chunk_start (NC,) the position of
    its first key; seq_chunks (B, max_chunks) each sequence's chunks, padded with NC (none)."""
    slots: torch.Tensor
    block_tables: torch.Tensor
    context_lens: torch.Tensor
    chunk_tables: torch.Tensor
    chunk_seq: torch.Tensor
    chunk_start: torch.Tensor
    seq_chunks: torch.Tensor

    @classmethod
    def build(cls, slots, block_tables, context_lens, block_size, device=None):
        """From host lists: slots (B,), block_tables (B, max_blocks), context_lens (B,). No
        size but the batch's is ever 1 (tables at least two columns wide, at least two
        chunks): a compiler specializes a dimension of size 1, and a step whose contexts all
        fit one block or one chunk would compile a graph of its own."""
        per_chunk = CHUNK_BLOCKS * block_size
        chunks, owner, start, rows = [], [], [], []
        for b, (table, n) in enumerate(zip(block_tables, context_lens)):
            rows.append([])
            for first in range(0, n, per_chunk):
                at = first // block_size
                blocks = table[at:min(at + CHUNK_BLOCKS, -(-n // block_size))]
                rows[-1].append(len(chunks))
                chunks.append(blocks + blocks[:1] * (CHUNK_BLOCKS - len(blocks)))
                owner.append(b)
                start.append(first)
        if len(chunks) == 1:  # a spare chunk that no sequence reads, so NC is never 1
            chunks, owner, start = chunks * 2, owner * 2, start * 2
        width = max(2, max(map(len, rows)))
        rows = [r + [len(chunks)] * (width - len(r)) for r in rows]
        tables = [t + t[:1] * (2 - len(t)) for t in block_tables]
        return cls(*(torch.tensor(x, dtype=torch.int64).to(device)
                     for x in (slots, tables, context_lens, chunks, owner, start, rows)))

    def tensors(self) -> tuple:
        return tuple(getattr(self, f) for f in self.__dataclass_fields__)


def decode_step_attention(q, k, v, pool, layer, blocks_per_head, batch: DecodeBatch, scale,
                          window=0):
    """Write the step's k, v (B, K, D) into layer `layer` of pool, the whole cache as blocks
    (L * 2 * K * N, P, D) with N = blocks_per_head, then attend each query q (B, H, D) over
    its sequence's keys: (B, H, D). The same maths as decode_attention_ref (fp32 scores and
    softmax, keys outside the context or the window masked), written as products and sums
    that inductor fuses with the gather of the keys into loops: no copy of the keys, no
    matmul of G rows (measured on a CPU, for 48 sequences of 16 to 384 keys: a third of
    the time of a gather and two small matmuls). A batch of several sequences goes chunk by
    chunk (decode_chunks)."""
    n_seq, n_head, d = q.shape
    n_kv, block_size = k.shape[1], pool.shape[1]
    # pool block of (layer, K or V, head) block 0, for the 2K (K or V, head) pairs
    base = (torch.arange(2 * n_kv, device=q.device) + layer * 2 * n_kv) * blocks_per_head
    new = torch.stack([k, v]).transpose(1, 2).reshape(2 * n_kv * n_seq, d)    # (2, K, B) rows
    at = base[:, None] + batch.slots[None, :] // block_size                    # (2K, B)
    offset = (batch.slots % block_size).expand(2 * n_kv, n_seq)
    pool.index_put_((at.flatten(), offset.flatten()), new)
    rows_q = q.view(n_seq, n_kv, n_head // n_kv, d).transpose(0, 1).float()    # (K, B, G, D)
    if n_seq > 1:
        out = decode_chunks(rows_q, pool, base, batch, scale, window)
        return out.to(q.dtype).transpose(0, 1).reshape(n_seq, n_head, d)
    blocks = base[:, None, None] + batch.block_tables[None]                    # (2K, B, n)
    keys, values = pool[blocks].view(2, n_kv, n_seq, -1, d)                    # (K, B, S, D)
    valid = visible(torch.arange(keys.shape[2], device=q.device),
                    batch.context_lens[:, None], window)                        # (B, S)
    scores = (rows_q[:, :, :, None, :] * keys.float()[:, :, None]).sum(-1)     # (K, B, G, S)
    scores = (scores * scale).masked_fill(~valid[None, :, None, :], float("-inf"))
    out = (scores.softmax(-1)[..., None] * values.float()[:, :, None]).sum(-2)  # (K, B, G, D)
    return out.to(q.dtype).transpose(0, 1).reshape(n_seq, n_head, d)


def visible(pos, ctx, window):
    """Which key positions a decode query sees: those before its context's end, and within
    the last `window` of them when there is a window."""
    return pos < ctx if not window else (pos < ctx) & (pos > ctx - 1 - window)


def decode_chunks(rows_q, pool, base, batch: DecodeBatch, scale, window):
    """Attention of many sequences' queries rows_q (K, B, G, D) fp32 over the chunks of
    their keys (see DecodeBatch): each chunk's softmax partials (row max m, sum of
    exponentials l, weighted values a), then each sequence's chunks merged (flash-decoding's
    split-K, the split being a chunk). Each query row of the group is its own product over
    the chunk's keys (G loops that find the keys in the core's cache, where a (G, D) x (D,
    S) matmul per sequence and head is too small to pay). -> (K, B, G, D) fp32."""
    n_kv, _, n_group, d = rows_q.shape
    blocks = base[:, None, None] + batch.chunk_tables[None]                    # (2K, NC, C)
    keys, values = pool[blocks].view(2, n_kv, blocks.shape[1], -1, d)          # (K, NC, CP, D)
    valid = visible(batch.chunk_start[:, None] + torch.arange(keys.shape[2], device=pool.device),
                    batch.context_lens[batch.chunk_seq][:, None], window)      # (NC, CP)
    q = rows_q[:, batch.chunk_seq]                                             # (K, NC, G, D)
    keys, values = keys.float(), values.float()
    scores = torch.stack([(q[:, :, g, None, :] * keys).sum(-1) for g in range(n_group)], 2)
    scores = (scores * scale).masked_fill(~valid[None, :, None, :], float("-inf"))
    m = scores.amax(-1)                                                        # (K, NC, G)
    e = torch.exp(scores - torch.where(m == float("-inf"), 0.0, m)[..., None])  # masked: 0
    l = e.sum(-1)
    a = torch.stack([(e[:, :, g, :, None] * values).sum(-2) for g in range(n_group)], 2)

    def per_sequence(x, empty):  # each sequence's chunks, padded with an empty partial
        return torch.cat([x, x.new_full((n_kv, 1, *x.shape[2:]), empty)], 1)[:, batch.seq_chunks]
    m, l, a = per_sequence(m, float("-inf")), per_sequence(l, 0.0), per_sequence(a, 0.0)
    w = torch.exp(m - m.amax(2, keepdim=True))                                 # (K, B, n, G)
    return (w[..., None] * a).sum(2) / (w * l).sum(2)[..., None]


# ------------------------------------------------------------------------------------------
# attention without any cache: the uncached baseline, and the specification of them all

def attention_spec(q, k, v, window=0):
    """What every attention path here computes, written out as plainly as possible (the tests'
    oracle): softmax(Q K^T / sqrt(D) + causal mask) V over K/V repeated for each query head
    of their group, for the last Tq of S positions. q (Tq, H, D), k/v (S, K, D) -> (Tq, H, D)."""
    n_q, n_head, d = q.shape
    n_ctx, n_kv, _ = k.shape
    g = n_head // n_kv
    kr = k.repeat_interleave(g, dim=1).transpose(0, 1)           # (H, S, D)
    vr = v.repeat_interleave(g, dim=1).transpose(0, 1)           # (H, S, D)
    scores = q.transpose(0, 1) @ kr.transpose(1, 2) / d ** 0.5   # (H, Tq, S)
    allowed = torch.ones(n_q, n_ctx, dtype=torch.bool).tril(diagonal=n_ctx - n_q)
    if window:  # a sliding window: only the last `window` keys up to each query
        allowed &= ~torch.ones(n_q, n_ctx, dtype=torch.bool).tril(diagonal=n_ctx - n_q - window)
    scores = scores.masked_fill(~allowed, float("-inf"))
    return (scores.softmax(-1) @ vr).transpose(0, 1)             # (Tq, H, D)


def dense_causal_attention(q, k, v, query_start, scale, window=0):
    """Ragged causal attention of every packed sequence over its own new tokens only.
    q (T, H, D), k/v (T, K, D), query_start host list (B+1,) -> (T, H, D)."""
    out = torch.empty_like(q)
    for b in range(len(query_start) - 1):
        s, e = query_start[b], query_start[b + 1]
        out[s:e] = causal_attention_one(q[s:e], k[s:e].transpose(0, 1), v[s:e].transpose(0, 1),
                                        scale, window)
    return out


# ------------------------------------------------------------------------------------------
# invariant attention: every query's result computed by the same float operations whatever
# step, batch, chunk or path it is computed in (LLM(invariant=True))
#
# The other paths add the same numbers in orders that depend on the batch: SDPA for one
# sequence, two matmuls for many, a causal kernel for prefill; a matmul's blocking depends on
# its row count (measured: on this CPU a bf16 576x960 product gives other bits for M = 64 than
# for M = 32). Here every product has a fixed shape, whatever the batch:
#   - query rows, one per (query, head of the KV group), go in chunks of ROWS (the last chunk
#     padded with copies of its last row), one KV head per product;
#   - keys go in tiles of TILE absolute positions (tile t holds positions tW .. tW + W - 1),
#     so a key sits in the same tile in a prefill, a chunk or a decode step;
#   - each (chunk, tile) product (in bmm calls of a fixed batch count too) gives the tile's
#     row max m_t, sum l_t and weighted values a_t (fp32, keys after the query's position
#     masked); tiles merge as
#     sum_t exp(m_t - M) (l_t, a_t) with M the max over tiles, summed by a binary tree over
#     the absolute tile index. Tiles past a query (all masked) add exact zeros, and the tree
#     pairs tiles by index, so the number of tiles a batch needs cannot change a query's sum.
INVARIANT_TILE = 64
INVARIANT_ROWS = 16
INVARIANT_BYTES = 64 << 20  # fp32 K/V tiles gathered at once (chunks go in groups under it)


INVARIANT_BATCH = 32  # products per bmm call: CPU bmm picks its kernel by the batch count too


def fixed_bmm(a, b):
    """torch.bmm(a, b), called on exactly INVARIANT_BATCH products at a time (the last call
    padded with zeros): measured, fp16 bmm on this CPU gives other bits for the same product
    in a batch of 2 than in one of 8; with one batch count it cannot."""
    n = a.shape[0]
    pad = -n % INVARIANT_BATCH
    if pad:
        a = torch.cat([a, a.new_zeros(pad, *a.shape[1:])])
        b = torch.cat([b, b.new_zeros(pad, *b.shape[1:])])
    if n + pad == INVARIANT_BATCH:  # one call (a decode step's products, usually)
        return torch.bmm(a, b)[:n]
    return torch.cat([torch.bmm(x, y) for x, y in zip(a.split(INVARIANT_BATCH),
                                                      b.split(INVARIANT_BATCH))])[:n]


class InvariantPlan(NamedTuple):
    """A step's query rows in chunks of R, and how far each chunk walks the key tiles."""
    row_token: torch.Tensor   # (C, R) each row's token, head of the KV group and position
    row_head: torch.Tensor
    row_pos: torch.Tensor
    chunk_seq: torch.Tensor   # (C,) each chunk's sequence
    walk: list                # chunk c walks tiles 0 .. walk[c] - 1 (its last row's position's)
    seqs: list                # chunk_seq on the host


class InvariantPairs(NamedTuple):
    """The (chunk, key tile) pairs the reference computes, in chunk order."""
    chunk: torch.Tensor       # (Pairs,)
    tile: torch.Tensor        # (Pairs,)
    slots: torch.Tensor       # (Pairs, W) pool slot of each key of the tile (0 past the context)
    valid: torch.Tensor       # (Pairs, W) whether the key is in the context
    bounds: list              # chunk c's pairs are bounds[c] .. bounds[c + 1] - 1
    n_tiles: int              # the longest walk, rounded up to a power of two (the merge tree)


def invariant_plan(meta: AttnMeta, group: int, device) -> InvariantPlan:
    """The step's row chunks, the same for every layer (cached on meta), from host numbers and
    sent in one non-blocking copy: no wait for a GPU."""
    key = ("invariant_plan", group)
    if key in meta.__dict__:
        return meta.__dict__[key]
    W, R = INVARIANT_TILE, INVARIANT_ROWS
    qs, ctx = meta.query_start_host, meta.context_lens_host
    rows, seqs, walk = [], [], []
    for b in range(len(ctx)):
        n_q = qs[b + 1] - qs[b]
        seq = [(qs[b] + r // group, r % group, ctx[b] - n_q + r // group)
               for r in range(n_q * group)]
        seq += [seq[-1]] * (-len(seq) % R)  # pad the last chunk with its last row
        rows += seq
        seqs += [b] * (len(seq) // R)
        walk += [seq[c + R - 1][2] // W + 1 for c in range(0, len(seq), R)]
    token, head, pos, chunk_seq = upload([[r[i] for r in rows] for i in range(3)] + [seqs],
                                         device)
    plan = InvariantPlan(token.view(-1, R), head.view(-1, R), pos.view(-1, R), chunk_seq, walk,
                         seqs)
    meta.__dict__[key] = plan
    return plan


def invariant_pairs(meta: AttnMeta, group: int, device) -> InvariantPairs:
    """The reference's (chunk, tile) pairs (cached on meta): a chunk walks only the tiles up to
    its last row's position; the tiles a longer walk would add are all masked, exact zeros in
    the merge, so the bits are those of any longer walk (a sequence alone or among longer
    ones) at a fraction of the work."""
    key = ("invariant_pairs", group)
    if key in meta.__dict__:
        return meta.__dict__[key]
    plan = invariant_plan(meta, group, device)
    W, P, ctx = INVARIANT_TILE, meta.block_size, meta.context_lens_host
    tables = meta.block_tables_host or meta.block_tables.tolist()
    n_tiles = 1 << (max(plan.walk) - 1).bit_length()  # a power of two: the merge is a tree
    key_pos = torch.arange(n_tiles * W)
    slots = torch.zeros(len(ctx), n_tiles * W, dtype=torch.int64)
    for b, table in enumerate(tables):
        n = min(ctx[b], n_tiles * W)
        blocks = torch.tensor(table, dtype=torch.int64)[key_pos[:n] // P]
        slots[b, :n] = blocks * P + key_pos[:n] % P
    valid = key_pos[None, :] < torch.tensor(ctx)[:, None]                  # (B, nT W)
    chunk = [c for c, n in enumerate(plan.walk) for _ in range(n)]
    tile = [t for n in plan.walk for t in range(n)]
    seq, tiles = torch.tensor([plan.seqs[c] for c in chunk]), torch.tensor(tile)
    bounds = [0]
    for n in plan.walk:
        bounds.append(bounds[-1] + n)
    t = lambda x: torch.tensor(x, dtype=torch.int64, device=device)  # noqa: E731
    pairs = InvariantPairs(t(chunk), t(tile), slots.view(len(ctx), n_tiles, W)[seq, tiles]
                           .to(device), valid.view(len(ctx), n_tiles, W)[seq, tiles].to(device),
                           bounds, n_tiles)
    meta.__dict__[key] = pairs
    return pairs


def invariant_attention_ref(q, k_cache, v_cache, meta: AttnMeta, scale, kv_scales=None,
                            window=0):
    """q (T, H, D) packed new queries over their paged contexts (already stored) -> (T, H, D),
    prefill, chunk or decode alike, each query's result the same bits wherever it is computed
    (see above)."""
    n_tok, n_head, d = q.shape
    n_kv, n_blocks, block_size, _ = k_cache.shape
    group, W, R = n_head // n_kv, INVARIANT_TILE, INVARIANT_ROWS
    plan = invariant_plan(meta, group, q.device)
    pairs = invariant_pairs(meta, group, q.device)
    n_tiles, bounds = pairs.n_tiles, pairs.bounds
    acc = torch.promote_types(q.dtype, torch.float32)                    # fp32, or fp64
    rows = q.view(n_tok, n_kv, group, d)[plan.row_token, :, plan.row_head]  # (C, R, K, D)
    out = torch.empty(rows.shape, dtype=acc, device=q.device)
    n_chunks = rows.shape[0]
    step = max(1, INVARIANT_BYTES // (n_kv * n_tiles * W * d * 4 * 2))   # chunks at a time
    for c0 in range(0, n_chunks, step):
        c1 = min(c0 + step, n_chunks)
        p0, p1 = bounds[c0], bounds[c1]
        n_pairs = p1 - p0
        slots = pairs.slots[p0:p1].reshape(-1)
        kv = []  # each pair's tile of keys and values: (K, Pairs, W, D)
        for cache, sc in zip((k_cache, v_cache), kv_scales or (None, None)):
            x = cache.view(n_kv, n_blocks * block_size, d).index_select(1, slots)
            if sc is not None:
                x = dequantize_ref(x, sc.view(n_kv, n_blocks * block_size).index_select(
                    1, slots), q.dtype)
            kv.append(x.to(q.dtype).view(n_kv, n_pairs, W, d))
        # slots past a context may hold anything (NaN in a poisoned pool): their scores are
        # masked, and their values zeroed so that a zero weight times them stays zero
        k, v = kv[0], torch.where(pairs.valid[p0:p1].view(1, n_pairs, W, 1), kv[1], 0.0)
        chunk = pairs.chunk[p0:p1]
        qc = rows[chunk].permute(2, 0, 1, 3).reshape(-1, R, d)          # (K Pairs, R, D)
        # products in the model's dtype, accumulated in fp32 (as matmuls do); the softmax
        # in fp32
        s = fixed_bmm(qc, k.reshape(-1, W, d).transpose(1, 2)).to(acc) * scale
        s = s.view(n_kv, n_pairs, R, W)
        key_pos = pairs.tile[p0:p1, None, None] * W + torch.arange(W, device=q.device)
        pos = plan.row_pos[chunk][:, :, None]                              # (Pairs, R, 1)
        hidden = key_pos > pos                                             # (Pairs, R, W)
        if window:  # and keys that left a sliding window
            hidden |= key_pos <= pos - window
        s = s.masked_fill(hidden[None], float("-inf"))
        m = s.amax(-1)                                                     # (K, Pairs, R)
        p = torch.exp(s - torch.where(m == float("-inf"), 0.0, m)[..., None])
        l_t = p.sum(-1)
        a_t = fixed_bmm(p.view(-1, R, W).to(q.dtype), v.reshape(-1, W, d)).to(acc)
        # each chunk's tiles in place among n_tiles (the tiles it does not walk: max -inf,
        # sum and values exact zeros, as a masked tile gives), merged by the tree
        at = (slice(None), chunk - c0, pairs.tile[p0:p1])
        m_all = m.new_full((n_kv, c1 - c0, n_tiles, R), float("-inf"))
        l_all = l_t.new_zeros(m_all.shape)
        a_all = l_t.new_zeros((*m_all.shape, d))
        m_all[at], l_all[at], a_all[at] = m, l_t, a_t.view(n_kv, n_pairs, R, d)
        w = torch.exp(m_all - m_all.amax(2, keepdim=True))                 # 0 for masked tiles
        l_all, a_all = l_all * w, a_all * w[..., None]
        while l_all.shape[2] > 1:  # the binary tree over absolute tile index
            l_all = l_all[:, :, 0::2] + l_all[:, :, 1::2]
            a_all = a_all[:, :, 0::2] + a_all[:, :, 1::2]
        out[c0:c1] = (a_all[:, :, 0] / l_all[:, :, 0, :, None]).permute(1, 2, 0, 3)
    result = torch.empty_like(q).view(n_tok, n_kv, group, d)
    result[plan.row_token, :, plan.row_head] = out.to(q.dtype)
    return result.view(n_tok, n_head, d)


@jit
def _invariant_attention_kernel(
        q_ptr, k_cache_ptr, v_cache_ptr, k_scales_ptr, v_scales_ptr, out_ptr, block_tables_ptr,
        context_lens_ptr, row_token_ptr, row_head_ptr, row_pos_ptr, chunk_seq_ptr, qk_scale,
        window, s_qt, s_qh, s_ot, s_oh, s_ch, s_cn, s_cp, s_sh, s_sn, s_bt,
        GROUP: tl.constexpr, ROWS: tl.constexpr, TILE: tl.constexpr, BLOCK_SIZE: tl.constexpr,
        HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, QUANT: tl.constexpr,
        DOT_PRECISION: tl.constexpr):
    """Program (chunk, kv_head): the invariant attention's ROWS rows of one chunk (each a
    (query, head of the KV group) of one sequence), over key tiles of TILE absolute positions
    from the first (TILE fixed for a model, dtype and cache), every tile masked, merged by
    the online softmax in tile order. Every row
    goes through the same tl.dot shapes and the same tiles whatever the batch: a tile past a
    row's position leaves its max, sum and accumulator exactly as they were."""
    c = tl.program_id(0)
    kv_head = tl.program_id(1).to(tl.int64)
    r = tl.arange(0, ROWS)
    tok = tl.load(row_token_ptr + c * ROWS + r)
    head = kv_head * GROUP + tl.load(row_head_ptr + c * ROWS + r)
    pos = tl.load(row_pos_ptr + c * ROWS + r)
    b = tl.load(chunk_seq_ptr + c)
    n_ctx = tl.load(context_lens_ptr + b)
    d = tl.arange(0, BLOCK_D)
    d_ok = (d < HEAD_D)[None, :]
    q = tl.load(q_ptr + (tok * s_qt)[:, None] + (head * s_qh)[:, None] + d[None, :], mask=d_ok,
                other=0.0)
    m_i = tl.full([ROWS], float("-inf"), tl.float32)
    l_i = tl.zeros([ROWS], tl.float32)
    acc = tl.zeros([ROWS, BLOCK_D], tl.float32)
    for t in range(0, tl.max(pos) // TILE + 1):
        acc, m_i, l_i = _attend_tile(q, acc, m_i, l_i, k_cache_ptr + kv_head * s_ch,
                                     v_cache_ptr + kv_head * s_ch, k_scales_ptr + kv_head * s_sh,
                                     v_scales_ptr + kv_head * s_sh,
                                     block_tables_ptr + b.to(tl.int64) * s_bt, t * TILE, n_ctx,
                                     pos, window, qk_scale, s_cn, s_cp, s_sn, TILE, BLOCK_SIZE,
                                     HEAD_D, BLOCK_D, True, QUANT, DOT_PRECISION)
    tl.store(out_ptr + (tok * s_ot)[:, None] + (head * s_oh)[:, None] + d[None, :],
             (acc / l_i[:, None]).to(out_ptr.dtype.element_ty), mask=d_ok)


def invariant_attention_triton(q, k_cache, v_cache, meta: AttnMeta, scale, kv_scales=None,
                               window=0, out=None):
    """Launcher of the invariant attention: one program per (row chunk, KV head), the chunks
    of invariant_plan. Its bits differ from the reference's (it merges tiles in order, the
    reference by a tree), but, like it, not with the batch."""
    k_scales, v_scales, s_sh, s_sn = check_cache(k_cache, v_cache, q, kv_scales)
    n_tok, n_head, d = q.shape
    n_kv, _, block_size, _ = k_cache.shape
    assert q.stride(-1) == 1 and n_head % n_kv == 0 and k_cache.shape[-1] == d
    row_token, row_head, row_pos, chunk_seq, *_ = invariant_plan(meta, n_head // n_kv,
                                                                 q.device)
    out = torch.empty_like(q) if out is None else out
    # the decode kernel's tiles (16 rows as here), 32 keys at D 128 (64 spilled 16-40 B on
    # sm_86 and sm_89): fixed for a model, dtype and cache, which is all the invariance needs
    # (the keys per tile need not be the reference's)
    tiles = attention_tiles(q.dtype, d, kv_scales is not None, decode=True)
    _invariant_attention_kernel[check_grid(len(chunk_seq), n_kv)](
        q, k_cache, v_cache, k_scales, v_scales, out, meta.block_tables, meta.context_lens,
        row_token, row_head, row_pos, chunk_seq, scale * math.log2(math.e), window or NO_WINDOW,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), *k_cache.stride()[:3], s_sh,
        s_sn, meta.block_tables.stride(0), GROUP=n_head // n_kv, ROWS=INVARIANT_ROWS,
        TILE=tiles.keys if d <= 64 else min(tiles.keys, 32), BLOCK_SIZE=block_size, HEAD_D=d,
        BLOCK_D=dot_width(d),
        QUANT=kv_scales is not None, DOT_PRECISION=dot_precision(q.dtype),
        num_stages=tiles.stages, num_warps=tiles.warps, maxnreg=MAX_REGISTERS)
    return out


def invariant_attention(q, k_cache, v_cache, meta: AttnMeta, scale, kv_scales=None, window=0):
    if use_triton(q):
        return invariant_attention_triton(q, k_cache, v_cache, meta, scale, kv_scales, window)
    return invariant_attention_ref(q, k_cache, v_cache, meta, scale, kv_scales, window)


# ------------------------------------------------------------------------------------------
# the invariant mode's weight product: x @ W^T whose every row is the same bits whatever rows
# it is computed among (LLM(invariant=True))
#
# A matmul library picks its blocking, its split of the inner dimension and so its order of
# additions from the problem's size: the same row among 1 or 64 others can round differently
# (measured: on this CPU a bf16 576x960 product differs between M = 64 and M = 32; cuBLAS
# picks its kernel from M too). The reference runs every product on exactly LINEAR_ROWS rows
# (the last chunk padded with zeros): one shape, so one blocking. The Triton kernel has one
# tile configuration and no split of the inner dimension: each output element is its row
# times its column summed in BLOCK_K steps in order, whatever M is.
LINEAR_ROWS = 16


def invariant_linear_ref(x, weight, bias=None, product=None):
    """F.linear(x, weight, bias), x (M, in), computed LINEAR_ROWS rows at a time. 16 rows
    cost a decode step (one row) nothing measurable and a prefill more, smaller products.
    product(chunk) computes one chunk instead of F.linear (the model's packed weights)."""
    n = x.shape[0]
    if n % LINEAR_ROWS:
        x = torch.cat([x, x.new_zeros(LINEAR_ROWS - n % LINEAR_ROWS, x.shape[1])])
    product = product or (lambda c: F.linear(c, weight, bias))
    if x.shape[0] == LINEAR_ROWS:  # one product (a decode step's, usually)
        return product(x)[:n]
    return torch.cat([product(c) for c in x.split(LINEAR_ROWS)])[:n]


@jit
def _invariant_linear_kernel(x_ptr, w_ptr, b_ptr, out_ptr, n_rows, n_out, n_in, s_xm, s_wn,
                             s_om, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr,
                             BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                             DOT_PRECISION: tl.constexpr):
    """Persistent: each program walks the (BLOCK_M x BLOCK_N) output tiles pid, pid + grid,
    ... (row tiles first, so programs running together share a weight tile in L2). A tile is
    one fp32 accumulator over the whole inner dimension, BLOCK_K at a time in order (no
    split-K). Rows past M and columns past N read row or column 0 (their results are not
    stored); inner positions past `in` read zeros, which add exact zeros."""
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(n_rows, BLOCK_M)
    n_tiles = tiles_m * tl.cdiv(n_out, BLOCK_N)
    k_steps = tl.cdiv(n_in, BLOCK_K)
    rk = tl.arange(0, BLOCK_K)
    for tile in tl.range(pid, n_tiles, tl.num_programs(0), flatten=True):
        rm = (tile % tiles_m) * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = (tile // tiles_m) * BLOCK_N + tl.arange(0, BLOCK_N)
        x_rows = x_ptr + tl.where(rm < n_rows, rm, 0).to(tl.int64)[:, None] * s_xm
        w_cols = w_ptr + tl.where(rn < n_out, rn, 0).to(tl.int64)[None, :] * s_wn
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for ks in range(k_steps):
            k = ks * BLOCK_K + rk
            a = tl.load(x_rows + k[None, :], mask=k[None, :] < n_in, other=0.0)
            b = tl.load(w_cols + k[:, None], mask=k[:, None] < n_in, other=0.0)
            acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
        if HAS_BIAS:
            acc += tl.load(b_ptr + rn, mask=rn < n_out, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptr + rm.to(tl.int64)[:, None] * s_om + rn[None, :],
                 acc.to(out_ptr.dtype.element_ty), mask=(rm < n_rows)[:, None] &
                 (rn < n_out)[None, :])


class MatmulTiles(NamedTuple):
    block_m: int
    block_n: int
    block_k: int
    warps: int
    stages: int


# One configuration for every shape (what invariance needs), chosen to compile to the matrix
# instruction with no spill on sm_80..sm_90 (bench.py kernels --compile-only); fp32 products
# stay fp32 (dot_precision), which takes more registers, so smaller tiles.
LINEAR_TILES = {torch.float32: MatmulTiles(64, 64, 32, 4, 2),
                torch.float16: MatmulTiles(64, 64, 64, 4, 3),
                torch.bfloat16: MatmulTiles(64, 64, 64, 4, 3)}


def invariant_linear_triton(x, weight, bias=None, out=None, programs=None):
    """Launcher: min(tiles, programs) persistent programs (default: the device's
    multiprocessors, twice over). x (M, in) and weight (out, in) with unit inner stride."""
    n_rows, n_in = x.shape
    n_out = weight.shape[0]
    assert weight.shape[1] == n_in and x.stride(1) == 1 and weight.stride(1) == 1, \
        (x.shape, x.stride(), weight.shape, weight.stride())
    assert bias is None or bias.shape == (n_out,) and bias.stride(0) == 1
    out = x.new_empty(n_rows, n_out) if out is None else out
    if n_rows == 0:
        return out
    t = LINEAR_TILES[x.dtype]
    n_tiles = triton.cdiv(n_rows, t.block_m) * triton.cdiv(n_out, t.block_n)
    grid = min(n_tiles, programs or 2 * n_multiprocessors(x.device))
    _invariant_linear_kernel[check_grid(grid)](
        x, weight, weight if bias is None else bias, out, n_rows, n_out, n_in, x.stride(0),
        weight.stride(0), out.stride(0), HAS_BIAS=bias is not None, BLOCK_M=t.block_m,
        BLOCK_N=t.block_n, BLOCK_K=t.block_k, DOT_PRECISION=dot_precision(x.dtype),
        num_warps=t.warps, num_stages=t.stages)
    return out


def invariant_linear(x, weight, bias=None):
    """The invariant mode's x @ W^T (+ b) for x (M, in): Triton on CUDA, the 16-row reference
    elsewhere. Each row's bits depend on that row, the weight and the bias only."""
    if use_triton(x):
        return invariant_linear_triton(x.contiguous(), weight, bias)
    return invariant_linear_ref(x, weight, bias)


def paged_attention(q, k_cache, v_cache, meta: AttnMeta, scale, kv_scales=None, window=0):
    """The model's one entry point: decode batches take the decode kernel, anything with more
    than one new token per sequence (prefill, chunks, verification) the prefill kernel.
    window: a sliding window (keys in (p - window, p]), 0 for none."""
    if meta.is_decode:
        return decode_attention(q, k_cache, v_cache, meta, scale, kv_scales, window)
    return prefill_attention(q, k_cache, v_cache, meta, scale, kv_scales, window)
