"""
Attention and cache kernels over the paged KV cache.

Every operation has three parts side by side:
  - `<op>_ref(...)`: plain torch, the specification; it is the CPU engine and the test oracle;
  - a Triton kernel and its launcher (to come, behind the same signatures, for CUDA);
  - `<op>(...)`: the public function the model calls; it will dispatch on the tensors' device
    (today every call takes the reference).

This file deliberately holds no model, no cache bookkeeping and no module state: it takes
tensors and an `AttnMeta` and returns tensors. The cache layout it reads, per layer, is
    k_cache, v_cache: (K, N, P, D)   K KV heads, N blocks of P slots, head dim D
and a token at slot s = block_id * P + offset lives at k_cache[:, block_id, offset].

Shapes (the alphabet of model.py): B sequences, T new tokens (packed, all sequences),
S context length, H query heads, K KV heads, G = H // K query heads per KV head, D head dim,
N blocks, P block size.

Tests: `pytest test_kernels.py`.
"""
from dataclasses import dataclass
from functools import cached_property

import torch
import torch.nn.functional as F


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
    block_size: int = 0  # P of the pool the block tables index

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
    def _head_block_rows(self) -> dict:
        return {}

    def head_block_rows(self, n_kv, n_blocks) -> torch.Tensor:
        """(K * B * n_used,) rows of a layer's cache viewed as (K N, P, D) that hold each
        head's copy of every block of decode_gather, in (head, sequence, block) order. The
        same for every layer, so built once per step."""
        memo = self._head_block_rows
        if (n_kv, n_blocks) not in memo:
            blocks = self.decode_gather[0]
            heads = torch.arange(n_kv, device=blocks.device).unsqueeze(1) * n_blocks  # (K, 1)
            memo[n_kv, n_blocks] = (heads + blocks.reshape(1, -1)).view(-1)
        return memo[n_kv, n_blocks]

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
                       tuple(range(len(seqs) + 1)), self.block_size)
        return rows, sub

    @cached_property
    def last_token_index(self) -> torch.Tensor:
        """(B,) position in the packed batch of each sequence's last new token."""
        return self.query_start[1:] - 1


# ------------------------------------------------------------------------------------------
# store K/V into slots

def store_kv_ref(k, v, k_cache, v_cache, meta: AttnMeta):
    """Write the new tokens' k, v (T, K, D) into the pool, token t at slot_mapping[t], i.e.
    block slot // P, offset slot % P. In place: the pool is the cache's own tensor, and
    writing into it is the point."""
    block, offset = meta.slot_block_offset
    k_cache.permute(1, 2, 0, 3).index_put_((block, offset), k)  # a (N, P, K, D) view
    v_cache.permute(1, 2, 0, 3).index_put_((block, offset), v)


def store_kv(k, v, k_cache, v_cache, meta: AttnMeta):
    return store_kv_ref(k, v, k_cache, v_cache, meta)


# ------------------------------------------------------------------------------------------
# attention of new queries over each sequence's paged context (prefill, chunked prefill,
# prefix-cache hits, speculative verification all take this path)

def gather_context(k_cache, v_cache, block_table, n_ctx):
    """The first n_ctx tokens of one sequence as contiguous (K, S, D) tensors."""
    n_kv, _, block_size, d = k_cache.shape
    n_used = -(-n_ctx // block_size)
    blocks = block_table[:n_used]
    k = k_cache.index_select(1, blocks).view(n_kv, n_used * block_size, d)[:, :n_ctx]
    v = v_cache.index_select(1, blocks).view(n_kv, n_used * block_size, d)[:, :n_ctx]
    return k, v


def causal_attention_one(q, k, v, scale):
    """Attention of the last Tq positions of a sequence over all of its S keys.
    q (Tq, H, D), k/v (K, S, D) -> (Tq, H, D). Query i sits at position S - Tq + i and sees keys
    0..S-Tq+i. SDPA accumulates in fp32 (fp64 for fp64 inputs)."""
    n_q, n_head, d = q.shape
    n_kv, n_ctx, _ = k.shape
    g = n_head // n_kv
    qh = q.view(n_q, n_kv, g, d).permute(1, 2, 0, 3)                    # (K, G, Tq, D)
    # GQA: each KV head is broadcast over its G query heads with a stride-0 expand, no copy.
    # (enable_gqa=True would do the same but sends CPU SDPA down its slow math path.)
    kh = k.unsqueeze(1).expand(n_kv, g, n_ctx, d)                       # (K, G, S, D)
    vh = v.unsqueeze(1).expand(n_kv, g, n_ctx, d)
    if n_q == n_ctx:  # no cached prefix: the plain causal diagonal
        out = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, scale=scale)
    else:  # a cached prefix shifts the diagonal by S - Tq
        q_pos = torch.arange(n_ctx - n_q, n_ctx, device=q.device).unsqueeze(1)  # (Tq, 1)
        k_pos = torch.arange(n_ctx, device=q.device).unsqueeze(0)              # (1, S)
        out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=k_pos <= q_pos, scale=scale)
    return out.permute(2, 0, 1, 3).reshape(n_q, n_head, d)              # (K, G, Tq, D) -> ...


