"""
The block allocator: slots are unique and where the block tables say, failures change nothing,
no block is ever lost, and the memory formula is the one in DESIGN.md.
"""
import pytest
import torch
from hypothesis import given, strategies as st

from cache import CacheFull, KVCache, blocks_for_budget, bytes_per_token

ops = st.lists(st.tuples(st.sampled_from(["append", "free"]), st.integers(0, 4),
                         st.integers(0, 20)), max_size=60)


@given(ops, st.sampled_from([1, 2, 4, 16]), st.integers(1, 12))
def test_random_appends_and_frees_keep_invariants(script, block_size, n_blocks):
    c = KVCache(n_layer=1, n_kv_head=1, head_dim=2, n_blocks=n_blocks, block_size=block_size)
    model = {}  # seq -> number of tokens it holds: the simple truth the cache must agree with
    for op, seq, n in script:
        if op == "append":
            before = (dict(c.seq_lens), {s: list(t) for s, t in c.block_tables.items()},
                      list(c.free_blocks))
            try:
                slots = c.append(seq, n)
            except CacheFull:  # only when the blocks really are short, and nothing changed
                assert c.blocks_needed(model.get(seq, 0) + n) - len(before[1].get(seq, [])) > \
                    len(before[2])
                assert (c.seq_lens, c.block_tables, list(c.free_blocks)) == before
            else:
                start = model.get(seq, 0)
                model[seq] = start + n
                table = c.block_table(seq)
                assert slots == [table[i // block_size] * block_size + i % block_size
                                 for i in range(start, start + n)]
        else:
            c.free(seq)
            model.pop(seq, None)
        c.check_invariants()
        assert c.seq_lens == model
        all_slots = [t[i // block_size] * block_size + i % block_size
                     for s, t in c.block_tables.items() for i in range(c.seq_lens[s])]
        assert len(all_slots) == len(set(all_slots)), "two tokens share a slot"
    for s in list(model):
        c.free(s)
    c.check_invariants()
    assert c.n_free_blocks == n_blocks


def test_memory_formula_for_smollm2_shapes():
    # 2 (K and V) * 30 layers * 3 KV heads * 64 dims * 2 bytes (bf16)
    assert bytes_per_token(30, 3, 64, torch.bfloat16) == 23040
    assert bytes_per_token(30, 3, 64, torch.float32) == 46080
    n = blocks_for_budget(1 << 20, 16, 30, 3, 64, torch.bfloat16)
    assert n == (1 << 20) // (16 * 23040) == 2
    c = KVCache(30, 3, 64, n_blocks=n, block_size=16, dtype=torch.bfloat16)
    assert c.kv.numel() * c.kv.element_size() == n * 16 * 23040
    c.append(0, 17)
    assert c.bytes_in_use == 2 * 16 * 23040 and c.n_free_blocks == 0


def test_pool_layout_puts_each_layer_contiguous():
    c = KVCache(n_layer=3, n_kv_head=2, head_dim=4, n_blocks=5, block_size=8)
    assert c.kv.shape == (3, 2, 5, 8, 2, 4)
    assert c.kv[1, 0].is_contiguous() and c.kv[2, 1].is_contiguous()


def test_bad_settings_are_rejected():
    with pytest.raises(ValueError):
        KVCache(1, 1, 1, n_blocks=0)
    with pytest.raises(ValueError):
        KVCache(1, 1, 1, n_blocks=4, block_size=0)
    c = KVCache(1, 1, 1, n_blocks=4)
    with pytest.raises(ValueError):
        c.append(0, -1)
    c.check_invariants()
