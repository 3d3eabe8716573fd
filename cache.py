"""
The paged KV cache: one preallocated pool tensor, a block allocator, per-sequence block tables.

A sequence's tokens live in fixed-size blocks of P slots scattered anywhere in the pool; its
block table lists them in order, so token i of the sequence is at
    slot = block_table[i // P] * P + i % P
and the pool never fragments: any free block serves any sequence.

Memory: every token stores one K and one V vector per layer and KV head, so
    bytes_per_token = 2 * n_layer * n_kv_head * head_dim * bytes_per_element.

What this file deliberately is not (yet): prefix sharing, reference counts above one, eviction,
copy-on-write. It holds no model and runs no attention; it only hands out slots. Every
operation either succeeds or raises before changing anything, so a failed request never leaves
the pool inconsistent; `check_invariants()` asserts that.

Tests: `pytest test_cache.py`.
"""
import math
from collections import deque

import torch


class CacheFull(RuntimeError):
    """The pool has no free block for a requested append. Nothing was changed."""


def bytes_per_token(n_layer, n_kv_head, head_dim, dtype) -> int:
    """K and V, every layer, every KV head: 2 * L * K * D * bytes_per_element."""
    return 2 * n_layer * n_kv_head * head_dim * torch.empty((), dtype=dtype).element_size()


def blocks_for_budget(budget_bytes, block_size, n_layer, n_kv_head, head_dim, dtype) -> int:
    """How many whole blocks fit in a memory budget."""
    return int(budget_bytes // (block_size * bytes_per_token(n_layer, n_kv_head, head_dim, dtype)))


class KVCache:
    """The pool `kv` has shape (n_layer, 2, N, P, K, D): kv[layer, 0] is the K cache and
    kv[layer, 1] the V cache of that layer, each (N, P, K, D) and contiguous."""

    def __init__(self, n_layer, n_kv_head, head_dim, n_blocks, block_size=16,
                 dtype=torch.float32, device="cpu"):
        if block_size < 1 or n_blocks < 1:
            raise ValueError(f"block_size ({block_size}) and n_blocks ({n_blocks}) must be >= 1")
        self.n_layer, self.n_kv_head, self.head_dim = n_layer, n_kv_head, head_dim
        self.n_blocks, self.block_size, self.dtype = n_blocks, block_size, dtype
        self.kv = torch.zeros(n_layer, 2, n_blocks, block_size, n_kv_head, head_dim,
                              dtype=dtype, device=device)
        # per layer (k_cache, v_cache) views, built once: the model indexes these every step
        self.layers = [(layer[0], layer[1]) for layer in self.kv]
        self.bytes_per_token = bytes_per_token(n_layer, n_kv_head, head_dim, dtype)
        self.free_blocks = deque(range(n_blocks))  # FIFO free list of physical block ids
        self.block_tables: dict[int, list[int]] = {}  # seq id -> physical blocks, in order
        self.seq_lens: dict[int, int] = {}  # seq id -> tokens stored (or reserved by append)

    # -- queries ----------------------------------------------------------------------------

    @property
    def n_free_blocks(self) -> int:
        """Blocks that no live sequence references."""
        return len(self.free_blocks)

    @property
    def n_used_blocks(self) -> int:
        return self.n_blocks - len(self.free_blocks)

    @property
    def bytes_in_use(self) -> int:
        """Bytes of the blocks held by live sequences (whole blocks: that is what they pin)."""
        return self.n_used_blocks * self.block_size * self.bytes_per_token

    @property
    def capacity_tokens(self) -> int:
        return self.n_blocks * self.block_size

    def blocks_needed(self, n_tokens) -> int:
        return math.ceil(n_tokens / self.block_size)

    def n_new_blocks(self, seq_id, n_tokens) -> int:
        """How many fresh blocks appending n_tokens to seq_id (new or live) would take."""
        n_now = self.seq_lens.get(seq_id, 0)
        n_have = len(self.block_tables.get(seq_id, ()))
        return max(0, self.blocks_needed(n_now + n_tokens) - n_have)

    def can_append(self, seq_id, n_tokens) -> bool:
        return self.n_new_blocks(seq_id, n_tokens) <= len(self.free_blocks)

    def block_table(self, seq_id) -> list[int]:
        return self.block_tables[seq_id]

    def seq_len(self, seq_id) -> int:
        return self.seq_lens[seq_id]

    # -- updates ----------------------------------------------------------------------------

    def append(self, seq_id, n_tokens) -> list[int]:
        """Reserve slots for n_tokens more tokens of seq_id (created if new) and return their
        slot ids, in order. Raises CacheFull, changing nothing, if the pool is short."""
        if n_tokens < 0:
            raise ValueError(f"cannot append {n_tokens} tokens")
        n_new = self.n_new_blocks(seq_id, n_tokens)
        if n_new > len(self.free_blocks):
            raise CacheFull(f"sequence {seq_id} needs {n_new} more blocks of {self.block_size} "
                            f"tokens, {len(self.free_blocks)} of {self.n_blocks} are free")
        table = self.block_tables.setdefault(seq_id, [])
        start = self.seq_lens.get(seq_id, 0)
        for _ in range(n_new):
            table.append(self.free_blocks.popleft())
        self.seq_lens[seq_id] = start + n_tokens
        p = self.block_size
        return [table[i // p] * p + i % p for i in range(start, start + n_tokens)]

    def free(self, seq_id):
        """Return all blocks of seq_id to the pool. Freeing an unknown sequence is a no-op, so a
        cleanup path may call it unconditionally."""
        for block in self.block_tables.pop(seq_id, []):
            self.free_blocks.append(block)
        self.seq_lens.pop(seq_id, None)

    def block_table_tensor(self, seq_ids, device=None) -> torch.Tensor:
        """(B, max_blocks) int64 block tables of the given sequences, padded with block 0
        (padding is never read: context_lens bounds every read)."""
        tables = [self.block_tables[s] for s in seq_ids]
        width = max(1, max(len(t) for t in tables))
        out = torch.zeros(len(tables), width, dtype=torch.int64)
        for i, t in enumerate(tables):
            out[i, :len(t)] = torch.tensor(t, dtype=torch.int64)
        return out.to(device or self.kv.device)

    # -- invariants -------------------------------------------------------------------------

    def check_invariants(self):
        """Assert the bookkeeping is consistent: every block is either free or held by exactly
        one sequence, none is lost, and every table holds exactly the blocks its length needs."""
        held = [b for t in self.block_tables.values() for b in t]
        free = list(self.free_blocks)
        assert len(set(held)) == len(held), "a block is held twice"
        assert len(set(free)) == len(free), "a block is on the free list twice"
        assert not set(held) & set(free), "a block is both free and held"
        assert sorted(held + free) == list(range(self.n_blocks)), "a block is lost"
        assert self.block_tables.keys() == self.seq_lens.keys(), "tables and lengths disagree"
        for s, t in self.block_tables.items():
            assert len(t) == self.blocks_needed(self.seq_lens[s]), f"sequence {s} has {len(t)} " \
                f"blocks for {self.seq_lens[s]} tokens"