def prefill_attention_ref(q, k_cache, v_cache, meta: AttnMeta, scale):
    """q (T, H, D) packed new queries -> (T, H, D). Each sequence attends over its paged context
    (cached prefix plus its new tokens, already stored), causally. In a mixed batch the
    sequences that decode (one new token) go through the batched decode path together."""
    out = torch.empty_like(q)
    qs, cl = meta.query_start_host, meta.context_lens_host
    decoding = meta.decode_subset
    if decoding is not None:
        rows, sub_meta = decoding
        out[rows] = decode_attention_ref(q[rows], k_cache, v_cache, sub_meta, scale)
    for b in range(len(cl)):
        if decoding is None or qs[b + 1] - qs[b] > 1:
            k, v = gather_context(k_cache, v_cache, meta.block_tables[b], cl[b])
            out[qs[b]:qs[b + 1]] = causal_attention_one(q[qs[b]:qs[b + 1]], k, v, scale)
    return out


def prefill_attention(q, k_cache, v_cache, meta: AttnMeta, scale):
    return prefill_attention_ref(q, k_cache, v_cache, meta, scale)


# ------------------------------------------------------------------------------------------
# decode attention: one new query per sequence, all sequences in one batched computation

def decode_attention_ref(q, k_cache, v_cache, meta: AttnMeta, scale):
    """q (B, H, D), one query per sequence at its last position -> (B, H, D). Gathers every
    sequence's blocks, padded to the longest context, and masks the padding. With one query
    position there is no causal mask, so the G query heads of a KV head are simply G rows."""
    n_seq, n_head, d = q.shape
    n_kv, _, block_size, _ = k_cache.shape
    blocks, valid = meta.decode_gather                                   # (B, n_used), (B, S)
    n_ctx = blocks.shape[1] * block_size
    n_blocks = k_cache.shape[1]
    # every head's copy of every block, as rows of the (K N, P, D) view: a dim-0 gather
    rows_kn = meta.head_block_rows(n_kv, n_blocks)
    k = k_cache.view(n_kv * n_blocks, block_size, d).index_select(0, rows_kn) \
        .view(n_kv, n_seq, n_ctx, d)                                      # (K, B, S, D)
    v = v_cache.view(n_kv * n_blocks, block_size, d).index_select(0, rows_kn) \
        .view(n_kv, n_seq, n_ctx, d)
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


def decode_attention(q, k_cache, v_cache, meta: AttnMeta, scale):
    return decode_attention_ref(q, k_cache, v_cache, meta, scale)


# ------------------------------------------------------------------------------------------
# attention without any cache: the uncached baseline (and the dense oracle of the tests)

def dense_causal_attention(q, k, v, query_start, scale):
    """Ragged causal attention of every packed sequence over its own new tokens only.
    q (T, H, D), k/v (T, K, D), query_start host list (B+1,) -> (T, H, D)."""
    out = torch.empty_like(q)
    for b in range(len(query_start) - 1):
        s, e = query_start[b], query_start[b + 1]
        out[s:e] = causal_attention_one(q[s:e], k[s:e].transpose(0, 1), v[s:e].transpose(0, 1),
                                        scale)
    return out


def paged_attention(q, k_cache, v_cache, meta: AttnMeta, scale):
    """The model's one entry point: decode batches take the decode kernel, anything with more
    than one new token per sequence (prefill, chunks, verification) the prefill kernel."""
    if meta.is_decode:
        return decode_attention(q, k_cache, v_cache, meta, scale)
    return prefill_attention(q, k_cache, v_cache, meta, scale)
